"""timm's ConvNeXt: convolutional stages whose last stage's blocks each add a residual branch to the grid.

Components: `embed` (the last stage's input: the stem and every earlier stage), the last stage's blocks
`S{s}.B{b}` (`S{s}` for all of them) and `bias` (the pooled norm's β and the projection's bias). It has no heads.
Its units are the channels of the last stage's output, `L{s}.N{c}` as a ResNet's: each one's grid mean reaches the
embedding directly through the pooled norm and the projection (`vit.convnext.trace`).
"""

from __future__ import annotations

from typing import Callable

from clipterm import names
from clipterm.names import Component
from clipterm.towers.base import Tower


class ConvNextTower(Tower):
    channel_units = True
    family = "convnext"

    @property
    def units(self) -> str:  # type: ignore[override]
        return f"a block ({names.block(self.shape.stage, 0)}) or a channel"

    @property
    def vocabulary(self) -> str:
        s = self.shape
        return (f"this ConvNeXt's components are embed, bias and the blocks of its last stage "
                f"S{s.stage}.B0..S{s.stage}.B{s.layers - 1} (S{s.stage} for all of them); it has no heads"
                + (f"; its units are the last stage's channels {names.neuron(s.stage, 0)}.."
                   f"{names.neuron(s.stage, s.neurons - 1)}" if s.neuron_layer is not None else ""))

    def site_layers(self) -> int:
        return self.shape.stage + 1

    def validate(self, component: Component) -> Component:
        if component.kind == "feature":
            return self.validate_feature(component)
        s = self.shape
        if component.kind in ("embed", "bias") and component.site == "block":
            return component
        if component.kind == "neuron" and component.site == "block":
            if s.neuron_layer is None:
                raise self.refuse(f"{component}: this cache was built before a ConvNeXt's channels were units "
                                  "(rebuild it with --force)")
            if component.layer != s.neuron_layer:
                raise self.refuse(f"{component} is not a channel of this ConvNeXt's last stage")
            if not 0 <= component.index < s.neurons:  # type: ignore[operator]
                raise self.refuse(f"no channel {component.index} in this model: {component}")
            return component
        if component.site != "stage":
            raise self.refuse(f"{component} is not a ConvNeXt name")
        if component.stage != s.stage:
            raise self.refuse(f"{component}: only the last stage's blocks are components")
        if component.kind == "mlp" and not 0 <= component.layer < s.layers:  # type: ignore[operator]
            raise self.refuse(f"no block {component.layer} in stage {s.stage}: {component}")
        return component

    def describe(self, component: Component) -> str:
        if component.kind == "neuron":
            pc = f", principal direction {component.pc}" if component.pc else ""
            return f"channel {component.index} of stage {component.layer}'s output, read through the pool{pc}"
        if component.kind in ("embed", "bias") and component.site == "block":
            return {"embed": f"the input of stage {self.shape.stage}: the stem and every earlier stage",
                    "bias": "the pooled norm's β and the projection's bias"}[component.kind]
        return names.describe(component)

    def layers(self) -> list[str]:
        return self.mlps()

    def mlps(self) -> list[str]:
        return [names.block(self.shape.stage, k) for k in range(self.shape.layers)]

    def direct_components(self) -> list[Component]:
        s = self.shape
        return [Component("embed"), Component("bias"),
                *[Component("mlp", k, site="stage", stage=s.stage) for k in range(s.layers)]]

    def top_level(self) -> list[str]:
        return ["embed", names.stage(self.shape.stage)]

    def layer_group(self, layer: int) -> list[str]:
        return self.mlps()

    def palette(self) -> list[str]:  # its layers are its blocks, which are also its MLPs
        return ["embed", names.stage(self.shape.stage), *self.mlps(), "bias"]

    def ablation_layer(self, layer: int | None) -> int | None:
        return self.shape.stage

    def ablation_title(self, layer: int) -> str:
        return f"{names.stage(layer)} blocks"

    def ablation_whole(self) -> str:
        return f"the stage's input and the whole stage {names.stage(self.shape.stage)}"

    def no_words(self, component: str, kind: str) -> str:
        why = {"embed": f"{component} is the input of the last stage, with no TextSpan statistics of its own; ",
               "bias": f"{component} is the same for every image: nothing to put in words; ",
               "layer": f"{component} is the whole stage; TextSpan describes one block at a time; "}.get(kind, "")
        return why + f"select a block ({names.block(self.shape.stage, 0)}) to see what it says in words"

    def neuron_parent(self, layer: int) -> str:
        return names.stage(layer)

    def neuron_layers(self) -> list[int]:
        return [] if self.shape.neuron_layer is None else [self.shape.neuron_layer]

    def channel_grid(self, model, pixels):
        from clipterm.vit.convnext import channel_grid

        return channel_grid(model, pixels)  # (B, C, h, w)

    def position_effects(self, model, pixels, component: Component):
        from clipterm.vit.convnext import block_positions

        if component.kind == "layer":  # the whole stage: its blocks' per-position effects summed
            parts = [block_positions(model, pixels, k) for k in range(self.shape.layers)]
            return sum(p[0] for p in parts), parts[0][1]
        return block_positions(model, pixels, component.layer)  # (B, P, D), (B, D)

    def is_unit_group(self, component: str) -> bool:
        return False

    def neuron_paths(self):
        from clipterm.vit import convnext

        return convnext

    def check_neuron_layer(self, layer: int) -> None:
        self.neuron_paths().check_layer(self.shape.layers, layer, self.shape.neuron_layer)

    def search_hint(self) -> str:
        return ("this node has no direction to search for: select a block or a channel, or type a target "
                "(text:a red circle, class:red) and press enter")

    def visual_refusal(self, refusal: Callable[[str], str | None]) -> str | None:
        return refusal("feature visualisation")

    def no_neurons(self) -> str:
        return f"none (clipterm neurons build CACHE --layer {names.layer(self.shape.stage)}: the last stage's channels)"

    def info_shapes(self, component: Component | None, dims: dict) -> tuple[dict[str, str], str]:
        s, embed = self.shape, dims.get("embed_dim")
        return ({"mlp": f"(N, {embed}) in joint space, averaged over the grid",
                 "neuron": f"direct effect ({embed}) through the pool",
                 "layer": f"{s.layers} blocks, (N, {embed}) in joint space",
                 "embed": f"(N, {embed}) in joint space", "bias": f"(1, {embed}): the same for every image"},
                f"a ConvNeXt: embed (the input of stage {s.stage}), the {s.layers} blocks of stage {s.stage} and bias; "
                "no heads")
