"""A pane with a query field on top, a status line and a result body: the base of Search and Spatial."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.widgets import Input, Static


def steady(field: Input) -> Input:
    """An input without a blinking cursor: calmer over SSH, and deterministic in snapshots."""
    field.cursor_blink = False
    return field


class QueryPane:
    """Mixin for a container pane. Subclasses set the ids of the field, status line and body, the placeholder,
    the first status line and the body's classes. `copy_text` is what `c` copies."""

    ids = ("", "", "")  # field, status, body
    placeholder = ""
    hint = ""
    body_classes = ""
    copy_text: str = ""

    def compose(self) -> ComposeResult:
        field, status, body = self.ids
        yield steady(Input(placeholder=self.placeholder, id=field))
        yield Static(Text(self.hint, style="dim"), id=status)
        yield Static("", id=body, classes=self.body_classes)

    def suggest(self, target: str | None) -> None:
        """Offer the selection's target in the field, unless the user is typing there."""
        field = self.query_one(f"#{self.ids[0]}", Input)
        if not field.has_focus:
            field.value = target or ""

    @property
    def typed(self) -> str:
        return self.query_one(f"#{self.ids[0]}", Input).value.strip()

    def set_status(self, status: Text) -> None:
        self.query_one(f"#{self.ids[1]}", Static).update(status)

    def set_body(self, body: object) -> None:
        self.query_one(f"#{self.ids[2]}", Static).update(body)

    def show_message(self, message: str) -> None:
        self.copy_text = ""
        self.set_status(Text(message, style="dim"))
        self.set_body("")
