"""The exact decomposition of an open_clip ModifiedResNet's image embedding through its attention pool.

Radford et al., "Learning Transferable Visual Models From Natural Language Supervision" (2021) end
the ResNet in `AttentionPool2d` and nothing after it (no LayerNorm, no projection); Goh et al.,
"Multimodal Neurons in Artificial Neural Networks" (Distill 2021) read the last stage's channels
through it. With z_t (C,) the last stage's output at spatial token t = 1..T, the pool's tokens are
x_0 = mean_t z_t + p_0 and x_t = z_t + p_t (p the positional embedding); the one query is x_0, and

    embed = Σ_h W_c^h Σ_t a_h(t) (W_v^h x_t + b_v^h) + b_c
          = Σ_h W_c^h W_v^h Σ_t a_h(t) z̃_t      (pool.H{h}: image content; z̃_0 = mean z, z̃_t = z_t)
          + Σ_h W_c^h W_v^h Σ_t a_h(t) p_t      (pool.pos: the positional embedding's share)
          + W_c b_v + b_c                       (pool.bias: Σ_t a_h(t) = 1 makes it the same for every image)

with a_h(t) the attention weights of the real forward, frozen. pool.H{h} is stored in head space,
head_out[h] = W_v^h Σ_t a_h(t) z̃_t (dh,), with readout[h] = W_c^hᵀ (dh, D). Channel c of z splits
every head exactly: pool.H{h} = Σ_c W_c^h W_v^h[:, c] · s_h[c] with s_h[c] = Σ_t a_h(t) z̃_t[c], so
the channel-as-neuron `L{last}.N{c}` has effect Σ_h W_c^h W_v^h[:, c] s_h[c], and the channels add
up to the heads: pool.pos + pool.bias + Σ_h pool.H{h} = pool.pos + pool.bias + Σ_c L{last}.N{c}.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from clipterm import names
from clipterm.errors import ClipTermError, ExitCode
from clipterm.vit.climb import Climb, Recorder, Term
from clipterm.vit.decompose import Decomposition, vision_tower
from clipterm.vit.second_order import NeuronPass

CONVENTION = (
    "ModifiedResNet attention pool with its attention frozen per image: pool.H{h} the image content through head h "
    "(mean token included), pool.pos the positional embedding's share (stored as `embed`), pool.bias W_c b_v + b_c "
    "(stored as `bias`); no normalisation, ln_scale is 1"
)
STAGES = 4  # open_clip's layer1..layer4; the channels of the last (L3) are the neurons


@dataclass
class PoolDecomposition(Decomposition):
    """A ResNet's split, laid out as a one-layer ViT's: `embed` is pool.pos, `bias` pool.bias, no MLPs.

    `neurons` (B, 1, C) holds each channel's mean activation over the grid; `channels` (B, H, C) holds
    s_h[c] = Σ_t a_h(t) z̃_t[c], what a channel's effect needs (`channel_effects`)."""

    channels: Tensor | None = None  # (B, H, C)


def is_resnet(model) -> bool:
    from open_clip.modified_resnet import ModifiedResNet

    return isinstance(vision_tower(model), ModifiedResNet)


def check_supported(model, name: str = "model") -> None:
    """Refuse any tower that is not an open_clip ModifiedResNet ending in AttentionPool2d."""
    from open_clip.modified_resnet import AttentionPool2d

    pool = getattr(vision_tower(model), "attnpool", None)
    if not is_resnet(model) or not isinstance(pool, AttentionPool2d):
        raise ClipTermError(f"{name} is not supported: not an open_clip ModifiedResNet with an attention pool",
                            hint="see docs/models.md", code=ExitCode.UNSUPPORTED)


def pool_weights(model) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    """W_v per head (H, dh, C), b_v (C,), W_c (D, C), b_c (D,) and H, in fp32."""
    pool = vision_tower(model).attnpool
    heads, width = pool.num_heads, pool.v_proj.in_features
    w_v = pool.v_proj.weight.float().view(heads, width // heads, width)  # (H, dh, C)
    return w_v, pool.v_proj.bias.float(), pool.c_proj.weight.float(), pool.c_proj.bias.float(), heads


def readout(model) -> Tensor:
    """(1, H, dh, D) fp32: `head_out[:, 0, h] @ R[0, h]` is pool.H{h} in joint space (R_h = W_c^hᵀ)."""
    _, _, w_c, _, heads = pool_weights(model)
    return w_c.T.reshape(heads, -1, w_c.shape[0]).unsqueeze(0)  # (1, H, dh, D)


def channel_basis(model, channels: Tensor) -> Tensor:
    """(H, k, D): U[h, j] = W_c^h W_v^h[:, channels[j]], so a channel's effect is Σ_h s_h[c] U[h, c]."""
    w_v, *_ = pool_weights(model)
    return torch.einsum("hdk,hde->hke", w_v[:, :, channels], readout(model)[0])  # (H, k, D)


def channel_effects(model, channels_pooled: Tensor, channels: Tensor) -> Tensor:
    """(B, k, D) the direct effect of each chosen channel, from `PoolDecomposition.channels` (B, H, C)."""
    basis = channel_basis(model, channels)  # (H, k, D)
    return torch.einsum("bhk,hke->bke", channels_pooled[:, :, channels].float(), basis)  # (B, k, D)


def attention_weights(pool, tokens: Tensor) -> Tensor:
    """The mean token's attention over all tokens (B, H, 1+T), in fp32, as `F.multi_head_attention_forward` forms it."""
    heads, width = pool.num_heads, tokens.shape[-1]
    batch = tokens.shape[0]
    q = F.linear(tokens[:, :1], pool.q_proj.weight.float(), pool.q_proj.bias.float())  # (B, 1, C)
    k = F.linear(tokens, pool.k_proj.weight.float(), pool.k_proj.bias.float())  # (B, 1+T, C)
    q = q.view(batch, 1, heads, width // heads).transpose(1, 2)  # (B, H, 1, dh)
    k = k.view(batch, -1, heads, width // heads).transpose(1, 2)  # (B, H, 1+T, dh)
    return (q @ k.transpose(-1, -2) * (width // heads) ** -0.5).softmax(-1)[:, :, 0]  # (B, H, 1+T)


def last_stage(model, images: Tensor) -> Tensor:
    """The last stage's output (B, C, h, w): what the attention pool reads, from the model's own forward."""
    pool, seen = vision_tower(model).attnpool, {}
    hook = pool.register_forward_hook(lambda _module, args, _output: seen.__setitem__("grid", args[0]))
    weight = vision_tower(model).conv1.weight
    try:
        with torch.no_grad():
            vision_tower(model)(images.to(device=weight.device, dtype=weight.dtype))
    finally:
        hook.remove()
    return seen["grid"]  # (B, C, h, w)


def check_stored(model, neurons: bool, token_layers=()) -> None:
    """Refuse what a ResNet cache cannot store (a build checks this before it writes anything)."""
    if any(layer != 0 for layer in token_layers):  # the pool is the one stored attention layer
        raise ClipTermError("a ResNet stores per-token maps for its pool only", hint="use --tokens all",
                            code=ExitCode.USAGE)


def decompose(model, images: Tensor, neurons: bool = False, token_layers=()) -> PoolDecomposition:
    """Split the embeddings of a batch (B, 3, S, S): the real trunk and pool run once, the pool's input is hooked."""
    visual = vision_tower(model)
    check_supported(model)
    if visual.training:
        raise ValueError("decompose() needs model.eval(): BatchNorm in training mode would change the split")
    check_stored(model, neurons, token_layers)
    pool, seen = visual.attnpool, {}

    def keep_input(_module, args, _output) -> None:  # returning None leaves the output alone
        seen["grid"] = args[0]  # (B, C, h, w)

    hook = pool.register_forward_hook(keep_input)
    weight = visual.conv1.weight
    try:
        with torch.no_grad():
            image_embeds = visual(images.to(device=weight.device, dtype=weight.dtype))  # (B, D)
    finally:
        hook.remove()
    with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
        grid = seen["grid"].float().flatten(2).transpose(1, 2)  # (B, T, C)
        content = torch.cat([grid.mean(1, keepdim=True), grid], 1)  # (B, 1+T, C): z̃, the mean token first
        positional = pool.positional_embedding.float()  # (1+T, C)
        attn = attention_weights(pool, content + positional)  # (B, H, 1+T)
        w_v, b_v, w_c, b_c, _ = pool_weights(model)
        pooled = torch.einsum("bht,btc->bhc", attn, content)  # (B, H, C): s_h[c]
        pos_pooled = attn @ positional  # (B, H, C)
        head_out = torch.einsum("bhc,hdc->bhd", pooled, w_v)  # (B, H, dh)
        pos_out = torch.einsum("bhc,hdc->bhd", pos_pooled, w_v)  # (B, H, dh)
        read = readout(model)[0]  # (H, dh, D)
        batch = grid.shape[0]
        tokens = {}
        if token_layers:  # pool.H{h} per source token, mean token first: they sum over tokens to head_out
            values = torch.einsum("btc,hdc->bhtd", content, w_v)  # (B, H, 1+T, dh)
            tokens[0] = attn[..., None] * values  # (B, H, 1+T, dh)
        return PoolDecomposition(
            head_out=head_out.unsqueeze(1),  # (B, 1, H, dh)
            embed=torch.einsum("bhd,hde->be", pos_out, read),  # (B, D): pool.pos
            bias=(w_c @ b_v + b_c).expand(batch, -1).clone(),  # (B, D): pool.bias
            mlps=head_out.new_zeros(batch, 0, w_c.shape[0]),  # (B, 0, D): a ResNet has none
            ln_scale=head_out.new_ones(batch),  # (B,)
            image_embeds=image_embeds.float(),  # (B, D)
            neurons=grid.mean(1).unsqueeze(1) if neurons else None,  # (B, 1, C)
            tokens=tokens,  # layer 0 -> (B, H, 1+T, dh)
            channels=pooled,  # (B, H, C)
        )


# --------------------------------------------------------------------------- channels as neurons (the neurons file)
# The neurons machinery (cache/neurons.py) wants effect_c = Σ_k scalars[c, k] · vectors[c, k]: here the K paths
# are the pool heads, scalars[c, h] = s_h[c] and vectors[c, h] = W_c^h W_v^h[:, c]. The effect is direct (the
# channel reaches the embedding only through the pool), so the same file holds each channel's exact effect.


def check_layer(n_layers: int, layer: int) -> None:
    """Only the last stage's channels are read by the pool (`n_layers` is the ViT-shaped signature's, unused)."""
    if layer != STAGES - 1:
        raise ClipTermError(f"{names.layer(layer)} is not this ResNet's last stage: only its channels reach the pool",
                            hint=f"use {names.layer(STAGES - 1)}", code=ExitCode.USAGE)


def paths(n_layers: int, n_heads: int, layer: int) -> list[str]:
    """The K paths of a channel: the pool's heads, ["pool.H0", ...]."""
    return [names.pool_head(h) for h in range(n_heads)]


def check_convention(convention: str) -> None:
    """A ResNet's channels have one exact split; the reference convention is second_order_lens' for ViTs."""
    if convention != "clipterm":
        raise ClipTermError(f"--convention {convention} is for ViT neurons (second_order_lens); a ResNet's channels "
                            "reach the embedding directly through the pool", hint="drop --convention", code=ExitCode.USAGE)


def path_vectors(model, layer: int, convention: str = "clipterm") -> Tensor:
    """(C, H, D) fp32: vectors[c, h] = W_c^h W_v^h[:, c]."""
    check_layer(STAGES, layer)
    check_convention(convention)
    w_v, *_ = pool_weights(model)
    return torch.einsum("hdc,hde->che", w_v, readout(model)[0])  # (C, H, D)


def trace(model, images: Tensor, layer: int, convention: str = "clipterm") -> NeuronPass:
    """One pass: scalars (B, C, H) = s_h[c], activations (B, C) = each channel's mean over the grid."""
    check_layer(STAGES, layer)
    check_convention(convention)
    parts = decompose(model, images, neurons=True)
    return NeuronPass(scalars=parts.channels.transpose(1, 2), activations=parts.neurons[:, 0],  # (B, C, H), (B, C)
                      image_embeds=parts.image_embeds, ln_scale=parts.ln_scale)  # (B, D), (B,)


# --------------------------------------------------------------------------- feature visualisation (vit/climb.py)


class RedirectedReLU(torch.autograd.Function):
    """relu(x), whose gradient where ReLU's own is zero for a whole image passes through wherever it would not push a
    negative input lower (lucid's redirected ReLU gradient); the values are ReLU's."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        relu_grad = torch.where(x < 0, torch.zeros_like(grad), grad)
        redirected = torch.where((x < 0) & (grad > 0), torch.zeros_like(grad), grad)  # descent would lower x
        passed = relu_grad.flatten(1).norm(dim=1) > 0  # (B,): images whose ReLU gradient is not all zero
        return torch.where(passed.view(-1, *[1] * (x.dim() - 1)), relu_grad, redirected)


class ResNetClimb(Climb):
    """The climb of a ModifiedResNet: channels `L{s}.N{c}` of any stage (activation: the mean over the grid; effect:
    a last-stage channel's direct effect through the pool, Σ_h s_h[c] W_c^h W_v^h[:, c], along its direction), pool
    heads `pool.H{h}` (effect: W_c^h W_v^h Σ_t a_h(t) z̃_t along the head's direction). The attention a_h is the
    pool's own, recomputed differentiably from the recorded grid. A facet reads a stage's output, position by
    position (B, h·w, C); the layers are the stages, and a pool head sits above them all (layer `STAGES`)."""

    class_token = False

    def __init__(self, loaded):
        super().__init__(loaded)
        self.layers = STAGES
        self.stages = [getattr(self.visual, f"layer{k + 1}") for k in range(STAGES)]

    def channels(self, stage: int) -> int:
        """How many channels stage `stage` has (its last block's output)."""
        return self.stages[stage][-1].bn3.num_features

    def tokens(self, acts: Tensor) -> Tensor:
        return acts.flatten(2).transpose(1, 2)  # (B, h·w, C)

    def unit_site(self, component):
        return self.stages[component.layer], 1, component.index  # a stage's output (B, C, h, w), channel c

    def unit_term(self, component, kind: str, sign: int, direction):
        if component.kind == "head":
            if kind == "activation":
                raise ClipTermError(f"{component} is a pool head: it has an effect, not an activation",
                                    hint="use --objective effect or direction", code=ExitCode.USAGE)
            return Term(sign, "pool_effect", direction(component), STAGES, component.index)
        if not 0 <= component.index < self.channels(component.layer):
            raise ClipTermError(f"no channel {component.index} in stage {names.layer(component.layer)} "
                                f"({self.channels(component.layer)} channels)", hint=f"use {names.neuron(component.layer, 0)}"
                                f"..{names.neuron(component.layer, self.channels(component.layer) - 1)}", code=ExitCode.USAGE)
        if kind == "activation":
            return Term(sign, "channel_activation", None, component.layer, component.index)
        check_layer(STAGES, component.layer)
        return Term(sign, "channel_effect", direction(component), component.layer, component.index)

    def recorder(self, terms, blocks=frozenset()):
        """The stages the terms and `blocks` read, and every ReLU's gradient redirected (lucid's
        `redirected_relu_grad`): a channel that is 0 everywhere on the starting noise still gets a gradient."""
        stages = set(blocks) | {t.layer for t in terms if t.kind == "channel_activation"}
        if any(t.kind in ("pool_effect", "channel_effect") for t in terms):
            stages.add(STAGES - 1)  # the pool's input
        recorder = Recorder([(self.stages[s], "stage", s, False) for s in sorted(stages)])
        thread = recorder.thread

        def redirect(_module, inputs, output):
            if threading.get_ident() == thread and torch.is_grad_enabled():
                return RedirectedReLU.apply(inputs[0])
            return None

        for module in self.visual.modules():
            if isinstance(module, torch.nn.ReLU):  # open_clip's are in place: the hook needs their input intact
                recorder.undo.append(lambda module=module, was=module.inplace: setattr(module, "inplace", was))
                module.inplace = False
                recorder.hooks.append(module.register_forward_hook(redirect))
        return recorder

    def layer_acts(self, recorder, layer: int) -> Tensor:
        return recorder.saved[("stage", layer)]  # (B, C, h, w)

    def _pool(self, recorder) -> Tensor:
        """s_h[c] = Σ_t a_h(t) z̃_t[c] (B, H, C), with the pool's attention recomputed from the recorded grid."""
        pool = self.visual.attnpool
        grid = recorder.saved[("stage", STAGES - 1)].float().flatten(2).transpose(1, 2)  # (B, T, C)
        content = torch.cat([grid.mean(1, keepdim=True), grid], 1)  # (B, 1+T, C)
        attn = attention_weights(pool, content + pool.positional_embedding.float())  # (B, H, 1+T)
        return torch.einsum("bht,btc->bhc", attn, content)  # (B, H, C)

    def score(self, term, recorder, embeds: Tensor) -> Tensor:
        if term.kind == "channel_activation":
            return recorder.saved[("stage", term.layer)][:, term.index].float().mean((1, 2))  # (B,)
        pooled = self._pool(recorder)  # (B, H, C)
        direction = term.direction.to(pooled.device)  # (D,)
        if term.kind == "channel_effect":
            basis = channel_basis(self.model, torch.tensor([term.index]))[:, 0].to(pooled.device)  # (H, D)
            return pooled[:, :, term.index] @ (basis @ direction)  # (B,)
        w_v, *_ = pool_weights(self.model)  # (H, dh, C)
        along = w_v[term.index].to(pooled.device).T @ (readout(self.model)[0, term.index].to(pooled.device) @ direction)
        return pooled[:, term.index] @ along  # (B,): W_c^h W_v^h s_h · direction
