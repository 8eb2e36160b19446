"""The reference's convention for direct effects (clip_text_span), read from a clipterm cache.

Gandelsman, Efros & Steinhardt, "Interpreting CLIP's image representation via text-based
decomposition" (ICLR 2024), code `prs_hook.py`: ln_post is linearised with each image's mean μ and σ
of the class-token residual, but instead of centring every write by its own mean (clipterm), each of
the 2L+1 residual terms (ln_pre's output, L attention layers, L MLPs) subtracts an equal share of μ
and adds an equal share of β, a head's share being 1/H of its layer's; each head also carries 1/H of
its layer's out-proj bias; every term is divided by the image's ‖embedding‖. For a raw write y with
share s:

    ref(y) = [γ ⊙ (y − s·μ)/σ + s·β] @ proj / ‖e‖ = (centred(y) + (ȳ/σ − s·μ/σ)·(γ @ proj) + s·β @ proj) / ‖e‖

where `centred(y)` is clipterm's effect and ȳ the write's own mean. ȳ/σ is not in clipterm's
effects; it is rebuilt from the cache: ln_pre's class-token output is the same for every image, a
head's is `head_out · mean_w(W_O^h)`, an MLP's is `neurons · mean_w(c_proj) + mean(bias)` (so the
cache needs `--neurons`). The terms add up to e/‖e‖ exactly, like clipterm's add up to e.
"""

from __future__ import annotations

from typing import Any

import torch

from clipterm import names
from clipterm.errors import ClipTermError, ExitCode
from clipterm.vit.second_order import CONVENTIONS, check_convention  # noqa: F401  (one list of conventions)


def require(reader: Any) -> None:
    """Refuse, before any model loads, a cache the reference convention cannot be read from."""
    from clipterm.vit.towers import refuse_analysis

    refuse_analysis(reader.manifest["model"], "--convention reference (second_order_lens' class-token split)")
    if not reader.manifest["stored"]["neurons"]:
        raise ClipTermError(f"--convention reference needs the MLPs' neuron activations, and cache {reader.name} has none",
                            hint="rebuild the cache with `clipterm cache build ... --neurons`", code=ExitCode.USAGE)


class ReferenceView:
    """A cache's direct effects in the reference's convention: `effects(name)` (N, D), summing to e/‖e‖.

    Names: `embed` (the reference's first "MLP", ln_pre's output), `L{l}.H{h}`, `L{l}.MLP`, `L{l}`; there is
    no `bias`: β and the out-proj biases are shared out among the other terms.
    """

    def __init__(self, reader: Any, model: Any):
        from clipterm.vit.decompose import _head_scale, layer_scale_vector, ln_post_affine, vision_tower

        shape = reader.shape
        require(reader)
        self.reader, self.layers, self.heads = reader, shape.layers, shape.heads
        visual = vision_tower(model)
        width, device = visual.transformer.width, visual.conv1.weight.device
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            gamma, beta, proj = ln_post_affine(visual)  # (W,), (W,), (W, D)
            self.gamma_proj, self.beta_proj = (gamma @ proj).cpu(), (beta @ proj).cpu()  # (D,) each
            cls = visual.class_embedding.float() + visual.positional_embedding[0].float()  # (W,)
            ln_pre = visual.ln_pre
            if isinstance(ln_pre, torch.nn.LayerNorm):
                weight = ln_pre.weight.float() if ln_pre.weight is not None else None
                bias = ln_pre.bias.float() if ln_pre.bias is not None else None
                cls = torch.nn.functional.layer_norm(cls, (width,), weight, bias, ln_pre.eps)  # (W,)
            embed_mean = float(cls.mean())
            sigma = reader.ln_scale().float()  # (N,)
            self.norm = reader.image_embeds().norm(dim=-1, keepdim=True)  # (N, 1)
            self.embed_mean = embed_mean / sigma  # (N,): ȳ/σ of ln_pre's class-token output
            self.head_means = torch.zeros(reader.n, shape.layers, shape.heads)  # (N, L, H)
            self.mlp_means = torch.zeros(reader.n, shape.layers)  # (N, L)
            self.bias_means = torch.zeros(shape.layers)  # (L,) mean of each layer's out-proj bias
            self.bias_centred = torch.zeros(shape.layers, proj.shape[1])  # (L, D) centred(b_l), before /σ
            for layer, block in enumerate(visual.transformer.resblocks):
                attn, heads = block.attn, block.attn.num_heads
                w_out = attn.out_proj.weight.float().T.reshape(heads, width // heads, width)  # (H, dh, W)
                w_out = w_out * _head_scale(attn, device).view(heads, 1, 1) * layer_scale_vector(block.ls_1, width, device)
                row_means = w_out.mean(-1).cpu()  # (H, dh)
                for head in range(heads):
                    self.head_means[:, layer, head] = reader.head_out((layer, head)).float() @ row_means[head]  # (N,)
                if attn.out_proj.bias is not None:
                    bias = attn.out_proj.bias.float() * layer_scale_vector(block.ls_1, width, device)  # (W,)
                    self.bias_means[layer] = float(bias.mean())
                    self.bias_centred[layer] = (((bias - bias.mean()) * gamma) @ proj).cpu()  # (D,)
                c_proj = block.mlp.c_proj
                scale = layer_scale_vector(block.ls_2, width, device)  # (W,)
                per_neuron = (c_proj.weight.float().T * scale).mean(-1).cpu()  # (M,)
                bias_mean = float((c_proj.bias.float() * scale).mean()) if c_proj.bias is not None else 0.0
                self.mlp_means[:, layer] = (reader.neurons(layer).float() @ per_neuron + bias_mean) / sigma  # (N,)
        self.sigma = sigma
        self.stream_mean = (self.embed_mean + self.head_means.sum((1, 2)) + self.mlp_means.sum(1)
                            + self.bias_means.sum() / sigma)  # (N,): μ/σ of the class-token residual
        self.terms = 2 * shape.layers + 1

    def _shared(self, own_mean: torch.Tensor, share: float) -> torch.Tensor:
        """(ȳ/σ − s·μ/σ)·(γ @ proj) + s·β @ proj, (N, D)."""
        return (own_mean - share * self.stream_mean)[:, None] * self.gamma_proj + share * self.beta_proj

    def head_factors(self, layer: int, head: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A head's reference effect as `coords @ readout`: coords (N, dh+3) per image, readout (dh+3, D) fixed.

        The rows of the readout are the head's own R_h, then its share of the out-proj bias, γ @ proj and
        s·β @ proj; the coords are head_out, 1/(Hσ), ȳ/σ − s·μ/σ and 1, each divided by the image's ‖e‖. So
        the effects' second moments, and TextSpan, need only dh+3 numbers per image.
        """
        share = 1.0 / (self.terms * self.heads)
        own = self.head_means[:, layer, head] + self.bias_means[layer] / (self.heads * self.sigma)  # (N,)
        coords = torch.cat([self.reader.head_out((layer, head)).float(),  # (N, dh)
                            (1.0 / (self.heads * self.sigma))[:, None],  # (N, 1)
                            (own - share * self.stream_mean)[:, None],  # (N, 1)
                            torch.ones(len(own), 1)], dim=1) / self.norm  # (N, dh+3)
        readout = torch.cat([self.reader.readout[layer, head], self.bias_centred[layer][None],
                             self.gamma_proj[None], share * self.beta_proj[None]])  # (dh+3, D)
        return coords, readout

    def _head(self, layer: int, head: int) -> torch.Tensor:
        coords, readout = self.head_factors(layer, head)  # (N, dh+3), (dh+3, D)
        return coords @ readout  # (N, D)

    def effects(self, name: str) -> torch.Tensor:
        """The reference's direct effect (N, D) of `embed`, a head, an MLP or a layer (its heads plus MLP)."""
        comp = self.reader.tower.validate(names.parse(name)).base
        if comp.kind == "head":
            return self._head(comp.layer, comp.index)
        if comp.kind == "layer":
            return sum(self._head(comp.layer, head) for head in range(self.heads)) + self.effects(names.mlp(comp.layer))
        if comp.kind == "embed":
            effect = self.reader.effects("embed") + self._shared(self.embed_mean, 1.0 / self.terms)
        elif comp.kind == "mlp":
            effect = self.reader.effects(name) + self._shared(self.mlp_means[:, comp.layer], 1.0 / self.terms)
        else:
            raise ClipTermError(f"{name} has no direct effect in the reference convention",
                                hint="the reference shares β and the out-proj biases out among embed, heads and MLPs")
        return effect / self.norm  # (N, D)
