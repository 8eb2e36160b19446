"""The right-hand panes. Each takes plain results (see `clipterm.tui.analyses`) and renders them as text."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.widgets import Static

BAR_WIDTH = 20


def bar(fraction: float, width: int = BAR_WIDTH) -> str:
    """A horizontal bar of `width` cells, filled in eighths; negative values draw nothing."""
    eighths = round(max(0.0, min(1.0, fraction)) * width * 8)
    full, part = divmod(eighths, 8)
    return ("█" * full + (" ▏▎▍▌▋▊▉"[part] if part else "")).ljust(width)


class Pane(Static):
    """A pane body: a status line while waiting, then the rendered result."""

    def show_message(self, message: str) -> None:
        self.update(Text(message, style="dim"))


class DescriptionPane(Pane):
    """TextSpan texts of the selected head or MLP, with a bar for the variance each explains."""

    def show(self, description: Any) -> None:
        out = Text(no_wrap=True, overflow="ellipsis")  # one line per text, however narrow the terminal
        out.append(f"{description.component}", style="bold")
        out.append(f"  TextSpan over pool {description.pool}\n", style="dim")
        top = max((r.explained for r in description.rows), default=0.0) or 1.0
        for k, row in enumerate(description.rows, 1):
            out.append(f"{k:>2} ")
            out.append(bar(row.explained / top, 12), style="green")
            out.append(f" {100 * row.explained:5.1f}% ")
            out.append(f"{row.text}\n")
        if description.rows:
            out.append(f"together {100 * description.rows[-1].cumulative:.1f}% of the variance", style="dim")
        self.update(out)


class AblationPane(Pane):
    """Drop in score when each head (and the MLP) of the current layer is mean-ablated; the selection is highlighted."""

    def show(self, result: Any, selected: str | None) -> None:
        out = Text(no_wrap=True, overflow="ellipsis")
        out.append(f"L{result.layer} mean-ablated, {result.task}", style="bold")
        out.append(f"  {result.metric} {100 * result.baseline:.1f}%\n", style="dim")
        top = max((b.drop for b in result.bars), default=0.0) or 1.0
        for b in result.bars:
            style = "reverse bold" if b.component == selected else ""
            out.append(f"{b.component:<9}", style=style)
            out.append(" " + bar(b.drop / top, 16), style="red" if b.drop > 0 else "dim")
            out.append(f" {100 * b.drop:+5.1f}%", style=style)
            out.append(f"  [{100 * b.low:+.1f}, {100 * b.high:+.1f}]\n", style="dim")
        self.update(out)


class InfoPane(Pane):
    """Name, shapes and where the data came from."""

    FIELDS = [("component", "component"), ("what", "what"), ("shape", "shape"), ("cache", "cache"), ("n", "images"),
              ("model", "model"), ("source", "data"), ("tasks", "tasks"), ("pool", "text pool")]

    def show(self, info: dict[str, Any]) -> None:
        out = Text()
        for key, label in self.FIELDS:
            out.append(f"{label:>10}  ", style="bold")
            out.append(f"{info.get(key, '')}\n")
        self.update(out)
