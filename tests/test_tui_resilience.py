"""The TUI under abuse: a tiny terminal, 200 random keys, a cache that isn't there."""

from __future__ import annotations

import asyncio
import random

from test_tui import pilot, settle, toy_cache  # noqa: F401  (the 64-image toy cache fixture, shared)
from textual.binding import Binding
from textual.widgets import TabbedContent, Tree
from textual.worker import Worker, WorkerState
from tui_helpers import screen_text, type_fast

from clipterm.cache import store
from clipterm.errors import ClipTermError
from clipterm.tui.app import ClipTermApp
from clipterm.tui.widgets import DescriptionPane

QUITS = {"q", "ctrl+c", "ctrl+q"}
# ctrl+p is left out: the palette's system commands include quit and save-screenshot (a file in the cwd).
NOT_FUZZED = QUITS | {"ctrl+p"}


class Watched(ClipTermApp):
    """The app, recording every worker that fails (the app's own handler still runs: Textual walks the MRO)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.worker_errors: list[BaseException] = []

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.state == WorkerState.ERROR:
            self.worker_errors.append(event.worker.error)


# A fixed key universe keeps the seeded sequence the same as the app gains bindings; those are pressed after.
UNIVERSE = sorted({"up", "down", "left", "right", "enter", "tab", "shift+tab", "escape", "space", "backspace",
                   "question_mark", "slash"} | set("abcdefghijklmnopqrstuvwxyz0123456789") - NOT_FUZZED)
MOVES = ["j", "j", "j", "down", "l", "right", "enter", "k", "up", "h", "tab", "escape"]  # drifting down the tree


def fuzz_keys(app: ClipTermApp, count: int = 200, seed: int = 2) -> list[str]:
    """`count` seeded presses (half of them moves) over letters, digits, arrows, enter, tab...; then every other
    key the app binds, once; nothing that quits."""
    rng = random.Random(seed)
    pressed = [rng.choice(MOVES if rng.random() < 0.5 else UNIVERSE) for _ in range(count)]
    bound = {key.strip() for b in app.BINDINGS if isinstance(b, Binding) for key in b.key.split(",")}
    return pressed + sorted(bound - set(UNIVERSE) - NOT_FUZZED)


async def back_to_the_tree(app: ClipTermApp, pilot) -> None:
    """Close whatever the keys opened (help, filter) until the main screen's tree has focus."""
    for _ in range(5):
        if len(app.screen_stack) == 1 and not app.query_one("#filter").display and app.focused is app.query_one(Tree):
            return
        await pilot.press("escape")
        if len(app.screen_stack) == 1 and app.focused is not app.query_one(Tree):
            app.query_one(Tree).focus()
            await pilot.pause()
    raise AssertionError(f"could not get back to the tree: screens {app.screen_stack}, focus {app.focused}")


@pilot
async def test_a_40x10_terminal_and_back_keeps_every_pane_working(toy_cache):  # noqa: F811
    reader, root = toy_cache
    app = Watched(reader, cache_dir=root)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.resize_terminal(40, 10)
        assert app.size == (40, 10)
        await pilot.press("j", "enter")  # expand L0 while tiny
        await pilot.pause()
        await pilot.press("j", "tab", "question_mark")
        assert "clipterm keys" in screen_text(app)  # the help screen renders at 40x10, clipped
        await pilot.press("escape", "shift+tab")
        await settle(app, pilot)
        tiny = screen_text(app)
        assert "▼ L0" in tiny and "L0.H0  TextSpan" in tiny  # the tree and the description still draw, clipped

        await pilot.resize_terminal(80, 24)
        await settle(app, pilot)
        assert app.size == (80, 24) and app.is_running
        tree, panes = app.query_one(Tree), app.query_one(TabbedContent)
        assert tree.region.width > 10 and panes.region.width > 30 and panes.region.x >= tree.region.right
        assert tree.region.height > 10
        assert app.selected == "L0.H0" and panes.active == "descriptions"
        assert str(app.query_one(DescriptionPane).content).startswith("L0.H0  TextSpan over pool toy")
        full = screen_text(app)
        assert "L5" in full and "TextSpan over pool toy" in full and "of the variance" in full  # nothing clipped
        await pilot.press("j")
        assert app.selected == "L0.H1"
        assert app.worker_errors == []
        await pilot.press("q")
    assert app.return_code == 0


@pilot
async def test_200_random_keys_leave_the_app_running_and_q_still_quits(toy_cache, monkeypatch):  # noqa: F811
    reader, root = toy_cache
    app = Watched(reader, cache_dir=root)
    # `s` starts a real hill-climb (the search tests cover it); here it only has to start and stop
    monkeypatch.setattr(app.analyses, "search", lambda target, cancel, **kw: iter(()))
    monkeypatch.setattr(app.analyses, "visualise", lambda target, cancel, **kw: iter(()))  # the same for `v`
    pressed = fuzz_keys(app)
    assert {"j", "k", "tab", "question_mark", "slash", "enter", "s", "t", "c"} <= set(pressed)
    assert not QUITS & set(pressed) and len(pressed) >= 200
    selected = set()
    async with app.run_test(size=(80, 24)) as pilot:
        for key in pressed:
            await type_fast(app, pilot, key)
            assert app.is_running, f"the app stopped after {key!r}"
            selected.add(app.selected)
        assert any(".H" in name for name in selected), "the keys never reached a head: try another seed"
        await asyncio.wait_for(app.workers.wait_for_complete(), timeout=60)
        await pilot.pause()
        assert app.is_running
        unexpected = [e for e in app.worker_errors if not isinstance(e, ClipTermError)]
        assert unexpected == [], f"workers failed: {unexpected!r}"

        await back_to_the_tree(app, pilot)
        app.jump("L3.H2")
        await settle(app, pilot)
        assert app.selected == "L3.H2"
        assert str(app.query_one(DescriptionPane).content).startswith("L3.H2  TextSpan over pool toy")
        await pilot.press("q")
    assert app.return_code == 0 and not app.is_running


def test_a_missing_cache_is_one_clear_line_and_no_app_starts(cli, monkeypatch, tmp_path):
    from textual.app import App

    started = []
    monkeypatch.setattr(App, "run", lambda self, *a, **k: started.append(self))
    monkeypatch.setattr(App, "run_async", lambda self, *a, **k: started.append(self))

    result = cli("tui", "nonexistent")
    assert result.code != 0 and result.out == ""
    lines = result.err.strip().splitlines()
    assert lines[0].startswith("error:") and "nonexistent" in lines[0] and "cache" in lines[0]
    assert len(lines) <= 2 and "Traceback" not in result.err  # the error, then at most a hint

    (tmp_path / "empty").mkdir()
    result = cli("tui", str(tmp_path / "empty"))
    assert result.code != 0 and "not a cache" in result.err and "clipterm cache build" in result.err
    assert started == []


def test_an_interrupted_cache_is_refused_before_the_app_starts(cli, monkeypatch, tmp_path, toy_cache):  # noqa: F811
    import json

    from textual.app import App

    reader, _ = toy_cache
    started = []
    monkeypatch.setattr(App, "run", lambda self, *a, **k: started.append(self))
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    manifest = json.loads((reader.path / "manifest.json").read_text())
    store.write_manifest(stopped, {**manifest, "complete": False})
    result = cli("tui", str(stopped))
    assert result.code != 0 and "incomplete" in result.err and "resume" in result.err
    assert started == []
