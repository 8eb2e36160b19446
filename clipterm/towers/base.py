"""The Tower interface: what one family of image towers is made of, and how its parts are named and shown.

A `Tower` is built from a model's stored shape (`tower_for(shape)` in `clipterm.towers`) and owns every fact that
differs between families: which component names are valid and what each means, the units (layers, heads, pool
heads, MLPs or blocks, neurons or channels) and the components whose direct effects add up to the embedding,
the groups that ablation compares, and the words the TUI uses for them. Callers ask the tower; none of them
branches on the family. The model side (decomposition, readouts, per-token split, the differentiable forward)
still lives in `clipterm.vit` and moves here next.
"""

from __future__ import annotations

from typing import Callable, ClassVar

from clipterm import names
from clipterm.errors import ClipTermError
from clipterm.names import Component, ModelShape


class Tower:
    """One family's units and names; subclasses: `VitTower`, `ResNetTower`, `ConvNextTower`."""

    family: ClassVar[str]
    units: ClassVar[str] = "a head, an MLP or a neuron"  # what the Images pane asks the user to select
    channel_units: ClassVar[bool] = False  # its neurons are channels of a grid (`channel_grid`), not MLP neurons

    def __init__(self, shape: ModelShape):
        self.shape = shape

    # ----------------------------------------------------------------- names

    @property
    def vocabulary(self) -> str:
        """The model's names, in one line (for hints)."""
        raise NotImplementedError

    def validate(self, component: Component) -> Component:
        """Check a parsed name against this tower; returns it (a pool part gets its stored layer slot)."""
        raise NotImplementedError

    def site_layers(self) -> int:
        """How many residual sites an SAE can read (`L0..`): blocks of a ViT, stages of a ResNet or ConvNeXt."""
        return self.shape.layers

    def validate_feature(self, component: Component) -> Component:
        """An SAE feature `L4.F12`: its layer must be a site of this tower (its index is checked by the SAE file)."""
        count = self.site_layers()
        if not 0 <= (component.layer or 0) < count:
            raise ClipTermError(f"no layer {component.layer} for SAE features in this model: {component}",
                                hint=f"SAE sites run {names.layer(0)}..{names.layer(count - 1)}")
        return component

    def parse(self, name: str) -> Component:
        """Parse and validate in one step."""
        return self.validate(names.parse(name))

    def visual_unit(self, component: Component) -> Component:
        """Check a parsed name as a unit that feature visualisation can climb (any stage's channel for a ResNet)."""
        return self.validate(component)

    def describe(self, component: Component) -> str:
        """A short human description of what a component is."""
        return names.describe(component)

    def refuse(self, message: str) -> ClipTermError:
        return ClipTermError(message, hint=self.vocabulary)

    # ----------------------------------------------------------------- units

    def heads(self, layers: list[int] | None = None) -> list[Component]:
        """Every attention head, layer-major (of `layers` when given)."""
        return []

    def layers(self) -> list[str]:
        """Every stored attention layer's name."""
        raise NotImplementedError

    def mlps(self) -> list[str]:
        """Every MLP (or block) with a direct effect of its own."""
        return []

    def direct_components(self) -> list[Component]:
        """Every top-level component with a stored direct effect; they add up to the image embedding."""
        raise NotImplementedError

    def pool_components(self) -> list[Component]:
        """An attention pool's own split after the blocks (MAP head, CoCa), which also adds up to the embedding."""
        return []

    def top_level(self) -> list[str]:
        """What the model-level ablation compares."""
        return self.layers()

    def layer_group(self, layer: int) -> list[str]:
        """What the Ablation pane compares within one stored layer (`ablation_layer`'s value)."""
        raise NotImplementedError

    def cumulative_label(self, layer: int) -> str:
        """The name of the rows 0..`layer` of the stored layers taken together (cumulative ablation)."""
        return self.layers()[layer]

    def palette(self) -> list[str]:
        """The components the command palette lists, before the tree's own nodes."""
        return self.layers() + [str(h) for h in self.heads()] + self.mlps()

    # ----------------------------------------------------------------- neurons (the neurons file)

    def neuron_paths(self):
        """The module that builds this tower's neuron effects (`check_layer`, `paths`, `path_vectors`, `trace`):
        a ViT's MLP neurons through later heads (`vit.second_order`); a ResNet's or ConvNeXt's last-stage channels
        through the pool."""
        from clipterm.vit import second_order

        return second_order

    def neuron_layers(self) -> list[int]:
        """The layers whose neurons can be built (every MLP layer but the last, which has no later heads)."""
        return list(range(self.shape.layers - 1)) if self.shape.neurons else []

    def channel_grid(self, model, pixels):
        """A CNN's units are channels: their activations over the last stage's grid, (B, C, h, w); None for a ViT,
        whose neurons have a value per token instead."""
        return None

    def position_effects(self, model, pixels, component: Component):
        """(B, P, D) a component's direct effect split over the grid's positions, and (B, D) the embeddings, where
        the tower splits it by position rather than by attention (a ConvNeXt block); None where it does not."""
        return None

    def check_neuron_layer(self, layer: int) -> None:
        """Refuse a layer whose neurons have no stored paths (a ViT's last layer; any stage but a CNN's last)."""
        self.neuron_paths().check_layer(self.shape.layers, layer)

    # ----------------------------------------------------------------- how the TUI groups and titles them

    def ablation_layer(self, layer: int | None) -> int | None:
        """Whose parts the Ablation pane lists for a selection in `layer` (None: the model node)."""
        return layer

    def ablation_title(self, layer: int) -> str:
        return f"{names.layer(layer)} heads and MLP"

    def ablation_whole(self) -> str:
        """The title of the Ablation pane's model-level section."""
        return "whole layers"

    def neuron_parent(self, layer: int) -> str:
        """The tree node a layer's neurons hang under."""
        return names.mlp(layer)

    def is_unit_group(self, component: str) -> bool:
        """A node that only groups units (a ResNet's last stage), with no map or direction of its own."""
        return False

    def no_words(self, component: str, kind: str) -> str:
        """One line: why the selection has no Descriptions, and what has."""
        return "select a head (L0.H0), an MLP (L0.MLP) or a neuron to see what it says in words"

    def spatial_hint(self) -> str:
        return "select a layer, head, MLP or neuron, or type a text query and press enter"

    def search_hint(self) -> str:
        return ("this node has no direction to search for: select a head or a neuron, or type a target "
                "(text:a red circle, class:red) and press enter")

    def visual_refusal(self, refusal: Callable[[str], str | None]) -> str | None:
        """Why the TUI's Visualise pane has nothing for this tower (None: it has); `refusal` gives the model's own."""
        return None

    def no_neurons(self) -> str:
        """What the Info pane says when no neurons file is built."""
        return "none (clipterm neurons build CACHE --layer L…)"

    def info_shapes(self, component: Component | None, dims: dict) -> tuple[dict[str, str], str]:
        """The Info pane's tensor shape per component kind, and its one-line overview of the model."""
        shape, embed = self.shape, dims.get("embed_dim")
        head_dim = dims.get("pool_head_dim") if component is not None and component.site == "pool" and shape.pool_heads \
            else dims.get("head_dim")
        return ({"head": f"head_out (N, {head_dim}) → joint space ({embed})",
                 "mlp": f"(N, {embed}) in joint space, {shape.neurons} neurons",
                 "neuron": f"second-order effect ({embed}) through the later layers' heads",
                 "layer": f"{shape.heads} heads + MLP"},
                f"{shape.layers} layers × {shape.heads} heads")

    def _check_range(self, component: Component, value: int | None, count: int, what: str, run: str) -> None:
        if value is not None and not 0 <= value < count:
            raise ClipTermError(f"no {what} {value} in this model: {component}", hint=f"{run} run {self._run(run, count)}")

    @staticmethod
    def _run(run: str, count: int) -> str:
        prefix = {"layers": "L", "heads": "H", "neurons": "N"}[run]
        return f"{prefix}0..{prefix}{count - 1}"
