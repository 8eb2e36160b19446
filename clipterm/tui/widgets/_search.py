"""The Search pane: a target field, then the hill-climb's best strings as they stream in."""

from __future__ import annotations

from typing import Any

from rich.table import Table
from rich.text import Text
from textual.containers import Vertical

from clipterm.tui.widgets._query import QueryPane


class SearchPane(QueryPane, Vertical):
    """Type a target (or take the selection's) and press enter or `s`; `s` again stops the search."""

    ids = ("search-target", "search-status", "search-results")
    placeholder = "target: L5.H2, L4.N12, text:a red circle, class:red, text:red - text:blue"
    hint = "s: search for the selection · enter: search for the typed target · g: language-model guidance on/off"

    def show_message(self, message: str) -> None:  # the last results stay visible under a new status
        self.set_status(Text(message, style="dim"))

    def show_event(self, target: str, event: Any) -> None:
        """One streamed step: the beam, best first, with the search's pace and the language model guiding it."""
        state = ("done" + (f" ({event.reason})" if event.reason else "")) if event.done else "searching… s: stop"
        self.set_status(Text.assemble(
            (f"{target}", "bold"), f"  lm {event.lm or 'off'} · step {event.step} · {event.evals:,} strings scored · "
            f"{event.evals_per_s:,.0f}/s · {event.elapsed:.1f}s  ", (state, "dim")))
        table = Table("#", "string", "score", "cosine", "lm nll", expand=True, box=None, pad_edge=False)
        for rank, hit in enumerate(event.best, 1):
            nll = "" if hit.lm_nll is None else f"{hit.lm_nll:.2f}"
            table.add_row(str(rank), hit.text or "(empty)", f"{hit.score:.4f}", f"{hit.cosine:.4f}", nll)
        self.copy_text = "\n".join(hit.text for hit in event.best)
        self.set_body(table)
