"""The Search pane: a target field, then the hill-climb's best strings as they stream in."""

from __future__ import annotations

from typing import Any

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Input, Static


class SearchPane(Vertical):
    """Type a target (or take the selection's) and press enter or `s`; `s` again stops the search."""

    copy_text: str = ""

    def compose(self) -> ComposeResult:
        field = Input(placeholder="target: L5.H2, L4.N12, text:a red circle, class:red, text:red - text:blue",
                      id="search-target")
        field.cursor_blink = False  # calmer over SSH, deterministic in snapshots
        yield field
        yield Static(Text("s: search for the selection · enter: search for the typed target", style="dim"),
                     id="search-status")
        yield Static("", id="search-results")

    @property
    def typed(self) -> str:
        return self.query_one("#search-target", Input).value.strip()

    def suggest(self, target: str | None) -> None:
        """Offer the selection's target in the field, unless the user is typing there."""
        field = self.query_one("#search-target", Input)
        if not field.has_focus:
            field.value = target or ""

    def show_message(self, message: str) -> None:
        self.query_one("#search-status", Static).update(Text(message, style="dim"))

    def show_event(self, target: str, event: Any) -> None:
        """One streamed step: the beam, best first, with the search's pace."""
        state = ("done" + (f" ({event.reason})" if event.reason else "")) if event.done else "searching… s: stop"
        self.query_one("#search-status", Static).update(Text.assemble(
            (f"{target}", "bold"), f"  step {event.step} · {event.evals:,} strings scored · "
            f"{event.evals_per_s:,.0f}/s · {event.elapsed:.1f}s  ", (state, "dim")))
        table = Table("#", "string", "score", "cosine", expand=True, box=None, pad_edge=False)
        for rank, hit in enumerate(event.best, 1):
            table.add_row(str(rank), hit.text or "(empty)", f"{hit.score:.4f}", f"{hit.cosine:.4f}")
        self.copy_text = "\n".join(hit.text for hit in event.best)
        self.query_one("#search-results", Static).update(table)
