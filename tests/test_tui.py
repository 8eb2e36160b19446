"""The TUI on a small toy cache, driven by Textual's pilot: select, read the panes, help, quit, resize."""

from __future__ import annotations

import asyncio
import functools
import subprocess
import sys

import pytest

from clipterm.tui.app import ClipTermApp
from clipterm.tui.widgets import AblationPane, DescriptionPane, InfoPane, bar


@pytest.fixture(scope="module")
def toy_cache(tmp_path_factory):
    """A 64-image fp32 cache of the shipped toy model, plus a cache root for pool embeddings."""
    import torch

    from clipterm.cache.build import BuildOptions, build_cache
    from clipterm.cache.reader import open_cache

    root = tmp_path_factory.mktemp("caches")
    torch.manual_seed(0)
    build_cache(BuildOptions(images="toy:64", name="toy64", cache_dir=str(root), workers=0, dtype="float32"))
    return open_cache(root / "toy64"), str(root)


def pilot(test):
    """Run an async pilot test with asyncio (no pytest async plugin needed); fixtures pass through."""
    @functools.wraps(test)
    def run(*args, **kwargs):
        asyncio.run(test(*args, **kwargs))

    return run


def pane_text(app: ClipTermApp, pane) -> str:
    return str(app.query_one(pane).content)


async def settle(app: ClipTermApp, pilot) -> None:
    await pilot.pause()
    await app.workers.wait_for_complete()
    await pilot.pause()


@pilot
async def test_selecting_a_head_fills_descriptions_ablation_and_info(toy_cache):
    from clipterm.inputs.texts import load_pool

    reader, root = toy_cache
    app = ClipTermApp(reader, cache_dir=root)
    async with app.run_test(size=(80, 24)) as pilot:
        assert "select a head" in pane_text(app, DescriptionPane)
        app.jump("L5.H3")
        await settle(app, pilot)
        assert app.selected == "L5.H3"
        described = pane_text(app, DescriptionPane)
        toy_texts = set(load_pool("toy").texts)
        shown = [line for line in described.splitlines()[1:] if not line.startswith("together")]
        assert len(shown) == 10 and all(line.split("% ", 1)[1] in toy_texts for line in shown)
        assert "together" in described
        assert "L5.H3" in pane_text(app, InfoPane) and "64" in pane_text(app, InfoPane)
        ablated = pane_text(app, AblationPane)
        assert all(f"L5.H{h}" in ablated for h in range(reader.shape.heads)) and "L5.MLP" in ablated
        assert app.analyses.cached("description", "L5.H3") is not None


@pilot
async def test_j_and_k_move_like_arrows_and_memoised_nodes_show_at_once(toy_cache):
    reader, root = toy_cache
    app = ClipTermApp(reader, cache_dir=root)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("j")  # root -> L0
        assert app.selected == "L0"
        await pilot.press("enter", "j")  # expand L0, then its first head
        assert app.selected == "L0.H0"
        await settle(app, pilot)
        await pilot.press("j", "k")
        assert app.selected == "L0.H0"
        assert "TextSpan over pool toy" in pane_text(app, DescriptionPane)  # memoised: no worker needed


@pilot
async def test_tab_cycles_panes_and_help_lists_binding_ids(toy_cache):
    from textual.widgets import TabbedContent

    from clipterm.tui.screens import HelpScreen

    reader, root = toy_cache
    app = ClipTermApp(reader, cache_dir=root)
    async with app.run_test(size=(80, 24)) as pilot:
        tabs = app.query_one(TabbedContent)
        assert tabs.active == "descriptions"
        await pilot.press("tab")
        assert tabs.active == "ablation"
        await pilot.press("tab", "tab", "tab", "tab", "tab", "tab")
        assert tabs.active == "descriptions"
        await pilot.press("shift+tab")
        assert tabs.active == "info"
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        table = app.screen.query_one("#help-table").content
        ids = {row for row in table.columns[1].cells}
        assert {"tree.down", "tree.up", "panes.next", "help", "quit"} <= ids
        await pilot.press("escape")
        assert not isinstance(app.screen, HelpScreen)
        await pilot.press("q")
    assert app.return_code == 0


@pilot
async def test_resize_to_40x10_and_back_keeps_working(toy_cache):
    reader, root = toy_cache
    app = ClipTermApp(reader, cache_dir=root)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.resize_terminal(40, 10)
        await pilot.press("j", "j")
        await pilot.resize_terminal(80, 24)
        await settle(app, pilot)
        assert app.is_running and app.selected == "L1"


@pilot
async def test_a_failing_worker_notifies_and_the_app_keeps_running(toy_cache, monkeypatch):
    reader, root = toy_cache
    app = ClipTermApp(reader, cache_dir=root, hints=False)

    def broken(component):
        raise RuntimeError("stats are gone")

    monkeypatch.setattr(app.analyses, "description", broken)
    titles: list[str] = []
    notify = app.notify
    monkeypatch.setattr(app, "notify", lambda message, **kw: (titles.append(kw.get("title")), notify(message, **kw)))
    async with app.run_test(size=(80, 24)) as pilot:
        app.jump("L2.MLP")
        await settle(app, pilot)
        assert titles == ["describe failed"]
        assert "failed: RuntimeError: stats are gone" in pane_text(app, DescriptionPane)
        assert "L2.MLP" in pane_text(app, AblationPane)  # the other worker still delivered
        await pilot.press("k")
        assert app.is_running and app.selected == "L2.H7"


@pilot
async def test_a_bundled_theme_applies(toy_cache):
    from clipterm.tui.themes import load_theme

    reader, root = toy_cache
    app = ClipTermApp(reader, cache_dir=root, theme=load_theme("clipterm-light"))
    async with app.run_test(size=(80, 24)):
        assert app.theme == "clipterm-light" and not app.current_theme.dark


def test_bar_fills_in_eighths():
    assert bar(1.0, 4) == "████" and bar(0.0, 4) == "    " and bar(0.5, 4) == "██  " and bar(1 / 16, 2) == "▏ "


def test_a_missing_cache_is_a_one_line_error_before_the_app_starts(cli):
    result = cli("tui", "no-such-cache")
    assert result.code == 3
    assert "no cache 'no-such-cache'" in result.err and "Traceback" not in result.err


def test_an_unknown_theme_is_a_clear_error(cli, toy_cache):
    reader, _ = toy_cache
    result = cli("tui", str(reader.path), "--theme", "no-such-theme")
    assert result.code == 3 and "no theme 'no-such-theme'" in result.err and "clipterm-dark" in result.err


FIRST_FRAME_PROBE = """
import sys
from clipterm.cache.reader import open_cache
from clipterm.tui.app import ClipTermApp

class Probe(ClipTermApp):
    def on_ready(self):  # after the first frame; Textual runs ClipTermApp.on_mount itself
        self.exit("torch" in sys.modules)

print("torch before first frame:", Probe(open_cache(sys.argv[1])).run(headless=True, size=(80, 24)))
"""


def test_the_first_frame_comes_before_torch_is_imported(toy_cache):
    reader, _ = toy_cache
    result = subprocess.run([sys.executable, "-c", FIRST_FRAME_PROBE, str(reader.path)], capture_output=True, text=True,
                            check=True, timeout=60)
    assert "torch before first frame: False" in result.stdout
