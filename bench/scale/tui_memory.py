"""Where the TUI's memory goes: resident set after each stage of a session, in one process, on one cache.

The stages follow what a TUI session loads as the user walks the tree: the imports (torch and
open_clip: the baseline; then textual and the app), the model, the pool's text embeddings, the
ablation scorings, the layers' ablation, every layer's per-head ablation, every head's TextSpan
description and every head's top images. Each line is VmRSS (now) and VmHWM (peak so far), in MB.

    python -m bench.scale.tui_memory CACHE [--pool FILE]
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

from bench._common import write_result


def memory() -> tuple[float, float]:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cache", type=Path)
    parser.add_argument("--pool", default=None)
    args = parser.parse_args()
    stages: list[dict] = []

    def stage(name: str) -> None:
        gc.collect()
        rss, peak = memory()
        previous = stages[-1]["rss_mb"] if stages else 0.0
        stages.append({"stage": name, "rss_mb": rss, "peak_mb": peak, "delta_mb": rss - previous, "t": time.perf_counter()})
        print(f"{name:<34} rss {rss:7.0f} MB ({rss - previous:+6.0f})   peak {peak:7.0f} MB", flush=True)

    stage("python")
    import open_clip  # noqa: F401
    import torch  # noqa: F401

    stage("import torch, open_clip (baseline)")
    import textual.app  # noqa: F401

    from clipterm.tui import app as tui_app  # noqa: F401

    stage("import textual, clipterm.tui.app")
    import textual_image.widget  # noqa: F401

    stage("import textual_image")
    from clipterm.analyses.session import Analyses
    from clipterm.cache.reader import CacheReader

    reader = CacheReader(args.cache)
    analyses = Analyses(reader, pool=args.pool)
    analyses.loaded()
    stage("model loaded")
    analyses._pool()
    stage("pool text embeddings")
    analyses._scorings()
    stage("ablation scorings (image_embeds)")
    analyses.model_ablation()
    stage("ablation of every layer")
    shape = reader.shape
    for layer in range(shape.layers):
        analyses.layer_ablation(layer)
    stage("per-head ablation of every layer")
    heads = [f"L{l}.H{h}" for l in range(shape.layers) for h in range(shape.heads)]
    for head in heads:
        analyses.description(head)
    stage("TextSpan of every head")
    for head in heads:
        analyses.top_images(head)
    stage("top images of every head")
    base = stages[1]["rss_mb"]
    print(f"peak {stages[-1]['peak_mb']:.0f} MB, {stages[-1]['peak_mb'] - stages[1]['peak_mb']:+.0f} MB above the "
          f"baseline's peak; now {stages[-1]['rss_mb'] - base:+.0f} MB above the baseline")
    write_result(f"tui_memory-{args.cache.name}", {"cache": args.cache.name, "images": reader.n, "pool": args.pool,
                                                   "stages": stages})


if __name__ == "__main__":
    main()
