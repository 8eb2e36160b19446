"""The TUI's Visualise pane: `v` streams a feature visualisation of the selection beside its dataset examples."""

from __future__ import annotations

import pytest
from test_tui import pilot, settle

from clipterm.tui.app import ClipTermApp


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory, toy):
    from clipterm.cache.build import BuildOptions, build_cache
    from clipterm.cache.reader import open_cache

    root = tmp_path_factory.mktemp("tui-visualise")
    build_cache(BuildOptions(images="toy:32", name="v32", cache_dir=str(root), workers=0), loaded=toy)
    return open_cache(root / "v32"), str(root)


def rendered(renderable, width: int) -> str:
    import io

    from rich.console import Console

    console = Console(width=width, record=True, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def text_of(app, selector) -> str:
    return str(app.query_one(selector).content)


@pilot
async def test_v_streams_frames_stops_and_memoises(small_cache, toy):
    import torch

    torch.set_num_threads(1)
    reader, root = small_cache
    app = ClipTermApp(reader, cache_dir=root, loaded=toy, hints=False)
    app.visual_steps = 12
    frames: list[int] = []
    async with app.run_test(size=(120, 40)) as pilot:
        original = app._visual_frame
        app._visual_frame = lambda frame: (frames.append(frame.step), original(frame))
        app.jump("L5.H3")
        await settle(app, pilot)
        assert "v: paint the image L5.H3 wants" in text_of(app, "#visualise-status")
        await pilot.press("tab", "tab", "tab", "tab", "tab")  # the Visualise pane
        await pilot.press("v")
        await app.workers.wait_for_complete()
        await settle(app, pilot)
        assert frames[0] == 1 and frames[-1] == 12 and len(frames) >= 3  # a frame at once, then every few steps
        assert app.visual_running is None
        status = text_of(app, "#visualise-status")
        assert status.startswith("L5.H3  effect") and "step 12/12" in status and "done" in status
        memo = app.analyses.cached("visualise", "L5.H3")
        assert memo is not None and memo.done and memo.tiles[0].pixels.shape == (32, 32, 3)
        drawn = rendered(app.query_one("#visualise-view").content, 120)
        assert "feature visualisation" in drawn and "dataset examples" in drawn and drawn.count("▀") >= 32 * 16
        # memoised: `v` again shows the finished frame without a new worker
        frames.clear()
        await pilot.press("v")
        await pilot.pause()
        assert app.visual_running is None and frames == []
        # a typed target; `v` stops it early
        app.visual_steps = 2000
        field = app.query_one("#visualise-target")
        field.value = "text:a red shape"
        await field.action_submit()
        for _ in range(400):
            await pilot.pause(0.05)
            if len(frames) >= 2:
                break
        assert app.visual_running == "text:a red shape"
        app.query_one("#tree").focus()
        await pilot.press("v")
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert app.visual_running is None and app.analyses.cached("visualise", "text:a red shape") is None
        assert "direction" in text_of(app, "#visualise-status")


@pilot
async def test_the_visualise_key_is_in_the_help_table(small_cache, toy):
    reader, root = small_cache
    app = ClipTermApp(reader, cache_dir=root, loaded=toy, hints=False)
    ids = {b.id for b in app.BINDINGS}
    assert "visualise.toggle" in ids
    async with app.run_test(size=(100, 40)) as pilot:
        app.jump("model")
        await settle(app, pilot)
        assert "select a head or a neuron" in text_of(app, "#visualise-status")
        app.action_help()
        await pilot.pause()
        assert "visualise.toggle" in rendered(app.screen.query_one("#help-table").content, 100)
