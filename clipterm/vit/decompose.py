"""The exact direct-effect decomposition of an open_clip ViT's image embedding.

Gandelsman, Efros & Steinhardt, "Interpreting CLIP's image representation via text-based
decomposition" (ICLR 2024): the image embedding `proj(ln_post(r))` is a sum of direct effects,
because the class-token residual `r` is a sum of the embedding, every attention head and every
MLP, and `ln_post` is linear once its σ is fixed for each image. A head's effect factors into
its CLS attention output / σ (head space, `head_out`) times a fixed per-head `readout`, so only
the CLS query row of attention is ever formed, never the `[B, N, N, H, width]` tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipterm import names
from clipterm.errors import ClipTermError, ExitCode
from clipterm.vit.support import refuse_unsupported

CONVENTION = (
    "ln_post linearised per image: each component centred by its own mean, divided by the image's sigma, "
    "scaled by gamma; beta and out-proj biases in `bias`"
)


@dataclass
class Decomposition:
    """Direct effects of one batch. `embed + bias + Σ head_out @ readout + Σ mlps == image_embeds`."""

    head_out: Tensor  # (B, L, H, dh) CLS attention output of each head / σ, in head space
    embed: Tensor  # (B, D) ln_pre(class_emb + pos_emb[0]) through the linearised ln_post
    bias: Tensor  # (B, D) ln_post β @ proj, plus every attention out-proj bias (after LayerScale)
    mlps: Tensor  # (B, L, D) CLS row of each MLP's output
    ln_scale: Tensor  # (B,) σ of ln_post for each image
    image_embeds: Tensor  # (B, D) the model's own image embedding (unnormalised)
    neurons: Tensor | None = None  # (B, L, M) CLS post-activation MLP values
    tokens: dict[int, Tensor] = field(default_factory=dict)  # layer -> (B, H, T, dh) per source token / σ

    def summed(self, heads_readout: Tensor) -> Tensor:
        """All components added up in joint space; equals `image_embeds` up to float rounding."""
        if heads_readout.shape[:2] == (1, 1) and self.head_out.shape[1:3] != (1, 1):  # joint-space heads, readout I
            heads = self.head_out.sum((1, 2))  # (B, D)
        else:
            heads = torch.einsum("blhd,lhde->be", self.head_out, heads_readout.to(self.head_out))  # (B, D)
        return self.embed + self.bias + heads + self.mlps.sum(1)  # (B, D)


@dataclass
class PooledDecomposition(Decomposition):
    """A tower that pools by attention (a MAP head, CoCa's attentional pooler): block heads in joint space
    (`head_out` (B, L, H, D), readout the identity), the pool's MLP as the last slot of `mlps`, and the pool's own
    split: `pool_heads` (B, G, dh') in head space (readout `pool_readout`), `pool_bias` (B, D). Then
    `Σ_g pool_heads[g] @ pool_readout[g] + pool_bias + mlps[:, -1] == image_embeds` as well."""

    pool_heads: Tensor | None = None  # (B, G, dh')
    pool_bias: Tensor | None = None  # (B, D)


# --------------------------------------------------------------------------- support


def check_supported(model, name: str = "model") -> None:
    """Refuse, naming the model and the option, any tower whose embedding does not split exactly."""
    from open_clip.transformer import VisionTransformer

    visual = vision_tower(model)
    refuse_unsupported(name, {**_multimodal(model), "vision_cfg": _tower_options(visual)})
    if not isinstance(visual, VisionTransformer):
        raise _unsupported(name, f"{type(visual).__name__} vision tower (not an open_clip ViT)")
    if not isinstance(visual.ln_post, nn.LayerNorm):
        raise _unsupported(name, f"ln_post is {type(visual.ln_post).__name__}, not a LayerNorm")
    if visual.attn_pool is not None and getattr(visual, "attn_pool_contrastive", None) is not None:
        raise _unsupported(name, f"attentional_pool={visual.attn_pool_type!r} (open_clip's untested two-pool setup)")
    if visual.attn_pool is not None and visual.pool_type != "tok":
        raise _unsupported(name, f"attentional pooling with pool_type={visual.pool_type!r} (only the first query is decomposed)")


def pooling_of(model) -> str:
    """`tok` (the class token, the original split), `avg` (pool_type='avg') or `attn` (CoCa's attentional pooler)."""
    visual = vision_tower(model)
    if getattr(visual, "attn_pool", None) is not None:
        return "attn"
    return "avg" if getattr(visual, "pool_type", "tok") == "avg" else "tok"


def _unsupported(name: str, reason: str) -> ClipTermError:
    hint = "see docs/models.md for every tower clipterm decomposes, and why the others not"
    return ClipTermError(f"{name} is not supported: {reason}", hint=hint, code=ExitCode.UNSUPPORTED)


def _multimodal(model) -> dict:
    return {"multimodal_cfg": {}} if hasattr(model, "text_decoder") else {}


def _tower_options(visual) -> dict:
    """The vision_cfg options that decide support, read off the built tower rather than its config."""
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.transformer import VisionTransformer

    if hasattr(visual, "trunk"):  # open_clip's TimmModel
        trunk_cfg = getattr(visual.trunk, "pretrained_cfg", None) or {}
        return {"timm_model_name": trunk_cfg.get("architecture") or type(visual.trunk).__name__}
    if isinstance(visual, ModifiedResNet):
        return {"layers": [len(visual.layer1), len(visual.layer2), len(visual.layer3), len(visual.layer4)]}
    if not isinstance(visual, VisionTransformer):
        return {}
    blocks = visual.transformer.resblocks
    return {
        "attentional_pool": getattr(visual, "attn_pool_type", "") or visual.attn_pool is not None,
        "pool_type": visual.pool_type,
        "scale_attn": any(not _is_identity(getattr(block, "ln_attn", None)) for block in blocks),
        "scale_attn_inner": any(not _is_identity(getattr(block.attn, "ln_inner", None)) for block in blocks),
    }


def refuse_neuron_split(visual) -> None:
    """scale_fc puts a LayerNorm between the activation and c_proj, so single neurons don't add up."""
    if any(not _is_identity(getattr(block.mlp, "ln", None)) for block in visual.transformer.resblocks):
        raise ClipTermError(
            "per-neuron values are not supported for this model: scale_fc=True puts a LayerNorm inside the MLP",
            hint="build without --neurons; heads and whole MLPs still decompose exactly",
            code=ExitCode.UNSUPPORTED,
        )


def check_stored(model, neurons: bool, token_layers=()) -> None:
    """Refuse what this tower's cache cannot store (a build checks this before it writes anything): per-neuron and
    per-token values follow the class token, so a pooled tower has none, and scale_fc breaks the neuron split."""
    kind = pooling_of(model)
    if kind != "tok" and (neurons or token_layers):
        what = "attentional pool" if kind == "attn" else "average pool"
        raise ClipTermError(f"--{'neurons' if neurons else 'tokens'} is stored for class-token ViTs; this tower ends in an "
                            f"{what}", hint="build without it; heads and whole MLPs decompose exactly",
                            code=ExitCode.UNSUPPORTED)
    if neurons:
        refuse_neuron_split(vision_tower(model))


def _is_identity(module) -> bool:
    return module is None or isinstance(module, nn.Identity)


def vision_tower(model):
    return getattr(model, "visual", model)


# --------------------------------------------------------------------------- the linearised ln_post


def ln_post_affine(visual) -> tuple[Tensor, Tensor, Tensor]:
    """ln_post's γ and β and the projection, in fp32 (identity where the model has none)."""
    ln_post, width = visual.ln_post, visual.transformer.width
    device = visual.conv1.weight.device
    ones = torch.ones(width, device=device)  # (W,)
    gamma = ln_post.weight.float() if ln_post.weight is not None else ones  # (W,)
    beta = ln_post.bias.float() if ln_post.bias is not None else torch.zeros_like(ones)  # (W,)
    proj = visual.proj.float() if visual.proj is not None else torch.eye(width, device=device)  # (W, D)
    return gamma, beta, proj


def to_joint(component: Tensor, sigma: Tensor, gamma: Tensor, proj: Tensor) -> Tensor:
    """One residual component (B, *, W) through the linearised ln_post and proj: (B, *, D)."""
    centred = (component - component.mean(-1, keepdim=True)) * gamma  # (B, *, W)
    return centred @ proj / sigma.view(-1, *[1] * (component.dim() - 1))  # (B, *, D)


def layer_scale_vector(module: nn.Module, width: int, device) -> Tensor:
    gamma = getattr(module, "gamma", None)  # LayerScale; nn.Identity has none
    return gamma.float() if gamma is not None else torch.ones(width, device=device)  # (W,)


def _head_scale(attn: nn.Module, device) -> Tensor:
    scale = getattr(attn, "head_scale", None)  # (H, 1, 1) with scale_heads
    return scale.float().view(-1) if scale is not None else torch.ones(attn.num_heads, device=device)  # (H,)


def readout(model, centred: bool = True) -> Tensor:
    """The fixed per-head readout (L, H, dh, D), fp32: `head_out[:, l, h] @ R[l, h]` is head h's joint-space effect.

    `R_h = W_O^h · head_scale · LayerScale · C · diag(γ) · proj`, with C the centring `I − 11ᵀ/width`;
    `centred=False` leaves C out (the reference convention, which centres by shares of the stream's mean).
    An average-pooled tower's readout goes through its pooled norm the same way; an attention-pooled one stores
    joint-space heads, and its readout is the identity (1, 1, D, D).
    """
    visual = vision_tower(model)
    if pooling_of(model) != "tok":
        if not centred:
            raise ClipTermError("the reference convention is defined for class-token ViTs only",
                                hint="use the clipterm convention for this model", code=ExitCode.UNSUPPORTED)
        with torch.no_grad():
            return pooled_plan(model).readout()
    gamma, _, proj = ln_post_affine(visual)
    width, device = visual.transformer.width, gamma.device
    rows = []
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        for block in visual.transformer.resblocks:
            heads = block.attn.num_heads
            w_out = block.attn.out_proj.weight.float().T.reshape(heads, width // heads, width)  # (H, dh, W)
            w_out = w_out * _head_scale(block.attn, device).view(heads, 1, 1)  # (H, dh, W)
            w_out = w_out * layer_scale_vector(block.ls_1, width, device)  # (H, dh, W)
            if centred:
                w_out = w_out - w_out.mean(-1, keepdim=True)  # (H, dh, W)
            rows.append((w_out * gamma) @ proj)  # (H, dh, D)
    return torch.stack(rows)  # (L, H, dh, D)


def pooled_plan(model):
    """The fixed part of an avg- or attention-pooled open_clip ViT's split (`clipterm.vit.pooling`)."""
    from clipterm.vit import pooling

    visual = vision_tower(model)
    width, device = visual.transformer.width, visual.conv1.weight.device
    maps, constants = [], []
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        for block in visual.transformer.resblocks:
            heads = block.attn.num_heads
            w_out = block.attn.out_proj.weight.float().T.reshape(heads, width // heads, width)  # (H, dh, W)
            w_out = w_out * _head_scale(block.attn, device).view(heads, 1, 1)
            scale = layer_scale_vector(block.ls_1, width, device)
            maps.append(w_out * scale)
            bias = block.attn.out_proj.bias
            constants.append(bias.float() * scale if bias is not None else torch.zeros(width, device=device))
        kind = pooling_of(model)
        if kind == "attn":
            pool, attn = visual.attn_pool, visual.attn_pool.attn
            heads, embed = attn.num_heads, attn.embed_dim
            w_v = attn.in_proj_weight[2 * embed:] if attn.in_proj_weight is not None else attn.v_proj_weight
            b_v = attn.in_proj_bias[2 * embed:] if attn.in_proj_bias is not None else torch.zeros(embed, device=device)
            out = attn.out_proj
            plan_pool = pooling.AttnPool(
                w_v=w_v.float().view(heads, embed // heads, -1), b_v=b_v.float().view(heads, embed // heads),
                w_o=out.weight.float().view(out.out_features, heads, embed // heads),
                b_o=out.bias.float() if out.bias is not None else torch.zeros(out.out_features, device=device))
            norm, pooled_width, post = pooling.Norm.of(pool.ln_k, width, device, "ln_k"), embed, [("ln_post", visual.ln_post)]
        else:
            plan_pool, pooled_width = pooling.TokenPool("avg", start=1), width
            after = visual.final_ln_after_pool
            norm = None if after else pooling.Norm.of(visual.ln_post, width, device, "ln_post")
            post = [("ln_post", visual.ln_post)] if after else []
        post.append(("proj", visual.proj))
        steps = pooling.post_steps([(n, m) for n, m in post if m is not None], pooled_width, device)
        return pooling.Plan(head_maps=torch.stack(maps), stream_bias=torch.stack(constants), norm=norm, pool=plan_pool,
                            post=pooling.Post(steps, pooled_width, device))


def pool_readout(model) -> Tensor | None:
    """(G, dh', D) fp32 for CoCa's attentional pooler (its heads, head space -> joint space); None for other pools."""
    if pooling_of(model) != "attn":
        return None
    with torch.no_grad():
        return pooled_plan(model).pool_readout()


def _pooled(model, visual, stream: Tensor, embed: Tensor, heads: list[Tensor], mlps: list[Tensor]) -> Decomposition:
    """The split of an avg- or attention-pooled tower, from the per-token tensors of the block loop."""
    from clipterm.vit import pooling

    plan = pooled_plan(model)
    seen: dict = {}
    hooks = []
    if plan.joint:
        hooks.append(visual.attn_pool.ln_k.register_forward_hook(lambda _m, _a, out: seen.__setitem__("tokens", out)))
    post_norm = visual.ln_post if plan.post.norms else None
    if post_norm is not None:
        hooks.append(post_norm.register_forward_pre_hook(lambda _m, args: seen.__setitem__("post", args[0])))
    try:
        pooled, _ = visual._pool(stream)  # the real pooling modules on the stream the loop computed
    finally:
        for hook in hooks:
            hook.remove()
    image_embeds = pooled @ visual.proj if visual.proj is not None else pooled  # (B, D)
    sigmas = []
    if post_norm is not None:
        post_in = seen["post"][:, 0] if seen["post"].dim() == 3 else seen["post"]  # the kept query / the pooled vector
        sigmas.append(pooling.Norm.of(post_norm, post_in.shape[-1], post_in.device).sigma(post_in))
    attn = mlp = None
    if plan.joint:
        pool = visual.attn_pool
        query = pool.ln_q(pool.query)[:1].unsqueeze(0).expand(stream.shape[0], -1, -1)  # (B, 1, E)
        _, weights = pool.attn(query, seen["tokens"], seen["tokens"], need_weights=True, average_attn_weights=False)
        attn = weights[:, :, 0].float()  # (B, G, N): the real module's weights for the kept (first) query
    parts = pooling.split(plan, pooling.Stream(
        embed=embed, heads=heads, mlps=mlps, final=stream, image_embeds=image_embeds, post_sigmas=sigmas,
        pool_tokens=seen.get("tokens"), pool_attn=attn, pool_mlp=mlp))
    weight = visual.conv1.weight
    pooling.check_sum(parts, plan, "open_clip ViT",
                      fp32=weight.dtype == torch.float32 and not torch.is_autocast_enabled(weight.device.type))
    kind = PooledDecomposition if plan.joint else Decomposition
    extra = {"pool_heads": parts.pool_heads, "pool_bias": parts.pool_bias} if plan.joint else {}
    return kind(head_out=parts.head_out, embed=parts.embed, bias=parts.bias, mlps=parts.mlps, ln_scale=parts.ln_scale,
                image_embeds=parts.image_embeds, **extra)


# --------------------------------------------------------------------------- the forward pass


def attention_qkv(attn: nn.Module, normed: Tensor) -> tuple[Tensor, Tensor, Tensor, float]:
    """Queries, keys and values per head, ready for `softmax(q @ kᵀ * scale) @ v`.

    Works for nn.MultiheadAttention and open_clip's Attention (qk-norm, scaled cosine), which
    share the packed `in_proj_weight` layout.
    """
    batch, tokens, width = normed.shape
    heads = attn.num_heads
    qkv = F.linear(normed, attn.in_proj_weight, attn.in_proj_bias)  # (B, N, 3W)
    q, k, v = qkv.view(batch, tokens, 3, heads, width // heads).permute(2, 0, 3, 1, 4)  # 3 × (B, H, N, dh)
    logit_scale = getattr(attn, "logit_scale", None)
    if logit_scale is not None:  # scaled cosine attention: a per-head temperature replaces 1/sqrt(dh)
        temperature = logit_scale.clamp(max=attn.logit_scale_max).exp()  # (H, 1, 1)
        return F.normalize(q, dim=-1) * temperature, F.normalize(k, dim=-1), v, 1.0
    q = getattr(attn, "ln_q", nn.Identity())(q)  # (B, H, N, dh)
    k = getattr(attn, "ln_k", nn.Identity())(k)  # (B, H, N, dh)
    return q, k, v, (width // heads) ** -0.5


def decompose(model, images: Tensor, neurons: bool = False, token_layers: Sequence[int] = ()) -> Decomposition:
    """Split the image embeddings of a batch of preprocessed images (B, 3, S, S) into direct effects.

    The residual stream is run block by block with the model's own weights; each block's
    per-head CLS outputs come from the same attention call that updates the stream. The
    joint-space algebra is done in fp32 even under autocast.
    """
    visual = vision_tower(model)
    check_supported(model)
    if visual.training:
        raise ValueError("decompose() needs model.eval(): dropout and patch dropout would change the split")
    check_stored(model, neurons, token_layers)
    blocks = visual.transformer.resblocks
    layers, width = len(blocks), visual.transformer.width
    bad = [layer for layer in token_layers if not 0 <= layer < layers]
    if bad:
        hint = f"use layers L0-{names.layer(layers - 1)}"
        raise ClipTermError(f"no layer {names.layer(bad[0])}: the model has {layers} layers", hint=hint, code=ExitCode.USAGE)
    token_layers = set(token_layers)
    weight = visual.conv1.weight
    device = weight.device
    pooled = pooling_of(model) != "tok"
    keep_heads, keep_mlps = [], []
    with torch.no_grad():
        stream = visual._embeds(images.to(device=device, dtype=weight.dtype))  # (B, N, W)
        embed_tokens = stream
        embed_cls = stream[:, 0].float()  # (B, W)
        head_cls, mlp_cls, acts, token_parts = [], [], [], {}
        out_bias = torch.zeros(width, device=device)  # (W,)
        for layer, block in enumerate(blocks):
            attn = block.attn
            q, k, v, scale = attention_qkv(attn, block.ln_1(stream))  # (B, H, N, dh) each
            heads_out = F.scaled_dot_product_attention(q, k, v, scale=scale)  # (B, H, N, dh)
            head_cls.append(heads_out[:, :, 0].float())  # (B, H, dh)
            if pooled:
                keep_heads.append(heads_out.transpose(1, 2))  # (B, N, H, dh)
            if layer in token_layers:
                with torch.autocast(device.type, enabled=False):
                    scores = q[:, :, :1].float() @ k.float().transpose(-1, -2) * scale  # (B, H, 1, T)
                    token_parts[layer] = scores.softmax(-1).transpose(-1, -2) * v.float()  # (B, H, T, dh)
            if getattr(attn, "head_scale", None) is not None:
                heads_out = heads_out * attn.head_scale  # (B, H, N, dh)
            merged = heads_out.transpose(1, 2).reshape(stream.shape)  # (B, N, W)
            stream = stream + block.ls_1(attn.out_proj(merged))  # (B, N, W)
            if attn.out_proj.bias is not None:
                out_bias += attn.out_proj.bias.float() * layer_scale_vector(block.ls_1, width, device)  # (W,)
            hidden = block.ln_2(stream)  # (B, N, W)
            for name, part in block.mlp.named_children():
                hidden = part(hidden)  # (B, N, M) inside, (B, N, W) after c_proj
                if name == "gelu" and neurons:  # open_clip's name for the activation, QuickGELU too
                    acts.append(hidden[:, 0].float())  # (B, M)
            mlp_out = block.ls_2(hidden)  # (B, N, W)
            mlp_cls.append(mlp_out[:, 0].float())  # (B, W)
            if pooled:
                keep_mlps.append(mlp_out)  # (B, N, W)
            stream = stream + mlp_out  # (B, N, W)
        if pooled:
            return _pooled(model, visual, stream, embed_tokens, keep_heads, keep_mlps)
        image_embeds = visual.ln_post(stream[:, 0])  # (B, W)
        if visual.proj is not None:
            image_embeds = image_embeds @ visual.proj  # (B, D)

        with torch.autocast(device.type, enabled=False):
            gamma, beta, proj = ln_post_affine(visual)  # (W,), (W,), (W, D)
            residual = stream[:, 0].float()  # (B, W)
            sigma = (residual.var(-1, unbiased=False) + visual.ln_post.eps).sqrt()  # (B,)
            batch = residual.shape[0]
            return Decomposition(
                head_out=torch.stack(head_cls, 1) / sigma.view(-1, 1, 1, 1),  # (B, L, H, dh)
                embed=to_joint(embed_cls, sigma, gamma, proj),  # (B, D)
                bias=beta @ proj + to_joint(out_bias.expand(batch, width), sigma, gamma, proj),  # (B, D)
                mlps=to_joint(torch.stack(mlp_cls, 1), sigma, gamma, proj),  # (B, L, D)
                ln_scale=sigma,  # (B,)
                image_embeds=image_embeds.float(),  # (B, D)
                neurons=torch.stack(acts, 1) if neurons else None,  # (B, L, M)
                tokens={layer: part / sigma.view(-1, 1, 1, 1) for layer, part in token_parts.items()},  # (B, H, T, dh)
            )
