"""Second-order effects of MLP neurons on the image embedding, and their principal directions.

Gandelsman, Efros & Steinhardt, "Interpreting the Second-Order Effects of Neurons in CLIP" (2024):
neuron n of layer l writes `m_{t,n}·w_n` at every token t, and that write reaches the image
embedding mostly through the attention heads of later layers l′. With each image's attention
patterns and LayerNorm σ's fixed, the path through head h of l′ is one scalar per image,
`s = (Σ_t A_{l′,h}[0,t]·m_{t,n}/σ_{l′,t}) / σ_post`, times one fixed vector per (neuron, l′, h):
w_n centred and scaled by l′'s ln_1, through the head's values and out-proj (with LayerScale and
head scale), centred and scaled by ln_post, then `proj`. Centring removes the value bias and β:
they don't depend on the neuron. The vectors are built once, so an image costs tens of MFLOP.

`convention="reference"` gives the numbers of the reference code (second_order_lens,
`prs_second_order_neurons_hook.py`) instead: no write is centred by its own mean; at ln_1 of l′ each
of the M neurons' writes subtracts a 1/((2l′+1)M) share of the token's stream mean and adds that
share of β₁ (and of the value bias, c_proj's bias split evenly over the M neurons); at ln_post a
1/((2l′+1)(2L+1)HM) share of the stream mean, β and the out-proj bias; and each image's effects
are scaled by 100/‖embedding‖. The neuron's path is the same scalar times an uncentred vector; the
shares make a per-image term `constant`, the same for every neuron of the layer. docs/conventions.md.
"""

from __future__ import annotations

from collections.abc import Callable
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
    constant: Tensor | None = None  # (B, K, D) reference convention: each path's neuron-independent term (else None)


CONVENTIONS = ("clipterm", "reference")
REFERENCE_COEFFICIENT = 100.0  # the reference scales each image's effects by this / ‖embedding‖


def check_convention(convention: str) -> None:
    if convention not in CONVENTIONS:
        raise ClipTermError(f"no convention {convention!r}", hint="use clipterm (the default) or reference; see docs/conventions.md",
                            code=ExitCode.USAGE)


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


def path_vectors(model, layer: int, convention: str = "clipterm", neurons: list[int] | None = None) -> Tensor:
    """The fixed joint-space vector u of every (neuron, later head) path, (M, K, D), fp32 (M: only `neurons` if given).

    `u = ((γ₁ ⊙ C w_n) @ W_Vᵀ) @ R` with w_n the neuron's output column (LayerScale ls_2 folded),
    C the centring, γ₁ the later layer's ln_1 weight, W_V the head's value weights and R the head's
    readout from `decompose.readout` (out-proj slice, head scale, ls_1, centring, ln_post γ, proj).
    The reference convention leaves out both centrings C.
    """
    check_convention(convention)
    visual = vision_tower(model)
    blocks = visual.transformer.resblocks
    check_layer(len(blocks), layer)
    refuse_neuron_split(visual)
    width, device = visual.transformer.width, visual.conv1.weight.device
    own = convention == "clipterm"
    heads_readout = readout(model, centred=own)  # (L, H, dh, D)
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        block = blocks[layer]
        writes = block.mlp.c_proj.weight.float().T * layer_scale_vector(block.ls_2, width, device)  # (M, W)
        if neurons is not None:
            writes = writes[neurons]  # (m, W)
        centred = writes - writes.mean(-1, keepdim=True) if own else writes  # (M, W)
        parts = []
        for later in range(layer + 1, len(blocks)):
            attn, ln_1 = blocks[later].attn, blocks[later].ln_1
            gamma = ln_1.weight.float() if ln_1.weight is not None else torch.ones(width, device=device)  # (W,)
            heads = attn.num_heads
            w_value = attn.in_proj_weight[2 * width :].float().view(heads, width // heads, width)  # (H, dh, W)
            values = torch.einsum("mw,hdw->mhd", centred * gamma, w_value)  # (M, H, dh)
            parts.append(torch.einsum("mhd,hde->mhe", values, heads_readout[later]))  # (M, H, D)
    return torch.cat(parts, 1)  # (M, K, D)


def reference_terms(model, layer: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The fixed vectors (K, D) each of the reference's neuron-independent terms, per path k = (l′, h).

    Per image, path k's term is `(ρ_k·c_bias + ν_k·c_mean + c_fixed + μ_post·c_post_mean) / σ_post + c_post_beta`
    with ρ_k = Σ_t A[0,t]/σ₁,t and ν_k = Σ_t A[0,t]·μ₁,t/σ₁,t (μ, σ: the LayerNorm's mean and σ of the stream):
    c_bias carries c_proj's bias share b/M through l′'s ln_1 γ and the head; c_mean the −1/n₁ share of
    the token's mean, n₁ = (2l′+1)M; c_fixed the β₁ and value-bias shares (1/n₁) and the out-proj bias
    share 1/(n₁H) after ln_post's γ; c_post_mean and c_post_beta the −1/n₂ share of the final mean and
    the 1/n₂ share of β, n₂ = n₁(2L+1)H. All through the uncentred readout (W_O^h, head scale, ls_1, γ, proj).
    """
    from clipterm.vit.decompose import ln_post_affine

    visual = vision_tower(model)
    blocks = visual.transformer.resblocks
    check_layer(len(blocks), layer)
    width, device = visual.transformer.width, visual.conv1.weight.device
    n_layers = len(blocks)
    heads_readout = readout(model, centred=False)  # (L, H, dh, D)
    gamma_post, beta_post, proj = ln_post_affine(visual)  # (W,), (W,), (W, D)
    zeros = torch.zeros(width, device=device)  # (W,)
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        c_proj = blocks[layer].mlp.c_proj
        n_neurons = c_proj.weight.shape[1]
        mlp_bias = (c_proj.bias.float() if c_proj.bias is not None else zeros) * layer_scale_vector(blocks[layer].ls_2, width, device)
        parts: list[list[Tensor]] = [[], [], [], [], []]
        for later in range(layer + 1, n_layers):
            attn, ln_1 = blocks[later].attn, blocks[later].ln_1
            gamma = ln_1.weight.float() if ln_1.weight is not None else torch.ones(width, device=device)  # (W,)
            beta = ln_1.bias.float() if ln_1.bias is not None else zeros  # (W,)
            heads = attn.num_heads
            w_value = attn.in_proj_weight[2 * width :].float().view(heads, width // heads, width)  # (H, dh, W)
            b_value = attn.in_proj_bias[2 * width :].float() if attn.in_proj_bias is not None else zeros  # (W,)
            out_bias = attn.out_proj.bias.float() if attn.out_proj.bias is not None else zeros  # (W,)
            n1 = (1 + 2 * later) * n_neurons
            n2 = n1 * (1 + 2 * n_layers) * heads
            readout_here = heads_readout[later]  # (H, dh, D)

            def through(vector: Tensor, readout_here: Tensor = readout_here) -> Tensor:
                return torch.einsum("hd,hde->he", vector, readout_here)  # (H, dh) -> (H, D)

            def values(vector: Tensor, w_value: Tensor = w_value) -> Tensor:
                return torch.einsum("w,hdw->hd", vector, w_value)  # (W,) -> (H, dh)

            post_bias = (out_bias * layer_scale_vector(blocks[later].ls_1, width, device) * gamma_post) @ proj / (n1 * heads)  # (D,)
            parts[0].append(through(values(gamma * mlp_bias / n_neurons)))  # (H, D)
            parts[1].append(through(values(-gamma / n1)))  # (H, D)
            parts[2].append(through((values(beta) + b_value.view(heads, -1)) / n1) + post_bias)  # (H, D)
            parts[3].append((-(gamma_post @ proj) / n2).expand(heads, -1))  # (H, D)
            parts[4].append((beta_post @ proj / n2).expand(heads, -1))  # (H, D)
    c_bias, c_mean, c_fixed, c_post_mean, c_post_beta = (torch.cat(part) for part in parts)  # (K, D) each
    return c_bias, c_mean, c_fixed, c_post_mean, c_post_beta


def gram(vectors: Tensor) -> Tensor:
    """Inner products of each neuron's path vectors, (M, K, K): `|s @ u|² = s Gsᵀ` without forming effects."""
    return vectors @ vectors.transpose(1, 2)  # (M, K, K)


def trace(model, images: Tensor, layer: int, convention: str = "clipterm") -> NeuronPass:
    """Run preprocessed images (B, 3, S, S) once and return the second-order scalars of layer `layer`.

    Only the CLS row of each later attention pattern is formed; the block loop uses the model's own
    modules, as `decompose.decompose` does. The reference convention also returns each path's
    neuron-independent `constant`, and scales scalars and constant by 100/‖embedding‖.
    """
    check_convention(convention)
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
        weighted_rows, mean_rows, acts = [], [], None
        for index, block in enumerate(blocks):
            attn = block.attn
            q, k, v, scale = attention_qkv(attn, block.ln_1(stream))  # (B, H, T, dh) each
            if index > layer:
                with torch.autocast(stream.device.type, enabled=False):
                    residual = stream.float()  # (B, T, W)
                    sigma = (residual.var(-1, unbiased=False) + block.ln_1.eps).sqrt()  # (B, T)
                    scores = q[:, :, :1].float() @ k.float().transpose(-1, -2) * scale  # (B, H, 1, T)
                    weighted_rows.append(scores.softmax(-1)[:, :, 0] / sigma[:, None, :])  # (B, H, T)
                    if convention == "reference":
                        mean_rows.append(weighted_rows[-1] @ residual.mean(-1)[..., None])  # (B, H, 1): Σ_t A[0,t]·μ_t/σ_t
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
            constant = None
            if convention == "reference":
                c_bias, c_mean, c_fixed, c_post_mean, c_post_beta = reference_terms(model, layer)  # (K, D) each
                rho, nu = rows.sum(-1)[..., None], torch.cat(mean_rows, 1)  # (B, K, 1) each
                mean_post = final.mean(-1)[:, None, None]  # (B, 1, 1)
                constant = (rho * c_bias + nu * c_mean + c_fixed + mean_post * c_post_mean) / sigma_post[:, None, None] + c_post_beta
                coefficient = REFERENCE_COEFFICIENT / image_embeds.float().norm(dim=-1)[:, None, None]  # (B, 1, 1)
                scalars, constant = scalars * coefficient, constant * coefficient  # (B, M, K), (B, K, D)
    return NeuronPass(scalars, acts[:, 0], image_embeds.float(), sigma_post, constant)


def effects(scalars: Tensor, vectors: Tensor, constant: Tensor | None = None) -> Tensor:
    """Joint-space second-order effects (B, M, D) from scalars (B, M, K) and path vectors (M, K, D),
    plus the reference convention's neuron-independent term (B, K, D) when given."""
    out = torch.einsum("bmk,mkd->bmd", scalars, vectors.to(scalars))  # (B, M, D)
    return out if constant is None else out + constant.sum(1)[:, None]  # (B, M, D)


def path_effects(scalars: Tensor, vectors: Tensor, constant: Tensor | None = None) -> Tensor:
    """The effect split by path, (B, M, K, D): what each later head carries."""
    out = scalars[..., None] * vectors.to(scalars)  # (B, M, K, D)
    return out if constant is None else out + constant[:, None]  # (B, M, K, D)


def effect_norms(scalars: Tensor, grams: Tensor, vectors: Tensor | None = None, offsets: Tensor | None = None) -> Tensor:
    """|second-order effect| per image and neuron, (B, M), from the Gram matrices (M, K, K).

    `offsets` (B, D), with the path `vectors`: a term every neuron's effect shares (the reference
    convention's constant summed over paths), added as |su + c|² = sGsᵀ + 2s·(uc) + |c|².
    """
    squared = torch.einsum("bmk,mkj,bmj->bm", scalars, grams.to(scalars), scalars)  # (B, M)
    if offsets is not None:
        cross = torch.einsum("mkd,bd->bmk", vectors.to(scalars), offsets.to(scalars))  # (B, M, K)
        squared = squared + 2 * (scalars * cross).sum(-1) + (offsets.to(scalars) ** 2).sum(-1, keepdim=True)  # (B, M)
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
                    chunk: int = 256, top_offsets: Callable[[slice], Tensor] | None = None) -> Tensor:
    """Σ over the neurons whose top k an image is in of (effect − mean effect), per image: (n_rows, D).

    These are the "significant" effects of the reference's ablation: an image's effect on a neuron
    counts when its centred norm is among the neuron's k largest. Neurons go in chunks, so only
    (chunk, k, D) centred effects exist at a time; the sums gather on the CPU, like the other per-image data.
    `top_offsets(neurons)` (c, k, D): the reference convention's shared term of those images, centred.
    """
    total = torch.zeros(n_rows, vectors.shape[-1])  # (N, D)
    for start in range(0, top_scalars.shape[0], chunk):
        part = slice(start, start + chunk)
        centred = (top_scalars[part] - mean_scalars[part, None]).to(vectors)  # (c, k, K)
        centred_effects = centred @ vectors[part]  # (c, k, D)
        if top_offsets is not None:
            centred_effects = centred_effects + top_offsets(part).to(centred_effects)  # (c, k, D)
        total.index_add_(0, top_rows[part].reshape(-1).cpu(), centred_effects.reshape(-1, vectors.shape[-1]).float().cpu())
    return total  # (N, D)


def principal_directions(top_scalars: Tensor, mean_scalars: Tensor, vectors: Tensor,
                         top_offsets: Callable[[slice], Tensor] | None = None, chunk: int = 256) -> tuple[Tensor, Tensor]:
    """First principal direction of each neuron's top-k effects, centred by its mean effect, as in the reference.

    Returns the unit directions (M, D), signed so that most top-k effects project positively, and the
    share of the centred top-k effects' energy along them (M,). The effects `S Uᵀ` are never formed:
    with `Uᵀ = Q R` (QR), the right singular vectors of `S Rᵀ` (k × K) carried by Q are those of the effects.
    With `top_offsets` (the reference convention's shared term, which has no fixed basis) the centred
    effects are formed, `chunk` neurons at a time, and their SVD taken directly.
    """
    if top_offsets is not None:
        pcs, shares = [], []
        for start in range(0, top_scalars.shape[0], chunk):
            part = slice(start, start + chunk)
            centred = (top_scalars[part] - mean_scalars[part, None]).to(vectors) @ vectors[part]  # (c, k, D)
            centred = centred + top_offsets(part).to(centred)  # (c, k, D)
            _, singular, right = torch.linalg.svd(centred, full_matrices=False)  # (c, q), (c, q, D)
            pcs.append(right[:, 0])  # (c, D)
            shares.append(_share(singular))  # (c,)
            pcs[-1] = pcs[-1] * _majority_sign(centred @ pcs[-1][..., None])[:, None]  # (c, D)
        return torch.cat(pcs), torch.cat(shares)
    centred = (top_scalars - mean_scalars[:, None]).to(vectors)  # (M, k, K)
    basis, triangle = torch.linalg.qr(vectors.transpose(1, 2))  # (M, D, r), (M, r, K) with r = min(D, K)
    small = centred @ triangle.transpose(1, 2)  # (M, k, r): the effects in the orthonormal basis
    _, singular, right = torch.linalg.svd(small, full_matrices=False)  # (M, q), (M, q, r)
    first = right[:, 0]  # (M, r)
    projections = small @ first[..., None]  # (M, k, 1)
    pc = (basis @ first[..., None])[..., 0] * _majority_sign(projections)[:, None]  # (M, D)
    return pc, _share(singular)


def _majority_sign(projections: Tensor) -> Tensor:
    """+1 where most of the k projections (M, k, 1) are positive, else -1: (M,). A tie (k even) goes by their sum."""
    positive = 2 * (projections[..., 0] > 0).sum(1) - projections.shape[1]  # (M,) positives minus the rest
    tie = torch.where(projections[..., 0].sum(1) >= 0, 1, -1)  # (M,)
    return torch.where(positive != 0, positive.sign(), tie).to(projections)  # (M,)


def _share(singular: Tensor) -> Tensor:
    """Share of the energy along the first singular direction, (M,), from singular values (M, q)."""
    energy = (singular**2).sum(1)  # (M,)
    return torch.where(energy > 0, singular[:, 0] ** 2 / energy.clamp_min(1e-30), torch.zeros_like(energy))  # (M,)


__all__ = [
    "CONVENTIONS",
    "REFERENCE_COEFFICIENT",
    "NeuronPass",
    "TopK",
    "check_convention",
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
    "reference_terms",
    "top_effect_sums",
    "trace",
]
