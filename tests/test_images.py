"""Image sources and robust decoding: odd but valid images are kept, broken files are skipped with a reason."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from clipterm.errors import ClipTermError, ExitCode
from clipterm.inputs.images import ImageDataset, SkipImage, collate, decode, open_source


def _pixels(h: int = 40, w: int = 50, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


def write_odd_images(folder) -> list[str]:
    """Valid images in awkward formats; every one must decode. Returns their file names."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = _pixels()
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])).save(folder / "rgba.png")
    Image.fromarray((np.random.default_rng(1).random((40, 50)) * 65535).astype(np.uint16)).save(folder / "grey16.png")
    Image.fromarray(rgb).convert("P").save(folder / "palette.gif", transparency=0)
    huge = np.zeros((6000, 6000, 3), np.uint8)
    huge[::8] = 200  # mostly flat: a small file that is slow only if decoded naively
    Image.fromarray(huge).save(folder / "huge.png", compress_level=1)
    Image.fromarray(rgb).save(folder / "ünïcødé 画像.png")
    return ["cmyk.jpg", "rgba.png", "grey16.png", "palette.gif", "huge.png", "ünïcødé 画像.png"]


def write_bad_images(folder) -> dict[str, str]:
    """Broken files and the words their skip reason must contain."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("this is text, not a JPEG\n")
    Image.fromarray(_pixels()).save(folder / "whole.png")
    data = (folder / "whole.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "whole.png").unlink()
    return {"empty.jpg": "empty file", "notes.jpg": "not an image", "truncated.png": "truncated"}


def test_odd_images_decode_to_rgb(tmp_path):
    names = write_odd_images(tmp_path)
    for name in names:
        image = decode(tmp_path / name, min_side=64)
        assert image.mode == "RGB", name
        assert min(image.size) >= 40, name
    assert decode(tmp_path / "huge.png", min_side=64).size == (6000, 6000)  # by default, as open_clip decodes it
    assert 128 <= min(decode(tmp_path / "huge.png", min_side=64, fast=True).size) < 6000 // 4  # fast: reduced on the way in
    grey = np.asarray(decode(tmp_path / "grey16.png"))
    assert 100 < grey.mean() < 155  # 16-bit values rescaled, not clipped to white (PIL's convert would clip)
    assert np.array_equal(np.asarray(decode(tmp_path / "grey16.png", fast=True)), grey)


def test_alpha_is_composited_over_white(tmp_path):
    clear = np.zeros((8, 8, 4), np.uint8)  # fully transparent black
    Image.fromarray(clear).save(tmp_path / "clear.png")
    assert np.asarray(decode(tmp_path / "clear.png")).min() == 255


def test_broken_files_are_skipped_with_a_reason(tmp_path):
    for name, words in write_bad_images(tmp_path).items():
        with pytest.raises(SkipImage, match=words):
            decode(tmp_path / name)


def test_folder_source_classes_order_and_filters(tmp_path):
    for rel in ["zebra/b.png", "zebra/a.png", "apple/nested/c.png", "root.png"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_pixels(8, 8)).save(tmp_path / rel)
    (tmp_path / "zebra" / "readme.txt").write_text("not an input")
    (tmp_path / ".hidden").mkdir()
    Image.fromarray(_pixels(8, 8)).save(tmp_path / ".hidden" / "x.png")
    source = open_source(str(tmp_path))
    rels = [item.path[len(str(tmp_path)) + 1 :] for item in source.items]
    assert rels == ["apple/nested/c.png", "root.png", "zebra/a.png", "zebra/b.png"]
    assert source.tasks == {"class": ["apple", "zebra"]}
    assert [item.labels["class"] for item in source.items] == [0, -1, 1, 1]
    assert [item.index for item in source.items] == [0, 1, 2, 3]
    assert source.fingerprint() == open_source(str(tmp_path)).fingerprint()


def test_list_source_resolves_paths_and_labels(tmp_path):
    (tmp_path / "imgs").mkdir()
    Image.fromarray(_pixels(8, 8)).save(tmp_path / "imgs" / "one.png")
    (tmp_path / "list.txt").write_text("# a comment\nimgs/one.png\tcat\n\nimgs/missing.png\n")
    source = open_source(str(tmp_path / "list.txt"))
    assert [item.path for item in source.items] == [str(tmp_path / "imgs" / "one.png"), str(tmp_path / "imgs" / "missing.png")]
    assert source.tasks == {"class": ["cat"]} and [i.labels["class"] for i in source.items] == [0, -1]
    with pytest.raises(SkipImage, match="cannot read"):
        source.load(1, 64)


def test_toy_source_labels_every_task():
    from clipterm.toyworld import world

    source = open_source("toy:5@3")
    assert len(source) == 5 and source.seed == 3
    assert source.tasks == {task: list(names) for task, names in world.TASKS.items()}
    assert source.items[4].labels == world.labels(world.scene_at(3, 4))
    assert source.items[4].to_json()["id"] == "toy:3/4"
    expected, _ = world.render(world.scene_at(3, 4))
    assert np.array_equal(np.asarray(source.load(4, 64)), expected)


@pytest.mark.parametrize("spec, world", [("toy2:5@3", None), ("toy:5@3", 2), ("toy1:5@3", 2)])
def test_toy_sources_draw_the_world_they_name_or_the_models(spec, world):
    """`toy2:` names world 2; `toy:` draws the model's world (`toy_world`), recorded so that the cache can be re-read."""
    from clipterm.inputs.images import synthetic_image
    from clipterm.toyworld import world as toyworld

    source = open_source(spec) if world is None else open_source(spec, toy_world=world)
    drawn = 1 if spec.startswith("toy1") else 2
    assert source.world == drawn and source.describe()["world"] == drawn
    assert source.describe()["source"] == (spec if spec.startswith("toy1") else "toy2:5@3")
    assert open_source(source.describe()["source"]).world == drawn  # what forward ablation re-opens
    item = source.items[4].to_json()["id"]
    assert item == ("toy:3/4" if drawn == 1 else "toy2:3/4")
    expected, _ = toyworld.render(toyworld.scene_at(3, 4, drawn))
    assert np.array_equal(np.asarray(source.load(4, 64)), expected)
    assert np.array_equal(np.asarray(synthetic_image(item)), expected)
    assert source.items[4].labels == toyworld.labels(toyworld.scene_at(3, 4, drawn))
    assert source.fingerprint() != open_source("toy1:5@3" if drawn == 2 else "toy2:5@3").fingerprint()


def test_the_model_world_comes_from_its_training_notes(tmp_path):
    from clipterm.toyworld.evaluate import model_world

    (tmp_path / "training.json").write_text('{"world": 2, "steps": 1}')
    assert model_world(f"local-dir:{tmp_path}") == 2 and model_world(str(tmp_path)) == 2
    assert model_world("ViT-B-32") == 1 and model_world("toy-rn") == 2 and model_world("toy-rn-v1") == 1


@pytest.mark.parametrize(
    "spec, code, words",
    [("toy:0", ExitCode.USAGE, "N >= 1"), ("toy:abc", ExitCode.USAGE, "toy:N"), ("toy3:5", ExitCode.USAGE, "toy2:"),
     ("/no/such/dir", ExitCode.NOT_FOUND, "no such")],
)
def test_bad_specs_are_clear_errors(spec, code, words):
    with pytest.raises(ClipTermError, match=words) as info:
        open_source(spec)
    assert info.value.code == code and info.value.hint


def test_empty_folder_is_an_error_with_a_hint(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(ClipTermError, match="no image files") as info:
        open_source(str(tmp_path))
    assert info.value.code == ExitCode.NOT_FOUND and "sub-folder" in info.value.hint


def test_dataloader_with_a_worker_keeps_order_and_reports_skips(tmp_path):
    import torch
    from torchvision import transforms

    write_bad_images(tmp_path / "bad")
    for i in range(3):
        Image.fromarray(_pixels(20, 20, seed=i)).save(tmp_path / f"good{i}.png")
    source = open_source(str(tmp_path))
    dataset = ImageDataset(source, transforms.Compose([transforms.Resize((16, 16)), transforms.ToTensor()]),
                           list(range(len(source))), min_side=16)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=1, collate_fn=collate)
    kept, skipped = [], []
    for indices, pixels, skips in loader:
        assert pixels is None or pixels.shape == (len(indices), 3, 16, 16)
        kept += indices
        skipped += skips
    names = [source.items[i].path.rsplit("/", 1)[1] for i in kept]
    assert names == ["good0.png", "good1.png", "good2.png"]
    assert sorted(source.items[i].path.rsplit("/", 1)[1] for i, _ in skipped) == ["empty.jpg", "notes.jpg", "truncated.png"]
