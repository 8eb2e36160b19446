"""Files: atomic writes, hashing, and safetensors in and out. Nothing here knows what a cache is."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def atomic_write(path: Path, data: bytes) -> str:
    """Write `path` via a per-process `.tmp` + fsync + rename, so readers see the old file or the new one; returns sha256."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return hashlib.sha256(data).hexdigest()


def write_json(path: Path, payload: Any) -> str:
    return atomic_write(path, (json.dumps(payload, indent=1, ensure_ascii=False) + "\n").encode())


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
