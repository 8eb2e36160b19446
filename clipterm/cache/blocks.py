"""Per-block checksums of a shard: bit-rot is caught on the read that would have used it.

A shard's tensors are component-major, so a read touches whole blocks: `head_out[l, h]`, `mlps[l]`,
`neurons[l]`, `tokens.Lk[h]`, or a whole per-row tensor such as `image_embeds`. The writer stores the
crc32 of every block in the shard's safetensors header (`__metadata__["crc32"]`), and a reader checks
each block the first time it reads it, at the speed of a memory copy. The file's sha256 stays the
check of record (`cache verify`); this one catches what changes in place after that check, mtime kept.
Shards written before this have no block sums: their reads rely on the sha256 alone.
"""

from __future__ import annotations

import json
import zlib
from itertools import product
from pathlib import Path
from typing import Any, Callable

KEY = "crc32"
ROW_AXIS = {"head_out": 2, "mlps": 1, "neurons": 1, "tokens": 1, "pool_heads": 1}  # where a shard tensor's rows are


def row_axis(tensor: str) -> int:
    return ROW_AXIS.get(tensor.split(".")[0], 0)


def block_sums(tensors: dict[str, Any]) -> str:
    """The `crc32` metadata entry of a shard: {tensor: [crc of each block, in row-major order of the leading dims]}."""
    import torch

    sums = {}
    for name, tensor in tensors.items():
        axis = row_axis(name)
        count = 1
        for dim in tensor.shape[:axis]:
            count *= dim
        if tensor.numel() == 0:  # a shard with no rows: empty blocks
            sums[name] = [0] * max(1, count)
            continue
        raw = tensor.contiguous().reshape(-1).view(torch.uint8).reshape(count, -1).numpy()  # (blocks, bytes)
        sums[name] = [zlib.crc32(row) for row in raw]
    return json.dumps(sums, separators=(",", ":"))


class ShardBlocks:
    """Checks the blocks of one shard as they are first read; `damaged(what)` makes the error to raise."""

    def __init__(self, path: Path, header: dict[str, Any], damaged: Callable[[str], Exception]):
        self.path, self.damaged = path, damaged
        meta = header.get("__metadata__") or {}
        try:
            self.sums: dict[str, list[int]] | None = json.loads(meta[KEY]) if KEY in meta else None
        except ValueError:
            raise damaged("its block checksums are unreadable") from None
        self.entries = {k: v for k, v in header.items() if k != "__metadata__"}
        self.data_start = None
        self.done: set[tuple[str, int]] = set()

    def check(self, tensor: str, index: Any = ()) -> None:
        """Verify every block of `tensor` that `tensor[index]` touches (ints pick, slices take all) not yet verified."""
        if self.sums is None:
            return
        sums, shape = self.sums.get(tensor), self.entries[tensor]["shape"]
        leading = shape[:row_axis(tensor)]
        if sums is None or len(sums) != max(1, _count(leading)):
            raise self.damaged(f"its block checksums do not cover {tensor}")
        index = index if isinstance(index, tuple) else (index,)
        picks = [[index[d] % size] if d < len(index) and isinstance(index[d], int) else range(size)
                 for d, size in enumerate(leading)]
        todo = [b for b in (_flat(p, leading) for p in product(*picks)) if (tensor, b) not in self.done]
        if not todo:
            return
        begin, stop = self.entries[tensor]["data_offsets"]
        size = (stop - begin) // len(sums)
        with open(self.path, "rb") as f:
            for block in todo:
                f.seek(self._data_start(f) + begin + block * size)
                if zlib.crc32(f.read(size)) != sums[block]:
                    raise self.damaged(f"block {block} of {tensor} changed since it was written")
                self.done.add((tensor, block))

    def _data_start(self, f: Any) -> int:
        if self.data_start is None:
            f.seek(0)
            self.data_start = 8 + int.from_bytes(f.read(8), "little")
        return self.data_start


def _count(dims: list[int]) -> int:
    count = 1
    for dim in dims:
        count *= dim
    return count


def _flat(position: tuple[int, ...], dims: list[int]) -> int:
    flat = 0
    for index, size in zip(position, dims):
        flat = flat * size + index
    return flat


class CheckedHandle:
    """A `safe_open` handle whose reads verify the blocks they touch first (see `ShardBlocks`)."""

    def __init__(self, handle: Any, blocks: ShardBlocks):
        self.handle, self.blocks = handle, blocks

    def get_tensor(self, name: str) -> Any:
        self.blocks.check(name)
        return self.handle.get_tensor(name)

    def get_slice(self, name: str) -> CheckedSlice:
        return CheckedSlice(self, name)


class CheckedSlice:
    def __init__(self, owner: CheckedHandle, name: str):
        self.owner, self.name = owner, name

    def get_shape(self) -> list[int]:
        return self.owner.handle.get_slice(self.name).get_shape()

    def __getitem__(self, index: Any) -> Any:
        self.owner.blocks.check(self.name, index)
        return self.owner.handle.get_slice(self.name)[index]
