"""Small single-purpose widgets: each pane renders state it is given and computes nothing."""

from clipterm.tui.widgets._panes import AblationPane, DescriptionPane, InfoPane, bar

__all__ = ["AblationPane", "DescriptionPane", "InfoPane", "bar"]
