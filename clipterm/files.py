"""Files: atomic writes, hashing, and safetensors in and out. Nothing here knows what a cache is."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

from clipterm.errors import ClipTermError


def atomic_write(path: Path, data: bytes, durable: bool = True) -> str:
    """Write `path` via a per-process `.tmp` + fsync + rename, so readers see the old file or the new one; returns sha256.

    `durable=False` skips the fsyncs: for files that only save work (a crash may leave the old file, or an empty one)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        tmp.unlink(missing_ok=True)  # a stale one, or a link planted there: never written through
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666), "wb") as f:
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk or Ctrl-C leaves no half-written file behind
        tmp.unlink(missing_ok=True)
        raise
    if not durable:
        return hashlib.sha256(data).hexdigest()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return hashlib.sha256(data).hexdigest()


def write_json(path: Path, payload: Any, durable: bool = True) -> str:
    return atomic_write(path, (json.dumps(payload, indent=1, ensure_ascii=False) + "\n").encode(), durable)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def save_tensors(path: Path, tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> str:
    from safetensors.torch import save

    return atomic_write(path, save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata))


def load_tensors(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(path))


_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file ({name: {dtype, shape, data_offsets}}, `__metadata__`), read without mmap.

    Raises ValueError when the file is too short for its header, or the header is not a well-formed table of
    tensors that exactly covers the rest of the file."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError("shorter than a safetensors header")
        length = int.from_bytes(prefix, "little")
        if length > min(size - 8, 100_000_000):
            raise ValueError("header length beyond the end of the file")
        header = json.loads(f.read(length))
    if not isinstance(header, dict):
        raise ValueError("header is not a table")
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not (isinstance(entry, dict) and isinstance(entry.get("dtype"), str) and isinstance(entry.get("shape"), list)
                and isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2):
            raise ValueError(f"malformed entry for {name!r}")
        begin, stop = (int(x) for x in entry["data_offsets"])
        count = 1
        for dim in entry["shape"]:
            count *= int(dim)
        if entry["dtype"] not in _DTYPE_BYTES or stop - begin != count * _DTYPE_BYTES[entry["dtype"]] or begin < 0:
            raise ValueError(f"{name!r}: {entry['dtype']} {entry['shape']} does not fit bytes {begin}..{stop}")
        end = max(end, stop)
    if 8 + length + end != size:
        raise ValueError(f"tensors end at byte {8 + length + end}, the file has {size}")
    return header


def output_folder(folder: Path, what: str) -> Path:
    """Create `folder` (and its parents) for output, or say in one line why it cannot be."""
    if folder.exists() and not folder.is_dir():
        raise ClipTermError(f"{what} {folder} is a file, not a folder", hint="give a folder (it is created when missing)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a parent that is a file, a read-only place, a name too long
        raise ClipTermError(f"cannot create {what} {folder}: {exc.strerror or exc}",
                            hint="choose a folder you can write to") from None
    return folder


def check_replacing(folder: Path, names: Iterable[str], force: bool, what: str, ours: Iterable[str] = ()) -> None:
    """Refuse to write `names` into `folder` where that would replace something: a file that is not among `ours`
    (the files this command wrote there before), or any symlink, which is never written through. With `force`,
    files are replaced, and a link is replaced by the new file (its target is left alone)."""
    names, mine = list(names), set(ours)
    for name in names:
        parts = Path(name).parts
        for depth in range(1, len(parts)):  # a linked sub-folder would be written through, --force or not
            if folder.joinpath(*parts[:depth]).is_symlink():
                raise ClipTermError(f"{what} {folder}: {Path(*parts[:depth])} is a symlink, and clipterm never writes "
                                    "through one", hint="remove it, or choose another folder")
    if force:
        return
    taken = [name for name in names if (folder / name).is_symlink()
             or ((folder / name).exists() and not (name in mine and (folder / name).is_file()))]
    if not taken:
        return
    links = [name for name in taken if (folder / name).is_symlink()]
    shown = ", ".join(taken[:3]) + (f" and {len(taken) - 3} more" if len(taken) > 3 else "")
    if links:
        raise ClipTermError(f"{what} {folder}: {links[0]} is a symlink, and clipterm never writes through one",
                            hint="remove it, choose another folder, or pass --force to replace the link itself "
                                 "(its target is left alone)")
    raise ClipTermError(f"{what} {folder} already holds {shown}, which this would replace",
                        hint="pass --force to replace them, or choose another folder")
