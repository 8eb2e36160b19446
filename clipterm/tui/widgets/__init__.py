"""Small single-purpose widgets: each pane renders state it is given and computes nothing."""

from clipterm.tui.widgets._images import IMAGE_MODES, ImagesPane
from clipterm.tui.widgets._panes import AblationPane, DescriptionPane, InfoPane, Pane, bar
from clipterm.tui.widgets._query import steady
from clipterm.tui.widgets._search import SearchPane
from clipterm.tui.widgets._spatial import SpatialPane
from clipterm.tui.widgets._visualise import VisualisePane

__all__ = ["AblationPane", "DescriptionPane", "IMAGE_MODES", "ImagesPane", "InfoPane", "Pane", "SearchPane", "SpatialPane", "VisualisePane",
           "bar", "steady"]
