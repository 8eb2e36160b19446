"""The TUI's neuron, search, images, palette, filter, keymap and copy features on a toy cache with neurons."""

from __future__ import annotations

import pytest
from test_tui import pilot, settle

from clipterm.tui.app import ClipTermApp
from clipterm.tui.widgets import AblationPane, DescriptionPane, ImagesPane, SearchPane


@pytest.fixture(scope="module")
def neuron_cache(tmp_path_factory, toy):
    """64 toy images with the second-to-last layer's neurons built."""
    from clipterm.cache.build import BuildOptions, build_cache
    from clipterm.cache.neurons import build_neurons
    from clipterm.cache.reader import open_cache

    root = tmp_path_factory.mktemp("tui-neurons")
    build_cache(BuildOptions(images="toy:64", name="n64", cache_dir=str(root), workers=0), loaded=toy)
    reader = open_cache(root / "n64")
    build_neurons(reader, toy.info.layers - 2, device="cpu", loaded=toy, top_k=16)
    return open_cache(root / "n64"), str(root)


def browser(neuron_cache, toy, **options) -> ClipTermApp:
    """The app on the neuron cache with the toy model already loaded; no background hints unless asked."""
    reader, root = neuron_cache
    return ClipTermApp(reader, cache_dir=root, loaded=toy, **{"hints": False, **options})


def text_of(app, selector) -> str:
    widget = app.query_one(selector)
    return str(widget.content) if hasattr(widget, "content") else ""


def tree_labels(app) -> list[str]:
    from textual.widgets import Tree

    tree = app.query_one(Tree)
    return [str(tree.get_node_at_line(i).label) for i in range(tree.last_line + 1)]


@pilot
async def test_a_layers_neurons_load_when_its_mlp_expands_and_show_their_decomposition(neuron_cache, toy):
    layer = toy.info.layers - 2
    app = browser(neuron_cache, toy, hints=True)
    async with app.run_test(size=(100, 30)) as pilot:
        await settle(app, pilot)
        app.jump(f"L{layer}.MLP")
        await pilot.pause()
        app.nodes[f"L{layer}.MLP"].expand()
        await settle(app, pilot)
        neurons = [name for name in app.nodes if name.startswith(f"L{layer}.N")]
        norms = [row.norm for row in app.neuron_rows[layer]]
        assert len(neurons) == 64 and norms == sorted(norms, reverse=True)
        top = app.neuron_rows[layer][0]
        assert top.hint and top.hint in str(app.nodes[top.component].label)
        app.jump(top.component)
        await settle(app, pilot)
        described = text_of(app, DescriptionPane)
        assert "sparse decomposition over pool toy" in described and "cosine" in described
        images = app.query_one(ImagesPane)
        assert "top images by" in str(images.children[0].content)
        assert app.analyses.cached("images", top.component).tiles


@pilot
async def test_s_streams_a_search_for_the_selected_head_and_stops_it(neuron_cache, toy):
    app = browser(neuron_cache, toy)
    seen: list[int] = []
    async with app.run_test(size=(100, 30)) as pilot:
        original = app._search_event
        app._search_event = lambda target, event: (seen.append(event.step), original(target, event))
        app.jump("L5.H3")
        await settle(app, pilot)
        await pilot.press("tab", "tab")  # the Search pane
        await pilot.press("s")
        for _ in range(200):
            await pilot.pause(0.05)
            if len(seen) >= 3:
                break
        assert app.search_running == "L5.H3"
        await pilot.press("s")  # stop
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert app.search_running is None and len(seen) >= 3
        last = app.search_results["L5.H3"]
        assert last.done and last.reason in ("cancelled", "patience", "steps")
        assert "strings scored" in text_of(app, "#search-status") and "lm ngram:toy" in text_of(app, "#search-status")
        assert last.lm == "ngram:toy" and last.best[0].lm_nll is not None
        assert app.query_one(SearchPane).copy_text.splitlines()[0] == last.best[0].text


@pilot
async def test_g_toggles_language_model_guidance_of_the_next_search(neuron_cache, toy):
    app = browser(neuron_cache, toy)
    asked: list = []
    app.analyses.search = lambda target, cancel, **kw: (asked.append(kw.get("lm")), iter(()))[1]
    async with app.run_test(size=(100, 30)) as pilot:
        app.jump("L5.H3")
        await settle(app, pilot)
        await pilot.press("tab", "tab")  # the Search pane
        assert app.search_lm == "ngram" and "guidance by ngram" in text_of(app, "#search-status")
        await pilot.press("g")
        assert app.search_lm is None and "guidance off" in text_of(app, "#search-status")
        await pilot.press("s")
        await app.workers.wait_for_complete()
        await pilot.press("g", "s")
        await app.workers.wait_for_complete()
        assert asked == [None, "ngram"]


@pilot
async def test_the_palette_jumps_to_a_component_by_name(neuron_cache, toy):
    app = browser(neuron_cache, toy)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("ctrl+p")
        await pilot.pause()
        await pilot.press(*"L3.H2")
        await pilot.pause(0.5)
        await pilot.press("enter")
        await settle(app, pilot)
        assert app.selected == "L3.H2"
        assert app.query_one("Tree").cursor_node.data == "L3.H2"


@pilot
async def test_slash_filters_the_tree_and_escape_restores_it(neuron_cache, toy):
    reader, _ = neuron_cache
    app = browser(neuron_cache, toy)
    async with app.run_test(size=(100, 40)) as pilot:
        await pilot.press("slash", "H", "7")
        await pilot.pause()
        shown = {node for node in app.nodes if node != "model"}
        assert {n for n in shown if ".H" in n} == {f"L{l}.H7" for l in range(reader.shape.layers)}
        assert not any(name.endswith(".MLP") for name in shown)
        await pilot.press("escape")
        await pilot.pause()
        assert "L0.H0" in app.nodes and not app.query_one("#filter").display


@pilot
async def test_t_cycles_the_ablation_task_and_c_copies_the_pane(neuron_cache, toy):
    app = browser(neuron_cache, toy)
    async with app.run_test(size=(100, 40)) as pilot:
        app.jump("L2.H1")
        await settle(app, pilot)
        first = text_of(app, AblationPane)
        layers = app.analyses.cached("ablation", "layers")
        hurt_most = max(layers, key=lambda task: max(b.drop for b in layers[task].bars))
        assert f"task {hurt_most} " in first and "whole layers" in first and "L2.H1" in first
        await pilot.press("t")
        assert f"task {hurt_most} " not in text_of(app, AblationPane) and "task " in text_of(app, AblationPane)
        await pilot.press("c")  # the Descriptions pane is active
        assert app.clipboard.splitlines() == [row.text for row in app.analyses.cached("description", "L2.H1").rows]


@pilot
async def test_missing_parts_say_how_to_add_them(neuron_cache, toy):
    app = browser(neuron_cache, toy, images="off")
    async with app.run_test(size=(100, 30)) as pilot:
        app.jump("L1.MLP")
        await settle(app, pilot)
        assert not app.nodes["L1.MLP"].allow_expand  # no neurons file for L1
        assert "--images off" in str(app.query_one(ImagesPane).children[0].content)
        info = text_of(app, "#info-body")
        assert "L4" in info and "none" in info  # neurons: L4; tokens: none
        app.jump("L1.H0")
        await settle(app, pilot)
        assert "s: search" in text_of(app, "#search-status")
        app.jump("L1")
        await pilot.pause()
        assert "no direction" in text_of(app, "#search-status")


def test_keys_remap_by_id_from_the_config_file(cli, neuron_cache, tmp_path, monkeypatch):
    from clipterm.tui.config import load_keymap

    ids = {b.id for b in ClipTermApp.BINDINGS if b.id}
    config = tmp_path / "config.toml"
    config.write_text('[keys]\n"tree.down" = "n, down"\n')
    assert load_keymap(ids, config) == {"tree.down": "n,down"}
    config.write_text('[keys]\n"tree.sideways" = "x"\n')
    monkeypatch.setenv("CLIPTERM_CONFIG", str(tmp_path))
    reader, _ = neuron_cache
    result = cli("tui", str(reader.path))
    assert result.code != 0 and "no key binding with id 'tree.sideways'" in result.err and "tree.down" in result.err


@pilot
async def test_a_remapped_key_moves_the_tree(neuron_cache, toy):
    app = browser(neuron_cache, toy, keymap={"tree.down": "n"})
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("n")
        assert app.selected == "L0"


def test_images_auto_falls_back_to_half_blocks_under_tmux_or_without_a_terminal(monkeypatch):
    from clipterm.tui.command import resolve_images

    monkeypatch.setenv("TMUX", "/tmp/tmux-0/default,1,0")
    assert resolve_images("auto") == "half"
    monkeypatch.delenv("TMUX")
    assert resolve_images("auto") == "half"  # pytest's stdout is not a terminal
    assert resolve_images("off") == "off" and resolve_images("half") == "half"


@pilot
async def test_the_auto_image_mode_mounts_textual_image_widgets(neuron_cache, toy):
    from textual_image.widget import Image

    app = browser(neuron_cache, toy, images="auto")
    async with app.run_test(size=(120, 40)) as pilot:
        app.jump("L5.H0")
        await settle(app, pilot)
        tiles = app.analyses.cached("images", "L5.H0").tiles
        assert len(app.query_one(ImagesPane).query(Image)) == sum(t.pixels is not None for t in tiles) > 0


@pilot
async def test_the_spatial_pane_maps_the_selection_steps_images_and_takes_a_query(neuron_cache, toy):
    from clipterm.tui.widgets import SpatialPane

    reader, _ = neuron_cache
    app = browser(neuron_cache, toy)
    async with app.run_test(size=(100, 30)) as pilot:
        app.jump("L5.H3")
        await settle(app, pilot)
        top_row = app.analyses.cached("images", "L5.H3").tiles[0].row
        assert text_of(app, "#spatial-status").startswith(f"L5.H3 · row {top_row}")  # the selection's top image
        await pilot.press("right_square_bracket")
        await settle(app, pilot)
        assert text_of(app, "#spatial-status").startswith(f"L5.H3 · row {(top_row + 1) % reader.n}")
        field = app.query_one("#spatial-query")
        field.value = "a red star"
        await field.action_submit()
        await settle(app, pilot)
        assert text_of(app, "#spatial-status").startswith("“a red star” · row") and "minus contrast" in text_of(
            app, "#spatial-status")
        rows = app.query_one(SpatialPane).copy_text.splitlines()
        assert len(rows) == 8 and all(len(r.split()) == 8 for r in rows)  # the 8×8 patch grid of a 64px toy image
        app.jump("model")
        field.value = ""
        await field.action_submit()
        await pilot.pause()
        assert "select a layer" in text_of(app, "#spatial-status")
