"""Shared by the benchmarks: where results go and how they are written."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def write_result(name: str, payload: dict) -> Path:
    """Write bench/results/<name>.json with the machine it ran on and when."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    record = {"bench": name, "when": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": platform.platform(),
              "python": platform.python_version(), **payload}
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path
