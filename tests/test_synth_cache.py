"""bench/tools/synth_cache.py writes caches that the reader, `cache verify` and the contract accept, at any model's
shape."""

from __future__ import annotations

import torch

from bench.tools.synth_cache import synth_cache
from clipterm.cache.inventory import verify
from clipterm.cache.reader import CacheReader


def test_a_synthetic_cache_is_valid_and_keeps_the_contract(tmp_path):
    path = synth_cache(tmp_path / "b16", arch="ViT-B-16", n=40, labels=5, neurons=True, tokens=[11], shard_rows=16)
    assert verify(path) == []
    cache = CacheReader(path)
    assert cache.n == 40 and [r["rows"] for r in cache.manifest["shards"]] == [16, 16, 8]
    assert (cache.shape.layers, cache.shape.heads, cache.manifest["shape"]["tokens"]) == (12, 12, 197)
    total = cache.effects("embed") + cache.effects("bias")
    for layer in range(12):
        total += cache.effects(f"L{layer}")
    assert torch.allclose(total, cache.image_embeds(), atol=1e-3)
    assert torch.allclose(cache.tokens("L11").float().sum(2), torch.stack(
        [cache.head_out(f"L11.H{h}").float() for h in range(12)]), atol=2e-2)
    head = cache.stats("L3.H4")
    rows = cache.head_out("L3.H4").double()
    assert torch.allclose(head["mean"], rows.mean(0)) and int(head["count"]) == 40
    assert cache.labels("class").min() >= 0 and cache.labels("class").max() < 5 and len(cache.tasks["class"]) == 5
    assert [row["labels"]["class"] for row in cache.images()] == cache.labels("class").tolist()
    assert cache.neurons("L2").shape == (40, 3072)


def test_a_damaged_synthetic_shard_fails_verify(tmp_path):
    path = synth_cache(tmp_path / "h14", arch="ViT-H-14", n=8, shard_rows=4)
    assert CacheReader(path).shape.heads == 16 and CacheReader(path).manifest["shape"]["head_dim"] == 80
    shard = path / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert [p["file"] for p in verify(path)] == ["shard-00001.safetensors"]
