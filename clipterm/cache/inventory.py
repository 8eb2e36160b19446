"""What caches a root holds, and whether each is whole: `list_caches` and `verify` (`clipterm cache ls|verify`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clipterm.cache.integrity import (
    header_problem,
    neurons_layout,
    neurons_required,
    readout_layout,
    revoke,
    shard_layout,
    stats_layout,
)
from clipterm.cache.reader import CacheReader
from clipterm.cache.store import MANIFEST, READOUT, STATS, CacheLock
from clipterm.errors import ClipTermError
from clipterm.files import file_sha256


def list_caches(root: Path) -> list[dict[str, Any]]:
    """Every cache under `root`, by name, with a short summary (damaged manifests reported, not raised)."""
    found = []
    for folder in sorted(p for p in Path(root).iterdir() if p.is_dir()) if Path(root).is_dir() else []:
        if not (folder / MANIFEST).is_file():
            continue
        try:
            found.append(CacheReader(folder, allow_incomplete=True).info)
        except ClipTermError as exc:
            found.append({"name": folder.name, "path": str(folder), "error": exc.message})
        except (KeyError, TypeError, ValueError, AttributeError, OSError) as exc:  # one bad cache never hides the others
            found.append({"name": folder.name, "path": str(folder), "error": f"damaged ({type(exc).__name__}: {exc})"})
    return found


def verify(directory: Path) -> list[dict[str, str]]:
    """Re-hash every file and check every shard's tensors against the manifest. Returns problems (empty: all good)."""
    from safetensors import safe_open

    reader = CacheReader(directory, allow_incomplete=True)
    m, problems = reader.manifest, []

    def problem(file: str, what: str) -> None:
        problems.append({"file": file, "problem": what})

    if not m["complete"]:
        running = CacheLock.held(directory)
        problem(MANIFEST, "a build is running (its lock is held): wait for it" if running else
                "the build is incomplete (resume it with the same `clipterm cache build` command)")
    layouts = {READOUT: readout_layout(m), STATS: stats_layout(m)}
    for name, sha in m.get("files", {}).items():
        path = directory / name
        if not path.is_file():
            problem(name, "missing")
        elif file_sha256(path) != sha:
            problem(name, "sha256 differs from the manifest (the file is damaged)")
        elif name in layouts or name.startswith("neurons.L"):
            required = neurons_required(path) if name.startswith("neurons.L") else None
            layout_problem = header_problem(path, layouts.get(name) or neurons_layout(m, reader.n), required)
            if layout_problem:
                problem(name, layout_problem)
    indices: list[int] = []
    for record in m["shards"]:
        path = directory / record["file"]
        if not path.is_file():
            problem(record["file"], "missing")
            continue
        if path.stat().st_size != record["bytes"] or file_sha256(path) != record["sha256"]:
            problem(record["file"], "sha256 differs from the manifest (the shard is damaged)")
            continue
        layout_problem = header_problem(path, shard_layout(m, record["rows"]))
        if layout_problem:
            problem(record["file"], layout_problem)
            continue
        try:
            with safe_open(str(path), framework="pt") as f:
                index = f.get_tensor("index").tolist()
        except Exception as exc:
            problem(record["file"], f"unreadable: {str(exc)[:120]}")
            continue
        if index and not (record["start"] <= index[0] and index[-1] < record["stop"] and index == sorted(index)):
            problem(record["file"], "index rows fall outside the shard's range or are out of order")
        indices += index
    revoke(directory, [p["file"] for p in problems])
    if m["complete"] and not problems:  # a damaged shard already explains missing rows
        skipped = {s_["index"] for s_ in m.get("skipped", [])}
        if sorted(indices + sorted(skipped)) != list(range(m["dataset"]["n"])):
            problem(MANIFEST, "shard rows plus skipped inputs do not cover every input exactly once")
    return problems
