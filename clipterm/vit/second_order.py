"""Second-order effects of MLP neurons on the image embedding, and their principal directions.

Gandelsman, Efros & Steinhardt, "Interpreting the Second-Order Effects of Neurons in CLIP" (2024):
neuron n of layer l writes `m_{t,n}·w_n` at every token t, and that write reaches the image
embedding mostly through the attention heads of later layers l′. With each image's attention
patterns and LayerNorm σ's fixed, the path through head h of l′ is one scalar per image,
`s = (Σ_t A_{l′,h}[0,t]·m_{t,n}/σ_{l′,t}) / σ_post`, times one fixed vector per (neuron, l′, h):
w_n centred and scaled by l′'s ln_1, through the head's values and out-proj (with LayerScale and
head scale), centred and scaled by ln_post, then `proj`. Centring removes the value bias and β:
they don't depend on the neuron. The vectors are built once, so an image costs tens of MFLOP.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from clipterm import names
from clipterm.errors import ClipTermError, ExitCode
from clipterm.vit.decompose import (
    attention_qkv,
    check_supported,
    layer_scale_vector,
    readout,
    refuse_neuron_split,
    vision_tower,
)


@dataclass
class NeuronPass:
    """What one forward pass gives for the neurons of one MLP layer."""

    scalars: Tensor  # (B, M, K) per path k = (later layer, head), layer-major: the scalar s above
    activations: Tensor  # (B, M) CLS post-activation of each neuron
    image_embeds: Tensor  # (B, D) the model's own image embedding (unnormalised)
    ln_scale: Tensor  # (B,) σ of ln_post


def check_layer(n_layers: int, layer: int) -> None:
    """Refuse a layer that does not exist, and the last layer, whose neurons have no later heads."""
    if not 0 <= layer < n_layers:
        raise ClipTermError(f"no layer {names.layer(layer)}: the model has {n_layers} layers", hint=f"use L0-{names.layer(n_layers - 2)}")
    if layer == n_layers - 1:
        raise ClipTermError(
            f"{names.layer(layer)} is the last layer: its neurons have no second-order effect (no attention layer follows it)",
            hint=f"use L0-{names.layer(n_layers - 2)}; the last MLP's effect is direct, see {names.mlp(layer)}",
            code=ExitCode.USAGE,
        )


def paths(n_layers: int, n_heads: int, layer: int) -> list[str]:
    """Names of the K paths of layer `layer`'s neurons, in the order of the K axis: ["L10.H0", ...]."""
    return [names.head(later, head) for later in range(layer + 1, n_layers) for head in range(n_heads)]


def path_vectors(model, layer: int, neurons: list[int] | None = None) -> Tensor:
    """The fixed joint-space vector u of every (neuron, later head) path, (M, K, D), fp32 (M: only `neurons` if given).

    `u = ((γ₁ ⊙ C w_n) @ W_Vᵀ) @ R` with w_n the neuron's output column (LayerScale ls_2 folded),
    C the centring, γ₁ the later layer's ln_1 weight, W_V the head's value weights and R the head's
    readout from `decompose.readout` (out-proj slice, head scale, ls_1, centring, ln_post γ, proj).
    """
    visual = vision_tower(model)
    blocks = visual.transformer.resblocks
    check_layer(len(blocks), layer)
    refuse_neuron_split(visual)
    width, device = visual.transformer.width, visual.conv1.weight.device
    heads_readout = readout(model)  # (L, H, dh, D)
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        block = blocks[layer]
        writes = block.mlp.c_proj.weight.float().T * layer_scale_vector(block.ls_2, width, device)  # (M, W)
        if neurons is not None:
            writes = writes[neurons]  # (m, W)
        centred = writes - writes.mean(-1, keepdim=True)  # (M, W)
        parts = []
        for later in range(layer + 1, len(blocks)):
            attn, ln_1 = blocks[later].attn, blocks[later].ln_1
            gamma = ln_1.weight.float() if ln_1.weight is not None else torch.ones(width, device=device)  # (W,)
            heads = attn.num_heads
            w_value = attn.in_proj_weight[2 * width :].float().view(heads, width // heads, width)  # (H, dh, W)
            values = torch.einsum("mw,hdw->mhd", centred * gamma, w_value)  # (M, H, dh)
            parts.append(torch.einsum("mhd,hde->mhe", values, heads_readout[later]))  # (M, H, D)
    return torch.cat(parts, 1)  # (M, K, D)


def gram(vectors: Tensor) -> Tensor:
    """Inner products of each neuron's path vectors, (M, K, K): `|s @ u|² = s Gsᵀ` without forming effects."""
    return vectors @ vectors.transpose(1, 2)  # (M, K, K)


def trace(model, images: Tensor, layer: int) -> NeuronPass:
    """Run preprocessed images (B, 3, S, S) once and return the second-order scalars of layer `layer`.

    Only the CLS row of each later attention pattern is formed; the block loop uses the model's own
    modules, as `decompose.decompose` does.
    """
    visual = vision_tower(model)
    check_supported(model)
    refuse_neuron_split(visual)
    if visual.training:
        raise ValueError("trace() needs model.eval(): dropout would change the effects")
    blocks = visual.transformer.resblocks
    check_layer(len(blocks), layer)
    weight = visual.conv1.weight
    with torch.no_grad():
        stream = visual._embeds(images.to(device=weight.device, dtype=weight.dtype))  # (B, T, W)
        weighted_rows, acts = [], None
        for index, block in enumerate(blocks):
            attn = block.attn
            q, k, v, scale = attention_qkv(attn, block.ln_1(stream))  # (B, H, T, dh) each
            if index > layer:
                with torch.autocast(stream.device.type, enabled=False):
                    residual = stream.float()  # (B, T, W)
                    sigma = (residual.var(-1, unbiased=False) + block.ln_1.eps).sqrt()  # (B, T)
                    scores = q[:, :, :1].float() @ k.float().transpose(-1, -2) * scale  # (B, H, 1, T)
                    weighted_rows.append(scores.softmax(-1)[:, :, 0] / sigma[:, None, :])  # (B, H, T)
            heads_out = F.scaled_dot_product_attention(q, k, v, scale=scale)  # (B, H, T, dh)
            if getattr(attn, "head_scale", None) is not None:
                heads_out = heads_out * attn.head_scale  # (B, H, T, dh)
            stream = stream + block.ls_1(attn.out_proj(heads_out.transpose(1, 2).reshape(stream.shape)))  # (B, T, W)
            hidden = block.ln_2(stream)  # (B, T, W)
            for name, part in block.mlp.named_children():
                hidden = part(hidden)  # (B, T, M) inside, (B, T, W) after c_proj
                if name == "gelu" and index == layer:  # open_clip's name for the activation, QuickGELU too
                    acts = hidden.float()  # (B, T, M)
            stream = stream + block.ls_2(hidden)  # (B, T, W)
        image_embeds = visual.ln_post(stream[:, 0])  # (B, W)
        if visual.proj is not None:
            image_embeds = image_embeds @ visual.proj  # (B, D)
        with torch.autocast(stream.device.type, enabled=False):
            final = stream[:, 0].float()  # (B, W)
            sigma_post = (final.var(-1, unbiased=False) + visual.ln_post.eps).sqrt()  # (B,)
            rows = torch.cat(weighted_rows, 1)  # (B, K, T): A[0, t] / σ_t for every later head
            scalars = torch.einsum("bkt,btm->bmk", rows, acts) / sigma_post[:, None, None]  # (B, M, K)
    return NeuronPass(scalars, acts[:, 0], image_embeds.float(), sigma_post)


def effects(scalars: Tensor, vectors: Tensor) -> Tensor:
    """Joint-space second-order effects (B, M, D) from scalars (B, M, K) and path vectors (M, K, D)."""
    return torch.einsum("bmk,mkd->bmd", scalars, vectors.to(scalars))  # (B, M, D)


def path_effects(scalars: Tensor, vectors: Tensor) -> Tensor:
    """The effect split by path, (B, M, K, D): what each later head carries."""
    return scalars[..., None] * vectors.to(scalars)  # (B, M, K, D)


def effect_norms(scalars: Tensor, grams: Tensor) -> Tensor:
    """|second-order effect| per image and neuron, (B, M), from the Gram matrices (M, K, K)."""
    squared = torch.einsum("bmk,mkj,bmj->bm", scalars, grams.to(scalars), scalars)  # (B, M)
    return squared.clamp_min(0).sqrt()  # (B, M)


@dataclass
class TopK:
    """The k images with the largest norm per neuron (the centred effect norm, in a build), kept while images stream past."""

    norms: Tensor  # (M, k) descending
    rows: Tensor  # (M, k) the images' rows
    scalars: Tensor  # (M, k, K) their scalars, enough to rebuild their effects

    @classmethod
    def empty(cls, n_neurons: int, n_paths: int, device=None) -> TopK:
        """No images yet: k = 0 columns."""
        rows = torch.zeros(n_neurons, 0, dtype=torch.long, device=device)  # (M, 0)
        return cls(torch.zeros(n_neurons, 0, device=device), rows, torch.zeros(n_neurons, 0, n_paths, device=device))

    def add(self, norms: Tensor, rows: Tensor, scalars: Tensor, k: int) -> TopK:
        """Merge a batch: norms (B, M), rows (B,), scalars (B, M, K)."""
        all_norms = torch.cat([self.norms, norms.T.to(self.norms)], 1)  # (M, k + B)
        all_rows = torch.cat([self.rows, rows.to(self.rows).expand(norms.shape[1], -1)], 1)  # (M, k + B)
        all_scalars = torch.cat([self.scalars, scalars.transpose(0, 1).to(self.scalars)], 1)  # (M, k + B, K)
        best, order = all_norms.topk(min(k, all_norms.shape[1]), dim=1)  # (M, k)
        picked = all_scalars.gather(1, order[..., None].expand(-1, -1, all_scalars.shape[2]))  # (M, k, K)
        return TopK(best, all_rows.gather(1, order), picked)


def mean_effects(mean_scalars: Tensor, vectors: Tensor) -> Tensor:
    """The mean second-order effect of each neuron, (M, D), from its mean scalars (M, K)."""
    return torch.einsum("mk,mkd->md", mean_scalars.to(vectors), vectors)  # (M, D)


def effect_sums(scalars: Tensor, vectors: Tensor) -> Tensor:
    """Σ over neurons of each image's second-order effects, (B, D), without forming the (B, M, D) effects."""
    return torch.einsum("bmk,mkd->bd", scalars, vectors.to(scalars))  # (B, D)


def top_effect_sums(top_scalars: Tensor, top_rows: Tensor, mean_scalars: Tensor, vectors: Tensor, n_rows: int,
                    chunk: int = 256) -> Tensor:
    """Σ over the neurons whose top k an image is in of (effect − mean effect), per image: (n_rows, D).

    These are the "significant" effects of the reference's ablation: an image's effect on a neuron
    counts when its centred norm is among the neuron's k largest. Neurons go in chunks, so only
    (chunk, k, D) centred effects exist at a time; the sums gather on the CPU, like the other per-image data.
    """
    total = torch.zeros(n_rows, vectors.shape[-1])  # (N, D)
    for start in range(0, top_scalars.shape[0], chunk):
        part = slice(start, start + chunk)
        centred = (top_scalars[part] - mean_scalars[part, None]).to(vectors)  # (c, k, K)
        centred_effects = centred @ vectors[part]  # (c, k, D)
        total.index_add_(0, top_rows[part].reshape(-1).cpu(), centred_effects.reshape(-1, vectors.shape[-1]).float().cpu())
    return total  # (N, D)


def principal_directions(top_scalars: Tensor, mean_scalars: Tensor, vectors: Tensor) -> tuple[Tensor, Tensor]:
    """First principal direction of each neuron's top-k effects, centred by its mean effect, as in the reference.

    Returns the unit directions (M, D), signed so that most top-k effects project positively, and the
    share of the centred top-k effects' energy along them (M,). The effects `S Uᵀ` are never formed:
    with `Uᵀ = Q R` (QR), the right singular vectors of `S Rᵀ` (k × K) carried by Q are those of the effects.
    """
    centred = (top_scalars - mean_scalars[:, None]).to(vectors)  # (M, k, K)
    basis, triangle = torch.linalg.qr(vectors.transpose(1, 2))  # (M, D, r), (M, r, K) with r = min(D, K)
    small = centred @ triangle.transpose(1, 2)  # (M, k, r): the effects in the orthonormal basis
    _, singular, right = torch.linalg.svd(small, full_matrices=False)  # (M, q), (M, q, r)
    first = right[:, 0]  # (M, r)
    projections = small @ first[..., None]  # (M, k, 1)
    positive = (projections[..., 0] > 0).sum(1)  # (M,)
    sign = torch.where(positive > small.shape[1] // 2, 1.0, -1.0).to(first)  # (M,)
    pc = (basis @ first[..., None])[..., 0] * sign[:, None]  # (M, D)
    energy = (singular**2).sum(1)  # (M,)
    share = torch.where(energy > 0, singular[:, 0] ** 2 / energy.clamp_min(1e-30), torch.zeros_like(energy))  # (M,)
    return pc, share


__all__ = [
    "NeuronPass",
    "TopK",
    "check_layer",
    "effect_norms",
    "effect_sums",
    "effects",
    "gram",
    "mean_effects",
    "path_effects",
    "path_vectors",
    "paths",
    "principal_directions",
    "top_effect_sums",
    "trace",
]
