"""The exact decomposition of open_clip's timm ConvNeXt towers (`convnext_base` ... `convnext_xxlarge_320`).

A ConvNeXt stage is a residual stream over the grid: each `ConvNeXtBlock` adds `γ ⊙ mlp(norm(dwconv(x)))` to its
input. The tower then averages the last stage's output over the grid, applies one LayerNorm to that pooled vector
(`head.norm`, linear once its σ is fixed for the image) and projects it (`head.fc`, then open_clip's `proj`). So
with z the input of the last stage's first block (after its downsampling) and d_k what block k adds,

    image_embeds = P(γ ⊙ C mean(z) / σ) + Σ_k P(γ ⊙ C mean(d_k) / σ) + (P β + biases)
                 = embed                + Σ_k S{s}.B{k}               + bias

with σ the real forward's. Everything before the last stage (the stem and the earlier stages, nonlinear as they
are) is the one input component `embed`; the last stage's blocks are the components `S3.B0`, `S3.B1`, ...
(stages count from 0, as timm's `stages.3.blocks.0`). Forward hooks read z and each block's input and output from
the real modules. Blocks are stored like a ViT's MLPs (one joint-space vector each) and there are no heads.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from clipterm.errors import ClipTermError, ExitCode
from clipterm.vit import pooling
from clipterm.vit.decompose import Decomposition, vision_tower
from clipterm.vit.pooling import Norm, Post

CONVENTION = (
    "timm ConvNeXt: the last stage's input (embed) and each of its blocks (S{s}.B{k}) averaged over the grid, the "
    "pooled LayerNorm linearised per image, then the projection; its β and the projection biases in `bias`"
)


def is_convnext(model) -> bool:
    trunk = getattr(vision_tower(model), "trunk", None)
    if trunk is None:
        return False
    from timm.models.convnext import ConvNeXt

    return isinstance(trunk, ConvNeXt)


def unsupported_reason(model) -> str | None:
    from timm.models.convnext import ConvNeXtBlock

    visual = vision_tower(model)
    trunk = visual.trunk
    stage = trunk.stages[-1]
    for index, block in enumerate(stage.blocks):
        if not isinstance(block, ConvNeXtBlock):
            return f"block {index} of the last stage is {type(block).__name__}, not a ConvNeXtBlock"
        if not isinstance(block.shortcut, nn.Identity):
            return f"block {index} of the last stage has a projection shortcut"
    if not isinstance(trunk.norm_pre, nn.Identity):
        return "a norm runs on the grid before pooling (head_norm_first)"
    head = trunk.head
    if getattr(head.global_pool, "pool_type", "avg") != "avg":
        return f"global pool {head.global_pool.pool_type!r} (only the average is linear)"
    if not isinstance(head.pre_logits, nn.Identity):
        return "the classifier head has a hidden MLP (head_hidden_size)"
    return pooling.projection_reason(visual)


def check_supported(model, name: str = "model") -> None:
    pooling.check_tower(model, name, is_convnext, "a timm ConvNeXt tower", unsupported_reason)


def stage_index(model) -> int:
    """The last stage's number (3 for every open_clip ConvNeXt)."""
    return len(vision_tower(model).trunk.stages) - 1


def _post(visual) -> Post:
    trunk = visual.trunk
    width, device = trunk.num_features, next(trunk.parameters()).device
    steps = pooling.post_steps([("head.norm", trunk.head.norm), ("head.fc", trunk.head.fc), ("proj", visual.head)],
                               width, device)
    return Post(steps, width, device)


def readout(model) -> Tensor:
    """(L, 0, 0, D): a ConvNeXt has no heads (its blocks are stored as `mlps`)."""
    visual = vision_tower(model)
    with torch.no_grad():
        dim = _post(visual).matrix.shape[1]
    return torch.zeros(len(visual.trunk.stages[-1].blocks), 0, 0, dim)


@contextmanager
def _recording(visual) -> Iterator[dict[str, Any]]:
    trunk = visual.trunk
    blocks = list(trunk.stages[-1].blocks)
    seen: dict[str, Any] = {"deltas": {}}
    hooks = [blocks[0].register_forward_pre_hook(lambda _m, args: seen.__setitem__("embed", args[0])),
             trunk.head.norm.register_forward_pre_hook(lambda _m, args: seen.__setitem__("pooled", args[0]))]
    for index, block in enumerate(blocks):
        def delta(_m, args, out, index=index) -> None:
            seen["deltas"][index] = out - args[0]  # what block `index` added (its shortcut is the identity)

        hooks.append(block.register_forward_hook(delta))
    try:
        yield seen
    finally:
        for hook in hooks:
            hook.remove()


def check_stored(model, neurons: bool, token_layers=()) -> None:
    """Refuse what a ConvNeXt cache cannot store (a build checks this before it writes anything)."""
    if neurons or token_layers:
        raise ClipTermError(f"--{'neurons' if neurons else 'tokens'} is not stored for ConvNeXt towers",
                            hint="build without it; the last stage's blocks decompose exactly", code=ExitCode.UNSUPPORTED)


def decompose(model, images: Tensor, neurons: bool = False, token_layers=()) -> Decomposition:
    """Split the embeddings of a batch (B, 3, S, S): the real tower runs once under hooks."""
    visual = vision_tower(model)
    check_supported(model)
    if visual.training:
        raise ValueError("decompose() needs model.eval(): BatchNorm, dropout and drop path would change the split")
    check_stored(model, neurons, token_layers)
    weight = next(visual.trunk.parameters())
    with torch.no_grad(), _recording(visual) as seen:
        image_embeds = visual(images.to(device=weight.device, dtype=weight.dtype))  # (B, D)
    with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
        post = _post(visual)
        norm = Norm.of(visual.trunk.head.norm, post.width, weight.device, "head.norm")
        batch = image_embeds.shape[0]
        sigmas = [norm.sigma(seen["pooled"].float().flatten(1))] if norm is not None else []  # (B,)
        scale = post.scale(sigmas, batch, weight.device)  # (B,)
        matrix = post.matrix  # (C, D)

        def joint(grid: Tensor) -> Tensor:  # (B, *, C, h, w) -> (B, *, D): mean over the grid, then the post steps
            return grid.float().mean((-2, -1)) @ matrix / scale.view(-1, *[1] * (grid.dim() - 3))

        blocks = torch.stack([seen["deltas"][k] for k in range(len(seen["deltas"]))], 1)  # (B, L, C, h, w)
        parts = pooling.Split(
            head_out=image_embeds.new_zeros(batch, blocks.shape[1], 0, 0).float(),  # (B, L, 0, 0)
            embed=joint(seen["embed"]), bias=post.offset(sigmas, batch, weight.device), mlps=joint(blocks),
            ln_scale=scale, image_embeds=image_embeds.float())
    pooling.check_sum(parts, None, "ConvNeXt",
                      fp32=weight.dtype == torch.float32 and not torch.is_autocast_enabled(weight.device.type))
    return Decomposition(head_out=parts.head_out, embed=parts.embed, bias=parts.bias, mlps=parts.mlps,
                         ln_scale=parts.ln_scale, image_embeds=parts.image_embeds)


# --------------------------------------------------------------------------- channels as neurons (the neurons file)
# A ConvNeXt's units are the channels of its last stage's output, `L{s}.N{c}` (s: the last stage, as a ResNet's
# `L3.N{c}`). The grid mean p_c of channel c reaches the embedding only through the pooled norm (linear once σ is
# fixed) and the projection, so its effect is direct and exact: p_c / scale · P[c], with P = γ ⊙ C then the head,
# (C, D). The neurons file (cache/neurons.py) wants effect_c = Σ_k scalars[c, k] · vectors[c, k]: one path, the pool.


def check_layer(n_layers: int, layer: int, stage: int | None = None) -> None:
    """Only the last stage's channels reach the pool (`n_layers`, the stored blocks, is unused)."""
    if stage is None:
        raise ClipTermError("this ConvNeXt cache was built before its channels were units",
                            hint="rebuild it (clipterm cache build ... --force) to browse its channels",
                            code=ExitCode.INVALID_DATA)
    if layer != stage:
        from clipterm import names

        raise ClipTermError(f"{names.layer(layer)} is not this ConvNeXt's last stage: only its channels reach the pool",
                            hint=f"use {names.layer(stage)}", code=ExitCode.USAGE)


def paths(n_layers: int, n_heads: int, layer: int) -> list[str]:
    """The one path of a channel: the pool (the grid mean, the pooled norm and the projection)."""
    from clipterm import names

    return [names.pool()]


def check_convention(convention: str) -> None:
    if convention != "clipterm":
        raise ClipTermError(f"--convention {convention} is for ViT neurons (second_order_lens); a ConvNeXt's channels "
                            "reach the embedding directly through the pool", hint="drop --convention", code=ExitCode.USAGE)


def path_vectors(model, layer: int, convention: str = "clipterm") -> Tensor:
    """(C, 1, D) fp32: P[c], the pooled norm's γ ⊙ C and the head, per channel."""
    check_layer(0, layer, stage_index(model))
    check_convention(convention)
    with torch.no_grad():
        return _post(vision_tower(model)).matrix.float()[:, None, :]  # (C, 1, D)


def _recorded_pass(model, images: Tensor) -> tuple[dict[str, Any], Tensor, Post, Tensor]:
    """One recorded forward: what the hooks saw, the embeddings (B, D), the post steps and each image's scale (B,)."""
    visual = vision_tower(model)
    weight = next(visual.trunk.parameters())
    with torch.no_grad(), _recording(visual) as seen:
        image_embeds = visual(images.to(device=weight.device, dtype=weight.dtype))  # (B, D)
    with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
        post = _post(visual)
        pooled = seen["pooled"].float().flatten(1)  # (B, C)
        norm = Norm.of(visual.trunk.head.norm, post.width, weight.device, "head.norm")
        sigmas = [norm.sigma(pooled)] if norm is not None else []  # (B,)
        scale = post.scale(sigmas, pooled.shape[0], weight.device)  # (B,)
    return seen, image_embeds.float(), post, scale


def trace(model, images: Tensor, layer: int, convention: str = "clipterm"):
    """One pass: scalars (B, C, 1) = p_c / scale, activations (B, C) = p_c, each channel's mean over the grid."""
    from clipterm.vit.second_order import NeuronPass

    check_layer(0, layer, stage_index(model))
    check_convention(convention)
    seen, image_embeds, _, scale = _recorded_pass(model, images)
    pooled = seen["pooled"].float().flatten(1)  # (B, C)
    return NeuronPass(scalars=(pooled / scale[:, None])[..., None], activations=pooled,  # (B, C, 1), (B, C)
                      image_embeds=image_embeds, ln_scale=scale)


def channel_grid(model, images: Tensor) -> Tensor:
    """The last stage's output (B, C, h, w): what the pool averages, from the model's own forward."""
    visual = vision_tower(model)
    weight = next(visual.trunk.parameters())
    blocks = visual.trunk.stages[-1].blocks
    seen: dict[str, Tensor] = {}
    hook = blocks[-1].register_forward_hook(lambda _m, _args, out: seen.__setitem__("grid", out))
    try:
        with torch.no_grad():
            visual(images.to(device=weight.device, dtype=weight.dtype))
    finally:
        hook.remove()
    return seen["grid"]  # (B, C, h, w)


def block_positions(model, images: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """Block `block`'s direct effect split over the grid's positions, (B, h·w, D), and the image embeddings (B, D):
    the effects sum over positions to the block's stored effect (the pool is a mean)."""
    seen, image_embeds, post, scale = _recorded_pass(model, images)
    with torch.no_grad():
        delta = seen["deltas"][block].float().flatten(2).transpose(1, 2)  # (B, h·w, C)
        per_position = delta @ post.matrix / (delta.shape[1] * scale[:, None, None])  # (B, h·w, D)
    return per_position, image_embeds
