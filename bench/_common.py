"""Shared by the benchmarks: where results go and how they are written.

Benchmarks are modules of the `bench` package, run from the checkout's root: `python -m bench.speed.search`.
So `bench._common`, another benchmark (`bench.speed.cache_build`) and the measures the tests share
(`tests.test_neurons`) import as packages, with no path set by hand; `python -m bench` lists them all.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the checkout, where `python -m bench...` runs
RESULTS = ROOT / "bench" / "results"


def best_time(fn, repeats: int = 1) -> tuple[float, object]:
    """The fastest of `repeats` calls of fn (seconds, waiting for CUDA work), and the last result."""
    import torch

    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, out


def write_result(name: str, payload: dict) -> Path:
    """Write bench/results/<name>.json with the machine it ran on and when."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    record = {"bench": name, "when": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": platform.platform(),
              "python": platform.python_version(), **payload}
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path
