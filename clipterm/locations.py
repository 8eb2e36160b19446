"""Where clipterm keeps things: the cache root, the config dir, themes and the shipped toy model."""

from __future__ import annotations

import os
from pathlib import Path

APP = "clipterm"
PACKAGE_DIR = Path(__file__).resolve().parent
TOY_MODEL_DIR = PACKAGE_DIR / "toyworld" / "model"  # toy: the toy ViT trained on world 2, every task learned
TOY_V1_MODEL_DIR = PACKAGE_DIR / "toyworld" / "model_v1"  # toy-v1: the first toy ViT, world 1 (half its tasks)
TOY_RN_MODEL_DIR = PACKAGE_DIR / "toyworld" / "model_rn"  # toy-rn: a small ModifiedResNet, recipe 2 on world 2
TOY_RN_V1_MODEL_DIR = PACKAGE_DIR / "toyworld" / "model_rn_v1"  # toy-rn-v1: the first toy-rn, world 1 (no shape, no word)
TOY_MODEL_DIRS = {"toy": TOY_MODEL_DIR, "toy-v1": TOY_V1_MODEL_DIR, "toy-rn": TOY_RN_MODEL_DIR,
                  "toy-rn-v1": TOY_RN_V1_MODEL_DIR}  # the built-in specs
# Themes are data files in the repo's top-level themes/; the wheel maps them to clipterm/themes.
BUNDLED_THEMES_DIR = PACKAGE_DIR / "themes" if (PACKAGE_DIR / "themes").is_dir() else PACKAGE_DIR.parent / "themes"


def cache_root(cache_dir: str | os.PathLike | None = None) -> tuple[Path, str]:
    """The cache root in use and why: `--cache-dir`, `$CLIPTERM_CACHE`, `./cache` in a checkout of clipterm, or
    the user cache. A root that exists but is not a folder is an error."""
    if cache_dir:
        root, why = Path(cache_dir).expanduser(), "--cache-dir"
    elif os.environ.get("CLIPTERM_CACHE"):
        root, why = Path(os.environ["CLIPTERM_CACHE"]).expanduser(), "$CLIPTERM_CACHE"
    elif Path("cache").is_dir() and in_checkout(Path.cwd()):
        root, why = Path("cache").resolve(), "./cache (a checkout of clipterm)"
    else:
        from platformdirs import user_cache_dir

        root, why = Path(user_cache_dir(APP)), "user cache dir"
    if root.exists() and not root.is_dir():
        from clipterm.errors import ClipTermError

        raise ClipTermError(f"the cache root {root} (from {why}) is a file, not a folder",
                            hint="point --cache-dir or $CLIPTERM_CACHE at a folder (it is created if missing)")
    above = next((parent for parent in root.parents if os.path.lexists(parent)), None)
    if above is not None and not above.is_dir():
        from clipterm.errors import ClipTermError

        raise ClipTermError(f"the cache root {root} (from {why}) is under {above}, a file, not a folder",
                            hint="point --cache-dir or $CLIPTERM_CACHE at a folder (it is created if missing)")
    return root, why


def in_checkout(folder: Path) -> bool:
    """Whether `folder` is the top of a checkout of clipterm: its pyproject.toml names the project `clipterm`."""
    try:
        import tomllib

        project = tomllib.loads((folder / "pyproject.toml").read_text(encoding="utf-8")).get("project", {})
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(project, dict) and project.get("name") == APP


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
