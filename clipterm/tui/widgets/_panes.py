"""The right-hand text panes. Each takes plain results (see `clipterm.analyses.session`) and renders them."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.widgets import Static

from clipterm import names
from clipterm.analyses.session import NeuronDescription

BAR_WIDTH = 20


def bar(fraction: float, width: int = BAR_WIDTH) -> str:
    """A horizontal bar of `width` cells, filled in eighths; negative values draw nothing."""
    eighths = round(max(0.0, min(1.0, fraction)) * width * 8)
    full, part = divmod(eighths, 8)
    return ("█" * full + (" ▏▎▍▌▋▊▉"[part] if part else "")).ljust(width)


class Pane(Static):
    """A pane body: a status line while waiting, then the rendered result. `copy_text` is what `c` copies."""

    copy_text: str = ""

    def show_message(self, message: str) -> None:
        self.copy_text = ""
        self.update(Text(message, style="dim"))


class DescriptionPane(Pane):
    """TextSpan texts of the selected head or MLP, or the sparse text decomposition of a neuron."""

    def show(self, description: Any) -> None:
        if isinstance(description, NeuronDescription):
            self._show_neuron(description)
            return
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
        self.copy_text = "\n".join(row.text for row in description.rows)
        self.update(out)

    def _show_neuron(self, description: Any, shown: int = 12) -> None:
        out = Text(no_wrap=True, overflow="ellipsis")
        out.append(f"{description.component}", style="bold")
        out.append(f"  sparse decomposition over pool {description.pool}, effect norm {description.norm:.3g}\n",
                   style="dim")
        rows = description.rows[:shown]
        top = max((abs(r.coefficient) for r in rows), default=0.0) or 1.0
        for k, row in enumerate(rows, 1):
            out.append(f"{k:>2} ")
            out.append(bar(abs(row.coefficient) / top, 12), style="green" if row.coefficient > 0 else "red")
            out.append(f" {row.coefficient:+6.3f} ")
            out.append(f"{row.text}\n")
        out.append(f"{len(description.rows)} texts rebuild the direction with cosine {description.cosine:.3f}",
                   style="dim")
        self.copy_text = "\n".join(f"{row.coefficient:+.4f} {row.text}" for row in description.rows)
        self.update(out)


class AblationPane(Pane):
    """Drop in score when each head of the current layer, and each layer, is mean-ablated; one task at a time."""

    def show(self, task: str, layer_index: int | None, layer: Any | None, layers: Any | None, selected: str | None,
             tasks: list[str], titles: tuple[str, str] | None = None) -> None:
        """`titles`: the two sections' headings (default: "L{l} heads and MLP", "whole layers")."""
        out = Text(no_wrap=True, overflow="ellipsis")
        first = layer if layer is not None else layers
        out.append(f"mean-ablation, task {task}", style="bold")
        if first is not None:
            out.append(f"  {first.metric} {100 * first.baseline:.1f}%", style="dim")
            if first.sample is not None:
                out.append(f"  on a random {first.sample:,} of the images", style="dim")
        if len(tasks) > 1:
            out.append(f"  (t: next of {len(tasks)} tasks)", style="dim")
        out.append("\n")
        lines = []
        if titles is None:
            titles = (f"{names.layer(layer_index)} heads and MLP" if layer_index is not None else "", "whole layers")
        for title, result in ((titles[0], layer), (titles[1], layers)):
            if result is None:
                continue
            out.append(f"{title}\n", style="underline")
            top = max((b.drop for b in result.bars), default=0.0) or 1.0
            for b in result.bars:
                style = "reverse bold" if b.component == selected else ""
                out.append(f"{b.component:<9}", style=style)
                out.append(" " + bar(b.drop / top, 16), style="red" if b.drop > 0 else "dim")
                out.append(f" {100 * b.drop:+5.1f}%", style=style)
                out.append(f"  [{100 * b.low:+.1f}, {100 * b.high:+.1f}]\n", style="dim")
                lines.append(f"{b.component}\t{b.drop:+.4f}")
        self.copy_text = "\n".join(lines)
        self.update(out)


class InfoPane(Pane):
    """Name, shapes and where the data came from."""

    FIELDS = [("component", "component"), ("what", "what"), ("shape", "shape"), ("cache", "cache"), ("n", "images"),
              ("model", "model"), ("source", "data"), ("tasks", "tasks"), ("neurons", "neurons"),
              ("tokens", "tokens"), ("pool", "text pool")]

    def show(self, info: dict[str, Any]) -> None:
        out = Text()
        for key, label in self.FIELDS:
            out.append(f"{label:>10}  ", style="bold")
            out.append(f"{info.get(key, '')}\n")
        self.copy_text = str(info.get("component", ""))
        self.update(out)
