"""`?`: every key binding, with its id (the name to remap it by) and what it does."""

from __future__ import annotations

from rich.table import Table
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static


class HelpScreen(ModalScreen[None]):
    """Lists the bindings it is given; any of escape, q or ? closes it."""

    BINDINGS = [Binding("escape,q,question_mark", "dismiss", "Close", id="help.close")]

    def __init__(self, bindings: list[Binding]):
        super().__init__()
        self.bindings = bindings

    def compose(self) -> ComposeResult:
        table = Table("key", "id", "action", title="clipterm keys", expand=True)
        for b in self.bindings:
            table.add_row(b.key.replace("question_mark", "?"), b.id or "", b.description)
        table.add_row("↑ ↓ ← → enter", "", "move, expand and collapse the tree")
        with VerticalScroll(id="help-body"):
            yield Static(table, id="help-table")

    def action_dismiss(self) -> None:  # type: ignore[override]
        self.dismiss()
