"""Residual sites of every tower family: where a block's (or stage's) output is read, and written back.

A site is the residual stream after block `L` of a ViT (open_clip's `transformer.resblocks[L]`, timm's
`trunk.blocks[L]`), or the output of stage `L` of a ResNet (`layer{L+1}`) or ConvNeXt (`trunk.stages[L]`).
`Site.tokens(output)` turns the module's output into (B, T, W) tokens (a grid's positions row-major), and
`Site.replace(output, tokens)` builds the output the rest of the model expects from edited tokens, so a
forward hook can splice a reconstruction or an ablation in. `Site.summary(tokens)` is the one vector per
image that `--tokens cls` trains on: the class token of a ViT that has one, else the mean over positions.

`direction_effects` carries residual directions written at a site to the image embedding, through the
tower's exact linear path (class-token ViTs only): the direct effect through ln_post and the projection,
and the second-order one through each later head's values with the attention spread evenly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from clipterm import names
from clipterm.errors import ClipTermError, ExitCode


@dataclass
class Site:
    module: Any  # the module whose forward output is the site
    count: int  # how many layers (stages) the tower has at this kind of site
    width: int  # 0 for a grid: read it from the first batch
    layout: str  # "tokens_bf" (B, T, W), "tokens_tf" (T, B, W), "grid" (B, W, H, W')
    prefix: int  # leading non-patch tokens (class token, registers); 0 for a grid
    class_token: bool  # `--tokens cls` reads token 0 (else the mean over positions)

    def tokens(self, output: Any) -> Tensor:
        out = output[0] if isinstance(output, tuple) else output
        if self.layout == "tokens_bf":
            return out
        if self.layout == "tokens_tf":
            return out.transpose(0, 1)
        return out.flatten(2).transpose(1, 2)  # (B, H·W', C)

    def replace(self, output: Any, tokens: Tensor) -> Any:
        out = output[0] if isinstance(output, tuple) else output
        if self.layout == "tokens_bf":
            new = tokens
        elif self.layout == "tokens_tf":
            new = tokens.transpose(0, 1)
        else:
            new = tokens.transpose(1, 2).reshape(out.shape)
        new = new.to(out.dtype)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    def summary(self, tokens: Tensor) -> Tensor:
        """(B, W): the class token, or the mean over positions for a tower without one."""
        return tokens[:, 0] if self.class_token else tokens[:, self.prefix:].mean(1)


def site(model: Any, layer: int) -> Site:
    """The residual site after block (stage) `layer`; a layer the tower lacks is refused in one line."""
    from clipterm.vit import convnext, resnet
    from clipterm.vit.decompose import pooling_of, vision_tower

    visual = vision_tower(model)
    if resnet.is_resnet(model):
        stages = [getattr(visual, f"layer{i}") for i in range(1, 5) if hasattr(visual, f"layer{i}")]
        return _pick(stages, layer, "stages", lambda _m: 0, "grid", 0, False)
    trunk = getattr(visual, "trunk", None)
    if trunk is not None and convnext.is_convnext(model):
        return _pick(list(trunk.stages), layer, "stages", lambda _m: 0, "grid", 0, False)
    if trunk is not None:
        blocks = list(trunk.blocks)
        prefix = int(getattr(trunk, "num_prefix_tokens", 1 if getattr(trunk, "cls_token", None) is not None else 0))
        cls = getattr(trunk, "cls_token", None) is not None and getattr(trunk, "global_pool", "") == "token"
        return _pick(blocks, layer, "blocks", lambda _m: trunk.embed_dim, "tokens_bf", prefix, cls)
    transformer = visual.transformer
    layout = "tokens_bf" if getattr(transformer, "batch_first", True) else "tokens_tf"
    return _pick(list(transformer.resblocks), layer, "layers", lambda _m: transformer.width, layout, 1,
                 pooling_of(model) == "tok")


def _pick(modules: list, layer: int, what: str, width, layout: str, prefix: int, cls: bool) -> Site:
    if not 0 <= layer < len(modules):
        raise ClipTermError(f"no layer {names.layer(layer)} in this tower: its {what} run "
                            f"{names.layer(0)}..{names.layer(len(modules) - 1)}",
                            hint=f"pick --layer {names.layer(len(modules) - 1)} or lower", code=ExitCode.USAGE)
    return Site(modules[layer], len(modules), int(width(modules[layer])), layout, prefix, cls)


# --------------------------------------------------------------------------- exact paths to the embedding


def direction_effects(model: Any, layer: int, directions: Tensor) -> tuple[Tensor, Tensor]:
    """(direct (F, D), second-order (F, D)) of unit residual directions (F, W) written after block `layer`.

    Direct: the class token's write through ln_post (centred, γ) and `proj`, σ left out (a direction's name
    does not depend on its scale). Second order: the write at every token through each later layer's ln_1 (γ,
    centred), the head's values and its readout, summed over later heads (attention spread evenly)."""
    from clipterm.vit.decompose import ln_post_affine, pooling_of, readout, vision_tower
    from clipterm.vit.towers import refuse_model_analysis

    refuse_model_analysis(model, "exact feature effects")
    if pooling_of(model) != "tok":
        raise ClipTermError("exact feature effects follow a class-token ViT's path", code=ExitCode.UNSUPPORTED)
    visual = vision_tower(model)
    blocks = visual.transformer.resblocks
    width = visual.transformer.width
    with torch.no_grad():
        d = directions.float().to(visual.conv1.weight.device)
        centred = d - d.mean(-1, keepdim=True)  # (F, W)
        gamma, _beta, proj = ln_post_affine(visual)
        direct = (centred * gamma) @ proj  # (F, D)
        heads_readout = readout(model)  # (L, H, dh, D)
        second = torch.zeros_like(direct)
        for later in range(layer + 1, len(blocks)):
            attn, ln_1 = blocks[later].attn, blocks[later].ln_1
            g1 = ln_1.weight.float() if ln_1.weight is not None else torch.ones(width, device=d.device)
            w_value = attn.in_proj_weight[2 * width:].float().view(attn.num_heads, width // attn.num_heads, width)
            values = torch.einsum("fw,hdw->fhd", centred * g1, w_value)  # (F, H, dh)
            second += torch.einsum("fhd,hde->fe", values, heads_readout[later])  # (F, D)
    return direct.cpu(), second.cpu()


def tail_from(model: Any, layer: int) -> Any:
    """A function (B, T, W) residual after block `layer` -> (B, D) image embeddings (open_clip ViTs only)."""
    from clipterm.vit.decompose import vision_tower

    visual = vision_tower(model)
    blocks = visual.transformer.resblocks[layer + 1:]

    def run(stream: Tensor) -> Tensor:
        x = stream if visual.transformer.batch_first else stream.transpose(0, 1)
        for block in blocks:
            x = block(x)
        if not visual.transformer.batch_first:
            x = x.transpose(0, 1)
        pooled, _ = visual._pool(x)
        return pooled @ visual.proj if visual.proj is not None else pooled

    return run


def path_vectors(model: Any, layer: int, directions: Tensor) -> tuple[Tensor, Tensor]:
    """(direct (F, D), per-path (F, K, D)) for residual directions (F, W) written after block `layer`: the class
    token's path through ln_post and proj, and each later head's value path (K = later layers × heads, layer-major),
    both before the per-image scalars (attention, σ) of `frozen_terms`."""
    from clipterm.vit.decompose import ln_post_affine, readout, vision_tower

    visual = vision_tower(model)
    blocks, width = visual.transformer.resblocks, visual.transformer.width
    with torch.no_grad():
        d = directions.float().to(visual.conv1.weight.device)
        centred = d - d.mean(-1, keepdim=True)
        gamma, _beta, proj = ln_post_affine(visual)
        heads_readout = readout(model)
        parts = []
        for later in range(layer + 1, len(blocks)):
            attn, ln_1 = blocks[later].attn, blocks[later].ln_1
            g1 = ln_1.weight.float() if ln_1.weight is not None else torch.ones(width, device=d.device)
            w_value = attn.in_proj_weight[2 * width:].float().view(attn.num_heads, width // attn.num_heads, width)
            values = torch.einsum("fw,hdw->fhd", centred * g1, w_value)
            parts.append(torch.einsum("fhd,hde->fhe", values, heads_readout[later]))
        return (centred * gamma) @ proj, torch.cat(parts, 1)


def frozen_terms(model: Any, layer: int, pixels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One forward: (class-token attention rows / σ of ln_1, (B, K, T); σ of ln_post at the class token, (B,);
    the residual after block `layer`, (B, T, W)), so that a write `a_t · d` at the tokens reaches the embedding as
    `a_0 · direct / σ_post + Σ_k (Σ_t rows[k, t] a_t) · path_k / σ_post` with attention and norms frozen."""
    from clipterm.vit.decompose import attention_qkv, vision_tower

    visual = vision_tower(model)
    blocks = visual.transformer.resblocks
    s = site(model, layer)
    rows, kept = [], {}

    def ln_hook(module, inputs, output):
        x = inputs[0] if visual.transformer.batch_first else inputs[0].transpose(0, 1)
        normed = output if visual.transformer.batch_first else output.transpose(0, 1)
        sigma = (x.float().var(-1, unbiased=False) + module.eps).sqrt()  # (B, T)
        q, k, _v, scale = attention_qkv(module._attn, normed.float())
        attn_rows = torch.softmax((q[:, :, :1] @ k.transpose(-1, -2)) * scale, -1)[:, :, 0]  # (B, H, T)
        rows.append(attn_rows / sigma[:, None, :])

    def post_hook(module, inputs, output):
        x = inputs[0]
        kept["sigma"] = (x[:, 0].float().var(-1, unbiased=False) + module.eps).sqrt() if x.dim() == 3 else \
            (x.float().var(-1, unbiased=False) + module.eps).sqrt()

    handles = [s.module.register_forward_hook(lambda _m, _i, out: kept.__setitem__("tokens", s.tokens(out)))]
    for later in range(layer + 1, len(blocks)):
        blocks[later].ln_1._attn = blocks[later].attn
        handles.append(blocks[later].ln_1.register_forward_hook(ln_hook))
    handles.append(visual.ln_post.register_forward_hook(post_hook))
    try:
        with torch.no_grad():
            model.encode_image(pixels)
    finally:
        for handle in handles:
            handle.remove()
        for later in range(layer + 1, len(blocks)):
            del blocks[later].ln_1._attn
    return torch.cat(rows, 1), kept["sigma"], kept["tokens"]
