"""The Visualise pane: the image the selection (or a typed target) wants, refining live, beside its dataset examples."""

from __future__ import annotations

from typing import Any

from rich.table import Table
from rich.text import Text
from textual.containers import VerticalScroll

from clipterm.tui.widgets._query import QueryPane


class VisualisePane(QueryPane, VerticalScroll):
    """A target field, a status line, then the visualisation and the cache's top images side by side (Microscope)."""

    ids = ("visualise-target", "visualise-status", "visualise-view")
    placeholder = "target: L5.H2, L4.N12, text:a red shape, class:red — enter; empty: the selection"
    hint = "v: visualise the selection · enter: the typed target"
    body_classes = "pane-body"

    def show_frame(self, frame: Any, examples: Any = None) -> None:
        """One streamed frame (`session.VisualFrame`), with the component's top images when there are any."""
        from clipterm.thumbnails import ThumbnailGrid, Tile

        state = "done" if frame.done else "visualising… v: stop"
        self.set_status(Text.assemble((frame.target, "bold"), f"  {frame.kind} {frame.objective:+.4f} · step "
                                      f"{frame.step}/{frame.steps} · {frame.elapsed:.1f}s  ", (state, "dim")))
        layout = Table.grid(padding=(0, 2))
        layout.add_column()
        layout.add_column()
        picture = ThumbnailGrid([Tile(t.pixels, t.caption) for t in frame.tiles], size=32, gap=1) if frame.tiles else ""
        if examples is not None and examples.tiles:
            size = len(examples.tiles[0].pixels) if examples.tiles[0].pixels is not None else 16
            shown = ThumbnailGrid([Tile(t.pixels, t.caption) for t in examples.tiles[:6]], size=size, gap=1)
            layout.add_row(Text("feature visualisation", style="dim"), Text("dataset examples", style="dim"))
            layout.add_row(picture, shown)
        else:
            layout.add_row(Text("feature visualisation", style="dim"))
            layout.add_row(picture)
        self.copy_text = f"{frame.target}\t{frame.kind}\t{frame.objective:.6f}\tstep {frame.step}"
        self.set_body(layout)
