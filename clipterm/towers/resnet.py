"""open_clip's ModifiedResNet: convolutional stages, then an attention pool over the last stage's grid.

Components: the pool's heads `pool.H{h}`, its positional share `pool.pos` and its biases `pool.bias` (`pool`
for all heads); its units are the last stage's channels, `L3.N{c}`, read through the pool. The stored shape
holds one attention layer, the pool, at slot `shape.pool_layer`.
"""

from __future__ import annotations


from clipterm import names
from clipterm.names import Component
from clipterm.towers.base import Tower


class ResNetTower(Tower):
    channel_units = True
    family = "resnet"
    units = "a pool head or a channel"

    @property
    def vocabulary(self) -> str:
        s = self.shape
        return (f"this ResNet's components are pool.H0..pool.H{s.heads - 1}, pool.pos, pool.bias (and pool for all "
                f"heads); its neurons are the last stage's channels {names.neuron(s.neuron_layer, 0)}.."
                f"{names.neuron(s.neuron_layer, s.neurons - 1)}")

    def site_layers(self) -> int:
        return self.shape.neuron_layer + 1

    def validate(self, component: Component) -> Component:
        if component.kind == "feature":
            return self.validate_feature(component)
        s = self.shape
        if component.kind == "neuron" or (component.kind == "layer" and component.site == "block"):
            if component.layer != s.neuron_layer:
                raise self.refuse(f"{component} is not a channel of this ResNet's last stage")
            if component.kind == "neuron" and not 0 <= component.index < s.neurons:  # type: ignore[operator]
                raise self.refuse(f"no channel {component.index} in this model: {component}")
            return component
        if component.site != "pool":
            raise self.refuse(f"{component} is a ViT name, and this model is a ResNet")
        if component.kind == "mlp":
            raise self.refuse(f"{component}: this ResNet's pool has no MLP")
        if component.kind == "head" and not 0 <= component.index < s.heads:  # type: ignore[operator]
            raise self.refuse(f"no head {component.index} in this model's pool: {component}")
        return Component(component.kind, s.pool_layer, component.index, component.pc, site="pool")

    def visual_unit(self, component: Component) -> Component:
        """Feature visualisation climbs the channels of every stage (`L0.N5` .. `L3.N511`), not only those the pool
        reads; the climb checks the channel against its stage's width."""
        if component.kind == "neuron" and component.site == "block":
            if not 0 <= component.layer <= self.shape.neuron_layer:  # type: ignore[operator]
                raise self.refuse(f"no stage {component.layer} in this ResNet: {component} (stages "
                                  f"{names.layer(0)}..{names.layer(self.shape.neuron_layer)})")
            return component
        return self.validate(component)

    def describe(self, component: Component) -> str:
        if component.site == "block":
            pc = f", principal direction {component.pc}" if component.pc else ""
            if component.kind == "neuron":
                return f"channel {component.index} of stage {names.layer(component.layer)}, read through the attention pool{pc}"
            return f"stage {names.layer(component.layer)}: its channels are the neurons"
        return names.describe(component)

    def heads(self, layers: list[int] | None = None) -> list[Component]:
        wanted = layers is None or self.shape.pool_layer in layers
        return [Component("head", self.shape.pool_layer, h, site="pool") for h in range(self.shape.heads)] if wanted else []

    def layers(self) -> list[str]:
        return [names.pool()]

    def direct_components(self) -> list[Component]:
        slot = self.shape.pool_layer
        return [Component("embed", slot, site="pool"), Component("bias", slot, site="pool"), *self.heads()]

    def layer_group(self, layer: int) -> list[str]:
        return [str(h) for h in self.heads()] + [names.pool_pos()]

    def palette(self) -> list[str]:
        return super().palette() + [names.pool_pos(), names.pool_bias(), names.layer(self.shape.neuron_layer)]

    def ablation_layer(self, layer: int | None) -> int | None:
        return self.shape.pool_layer

    def ablation_title(self, layer: int) -> str:
        return "the pool's heads and positional part"

    def ablation_whole(self) -> str:
        return "the whole pool"

    def neuron_parent(self, layer: int) -> str:
        return names.layer(layer)

    def neuron_layers(self) -> list[int]:
        return [] if self.shape.neuron_layer is None else [self.shape.neuron_layer]

    def channel_grid(self, model, pixels):
        from clipterm.vit.resnet import last_stage

        return last_stage(model, pixels)  # (B, C, h, w)

    def neuron_paths(self):
        from clipterm.vit import resnet

        return resnet

    def is_unit_group(self, component: str) -> bool:
        return component == names.layer(self.shape.neuron_layer)

    def no_words(self, component: str, kind: str) -> str:
        channel = names.neuron(self.shape.neuron_layer, 0)
        why = {"embed": f"{component} carries position, not image content: nothing to put in words; ",
               "bias": f"{component} is the same for every image: nothing to put in words; "}.get(kind, "")
        return why + f"select a pool head ({names.pool_head(0)}) or a channel ({channel}) to see what it says in words"

    def spatial_hint(self) -> str:
        return "select the pool, a pool head or a channel, or type a text query and press enter"

    def info_shapes(self, component: Component | None, dims: dict) -> tuple[dict[str, str], str]:
        shapes, _ = super().info_shapes(component, dims)
        s, embed = self.shape, dims.get("embed_dim")
        shapes |= {"neuron": f"direct effect ({embed}) through the pool's {s.heads} heads",
                   "layer": f"{s.heads} heads" if component and component.site == "pool" else f"{s.neurons} channels",
                   "embed": f"(N, {embed}) in joint space", "bias": f"(1, {embed}): the same for every image"}
        return shapes, (f"a ResNet: an attention pool of {s.heads} heads over {names.layer(s.neuron_layer)}'s "
                        f"{s.neurons} channels")
