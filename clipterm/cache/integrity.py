"""Verification on read: no number from a cache file is used before the file is checked.

Every open is checked cheaply: the file's size, and its safetensors header (tensor names, dtypes
and shapes) against what the manifest says it must hold. The file's sha256 is compared with the
manifest's the first time it is read after it changed; a match is remembered in `.verified.json`
beside the manifest as (size, mtime_ns, sha256), so later opens only `stat` the file. A build
records the files it writes (it knows their hashes), so a fresh cache is never re-hashed.
A damaged file is refused with a ClipTermError that names it and points at `clipterm cache verify`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from clipterm import names
from clipterm.errors import ClipTermError, ExitCode
from clipterm.files import file_sha256, safetensors_header, write_json

VERIFIED = ".verified.json"
FORMAT = "clipterm.verified/1"
_CODES = {"float16": "F16", "float32": "F32"}

# name -> (safetensors dtype, shape); None in a shape: any size along that axis.
Layout = dict[str, tuple[str, list[int | None]]]


def shard_layout(manifest: dict, rows: int) -> Layout:
    """The tensors one shard of `rows` rows must hold (docs/cache-format.md)."""
    s, stored, dtype = manifest["shape"], manifest["stored"], _CODES.get(manifest["dtype"], manifest["dtype"])
    layout: Layout = {
        "head_out": (dtype, [s["layers"], s["heads"], rows, s["head_dim"]]), "mlps": (dtype, [s.get("mlp_layers", s["layers"]), rows, s["embed_dim"]]),
        "embed": (dtype, [rows, s["embed_dim"]]), "bias": (dtype, [rows, s["embed_dim"]]), "ln_scale": ("F32", [rows]),
        "image_embeds": ("F32", [rows, s["embed_dim"]]), "index": ("I64", [rows]),
        **{f"labels.{task}": ("I64", [rows]) for task in manifest["dataset"]["tasks"]},
    }
    if stored["neurons"]:
        layout["neurons"] = (dtype, [s["layers"], rows, s["mlp_width"]])
    if s.get("pool_heads"):  # an attention pool after the blocks: its own split
        layout["pool_heads"] = (dtype, [s["pool_heads"], rows, s["pool_head_dim"]])
        layout["pool_bias"] = (dtype, [rows, s["embed_dim"]])
    for layer in stored["tokens"]:
        layout[f"tokens.{names.layer(layer)}"] = (dtype, [s["heads"], rows, s["tokens"], s["head_dim"]])
    return layout


def stats_layout(manifest: dict) -> Layout:
    s = manifest["shape"]
    L, H, dh, D = s["layers"], s["heads"], s["head_dim"], s["embed_dim"]
    M = s.get("mlp_layers", L)  # a ResNet cache has no MLP components
    layout = {"count": ("F64", []), "heads.sum": ("F64", [L, H, dh]), "heads.outer": ("F64", [L, H, dh, dh]),
              "mlps.sum": ("F64", [M, D]), "mlps.outer": ("F64", [M, D, D]), "embed.sum": ("F64", [D]),
              "bias.sum": ("F64", [D]), "image_embeds.sum": ("F64", [D])}
    if s.get("pool_heads"):  # joint-space block heads: no heads.outer; the pool's heads in head space
        G, dp = s["pool_heads"], s["pool_head_dim"]
        del layout["heads.outer"]
        layout.update({"pool_heads.sum": ("F64", [G, dp]), "pool_heads.outer": ("F64", [G, dp, dp]),
                       "pool_bias.sum": ("F64", [D])})
    return layout


def readout_layout(manifest: dict) -> Layout:
    s = manifest["shape"]
    if s.get("head_space") == "joint":  # the identity, stored once for every (layer, head)
        layout = {"heads": ("F32", [1, 1, s["embed_dim"], s["embed_dim"]])}
    else:
        layout = {"heads": ("F32", [s["layers"], s["heads"], s["head_dim"], s["embed_dim"]])}
    if s.get("pool_heads"):
        layout["pool"] = ("F32", [s["pool_heads"], s["pool_head_dim"], s["embed_dim"]])
    return layout


def neurons_layout(manifest: dict, rows: int) -> Layout:
    """A neurons file (clipterm.cache.neurons); files of the older format lack some of these."""
    s = manifest["shape"]
    M, D = s["mlp_width"], s["embed_dim"]
    return {"mean": ("F32", [M, D]), "pc1": ("F32", [M, D]), "pc1_share": ("F32", [M]), "norms": ("F16", [rows, M]),
            "activations": ("F16", [rows, M]), "top_rows": ("I64", [M, None]), "top_norms": ("F32", [M, None]),
            "effect_sum": ("F32", [rows, D]), "significant_sum": ("F32", [rows, D]), "norm_mean": ("F32", [M]),
            "top1_share": ("F32", [M]), "missing": ("U8", [rows])}


NEURONS_V1 = ("mean", "pc1", "pc1_share", "norms", "activations", "top_rows", "norm_mean", "top1_share", "missing")


def neurons_required(path: Path) -> tuple[str, ...] | None:
    """The tensors a neurons file must hold: all of them, but for the older format's fewer (None: all)."""
    try:
        meta = safetensors_header(path).get("__metadata__") or {}
    except (OSError, ValueError):
        return None  # header_problem will say why
    return NEURONS_V1 if isinstance(meta, dict) and meta.get("format") == "clipterm.neurons/1" else None


def header_problem(path: Path, layout: Layout, required: tuple[str, ...] | None = None) -> str | None:
    """Why the safetensors file at `path` does not hold `layout` (None: it does). Extra tensors are a problem."""
    try:
        header = safetensors_header(path)
    except (OSError, ValueError) as exc:  # json errors are ValueErrors
        return f"unreadable safetensors header ({str(exc)[:80]})"
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    need = set(layout) if required is None else set(required)
    for name in sorted(need - set(tensors)):
        return f"no tensor {name!r}"
    for name in sorted(tensors):
        if name not in layout:
            return f"an unexpected tensor {name!r}"
        dtype, shape = layout[name]
        have = tensors[name]
        if have["dtype"] != dtype or len(have["shape"]) != len(shape) or any(
                want is not None and got != want for got, want in zip(have["shape"], shape)):
            return f"{name} is {have['dtype']} {have['shape']}, the manifest says {dtype} {shape}"
    return None


class Verifier:
    """Checks a cache's files before they are read; remembers full checks in `.verified.json`."""

    def __init__(self, directory: Path, cache: str):
        self.directory, self.cache = Path(directory), cache
        self.records = load_records(self.directory)

    def damaged(self, name: str, what: str) -> ClipTermError:
        return ClipTermError(f"{name} of cache {self.cache} is damaged ({what}); its numbers were not used",
                             hint=f"run `clipterm cache verify {self.cache}` to check every file",
                             code=ExitCode.INVALID_DATA)

    def check(self, name: str, sha: str | None = None, size: int | None = None, layout: Layout | None = None,
              required: tuple[str, ...] | None = None) -> Path:
        """The file's path once it passed: size and header always, sha256 when it changed since its last check."""
        path = self.directory / name
        try:
            stat = path.stat()
        except OSError:
            raise self.damaged(name, "missing") from None
        if size is not None and stat.st_size != size:
            raise self.damaged(name, f"{stat.st_size:,} bytes, the manifest says {size:,}")
        if layout is not None:
            problem = header_problem(path, layout, required)
            if problem:
                raise self.damaged(name, problem)
        if sha is not None:
            seen = self.records.get(name)
            if seen != {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha}:
                if file_sha256(path) != sha:
                    raise self.damaged(name, "its sha256 differs from the manifest's")
                self.records[name] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha}
                save_records(self.directory, {name: self.records[name]})
        return path


def load_records(directory: Path) -> dict[str, dict[str, Any]]:
    """`.verified.json`'s records; a missing or damaged one is empty (it only saves hashing)."""
    try:
        data = json.loads((Path(directory) / VERIFIED).read_text(encoding="utf-8"))
        records = data["files"] if data.get("format") == FORMAT else {}
        return {k: v for k, v in records.items() if isinstance(v, dict)}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def save_records(directory: Path, records: dict[str, dict[str, Any]]) -> None:
    """Add records to `.verified.json` (atomically); a read-only cache just stays unremembered."""
    try:
        write_json(Path(directory) / VERIFIED, {"format": FORMAT, "files": {**load_records(directory), **records}},
                   durable=False)  # a lost record costs one more hash, never a wrong answer
    except OSError:
        pass


def remember_written(directory: Path, hashes: dict[str, str]) -> None:
    """A writer's record of files it just wrote, with the sha256 of the bytes it wrote."""
    records = {}
    for name, sha in hashes.items():
        stat = os.stat(Path(directory) / name)
        records[name] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha}
    save_records(directory, records)


def revoke(directory: Path, damaged: list[str]) -> None:
    """Drop the records of files found damaged, so that the next read hashes them again (and refuses them)."""
    records = load_records(directory)
    if any(name in records for name in damaged):
        try:
            write_json(Path(directory) / VERIFIED, {"format": FORMAT, "files": {k: v for k, v in records.items()
                                                                               if k not in damaged}}, durable=True)
        except OSError:  # cannot rewrite them: then none may stay
            try:
                forget(directory)
            except OSError:  # a read-only cache: nothing was remembered in it since it became read-only
                pass


def forget(directory: Path) -> None:
    (Path(directory) / VERIFIED).unlink(missing_ok=True)
