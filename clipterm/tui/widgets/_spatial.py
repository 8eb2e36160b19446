"""The Spatial pane: where in one cache image the selection (or a typed query) acts, as a heat map over it."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.containers import VerticalScroll

from clipterm.tui.widgets._query import QueryPane


class SpatialPane(QueryPane, VerticalScroll):
    """A query field, a status line and the map. Empty field: the selected component's map."""

    ids = ("spatial-query", "spatial-status", "spatial-map")
    placeholder = "a red star, text:…, class:red, L5.H2, or nmf 3 — enter; empty: the selection"
    hint = "[ and ]: previous / next image of the cache"
    body_classes = "pane-body"

    def show(self, view: Any) -> None:
        self.copy_text = view.copy_text
        self.set_status(Text.assemble((view.title, "bold"), f"  {view.about}  ", ("[ ]: other images", "dim")))
        self.set_body(view.renderable)
