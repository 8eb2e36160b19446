"""Every open_clip image tower: decomposed exactly (components add up to the tower's own output within 1e-5), or
refused with a reason written down here. Random weights, shrunk (tests/tower_helpers.py), fp32.

Plus the checks that the sum alone cannot make: the pool view of an attention-pooled tower adds up too, and
mean-ablating one last-layer component in the real forward, with the final norm's σ and the pool's attention
frozen, moves the output by exactly that component's effect through the pool."""

from __future__ import annotations

import functools

import pytest
import torch
from tower_helpers import encode, images, tiny_tower, vision_key

from clipterm.errors import ClipTermError, ExitCode
from clipterm.vit.towers import tower_module

# Every arch that stays refused, with the words its reason must contain. An arch on neither side fails the sweep.
REFUSED = {
    "MobileCLIP-S1": "FastViT", "MobileCLIP-S2": "FastViT", "MobileCLIP2-S0": "FastViT", "MobileCLIP2-S2": "FastViT",
    "MobileCLIP2-S3": "FastViT", "MobileCLIP2-S4": "FastViT",
    "swin_base_patch4_window7_224": "Swin",
    "convnext_large_d": "timm_proj='mlp'", "convnext_large_d_320": "timm_proj='mlp'",
}
FAMILIES = ("SigLIP", "EVA", "CLIPA", "PE-Core", "coca", "ViTamin", "convnext")


def all_archs() -> list[str]:
    import open_clip

    return open_clip.list_models()


def reason(arch: str) -> str | None:
    import open_clip

    from clipterm.vit.support import unsupported_reason

    return unsupported_reason(open_clip.get_model_config(arch))


SUPPORTED = sorted(a for a in all_archs() if reason(a) is None)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The towers are tiny: one thread beats several (thread start-up and contention dominate, ~30x here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def tower(key: str):
    return tiny_tower(key)


def test_every_arch_is_supported_or_refused_with_its_reason():
    unexplained = [a for a in all_archs() if reason(a) is not None and a not in REFUSED]
    assert not unexplained, f"refused without an entry in REFUSED: {[(a, reason(a)) for a in unexplained]}"
    for arch, words in REFUSED.items():
        assert words in (reason(arch) or ""), (arch, reason(arch))


def test_at_least_200_arch_tag_pairs_and_every_siglip_eva_and_avg_pool_vit_are_supported():
    from clipterm.vit.catalogue import catalogue

    rows = catalogue()
    assert sum(row["supported"] for row in rows) >= 200
    for row in rows:
        model = row["model"]
        if any(family.lower() in model.lower() for family in ("SigLIP", "EVA", "CLIPA", "PE-Core", "coca", "ViTamin")):
            assert row["supported"], (model, row["reason"])


@pytest.mark.parametrize("arch", SUPPORTED)
def test_components_sum_to_the_towers_own_output(arch):
    visual, size = tower(vision_key(arch))
    batch = images(2, size)
    module = tower_module(visual)
    parts = module.decompose(visual, batch)
    expected = encode(visual, batch)  # (B, D): the tower's forward, not clipterm's
    assert rel(parts.summed(module.readout(visual)), expected) < 1e-5
    assert rel(parts.image_embeds, expected) < 1e-5
    pool_heads = getattr(parts, "pool_heads", None)
    if pool_heads is not None:  # the pool view adds up as well: Σ_g pool.H{g} + pool.bias (+ pool.MLP)
        pooled = torch.einsum("bgd,gde->be", pool_heads, module.pool_readout(visual))
        pool_mlp = parts.mlps[:, -1] if parts.mlps.shape[1] > parts.head_out.shape[1] else 0
        assert rel(pooled + parts.pool_bias + pool_mlp, expected) < 1e-5


@pytest.mark.parametrize("arch", ["convnext_large_d"])
def test_refused_towers_are_refused_when_built_too(arch, monkeypatch):
    """The config's reason and the built tower's agree (timm_proj='mlp' builds an MLP head)."""
    import open_clip
    from open_clip.model import _build_vision_tower
    from tower_helpers import shrunk_timm

    cfg = open_clip.get_model_config(arch)
    with shrunk_timm("convnext", 64):
        visual = _build_vision_tower(cfg["embed_dim"], dict(cfg["vision_cfg"], image_size=64)).eval()
    with pytest.raises(ClipTermError, match="timm_proj='mlp'") as error:
        tower_module(visual).check_supported(visual, arch)
    assert error.value.code == ExitCode.UNSUPPORTED


def test_a_refused_arch_names_its_reason_and_the_nearest_supported_one():
    from clipterm.vit.models import load_model

    with pytest.raises(ClipTermError) as error:
        load_model("MobileCLIP-S2", pretrained="weights.safetensors")
    assert "FastViT" in error.value.message and error.value.code == ExitCode.UNSUPPORTED
    assert "nearest supported arch is MobileCLIP" in error.value.hint  # MobileCLIP-B or MobileCLIP2-B: same family


# --------------------------------------------------------------------------- frozen-attention ablation, MAP head


def _frozen_ablation(visual, batch, layer_part: str):
    """The real forward twice: once as is, once with the last block's MLP (or head 0) replaced by its batch mean at
    every token, and what follows it frozen at the first run's values: the block's MLP (after head 0), the final
    norm's σ, the pool's keys (so its attention) and the pool's MLP output. Returns (output change, the decomposition of the first run, the mean-ablated stream)."""
    from clipterm.vit import pooling, timm_vit

    trunk = visual.trunk
    block, pool, norm = trunk.blocks[-1], trunk.attn_pool, trunk.norm
    seen: dict = {}
    hooks = [norm.register_forward_pre_hook(lambda _m, args: seen.setdefault("final", args[0])),
             pool.k_norm.register_forward_hook(lambda _m, _a, out: seen.setdefault("k", out)),
             pool.mlp.register_forward_hook(lambda _m, _a, out: seen.setdefault("mlp", out))]
    hooks.append(block.mlp.register_forward_hook(lambda _m, _a, out: seen.setdefault("block_mlp", out)))
    if layer_part == "mlp":
        hooks.append(block.mlp.register_forward_hook(lambda _m, _a, out: seen.setdefault("part", out)))
    else:
        hooks.append(block.attn.proj.register_forward_pre_hook(lambda _m, args: seen.setdefault("part", args[0])))
    with torch.no_grad():
        before = visual(batch)
    for hook in hooks:
        hook.remove()
    sigma = pooling.Norm.of(norm, seen["final"].shape[-1], batch.device).sigma(seen["final"])  # (B, N)
    gamma, beta = norm.weight, norm.bias

    def frozen_norm(_m, args, _out):  # the same LayerNorm with the first run's σ at each token
        x = args[0]
        return (x - x.mean(-1, keepdim=True)) / sigma[..., None] * gamma + beta

    heads = block.attn.num_heads
    part = seen["part"]
    if layer_part == "mlp":
        replace = [block.mlp.register_forward_hook(lambda _m, _a, out: part.mean(0, keepdim=True).expand_as(out))]
    else:  # head 0's slots of the merged heads, before the out projection; the block's MLP after it frozen
        dh = part.shape[-1] // heads
        merged = part.clone()
        merged[..., :dh] = part[..., :dh].mean(0, keepdim=True)
        replace = [block.attn.proj.register_forward_pre_hook(lambda _m, _a: (merged,)),
                   block.mlp.register_forward_hook(lambda _m, _a, _out: seen["block_mlp"])]
    replace += [norm.register_forward_hook(frozen_norm),
                pool.k_norm.register_forward_hook(lambda _m, _a, _out: seen["k"]),
                pool.mlp.register_forward_hook(lambda _m, _a, _out: seen["mlp"])]
    with torch.no_grad():
        after = visual(batch)
    for hook in replace:
        hook.remove()
    return after - before, timm_vit.decompose(visual, batch), seen, part


@pytest.mark.parametrize("layer_part", ["mlp", "head"])
def test_mean_ablating_a_last_layer_component_with_frozen_pool_attention_moves_the_output_by_its_effect(layer_part):
    """The exact direct effect through a MAP head: Δ output == effect(mean) − effect(component), per image, where the
    effect of the mean goes through each image's own frozen pool attention and σ (1e-5 relative)."""
    import copy

    from clipterm.vit import pooling, timm_vit

    visual, size = tower(vision_key("ViT-B-16-SigLIP"))
    visual = copy.deepcopy(visual).double()  # fp64: the change is a difference of two forward passes
    batch = images(4, size).double()
    change, parts, _, _ = _frozen_ablation(visual, batch, layer_part)
    plan = timm_vit.plan(visual)
    last = plan.layers - 1
    # the mean's effect through each image's frozen pool: the same frozen maps, the mean component fed in
    stream = _stream_of(visual, batch)
    if layer_part == "mlp":
        stream.mlps[last] = stream.mlps[last].mean(0, keepdim=True).expand_as(stream.mlps[last])  # ls2 is linear
        ablated = pooling.split(plan, stream)
        expected = ablated.mlps[:, last] - parts.mlps[:, last]  # (B, D)
    else:
        heads = stream.heads[last].clone()  # (B, N, H, dh)
        heads[:, :, 0] = heads[:, :, 0].mean(0, keepdim=True)
        stream.heads[last] = heads
        ablated = pooling.split(plan, stream)
        expected = ablated.head_out[:, last, 0] - parts.head_out[:, last, 0]  # (B, D): joint space
    assert rel(change, expected) < 1e-5
    assert change.norm() > 1e-3 * parts.image_embeds.norm()  # the ablation moved something


def _stream_of(visual, batch):
    """The per-token tensors timm_vit.decompose splits (rebuilt through its own hooks)."""
    from clipterm.vit import pooling, timm_vit

    captured = {}
    real = pooling.split

    def keep(plan, stream):
        captured["stream"] = stream
        return real(plan, stream)

    pooling.split = keep
    try:
        timm_vit.decompose(visual, batch)
    finally:
        pooling.split = real
    stream = captured["stream"]
    stream.mlps = list(stream.mlps)
    stream.heads = list(stream.heads)
    return stream


def test_a_library_change_under_the_hooks_is_refused_not_silently_wrong(monkeypatch):
    """If timm computed a block differently from what clipterm reads (here: a LayerScale clipterm would misread),
    the split no longer adds up and decompose refuses the batch with one line."""
    from clipterm.vit import timm_vit

    visual, size = tower(vision_key("EVA02-B-16"))
    real = timm_vit._layer_scale
    monkeypatch.setattr(timm_vit, "_layer_scale", lambda block, which, width, device: 2 * real(block, which, width, device))
    with pytest.raises(ClipTermError, match="does not add up") as error:
        timm_vit.decompose(visual, images(2, size))
    assert error.value.code == ExitCode.UNSUPPORTED and "timm" in error.value.hint


@pytest.mark.parametrize("arch", ["ViT-B-16-SigLIP", "PE-Core-B-16", "EVA02-B-16", "ViTamin-S", "convnext_base",
                                  "ViT-L-14-CLIPA", "coca_ViT-B-32"])
def test_bfloat16_autocast_stays_close_and_returns_fp32(arch):
    """Under autocast the towers run in bf16 and the split's algebra in fp32: within 2e-2 of the fp32 embedding
    (worst per family on CPU: ~7e-3, ViTamin)."""
    visual, size = tower(vision_key(arch))
    batch = images(2, size)
    module = tower_module(visual)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        parts = module.decompose(visual, batch)
    assert parts.head_out.dtype == parts.mlps.dtype == parts.image_embeds.dtype == torch.float32
    assert rel(parts.summed(module.readout(visual)), encode(visual, batch)) < 2e-2
