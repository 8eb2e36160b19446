"""Big image sets as people keep them: webdataset tar shards and local Hugging Face datasets, built into caches
that equal the cache of the same images in a folder, under one process or torchrun; ImageNet's wnid folders get names."""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_build import ENV, TORCHRUN, assert_same_cache  # tests/ is on sys.path (rootdir conftest)

from clipterm.cache.build import BuildOptions, build_cache
from clipterm.cache.inventory import verify
from clipterm.cache.reader import CacheReader
from clipterm.errors import ClipTermError, ExitCode
from clipterm.inputs.images import open_source
from clipterm.inputs.shards import expand_braces

CLASSES = ("cat", "dog")
PER_CLASS = 9  # 18 images in 3 shards of 6


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (40, 48, 3), dtype=np.uint8)  # (H, W, 3)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def samples() -> list[tuple[str, int, bytes]]:
    """(key, class, image bytes) in the folder's sorted order: cat/000 ... dog/008."""
    return [(f"{name}_{i:03d}", c, png(10 * c + i)) for c, name in enumerate(CLASSES) for i in range(PER_CLASS)]


def write_folder(folder: Path) -> Path:
    for key, c, data in samples():
        name, number = key.split("_")
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / f"{number}.png").write_bytes(data)
    return folder


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder: Path, shards: int = 3, extra: dict[str, bytes] | None = None) -> str:
    """webdataset shards 000000.tar ... of the same samples, each an image and its .cls; returns the brace spec."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = samples()
    per = -(-len(rows) // shards)
    for k in range(shards):
        with tarfile.open(folder / f"{k:06d}.tar", "w") as tar:
            for key, c, data in rows[k * per:(k + 1) * per]:
                add(tar, f"{key}.png", data)
                add(tar, f"{key}.cls", str(c).encode())
            if k == shards - 1:
                for name, data in (extra or {}).items():
                    add(tar, name, data)
    return str(folder / ("{000000..%06d}.tar" % (shards - 1)))


def build(toy, root: Path, name: str, images: str, batch_size: int = 5, **options) -> CacheReader:
    build_cache(BuildOptions(images=images, name=name, cache_dir=str(root), dtype="float32", batch_size=batch_size,
                             shard_rows=4, **options), loaded=toy)
    return CacheReader(root / name)


def key_of(row: dict) -> str:
    """A row's image name, the same for a folder file (cat/003.png) and a tar member (cat_003.png)."""
    where = row.get("path") or row["id"].rpartition("#")[2]
    parts = where.replace("\\", "/").split("/")
    return f"{parts[-2]}_{parts[-1]}" if row.get("path") else parts[-1]


def assert_same_rows(a: CacheReader, b: CacheReader) -> None:
    """Equal by content: for every image name, the same labels and the same value of every component."""
    rows_a = {key_of(row): i for i, row in enumerate(r for r in a.images() if not r["skipped"])}
    rows_b = {key_of(row): i for i, row in enumerate(r for r in b.images() if not r["skipped"])}
    assert rows_a.keys() == rows_b.keys() and len(rows_a) == a.n == b.n
    order_a = [rows_a[k] for k in sorted(rows_a)]
    order_b = [rows_b[k] for k in sorted(rows_a)]
    assert a.tasks["class"] == ["cat", "dog"] or a.tasks["class"] == ["0", "1"]
    assert torch.equal(a.labels("class", order_a), b.labels("class", order_b))
    assert torch.allclose(a.image_embeds(order_a), b.image_embeds(order_b), atol=1e-6)
    for name in ("embed", "bias", "L0.H0", "L3.H5", "L5.MLP", "L2"):
        assert torch.allclose(a.effects(name, order_a), b.effects(name, order_b), atol=1e-6), name


def test_brace_ranges_expand_zero_padded_in_order():
    assert expand_braces("d/{000008..000011}.tar") == [f"d/0000{n:02d}.tar" for n in (8, 9, 10, 11)]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]


def test_a_cache_from_three_webdataset_shards_equals_the_folder_cache(toy, tmp_path):
    folder = build(toy, tmp_path / "root", "folder", str(write_folder(tmp_path / "images")))
    spec = write_shards(tmp_path / "wds")
    shards = build(toy, tmp_path / "root", "shards", spec)
    assert shards.manifest["dataset"]["kind"] == "tar" and shards.tasks == {"class": ["0", "1"]}
    assert verify(shards.path) == []
    assert_same_rows(folder, shards)
    again = build(toy, tmp_path / "root", "folder-of-tars", str(tmp_path / "wds"))  # a folder of .tar is the same
    assert_same_rows(shards, again)


def test_labels_can_come_from_a_json_member(tmp_path):
    folder = tmp_path / "wds"
    folder.mkdir()
    with tarfile.open(folder / "000000.tar", "w") as tar:
        for i, label in enumerate(["zebra", "ant", "zebra"]):
            add(tar, f"s{i}.jpg", png(i))
            add(tar, f"s{i}.json", f'{{"label": "{label}", "caption": "x"}}'.encode())
    source = open_source(str(folder / "000000.tar"), label_key="label")
    assert source.tasks == {"class": ["ant", "zebra"]}
    assert [item.labels["class"] for item in source.items] == [1, 0, 1]
    assert source.load(1, 64).size == (48, 40)


def test_bad_shard_inputs_are_skipped_with_a_reason_or_refused_in_one_line(toy, tmp_path, cli):
    spec = write_shards(tmp_path / "wds", extra={"broken.jpg": b"this is text, not a JPEG\n", "lonely.txt": b"no image"})
    cache = build(toy, tmp_path / "root", "bad", spec)
    reasons = {cache.images()[s["index"]]["id"].rpartition("#")[2]: s["reason"] for s in cache.manifest["skipped"]}
    assert "not an image" in reasons["broken.jpg"] and "no image member in sample lonely (it holds .txt)" in reasons["lonely.[txt]"]
    assert cache.n == 2 * PER_CLASS
    result = cli("cache", "build", "--images", str(tmp_path / "wds" / "{000000..000003}.tar"), "--name", "gone")
    assert result.code == ExitCode.NOT_FOUND and "no such shard" in result.err and "000003.tar" in result.err


def test_torchrun_over_shards_equals_one_process(toy, tmp_path):
    spec = write_shards(tmp_path / "wds")
    # batches of one chunk each, so both builds put the same images through the same matmuls (fp32 sums to 1e-9)
    one = build(toy, tmp_path, "one", spec, batch_size=4)
    command = ["cache", "build", "--images", spec, "--name", "two", "--cache-dir", str(tmp_path), "--shard-rows", "4",
               "--batch-size", "4", "--dtype", "float32"]
    done = subprocess.run([*TORCHRUN, *command], env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    two = CacheReader(tmp_path / "two")
    assert len(two.manifest["shards"]) == 5
    assert_same_cache(two, one)


def test_a_saved_hugging_face_dataset_builds_a_labelled_cache(toy, tmp_path, cli):
    datasets = pytest.importorskip("datasets", reason="hf: inputs need the optional `datasets` package (clipterm[hf])")
    rows = samples()
    features = datasets.Features({"img": datasets.Image(), "animal": datasets.ClassLabel(names=list(CLASSES)),
                                  "caption": datasets.Value("string")})
    dataset = datasets.Dataset.from_dict({"img": [{"bytes": data, "path": None} for _, _, data in rows],
                                          "animal": [c for _, c, _ in rows], "caption": [k for k, _, _ in rows]},
                                         features=features)
    dataset.save_to_disk(str(tmp_path / "pets"))
    cache = build(toy, tmp_path / "root", "hf", f"hf:{tmp_path / 'pets'}", label_column="animal")
    assert cache.tasks == {"class": ["cat", "dog"]} and cache.n == len(rows)
    assert cache.labels("class").tolist() == [c for _, c, _ in rows]
    folder = build(toy, tmp_path / "root", "folder", str(write_folder(tmp_path / "images")))
    assert torch.allclose(cache.image_embeds(), folder.image_embeds(), atol=1e-6)  # the same order: sorted names
    assert cache.images()[3]["id"].endswith("#img/3")
    result = cli("cache", "build", "--images", f"hf:{tmp_path / 'pets'}", "--label-column", "breed", "--name", "x")
    assert result.code == ExitCode.USAGE and "no column 'breed'" in result.err and "animal" in result.err


def test_imagenet_wnid_folders_get_open_clip_class_names(tmp_path):
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    tiny = png(0)
    for i in range(1000):
        (tmp_path / "val" / f"n{i:08d}").mkdir(parents=True)
        (tmp_path / "val" / f"n{i:08d}" / "a.png").write_bytes(tiny)
    source = open_source(str(tmp_path / "val"))
    assert source.tasks["class"][0] == "tench" and source.tasks["class"] == list(IMAGENET_CLASSNAMES)
    assert source.items[999].labels == {"class": 999}
    (tmp_path / "some" / "n01440764").mkdir(parents=True)
    (tmp_path / "some" / "n01440764" / "a.png").write_bytes(tiny)
    assert open_source(str(tmp_path / "some")).tasks == {"class": ["n01440764"]}  # a subset keeps its wnids


def test_a_missing_dataset_folder_is_one_line(tmp_path):
    pytest.importorskip("datasets", reason="hf: inputs need the optional `datasets` package (clipterm[hf])")
    with pytest.raises(ClipTermError, match="no such dataset folder"):
        open_source(f"hf:{tmp_path / 'nowhere'}")
