"""Statistics of a picture measured against the toy world's own palette, never by a model.

Used to check feature visualisations (`clipterm visualise`) against ground truth: which of the world's object
colours dominates an image, and how much of each background kind (brightness, stripes, noise) it shows.
"""

from __future__ import annotations

import numpy as np

from clipterm.toyworld.world import _BG_LEVEL, BACKGROUNDS, COLOURS, IMAGE_SIZE

# The world's greys: the dark and light levels, the two stripe levels and the middle of the noise range.
GREYS = (_BG_LEVEL["dark"], 70, 120, 190, _BG_LEVEL["light"])
PALETTE = np.array([*COLOURS.values(), *[(g, g, g) for g in GREYS]], dtype=np.float32)  # (8 + 5, 3)
NEAR = 80.0  # a pixel votes for its nearest palette entry only when it is this close (RGB distance)
STRIPE_PERIOD = 8  # the striped background repeats every 8 pixels (4 light, 4 dark)


def colour_votes(pixels: np.ndarray) -> np.ndarray:
    """(8,) pixels of an image (S, S, 3) uint8 nearest to each object colour (greys and far pixels don't vote)."""
    flat = pixels.reshape(-1, 3).astype(np.float32)  # (P, 3)
    distance = np.sqrt(((flat[:, None] - PALETTE) ** 2).sum(-1))  # (P, 13)
    nearest = distance.argmin(-1)  # (P,)
    voting = (nearest < len(COLOURS)) & (distance.min(-1) < NEAR)
    return np.bincount(nearest[voting], minlength=len(PALETTE))[: len(COLOURS)]


def dominant_colour(pixels: np.ndarray) -> str | None:
    """The world colour most pixels are nearest to, or None when no pixel is near any."""
    votes = colour_votes(pixels)
    return list(COLOURS)[int(votes.argmax())] if votes.max() > 0 else None


def background_scores(pixels: np.ndarray) -> dict[str, float]:
    """How much an image (S, S, 3) looks like each background, on the world's 64-pixel scale.

    light: mean brightness; dark: its negative; striped: the power of the grey image at the stripe frequency
    (any orientation) over the total power; noisy: the mean squared difference of neighbouring pixels."""
    from PIL import Image

    grey = np.asarray(Image.fromarray(pixels).convert("L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR), np.float32)
    brightness = float(grey.mean()) / 255
    centred = grey - grey.mean()
    power = np.abs(np.fft.fft2(centred)) ** 2  # (S, S)
    fy, fx = np.meshgrid(np.fft.fftfreq(IMAGE_SIZE), np.fft.fftfreq(IMAGE_SIZE), indexing="ij")
    radius = np.hypot(fy, fx)  # (S, S)
    band = np.abs(radius - 1 / STRIPE_PERIOD) < 0.5 / IMAGE_SIZE * 2
    stripes = float(power[band].sum() / max(power.sum(), 1e-9))
    noise = float((np.diff(grey, axis=0) ** 2).mean() + (np.diff(grey, axis=1) ** 2).mean()) / 255**2
    return {"light": brightness, "dark": -brightness, "striped": stripes, "noisy": noise}


def background_wins(images: dict[str, np.ndarray]) -> dict[str, bool]:
    """For images keyed by background kind: does each score highest on its own kind's statistic among them all?"""
    scores = {kind: background_scores(pixels) for kind, pixels in images.items()}
    return {kind: max(scores, key=lambda other: scores[other][kind]) == kind for kind in images if kind in BACKGROUNDS}


def mean_correlation(images: np.ndarray) -> float:
    """Mean Pearson correlation of the pixels of every pair of images (K, S, S, 3)."""
    flat = images.reshape(len(images), -1).astype(np.float64)  # (K, P)
    matrix = np.corrcoef(flat)  # (K, K)
    upper = np.triu_indices(len(images), 1)
    return float(matrix[upper].mean())
