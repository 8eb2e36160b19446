"""Helpers for tests that damage or remove a small cache: build it once per module, hand each test a fresh copy."""

from __future__ import annotations

import shutil
from pathlib import Path

from clipterm.cache.build import BuildOptions, build_cache


def pristine_cache(toy, tmp_path_factory, label: str, images: int, shard_rows: int) -> Path:
    """A cache `pets` of `images` toy scenes in shards of `shard_rows`, built once; tests copy it before changing it."""
    root = tmp_path_factory.mktemp(label)
    build_cache(BuildOptions(images=f"toy:{images}", name="pets", cache_dir=str(root), shard_rows=shard_rows), loaded=toy)
    return root / "pets"


def root_holding(built: Path, root: Path, monkeypatch) -> Path:
    """`root` as the cache root ($CLIPTERM_CACHE), holding a fresh copy of `built`."""
    shutil.copytree(built, root / built.name)
    monkeypatch.setenv("CLIPTERM_CACHE", str(root))
    return root
