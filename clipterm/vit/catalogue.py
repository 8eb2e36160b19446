"""Every model clipterm knows, as `clipterm models` lists it: the built-in toys, then each open_clip arch with each
pretrained tag, whether its weights are on this machine, and whether the exact decomposition supports it (or why
not)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from clipterm import locations
from clipterm.vit.models import find_local_weights
from clipterm.vit.support import arch_config, needs_quick_gelu, tower_kind, unsupported_reason


def _folder_tower(folder: Path) -> str:
    """tower_kind of a model folder's config (a built-in toy's); "unknown" when it cannot be read."""
    try:
        return tower_kind(json.loads((folder / "open_clip_config.json").read_text())["model_cfg"])
    except (OSError, ValueError, KeyError):
        return "unknown"


def catalogue() -> list[dict[str, Any]]:
    """Every model clipterm knows: the toy, then each open_clip arch with each pretrained tag.

    Each row says whether its weights are already on this machine and whether the
    exact decomposition supports it (or why not).
    """
    import open_clip

    rows: list[dict[str, Any]] = [
        {
            "model": spec,
            "pretrained": None,
            "weights": "present" if (folder / "open_clip_model.safetensors").is_file() else "missing",
            "weights_path": str(folder),
            "supported": True,
            "reason": None,
            "quick_gelu": False,
            "tower": _folder_tower(folder),
        }
        for spec, folder in locations.TOY_MODEL_DIRS.items()
    ]
    for arch in open_clip.list_models():
        cfg = arch_config(arch) or {}
        reason = unsupported_reason(cfg)
        for tag in open_clip.list_pretrained_tags_by_model(arch) or [None]:
            path = find_local_weights(arch, tag)[0] if tag else None
            rows.append(
                {
                    "model": arch,
                    "pretrained": tag,
                    "weights": "present" if path else ("needs download" if tag else "no pretrained tag"),
                    "weights_path": str(path) if path else None,
                    "supported": reason is None,
                    "reason": reason,
                    "quick_gelu": needs_quick_gelu(arch, tag),
                    "tower": tower_kind(cfg),
                }
            )
    return rows
