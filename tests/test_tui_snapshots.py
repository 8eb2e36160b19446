"""SVG snapshots of the main screen and every pane at 80×24 and 160×48 (pytest-textual-snapshot).

Deterministic: a fixed toy cache, memoised results computed before the shot, no cursor blink, half-block
thumbnails, and search timings pinned. After a deliberate UI change: `pytest tests/test_tui_snapshots.py
--snapshot-update`, then look at the SVGs in tests/__snapshots__/.
"""

from __future__ import annotations

import dataclasses

import pytest
from test_tui_panes import neuron_cache  # noqa: F401  (a fixture)

from clipterm.tui.app import ClipTermApp

SIZES = [(80, 24), (160, 48)]


def shot(snap_compare, reader, root, toy, size, component, press=(), before=None):
    app = ClipTermApp(reader, cache_dir=root, loaded=toy, images="half")

    async def run_before(pilot):
        await pilot.pause()
        await app.workers.wait_for_complete()
        app.jump(component)
        await pilot.pause()
        await app.workers.wait_for_complete()
        if before is not None:
            before(app)
        await pilot.pause()

    return snap_compare(app, press=press, terminal_size=size, run_before=run_before)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("pane", ["descriptions", "ablation", "images", "spatial", "info"])
def test_pane_snapshots(snap_compare, neuron_cache, toy, size, pane):  # noqa: F811
    reader, root = neuron_cache
    presses = ["tab"] * {"descriptions": 0, "ablation": 1, "images": 3, "spatial": 4, "info": 6}[pane]
    component = "L5.H3" if pane != "images" else "L4.MLP"
    assert shot(snap_compare, reader, root, toy, size, component, press=presses)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_search_pane_snapshot(snap_compare, neuron_cache, toy, size):  # noqa: F811
    reader, root = neuron_cache

    def show_a_finished_search(app):
        from clipterm.tui.widgets import SearchPane

        *_, last = app.analyses.search("L5.H3", cancel=lambda: False, steps=4)
        pinned = dataclasses.replace(last, elapsed=1.0, evals_per_s=float(last.evals))
        app.query_one(SearchPane).show_event("L5.H3", pinned)

    assert shot(snap_compare, reader, root, toy, size, "L5.H3", press=["tab", "tab"], before=show_a_finished_search)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_visualise_pane_snapshot(snap_compare, neuron_cache, toy, size):  # noqa: F811
    reader, root = neuron_cache

    def show_a_finished_visualisation(app):
        import torch

        from clipterm.tui.widgets import VisualisePane

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # the same pixels however many cores run the test
        *_, last = app.analyses.visualise("L5.H3", cancel=lambda: False, steps=8)
        torch.set_num_threads(threads)
        pinned = dataclasses.replace(last, elapsed=1.0)
        app.query_one(VisualisePane).show_frame(pinned, app.analyses.cached("images", "L5.H3"))

    assert shot(snap_compare, reader, root, toy, size, "L5.H3", press=["tab"] * 5, before=show_a_finished_visualisation)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_neuron_and_help_snapshots(snap_compare, neuron_cache, toy, size):  # noqa: F811
    reader, root = neuron_cache

    def open_help(app):
        app.action_help()

    assert shot(snap_compare, reader, root, toy, size, "L4.N47", before=open_help)


def test_spatial_pane_two_factor_snapshot(snap_compare, neuron_cache, toy):  # noqa: F811
    """`nmf 2 classes` typed in the Spatial pane: two factors of the class attributions, blue and orange."""
    reader, root = neuron_cache
    app = ClipTermApp(reader, cache_dir=root, loaded=toy, images="half")

    async def type_the_request(pilot):
        await pilot.pause()
        await app.workers.wait_for_complete()
        app.jump("L5.H3")
        await pilot.pause()
        await app.workers.wait_for_complete()
        field = app.query_one("#spatial-query")
        field.value = "nmf 2 classes"
        await field.action_submit()
        await pilot.pause()
        await app.workers.wait_for_complete()
        await pilot.pause()
        assert "NMF factors of class attributions" in str(app.query_one("#spatial-status").render())

    assert snap_compare(app, press=["tab"] * 4, terminal_size=(100, 40), run_before=type_the_request)
