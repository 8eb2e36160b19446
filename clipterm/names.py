"""Component names: one vocabulary for tree ids, CLI arguments, JSON and the Python API.

| name            | meaning                                              |
|-----------------|------------------------------------------------------|
| `embed`         | class + positional embedding after `ln_pre`          |
| `bias`          | `ln_post` bias and attention out-proj biases         |
| `L10`           | layer 10 (attention and MLP)                         |
| `L10.H3`        | head 3 of layer 10 (`:pc2` picks a principal direction) |
| `L10.MLP`       | the MLP of layer 10                                  |
| `L9.N1234`      | neuron 1234 of layer 9's MLP (`:pc1`)                |

Layers and heads count from 0. Layer sets: `L9`, `L8-11`, `L8-L11`, `L1,L3,L5`, `all`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from clipterm.errors import ClipTermError

Kind = Literal["embed", "bias", "layer", "head", "mlp", "neuron"]

_PATTERN = re.compile(
    r"^(?:(?P<special>embed|bias)"
    r"|L(?P<layer>\d+)(?:\.(?:H(?P<head>\d+)|(?P<mlp>MLP)|N(?P<neuron>\d+)))?(?::pc(?P<pc>\d+))?)$",
    re.IGNORECASE,
)
_HINT = "names look like embed, bias, L10, L10.H3, L10.H3:pc2, L10.MLP or L9.N1234 (layers and heads count from 0)"


@dataclass(frozen=True)
class Component:
    """A parsed component name. `index` is the head or neuron number; `pc` the principal direction (1-based)."""

    kind: Kind
    layer: int | None = None
    index: int | None = None
    pc: int | None = None

    def __str__(self) -> str:
        if self.kind in ("embed", "bias"):
            return self.kind
        base = f"L{self.layer}" + {"layer": "", "head": f".H{self.index}", "mlp": ".MLP", "neuron": f".N{self.index}"}[self.kind]
        return base if self.pc is None else f"{base}:pc{self.pc}"

    @property
    def base(self) -> Component:
        """The component without its `:pcK` suffix."""
        return Component(self.kind, self.layer, self.index)


@dataclass(frozen=True)
class ModelShape:
    """What names are valid for: layer count, heads per layer, MLP neurons per layer."""

    layers: int
    heads: int
    neurons: int


def layer(layer: int) -> str:
    """`L9`: a layer's name."""
    return str(Component("layer", layer))


def head(layer: int, index: int, pc: int | None = None) -> str:
    """`L10.H3` (or `L10.H3:pc2`): a head's name."""
    return str(Component("head", layer, index, pc))


def mlp(layer: int) -> str:
    """`L10.MLP`: an MLP's name."""
    return str(Component("mlp", layer))


def neuron(layer: int, index: int, pc: int | None = None) -> str:
    """`L9.N1234` (or `L9.N1234:pc1`): a neuron's name."""
    return str(Component("neuron", layer, index, pc))


def layer_range(lo: int, hi: int) -> str:
    """`L8-11`: a run of layers, as a layer set spells it."""
    return layer(lo) if lo == hi else f"{layer(lo)}-{hi}"


def parse(name: str) -> Component:
    """Parse one component name, or raise ClipTermError with a hint."""
    match = _PATTERN.match(name.strip())
    if not match:
        raise ClipTermError(f"not a component name: {name!r}", hint=_HINT)
    if match["special"]:
        return Component(match["special"].lower())  # type: ignore[arg-type]
    layer, pc = int(match["layer"]), (int(match["pc"]) if match["pc"] else None)
    if pc is not None and pc < 1:
        raise ClipTermError(f"principal directions count from 1: {name!r}", hint="use :pc1 for the first")
    if match["head"] is not None:
        return Component("head", layer, int(match["head"]), pc)
    if match["neuron"] is not None:
        return Component("neuron", layer, int(match["neuron"]), pc)
    if pc is not None:
        raise ClipTermError(f"only heads and neurons have principal directions: {name!r}", hint="try L10.H3:pc2")
    return Component("mlp" if match["mlp"] else "layer", layer)


def validate(component: Component, shape: ModelShape) -> Component:
    """Check a component against a model's shape; return it unchanged."""
    if component.layer is not None and not 0 <= component.layer < shape.layers:
        raise ClipTermError(
            f"no layer {component.layer} in this model: {component}",
            hint=f"layers run L0..L{shape.layers - 1}",
        )
    if component.kind == "head" and not 0 <= component.index < shape.heads:  # type: ignore[operator]
        raise ClipTermError(f"no head {component.index} in this model: {component}", hint=f"heads run H0..H{shape.heads - 1}")
    if component.kind == "neuron" and not 0 <= component.index < shape.neurons:  # type: ignore[operator]
        raise ClipTermError(
            f"no neuron {component.index} in this model: {component}", hint=f"neurons run N0..N{shape.neurons - 1}"
        )
    return component


def describe(component: Component) -> str:
    """A short human description of what a component is."""
    pc = f", principal direction {component.pc}" if component.pc else ""
    return {
        "embed": "class + positional embedding after ln_pre",
        "bias": "ln_post bias and attention out-proj biases",
        "layer": f"layer {component.layer}: its attention heads and its MLP",
        "head": f"attention head {component.index} of layer {component.layer}{pc}",
        "mlp": f"the MLP of layer {component.layer}",
        "neuron": f"neuron {component.index} of layer {component.layer}'s MLP{pc}",
    }[component.kind]


def parse_for(name: str, shape: ModelShape) -> Component:
    """Parse and validate in one step."""
    return validate(parse(name), shape)


def parse_layers(spec: str, n_layers: int) -> list[int]:
    """Parse a layer set (`L9`, `L8-11`, `L8-L11`, `L1,L3`, `all`) into sorted layer numbers."""
    if spec.strip().lower() == "all":
        return list(range(n_layers))
    layers: set[int] = set()
    for part in spec.split(","):
        match = re.fullmatch(r"\s*L(\d+)(?:\s*-\s*L?(\d+))?\s*", part, re.IGNORECASE)
        if not match:
            raise ClipTermError(f"not a layer set: {spec!r}", hint="layer sets look like L9, L8-11, L1,L3 or all")
        lo = int(match[1])
        hi = int(match[2]) if match[2] is not None else lo
        if hi < lo:
            raise ClipTermError(f"empty layer range: {part.strip()!r}", hint=f"write the lower layer first, e.g. L{hi}-{lo}")
        if hi >= n_layers:
            raise ClipTermError(f"no layer {hi} in this model: {spec!r}", hint=f"layers run L0..L{n_layers - 1}")
        layers.update(range(lo, hi + 1))
    return sorted(layers)


def format_layers(layers: list[int]) -> str:
    """The shortest layer-set spelling: [8, 9, 10, 11] -> 'L8-11', [1, 3] -> 'L1,L3'."""
    parts, run = [], []
    for number in sorted(set(layers)):
        if run and number == run[-1] + 1:
            run.append(number)
            continue
        if run:
            parts.append(layer_range(run[0], run[-1]))
        run = [number]
    if run:
        parts.append(layer_range(run[0], run[-1]))
    return ",".join(parts)


def heads(shape: ModelShape, layers: list[int] | None = None) -> list[Component]:
    """Every head, layer-major."""
    return [Component("head", l, h) for l in (layers if layers is not None else range(shape.layers)) for h in range(shape.heads)]


def direct_components(shape: ModelShape) -> list[Component]:
    """Every component with a stored direct effect: embed, bias, all heads, all MLPs."""
    mlps = [Component("mlp", l) for l in range(shape.layers)]
    return [Component("embed"), Component("bias"), *heads(shape), *mlps]


__all__ = [
    "Component",
    "ModelShape",
    "describe",
    "direct_components",
    "format_layers",
    "head",
    "heads",
    "layer",
    "layer_range",
    "mlp",
    "neuron",
    "parse",
    "parse_for",
    "parse_layers",
    "validate",
]
