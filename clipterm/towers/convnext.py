"""timm's ConvNeXt: convolutional stages whose last stage's blocks each add a residual branch to the grid.

Components: `embed` (the last stage's input: the stem and every earlier stage), the last stage's blocks
`S{s}.B{b}` (`S{s}` for all of them) and `bias` (the pooled norm's β and the projection's bias). It has no heads.
"""

from __future__ import annotations

from typing import Callable

from clipterm import names
from clipterm.names import Component
from clipterm.towers.base import Tower


class ConvNextTower(Tower):
    family = "convnext"

    @property
    def units(self) -> str:  # type: ignore[override]
        return f"a block ({names.block(self.shape.stage, 0)})"

    @property
    def vocabulary(self) -> str:
        s = self.shape
        return (f"this ConvNeXt's components are embed, bias and the blocks of its last stage "
                f"S{s.stage}.B0..S{s.stage}.B{s.layers - 1} (S{s.stage} for all of them); it has no heads")

    def site_layers(self) -> int:
        return self.shape.stage + 1

    def validate(self, component: Component) -> Component:
        if component.kind == "feature":
            return self.validate_feature(component)
        s = self.shape
        if component.kind in ("embed", "bias") and component.site == "block":
            return component
        if component.site != "stage":
            raise self.refuse(f"{component} is not a ConvNeXt name")
        if component.stage != s.stage:
            raise self.refuse(f"{component}: only the last stage's blocks are components")
        if component.kind == "mlp" and not 0 <= component.layer < s.layers:  # type: ignore[operator]
            raise self.refuse(f"no block {component.layer} in stage {s.stage}: {component}")
        return component

    def describe(self, component: Component) -> str:
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

    def search_hint(self) -> str:
        return ("a ConvNeXt has no head or neuron directions to search for; type a target "
                "(text:a red circle, class:red) and press enter")

    def visual_refusal(self, refusal: Callable[[str], str | None]) -> str | None:
        return refusal("feature visualisation")

    def no_neurons(self) -> str:
        return "none (second-order neurons need attention heads; a ConvNeXt has none)"

    def info_shapes(self, component: Component | None, dims: dict) -> tuple[dict[str, str], str]:
        s, embed = self.shape, dims.get("embed_dim")
        return ({"mlp": f"(N, {embed}) in joint space, averaged over the grid",
                 "layer": f"{s.layers} blocks, (N, {embed}) in joint space",
                 "embed": f"(N, {embed}) in joint space", "bias": f"(1, {embed}): the same for every image"},
                f"a ConvNeXt: embed (the input of stage {s.stage}), the {s.layers} blocks of stage {s.stage} and bias; "
                "no heads")
