"""The synthetic world: deterministic scenes with labels and masks, files on disk, and the shipped toy CLIP's accuracy."""

import json

import numpy as np
import pytest

from clipterm.toyworld.captions import caption, task_prompts
from clipterm.toyworld.world import COLOURS, TASKS, Obj, Scene, labels, render, scene_at


def test_scenes_are_deterministic_and_random_access():
    first = [render(scene_at(3, i))[0] for i in range(20)]
    again = [render(scene_at(3, i))[0] for i in reversed(range(20))][::-1]
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(first[0], render(scene_at(4, 0))[0])


def test_images_are_64px_rgb_with_one_mask_per_object():
    for i in range(50):
        scene = scene_at(0, i)
        image, masks = render(scene)
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        assert len(masks) == len(scene.objects) in (1, 2)
        for k, (obj, mask) in enumerate(zip(scene.objects, masks)):
            assert mask.sum() > 10
            visible = mask & ~np.any(masks[k + 1 :], axis=0) if k + 1 < len(masks) else mask
            if scene.word is None:  # a word may be drawn over an object
                assert np.all(image[visible] == np.array(COLOURS[obj.colour], dtype=np.uint8))


def test_labels_are_minus_one_when_ambiguous_or_absent():
    red = Obj("red", "star", "large", "left")
    blue = Obj("blue", "star", "small", "right")
    both = labels(Scene((red, blue), "dark"))
    assert both["colour"] == -1 and both["size"] == -1 and both["position"] == -1
    assert both["shape"] == TASKS["shape"].index("star")
    assert both["word"] == -1
    worded = labels(Scene((red,), "noisy", word="blue", ink="red", word_position="top"))
    assert worded["word"] == TASKS["word"].index("blue") and worded["colour"] == TASKS["colour"].index("red")


def test_typographic_attacks_occur():
    scenes = [scene_at(0, i) for i in range(2000)]
    attacks = [s for s in scenes if s.word in COLOURS and s.ink != s.word]
    assert len(attacks) > 50
    assert sum(len(s.objects) == 2 for s in scenes) > 400


def test_every_task_class_appears():
    scenes = [labels(scene_at(0, i)) for i in range(3000)]
    for task, names in TASKS.items():
        seen = {s[task] for s in scenes}
        assert seen >= set(range(len(names))), task


def test_captions_name_attributes_and_prompts_cover_every_class():
    rng = np.random.default_rng(0)
    scene = Scene((Obj("green", "heart", "small", "bottom"),), "striped", word="cat", ink="red", word_position="top")
    texts = [caption(scene, rng) for _ in range(200)]
    assert any("green" in t and "heart" in t and "at the bottom" in t and "cat" in t for t in texts)
    for task, names in TASKS.items():
        prompts = task_prompts(task)
        assert len(prompts) == len(names) and all(len(p) == len(prompts[0]) for p in prompts)


def test_render_writes_class_folders_and_labels(cli, tmp_path):
    result = cli("toy", "render", "--n", "24", "--task", "shape", str(tmp_path / "imgs"), "--json")
    assert result.code == 0, result
    summary = json.loads(result.out)
    assert summary["images"] == 24 and sum(summary["classes"].values()) == 24
    lines = [json.loads(x) for x in (tmp_path / "imgs" / "labels.jsonl").read_text().splitlines()]
    assert len(lines) == 24
    from PIL import Image

    for line in lines:
        folder = line["file"].split("/")[0]
        assert folder == TASKS["shape"][line["labels"]["shape"]]
        assert Image.open(tmp_path / "imgs" / line["file"]).size == (64, 64)


def test_render_unknown_task_is_an_error(cli, tmp_path):
    result = cli("toy", "render", "--n", "2", "--task", "smell", str(tmp_path))
    assert result.code == 2 and "unknown toy task" in result.err and "colour" in result.err


# The gate from the foundation issue, on a small fresh sample with a margin below the goals.
ACCURACY_FLOOR = {"colour": 0.95, "background": 0.90, "size": 0.80}


def test_shipped_toy_model_meets_the_accuracy_floor(toy):
    from clipterm.toyworld.evaluate import evaluate_model

    accuracy = evaluate_model(toy.model, toy.tokenizer, n=400, seed=12345)
    for task, floor in ACCURACY_FLOOR.items():
        assert accuracy[task] >= floor, (task, accuracy)


@pytest.mark.parametrize("task", list(TASKS))
def test_heldout_images_have_labels_for_each_task(task):
    from clipterm.toyworld.evaluate import heldout

    images, per_task = heldout(64)
    assert images.shape == (64, 64, 64, 3)
    assert (per_task[task] >= 0).sum() > 0


@pytest.mark.slow
def test_train_from_scratch_then_on_from_the_checkpoint(cli, tmp_path):
    import json

    from safetensors.torch import load_file

    first = cli("toy", "train", str(tmp_path / "a"), "--steps", "2", "--batch-size", "8", "--threads", "1")
    assert first.code == 0, first
    notes = json.loads((tmp_path / "a" / "training.json").read_text())
    assert notes["steps"] == 2 and [s["steps"] for s in notes["stages"]] == [2]
    second = cli("toy", "train", str(tmp_path / "b"), "--from", str(tmp_path / "a"), "--steps", "3", "--batch-size", "8",
                 "--lr", "3e-4", "--warmup", "1", "--seed", "1", "--threads", "1")
    assert second.code == 0, second
    notes = json.loads((tmp_path / "b" / "training.json").read_text())
    assert notes["steps"] == 5 and [(s["steps"], s["lr"], s["seed"]) for s in notes["stages"]] == [(2, 0.001, 0), (3, 3e-4, 1)]
    assert [h["step"] for h in notes["history"]] == [2, 5]
    before, after = load_file(tmp_path / "a" / "open_clip_model.safetensors"), load_file(tmp_path / "b" / "open_clip_model.safetensors")
    assert before.keys() == after.keys() and any(not before[k].equal(after[k]) for k in before)


@pytest.mark.parametrize("source, message", [("nowhere", "not a folder written by"), ("{out}", "is the output folder")])
def test_train_from_a_bad_checkpoint_is_refused(cli, tmp_path, source, message):
    out = tmp_path / "out"
    if source == "{out}":
        out.mkdir()
        (out / "training.json").write_text("{}")
    result = cli("toy", "train", str(out), "--from", source.format(out=out), "--steps", "1")
    assert result.code != 0 and message in result.err and "hint:" in result.err, result
