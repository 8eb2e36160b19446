"""What verification on read costs (issue 13, item 5), on synthetic caches of 10k and 200k rows.

A synthetic cache is written through the store API (random fp16 components of the toy model's shape,
1,024 rows per shard), so it has every file and record a built cache has. Measured, each on a fresh
reader:

- open: `open_cache` (the manifest, its digest, `.verified.json`); the TUI's first frame needs no more.
- first frame: wall time of a headless TUI process from spawn until its first frame (the probe of
  tests/test_tui.py), median of 3; the goal is <= 1 s.
- read, unverified: `effects("L1.H0")` (every shard) with the checks switched off: the baseline.
- read, warm without block checks: every file remembered in `.verified.json`: size, mtime and header checks.
- read, warm: the same, plus the crc32 of each block read (`clipterm.cache.blocks`), which catches bit-rot
  after verification; `block_checks_ratio` is its cost against the line above.
- read, cold: the same after `.verified.json` was deleted: every shard is hashed once.

    python -m bench.speed.verify_on_read [--rows 10000 200000] [--dir /tmp/clipterm-verify-bench]
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench._common import write_result

SHAPE = {"layers": 6, "heads": 8, "head_dim": 16, "width": 128, "embed_dim": 128, "mlp_width": 512, "tokens": 50}
TASKS = {"colour": ["red", "green", "blue", "yellow"]}


def write_synthetic(directory: Path, n: int, shard_rows: int = 1024) -> None:
    """A complete cache of `n` random rows, written the way a build writes one."""
    import torch

    from clipterm import files
    from clipterm.cache import store

    torch.manual_seed(0)
    s = SHAPE
    model = {"spec": "synthetic", "arch": "synthetic", "pretrained": None, "weights_sha256": "0" * 64, "image_size": 32}
    dataset = {"source": f"synthetic:{n}", "kind": "toy", "root": None, "seed": 0, "n": n, "tasks": TASKS,
               "fingerprint": f"synthetic-{n}"}
    manifest = store.new_manifest(model, "synthetic", dataset, "float16", {"neurons": False, "tokens": []}, s, shard_rows)
    directory.mkdir(parents=True)
    store.write_manifest(directory, manifest)
    files.save_tensors(directory / store.READOUT, {"heads": torch.randn(s["layers"], s["heads"], s["head_dim"], s["embed_dim"])})
    records, stats = [], None
    for k in range(manifest["chunks"]):
        start, stop = k * shard_rows, min((k + 1) * shard_rows, n)
        r = stop - start
        tensors = {
            "head_out": torch.randn(s["layers"], s["heads"], r, s["head_dim"]).half(),  # (L, H, n, dh)
            "mlps": torch.randn(s["layers"], r, s["embed_dim"]).half(),  # (L, n, D)
            "embed": torch.randn(r, s["embed_dim"]).half(), "bias": torch.randn(r, s["embed_dim"]).half(),
            "ln_scale": torch.rand(r) + 0.5, "image_embeds": torch.randn(r, s["embed_dim"]),
            "index": torch.arange(start, stop), "labels.colour": torch.randint(0, 4, (r,)),
        }
        stats = store.add_stats(stats, store.partial_stats(tensors))
        records.append(store.write_shard(directory, k, tensors, start, stop, []))
    images = [{"index": i, "id": f"synthetic:{i}", "labels": {"colour": i % 4}} for i in range(n)]
    store.finish(directory, manifest, records, stats, images)


FIRST_FRAME = """
import os, sys, time
from clipterm.cache.reader import open_cache
from clipterm.tui.app import ClipTermApp


class Probe(ClipTermApp):
    def on_ready(self):  # after the first frame
        print("first frame after", time.time() - float(sys.argv[2]), flush=True)
        os._exit(0)  # not waiting for the workers the app started (they import torch)

Probe(open_cache(sys.argv[1])).run(headless=True, size=(100, 30))
"""


def first_frame(directory: Path, repeats: int = 3) -> float:
    """Seconds from spawning the process to its first frame (median)."""
    times = []
    for _ in range(repeats):
        done = subprocess.run([sys.executable, "-c", FIRST_FRAME, str(directory), repr(time.time())], check=True,
                              capture_output=True, text=True, timeout=120)
        times.append(float(done.stdout.split("first frame after")[-1]))
    return statistics.median(times)


@contextlib.contextmanager
def no_block_checks():
    """Reads without the per-block crc32 checks (`clipterm.cache.blocks`): the baseline of their cost."""
    from clipterm.cache.blocks import ShardBlocks

    check = ShardBlocks.check
    ShardBlocks.check = lambda self, tensor, index=(): None
    try:
        yield
    finally:
        ShardBlocks.check = check


def timed(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure(directory: Path) -> dict:
    from clipterm.cache import integrity
    from clipterm.cache.reader import CacheReader, open_cache

    size = sum(p.stat().st_size for p in directory.iterdir())
    read = lambda reader: reader.effects("L1.H0")  # noqa: E731 (every shard)

    def unverified() -> None:
        reader = open_cache(directory)
        reader.checked = lambda name, *a, **k: reader.path / name  # the checks off
        with no_block_checks():
            read(reader)

    def warm_without_blocks() -> None:
        with no_block_checks():
            read(open_cache(directory))

    def cold() -> None:
        integrity.forget(directory)
        read(open_cache(directory))

    warm_reader = lambda: read(open_cache(directory))  # noqa: E731
    warm_reader()  # remember everything; warms the OS file cache as well
    result = {
        "rows": CacheReader(directory).n, "bytes": size, "shards": len(CacheReader(directory).manifest["shards"]),
        "open_s": round(timed(lambda: open_cache(directory), 5), 4),
        "read_unverified_s": round(timed(unverified), 4),
        "read_warm_no_blocks_s": round(timed(warm_without_blocks), 4),
        "read_warm_s": round(timed(warm_reader), 4),
        "read_cold_s": round(timed(cold, 1), 4),
    }
    warm_reader()
    result["warm_overhead_s"] = round(result["read_warm_s"] - result["read_unverified_s"], 4)
    result["block_checks_s"] = round(result["read_warm_s"] - result["read_warm_no_blocks_s"], 4)
    result["block_checks_ratio"] = round(result["read_warm_s"] / max(result["read_warm_no_blocks_s"], 1e-9), 2)
    result["hash_gb_per_s"] = round(size / 1e9 / max(result["read_cold_s"] - result["read_unverified_s"], 1e-9), 2)
    result["first_frame_s"] = round(first_frame(directory), 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 200_000])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/clipterm-verify-bench"))
    args = parser.parse_args()
    results = []
    for n in args.rows:
        directory = args.dir / f"synthetic-{n}"
        if directory.exists():
            shutil.rmtree(directory)
        start = time.perf_counter()
        write_synthetic(directory, n)
        written = time.perf_counter() - start
        results.append({**measure(directory), "write_s": round(written, 1)})
        print(results[-1], flush=True)
        shutil.rmtree(directory)
    path = write_result("verify_on_read", {"shape": SHAPE, "dtype": "float16", "shard_rows": 1024, "caches": results,
                                           "goal": "first frame <= 1 s; a warm open only stats and reads headers"})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
