"""Image thumbnails in the terminal: two pixels per character cell with the upper half block `▀`
(foreground = upper pixel, background = lower pixel). A rich renderable, so the CLI and TUI share it.
`heat_overlay` and `factor_overlay` colour a thumbnail by a map (`clipterm spatial`) before it is drawn."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PLACEHOLDER_RGB = (60, 60, 60)
# Distinct colours for factors, Building-Blocks style: factor i is drawn in FACTOR_RGB[i % len(FACTOR_RGB)].
FACTOR_RGB = ((230, 60, 60), (60, 140, 240), (250, 200, 40), (60, 200, 90), (200, 80, 220), (40, 210, 210),
              (245, 130, 40), (240, 240, 240))
# Two factors as Building Blocks draws them: one blue, one orange, brightness for magnitude.
TWO_FACTOR_RGB = ((40, 120, 255), (255, 140, 20))
# The heat ramp, low to high: dark blue, purple, red, yellow.
HEAT_STOPS = ((20, 20, 90), (120, 30, 150), (230, 50, 50), (255, 230, 60))


def load_thumbnail(path: str | None, synthetic_id: str | None, size: int) -> Any:
    """An RGB thumbnail (size, size, 3) uint8 of a file or a `toy:SEED/INDEX` scene; None when it can't be read."""
    from clipterm.inputs.images import SkipImage, decode, synthetic_image

    try:
        if path is not None:
            image = decode(path, min_side=size, fast=True)  # for display only
        elif synthetic_id is not None:
            image = synthetic_image(synthetic_id)
        else:
            return None
    except (SkipImage, ValueError):
        return None
    return square(image, size)


def square(image: Any, size: int) -> Any:
    """A PIL image centre-cropped to a square, as CLIP's preprocess does, and resized: (size, size, 3) uint8."""
    import numpy as np
    from PIL import Image

    side = min(image.size)
    left, upper = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, upper, left + side, upper + side)).resize((size, size), Image.BILINEAR)
    return np.asarray(image.convert("RGB"))


def heat_overlay(pixels: Any, heat: Any, alpha: float = 0.65) -> Any:
    """The image in grey with a heat map (S, S) in [0, 1] blended over it in the HEAT_STOPS ramp: (S, S, 3) uint8."""
    import numpy as np

    stops = np.asarray(HEAT_STOPS, dtype=np.float32)  # (K, 3)
    position = np.clip(np.asarray(heat, dtype=np.float32), 0, 1) * (len(stops) - 1)  # (S, S)
    low = np.minimum(position.astype(int), len(stops) - 2)  # (S, S)
    frac = (position - low)[..., None]  # (S, S, 1)
    colour = stops[low] * (1 - frac) + stops[low + 1] * frac  # (S, S, 3)
    return _blend(pixels, colour, alpha * (0.4 + 0.6 * position[..., None] / (len(stops) - 1)))  # cold: image shows


def factor_palette(k: int) -> list[tuple[int, int, int]]:
    """Factor i's colour: blue and orange for two factors, else FACTOR_RGB in turn."""
    return list(TWO_FACTOR_RGB) if k == 2 else [FACTOR_RGB[i % len(FACTOR_RGB)] for i in range(k)]


def factor_overlay(pixels: Any, strengths: Any, alpha: float = 0.8, k: int | None = None) -> Any:
    """Each pixel in the colour of its strongest factor, as opaque as that factor is strong; with two factors,
    as Building Blocks draws them: blue plus orange, each as bright as its factor is strong, over a dark image.

    `strengths` is (k, S, S) in [0, 1] (each factor's map over its own maximum); `k` the palette's size when some
    rows are left at 0 (one factor drawn alone); returns (S, S, 3) uint8."""
    import numpy as np

    strengths = np.clip(np.asarray(strengths, dtype=np.float32), 0, 1)  # (k, S, S)
    palette = np.asarray(factor_palette(k or len(strengths)), dtype=np.float32)  # (k, 3)
    if len(palette) == 2:
        light = np.einsum("kij,kc->ijc", strengths, palette)  # (S, S, 3) brightness = magnitude
        grey = np.asarray(pixels, dtype=np.float32).mean(-1, keepdims=True) * 0.25  # (S, S, 1) a faint image under it
        return np.clip(grey + light, 0, 255).astype(np.uint8)
    colour = palette[strengths.argmax(0)]  # (S, S, 3)
    return _blend(pixels, colour, alpha * strengths.max(0)[..., None])


def _blend(pixels: Any, colour: Any, alpha: Any) -> Any:
    import numpy as np

    grey = np.asarray(pixels, dtype=np.float32).mean(-1, keepdims=True) * 0.6  # (S, S, 1) dimmed, so colours stand out
    return np.clip(grey * (1 - alpha) + colour * alpha, 0, 255).astype(np.uint8)


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


def map_view(result: Any, pixels: Any, caption: str, size: int = 32) -> Any:
    """A rich renderable: the image (S, S, 3) uint8 or None, then a SpatialMap's heat over it, or a Factorisation's
    factors in distinct colours (all together, then each alone) with a legend of their nearest texts."""
    import numpy as np
    from rich.console import Group
    from rich.text import Text

    from clipterm.analyses.factorise import Factorisation

    base = pixels if pixels is not None else np.full((size, size, 3), PLACEHOLDER_RGB, dtype=np.uint8)
    tiles = [Tile(pixels, caption)]
    if not isinstance(result, Factorisation):
        tiles.append(Tile(heat_overlay(base, result.normalised(size).numpy()), result.title))
        return ThumbnailGrid(tiles, size)
    strengths = result.strengths(size).numpy()  # (k, S, S)
    tiles.append(Tile(factor_overlay(base, strengths), "blue and orange" if len(strengths) == 2
                      else f"{len(strengths)} factors"))
    legend, palette = [], factor_palette(len(strengths))
    for i, factor in enumerate(result.factors):
        alone = np.zeros_like(strengths)
        alone[i] = strengths[i]
        tiles.append(Tile(factor_overlay(base, alone), f"factor {i + 1}"))
        line = Text("■ ", style=_rgb(palette[i]))
        line.append(f"factor {i + 1} ({100 * factor.share:.0f}%)  ", style="bold")
        line.append(" · ".join(f"{text} ({value:.2f})" if result.of == "classes" else text
                               for text, value in factor.texts[:4]))
        legend.append(line)
    return Group(ThumbnailGrid(tiles, size), *legend)


def _rgb(pixel: Any) -> str:
    return f"rgb({int(pixel[0])},{int(pixel[1])},{int(pixel[2])})"
