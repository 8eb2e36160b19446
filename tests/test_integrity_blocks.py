"""Bit-rot after a verified read (reliability round 3): an in-place change is caught on the read that would use it,
and `cache verify` revokes what it finds damaged."""

from __future__ import annotations

import json
import os

import pytest
from cache_helpers import pristine_cache, root_holding

from clipterm.cache import blocks, integrity
from clipterm.cache.reader import open_cache
from clipterm.errors import ClipTermError, ExitCode
from clipterm.files import safetensors_header

SHARD = "shard-00000.safetensors"


@pytest.fixture(scope="module")
def built(toy, tmp_path_factory):
    return pristine_cache(toy, tmp_path_factory, "blocks", images=12, shard_rows=4)


@pytest.fixture
def root(built, tmp_path, monkeypatch):
    return root_holding(built, tmp_path, monkeypatch)


def rot(path, tensor: str, block: int = 0) -> None:
    """Flip one byte inside `tensor`'s block `block`, in place, keeping the file's size and mtime."""
    header = safetensors_header(path)
    begin, stop = header[tensor]["data_offsets"]
    count = len(json.loads(header["__metadata__"][blocks.KEY])[tensor])
    at = 8 + int.from_bytes(path.read_bytes()[:8], "little") + begin + block * (stop - begin) // count + 1
    before = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 0x10]))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(path).st_size == before.st_size and os.stat(path).st_mtime_ns == before.st_mtime_ns


def test_every_shard_carries_a_checksum_per_block(root):
    header = safetensors_header(root / "pets" / SHARD)
    sums = json.loads(header["__metadata__"][blocks.KEY])
    layers, heads = header["head_out"]["shape"][:2]
    assert len(sums["head_out"]) == layers * heads and len(sums["mlps"]) == header["mlps"]["shape"][0]
    assert len(sums["image_embeds"]) == 1 and set(sums) == {k for k in header if k != "__metadata__"}


def test_bit_rot_after_a_verified_read_is_refused(cli, root):
    first = cli("images", "pets", "--component", "L1.H0", "--top", "3", "--json")
    assert first.code == 0, first.err
    assert SHARD in integrity.load_records(root / "pets")  # verified, so the sha256 is not computed again
    rot(root / "pets" / SHARD, "head_out", block=1 * 8 + 0)  # L1.H0 of the toy's 8 heads
    again = cli("images", "pets", "--component", "L1.H0", "--top", "3", "--json")
    assert again.code == ExitCode.INVALID_DATA and "unexpected" not in again.err, again
    assert SHARD in again.err and "head_out" in again.err and "clipterm cache verify" in again.err


def test_a_block_that_is_not_read_does_not_stop_other_reads(root):
    open_cache("pets").effects("L1.H0")  # verify and remember every shard
    rot(root / "pets" / SHARD, "head_out", block=5)  # L0.H5
    open_cache("pets").effects("L1.H0")  # reads other blocks only
    with pytest.raises(ClipTermError, match="block 5 of head_out"):
        open_cache("pets").effects("L0.H5")


def test_a_sampled_gather_checks_its_blocks_too(root):
    import torch

    open_cache("pets").effects("L1.H0")
    rot(root / "pets" / SHARD, "image_embeds")
    with pytest.raises(ClipTermError, match="image_embeds"):
        open_cache("pets").gather("image_embeds", (), torch.tensor([0, 1]))


def test_verify_revokes_what_it_finds_damaged(cli, root):
    open_cache("pets").effects("L1.H0")
    assert SHARD in integrity.load_records(root / "pets")
    rot(root / "pets" / SHARD, "mlps", block=2)
    report = cli("cache", "verify", "pets")
    assert report.code != 0 and SHARD in report.out + report.err
    assert SHARD not in integrity.load_records(root / "pets")  # revoked: the next open hashes it and refuses it
    later = cli("images", "pets", "--component", "L1.H0", "--top", "3")
    assert later.code == ExitCode.INVALID_DATA and SHARD in later.err


def test_shards_without_block_sums_still_read(root):
    """Caches written before block sums: the sha256 alone guards them, and they read as before."""
    from safetensors.torch import load_file, save_file

    path = root / "pets" / SHARD
    header = safetensors_header(path)
    meta = {k: v for k, v in header["__metadata__"].items() if k != blocks.KEY}
    save_file(load_file(str(path)), str(path), metadata=meta)
    manifest = json.loads((root / "pets" / "manifest.json").read_text())
    from clipterm.cache import store
    from clipterm.files import file_sha256

    record = manifest["shards"][0]
    record["bytes"], record["sha256"] = path.stat().st_size, file_sha256(path)
    store.write_manifest(root / "pets", manifest)
    integrity.forget(root / "pets")
    assert open_cache("pets").effects("L1.H0").shape[0] == 12
