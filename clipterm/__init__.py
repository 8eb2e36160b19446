"""clipterm: explain what CLIP's vision transformer does, from the terminal."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import os

    from clipterm.cache.reader import CacheReader

__version__ = "0.1.0"


def open_cache(path_or_name: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> CacheReader:
    """Open a cache by path or by name under the cache root: `.effects("L10.H3")`, `.head_out(...)`,
    `.labels(task)`, `.images()`, `.manifest`. Imports torch only when called."""
    from clipterm.cache.reader import open_cache as _open_cache

    return _open_cache(path_or_name, cache_dir)


__all__ = ["__version__", "open_cache"]
