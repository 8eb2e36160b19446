"""Where clipterm keeps things: the cache root, the config dir, themes and the shipped toy model."""

from __future__ import annotations

import os
from pathlib import Path

APP = "clipterm"
PACKAGE_DIR = Path(__file__).resolve().parent
TOY_MODEL_DIR = PACKAGE_DIR / "toyworld" / "model"
# Themes are data files in the repo's top-level themes/; the wheel maps them to clipterm/themes.
BUNDLED_THEMES_DIR = PACKAGE_DIR / "themes" if (PACKAGE_DIR / "themes").is_dir() else PACKAGE_DIR.parent / "themes"


def cache_root(cache_dir: str | os.PathLike | None = None) -> tuple[Path, str]:
    """The cache root in use and why: `--cache-dir`, `$CLIPTERM_CACHE`, `./cache` in a checkout, or the user cache."""
    if cache_dir:
        return Path(cache_dir).expanduser(), "--cache-dir"
    if os.environ.get("CLIPTERM_CACHE"):
        return Path(os.environ["CLIPTERM_CACHE"]).expanduser(), "$CLIPTERM_CACHE"
    if Path("cache").is_dir():
        return Path("cache").resolve(), "./cache (a checkout)"
    from platformdirs import user_cache_dir

    return Path(user_cache_dir(APP)), "user cache dir"


def config_dir() -> Path:
    """The user's config dir (key bindings, settings)."""
    if os.environ.get("CLIPTERM_CONFIG"):
        return Path(os.environ["CLIPTERM_CONFIG"]).expanduser()
    from platformdirs import user_config_dir

    return Path(user_config_dir(APP))


def user_themes_dir() -> Path:
    return config_dir() / "themes"


def themes_dirs() -> list[Path]:
    """Theme folders in search order: the user's first, then the bundled ones."""
    return [user_themes_dir(), BUNDLED_THEMES_DIR]


def hub_cache_dirs() -> list[Path]:
    """Where pretrained weights may already lie: the Hugging Face hub cache and open_clip's URL cache."""
    hf_home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    hub = Path(os.environ["HF_HUB_CACHE"]) if os.environ.get("HF_HUB_CACHE") else hf_home / "hub"
    return [hub, Path.home() / ".cache" / "clip"]
