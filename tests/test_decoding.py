"""Faithful decoding by default: a cache's image_embeds equal plain open_clip's on the same file; `--fast-decode` is opt-in."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipterm.cache import store
from clipterm.cache.build import BuildOptions, build_cache
from clipterm.cache.reader import CacheReader
from clipterm.errors import ClipTermError


def _photo(path: Path, seed: int, size=(640, 480)) -> None:
    """A smooth-ish RGB JPEG over twice the toy's 64 px input, so the fast path decodes it at a reduced scale."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((size[1] // 10, size[0] // 10, 3)) * 255
    pixels = np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize(size, Image.BICUBIC), dtype=np.float64)
    pixels = np.clip(pixels + rng.normal(0, 12, pixels.shape), 0, 255).astype(np.uint8)  # texture the draft loses
    Image.fromarray(pixels).save(path, quality=92)


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        _photo(folder / f"p{i}.jpg", i)
    return folder


def _plain_open_clip(toy, folder: Path) -> torch.Tensor:
    """open_clip's own preprocess (built from the model's preprocess_cfg) and encode_image on Image.open(path)."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    preprocess = image_transform_v2(PreprocessCfg(**toy.model.visual.preprocess_cfg), is_train=False)
    pixels = torch.stack([preprocess(Image.open(path)) for path in sorted(folder.glob("*.jpg"))])
    with torch.no_grad():
        return toy.model.encode_image(pixels).float()  # (N, D)


def _gap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).norm(dim=-1) / b.norm(dim=-1)  # (N,)


def test_default_build_equals_plain_open_clip_and_fast_decode_is_close(toy, photos, tmp_path):
    plain = _plain_open_clip(toy, photos)
    build_cache(BuildOptions(images=str(photos), name="full", cache_dir=str(tmp_path), dtype="float32"), loaded=toy)
    build_cache(BuildOptions(images=str(photos), name="fast", cache_dir=str(tmp_path), dtype="float32", fast_decode=True),
                loaded=toy)
    full, fast = CacheReader(tmp_path / "full"), CacheReader(tmp_path / "fast")
    assert full.manifest["decode"] == "full" and fast.manifest["decode"] == "fast"
    assert float(_gap(full.image_embeds(), plain).max()) <= 1e-6
    fast_gap = _gap(fast.image_embeds(), plain)
    assert 1e-5 < float(fast_gap.max()) <= 0.03  # the draft really changes the pixels, by little


def test_a_resume_with_another_decode_choice_is_refused(toy, photos, tmp_path):
    build_cache(BuildOptions(images=str(photos), name="c", cache_dir=str(tmp_path), shard_rows=1), loaded=toy)
    manifest = tmp_path / "c" / "manifest.json"
    state = json.loads(manifest.read_text())
    state["complete"], state["shards"] = False, state["shards"][:1]  # as if killed after the first shard
    store.write_manifest(tmp_path / "c", state)
    with pytest.raises(ClipTermError, match="another decode") as info:
        build_cache(BuildOptions(images=str(photos), name="c", cache_dir=str(tmp_path), shard_rows=1, fast_decode=True),
                    loaded=toy)
    assert "--force" in info.value.hint
    resumed = build_cache(BuildOptions(images=str(photos), name="c", cache_dir=str(tmp_path), shard_rows=1), loaded=toy)
    assert resumed.built == 2 and CacheReader(tmp_path / "c").manifest["decode"] == "full"
    with pytest.raises(ClipTermError, match="another decode"):  # a complete cache is not silently reused either
        build_cache(BuildOptions(images=str(photos), name="c", cache_dir=str(tmp_path), shard_rows=1, fast_decode=True),
                    loaded=toy)
