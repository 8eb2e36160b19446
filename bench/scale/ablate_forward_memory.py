"""Peak memory of `clipterm ablate CACHE --by layer --forward` (reliability issue, memory item).

Goal: the peak resident set stays within 300 MB of `python -c "import torch, open_clip"` at any number of
images. Each figure is the peak RSS (`ru_maxrss`) of a fresh process: the baseline imports torch and open_clip;
the measured one runs the command through the CLI entry point on an N-image toy cache (built once, fp16).

    python -m bench.scale.ablate_forward_memory [--n 5000] [--dir /tmp/clipterm-ablate-bench]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bench._common import write_result

BASELINE = "import resource, torch, open_clip; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
ABLATE = """
import resource, sys
from clipterm.cli.app import main
try:
    main(["ablate", sys.argv[1], "--by", "layer", "--forward", "--draws", "100", "--json"])
except SystemExit as exc:
    assert not exc.code, exc.code
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_mb(code: str, *args: str) -> tuple[float, float]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True, timeout=3600)
    return int(done.stdout.strip().splitlines()[-1]) / 1024, time.perf_counter() - start  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/clipterm-ablate-bench"))
    args = parser.parse_args()
    cache = args.dir / f"toy{args.n}"
    if not (cache / "manifest.json").is_file():
        from clipterm.cache.build import BuildOptions, build_cache

        build_cache(BuildOptions(images=f"toy:{args.n}", name=cache.name, cache_dir=str(args.dir), workers=0))
    baseline, _ = peak_mb(BASELINE)
    peak, seconds = peak_mb(ABLATE, str(cache))
    result = {"n": args.n, "baseline_mb": round(baseline), "ablate_forward_peak_mb": round(peak),
              "above_baseline_mb": round(peak - baseline), "seconds": round(seconds, 1), "goal_mb": 300}
    print(json.dumps(result))
    write_result(f"ablate_forward_memory-{args.n}", result)


if __name__ == "__main__":
    main()
