"""Component names: one vocabulary for tree ids, CLI arguments, JSON and the Python API.

| name            | meaning                                              |
|-----------------|------------------------------------------------------|
| `embed`         | class + positional embedding after `ln_pre`          |
| `bias`          | `ln_post` bias and attention out-proj biases         |
| `L10`           | layer 10 (attention and MLP)                         |
| `L10.H3`        | head 3 of layer 10 (`:pc2` picks a principal direction) |
| `L10.MLP`       | the MLP of layer 10                                  |
| `L9.N1234`      | neuron 1234 of layer 9's MLP (`:pc1`)                |
| `L4.F123`       | feature 123 of the sparse autoencoder on the residual after block 4 (a stage's output for a ResNet or ConvNeXt) |

Layers and heads count from 0. Layer sets: `L9`, `L8-11`, `L8-L11`, `L1,L3,L5`, `all`.

A tower that ends in an attention pool (a ModifiedResNet's `attnpool`; later a SigLIP MAP head) names its
parts under `pool`, with the same kinds as a block's (`site="pool"`):

| name         | kind  | meaning                                                                   |
|--------------|-------|---------------------------------------------------------------------------|
| `pool`       | layer | the whole pool: all its heads                                             |
| `pool.H3`    | head  | pool head 3: the image content it reads (`:pc2` as for block heads)       |
| `pool.pos`   | embed | the positional embedding's share through the pool (no image content)      |
| `pool.bias`  | bias  | the pool's value and output biases                                        |
| `pool.MLP`   | mlp   | reserved for MAP heads (a pool with an MLP after its attention)           |

A ResNet's layers are its stages (L0..L3 for open_clip's layer1..layer4); its neurons are the channels
of the last stage, read through the pool: `L3.N1234`. `ModelShape.tower` says which vocabulary a
model speaks, and `validate` refuses the other one's names with the model's own vocabulary as the hint.
A pool component's `layer` is its slot in the stored head tensors (`ModelShape.pool_layer`), filled in
by `validate`; `parse` leaves it None.

A ViT that pools by attention after its blocks (SigLIP's MAP head, PE-Core's, CoCa's attentional pooler;
`ModelShape.pool_heads` > 0) speaks the ViT names and the pool's: `pool.H{g}` (pool head g: what it reads
from the normed stream, the split of the pool by head), `pool.bias`, `pool` (all pool heads) and, for a
MAP head, `pool.MLP` (its MLP on the pooled vector: one component, not split further). `L{l}.H{h}` and
`L{l}.MLP` are then each block component read through the whole pool, with its attention frozen; the
block view `embed, bias, L*.H*, L*.MLP, pool.MLP` and the pool view `pool.H*, pool.bias, pool.MLP` both
add up to the embedding. `pool.MLP`'s `layer` is its slot after the last block's (`ModelShape.layers`).

A ConvNeXt (`tower="convnext"`) is named by its last stage's blocks, each a residual branch added to the
grid: `S3.B2` is block 2 of stage 3 (timm's `stages.3.blocks.2`; stages and blocks count from 0; kind
`mlp`, site `stage`), `S3` all of them, `embed` the stage's input (the stem and every earlier stage) and
`bias` the pooled norm's β and the projection's bias. It has no heads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from clipterm.errors import ClipTermError

Kind = Literal["embed", "bias", "layer", "head", "mlp", "neuron", "feature"]
Site = Literal["block", "pool", "stage"]
Tower = Literal["vit", "resnet", "convnext"]

_PATTERN = re.compile(
    r"^(?:(?P<special>embed|bias)"
    r"|L(?P<layer>\d+)(?:\.(?:H(?P<head>\d+)|(?P<mlp>MLP)|N(?P<neuron>\d+)|F(?P<feature>\d+)))?(?::pc(?P<pc>\d+))?"
    r"|pool(?:\.(?:H(?P<pool_head>\d+)|(?P<pool_part>bias|pos|MLP)))?(?::pc(?P<pool_pc>\d+))?"
    r"|S(?P<stage>\d+)(?:\.B(?P<block>\d+))?)$",
    re.IGNORECASE,
)
_HINT = ("names look like embed, bias, L10, L10.H3, L10.H3:pc2, L10.MLP, L9.N1234 or L4.F123 (an SAE feature); pool.H3, pool.pos, pool.bias "
         "for a ResNet; pool.H3, pool.bias, pool.MLP for a MAP head; S3.B2 for a ConvNeXt block (all count from 0)")
_POOL_SUFFIX = {"layer": "", "head": ".H{index}", "mlp": ".MLP", "bias": ".bias", "embed": ".pos"}


@dataclass(frozen=True)
class Component:
    """A parsed component name. `index` is the head or neuron number; `pc` the principal direction (1-based)."""

    kind: Kind
    layer: int | None = None
    index: int | None = None
    pc: int | None = None
    site: Site = "block"  # "pool": part of the tower's attention pool, spelled `pool.*`; "stage": a ConvNeXt's
    stage: int | None = None  # site "stage": the stage number (`S3.B2`: stage 3, layer = block 2)

    def __str__(self) -> str:
        if self.site == "stage":
            return f"S{self.stage}" if self.kind == "layer" else f"S{self.stage}.B{self.layer}"
        if self.site == "pool":
            base = "pool" + _POOL_SUFFIX[self.kind].format(index=self.index)
            return base if self.pc is None else f"{base}:pc{self.pc}"
        if self.kind in ("embed", "bias"):
            return self.kind
        base = f"L{self.layer}" + {"layer": "", "head": f".H{self.index}", "mlp": ".MLP", "neuron": f".N{self.index}",
                                 "feature": f".F{self.index}"}[self.kind]
        return base if self.pc is None else f"{base}:pc{self.pc}"

    @property
    def base(self) -> Component:
        """The component without its `:pcK` suffix."""
        return Component(self.kind, self.layer, self.index, site=self.site, stage=self.stage)


@dataclass(frozen=True)
class ModelShape:
    """What names are valid for: layer count, heads per layer, MLP neurons per layer.

    A ResNet (`tower="resnet"`) stores one attention layer, its pool (`layers=1`, `pool_layer=0`);
    `neurons` are the channels of its last stage, `neuron_layer` (3 for open_clip's four stages)."""

    layers: int
    heads: int
    neurons: int
    tower: Tower = "vit"
    pool_layer: int | None = None  # slot of the pool's heads in the stored head tensors
    neuron_layer: int | None = None  # a ResNet's last stage, whose channels are the neurons
    pool_heads: int = 0  # a ViT with an attention pool after its blocks (MAP head, CoCa): the pool's heads
    pool_mlp: bool = False  # that pool has an MLP on the pooled vector (a MAP head): `pool.MLP`
    stage: int | None = None  # a ConvNeXt's last stage, whose blocks are the components


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


def feature(layer: int, index: int) -> str:
    """`L4.F123`: feature 123 of the sparse autoencoder at the residual after block 4."""
    return str(Component("feature", layer, index))


def pool_head(index: int, pc: int | None = None) -> str:
    """`pool.H3` (or `pool.H3:pc2`): a head of the tower's attention pool."""
    return str(Component("head", index=index, pc=pc, site="pool"))


def pool_bias() -> str:
    """`pool.bias`: the pool's value and output biases."""
    return str(Component("bias", site="pool"))


def pool_pos() -> str:
    """`pool.pos`: the positional embedding's share through the pool."""
    return str(Component("embed", site="pool"))


def pool() -> str:
    """`pool`: the whole attention pool."""
    return str(Component("layer", site="pool"))


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
    if match["stage"] is not None:
        block = match["block"]
        return Component("layer" if block is None else "mlp", None if block is None else int(block), site="stage",
                         stage=int(match["stage"]))
    if name.strip()[:4].lower() == "pool":
        return _parse_pool(name, match)
    layer, pc = int(match["layer"]), (int(match["pc"]) if match["pc"] else None)
    if pc is not None and pc < 1:
        raise ClipTermError(f"principal directions count from 1: {name!r}", hint="use :pc1 for the first")
    if match["head"] is not None:
        return Component("head", layer, int(match["head"]), pc)
    if match["neuron"] is not None:
        return Component("neuron", layer, int(match["neuron"]), pc)
    if match["feature"] is not None:
        if pc is not None:
            raise ClipTermError(f"SAE features have no principal directions: {name!r}", hint="a feature is one direction: L4.F12")
        return Component("feature", layer, int(match["feature"]))
    if pc is not None:
        raise ClipTermError(f"only heads and neurons have principal directions: {name!r}", hint="try L10.H3:pc2")
    return Component("mlp" if match["mlp"] else "layer", layer)


def _parse_pool(name: str, match: re.Match) -> Component:
    pc = int(match["pool_pc"]) if match["pool_pc"] else None
    if pc is not None and pc < 1:
        raise ClipTermError(f"principal directions count from 1: {name!r}", hint="use :pc1 for the first")
    if match["pool_head"] is not None:
        return Component("head", index=int(match["pool_head"]), pc=pc, site="pool")
    if pc is not None:
        raise ClipTermError(f"only heads and neurons have principal directions: {name!r}", hint="try pool.H3:pc2")
    part = (match["pool_part"] or "").lower()
    return Component({"": "layer", "bias": "bias", "pos": "embed", "mlp": "mlp"}[part], site="pool")  # type: ignore[arg-type]


def block(stage: int, index: int) -> str:
    """`S3.B2`: block 2 of a ConvNeXt's stage 3."""
    return str(Component("mlp", index, site="stage", stage=stage))


def stage(number: int) -> str:
    """`S3`: all the blocks of a ConvNeXt's stage 3."""
    return str(Component("layer", site="stage", stage=number))


def pool_mlp() -> str:
    """`pool.MLP`: a MAP head's MLP on the pooled vector."""
    return str(Component("mlp", site="pool"))


def describe(component: Component) -> str:
    """A short human description of what a component is, from its name alone (a tower's `describe` knows more)."""
    pc = f", principal direction {component.pc}" if component.pc else ""
    if component.site == "stage":
        if component.kind == "layer":
            return f"stage {component.stage}: all its blocks"
        return f"block {component.layer} of stage {component.stage}: its whole residual branch, averaged over the grid"
    if component.site == "pool":
        return {
            "layer": "the attention pool: all its heads",
            "head": f"head {component.index} of the attention pool{pc}: the image content it reads",
            "embed": "the positional embedding's share through the attention pool",
            "bias": "the attention pool's value and output biases",
            "mlp": "the attention pool's MLP",
        }[component.kind]
    return {
        "embed": "class + positional embedding after ln_pre",
        "bias": "ln_post bias and attention out-proj biases",
        "layer": f"layer {component.layer}: its attention heads and its MLP",
        "head": f"attention head {component.index} of layer {component.layer}{pc}",
        "mlp": f"the MLP of layer {component.layer}",
        "neuron": f"neuron {component.index} of layer {component.layer}'s MLP{pc}",
        "feature": f"feature {component.index} of the sparse autoencoder on the residual after {layer(component.layer)}",
    }[component.kind]


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


__all__ = [
    "Component",
    "ModelShape",
    "block",
    "describe",
    "feature",
    "format_layers",
    "head",
    "layer",
    "layer_range",
    "mlp",
    "neuron",
    "parse",
    "parse_layers",
    "pool",
    "pool_bias",
    "pool_head",
    "pool_mlp",
    "pool_pos",
    "stage",
]
