"""Image thumbnails in the terminal: two pixels per character cell with the upper half block `▀`
(foreground = upper pixel, background = lower pixel). A rich renderable, so the CLI and TUI share it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PLACEHOLDER_RGB = (60, 60, 60)


def load_thumbnail(path: str | None, synthetic_id: str | None, size: int) -> Any:
    """An RGB thumbnail (size, size, 3) uint8 of a file or a `toy:SEED/INDEX` scene; None when it can't be read."""
    import numpy as np
    from PIL import Image

    from clipterm.images import SkipImage, decode

    try:
        if path is not None:
            image = decode(path, min_side=size)
        elif synthetic_id is not None and synthetic_id.startswith("toy:"):
            from clipterm.toyworld import world

            seed, index = synthetic_id[4:].split("/")
            image = Image.fromarray(world.render(world.scene_at(int(seed), int(index)))[0])
        else:
            return None
    except (SkipImage, ValueError):
        return None
    side = min(image.size)  # centre crop to a square, as CLIP's preprocess does
    left, upper = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, upper, left + side, upper + side)).resize((size, size), Image.BILINEAR)
    return np.asarray(image.convert("RGB"))


@dataclass
class Tile:
    pixels: Any  # (S, S, 3) uint8, or None for a placeholder
    caption: str


class ThumbnailGrid:
    """Tiles in rows that fit the console width, each with a one-line caption under it."""

    def __init__(self, tiles: list[Tile], size: int = 24, gap: int = 2):
        self.tiles, self.size, self.gap = tiles, size + size % 2, gap

    def __rich_console__(self, console: Any, options: Any) -> Any:
        from rich.style import Style
        from rich.text import Text

        per_row = max(1, (options.max_width + self.gap) // (self.size + self.gap))
        spacer = " " * self.gap
        for start in range(0, len(self.tiles), per_row):
            row = self.tiles[start : start + per_row]
            for y in range(0, self.size, 2):
                line = Text()
                for i, tile in enumerate(row):
                    if i:
                        line.append(spacer)
                    line.append_text(self._cells(tile, y, Style))
                yield line
            captions = Text()
            for i, tile in enumerate(row):
                if i:
                    captions.append(spacer)
                captions.append(tile.caption[: self.size].ljust(self.size), style="dim")
            yield captions

    def _cells(self, tile: Tile, y: int, style: Any) -> Any:
        from rich.text import Text

        text = Text()
        if tile.pixels is None:  # a grey box saying what is missing, in its middle row
            label = "missing" if y == self.size // 2 - (self.size // 2) % 2 else ""
            grey = f"rgb{PLACEHOLDER_RGB}".replace(" ", "")
            text.append(label.center(self.size)[: self.size], style=style(color="white", bgcolor=grey))
            return text
        for x in range(self.size):
            upper, lower = tile.pixels[y, x], tile.pixels[y + 1, x]
            text.append("▀", style=style(color=_rgb(upper), bgcolor=_rgb(lower)))
        return text


def _rgb(pixel: Any) -> str:
    return f"rgb({int(pixel[0])},{int(pixel[1])},{int(pixel[2])})"
