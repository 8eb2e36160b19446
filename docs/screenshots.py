"""Regenerate the TUI screenshots of the README and docs/tui.md (SVG, from Textual) on the toy-demo cache.

    python docs/screenshots.py            # builds the toy-demo cache first if it is missing
    python docs/screenshots.py tui-visualise.svg   # only the shots named
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
from pathlib import Path

from rich.console import Console

HERE = Path(__file__).resolve().parent
SHOTS = [  # (file, component, presses, run a search or a visualisation first)
    ("tui-descriptions.svg", "L2.H1", [], False),
    ("tui-neuron.svg", "L4.MLP", [], False),
    ("tui-ablation.svg", "L2.H1", ["tab"], False),
    ("tui-search.svg", "L2.H1", ["tab", "tab"], True),
    ("tui-images.svg", "L2.H1", ["tab", "tab", "tab"], False),
    ("tui-spatial.svg", "L3.H2", ["tab", "tab", "tab", "tab"], False),
    ("tui-visualise.svg", "L2.H1", ["tab"] * 5, "visualise"),
]


async def shoot(reader, loaded, name: str, component: str, presses: list[str], search: bool | str) -> None:
    from clipterm.tui.app import ClipTermApp
    from clipterm.tui.widgets import SearchPane, VisualisePane

    app = ClipTermApp(reader, loaded=loaded, images="half")
    async with app.run_test(size=(120, 34)) as pilot:
        await app.workers.wait_for_complete()
        if component.endswith(".MLP"):
            app.jump(component)
            await pilot.pause()
            app.nodes[component].expand()
            await app.workers.wait_for_complete()
            await pilot.pause()
            component = app.neuron_rows[int(component[1 : component.index(".")])][0].component
        app.jump(component)
        await pilot.pause()
        await app.workers.wait_for_complete()
        if search == "visualise":
            *_, last = app.analyses.visualise(component, cancel=lambda: False)
            app.query_one(VisualisePane).show_frame(last, app.analyses.cached("images", component))
        elif search:
            *_, last = app.analyses.search(component, cancel=lambda: False, steps=40)
            app.query_one(SearchPane).show_event(component, dataclasses.replace(last, done=False))
        await pilot.press(*presses)
        await pilot.pause()
        app.save_screenshot(filename=name, path=str(HERE))


def main() -> None:
    from clipterm.cli.demo import prepare

    loaded, reader = prepare(2000, Console(stderr=True))
    for name, component, presses, search in SHOTS:
        if sys.argv[1:] and name not in sys.argv[1:]:
            continue
        asyncio.run(shoot(reader, loaded, name, component, presses, search))
        print(HERE / name)


if __name__ == "__main__":
    main()
