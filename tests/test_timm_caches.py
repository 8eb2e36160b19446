"""Caches of timm towers end to end: a random tiny SigLIP (MAP head) and a tiny ConvNeXt saved as local model
folders, built with `clipterm cache build`, read back exactly, and analysed (TextSpan, ablation, attribution, top
images); the analyses that cannot apply say so in one line naming the model part."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from siglip_helpers import save_tiny_siglip

from clipterm.errors import ClipTermError, ExitCode


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def save_tiny_convnext(folder):
    """timm's test_convnext (4 stages, 64 channels at the end) with a linear projection, as a local model folder."""
    import open_clip
    from safetensors.torch import save_file

    cfg = {"model_cfg": {"embed_dim": 24, "vision_cfg": {"image_size": 64, "timm_model_name": "test_convnext",
                                                         "timm_pool": "", "timm_proj": "linear"},
                         "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}},
           "preprocess_cfg": {"size": 64}}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps(cfg))
    torch.manual_seed(0)
    model = open_clip.create_model(f"local-dir:{folder}", load_weights=False)
    with torch.no_grad():
        for name, param in model.visual.named_parameters():
            if param.dim() == 1 or name.endswith("gamma"):
                param.mul_(torch.empty_like(param).uniform_(0.5, 1.5)).add_(0.1 * torch.randn_like(param))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder


@pytest.fixture(scope="module")
def siglip(tmp_path_factory):
    from clipterm.cache.build import BuildOptions, build_cache
    from clipterm.cache.reader import open_cache
    from clipterm.vit.models import load_model

    root = tmp_path_factory.mktemp("siglip")
    loaded = load_model(f"local-dir:{save_tiny_siglip(root / 'tiny-siglip')}")
    build_cache(BuildOptions(images="toy:12", model=loaded.info.spec, name="sig", cache_dir=str(root / "caches"),
                             dtype="float32", shard_rows=8, device="cpu", workers=0), loaded=loaded)
    return open_cache(root / "caches" / "sig"), loaded


@pytest.fixture(scope="module")
def convnext(tmp_path_factory):
    from clipterm.cache.build import BuildOptions, build_cache
    from clipterm.cache.reader import open_cache
    from clipterm.vit.models import load_model

    root = tmp_path_factory.mktemp("convnext")
    loaded = load_model(f"local-dir:{save_tiny_convnext(root / 'tiny-convnext')}")
    build_cache(BuildOptions(images="toy:10", model=loaded.info.spec, name="cnx", cache_dir=str(root / "caches"),
                             dtype="float32", device="cpu", workers=0), loaded=loaded)
    return open_cache(root / "caches" / "cnx"), loaded


def test_cache_build_on_a_tiny_siglip_from_the_cli(cli, siglip):
    from pathlib import Path

    from clipterm.cache.reader import open_cache

    folder = Path(siglip[1].info.weights_path).parent  # the tiny SigLIP's model folder (weights + config)
    result = cli("cache", "build", "--images", "toy:6", "--model", f"local-dir:{folder}", "--name", "sig",
                 "--dtype", "float32", "--device", "cpu", "--workers", "0", "--json")
    assert result.code == 0, result.err
    reader = open_cache("sig")
    shape = reader.manifest["shape"]
    assert shape["head_space"] == "joint" and shape["pool_heads"] == 3 and shape["mlp_layers"] == 10
    assert reader.manifest["model"]["family"] == "timm VisionTransformer (map)"
    total = sum(reader.effects(name) for name in reader.components())
    assert rel(total, reader.image_embeds()) < 1e-5
    assert cli("cache", "verify", "sig").code == 0


def test_a_siglip_cache_adds_up_in_both_views(siglip):
    reader, loaded = siglip
    names = reader.components()
    assert names[:2] == ["embed", "bias"] and names[-1] == "pool.MLP" and "L8.H2" in names and "pool.H0" not in names
    assert rel(sum(reader.effects(n) for n in names), reader.image_embeds()) < 1e-5
    assert reader.pool_components() == ["pool.H0", "pool.H1", "pool.H2", "pool.bias", "pool.MLP"]
    assert rel(sum(reader.effects(n) for n in reader.pool_components()), reader.image_embeds()) < 1e-5
    assert rel(reader.effects("pool"), sum(reader.effects(f"pool.H{g}") for g in range(3))) < 1e-6
    assert reader.image_embeds().shape == (12, 96) and loaded.info.pool_heads == 3
    stats = reader.stats("L8.H1")  # a joint-space head: its (D, D) outer product formed from the shards
    effects = reader.effects("L8.H1").double()
    torch.testing.assert_close(stats["outer"], effects.T @ effects)
    assert reader.stats("pool.H2")["cov"].shape == (32, 32)


def test_textspan_finds_the_direction_of_a_joint_space_head_and_of_a_pool_head(siglip):
    from clipterm.analyses import textspan

    reader, _ = siglip
    for name in ("L8.H1", "pool.H2", "pool.MLP"):
        effects = reader.effects(name)  # (N, D)
        top = torch.linalg.svd(effects - effects.mean(0), full_matrices=False).Vh[0]  # (D,)
        texts = torch.randn(30, top.shape[0], generator=torch.Generator().manual_seed(3))
        texts[17] = top
        span = textspan.describe(reader, [name], F.normalize(texts, dim=-1), n_texts=3, baseline_draws=0)[name]
        assert span.indices[0] == 17 and 0 < span.explained[0] <= 1, name


@pytest.mark.parametrize("args", [
    ("textspan", "sig", "-c", "L8.H0", "-c", "pool.H1", "-c", "pool.MLP", "--texts", "2", "--pool", "toy"),
    ("ablate", "sig", "--by", "head", "--task", "colour", "--pool", "toy"),
    ("ablate", "sig", "--by", "mlp", "--task", "colour", "--pool", "toy"),
    ("attribute", "sig", "--image", "0", "--text", "a red circle"),
    ("images", "sig", "--component", "pool.H1", "--top", "3", "--pool", "toy"),
], ids=["textspan", "ablate-head", "ablate-mlp", "attribute", "images"])
def test_analyses_on_a_siglip_cache(cli, siglip, monkeypatch, args):
    reader, _ = siglip
    monkeypatch.setenv("CLIPTERM_CACHE", str(reader.path.parent))
    result = cli(*args, "--json")
    assert result.code == 0, result.err
    out = json.loads(result.out)
    text = json.dumps(out)
    if args[0] == "ablate":
        expected = ["pool.H0", "L8.H2"] if "head" in args else ["pool.MLP", "L0.MLP"]
        assert all(f'"{name}"' in text for name in expected)
    else:
        assert "pool" in text


@pytest.mark.parametrize("args, part", [
    (("spatial", "row:0", "--cache", "sig", "--component", "L8.H1"), "attention-pool head"),
    (("neurons", "build", "sig", "--layer", "L7"), "attention-pool head"),
    (("visualise", "--cache", "sig", "--target", "L8.H1", "--steps", "1"), "attention-pool head"),
    (("images", "sig", "--component", "S3.B0"), "ConvNeXt"),
], ids=["spatial", "neurons", "visualise", "convnext-name"])
def test_what_cannot_apply_to_a_map_head_says_so_in_one_line(cli, siglip, monkeypatch, args, part):
    reader, _ = siglip
    monkeypatch.setenv("CLIPTERM_CACHE", str(reader.path.parent))
    result = cli(*args)
    assert result.code != 0 and part in result.err and "Traceback" not in result.err
    assert len([line for line in result.err.splitlines() if line.startswith("error:")]) == 1


@pytest.mark.parametrize("stored", ["--neurons", "--tokens=L8"])
def test_a_refused_stored_option_writes_nothing_so_the_plain_build_then_runs(cli, siglip, tmp_path, stored):
    """What a timm tower cannot store is refused before the build writes its cache (it used to leave a started
    cache that the same build without the option then refused as "started with another stored")."""
    from pathlib import Path

    folder = Path(siglip[1].info.weights_path).parent
    args = ("cache", "build", "--images", "toy:4", "--model", f"local-dir:{folder}", "--name", "s2",
            "--cache-dir", str(tmp_path), "--device", "cpu", "--workers", "0")
    refused = cli(*args, stored)
    assert refused.code == ExitCode.UNSUPPORTED and "build without" in refused.err
    assert not (tmp_path / "s2").exists()
    assert cli(*args).code == 0


def test_a_cache_of_one_family_refuses_a_model_of_another(siglip, toy):
    from clipterm.cache.reader import check_model

    reader, _ = siglip
    with pytest.raises(ClipTermError) as error:
        check_model(reader, toy.info)
    message = error.value.message
    assert "timm VisionTransformer (map)" in message and "open_clip VisionTransformer (class token)" in message
    assert error.value.code == ExitCode.INVALID_DATA and "--model local-dir:" in error.value.hint


def test_a_convnext_cache_names_its_last_stage_blocks(convnext, cli, monkeypatch):
    reader, loaded = convnext
    assert loaded.info.tower == "convnext" and loaded.info.stage == 3
    names = reader.components()
    assert names[:2] == ["embed", "bias"] and names[2:] == [f"S3.B{k}" for k in range(reader.shape.layers)]
    assert rel(sum(reader.effects(n) for n in names), reader.image_embeds()) < 1e-5
    assert rel(reader.effects("S3"), sum(reader.effects(n) for n in names[2:])) < 1e-6
    from clipterm.analyses.direct_ablation import terms

    assert [(t.tensor, t.index) for t in terms(reader, "S3")] == [("mlps", (k,)) for k in range(reader.shape.layers)]
    monkeypatch.setenv("CLIPTERM_CACHE", str(reader.path.parent))
    result = cli("ablate", "cnx", "--by", "mlp", "--task", "colour", "--pool", "toy", "--json")
    assert result.code == 0, result.err
    assert '"S3.B0"' in result.out
    result = cli("textspan", "cnx", "-c", "S3.B1", "--texts", "2", "--pool", "toy", "--json")
    assert result.code == 0, result.err
    result = cli("images", "cnx", "--component", "L0.H0")
    assert result.code != 0 and "not a ConvNeXt name" in result.err and "S3.B0" in result.err


def test_clipterm_tui_accepts_a_convnext_cache(convnext, cli, monkeypatch):
    """`clipterm tui` used to refuse a ConvNeXt cache; its checks now pass and it starts the app (stubbed here:
    the real one waits for keys, which is how this test once hung when the refusal was lost)."""
    from clipterm.tui.app import ClipTermApp

    reader, _ = convnext
    started = []
    monkeypatch.setattr(ClipTermApp, "run", lambda app: started.append(app.reader.shape.tower))
    monkeypatch.setenv("CLIPTERM_CACHE", str(reader.path.parent))
    result = cli("tui", "cnx", "--images", "off")
    assert result.code == 0, result.err
    assert started == ["convnext"]


def test_the_tui_still_refuses_a_tower_its_tree_cannot_lay_out():
    from types import SimpleNamespace

    from clipterm.tui.command import check_browsable

    for tower in ("vit", "resnet", "convnext"):
        check_browsable(SimpleNamespace(shape=SimpleNamespace(tower=tower), name="c"))
    with pytest.raises(ClipTermError) as error:
        check_browsable(SimpleNamespace(shape=SimpleNamespace(tower="swin"), name="c"))
    assert error.value.code == ExitCode.UNSUPPORTED and "swin" in error.value.message and error.value.hint


def test_the_tui_browses_a_convnext_cache_by_its_last_stage_blocks(convnext):
    """The tree is embed, S3 (its blocks S3.B*) and bias; a block fills Descriptions, Ablation, Images and Info,
    and the panes that cannot apply to a ConvNeXt (spatial maps, visualisation, search by a component) say so in
    one line naming it. Every wait has a timeout, so a hang fails the test instead of blocking the run."""
    import asyncio

    from textual.widgets import Static

    from clipterm.inputs.texts import load_pool
    from clipterm.tui.app import ClipTermApp
    from clipterm.tui.widgets import AblationPane, DescriptionPane, InfoPane

    reader, loaded = convnext
    blocks = [f"S3.B{k}" for k in range(reader.shape.layers)]

    def text(app, pane) -> str:
        return str(app.query_one(pane).content)

    async def settle(app, pilot) -> None:
        await pilot.pause()
        await asyncio.wait_for(app.workers.wait_for_complete(), timeout=60)
        await pilot.pause()

    async def run() -> None:
        app = ClipTermApp(reader, cache_dir=str(reader.path.parent), loaded=loaded, pool="toy")
        async with app.run_test(size=(100, 30)) as pilot:
            await settle(app, pilot)
            assert [child.data for child in app.nodes["model"].children] == ["embed", "S3", "bias"]
            assert [child.data for child in app.nodes["S3"].children] == blocks
            assert sorted(["embed", "bias", *blocks]) == sorted(reader.components())
            assert app.hints["embed"].startswith("−") and app.hints["S3"].startswith("−")  # ablation drops
            assert app.hints["bias"] == "the same for every image"
            assert all(app.hints.get(b) in set(load_pool("toy").texts) for b in blocks)  # top TextSpan texts

            await pilot.press("j", "j", "j", "j")  # embed, S3, S3.B0, S3.B1: the keys walk the tree
            await settle(app, pilot)
            assert app.selected == "S3.B1"
            described = text(app, DescriptionPane).splitlines()
            rows = [line for line in described[1:] if not line.startswith("together")]
            assert "TextSpan" in described[0] and len(rows) == 10 and all("%" in line for line in rows)
            ablated = text(app, AblationPane)
            assert "S3 blocks" in ablated and all(b in ablated for b in blocks)
            assert "the whole stage S3" in ablated and "embed" in ablated and "MLP" not in ablated
            assert "block 1 of stage 3" in text(app, InfoPane)
            assert len(app.analyses.cached("images", "S3.B1").tiles) == reader.n  # 10 images, 12 asked for
            spatial = str(app.query_one("#spatial-status", Static).content)  # a block splits over the grid's cells
            assert spatial.startswith("S3.B1") and "direct effect along its own total effect" in spatial
            line = str(app.query_one("#visualise-status", Static).content)
            assert "cannot be computed for a ConvNeXt" in line and "\n" not in line

            for name, why in (("embed", "input of the last stage"), ("bias", "same for every image"),
                              ("S3", "whole stage")):
                app.jump(name)
                await settle(app, pilot)
                assert why in text(app, DescriptionPane) and "S3.B0" in text(app, DescriptionPane)
                assert "S3 blocks" in text(app, AblationPane)

    asyncio.run(asyncio.wait_for(run(), timeout=240))


def test_the_tui_browses_a_siglip_cache_with_its_pool(siglip):
    """The tree holds the layers and, after them, the MAP head's `pool` with pool.H*, pool.bias and pool.MLP."""
    import asyncio

    from clipterm.tui.app import ClipTermApp
    from clipterm.tui.widgets import DescriptionPane, InfoPane

    reader, loaded = siglip

    async def run() -> None:
        app = ClipTermApp(reader, cache_dir=str(reader.path.parent), loaded=loaded, pool="toy")
        async with app.run_test(size=(100, 30)) as pilot:
            assert all(name in app.nodes for name in ("L8.H2", "pool", "pool.H2", "pool.bias", "pool.MLP"))
            for name in ("pool.H1", "pool.MLP", "L8.H1"):
                app.jump(name)
                await pilot.pause()
                await app.workers.wait_for_complete()
                await pilot.pause()
                assert app.selected == name and "TextSpan" in str(app.query_one(DescriptionPane).content)
            app.jump("pool.H1")
            await pilot.pause()
            assert "head_out (N, 32)" in str(app.query_one(InfoPane).content)

    asyncio.run(run())
