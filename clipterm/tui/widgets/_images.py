"""The Images pane: the selection's top images as terminal thumbnails with their scores.

`half` draws them with coloured half blocks (clipterm.thumbnails, the same as `clipterm images --show`),
which works in any true-colour terminal, inside tmux and in snapshots. `auto` uses textual-image, which
finds the terminal's best protocol (kitty graphics, sixel, or half cells).
"""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.containers import Grid, Vertical, VerticalScroll
from textual.widgets import Label, Static

IMAGE_MODES = ("auto", "half", "off")


class ImagesPane(VerticalScroll):
    """Top images of the selection; `mode` is one of IMAGE_MODES."""

    copy_text: str = ""

    def __init__(self, mode: str = "half", **kwargs: Any):
        super().__init__(**kwargs)
        self.mode = mode

    def show_message(self, message: str) -> None:
        self.remove_children()
        self.mount(Static(Text(message, style="dim"), classes="pane-body"))
        self.copy_text = ""

    def show(self, ranking: Any) -> None:
        self.remove_children()
        self.copy_text = "\n".join(tile.path or "" for tile in ranking.tiles)
        self.mount(Static(Text.assemble((ranking.component, "bold"), (f"  top images by {ranking.about}", "dim")),
                          classes="pane-body"))
        if self.mode == "auto":
            self._mount_protocol_images(ranking)
        else:
            from clipterm.thumbnails import ThumbnailGrid, Tile

            tiles = [Tile(t.pixels, t.caption) for t in ranking.tiles]
            size = len(ranking.tiles[0].pixels) if ranking.tiles and ranking.tiles[0].pixels is not None else 16
            self.mount(Static(ThumbnailGrid(tiles, size=size, gap=1), classes="pane-body"))

    def _mount_protocol_images(self, ranking: Any) -> None:
        from PIL import Image as PILImage
        from textual_image.widget import Image

        grid = Grid(classes="image-grid")
        self.mount(grid)
        for tile in ranking.tiles:
            if tile.pixels is None:
                grid.mount(Label(f"missing\n{tile.caption}", classes="image-tile"))
                continue
            cell = Vertical(classes="image-tile")
            grid.mount(cell)
            cell.mount(Image(PILImage.fromarray(tile.pixels), classes="image"))
            cell.mount(Label(tile.caption))

