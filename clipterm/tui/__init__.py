"""The Textual TUI: a model tree on the left, panes that follow the selection on the right.

Thin over the core: every number comes from `clipterm.analyses.textspan` and `clipterm.analyses.ablation`, computed in
thread workers (`clipterm.analyses.session.Analyses`). Importing this package does not import torch.
"""

from typing import Any

__all__ = ["ClipTermApp"]


def __getattr__(name: str) -> Any:  # lazy, so that `clipterm --help` (which registers `tui`) never loads textual
    if name == "ClipTermApp":
        from clipterm.tui.app import ClipTermApp

        return ClipTermApp
    raise AttributeError(name)
