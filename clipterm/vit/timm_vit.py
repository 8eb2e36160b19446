"""The exact decomposition of open_clip's timm transformer towers: SigLIP, SigLIP2, ViT-SO400M, PE-Core (MAP heads),
EVA / EVA02 (rotary, SwiGLU), MobileCLIP-B, ViTamin and timm's own CLIP ViTs (class-token or average pooling).

Each of these is a pre-norm residual stream (`x + ls1(attn(norm1(x)))`, then `x + ls2(mlp(norm2(x)))`), so the
final stream is the input embedding plus every head's and every MLP's output; `clipterm.vit.pooling` carries those
through the final norm, the pool (class token, average or MAP attention) and the head exactly. Rotary embeddings,
SwiGLU, qk-norm, relative position bias and LayerScale change how attention weights or MLP outputs are computed,
not how they add up, so nothing here recomputes them: forward hooks read what the real timm modules produced —

- the stream entering the first block (everything before it, the hybrid conv stems included, is `embed`);
- each attention's merged head outputs where they enter the output projection (or its inner norm, EVA02's
  `attn.norm`, linearised per token), split by head;
- each block's MLP output as the difference the MLP made to the stream (`norm2`'s input to the block's output);
- the final stream, the pool's input, its query and keys (for the frozen pool attention) and its MLP's output,
  and the input of every norm after the pool (for its σ).

A change in timm that moves any of these breaks the sum, which `pooling.check_sum` refuses at run time and the
sweep over every open_clip arch (tests/test_towers.py) catches first.
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
from clipterm.vit.pooling import AttnPool, Norm, Plan, Post, Stream, TokenPool, norm_linear

CONVENTION = (
    "timm transformer tower, every norm after the stream linearised per image (and per token before the pool), the "
    "pool's attention frozen per image: token/avg pooling store heads in head space; a MAP head stores block heads "
    "as joint-space effects, pool heads in head space, its MLP as pool.MLP; biases in `bias`"
)


def _block_classes() -> tuple[type, ...]:
    from timm.models.eva import EvaBlock
    from timm.models.vision_transformer import Block
    from timm.models.vision_transformer_relpos import RelPosBlock

    return (Block, EvaBlock, RelPosBlock, *_post_norm_classes())


def _post_norm_classes() -> tuple[type, ...]:
    """Blocks that normalise each branch's output before adding it: `x + norm1(attn(x))`, `x + norm2(mlp(x))`."""
    from timm.models.eva import EvaBlockPostNorm
    from timm.models.vision_transformer import ResPostBlock

    return ResPostBlock, EvaBlockPostNorm


def is_post_norm(block: nn.Module) -> bool:
    return isinstance(block, _post_norm_classes())


def _trunk_classes() -> tuple[type, ...]:
    from timm.models.eva import Eva
    from timm.models.vision_transformer import VisionTransformer
    from timm.models.vision_transformer_relpos import VisionTransformerRelPos

    return VisionTransformer, Eva, VisionTransformerRelPos


def is_timm_transformer(model) -> bool:
    visual = vision_tower(model)
    trunk = getattr(visual, "trunk", None)
    if trunk is None:
        return False
    try:
        return isinstance(trunk, _trunk_classes())
    except ImportError:  # pragma: no cover - timm is a dependency
        return False


def unsupported_reason(model) -> str | None:
    """Why this timm tower does not decompose exactly, or None when it does."""
    visual = vision_tower(model)
    trunk = visual.trunk
    if not isinstance(trunk, _trunk_classes()):
        return f"timm {type(trunk).__name__} tower"
    for index, block in enumerate(trunk.blocks):
        if type(block) not in _block_classes():
            return f"timm block {type(block).__name__} (block {index}) is not a residual block clipterm knows"
        attn = block.attn
        if not isinstance(getattr(attn, "proj", None), nn.Linear) or not hasattr(attn, "num_heads"):
            return f"attention {type(attn).__name__} (block {index}) has no output projection to split by head"
    pool = getattr(trunk, "attn_pool", None)
    if pool is not None:
        if getattr(pool, "pos_embed", None) is not None:
            return "the MAP head adds its own positional embedding"
        if pool.latent_len != 1:
            return f"the MAP head has {pool.latent_len} latent queries (only one is decomposed)"
        if not isinstance(pool.kv, nn.Linear) or not isinstance(pool.proj, nn.Linear):
            return "the MAP head has no value and output projections to split by head"
    elif trunk.global_pool not in ("token", "avg"):
        return f"global_pool={trunk.global_pool!r} (token, avg and map are decomposed; max is not linear)"
    return pooling.projection_reason(visual)


def check_supported(model, name: str = "model") -> None:
    pooling.check_tower(model, name, is_timm_transformer, "a timm transformer tower", unsupported_reason)


def _is_identity(module) -> bool:
    return module is None or isinstance(module, nn.Identity)


# --------------------------------------------------------------------------- what is fixed per model


def _layer_scale(block: nn.Module, which: int, width: int, device) -> Tensor:
    """(W,) the LayerScale of a block's attention (which=1) or MLP (2): timm's `ls1`/`ls2`, Eva's `gamma_1`/`gamma_2`."""
    module = getattr(block, f"ls{which}", None)
    gamma = getattr(module, "gamma", None) if module is not None else getattr(block, f"gamma_{which}", None)
    if module is not None and gamma is None and not _is_identity(module):
        raise pooling.unsupported("model", f"LayerScale {type(module).__name__} has no gamma")
    return gamma.detach().float() if gamma is not None else torch.ones(width, device=device)


def _head_maps(block: nn.Module, width: int, device) -> tuple[Tensor, Tensor, Norm | None]:
    """(H, dh, W) per-head maps into the stream, (W,) the constant the attention adds, and its inner norm.

    A post-norm block's maps include its `norm1` (γ and centring; its σ is per token, applied to the head outputs
    in `decompose`), and its constant is the out projection's raw bias (made per token there, as γ ⊙ C b / σ + β)."""
    attn = block.attn
    proj = attn.proj
    heads, merged = attn.num_heads, proj.in_features
    inner = Norm.of(getattr(attn, "norm", None), merged, device, "the attention's inner norm")
    weight = proj.weight.detach().float().T  # (K, W): merged -> stream
    constant = proj.bias.detach().float() if proj.bias is not None else torch.zeros(width, device=device)
    if inner is not None:
        constant = constant + inner.beta @ weight
        weight = inner.gamma[:, None] * weight  # (K, W): diag(γ) W_P^T, then the centring C (rows = inputs)
        if inner.centred:
            weight = weight - weight.mean(0, keepdim=True)  # C diag(γ) W_P^T: C x = x - mean(x), as a row map
    if is_post_norm(block):
        norm = Norm.of(block.norm1, width, device, "the post-attention norm")
        return norm_linear(norm, weight).view(heads, merged // heads, width), constant, inner
    scale = _layer_scale(block, 1, width, device)
    return (weight * scale).view(heads, merged // heads, width), constant * scale, inner


def plan(model) -> Plan:
    """The fixed part of the split (recomputed each call: a few matrix products per layer)."""
    visual = vision_tower(model)
    trunk = visual.trunk
    device = next(trunk.parameters()).device
    width = trunk.embed_dim if hasattr(trunk, "embed_dim") else trunk.num_features
    maps, constants, inners = zip(*(_head_maps(block, width, device) for block in trunk.blocks))
    norm = Norm.of(trunk.norm, width, device, "the final norm")
    pool_module = getattr(trunk, "attn_pool", None)
    if pool_module is not None:
        heads, dh = pool_module.num_heads, pool_module.head_dim
        kv_w = pool_module.kv.weight.detach().float()  # (2E, W)
        kv_b = pool_module.kv.bias.detach().float() if pool_module.kv.bias is not None else torch.zeros(kv_w.shape[0], device=device)
        embed = kv_w.shape[0] // 2
        out = pool_module.proj
        pool = AttnPool(
            w_v=kv_w[embed:].view(heads, dh, -1), b_v=kv_b[embed:].view(heads, dh),
            w_o=out.weight.detach().float().view(out.out_features, heads, dh),
            b_o=out.bias.detach().float() if out.bias is not None else torch.zeros(out.out_features, device=device),
            start=_pool_start(trunk), mlp=pool_module.mlp is not None,
        )
        pooled_width = out.out_features
    else:
        pool = TokenPool(trunk.global_pool, start=0 if getattr(trunk, "pool_include_prefix", False) else trunk.num_prefix_tokens)
        pooled_width = width
    steps = pooling.post_steps([("fc_norm", trunk.fc_norm), ("head", trunk.head), ("proj", visual.head)], pooled_width, device)
    post_norm = torch.tensor([is_post_norm(block) for block in trunk.blocks], device=device)
    constants = torch.stack(constants) * ~post_norm[:, None]  # a post-norm block's bias differs per token
    return Plan(head_maps=torch.stack(maps), stream_bias=constants, norm=norm, pool=pool,
                post=Post(steps, pooled_width, device), inner_norms=list(inners))


def _pool_start(trunk) -> int:
    """The first stream token a MAP head sees: timm's ViT drops the prefix tokens unless `pool_include_prefix`."""
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(trunk, VisionTransformer) and not trunk.pool_include_prefix:
        return trunk.num_prefix_tokens
    return 0


def readout(model) -> Tensor:
    """(L, H, dh, D) fp32 for token/avg pooling; (1, 1, D, D), the identity, for a MAP head (joint-space heads)."""
    with torch.no_grad():
        return plan(model).readout()


def pool_readout(model) -> Tensor | None:
    """(G, dh', D) fp32: a MAP head's pool heads from head space to the embedding (None without one)."""
    with torch.no_grad():
        return plan(model).pool_readout()


# --------------------------------------------------------------------------- hooks on the real forward


@contextmanager
def recording(visual) -> Iterator[dict[str, Any]]:
    """Forward hooks that keep what the tower computes; removed on exit, whatever happens."""
    trunk = visual.trunk
    seen: dict[str, Any] = {"merged": {}, "mid": {}, "mlp": {}, "post": {}, "attn_out": {}}
    hooks = []

    def pre(module: nn.Module, fn) -> None:
        hooks.append(module.register_forward_pre_hook(lambda _m, args: fn(args[0])))

    def post(module: nn.Module, fn) -> None:
        hooks.append(module.register_forward_hook(lambda _m, _args, out: fn(out)))

    def keep(key: str, index: Any = None):
        def store(value: Tensor) -> None:
            if index is None:
                seen[key] = value
            else:
                seen[key][index] = value
        return store

    blocks = list(trunk.blocks)
    pre(blocks[0], keep("embed"))
    for layer, block in enumerate(blocks):
        attn = block.attn
        entry = attn.norm if not _is_identity(getattr(attn, "norm", None)) else attn.proj
        pre(entry, keep("merged", layer))
        if is_post_norm(block):
            pre(block.norm1, keep("attn_out", layer))  # its σ per token
            pre(block.mlp, keep("mid", layer))  # the stream after the attention branch
        else:
            pre(block.norm2, keep("mid", layer))

        def mlp_delta(out: Tensor, layer: int = layer) -> None:
            seen["mlp"][layer] = out - seen["mid"].pop(layer)  # what the MLP branch added to the stream

        post(block, mlp_delta)
    pre(trunk.norm, keep("final"))
    pool = getattr(trunk, "attn_pool", None)
    if pool is not None:
        pre(pool, keep("pool_tokens"))
        post(pool.q_norm, keep("q"))
        post(pool.k_norm, keep("k"))
        if pool.mlp is not None:
            post(pool.mlp, keep("pool_mlp"))
    for index, (_, module) in enumerate(_post_norm_modules(visual)):
        pre(module, keep("post", index))
    try:
        yield seen
    finally:
        for hook in hooks:
            hook.remove()


def _post_norm_modules(visual) -> list[tuple[str, nn.Module]]:
    """The norms after the pool, in order (their σ comes from their real input)."""
    trunk = visual.trunk
    modules = [("fc_norm", trunk.fc_norm), ("head", trunk.head), ("proj", visual.head)]
    found = []
    for name, module in modules:
        for sub_name, sub in ([(name, module)] if not isinstance(module, nn.Sequential) else module.named_children()):
            if not isinstance(sub, (nn.Identity, nn.Dropout, nn.Linear, nn.Flatten)):
                found.append((sub_name, sub))
    return found


def _pool_attention(pool: nn.Module, q: Tensor, k: Tensor) -> Tensor:
    """(B, G, N) the kept query's attention weights, from the real (normed) q and k: softmax(q·k · scale)."""
    with torch.autocast(q.device.type, enabled=False):
        scores = q[:, :, :1].float() @ k.float().transpose(-1, -2) * pool.scale  # (B, G, 1, N)
        return scores.softmax(-1)[:, :, 0]  # (B, G, N)


def check_stored(model, neurons: bool, token_layers=()) -> None:
    """Refuse what a timm-tower cache cannot store yet (a build checks this before it writes anything)."""
    if neurons:
        raise ClipTermError("per-neuron values are not stored for timm towers yet",
                            hint="build without --neurons; heads and whole MLPs decompose exactly", code=ExitCode.UNSUPPORTED)
    if token_layers:
        raise ClipTermError("per-token head maps (--tokens) are stored for open_clip class-token ViTs and ResNets only",
                            hint="build without --tokens; `clipterm spatial` needs them", code=ExitCode.UNSUPPORTED)


def decompose(model, images: Tensor, neurons: bool = False, token_layers=()) -> Decomposition:
    """Split the embeddings of a batch (B, 3, S, S): the real tower runs once under hooks."""
    visual = vision_tower(model)
    check_supported(model)
    if visual.training:
        raise ValueError("decompose() needs model.eval(): dropout and drop path would change the split")
    check_stored(model, neurons, token_layers)
    trunk = visual.trunk
    fixed = plan(model)
    weight = next(trunk.parameters())
    with torch.no_grad(), recording(visual) as seen:
        image_embeds = visual(images.to(device=weight.device, dtype=weight.dtype))  # (B, D)
    heads, token_bias = [], None
    width = fixed.head_maps.shape[-1]
    for layer, block in enumerate(trunk.blocks):
        merged = seen["merged"][layer]  # (B, N, K)
        inner = fixed.inner_norms[layer]
        if inner is not None:
            merged = merged.float() / inner.sigma(merged)[..., None]  # m / σ_in per token
        if is_post_norm(block):  # x + norm1(attn(x)): heads and bias are divided by norm1's σ at each token
            norm = Norm.of(block.norm1, width, merged.device, "the post-attention norm")
            sigma = norm.sigma(seen["attn_out"][layer])[..., None]  # (B, N, 1)
            merged = merged.float() / sigma
            _, constant, _ = _head_maps(block, width, merged.device)
            part = norm.linear(constant) / sigma + norm.beta  # (B, N, W)
            token_bias = part if token_bias is None else token_bias + part
        heads.append(merged.unflatten(-1, (block.attn.num_heads, -1)))  # (B, N, H, dh)
    pool = getattr(trunk, "attn_pool", None)
    stream = Stream(
        embed=seen["embed"], heads=heads, mlps=[seen["mlp"][layer] for layer in range(len(heads))], final=seen["final"],
        image_embeds=image_embeds, post_sigmas=[_post_sigma(visual, i, seen["post"][i]) for i in sorted(seen["post"])],
        pool_tokens=seen.get("pool_tokens"),
        pool_attn=_pool_attention(pool, seen["q"], seen["k"]) if pool is not None else None,
        pool_mlp=seen["pool_mlp"][:, 0] if pool is not None and pool.mlp is not None else None, token_bias=token_bias,
    )
    parts = pooling.split(fixed, stream)
    pooling.check_sum(parts, fixed, type(trunk).__name__, fp32=weight.dtype == torch.float32
                      and not torch.is_autocast_enabled(weight.device.type))
    return _decomposition(parts)


def _post_sigma(visual, index: int, value: Tensor) -> Tensor:
    name, module = _post_norm_modules(visual)[index]
    norm = Norm.of(module, value.shape[-1] if value.dim() == 2 else value.shape[1], value.device, name)
    return norm.sigma(value.flatten(1) if value.dim() > 2 else value)  # (B,)


def _decomposition(parts: pooling.Split) -> Decomposition:
    from clipterm.vit.decompose import PooledDecomposition

    return PooledDecomposition(head_out=parts.head_out, embed=parts.embed, bias=parts.bias, mlps=parts.mlps,
                               ln_scale=parts.ln_scale, image_embeds=parts.image_embeds, pool_heads=parts.pool_heads,
                               pool_bias=parts.pool_bias)
