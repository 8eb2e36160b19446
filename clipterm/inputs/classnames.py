"""Human class names for label folders named by WordNet id (ImageNet's `n01440764/...` layout).

ImageNet-1k's classes are numbered in sorted-wnid order, and open_clip's `IMAGENET_CLASSNAMES` lists
their names in that order. So a folder with exactly 1,000 wnid sub-folders gets those names (they make
`ablate`'s zero-shot prompts read "a photo of a tench", not "a photo of a n01440764"). A subset of the
classes cannot be placed without ImageNet's wnid list, which clipterm does not ship: it keeps the wnids,
and `ablate --classes FILE` supplies names.
"""

from __future__ import annotations

import re

WNID = re.compile(r"^n\d{8}$")
IMAGENET_CLASSES = 1000


def is_wnid_set(classes: list[str]) -> bool:
    return bool(classes) and all(WNID.match(name) for name in classes)


def wnid_names(classes: list[str]) -> list[str] | None:
    """open_clip's ImageNet names for the 1,000 sorted wnids of ImageNet-1k; None for anything else."""
    if len(classes) != IMAGENET_CLASSES or not is_wnid_set(classes) or classes != sorted(classes):
        return None
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return list(IMAGENET_CLASSNAMES)
