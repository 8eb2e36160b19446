"""The cache on disk, write side: file names, atomic writes, the writer's lock, shards and statistics.

A cache is a directory holding `manifest.json`, `readout.safetensors`, `shard-XXXXX.safetensors`,
`images.jsonl` and `stats.safetensors` (docs/cache-format.md describes every tensor). Input i
belongs to chunk `i // shard_rows`, and chunk k is written to `shard-{k:05d}.safetensors`, so the
layout does not depend on how many processes built it. Reading lives in `clipterm.cache.reader`.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipterm import __version__
from clipterm.cache import blocks
from clipterm.cache.integrity import VERIFIED, remember_written
from clipterm.errors import ClipTermError, ExitCode
from clipterm.files import atomic_write, file_sha256, save_tensors, write_json

SCHEMA = "clipterm.cache/1"
MANIFEST = "manifest.json"
READOUT = "readout.safetensors"
STATS = "stats.safetensors"
IMAGES = "images.jsonl"
LOCK = ".lock"
DTYPES = ("float16", "float32")
# Fields that must agree before a build may resume into an existing cache.
RESUME_KEYS = (("model", "weights_sha256"), ("model", "arch"), ("convention",), ("dataset", "fingerprint"), ("dtype",), ("stored",),
               ("decode",))


def shard_name(chunk: int) -> str:
    return f"shard-{chunk:05d}.safetensors"


def progress_name(rank: int) -> str:
    """Shards finished by one rank of a multi-process build, until rank 0 merges them into the manifest."""
    return f"progress-r{rank}.json"


def partial_stats_name(rank: int) -> str:
    return f"stats-r{rank}.safetensors"


# --------------------------------------------------------------------------- the lock


class CacheLock:
    """An exclusive `flock` on `<cache>/.lock`. The OS drops it when the holder dies, so a killed build can resume."""

    def __init__(self, directory: Path):
        self.path = Path(directory) / LOCK
        self.fd: int | None = None

    def acquire(self) -> CacheLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a read-only root, a name too long for the file system, a full disk
            raise ClipTermError(f"cannot create the cache folder {self.path.parent}: {exc.strerror or exc}",
                                hint="check that the cache root is writable, or pass --cache-dir FOLDER",
                                code=ExitCode.USAGE) from None
        try:  # O_NOFOLLOW: a symlinked lock must never truncate whatever it points at
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            if self.path.is_symlink():
                raise ClipTermError(f"{self.path} is a symbolic link; clipterm never writes through a link there",
                                    hint=f"remove the link ({self.path}) and run the command again",
                                    code=ExitCode.INVALID_DATA) from None
            raise ClipTermError(f"cannot open the lock file {self.path}: {exc.strerror}",
                                hint="check that the cache folder is writable", code=ExitCode.INVALID_DATA) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ClipTermError(
                f"another process (pid {holder}) is writing the cache {self.path.parent}",
                hint="wait for it to finish, or build under another --name",
                code=ExitCode.BUSY,
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    @staticmethod
    def held(directory: Path) -> bool:
        """Whether a live process holds the lock of `directory` now (a build or a neurons build is running)."""
        try:
            fd = os.open(Path(directory) / LOCK, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            return False
        finally:
            os.close(fd)  # closing drops a shared lock we took
        return False

    def __enter__(self) -> CacheLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


# --------------------------------------------------------------------------- statistics


def partial_stats(tensors: dict[str, Any]) -> dict[str, Any]:
    """fp64 count, sums and sums of outer products of one block of rows, from the values as stored."""
    import torch

    head_out = tensors["head_out"].double()  # (L, H, n, dh)
    mlps = tensors["mlps"].double()  # (L, n, D)
    joint = "pool_heads" in tensors  # an attention pool: block heads are D-wide joint-space effects, and their outer
    # products (L, H, D, D) are too big to keep; the reader forms one head's from the shards when asked
    stats = {
        "count": torch.tensor(float(head_out.shape[2]), dtype=torch.float64, device=head_out.device),
        "heads.sum": head_out.sum(2),  # (L, H, dh)
        **({} if joint else {"heads.outer": head_out.transpose(-1, -2) @ head_out}),  # (L, H, dh, dh)
        "mlps.sum": mlps.sum(1),  # (L, D)
        "mlps.outer": mlps.transpose(-1, -2) @ mlps,  # (L, D, D)
        "embed.sum": tensors["embed"].double().sum(0),  # (D,)
        "bias.sum": tensors["bias"].double().sum(0),  # (D,)
        "image_embeds.sum": tensors["image_embeds"].double().sum(0),  # (D,)
    }
    if joint:
        pool_heads = tensors["pool_heads"].double()  # (G, n, dh')
        stats["pool_heads.sum"] = pool_heads.sum(1)  # (G, dh')
        stats["pool_heads.outer"] = pool_heads.transpose(-1, -2) @ pool_heads  # (G, dh', dh')
        stats["pool_bias.sum"] = tensors["pool_bias"].double().sum(0)  # (D,)
    return stats


def add_stats(total: dict[str, Any] | None, part: dict[str, Any]) -> dict[str, Any]:
    """Merge partial sums (on `total`'s device); in fp64 the order of merging changes results only at ~1e-16."""
    if total is None:
        return {key: value.clone() for key, value in part.items()}
    for key, value in part.items():
        total[key] += value.to(total[key].device)
    return total


def shard_stats(path: Path, device: str = "cpu") -> dict[str, Any]:
    """Recompute a finished shard's partial sums from disk (a resumed build needs them)."""
    from safetensors import safe_open

    keys = ("head_out", "mlps", "embed", "bias", "image_embeds", "pool_heads", "pool_bias")
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        return partial_stats({key: f.get_tensor(key) for key in keys if key in f.keys()})


# --------------------------------------------------------------------------- shards


def shard_tensors(parts: list[dict[str, Any]], dtype: str) -> dict[str, Any]:
    """Concatenate per-batch outputs (batch-major, already on the CPU) into component-major shard tensors."""
    import torch

    def cat(key: str) -> Any:
        return torch.cat([part[key] for part in parts]) if parts else None

    store = getattr(torch, dtype)
    tensors: dict[str, Any] = {
        "head_out": cat("head_out").to(store).permute(1, 2, 0, 3).contiguous(),  # (n, L, H, dh) -> (L, H, n, dh)
        "mlps": cat("mlps").to(store).transpose(0, 1).contiguous(),  # (n, L, D) -> (L, n, D)
        "embed": cat("embed").to(store).contiguous(),  # (n, D)
        "bias": cat("bias").to(store).contiguous(),  # (n, D)
        "ln_scale": cat("ln_scale").float().contiguous(),  # (n,)
        "image_embeds": cat("image_embeds").float().contiguous(),  # (n, D)
        "index": cat("index").long().contiguous(),  # (n,)
    }
    for key in parts[0]:
        if key.startswith("labels."):
            tensors[key] = cat(key).long().contiguous()  # (n,)
        elif key in ("neurons", "pool_heads"):
            tensors[key] = cat(key).to(store).transpose(0, 1).contiguous()  # (n, L, M) -> (L, n, M); (n, G, dh') -> (G, n, dh')
        elif key == "pool_bias":
            tensors[key] = cat(key).to(store).contiguous()  # (n, D)
        elif key.startswith("tokens."):
            tensors[key] = cat(key).to(store).transpose(0, 1).contiguous()  # (n, H, T, dh) -> (H, n, T, dh)
    return tensors


def write_shard(directory: Path, chunk: int, tensors: dict[str, Any], start: int, stop: int,
                skipped: list[tuple[int, str]]) -> dict[str, Any]:
    """Write one shard atomically; return its manifest record."""
    from safetensors.torch import save

    rows = int(tensors["index"].shape[0])
    meta = {"format": SCHEMA, "chunk": str(chunk), "start": str(start), "stop": str(stop), "rows": str(rows),
            blocks.KEY: blocks.block_sums(tensors)}
    data = save(tensors, metadata=meta)
    name = shard_name(chunk)
    sha = atomic_write(directory / name, data)
    return {"file": name, "chunk": chunk, "start": start, "stop": stop, "rows": rows, "bytes": len(data), "sha256": sha,
            "skipped": [[index, reason] for index, reason in skipped]}


# --------------------------------------------------------------------------- the manifest and resuming


def new_manifest(model: dict, convention: str, dataset: dict, dtype: str, stored: dict, shape: dict, shard_rows: int,
                 decode: str = "full") -> dict:
    """The manifest of a build that has not written any shard yet. `decode`: "full" (open_clip's pixels) or "fast"."""
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return {
        "schema": SCHEMA, "clipterm_version": __version__, "created": now, "updated": now,
        "model": model, "convention": convention, "dataset": dataset, "dtype": dtype, "stored": stored,
        "shape": shape, "shard_rows": shard_rows, "decode": decode, "chunks": -(-dataset["n"] // shard_rows),
        "shards": [], "skipped": [], "files": {}, "complete": False,
    }


# Every key path a reader relies on; a manifest without one of them is damaged, never half-read.
REQUIRED_KEYS = (("schema",), ("created",), ("complete",), ("dtype",), ("convention",), ("shards",), ("stored", "neurons"),
                 ("stored", "tokens"), ("model", "arch"), ("dataset", "n"), ("dataset", "source"), ("dataset", "tasks"),
                 ("shape", "layers"), ("shape", "heads"), ("shape", "head_dim"), ("shape", "embed_dim"),
                 ("shape", "mlp_width"), ("shard_rows",))


class NotACache(ClipTermError):
    """A folder whose `manifest.json` is not a clipterm cache manifest: someone else's file, never ours to touch."""


def missing_keys(manifest: Any) -> list[str]:
    """The required key paths a parsed manifest lacks (empty: well-formed)."""
    missing = []
    for keys in REQUIRED_KEYS:
        node = manifest
        for key in keys:
            node = node.get(key) if isinstance(node, dict) else None
        if node is None:
            missing.append(".".join(keys))
    return missing


SHAPE_WORDS = ("tower", "pool", "head_space")  # the manifest shape's keys that hold words, not sizes
_RECORD = {"file": str, "chunk": int, "start": int, "stop": int, "rows": int, "bytes": int, "sha256": str}


def malformed(manifest: dict) -> str | None:
    """What in a manifest that has every required key is of the wrong type (None: nothing)."""
    shape, stored = manifest["shape"], manifest["stored"]
    # `tower` names the family ("resnet"), `pool` the pooling ("avg", "attn"), `head_space` how heads are stored
    # ("joint"); the rest are sizes
    sizes = {k: v for k, v in shape.items() if k not in SHAPE_WORDS}
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in sizes.values() if v is not None) \
            or not all(isinstance(shape.get(k, ""), str) for k in SHAPE_WORDS):
        return "shape"
    if not isinstance(manifest["shards"], list) or not all(
            isinstance(r, dict) and all(isinstance(r.get(k), t) and not isinstance(r.get(k), bool) for k, t in _RECORD.items())
            for r in manifest["shards"]):
        return "shards"
    if not isinstance(manifest["dataset"]["tasks"], dict) or not isinstance(stored["tokens"], list):
        return "dataset.tasks" if not isinstance(manifest["dataset"]["tasks"], dict) else "stored.tokens"
    if not isinstance(manifest.get("files", {}), dict) or not isinstance(manifest["dtype"], str):
        return "files" if not isinstance(manifest.get("files", {}), dict) else "dtype"
    return None


def manifest_digest(manifest: dict) -> str:
    """sha256 of a manifest's canonical JSON, without its own `digest`: the manifest vouches for every other file."""
    import hashlib

    body = {key: value for key, value in manifest.items() if key != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def write_manifest(directory: Path, manifest: dict) -> None:
    """Write `manifest.json` atomically, with its digest (read_manifest refuses a manifest changed since)."""
    write_json(Path(directory) / MANIFEST, {**manifest, "digest": manifest_digest(manifest)})


def read_manifest(directory: Path) -> dict | None:
    """The cache manifest in `directory`, None if there is none; raises if it is foreign or damaged."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ClipTermError(f"unreadable manifest in {directory}: {exc}",
                            hint=f"run `clipterm cache verify {directory}`; if it is a clipterm cache, rebuild it with --force",
                            code=ExitCode.INVALID_DATA) from None
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        raise NotACache(f"{path} is not a clipterm cache manifest ({SCHEMA}): the folder is not a clipterm cache",
                        hint="clipterm leaves it alone; build into another --name or folder", code=ExitCode.INVALID_DATA)
    if "digest" in manifest and manifest["digest"] != manifest_digest(manifest):
        raise ClipTermError(f"the manifest of cache {Path(directory).name} is damaged (its digest does not match its content)",
                            hint="rebuild it with the same `clipterm cache build ... --force`", code=ExitCode.INVALID_DATA)
    missing = missing_keys(manifest)
    wrong = None if missing else malformed(manifest)
    if missing or wrong:
        what = f"no {', '.join(missing[:3])}" if missing else f"its {wrong} is not what a clipterm manifest holds"
        raise ClipTermError(f"the manifest of cache {Path(directory).name} is damaged: {what}",
                            hint="rebuild it with the same `clipterm cache build ... --force`",
                            code=ExitCode.INVALID_DATA)
    return manifest


def mismatch(old: dict, new: dict) -> str | None:
    """The first manifest field that stops `new` from resuming into `old`, or None."""
    for keys in RESUME_KEYS:
        a, b = old, new
        for key in keys:
            a, b = (a or {}).get(key), (b or {}).get(key)
        if a != b:
            return ".".join(keys)
    return None


def owned(name: str) -> bool:
    """Files a build writes, and the neurons files that describe its images; `--force` deletes these and nothing else."""
    return (name in (MANIFEST, READOUT, STATS, IMAGES, VERIFIED) or name.endswith(".tmp")
            or (name.startswith(("shard-", "stats-r", "neurons.L")) and name.endswith(".safetensors"))
            or (name.startswith("progress-r") and name.endswith(".json")))


def refuse_foreign(directory: Path) -> None:
    """Refuse to build into a folder that holds anything but a cache (someone's data, another tool's files)."""
    try:
        if read_manifest(directory) is not None:
            return
    except NotACache:
        raise
    except ClipTermError:
        return  # our own cache, damaged: --force may rebuild it
    # A build writes its manifest before anything else, so a cache folder without one holds at most the lock.
    strays = sorted(p.name for p in Path(directory).iterdir() if p.name != LOCK)
    if strays:
        raise ClipTermError(f"{directory} is neither empty nor a clipterm cache (it holds {', '.join(strays[:3])}"
                            f"{', ...' if len(strays) > 3 else ''})", hint="build into a new --name, or an empty folder",
                            code=ExitCode.USAGE)


def clear(directory: Path) -> None:
    """Delete every file a build writes (never anything else): `--force`."""
    for path in Path(directory).iterdir():
        if path.is_file() and owned(path.name):
            path.unlink()


def finished_records(directory: Path, manifest: dict, hashed: bool = False) -> list[dict]:
    """Shards that are really done: in the manifest or a rank's progress file, and on disk at their recorded size
    (and, `hashed`, sha256: a resumed build re-reads them, so damage there must not reach the new statistics)."""
    by_chunk = {r["chunk"]: r for r in manifest.get("shards", [])}
    for path in sorted(Path(directory).glob("progress-r*.json")):
        try:
            by_chunk.update({r["chunk"]: r for r in json.loads(path.read_text())})
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a torn progress file only costs redoing its shards
    records = []
    for chunk, record in sorted(by_chunk.items()):
        path = Path(directory) / record["file"]
        if path.is_file() and path.stat().st_size == record["bytes"] and (not hashed or file_sha256(path) == record["sha256"]):
            records.append(record)
    return records


def prepare(directory: Path, manifest: dict, force: bool) -> dict:
    """Make `directory` ready for a (resumed) build of `manifest`; return the manifest to continue from.

    Fresh or `force`: clear and start over. Otherwise the existing manifest must agree on model,
    convention, dataset, dtype and stored extras, and keeps its finished shards; anything else
    (partial `.tmp` files, shards no record vouches for) is deleted and will be redone.
    """
    directory.mkdir(parents=True, exist_ok=True)
    refuse_foreign(directory)
    old = None if force else read_manifest(directory)
    if old is not None:
        field = mismatch(old, manifest)
        if field:
            raise ClipTermError(
                f"the cache {directory.name} was started with another {field}",
                hint="pass --force to start it over, or choose another --name",
            )
        manifest = {**manifest, "created": old["created"], "shard_rows": old["shard_rows"], "chunks": old["chunks"],
                    "shards": finished_records(directory, old, hashed=True)}
    else:
        clear(directory)
    keep = {r["file"] for r in manifest["shards"]}
    for path in directory.iterdir():
        if owned(path.name) and path.name not in keep and path.name not in (MANIFEST, READOUT):
            path.unlink()
    manifest["complete"] = False
    write_manifest(directory, manifest)
    return manifest


def finish(directory: Path, manifest: dict, records: list[dict], stats: dict[str, Any], images: list[dict]) -> dict:
    """Write images.jsonl and stats.safetensors, then the complete manifest (last, so `complete` means complete)."""
    records = sorted(records, key=lambda r: r["chunk"])
    skipped = [{"index": index, "reason": reason} for r in records for index, reason in r["skipped"]]
    reasons = {s["index"]: s["reason"] for s in skipped}
    lines = []
    for row in images:
        row = {**row, "skipped": row["index"] in reasons}
        if row["skipped"]:
            row["reason"] = reasons[row["index"]]
        lines.append(json.dumps(row, ensure_ascii=False))
    files = {IMAGES: atomic_write(directory / IMAGES, ("\n".join(lines) + "\n").encode())}
    files[STATS] = save_tensors(directory / STATS, stats, metadata={"format": SCHEMA})
    files[READOUT] = file_sha256(directory / READOUT)
    manifest = {**manifest, "shards": records, "skipped": skipped, "files": files, "complete": True,
                "rows": sum(r["rows"] for r in records), "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    manifest["dataset"] = {**manifest["dataset"], "rows": manifest["rows"], "skipped": len(skipped)}
    write_manifest(directory, manifest)
    for path in list(directory.glob("progress-r*.json")) + list(directory.glob("stats-r*.safetensors")):
        path.unlink()
    remember_written(directory, {**files, **{r["file"]: r["sha256"] for r in records}})  # hashed as they were written
    return manifest


# --------------------------------------------------------------------------- removal (`cache rm`)


@dataclass(frozen=True)
class Removal:
    """What `cache rm` will delete: the cache's own files, never a stray file someone put beside them."""

    path: Path  # absolute, links resolved
    files: tuple[Path, ...]  # the cache's own files (manifest last)
    strays: tuple[str, ...]  # other entries, left in place (so the folder then stays)
    bytes: int

    @property
    def name(self) -> str:
        return self.path.name


def _is_plain_name(text: str) -> bool:
    return text not in ("", ".", "..") and "/" not in text and os.sep not in text


def plan_removal(given: str, root: Path) -> Removal:
    """Check that `given` (a name under `root`, or a path) is a clipterm cache that may be removed, and list its files.

    Removable: a folder whose manifest is a well-formed clipterm cache manifest, inside the cache root
    or named by an absolute path, that is neither the root nor above it, and not a symbolic link.
    """
    by_name = _is_plain_name(given) and (Path(root) / given).exists() and not (Path(given) / MANIFEST).is_file()
    directory = Path(root) / given if by_name else Path(given).expanduser()
    explicit = not by_name and directory.is_absolute()
    if directory.is_symlink():
        raise ClipTermError(f"{directory} is a symbolic link; `cache rm` removes only real cache folders",
                            hint=f"remove the link itself with `rm {directory}`, or pass the folder it points to")
    if not directory.is_dir():
        raise ClipTermError(f"no cache {given!r} (no such folder, and not a name under {root})",
                            hint="`clipterm cache ls` lists the caches", code=ExitCode.NOT_FOUND)
    real, real_root = directory.resolve(), Path(root).expanduser().resolve()
    if real == real_root or real in real_root.parents:
        raise ClipTermError(f"{real} is the cache root or a folder above it, not a cache",
                            hint="name one cache: `clipterm cache ls` lists them")
    if not explicit and real_root not in real.parents:
        raise ClipTermError(f"{real} is outside the cache root {real_root}",
                            hint=f"to remove a cache elsewhere, pass its absolute path: `clipterm cache rm {real}`")
    try:
        manifest = read_manifest(real)
    except NotACache:
        raise
    except ClipTermError as exc:
        raise ClipTermError(f"{exc.message}; `cache rm` removes only folders it can identify as caches",
                            hint=f"if you are sure, delete {real} by hand", code=ExitCode.INVALID_DATA) from None
    if manifest is None:
        raise ClipTermError(f"{real} is not a clipterm cache (no {MANIFEST})", hint="`clipterm cache ls` lists the caches",
                            code=ExitCode.NOT_FOUND)
    entries = sorted(real.iterdir())
    files = [p for p in entries if (owned(p.name) or p.name == LOCK) and (p.is_file() or p.is_symlink())]
    files.sort(key=lambda p: (p.name == MANIFEST, p.name == LOCK))  # the manifest goes last: a stopped rm can be rerun
    strays = tuple(p.name for p in entries if p not in files)
    size = sum(p.lstat().st_size for p in files)
    return Removal(real, tuple(files), strays, size)


def remove(plan: Removal) -> bool:
    """Delete the cache's own files under its lock, then the folder if that left it empty. True if the folder went."""
    with CacheLock(plan.path):  # never delete under a running build
        for path in plan.files:
            if path.name != LOCK:
                path.unlink(missing_ok=True)
    (plan.path / LOCK).unlink(missing_ok=True)
    try:
        plan.path.rmdir()
    except OSError:
        return False  # something else is in there: it stays
    return True
