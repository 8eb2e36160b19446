"""What `clipterm doctor` reports: versions, devices, locations, and which weights are on this machine."""

from __future__ import annotations

import platform
import sys
from typing import Any

from clipterm import __version__, locations


def report() -> dict[str, Any]:
    import open_clip
    import torch

    from clipterm.vit.catalogue import catalogue

    cuda = "not available"
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        cuda = f"CUDA {torch.version.cuda}: {', '.join(names)}"
    root, why = locations.cache_root()
    present = [r for r in catalogue() if r["weights"] == "present"]
    return {
        "clipterm": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "cuda": cuda,
        "cache_root": f"{root} ({why})",
        "config_dir": str(locations.config_dir()),
        "themes_dirs": [str(p) for p in locations.themes_dirs()],
        "toy_model": str(locations.TOY_MODEL_DIR),
        "weights_present": [{k: r[k] for k in ("model", "pretrained", "weights_path", "supported")} for r in present],
    }
