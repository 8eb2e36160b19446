"""The cache format: atomic files, the writer's lock, fp64 statistics, and the mmap reader."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import clipterm
from clipterm import files
from clipterm.cache import store
from clipterm.cache.build import BuildOptions, build_cache
from clipterm.cache.reader import CacheReader, check_model
from clipterm.errors import ClipTermError, ExitCode
from clipterm.inputs.images import toy_id, toy_spec
from clipterm.toyworld.evaluate import model_world

TOY_WORLD = model_world("toy")  # the world the shipped toy was trained on: what `toy:N` draws for it


@pytest.fixture(scope="module")
def cache(toy, tmp_path_factory):
    """A small fp32 cache of 40 toy scenes in 3 shards, with neurons and tokens for L4-5."""
    root = tmp_path_factory.mktemp("store-cache")
    build_cache(BuildOptions(images="toy:40", name="small", cache_dir=str(root), dtype="float32", shard_rows=16,
                             batch_size=16, neurons=True, tokens="L4-5"), loaded=toy)
    return CacheReader(root / "small")


def test_atomic_write_replaces_whole_files(tmp_path):
    target = tmp_path / "f.json"
    sha = files.atomic_write(target, b"old")
    assert files.atomic_write(target, b"new") != sha
    assert target.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]


def test_second_writer_is_refused_while_the_first_holds_the_lock(tmp_path):
    with store.CacheLock(tmp_path / "c"):
        with pytest.raises(ClipTermError, match="another process") as info:
            store.CacheLock(tmp_path / "c").acquire()
        assert info.value.code == ExitCode.BUSY
    store.CacheLock(tmp_path / "c").acquire().release()  # free again


def test_a_killed_holder_releases_the_lock(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import time
            from clipterm.cache.store import CacheLock
            CacheLock({str(tmp_path)!r}).acquire()
            print("locked", flush=True)
            time.sleep(60)
        """)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ClipTermError, match=f"pid {holder.pid}"):
            store.CacheLock(tmp_path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    store.CacheLock(tmp_path).acquire().release()


def test_partial_stats_merge_to_the_whole():
    gen = torch.Generator().manual_seed(0)
    rows = {
        "head_out": torch.randn(2, 3, 50, 4, generator=gen), "mlps": torch.randn(2, 50, 6, generator=gen),
        "embed": torch.randn(50, 6, generator=gen), "bias": torch.randn(50, 6, generator=gen),
        "image_embeds": torch.randn(50, 6, generator=gen),
    }
    whole = store.partial_stats(rows)
    merged = None
    for lo, hi in [(30, 50), (0, 7), (7, 30)]:  # any split, any order
        part = {k: (v[:, :, lo:hi] if k == "head_out" else v[:, lo:hi] if k == "mlps" else v[lo:hi]) for k, v in rows.items()}
        merged = store.add_stats(merged, store.partial_stats(part))
    for key, value in whole.items():
        assert torch.allclose(merged[key], value, rtol=1e-12, atol=1e-12), key
    assert whole["heads.outer"].shape == (2, 3, 4, 4) and whole["mlps.outer"].shape == (2, 6, 6)


def test_resume_refuses_a_different_build(tmp_path):
    manifest = store.new_manifest(model={"weights_sha256": "a", "arch": "toy"}, convention="c", dataset={"n": 10, "fingerprint": "f", "source": "toy:10", "tasks": {}},
                                  dtype="float16", stored={"neurons": False, "tokens": []},
                                  shape={"layers": 1, "heads": 1, "head_dim": 2, "embed_dim": 2, "mlp_width": 4}, shard_rows=4)
    store.prepare(tmp_path, manifest, force=False)
    with pytest.raises(ClipTermError, match="another dtype") as info:
        store.prepare(tmp_path, {**manifest, "dtype": "float32"}, force=False)
    assert "--force" in info.value.hint
    (tmp_path / "keep.txt").write_text("not ours")
    store.prepare(tmp_path, {**manifest, "dtype": "float32"}, force=True)
    assert (tmp_path / "keep.txt").exists()  # --force deletes only the files a build writes


def test_reader_effects_sum_to_image_embeds(cache):
    shape = cache.shape
    total = cache.effects("embed") + cache.effects("bias")
    total += sum(cache.effects(f"L{l}") for l in range(shape.layers))  # heads and MLP of each layer
    embeds = cache.image_embeds()
    assert total.shape == embeds.shape == (40, 128)
    assert ((total - embeds).norm(dim=-1) / embeds.norm(dim=-1)).max() < 1e-5
    layer = sum(cache.effects(f"L2.H{h}") for h in range(shape.heads)) + cache.effects("L2.MLP")
    assert torch.allclose(layer, cache.effects("L2"), atol=1e-6)


def test_reader_head_out_readout_and_rows(cache):
    head = cache.head_out("L3.H1")
    assert head.shape == (40, 16) and torch.equal(head, cache.head_out((3, 1)))
    assert torch.allclose(cache.effects("L3.H1"), head @ cache.readout[3, 1])
    rows = [39, 0, 17, 16]  # across shards, any order
    assert torch.equal(cache.effects("L3.H1", rows=rows), cache.effects("L3.H1")[rows])
    assert torch.equal(cache.labels("colour", rows=rows), cache.labels("colour")[rows])
    assert cache.effects("L0.MLP", rows=[]).shape == (0, 128)
    assert torch.equal(cache.index(), torch.arange(40))


def test_reader_extras_and_labels(cache):
    from clipterm.toyworld import world

    assert cache.labels("shape").tolist() == [world.labels(world.scene_at(0, i, TOY_WORLD))["shape"] for i in range(40)]
    assert cache.neurons("L5").shape == (40, 512) and cache.neurons(0).shape == (40, 512)
    tokens = cache.tokens(4)  # (H, N, T, dh); the CLS output is the sum over source tokens
    assert tokens.shape == (8, 40, 65, 16)
    heads = torch.stack([cache.head_out((4, h)) for h in range(8)])  # (H, N, dh)
    assert torch.allclose(tokens.sum(2), heads, atol=1e-5)
    with pytest.raises(ClipTermError, match="no tokens for L3"):
        cache.tokens("L3")
    with pytest.raises(ClipTermError, match="no labels for 'class'"):
        cache.labels("class")
    with pytest.raises(ClipTermError, match="no layer 9"):
        cache.effects("L9.H0")
    images = cache.images()
    assert len(images) == 40 and images[7]["id"] == toy_id(0, 7, TOY_WORLD) and images[7]["skipped"] is False


def test_reader_stats_match_the_rows(cache):
    head = cache.head_out("L1.H2").double()
    stats = cache.stats("L1.H2")
    assert stats["count"] == 40
    assert torch.allclose(stats["mean"], head.mean(0)) and torch.allclose(stats["outer"], head.T @ head)
    mlp = cache.effects("L4.MLP").double()
    assert torch.allclose(cache.stats("L4.MLP")["outer"], mlp.T @ mlp, rtol=1e-9)
    assert torch.allclose(cache.stats("embed")["mean"], cache.effects("embed").double().mean(0), atol=1e-6)
    assert set(cache.stats()) >= {"count", "heads.sum", "heads.outer", "mlps.sum", "mlps.outer", "embed.sum", "bias.sum"}


def test_open_cache_by_path_or_name(cache, monkeypatch):
    assert clipterm.open_cache(cache.path).n == 40
    assert clipterm.open_cache("small", cache_dir=cache.path.parent).n == 40
    monkeypatch.setenv("CLIPTERM_CACHE", str(cache.path.parent))
    assert clipterm.open_cache("small").manifest["dataset"]["source"] == toy_spec(40, world=TOY_WORLD)
    with pytest.raises(ClipTermError, match="no cache 'nope'") as info:
        clipterm.open_cache("nope")
    assert info.value.code == ExitCode.NOT_FOUND and "small" in info.value.hint


def test_model_with_other_weights_is_refused(cache, toy, tmp_path):
    import dataclasses

    check_model(cache, toy.info)  # the same weights pass
    other = dataclasses.replace(toy.info, weights_sha256="0" * 64)
    with pytest.raises(ClipTermError, match="other weights") as info:
        check_model(cache, other)
    assert info.value.code == ExitCode.INVALID_DATA and "--model toy" in info.value.hint


def test_incomplete_cache_needs_resuming(cache, tmp_path):
    import json
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(cache.path, copy)
    manifest = json.loads((copy / store.MANIFEST).read_text())
    store.write_manifest(copy, {**manifest, "complete": False})
    with pytest.raises(ClipTermError, match="incomplete") as info:
        CacheReader(copy)
    assert "resume" in info.value.hint
    assert CacheReader(copy, allow_incomplete=True).n == 40
    os.remove(copy / "shard-00001.safetensors")
    with pytest.raises(ClipTermError, match="shard-00001") as info:
        CacheReader(copy, allow_incomplete=True).effects("embed")
    assert "verify" in info.value.hint
