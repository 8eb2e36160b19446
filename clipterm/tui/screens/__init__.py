"""Modal screens."""

from clipterm.tui.screens._help import HelpScreen

__all__ = ["HelpScreen"]
