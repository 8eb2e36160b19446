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

    def __init__(self, bindings: list[Binding], keymap: dict[str, str] | None = None):
        super().__init__()
        self.bindings, self.keymap = bindings, keymap or {}

    def compose(self) -> ComposeResult:
        table = Table("key", "id", "action", title="clipterm keys", expand=True)
        for b in self.bindings:
            key = self.keymap.get(b.id or "", b.key)
            table.add_row(key.replace("question_mark", "?").replace("slash", "/"), b.id or "", b.description)
        table.add_row("ctrl+p", "command_palette", "jump to a component by name, run an action")
        table.add_row("↑ ↓ enter space", "", "move in the tree, expand and collapse")
        with VerticalScroll(id="help-body"):
            yield Static(table, id="help-table")

    def action_dismiss(self) -> None:  # type: ignore[override]
        self.dismiss()
