"""The Textual TUI: a model tree on the left, panes that follow the selection on the right.

Thin over the core: every number comes from `clipterm.textspan` and `clipterm.ablation`, computed in
thread workers (`analyses.Analyses`). Importing this package does not import torch.
"""

from clipterm.tui.app import ClipTermApp

__all__ = ["ClipTermApp"]
