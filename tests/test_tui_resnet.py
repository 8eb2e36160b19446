"""The TUI on a small ResNet cache, driven by Textual's pilot: the pool's heads and the last stage's channels
in the tree, and every pane either working on them or saying in one line why it does not apply."""

from __future__ import annotations

import pytest

from clipterm.tui.app import ClipTermApp
from clipterm.tui.widgets import AblationPane, DescriptionPane, InfoPane, SpatialPane
from tests.test_resnet import save_tiny_resnet
from tests.test_tui import pane_text, pilot, settle


@pytest.fixture(scope="module")
def rn_tui_cache(tmp_path_factory):
    """A 24-image fp32 cache of a seeded tiny ResNet (8 pool heads, 512 channels) with pool tokens and its L3 channels."""
    from clipterm.cache.build import BuildOptions, build_cache
    from clipterm.cache.neurons import build_neurons
    from clipterm.cache.reader import open_cache
    from clipterm.vit.models import load_model

    root = tmp_path_factory.mktemp("rn-tui")
    loaded = load_model(f"local-dir:{save_tiny_resnet(root / 'tiny-rn')}")
    build_cache(BuildOptions(images="toy:24", model=loaded.info.spec, name="rn", cache_dir=str(root / "caches"),
                             dtype="float32", tokens="all", neurons=True, device="cpu"), loaded=loaded)
    reader = open_cache(root / "caches" / "rn")
    build_neurons(reader, 3, device="cpu", top_k=4, loaded=loaded)
    return reader, str(root / "caches"), loaded


def app_for(rn_tui_cache) -> ClipTermApp:
    reader, root, loaded = rn_tui_cache
    return ClipTermApp(reader, pool="toy", cache_dir=root, loaded=loaded)


def children(node) -> list[str]:
    return [child.data for child in node.children]


@pilot
async def test_the_tree_is_the_pool_and_the_last_stage_with_hints(rn_tui_cache):
    app = app_for(rn_tui_cache)
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(app, pilot)
        tree_root = app.nodes["model"]
        assert children(tree_root) == ["pool", "L3"]
        assert children(app.nodes["pool"]) == [f"pool.H{h}" for h in range(8)] + ["pool.pos", "pool.bias"]
        assert app.hints["pool"].startswith("−") and app.hints["L3"] == "512 channels"
        assert app.hints["pool.bias"] == "the same for every image"
        assert all(app.hints.get(f"pool.H{h}") for h in range(8))  # each head's top TextSpan text
        app.nodes["L3"].expand()
        await settle(app, pilot)
        channels = children(app.nodes["L3"])
        assert len(channels) == 64 and all(name.startswith("L3.N") for name in channels)
        assert all(app.hints.get(name) for name in channels)  # each channel's first OMP text


@pilot
async def test_a_pool_head_fills_descriptions_ablation_images_spatial_and_info(rn_tui_cache):
    from clipterm.inputs.texts import load_pool

    app = app_for(rn_tui_cache)
    async with app.run_test(size=(100, 30)) as pilot:
        app.jump("pool.H3")
        await settle(app, pilot)
        await settle(app, pilot)  # the spatial map waits for the top image
        described = pane_text(app, DescriptionPane).splitlines()[1:]
        shown = [line for line in described if not line.startswith("together")]
        assert len(shown) == 10 and all(line.split("% ", 1)[1] in set(load_pool("toy").texts) for line in shown)
        ablated = pane_text(app, AblationPane)
        assert all(f"pool.H{h}" in ablated for h in range(8)) and "pool.pos" in ablated
        assert "the whole pool" in ablated and "MLP" not in ablated
        assert "head 3 of the attention pool" in pane_text(app, InfoPane)
        assert app.analyses.cached("images", "pool.H3").tiles
        view = app.query_one(SpatialPane).copy_text
        assert len(view.splitlines()) == 2  # the 2 x 2 grid the pool reads at 64 px
        assert "pool.H3" in str(app.query_one("#visualise-status").content)  # a pool head can be visualised


@pilot
async def test_a_channel_has_its_sparse_text_and_images_and_the_biases_say_why_they_have_none(rn_tui_cache):
    app = app_for(rn_tui_cache)
    async with app.run_test(size=(100, 30)) as pilot:
        channel = app.analyses.neurons(3)[0].component
        app.jump(channel)
        await settle(app, pilot)
        assert app.selected == channel and app.analyses.cached("description", channel).rows
        assert "channel" in pane_text(app, InfoPane) and "through the pool" in pane_text(app, InfoPane)
        assert app.analyses.cached("images", channel).tiles
        for part, why in (("pool.bias", "the same for every image"), ("pool.pos", "position, not image content")):
            app.jump(part)
            await settle(app, pilot)
            message = pane_text(app, DescriptionPane)
            assert why in message and "\n" not in message.strip()
        app.jump("L3")
        await settle(app, pilot)
        assert "select the pool, a pool head or a channel" in str(app.query_one("#spatial-status").content)


def test_pool_maps_are_labelled_pool_and_mean_token(rn_tui_cache, cli, monkeypatch):
    import json

    from clipterm.analyses import spatial

    reader, root, loaded = rn_tui_cache
    image = spatial.open_image("row:2", reader)
    stored = spatial.component_map(image, "pool.H3", reader=reader, loaded=loaded)
    assert stored.source == "cache" and stored.layer_names == "pool" and stored.first_token == "mean token"
    fresh = spatial.component_map(image, "pool.H3", loaded=loaded)  # one forward pass through the ResNet
    assert fresh.source == "forward" and (fresh.grid - stored.grid).abs().max() < 1e-5
    channel = spatial.component_map(image, "L3.N7", reader=reader, loaded=loaded)
    assert channel.grid.shape == (2, 2) and abs(channel.cls - float(reader.neurons("L3", rows=[2])[0, 7])) < 1e-4
    query = spatial.query_map(image, "text:a red circle", loaded=loaded, reader=reader, contrast=None)
    assert query.layer_names == "pool" and query.source == "cache" and query.grid.shape == (2, 2)
    from clipterm.analyses import factorise

    factors = factorise.factorise(image, 2, loaded=loaded, reader=reader)  # a ResNet's last-stage channels factor too
    assert factors is not None
    monkeypatch.setenv("CLIPTERM_CACHE", root)
    result = cli("spatial", "row:2", "--cache", "rn", "--component", "pool.H3", "--json")
    assert result.code == 0, result.err
    payload = json.loads(result.out)
    assert payload["layers"] == "pool" and payload["first_token"] == "mean token"
