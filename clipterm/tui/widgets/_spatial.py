"""The Spatial pane: where in one cache image the selection (or a typed query) acts, as a heat map over it."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.widgets import Input, Static


class SpatialPane(VerticalScroll):
    """A query field, a status line and the map. Empty field: the selected component's map."""

    copy_text: str = ""

    def compose(self) -> ComposeResult:
        field = Input(placeholder="text query (a red star), class:red or nmf 3 — enter; empty: the selection",
                      id="spatial-query")
        field.cursor_blink = False  # calmer over SSH, deterministic in snapshots
        yield field
        yield Static(Text("[ and ]: previous / next image of the cache", style="dim"), id="spatial-status")
        yield Static("", id="spatial-map", classes="pane-body")

    @property
    def typed(self) -> str:
        return self.query_one("#spatial-query", Input).value.strip()

    def show_message(self, message: str) -> None:
        self.copy_text = ""
        self.query_one("#spatial-status", Static).update(Text(message, style="dim"))
        self.query_one("#spatial-map", Static).update("")

    def show(self, view: Any) -> None:
        self.copy_text = view.copy_text
        self.query_one("#spatial-status", Static).update(Text.assemble(
            (view.title, "bold"), f"  {view.about}  ", ("[ ]: other images", "dim")))
        self.query_one("#spatial-map", Static).update(view.renderable)
