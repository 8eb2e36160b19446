"""How a residual stream's per-token components reach the image embedding, for every open_clip pooling.

After the last block, a ViT-like tower maps its final stream r_t (token t) to the embedding through
(1) an optional per-token norm x_t = γ ⊙ C r_t / σ_t + β (timm's `norm`, open_clip's `ln_post` when it runs
before pooling, CoCa's `ln_k`); (2) a pooling of the tokens; (3) affine steps on the pooled vector (`fc_norm`,
a pooled `ln_post`, heads and projections), where each norm is linear once its σ is fixed for the image.

With every σ frozen as the real forward computed it, and the pool's attention weights too, each step is linear
in r, and r is a sum of components (the input embedding, every head, every MLP, the out-projection biases), so
the embedding splits exactly:

- **token** / **avg** pooling: weights π(t) (one-hot on the class token, or uniform over the patch tokens); a
  component c reaches the pooled vector as γ ⊙ C Σ_t (π(t)/σ_t) c_t. A head's c_t = m_t @ Q (its pre-projection
  output m, head_dim wide, through the out projection, LayerScale and any inner norm: Q fixed), so its effect is
  `head_out @ readout` with head_out = Σ_t (π(t)/σ_t) m_t / s (dh numbers, s the pooled norms' σ) and readout
  = γ ⊙ C Q through the post steps, as for a class-token ViT.
- **attention pool** (timm's MAP head `AttentionPoolLatent`, open_clip's `AttentionalPooler`): one learned query
  attends over the normed tokens with weights a_g(t) per pool head g. A component reaches the pool's output as
  Σ_g W_o^g W_v^g γ ⊙ C Σ_t (a_g(t)/σ_t) c_t: the weights differ per pool head, so a block head's effect is not
  one dh-vector times a fixed matrix, and it is stored in joint space (D numbers; `HEAD_SPACE_JOINT`). The pool's
  own split `pool.H{g}` = W_o^g W_v^g Σ_t a_g(t) (x_t − β) is in head space (the pool head's dh numbers), and a
  MAP head's MLP on the pooled vector is one more component, `pool.MLP`.

Nothing here runs a model: the tower modules (`vit.timm_vit`, `vit.decompose`) hook the real forward and pass the
tensors it computed; this module only does the frozen linear algebra, in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from clipterm.errors import ClipTermError, ExitCode

HEAD_SPACE_JOINT = "joint"  # manifest shape["head_space"]: heads stored as D-dim joint-space effects, readout = I


def projection_reason(visual: nn.Module) -> str | None:
    """Why a timm tower's projection head (open_clip's `visual.head`) is not linear, or None when it is."""
    for name, module in visual.head.named_children():
        if not isinstance(module, (nn.Linear, nn.Dropout, nn.Identity)):
            return f"the projection head's {name} is {type(module).__name__} (timm_proj='mlp' is not linear)"
    return None


def unsupported(name: str, reason: str) -> ClipTermError:
    return ClipTermError(f"{name} is not supported: {reason}", hint="see docs/models.md for what decomposes and why",
                         code=ExitCode.UNSUPPORTED)


def check_tower(model, name: str, is_kind, kind: str, reason_of) -> None:
    """Refuse `model` unless `is_kind(model)` and `reason_of(model)` finds nothing unsupported in it."""
    if not is_kind(model):
        raise unsupported(name, f"{type(getattr(model, 'visual', model)).__name__} is not {kind}")
    reason = reason_of(model)
    if reason:
        raise unsupported(name, reason)


# --------------------------------------------------------------------------- linearised norms


@dataclass
class Norm:
    """A LayerNorm (centred) or RMSNorm over the last axis, linearised per input: x ↦ γ ⊙ C x / σ(x) + β."""

    gamma: Tensor  # (W,) fp32
    beta: Tensor  # (W,) fp32
    eps: float
    centred: bool  # LayerNorm subtracts the mean; RMSNorm does not

    @classmethod
    def of(cls, module: nn.Module | None, width: int, device, what: str = "norm") -> Norm | None:
        """The norm a module computes, or None for an identity; any other module is refused by name."""
        if module is None or isinstance(module, (nn.Identity, nn.Dropout)):
            return None
        ones = torch.ones(width, device=device)
        weight = getattr(module, "weight", None)
        bias = getattr(module, "bias", None)
        gamma = weight.detach().float().reshape(-1) if weight is not None else ones
        beta = bias.detach().float().reshape(-1) if bias is not None else torch.zeros_like(ones)
        if isinstance(module, nn.LayerNorm):  # open_clip's LayerNorm(Fp32), timm's LayerNorm and LayerNorm2d
            if tuple(module.normalized_shape) != (width,):
                raise unsupported("model", f"{what} normalises over {tuple(module.normalized_shape)}, not the width {width}")
            return cls(gamma, beta, float(module.eps), True)
        rms = [getattr(nn, "RMSNorm", None)]
        try:
            from timm.layers import RmsNorm

            rms.append(RmsNorm)
        except ImportError:  # pragma: no cover - timm is a dependency
            pass
        if any(kind is not None and isinstance(module, kind) for kind in rms):
            eps = module.eps if module.eps is not None else torch.finfo(torch.float32).eps
            return cls(gamma, torch.zeros_like(ones), float(eps), False)
        raise unsupported("model", f"{what} is {type(module).__name__}, not a LayerNorm, RMSNorm or identity")

    def sigma(self, x: Tensor) -> Tensor:
        """σ of each vector of the real input x (..., W), fp32: what the forward divided by."""
        x = x.float()
        if self.centred:
            return (x.var(-1, unbiased=False) + self.eps).sqrt()
        return (x.pow(2).mean(-1) + self.eps).sqrt()

    def linear(self, x: Tensor) -> Tensor:
        """γ ⊙ C x along the last axis (no σ, no β)."""
        return (x - x.mean(-1, keepdim=True) if self.centred else x) * self.gamma


def norm_linear(norm: Norm | None, x: Tensor) -> Tensor:
    return x if norm is None else norm.linear(x)


# --------------------------------------------------------------------------- affine steps after pooling


@dataclass
class Step:
    """One step on the pooled vector: a linearised norm (its σ read from the real input) or a linear map."""

    norm: Norm | None = None
    weight: Tensor | None = None  # (out, in) fp32
    bias: Tensor | None = None  # (out,) fp32


@dataclass
class Post:
    """The affine map from the pooled vector to the embedding: y = x @ matrix / scale + offset, per image."""

    steps: list[Step]
    width: int  # the pooled vector's width
    device: torch.device | str = "cpu"

    @property
    def matrix(self) -> Tensor:
        """(width, D) fp32: the linear part with every σ set to 1."""
        x = torch.eye(self.width, device=self.device)
        for step in self.steps:
            x = step.norm.linear(x) if step.norm is not None else x @ step.weight.T
        return x

    @property
    def norms(self) -> int:
        return sum(step.norm is not None for step in self.steps)

    def scale(self, sigmas: list[Tensor], batch: int, device) -> Tensor:
        """(B,) the product of the post norms' σ (1 without any)."""
        scale = torch.ones(batch, device=device)
        for sigma in sigmas:
            scale = scale * sigma.float().reshape(batch)
        return scale

    def offset(self, sigmas: list[Tensor], batch: int, device) -> Tensor:
        """(B, D) the embedding of a zero pooled vector: every β and bias after the pool, through what follows."""
        x = torch.zeros(batch, self.width, device=device)
        norms = iter(sigmas)
        for step in self.steps:
            if step.norm is not None:
                x = step.norm.linear(x) / next(norms).float().reshape(batch, 1) + step.norm.beta
            else:
                x = x @ step.weight.T + (step.bias if step.bias is not None else 0.0)
        return x


def post_steps(modules: list[tuple[str, nn.Module]], width: int, device) -> list[Step]:
    """Affine steps from the modules that follow the pool, in order; dropout and identities are skipped.

    A module that is neither a norm, a linear map nor an identity (an MLP head, an activation) is refused by name:
    after it, the embedding is no longer affine in the pooled vector."""
    steps = []
    for what, module in modules:
        if module is None or isinstance(module, (nn.Identity, nn.Dropout, nn.Flatten)):
            continue
        if isinstance(module, nn.Sequential):
            steps += post_steps([(f"{what}.{name}", child) for name, child in module.named_children()], width, device)
            width = _out_width(steps, width)
            continue
        if isinstance(module, nn.Linear):
            steps.append(Step(weight=module.weight.detach().float(),
                              bias=module.bias.detach().float() if module.bias is not None else None))
            width = module.out_features
            continue
        if isinstance(module, nn.Parameter) or torch.is_tensor(module):  # open_clip's `proj` (in, out)
            steps.append(Step(weight=module.detach().float().T))
            width = module.shape[1]
            continue
        steps.append(Step(norm=Norm.of(module, width, device, what)))
    return [step for step in steps if step.norm is not None or step.weight is not None]


def _out_width(steps: list[Step], width: int) -> int:
    for step in reversed(steps):
        if step.weight is not None:
            return step.weight.shape[0]
    return width


# --------------------------------------------------------------------------- pools


@dataclass
class TokenPool:
    """Class-token (`token`) or average (`avg`) pooling: fixed weights π over the stream's tokens."""

    kind: str  # "token" | "avg"
    start: int = 0  # avg: the first pooled token (prefix tokens are skipped)

    def weights(self, tokens: int, device) -> Tensor:
        pi = torch.zeros(tokens, device=device)
        if self.kind == "token":
            pi[0] = 1.0
        else:
            pi[self.start:] = 1.0 / (tokens - self.start)
        return pi  # (N,)


@dataclass
class AttnPool:
    """One query's attention over the (normed) tokens, in fp32: values W_v^g, output W_o^g per pool head g."""

    w_v: Tensor  # (G, dh', W) per pool head
    b_v: Tensor  # (G, dh')
    w_o: Tensor  # (W_out, G, dh')
    b_o: Tensor  # (W_out,)
    start: int = 0  # the first stream token the pool sees
    mlp: bool = False  # a MAP head: x + mlp(norm(x)) after the attention (`pool.MLP`)

    @property
    def heads(self) -> int:
        return self.w_v.shape[0]

    @property
    def head_dim(self) -> int:
        return self.w_v.shape[1]


# --------------------------------------------------------------------------- the plan: what is fixed per model


@dataclass
class Plan:
    """Everything fixed for a model: how each layer's heads enter the stream, and how the stream reaches the embedding.

    `head_maps[l, h]` (dh, W) maps head h's pre-projection output m (dh) to its per-token stream contribution
    (out projection, inner norm's γ and centring, LayerScale: all fixed); `stream_bias[l]` (W,) is the constant each
    layer's attention adds at every token (out-projection bias, inner norm's β, LayerScale)."""

    head_maps: Tensor  # (L, H, dh, W) fp32
    stream_bias: Tensor  # (L, W) fp32
    norm: Norm | None  # per-token norm before the pool
    pool: TokenPool | AttnPool
    post: Post
    inner_norms: list[Norm | None] = field(default_factory=list)  # per layer: a norm over the merged heads

    @property
    def layers(self) -> int:
        return self.head_maps.shape[0]

    @property
    def heads(self) -> int:
        return self.head_maps.shape[1]

    @property
    def joint(self) -> bool:
        """True when block heads are stored as joint-space effects (an attention pool)."""
        return isinstance(self.pool, AttnPool)

    def readout(self) -> Tensor:
        """(L, H, dh, D) fp32 for token/avg pooling; (1, 1, D, D), the identity, when heads are stored in joint space."""
        matrix = self.post.matrix  # (W_pool, D)
        if self.joint:
            return torch.eye(matrix.shape[1], device=matrix.device)[None, None]  # (1, 1, D, D)
        return norm_linear(self.norm, self.head_maps) @ matrix  # (L, H, dh, D)

    def pool_readout(self) -> Tensor | None:
        """(G, dh', D) fp32: pool head g's head-space output through W_o^g and the post steps (None: no attention pool)."""
        if not self.joint:
            return None
        return torch.einsum("ogd,oe->gde", self.pool.w_o, self.post.matrix)  # (G, dh', D)


# --------------------------------------------------------------------------- the split of one batch


@dataclass
class Stream:
    """What the real forward computed, per token, for one batch (any dtype; made fp32 here)."""

    embed: Tensor  # (B, N, W) the stream entering the first block
    heads: list[Tensor]  # per layer (B, N, H, dh): pre-projection head outputs m, already divided by any inner σ
    mlps: list[Tensor]  # per layer (B, N, W): what each MLP added to the stream
    final: Tensor  # (B, N, W) the stream after the last block
    image_embeds: Tensor  # (B, D) the model's own output
    post_sigmas: list[Tensor]  # σ of each post norm, (B,) each, from its real input
    pool_tokens: Tensor | None = None  # (B, Np, W_in) the attention pool's real (normed) input
    pool_attn: Tensor | None = None  # (B, G, Np) the pool's attention weights of the query that is kept
    pool_mlp: Tensor | None = None  # (B, W_out) a MAP head's MLP output on the pooled vector
    token_bias: Tensor | None = None  # (B, N, W) biases that differ per token (a post-norm block's, after its σ)


@dataclass
class Split:
    head_out: Tensor  # (B, L, H, dh) head space, or (B, L, H, D) joint space for an attention pool
    embed: Tensor  # (B, D)
    bias: Tensor  # (B, D)
    mlps: Tensor  # (B, L(+1), D): an attention pool's MLP is the last slot
    ln_scale: Tensor  # (B,)
    image_embeds: Tensor  # (B, D)
    pool_heads: Tensor | None = None  # (B, G, dh')
    pool_bias: Tensor | None = None  # (B, D)


def split(plan: Plan, stream: Stream) -> Split:
    """The exact direct effects of one batch, fp32, from the real forward's per-token tensors."""
    with torch.no_grad(), torch.autocast(stream.final.device.type, enabled=False):
        return _split_attn(plan, stream) if plan.joint else _split_tokens(plan, stream)


def _token_weights(plan: Plan, stream: Stream) -> tuple[Tensor, Tensor]:
    """(B, N) weights w(t) = π(t) / σ_t of the per-token norm, and (B,) σ at the class token (1 if no norm)."""
    final = stream.final
    batch, tokens, _ = final.shape
    pi = plan.pool.weights(tokens, final.device)  # (N,)
    sigma = plan.norm.sigma(final) if plan.norm is not None else torch.ones(batch, tokens, device=final.device)  # (B, N)
    return pi / sigma, sigma[:, 0]


def _split_tokens(plan: Plan, stream: Stream) -> Split:
    weights, cls_sigma = _token_weights(plan, stream)  # (B, N), (B,)
    batch, device = weights.shape[0], weights.device
    post = plan.post
    scale = post.scale(stream.post_sigmas, batch, device)  # (B,)
    matrix = post.matrix  # (W, D)

    def joint(pooled: Tensor) -> Tensor:  # (B, *, W) pooled stream vectors -> (B, *, D)
        return norm_linear(plan.norm, pooled) @ matrix / scale.view(-1, *[1] * (pooled.dim() - 1))

    pool = lambda x: torch.einsum("bn,bn...->b...", weights, x.float())
    head_out = torch.stack([pool(m) for m in stream.heads], 1) / scale.view(-1, 1, 1, 1)  # (B, L, H, dh)
    mlps = joint(torch.stack([pool(m) for m in stream.mlps], 1))  # (B, L, D)
    total = weights.sum(1, keepdim=True)  # (B, 1): Σ_t π(t)/σ_t
    beta = plan.norm.beta if plan.norm is not None else torch.zeros(matrix.shape[0], device=device)
    bias = joint(total * plan.stream_bias.sum(0)) + beta @ matrix / scale[:, None] + post.offset(stream.post_sigmas, batch, device)
    if stream.token_bias is not None:
        bias = bias + joint(pool(stream.token_bias))
    token = isinstance(plan.pool, TokenPool) and plan.pool.kind == "token"
    return Split(head_out=head_out, embed=joint(pool(stream.embed)), bias=bias, mlps=mlps,
                 ln_scale=scale * (cls_sigma if token else 1.0), image_embeds=stream.image_embeds.float())


def _split_attn(plan: Plan, stream: Stream) -> Split:
    pool, post = plan.pool, plan.post
    attn = stream.pool_attn.float()  # (B, G, Np)
    final = stream.final[:, pool.start:]  # (B, Np, W)
    batch, device = attn.shape[0], attn.device
    sigma = plan.norm.sigma(final) if plan.norm is not None else torch.ones(final.shape[:2], device=device)  # (B, Np)
    weights = attn / sigma[:, None]  # (B, G, Np): a_g(t) / σ_t
    scale = post.scale(stream.post_sigmas, batch, device)  # (B,)
    to_joint = torch.einsum("ogd,oe->gde", pool.w_o, post.matrix)  # (G, dh', D): W_o^g then the post steps

    def through_pool(pooled: Tensor) -> Tensor:  # (B, G, *, W) per pool head -> (B, *, D)
        values = torch.einsum("bg...w,gdw->bg...d", norm_linear(plan.norm, pooled), pool.w_v)  # (B, G, *, dh')
        return torch.einsum("bg...d,gde->b...e", values, to_joint) / scale.view(-1, *[1] * (pooled.dim() - 2))

    def pooled(x: Tensor) -> Tensor:  # (B, N, ...) -> (B, G, ...)
        return torch.einsum("bgn,bn...->bg...", weights, x[:, pool.start:].float())

    heads = []
    for layer, m in enumerate(stream.heads):
        per_head = pooled(m)  # (B, G, H, dh)
        heads.append(through_pool(torch.einsum("bghd,hdw->bghw", per_head, plan.head_maps[layer])))  # (B, H, D)
    mlps = [through_pool(pooled(m)) for m in stream.mlps]  # (B, D) each
    pool_mlp = stream.pool_mlp.float() @ post.matrix / scale[:, None] if pool.mlp else None  # (B, D)
    offset = post.offset(stream.post_sigmas, batch, device)  # (B, D)
    beta = plan.norm.beta if plan.norm is not None else torch.zeros(pool.w_v.shape[-1], device=device)
    own = torch.einsum("gdw,w->gd", pool.w_v, beta) + pool.b_v  # (G, dh'): W_v β + b_v, the same for every token
    pool_bias = torch.einsum("gd,gde->e", own, to_joint) / scale[:, None] + pool.b_o @ post.matrix / scale[:, None] + offset
    total = weights.sum(-1)  # (B, G): Σ_t a_g(t)/σ_t
    stream_bias = through_pool(total[..., None] * plan.stream_bias.sum(0))  # (B, D)
    if stream.token_bias is not None:
        stream_bias = stream_bias + through_pool(pooled(stream.token_bias))
    content = torch.einsum("bgn,bnw->bgw", attn, stream.pool_tokens.float()) - beta  # (B, G, W): Σ_t a_g(t) (x_t − β)
    pool_heads = torch.einsum("bgw,gdw->bgd", content, pool.w_v) / scale[:, None, None]  # (B, G, dh')
    mlp_parts = mlps + ([pool_mlp] if pool_mlp is not None else [])
    return Split(
        head_out=torch.stack(heads, 1),  # (B, L, H, D)
        embed=through_pool(pooled(stream.embed)),  # (B, D)
        bias=stream_bias + pool_bias,  # (B, D)
        mlps=torch.stack(mlp_parts, 1),  # (B, L(+1), D)
        ln_scale=scale,  # (B,)
        image_embeds=stream.image_embeds.float(),  # (B, D)
        pool_heads=pool_heads,  # (B, G, dh')
        pool_bias=pool_bias,  # (B, D)
    )


def check_sum(parts: Split, plan: Plan | None, name: str, fp32: bool) -> None:
    """Refuse a split that does not add up: the library's forward changed under clipterm's hooks.

    The tolerance is loose (1e-3 in fp32, 0.1 under reduced precision): it catches a structural change, whose error
    is of the order of the embedding itself, not rounding. (Heads in head space are summed through the head maps,
    Σ head_out @ readout = normlin(Σ head_out @ Q) @ P, without forming the (L, H, dh, D) readout.)"""
    with torch.no_grad(), torch.autocast(parts.embed.device.type, enabled=False):
        if parts.head_out.numel() == 0 or plan is None:
            heads = torch.zeros_like(parts.embed)
        elif plan.joint:
            heads = parts.head_out.sum((1, 2))
        else:
            stream = torch.einsum("blhd,lhdw->bw", parts.head_out, plan.head_maps)  # (B, W)
            heads = norm_linear(plan.norm, stream) @ plan.post.matrix  # (B, D)
    total = parts.embed + parts.bias + heads + parts.mlps.sum(1)  # (B, D)
    error = float((total - parts.image_embeds).norm() / parts.image_embeds.norm().clamp_min(1e-12))
    if error > (1e-3 if fp32 else 0.1):
        raise ClipTermError(
            f"the decomposition of {name} does not add up to its embedding (relative error {error:.2g})",
            hint="the installed timm or open_clip computes this tower differently from what clipterm hooks; "
                 "please report it with `clipterm doctor`'s versions",
            code=ExitCode.UNSUPPORTED,
        )
