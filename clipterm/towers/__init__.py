"""Towers: one interface per family of image towers (`base.Tower`); `tower_for(shape)` picks one."""

from __future__ import annotations

from clipterm.names import ModelShape
from clipterm.towers.base import Tower
from clipterm.towers.convnext import ConvNextTower
from clipterm.towers.resnet import ResNetTower
from clipterm.towers.vit import VitTower

FAMILIES: dict[str, type[Tower]] = {cls.family: cls for cls in (VitTower, ResNetTower, ConvNextTower)}


def tower_for(shape: ModelShape) -> Tower:
    """The tower of a model's stored shape (a cache reader's `shape`, or a loaded model's)."""
    return FAMILIES[shape.tower](shape)


__all__ = ["FAMILIES", "ConvNextTower", "ResNetTower", "Tower", "VitTower", "tower_for"]
