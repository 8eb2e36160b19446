"""The layer sweep of Building Blocks' factorisations: per layer, how well the factors separate the objects of
an image (best-assignment IoU with the toy world's masks, when the image is a toy scene) and how many classes
each class factor spans. Its authors note that a high layer gives the large components of an image, a lower one
object parts or related classes, and the lowest noise; the sweep lets that be checked on any model.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import torch

from clipterm import names

MASK_SIZE = 64  # the toy world's image side, at which its masks are drawn


def object_masks(ref: str) -> list[Any] | None:
    """The toy world's object masks (S, S) bool of a `toy:SEED/INDEX` scene with two or more objects; else None."""
    from clipterm.inputs.images import toy_scene_of

    try:
        scene = toy_scene_of(ref)
    except ValueError:
        return None
    if scene is None or len(scene.objects) < 2:
        return None
    from clipterm.toyworld.world import render

    return [torch.from_numpy(mask) for mask in render(scene)[1]]


def iou(predicted: Any, mask: Any) -> float:
    return float((predicted & mask).sum() / (predicted | mask).sum().clamp(min=1))


def separation(factors: Any, masks: list[Any], rule: str = "half") -> float:
    """Mean IoU of the best assignment of distinct factors to the masks. `rule`: `half` (Factorisation.segments:
    a pixel is its strongest factor's where that is ≥ half its maximum) or `argmax` (every pixel is its strongest
    factor's, the rule k = 3 factors were scored by before)."""
    size = masks[0].shape[0]
    if rule == "half":
        parts = list(factors.segments(size))
    else:
        strongest = factors.assignment(size)
        parts = [strongest == i for i in range(len(factors.factors))]
    if len(parts) < len(masks):
        parts += [torch.zeros_like(masks[0])] * (len(masks) - len(parts))
    scores = [[iou(p, m) for m in masks] for p in parts]
    return max(sum(scores[f][m] for m, f in enumerate(chosen)) / len(masks)
               for chosen in itertools.permutations(range(len(parts)), len(masks)))


def overlap(factors: Any) -> float:
    """The mean cosine between the factors' maps (0: disjoint, 1: the same place); 0 for one factor."""
    grids = torch.stack([f.grid.flatten().float() for f in factors.factors])  # (k, P)
    if len(grids) < 2:
        return 0.0
    unit = grids / grids.norm(dim=1, keepdim=True).clamp(min=1e-12)
    cos = unit @ unit.T  # (k, k)
    k = len(grids)
    return float((cos.sum() - cos.diagonal().sum()) / (k * (k - 1)))


@dataclass
class SweepRow:
    layer: int
    factors: Any  # the Factorisation at this layer
    iou: float | None  # None where the image has no known masks
    overlap: float
    spans: list[float] = field(default_factory=list)  # classes each factor spans (class factors only)

    def to_json(self) -> dict[str, Any]:
        return {"layer": names.layer(self.layer), "iou": None if self.iou is None else round(self.iou, 4),
                "overlap": round(self.overlap, 4), "classes_spanned": [round(s, 3) for s in self.spans],
                "factors": self.factors.to_json()["factors"]}


def sweep(image: Any, layers: list[int], run: Any) -> list[SweepRow]:
    """`run(layer)` gives the Factorisation at one layer; each row scores it against the image's masks if any."""
    masks = object_masks(image.ref)
    rows = []
    for layer in layers:
        factors = run(layer)
        spans = [f.spread for f in factors.factors if f.spread is not None]
        rows.append(SweepRow(layer, factors, separation(factors, masks) if masks else None, overlap(factors), spans))
    return rows
