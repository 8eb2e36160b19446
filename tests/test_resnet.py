"""The ResNet attention-pool split: heads + pos + bias == encode_image for every open_clip ModifiedResNet,
and channel c's effect is exactly what frozen-attention ablation of channel c moves."""

from __future__ import annotations

import functools
import json

import pytest
import torch
import torch.nn.functional as F

from clipterm.errors import ClipTermError
from clipterm.vit import resnet
from clipterm.towers import tower_for

TEXT_CFG = dict(context_length=8, vocab_size=100, width=16, heads=2, layers=1)
RN_ARCHS = ["RN50", "RN101", "RN50x4", "RN50x16", "RN50x64"]


def tiny_resnet_clip(arch: str = "RN50", image_size: int = 64, seed: int = 0):
    """`arch`'s width, heads and embedding size, shrunk to one block per stage at 64 px, BatchNorm moved off its init."""
    import open_clip

    cfg = open_clip.get_model_config(arch)
    torch.manual_seed(seed)
    vision = dict(cfg["vision_cfg"], layers=[1, 1, 1, 1], image_size=image_size)
    model = open_clip.model.CLIP(embed_dim=cfg["embed_dim"], vision_cfg=vision, text_cfg=TEXT_CFG,
                                 quick_gelu=bool(cfg.get("quick_gelu"))).eval()
    for module in model.visual.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_(0, 0.1)
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    pool = model.visual.attnpool
    for linear in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
        linear.bias.data.normal_(0, 0.1)
    return model


def images(n: int = 2, size: int = 64) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))  # (n, 3, S, S)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def summed(parts: resnet.PoolDecomposition, read: torch.Tensor) -> torch.Tensor:
    return parts.embed + parts.bias + torch.einsum("blhd,lhde->be", parts.head_out, read)  # (B, D)


def all_resnet_archs() -> list[str]:
    import open_clip

    return [a for a in open_clip.list_models() if isinstance((open_clip.get_model_config(a) or {}).get("vision_cfg", {}).get("layers"), list)]


def test_every_open_clip_resnet_is_in_the_sweep():
    assert sorted(all_resnet_archs()) == sorted(RN_ARCHS + [f"{a}-quickgelu" for a in RN_ARCHS])


@functools.lru_cache(maxsize=1)
def _sweep_model(vision: str, embed_dim: int):
    """The image tower depends on vision_cfg and embed_dim alone (QuickGELU only changes the text tower), so an
    arch and its -quickgelu twin share one model: the sweep covers all 10 configs for the cost of 5."""
    return tiny_resnet_clip(json.loads(vision)["arch"])


@pytest.mark.parametrize("arch", sorted(RN_ARCHS + [f"{a}-quickgelu" for a in RN_ARCHS]))
def test_pool_components_sum_to_encode_image(arch):
    import open_clip

    cfg = open_clip.get_model_config(arch)
    base = arch.removesuffix("-quickgelu")
    assert cfg["vision_cfg"] == open_clip.get_model_config(base)["vision_cfg"]
    model = _sweep_model(json.dumps({"arch": base, **cfg["vision_cfg"]}, sort_keys=True), cfg["embed_dim"])
    batch = images(2)
    parts = resnet.decompose(model, batch, neurons=True)
    with torch.no_grad():
        expected = model.encode_image(batch)  # (B, D)
    heads, width = model.visual.attnpool.num_heads, model.visual.attnpool.v_proj.in_features
    assert parts.head_out.shape == (2, 1, heads, width // heads)
    assert resnet.readout(model).shape == (1, heads, width // heads, expected.shape[1])
    assert rel(summed(parts, resnet.readout(model)), expected) < 1e-5
    assert rel(parts.image_embeds, expected) < 1e-5
    assert parts.neurons.shape == (2, 1, width) and parts.mlps.shape == (2, 0, expected.shape[1])


def test_channels_add_up_to_the_heads():
    model = tiny_resnet_clip("RN50")
    parts = resnet.decompose(model, images(2))
    every = torch.arange(parts.channels.shape[-1])
    channels = resnet.channel_effects(model, parts.channels, every).sum(1)  # (B, D)
    heads = torch.einsum("blhd,lhde->be", parts.head_out, resnet.readout(model))  # (B, D)
    assert rel(channels, heads) < 1e-5
    assert rel(parts.embed + parts.bias + channels, parts.image_embeds) < 1e-5


def frozen_pool(pool, grid: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """The pool with its attention weights given: Σ_h W_c^h Σ_t a_h(t) (W_v^h x_t + b_v^h) + b_c, from the modules."""
    z = grid.flatten(2).transpose(1, 2)  # (B, T, C)
    tokens = torch.cat([z.mean(1, keepdim=True), z], 1) + pool.positional_embedding  # (B, 1+T, C)
    values = pool.v_proj(tokens)  # (B, 1+T, C)
    batch, count, width = values.shape
    values = values.view(batch, count, pool.num_heads, -1)  # (B, 1+T, H, dh)
    mixed = torch.einsum("bht,bthd->bhd", attn, values).reshape(batch, width)  # (B, C)
    return pool.c_proj(mixed)  # (B, D)


def test_ablating_one_channel_with_frozen_attention_moves_the_embedding_by_its_effect():
    model = tiny_resnet_clip("RN50")
    visual, batch = model.visual, images(3)
    with torch.no_grad():
        grid = visual.layer4(visual.layer3(visual.layer2(visual.layer1(visual.stem(batch)))))  # (B, C, h, w)
        channel = int(grid.mean((0, 2, 3)).argmax())  # a live channel (post-ReLU, many are 0)
        tokens = grid.flatten(2).permute(2, 0, 1)  # (T, B, C)
        tokens = torch.cat([tokens.mean(0, keepdim=True), tokens]) + visual.attnpool.positional_embedding[:, None]
        pool = visual.attnpool
        _, attn = F.multi_head_attention_forward(  # the real forward's weights, per head
            tokens, tokens, tokens, tokens.shape[-1], pool.num_heads, None,
            torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]), None, None, False, 0.0,
            pool.c_proj.weight, pool.c_proj.bias, training=False, need_weights=True, use_separate_proj_weight=True,
            q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight, v_proj_weight=pool.v_proj.weight,
            average_attn_weights=False)
        attn = attn[:, :, 0]  # (B, H, 1+T): the mean token's query row
        base = frozen_pool(pool, grid, attn)
        assert rel(base, model.encode_image(batch)) < 1e-5
        parts = resnet.decompose(model, batch)
        effect = resnet.channel_effects(model, parts.channels, torch.tensor([channel]))[:, 0]  # (B, D)
        zeroed = grid.clone()
        zeroed[:, channel] = 0
        assert rel(base - frozen_pool(pool, zeroed, attn), effect) < 1e-5
        mean = grid[:, channel].mean()
        meaned = grid.clone()
        meaned[:, channel] = mean  # the channel at its mean: it moves by its effect minus the mean's effect
        constant = mean * resnet.channel_basis(model, torch.tensor([channel]))[:, 0].sum(0)  # (D,)
        moved = frozen_pool(pool, meaned, attn) - base  # (B, D)
        assert ((moved - (constant - effect)).norm() / effect.norm()).item() < 1e-5  # on the channel's own scale
        assert effect.norm() > 1e-3 * base.norm()  # a channel that carries something


def test_pool_pos_has_no_image_content_but_the_attention():
    model = tiny_resnet_clip("RN50")
    model.visual.attnpool.positional_embedding.data.zero_()
    parts = resnet.decompose(model, images(2))
    assert parts.embed.abs().max() == 0
    assert torch.allclose(parts.bias[0], parts.bias[1])


def test_vit_towers_are_refused():
    from tests.test_decompose import tiny_clip

    with pytest.raises(ClipTermError, match="ModifiedResNet"):
        resnet.decompose(tiny_clip(), torch.randn(1, 3, 32, 32))


# --------------------------------------------------------------------------- a ResNet cache


def save_tiny_resnet(folder, image_size: int = 64):
    """A seeded ResNet CLIP (width 16: 512 channels, 8 pool heads) as an open_clip local-dir model folder."""

    import open_clip
    from safetensors.torch import save_file

    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": image_size, "layers": [1, 1, 1, 1], "width": 16},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}
    torch.manual_seed(0)
    model = open_clip.model.CLIP(**cfg).eval()
    for module in model.visual.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_(0, 0.1)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {"size": image_size}}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder


@pytest.fixture(scope="module")
def rn_cache(tmp_path_factory):
    from clipterm.cache.build import BuildOptions, build_cache
    from clipterm.cache.reader import open_cache
    from clipterm.vit.models import load_model

    root = tmp_path_factory.mktemp("rn")
    loaded = load_model(f"local-dir:{save_tiny_resnet(root / 'tiny-rn')}")
    build_cache(BuildOptions(images="toy:10", model=loaded.info.spec, name="rn", cache_dir=str(root / "caches"),
                             dtype="float32", neurons=True, shard_rows=6, device="cpu"), loaded=loaded)
    return open_cache(root / "caches" / "rn"), loaded


def test_a_resnet_model_loads_with_its_vocabulary(rn_cache):
    _, loaded = rn_cache
    assert loaded.info.tower == "resnet" and loaded.info.heads == 8 and loaded.info.mlp_width == 512
    assert tower_for(loaded.info.shape).vocabulary.startswith("this ResNet's components are pool.H0..pool.H7")


def test_resnet_cache_components_add_up_to_image_embeds(rn_cache):
    reader, _ = rn_cache
    assert reader.n == 10 and reader.shape.tower == "resnet"
    assert reader.components() == ["pool.pos", "pool.bias", *[f"pool.H{h}" for h in range(8)]]
    total = sum(reader.effects(name) for name in reader.components())  # (N, D)
    assert rel(total, reader.image_embeds()) < 1e-5
    assert rel(reader.effects("pool"), sum(reader.effects(f"pool.H{h}") for h in range(8))) < 1e-6
    assert reader.head_out("pool.H3").shape == (10, 64) and reader.stats("pool.H3")["cov"].shape == (64, 64)
    assert reader.neurons("L3").shape == (10, 512)
    from clipterm.cache.inventory import verify

    assert verify(reader.path) == []


@pytest.mark.parametrize("name", ["L0.H3", "embed", "L0.MLP", "L2.N3"])
def test_vit_names_on_a_resnet_cache_are_one_line_errors(rn_cache, name):
    reader, _ = rn_cache
    with pytest.raises(ClipTermError) as err:
        reader.effects(name)
    assert "\n" not in err.value.message and "pool.H0..pool.H7" in err.value.hint


def test_vit_cache_components_add_up_and_refuse_pool_names(toy, tmp_path):
    from clipterm.cache.build import BuildOptions, build_cache
    from clipterm.cache.reader import open_cache

    build_cache(BuildOptions(images="toy:6", name="vit", cache_dir=str(tmp_path), dtype="float32", device="cpu"), loaded=toy)
    reader = open_cache(tmp_path / "vit")
    assert reader.components()[:3] == ["embed", "bias", "L0.H0"] and len(reader.components()) == 2 + 6 * 8 + 6
    assert rel(sum(reader.effects(name) for name in reader.components()), reader.image_embeds()) < 1e-5
    with pytest.raises(ClipTermError) as err:
        reader.effects("pool.H3")
    assert "embed, bias, L0..L5" in err.value.hint


def test_channel_neurons_file_holds_exact_channel_effects(rn_cache):
    from clipterm.cache.neurons import NeuronFile, build_neurons

    reader, loaded = rn_cache
    build_neurons(reader, 3, device="cpu", top_k=4, loaded=loaded)
    channels = NeuronFile(reader, 3)
    assert channels.paths == [f"pool.H{h}" for h in range(8)]
    heads = sum(reader.effects(f"pool.H{h}") for h in range(8))  # (N, D): the channels add up to the heads
    assert rel(channels.tensor("effect_sum"), heads) < 1e-4
    parts = resnet.decompose(loaded.model, _cache_pixels(reader, loaded), neurons=True)
    live = int(parts.neurons[:, 0].mean(0).argmax())
    effect = resnet.channel_effects(loaded.model, parts.channels, torch.tensor([live]))[:, 0]  # (N, D)
    assert rel(channels.tensor("mean")[live], effect.mean(0)) < 1e-4
    assert torch.allclose(channels.column("norms", live), effect.norm(dim=-1), rtol=2e-3)
    with pytest.raises(ClipTermError, match="last stage"):
        NeuronFile(reader, 2)


def _cache_pixels(reader, loaded) -> torch.Tensor:
    from clipterm.cache.neurons import cache_source
    from clipterm.inputs.images import ImageDataset, collate

    dataset = ImageDataset(cache_source(reader), loaded.preprocess, reader.index().tolist(), min_side=64)
    return collate([dataset[i] for i in range(len(dataset))])[1]  # (N, 3, S, S)


def test_ablation_and_attribution_speak_pool_names(rn_cache):
    from clipterm.analyses import ablation

    reader, _ = rn_cache
    assert ablation.group(reader, "head") == [f"pool.H{h}" for h in range(8)]
    assert ablation.group(reader, "layer") == ["pool"]
    with pytest.raises(ClipTermError, match="no MLPs"):
        ablation.group(reader, "mlp")
    shifts = dict(ablation.shifts(reader, ["pool.H2"]))
    effects = reader.effects("pool.H2")
    assert torch.allclose(shifts["pool.H2"], effects.mean(0, keepdim=True) - effects)
    contributions = ablation.image_contributions(reader, 4)
    assert list(contributions) == reader.components()
    assert rel(sum(contributions.values()), reader.image_embeds([4])[0]) < 1e-5
    assert [name for name, _ in ablation.cumulative_shifts(reader, "head")] == ["pool"]
    from clipterm.analyses.direct_ablation import ablate_cached

    weights = torch.nn.functional.normalize(torch.randn(5, reader.image_embeds().shape[1], generator=torch.Generator().manual_seed(0)), dim=-1)
    scoring = {"agreement": ablation.Scoring(weights, reader)}  # streamed over the 6-row shards
    components = ablation.group(reader, "head") + ["pool", "pool.pos", "pool.bias"]
    expanded = ablation.ablate(scoring, ablation.shifts(reader, components), draws=100)["agreement"]
    streamed = ablate_cached(scoring, reader, components, draws=100, chunk_rows=6)["agreement"]
    assert [(r.component, r.score) for r in streamed] == [(r.component, r.score) for r in expanded]
    assert [r.cosine for r in streamed] == pytest.approx([r.cosine for r in expanded], abs=1e-5)


def test_textspan_of_a_pool_head_finds_its_own_direction(rn_cache):
    from clipterm.analyses import textspan

    reader, _ = rn_cache
    effects = reader.effects("pool.H3")  # (N, D)
    centred = effects - effects.mean(0)
    top = torch.linalg.svd(centred, full_matrices=False).Vh[0]  # (D,) the head's main direction
    texts = torch.randn(20, top.shape[0], generator=torch.Generator().manual_seed(3))
    texts[11] = top
    span = textspan.describe(reader, ["pool.H3"], F.normalize(texts, dim=-1), n_texts=3, baseline_draws=0)["pool.H3"]
    assert span.indices[0] == 11 and 0 < span.explained[0] <= 1


@pytest.mark.parametrize("args", [("images", "rn", "--component", "pool.H3", "--top", "3"),
                                  ("search", "--cache", "rn", "--target", "pool.H3", "--steps", "1"),
                                  ("images", "rn", "--component", "L0.H3")], ids=["images", "search", "vit-name"])
def test_cli_on_a_resnet_cache(cli, rn_cache, monkeypatch, args):
    reader, _ = rn_cache
    monkeypatch.setenv("CLIPTERM_CACHE", str(reader.path.parent))
    result = cli(*args, "--json")
    if "L0.H3" in args:
        assert result.code != 0 and "pool.H0..pool.H7" in result.err and "ViT name" in result.err
        return
    assert result.code == 0, result.err
    try:
        payloads = [json.loads(result.out)]
    except json.JSONDecodeError:  # `search --json` writes one event per line
        payloads = [json.loads(line) for line in result.out.splitlines() if line.strip()]
    if args[0] == "search":  # a search for the head's direction improves on the empty text
        assert payloads[-1]["best"][0]["score"] > payloads[0]["best"][0]["score"]
    else:
        assert "pool.H3" in result.out


def test_pool_tokens_sum_to_the_heads_and_the_mean_token_is_one_of_them():
    model = tiny_resnet_clip("RN50")
    parts = resnet.decompose(model, images(2), token_layers=[0])
    tokens = parts.tokens[0]  # (B, H, 1+T, dh)
    assert tokens.shape[2] == 1 + 2 * 2
    assert rel(tokens.sum(2), parts.head_out[:, 0]) < 1e-5
    assert tokens[:, :, 0].abs().sum() > 0  # the mean token is attended to and carries content
    with pytest.raises(ClipTermError, match="pool only"):
        resnet.decompose(model, images(1), token_layers=[3])


def test_toy_rn_recipe_saves_a_resnet_model_folder_that_loads_and_splits(tmp_path):
    import open_clip

    from clipterm.toyworld.train import save_model_dir
    from clipterm.toyworld.rn import RN_MODEL_CFG
    from clipterm.vit.models import load_model

    torch.manual_seed(0)
    save_model_dir(open_clip.model.CLIP(**RN_MODEL_CFG).eval(), tmp_path / "toy-rn", {"steps": 0}, model_cfg=RN_MODEL_CFG)
    loaded = load_model(f"local-dir:{tmp_path / 'toy-rn'}")
    assert loaded.info.tower == "resnet" and loaded.info.heads == 8 and loaded.info.mlp_width == 512
    parts = resnet.decompose(loaded.model.float(), images(2))
    assert rel(summed(parts, resnet.readout(loaded.model)), loaded.model.encode_image(images(2))) < 1e-5


def test_mean_ablating_every_channel_is_mean_ablating_the_pool_heads(rn_cache, cli, monkeypatch):
    """The channels add up to the heads, so their second-order mean-ablation (`ablate --second-order L3`, set `all`)
    moves each embedding exactly as mean-ablating the whole pool (`ablate --by layer`) does."""
    from clipterm.analyses import ablation
    from clipterm.cache.neurons import NeuronFile, build_neurons, built_layers

    reader, loaded = rn_cache
    if 3 not in built_layers(reader.path):
        build_neurons(reader, 3, device="cpu", top_k=4, loaded=loaded)
    channels = dict(ablation.second_order_shifts(NeuronFile(reader, 3)))["all"]  # (N, D)
    pool = dict(ablation.shifts(reader, ["pool"]))["pool"]  # (N, D)
    assert rel(channels, pool) < 1e-4 and pool.norm() > 0
    monkeypatch.setenv("CLIPTERM_CACHE", str(reader.path.parent))
    by_channels = cli("ablate", "rn", "--second-order", "L3", "--which", "all", "--json", "--draws", "100")
    by_pool = cli("ablate", "rn", "--by", "layer", "--json", "--draws", "100")
    assert by_channels.code == 0 and by_pool.code == 0, by_channels.err + by_pool.err
    for task, result in json.loads(by_channels.out)["tasks"].items():
        row, = result["components"]
        pooled, = json.loads(by_pool.out)["tasks"][task]["components"]
        assert row["component"] == "L3" and pooled["component"] == "pool"
        assert row["cosine"] == pytest.approx(pooled["cosine"], abs=2e-5) and row["score"] == pooled["score"]
