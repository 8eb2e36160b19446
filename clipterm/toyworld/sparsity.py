"""Sparse direct effects: a training penalty that makes a few of the toy ViT's heads carry each attribute.

Trained plainly, the toy writes colour and position into its class token through many heads of every layer,
so that mean-ablating any one head, or even a whole layer, costs no accuracy: nothing is wrong, but no head
can be named by what it does. The penalty is, per task, the participation ratio of the direct effects
(vit/decompose.py) within the span of that task's class embeddings: how many components (heads and MLPs)
share that task's image-dependent part. A plain group lasso (a sum of the components' norms) would not do:
ten heads writing the same direction cost no more than one. Nor does one ratio over the whole embedding: it
lets one head carry most of it while small copies elsewhere still decide colour and position. Since every
write into the class token is some component's direct effect, a task becomes cheapest to write once, by the
head that reads it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from clipterm.vit.decompose import attention_qkv, ln_post_affine, to_joint


def direct_effects(visual, images: Tensor) -> tuple[Tensor, Tensor]:
    """A differentiable forward of a class-token open_clip ViT tower (no LayerScale, no head scale: the toy's)
    that also returns each component's direct effect: (image embeddings (B, D), components (B, L*H + L, D)),
    heads of layer 0 first, then the MLPs in layer order. Their sum, plus the embedding and biases, is the embedding."""
    stream = visual._embeds(images)  # (B, N, W)
    heads_cls, mlps_cls = [], []
    for block in visual.transformer.resblocks:
        attn = block.attn
        q, k, v, scale = attention_qkv(attn, block.ln_1(stream))  # (B, H, N, dh) each
        heads_out = F.scaled_dot_product_attention(q, k, v, scale=scale)  # (B, H, N, dh)
        w_out = attn.out_proj.weight.T.reshape(attn.num_heads, -1, stream.shape[-1])  # (H, dh, W)
        heads_cls.append(torch.einsum("bhd,hdw->bhw", heads_out[:, :, 0], w_out))  # (B, H, W)
        stream = stream + attn.out_proj(heads_out.transpose(1, 2).reshape(stream.shape))  # (B, N, W)
        mlp_out = block.mlp(block.ln_2(stream))  # (B, N, W)
        mlps_cls.append(mlp_out[:, :1])  # (B, 1, W)
        stream = stream + mlp_out  # (B, N, W)
    residual = stream[:, 0]  # (B, W)
    embeds = visual.ln_post(residual) @ visual.proj  # (B, D)
    sigma = (residual.var(-1, unbiased=False) + visual.ln_post.eps).sqrt()  # (B,)
    gamma, _, proj = ln_post_affine(visual)
    components = to_joint(torch.cat([*heads_cls, *mlps_cls], 1), sigma, gamma, proj)  # (B, C, D)
    return embeds, components


def sparsity_loss(components: Tensor, classes: dict[str, Tensor] | None = None) -> Tensor:
    """The effective number of components that carry the signal, (Σ_c n_c)² / Σ_c n_c², for components (B, C, D),
    with n_c = mean_b ‖c_b − mean(c)‖ (centred over the batch, as mean-ablation is over the data: a constant
    effect costs nothing). It is 1 when one component carries everything and C when C share it evenly,
    whether their effects point the same way or not, so that it also counts copies of one signal.

    With `classes` {task: (K, D) class embeddings}, it is the mean over tasks of that count within the span of each
    task's centred class embeddings (fixed: no gradient to the text tower), so that each attribute, however small
    its share of the embedding, is carried by few components."""
    if classes is None:
        return participation((components - components.mean(0)).norm(dim=-1).mean(0))
    counts = []
    for embeddings in classes.values():
        centred = (embeddings - embeddings.mean(0)).detach().float()  # (K, D)
        basis = torch.linalg.svd(centred, full_matrices=False).Vh[: len(centred) - 1]  # (K-1, D)
        within = (components - components.mean(0)) @ basis.T  # (B, C, K-1)
        counts.append(participation(within.norm(dim=-1).mean(0)))
    return torch.stack(counts).mean()


def participation(norms: Tensor) -> Tensor:
    """(Σ n)² / Σ n² of non-negative norms (C,): how many of them share the total."""
    return norms.sum() ** 2 / norms.pow(2).sum().clamp_min(1e-12)
