"""The exact decomposition: components add up to `encode_image`, heads match a naive per-head recomputation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clipterm.errors import ClipTermError, ExitCode
from clipterm.vit.decompose import CONVENTION, Decomposition, check_supported, decompose, readout

TEXT_CFG = dict(context_length=8, vocab_size=100, width=16, heads=2, layers=1)


def tiny_clip(quick_gelu: bool = False, **vision):
    """A seeded 3-layer ViT CLIP at 32 px, with every norm, bias and scale moved off its init value."""
    import open_clip

    torch.manual_seed(0)
    cfg = {**dict(image_size=32, patch_size=8, width=64, head_width=16, layers=3), **vision}
    model = open_clip.model.CLIP(embed_dim=24, vision_cfg=cfg, text_cfg=TEXT_CFG, quick_gelu=quick_gelu).eval()
    for name, param in model.visual.named_parameters():
        if param.dim() == 1 or name.endswith(("head_scale", "logit_scale")):
            param.data.mul_(torch.empty_like(param).uniform_(0.5, 1.5)).add_(0.1 * torch.randn_like(param))
    return model


def images(n: int = 3, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))  # (n, 3, S, S)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def assert_exact(model, batch: torch.Tensor, **kwargs) -> Decomposition:
    """The contract: embed + bias + Σ head_out @ readout + Σ mlps == encode_image, within 1e-5 relative."""
    parts = decompose(model, batch, **kwargs)
    with torch.no_grad():
        expected = model.encode_image(batch)  # (B, D)
    assert rel(parts.summed(readout(model)), expected) < 1e-5
    assert rel(parts.image_embeds, expected) < 1e-5
    return parts


CONFIGS = {
    "default": {},
    "custom": dict(block_type="custom"),
    "qk_norm": dict(qk_norm=True),
    "scale_heads": dict(scale_heads=True),
    "layerscale": dict(ls_init_value=0.5),
    "layerscale_custom": dict(ls_init_value=0.5, block_type="custom", scale_heads=True),
    "no_ln_pre_final_ln_after_pool": dict(no_ln_pre=True, final_ln_after_pool=True),
    "scale_fc": dict(scale_fc=True),
}


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_components_sum_to_encode_image(config):
    model = tiny_clip(**config)
    parts = assert_exact(model, images(3))
    assert parts.head_out.shape == (3, 3, 4, 16)
    assert parts.mlps.shape == (3, 3, 24)
    assert parts.embed.shape == parts.bias.shape == parts.image_embeds.shape == (3, 24)
    assert parts.ln_scale.shape == (3,) and parts.neurons is None and parts.tokens == {}
    assert readout(model).shape == (3, 4, 16, 24)


def test_quick_gelu_and_batch_of_one():
    assert_exact(tiny_clip(quick_gelu=True), images(1))


def test_no_projection_gives_width_space_effects():
    model = tiny_clip()
    model.visual.proj = None
    parts = assert_exact(model, images(2))
    assert parts.embed.shape == (2, 64) and readout(model).shape == (3, 4, 16, 64)


def test_toy_model(toy):
    size = toy.info.image_size
    parts = assert_exact(toy.model, images(4, size))
    assert parts.head_out.shape == (4, toy.info.layers, toy.info.heads, toy.info.head_dim)


def test_random_vit_b_32_at_224px():
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32").eval()
    parts = assert_exact(model, images(2, 224))
    assert parts.head_out.shape == (2, 12, 12, 64) and parts.mlps.shape == (2, 12, 512)


# --------------------------------------------------------------------------- naive per-head recomputation


def naive_head_effects(model, batch: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Per-head joint-space effects (B, L, H, D) and per-token head outputs, from the model's own forward.

    Each block's input comes from a hook on open_clip's forward; the full N×N attention is formed,
    one head at a time, and checked to add up to the attention module's own output.
    """
    visual = model.visual
    blocks = visual.transformer.resblocks
    inputs, final = {}, {}
    hooks = [b.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0])) for i, b in enumerate(blocks)]
    hooks.append(visual.ln_post.register_forward_pre_hook(lambda m, a: final.__setitem__("r", a[0][:, 0])))
    with torch.no_grad():
        model.encode_image(batch)
    for hook in hooks:
        hook.remove()
    sigma = (final["r"].var(-1, unbiased=False) + visual.ln_post.eps).sqrt()  # (B,)
    gamma, beta, proj = visual.ln_post.weight, visual.ln_post.bias, visual.proj  # (W,), (W,), (W, D)
    effects, tokens = [], {}
    with torch.no_grad():
        for layer, block in enumerate(blocks):
            attn, normed = block.attn, block.ln_1(inputs[layer])  # (B, N, W)
            width, heads = normed.shape[-1], attn.num_heads
            dh = width // heads
            q, k, v = F.linear(normed, attn.in_proj_weight, attn.in_proj_bias).split(width, -1)  # (B, N, W) each
            if isinstance(attn, torch.nn.MultiheadAttention):
                own = attn(normed, normed, normed, need_weights=True, average_attn_weights=False)
                module_out, probs = own[0], own[1]  # (B, N, W), (B, H, N, N)
            else:
                module_out = attn(normed)  # (B, N, W)
            contributions = []
            for h in range(heads):
                cols = slice(h * dh, (h + 1) * dh)
                qh, kh, vh = q[..., cols], k[..., cols], v[..., cols]  # (B, N, dh)
                if isinstance(attn, torch.nn.MultiheadAttention):
                    weights = probs[:, h]  # (B, N, N)
                else:
                    qh, kh = attn.ln_q(qh), attn.ln_k(kh)
                    weights = (qh @ kh.transpose(-1, -2) / dh**0.5).softmax(-1)  # (B, N, N)
                per_token = weights[:, 0, :, None] * vh  # (B, T, dh)
                if getattr(attn, "head_scale", None) is not None:
                    per_token = per_token * attn.head_scale[h]
                tokens.setdefault(layer, []).append(per_token)
                contributions.append(per_token.sum(1) @ attn.out_proj.weight[:, cols].T)  # (B, W)
            contributions = torch.stack(contributions, 1)  # (B, H, W)
            own_cls = module_out[:, 0]  # (B, W)
            torch.testing.assert_close(contributions.sum(1) + attn.out_proj.bias, own_cls, rtol=1e-4, atol=1e-5)
            scaled = block.ls_1(contributions)  # (B, H, W)
            joint = (scaled - scaled.mean(-1, keepdim=True)) * gamma @ proj / sigma[:, None, None]  # (B, H, D)
            effects.append(joint)
            tokens[layer] = torch.stack(tokens[layer], 1) / sigma[:, None, None, None]  # (B, H, T, dh)
    return torch.stack(effects, 1), tokens  # (B, L, H, D)


HEAD_CONFIGS = {
    "default_layerscale": dict(ls_init_value=0.5),
    "custom": dict(block_type="custom"),
    "qk_norm": dict(qk_norm=True),
    "scale_heads": dict(scale_heads=True),
}


@pytest.mark.parametrize("config", HEAD_CONFIGS.values(), ids=HEAD_CONFIGS.keys())
def test_heads_and_tokens_match_naive_recomputation(config):
    model, batch = tiny_clip(**config), images(2)
    expected, expected_tokens = naive_head_effects(model, batch)
    parts = decompose(model, batch, token_layers=[0, 2])
    effects = torch.einsum("blhd,lhde->blhe", parts.head_out, readout(model))  # (B, L, H, D)
    torch.testing.assert_close(effects, expected, rtol=1e-4, atol=1e-5)
    assert sorted(parts.tokens) == [0, 2]
    for layer, per_token in parts.tokens.items():
        assert per_token.shape == (2, 4, 17, 16)  # (B, H, T, dh): 16 patches + CLS
        torch.testing.assert_close(per_token.sum(2), parts.head_out[:, layer], rtol=1e-5, atol=1e-6)
        if not config.get("scale_heads"):  # the naive tokens include head_scale; clipterm folds it into readout
            torch.testing.assert_close(per_token, expected_tokens[layer], rtol=1e-4, atol=1e-6)


def test_scaled_cosine_attention_heads():
    """open_clip 3.3's own forward fails on this option, so layer 0 is checked against the formula directly."""
    model, batch = tiny_clip(scaled_cosine_attn=True, layers=1), images(2)
    parts = decompose(model, batch)
    attn = model.visual.transformer.resblocks[0].attn
    with torch.no_grad():
        normed = model.visual.transformer.resblocks[0].ln_1(model.visual._embeds(batch))  # (B, N, W)
        q, k, v = F.linear(normed, attn.in_proj_weight, attn.in_proj_bias).view(2, 17, 3, 4, 16).unbind(2)
        cosine = torch.einsum("bhd,bthd->bht", F.normalize(q[:, 0], dim=-1), F.normalize(k, dim=-1))  # (B, H, T)
        weights = (cosine * attn.logit_scale.clamp(max=attn.logit_scale_max).exp().view(1, 4, 1)).softmax(-1)
        expected = torch.einsum("bht,bthd->bhd", weights, v)  # (B, H, dh)
    torch.testing.assert_close(parts.head_out[:, 0] * parts.ln_scale[:, None, None], expected, rtol=1e-5, atol=1e-6)
    assert rel(parts.summed(readout(model)), parts.image_embeds) < 1e-5


# --------------------------------------------------------------------------- neurons, precision, refusals


def test_neurons_equal_a_hook_on_the_activation():
    model, batch = tiny_clip(quick_gelu=True), images(2)
    seen = []
    for block in model.visual.transformer.resblocks:
        block.mlp.gelu.register_forward_hook(lambda m, a, out: seen.append(out[:, 0]))
    with torch.no_grad():
        model.encode_image(batch)
    parts = decompose(model, batch, neurons=True)
    assert parts.neurons.shape == (2, 3, 256)
    torch.testing.assert_close(parts.neurons, torch.stack(seen[:3], 1), rtol=1e-5, atol=1e-6)


def test_neurons_refused_with_scale_fc():
    with pytest.raises(ClipTermError, match="scale_fc") as error:
        decompose(tiny_clip(scale_fc=True), images(1), neurons=True)
    assert error.value.code == ExitCode.UNSUPPORTED


def test_bfloat16_autocast_stays_close_and_returns_fp32(toy):
    batch = images(2, toy.info.image_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        parts = decompose(toy.model, batch, neurons=True, token_layers=[1])
    assert {t.dtype for t in (parts.head_out, parts.mlps, parts.image_embeds, parts.neurons, parts.tokens[1])} == {
        torch.float32
    }
    assert rel(parts.summed(readout(toy.model)), parts.image_embeds) < 1e-2


POOLED = {
    "avg_ln_after_pool": dict(pool_type="avg", final_ln_after_pool=True, no_ln_pre=True),  # CLIPA
    "avg_ln_per_token": dict(pool_type="avg"),
    "attentional_pool": dict(attentional_pool=True, attn_pooler_queries=3, attn_pooler_heads=2),  # CoCa
    "attentional_pool_layerscale": dict(attentional_pool=True, attn_pooler_queries=2, attn_pooler_heads=4,
                                        ls_init_value=0.5, block_type="custom", scale_heads=True),
}


@pytest.mark.parametrize("config", POOLED.values(), ids=POOLED.keys())
def test_average_and_attentional_pools_sum_to_encode_image(config):
    """pool_type='avg' (ln_post per token or after the pool) and CoCa's attentional pooler: exact too."""
    from clipterm.vit.decompose import pool_readout

    model, batch = tiny_clip(**config), images(3)
    parts = assert_exact(model, batch)
    if config.get("attentional_pool"):  # joint-space heads (readout I) and the pool's own split
        heads = model.visual.attn_pool.attn.num_heads
        assert parts.head_out.shape == (3, 3, 4, 24) and parts.pool_heads.shape == (3, heads, 24 // heads)
        pooled = torch.einsum("bgd,gde->be", parts.pool_heads, pool_readout(model)) + parts.pool_bias
        assert rel(pooled, parts.image_embeds) < 1e-5
    else:
        assert parts.head_out.shape == (3, 3, 4, 16)


def test_the_untested_two_pool_coca_setup_is_refused():
    model = tiny_clip(attentional_pool="parallel", attn_pooler_queries=2, attn_pooler_heads=2)
    with pytest.raises(ClipTermError, match="parallel") as error:
        check_supported(model, "tiny-vit")
    assert error.value.code == ExitCode.UNSUPPORTED


REFUSED = {
    "scale_attn": (dict(scale_attn=True), "scale_attn=True"),
    "scale_attn_inner": (dict(scale_attn_inner=True), "scale_attn_inner=True"),
}


@pytest.mark.parametrize("vision, option", REFUSED.values(), ids=REFUSED.keys())
def test_unsupported_options_are_refused_by_name(vision, option):
    model = tiny_clip(**vision)
    with pytest.raises(ClipTermError) as error:
        check_supported(model, "tiny-vit")
    assert "tiny-vit" in error.value.message and option in error.value.message
    assert error.value.code == ExitCode.UNSUPPORTED
    with pytest.raises(ClipTermError, match=option.replace("(", r"\(")):
        decompose(model, images(1))


@pytest.mark.parametrize(
    "vision, what",
    [
        (dict(layers=[1, 1, 1, 1], width=8, head_width=8, image_size=32), "ModifiedResNet"),
        (dict(timm_model_name="vit_tiny_patch16_224", image_size=32), "TimmModel vision tower (not an open_clip ViT)"),
    ],
    ids=["modified_resnet", "timm"],
)
def test_non_vit_towers_are_refused(vision, what):
    import open_clip

    if "timm_model_name" in vision:
        pytest.importorskip("timm")
    model = open_clip.model.CLIP(embed_dim=16, vision_cfg=vision, text_cfg=TEXT_CFG)
    with pytest.raises(ClipTermError, match=what.replace("(", r"\(").replace(")", r"\)")):
        check_supported(model, "odd-tower")


def test_unknown_token_layer_is_a_usage_error():
    with pytest.raises(ClipTermError, match="L3") as error:
        decompose(tiny_clip(), images(1), token_layers=[3])
    assert error.value.code == ExitCode.USAGE


def test_convention_names_the_linearisation():
    assert "sigma" in CONVENTION and "gamma" in CONVENTION and "bias" in CONVENTION
