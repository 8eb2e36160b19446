"""Vision transformers: open_clip's and timm's, pooled by the class token, an average, or an attention pool.

Components: `embed`, `bias`, `L{l}.H{h}`, `L{l}.MLP` and neurons `L{l}.N{n}`. A tower that pools by attention
after its blocks (SigLIP's MAP head, CoCa; `shape.pool_heads` > 0) also has the pool's own split, `pool.H{g}`,
`pool.bias` and, for a MAP head, `pool.MLP`; its block components are then read through the pool.
"""

from __future__ import annotations

from clipterm import names
from clipterm.names import Component
from clipterm.towers.base import Tower


class VitTower(Tower):
    family = "vit"

    @property
    def vocabulary(self) -> str:
        s = self.shape
        if s.pool_heads:
            extra = ", pool.MLP" if s.pool_mlp else ""
            return (f"this ViT's components are embed, bias, L0..L{s.layers - 1} with .H0..H{s.heads - 1} and "
                    f".MLP, read through its attention pool; the pool's own are pool.H0..pool.H{s.pool_heads - 1}, "
                    f"pool.bias{extra} (and pool for all its heads)")
        return (f"this ViT's components are embed, bias, L0..L{s.layers - 1} with .H0..H{s.heads - 1} and .MLP; "
                f"neurons .N0..N{s.neurons - 1}")

    def validate(self, component: Component) -> Component:
        if component.kind == "feature":
            return self.validate_feature(component)
        s = self.shape
        if component.site == "stage":
            raise self.refuse(f"{component} names a ConvNeXt block, and this model is a ViT")
        if component.site == "pool" and s.pool_heads:
            return self._validate_pool(component)
        if component.site == "pool":
            raise self.refuse(f"{component} names an attention pool, and this model has none")
        self._check_range(component, component.layer, s.layers, "layer", "layers")
        if component.kind == "head":
            self._check_range(component, component.index, s.heads, "head", "heads")
        if component.kind == "neuron":
            self._check_range(component, component.index, s.neurons, "neuron", "neurons")
        return component

    def _validate_pool(self, component: Component) -> Component:
        s = self.shape
        if component.kind == "embed":
            raise self.refuse(f"{component}: this model's pool adds no positional embedding of its own")
        if component.kind == "mlp" and not s.pool_mlp:
            raise self.refuse(f"{component}: this model's attention pool has no MLP")
        if component.kind == "head" and not 0 <= component.index < s.pool_heads:  # type: ignore[operator]
            raise self.refuse(f"no head {component.index} in this model's pool: {component}")
        slot = s.layers if component.kind == "mlp" else None  # pool.MLP: the slot after the last block's MLP
        return Component(component.kind, slot, component.index, component.pc, site="pool")

    def describe(self, component: Component) -> str:
        if component.site == "pool" and self.shape.pool_heads:
            pc = f", principal direction {component.pc}" if component.pc else ""
            return {
                "layer": "the attention pool: all its heads",
                "head": f"head {component.index} of the attention pool{pc}: what it reads from the normed stream",
                "bias": "the attention pool's value and output biases (and the norm β they read)",
                "mlp": "the MAP head's MLP on the pooled vector",
            }[component.kind]
        return names.describe(component)

    def heads(self, layers: list[int] | None = None) -> list[Component]:
        wanted = layers if layers is not None else range(self.shape.layers)
        return [Component("head", l, h) for l in wanted for h in range(self.shape.heads)]

    def layers(self) -> list[str]:
        return [names.layer(l) for l in range(self.shape.layers)]

    def mlps(self) -> list[str]:
        own = [names.pool_mlp()] if self.shape.pool_heads and self.shape.pool_mlp else []
        return [names.mlp(l) for l in range(self.shape.layers)] + own

    def direct_components(self) -> list[Component]:
        s = self.shape
        mlp_parts = [Component("mlp", l) for l in range(s.layers)]
        if s.pool_heads and s.pool_mlp:
            mlp_parts.append(Component("mlp", s.layers, site="pool"))
        return [Component("embed"), Component("bias"), *self.heads(), *mlp_parts]

    def pool_components(self) -> list[Component]:
        s = self.shape
        if not s.pool_heads:
            return []
        own = [Component("mlp", s.layers, site="pool")] if s.pool_mlp else []
        return [*[Component("head", index=g, site="pool") for g in range(s.pool_heads)], Component("bias", site="pool"),
                *own]

    def cumulative_label(self, layer: int) -> str:
        return names.format_layers(list(range(layer + 1)))

    def layer_group(self, layer: int) -> list[str]:
        return [names.head(layer, h) for h in range(self.shape.heads)] + [names.mlp(layer)]
