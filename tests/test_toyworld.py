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


# The shipped toy's gate (issue 16): its goals (colour, background >= 0.97; size >= 0.95; shape, position >= 0.85;
# word >= 0.70 at n=2000) a margin below, on 400 fresh scenes of its world. toy-v1 keeps the foundation issue's gate.
TOY_FLOOR = {"colour": 0.95, "background": 0.95, "size": 0.92, "shape": 0.80, "position": 0.80, "word": 0.65}
TOY_V1_FLOOR = {"colour": 0.95, "background": 0.90, "size": 0.80}


@pytest.mark.parametrize(("spec", "floor"), [("toy", TOY_FLOOR), ("toy-v1", TOY_V1_FLOOR)])
def test_the_shipped_toys_meet_their_accuracy_floors_within_20_mb(spec, floor):
    from clipterm.locations import TOY_MODEL_DIRS
    from clipterm.toyworld.evaluate import evaluate_model, model_world
    from clipterm.vit.models import load_model

    assert model_world(spec) == (2 if spec == "toy" else 1)
    if spec == "toy":
        assert (TOY_MODEL_DIRS[spec] / "open_clip_model.safetensors").stat().st_size <= 20 * 2**20
    loaded = load_model(spec)
    accuracy = evaluate_model(loaded.model, loaded.tokenizer, n=400, seed=12345, world=model_world(spec))
    for task, least in floor.items():
        assert accuracy[task] >= least, (task, accuracy)


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


# World 2: the versioned world the next toy trains on. World 1 stays what the shipped toy saw.


def test_world_one_is_frozen_bit_for_bit():
    import hashlib

    digest = hashlib.sha256()
    for i in range(200):
        digest.update(render(scene_at(0, i))[0].tobytes())
    assert digest.hexdigest()[:16] == "ca06e8f1aecd3cad"


def test_world_two_is_deterministic_and_differs_from_world_one():
    first = [render(scene_at(3, i, world=2))[0] for i in range(20)]
    again = [render(scene_at(3, i, world=2))[0] for i in reversed(range(20))][::-1]
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert scene_at(3, 0, world=2).world == 2 and scene_at(3, 0).world == 1
    assert not all(np.array_equal(a, render(scene_at(3, i))[0]) for i, a in enumerate(first))


def test_unknown_world_is_refused():
    with pytest.raises(ValueError, match="unknown toy world"):
        scene_at(0, 0, world=3)


def test_world_two_words_sit_in_their_own_band_under_exact_object_masks():
    from clipterm.toyworld.world import tall_word_stencil

    worded = 0
    for i in range(200):
        scene = scene_at(0, i, world=2)
        image, masks = render(scene)
        assert image.shape == (64, 64, 3) and len(masks) == len(scene.objects)
        for k, (obj, mask) in enumerate(zip(scene.objects, masks)):
            visible = mask & ~np.any(masks[k + 1 :], axis=0) if k + 1 < len(masks) else mask
            assert mask.sum() > 10 and np.all(image[visible] == np.array(COLOURS[obj.colour], dtype=np.uint8))
        if scene.word is not None:
            worded += 1
            assert scene.word_position in ("top", "bottom")
            assert scene.word_position not in {o.position for o in scene.objects}
            assert tall_word_stencil(scene.word).shape[0] >= 10  # two patch rows of 8 px, not one
            band = image[:22] if scene.word_position == "top" else image[42:]
            assert np.all(band == np.array(COLOURS[scene.ink], dtype=np.uint8), axis=-1).sum() > 20
    assert 60 < worded < 140


def test_world_two_has_typographic_attacks_with_ink_on_the_object():
    scenes = [scene_at(0, i, world=2) for i in range(2000)]
    attacks = [s for s in scenes if s.word in COLOURS and s.ink != s.word and s.ink == s.objects[0].colour]
    assert len(attacks) > 50
    # the ink says nothing about the word: it matches it about as often as chance (1/8)
    colour_words = [s for s in scenes if s.word in COLOURS]
    assert sum(s.ink == s.word for s in colour_words) / len(colour_words) < 0.25


def test_world_two_keeps_the_tasks_and_every_class_appears():
    scenes = [labels(scene_at(0, i, world=2)) for i in range(3000)]
    for task, names in TASKS.items():
        assert {s[task] for s in scenes} >= set(range(len(names))), task


def test_world_two_groups_vary_one_attribute_and_their_captions_name_it():
    from clipterm.toyworld.batches import alternatives, with_attribute
    from clipterm.toyworld.captions import POSITION_PHRASES, focused_caption
    from clipterm.toyworld.world import sample_scene_v2

    rng = np.random.default_rng(0)
    base = sample_scene_v2(rng, p_word=1.0)
    for attr in ("shape", "position", "word", "ink", "colour", "size", "background"):
        for value in alternatives(base, attr):
            other = with_attribute(base, attr, value)
            assert other != base and other.word_position == base.word_position
            texts = [focused_caption(other, rng, attr, dropout=0.9, p_single=0.2, p_ink=0.0) for _ in range(20)]
            phrase = POSITION_PHRASES[value] if attr == "position" else f" in {value}" if attr == "ink" else value
            assert all(phrase in t for t in texts), (attr, value, texts)
    assert all(p not in {o.position for o in base.objects} | {base.word_position} for p in alternatives(base, "position"))


def test_world_two_batches_are_sized_and_reproducible():
    from clipterm.toyworld.batches import make_focused_batch
    from clipterm.toyworld.recipe import RECIPES

    images, captions = make_focused_batch(np.random.default_rng(1), 30, RECIPES[2], step=0)
    again, same = make_focused_batch(np.random.default_rng(1), 30, RECIPES[2], step=0)
    assert images.shape == (30, 64, 64, 3) and len(captions) == 30
    assert np.array_equal(images, again) and captions == same
    assert " and a " not in " ".join(captions)  # the warm-up steps show one object per scene


def test_contrastive_loss_treats_repeated_captions_as_positives():
    import torch

    from clipterm.toyworld.train import contrastive_loss

    logits = torch.randn(6, 6)
    distinct = [f"caption {k}" for k in range(6)]
    assert torch.allclose(contrastive_loss(logits, distinct), contrastive_loss(logits))
    # images 0 and 1 share a caption and match both of its copies equally: that is the optimum, no gradient
    logits = (torch.eye(6) * 10).requires_grad_()
    with torch.no_grad():
        logits[:2, :2] = 10
    shared = ["a star", "a star", *distinct[2:]]
    contrastive_loss(logits, shared).backward()
    assert logits.grad.abs().max() < 1e-3
    logits.grad = None
    contrastive_loss(logits).backward()  # as each other's negatives, they would be pushed apart
    assert logits.grad.abs().max() > 0.05


def test_recipe_is_shared_by_training_and_evaluation():
    from clipterm.toyworld import evaluate, recipe, train

    assert train.to_tensor is recipe.to_tensor is evaluate.to_tensor
    assert train.MODEL_CFG is recipe.MODEL_CFG
    assert not hasattr(evaluate, "MODEL_CFG") and not hasattr(evaluate, "train")


def test_render_world_two_and_an_unknown_world(cli, tmp_path):
    result = cli("toy", "render", "--n", "8", "--world", "2", str(tmp_path / "imgs"), "--json")
    assert result.code == 0, result
    assert json.loads(result.out)["world"] == 2
    line = json.loads((tmp_path / "imgs" / "labels.jsonl").read_text().splitlines()[0])
    assert line["world"] == 2
    bad = cli("toy", "render", "--n", "2", "--world", "7", str(tmp_path / "bad"))
    assert bad.code == 2 and "unknown toy world 7" in bad.err and "hint:" in bad.err


@pytest.mark.slow
def test_train_on_world_two_is_recorded_and_eval_uses_it(cli, tmp_path):
    out = tmp_path / "w2"
    result = cli("toy", "train", str(out), "--world", "2", "--steps", "2", "--batch-size", "8", "--threads", "1")
    assert result.code == 0, result
    notes = json.loads((out / "training.json").read_text())
    assert notes["world"] == 2 and notes["stages"][0]["world"] == 2 and notes["batch_size"] == 8
    on = cli("toy", "train", str(tmp_path / "on"), "--from", str(out), "--steps", "1", "--batch-size", "8", "--threads", "1")
    assert on.code == 0, on
    assert json.loads((tmp_path / "on" / "training.json").read_text())["world"] == 2  # --from keeps the world
    scored = cli("toy", "eval", "--model", str(out), "--n", "16", "--json")
    assert scored.code == 0, scored
    assert json.loads(scored.out)["world"] == 2
    shipped = cli("toy", "eval", "--n", "16", "--json")
    assert json.loads(shipped.out)["world"] == 2


def test_sincos_positions_tell_every_patch_apart():
    import torch

    from clipterm.toyworld.train import sincos_positions

    table = sincos_positions(8, 128)  # (64, 128)
    assert table.shape == (64, 128)
    distances = torch.cdist(table, table) + torch.eye(64) * 1e3
    assert distances.min() > 0.5  # neighbouring patches differ clearly, at about unit scale


def test_prompt_loss_scores_each_task_against_its_class_prompts_and_skips_undefined_labels():
    import torch

    from clipterm.toyworld.train import prompt_loss
    from clipterm.toyworld.world import TASKS

    classes = {t: torch.nn.functional.normalize(torch.randn(len(c), 16), dim=-1) for t, c in TASKS.items()}
    shape, colour = list(TASKS).index("shape"), list(TASKS).index("colour")
    truth = torch.full((2, len(TASKS)), -1)
    truth[0, colour], truth[1, shape] = 0, 3  # image 0 is scored on colour only, image 1 on shape only
    right = torch.stack([classes["colour"][0], classes["shape"][3]])
    wrong = torch.stack([classes["colour"][1], classes["shape"][4]])
    scale = torch.tensor(50.0)
    assert prompt_loss(wrong, scale, classes, truth) > prompt_loss(right, scale, classes, truth)
    assert prompt_loss(right, scale, classes, truth) < 0.1  # nothing but the right prompt is near


def test_probes_reach_the_image_tower_where_collapsed_class_prompts_cannot():
    """The saddle the probe loss breaks: when every class prompt of a task embeds at one point, the prompt loss sends
    the image embeddings no gradient at all; the linear probes do, and they skip undefined labels."""
    import torch

    from clipterm.toyworld.train import probe_loss, prompt_loss
    from clipterm.toyworld.world import TASKS

    torch.manual_seed(0)
    collapsed = {t: torch.nn.functional.normalize(torch.ones(len(c), 16), dim=-1) for t, c in TASKS.items()}
    probes = torch.nn.ModuleDict({t: torch.nn.Linear(16, len(c)) for t, c in TASKS.items()})
    truth = torch.full((4, len(TASKS)), -1)
    truth[:, list(TASKS).index("shape")] = torch.tensor([0, 1, 2, 3])
    img_f = torch.nn.functional.normalize(torch.randn(4, 16), dim=-1).requires_grad_()
    prompt_loss(img_f, torch.tensor(50.0), collapsed, truth).backward()
    assert img_f.grad.abs().max() < 1e-6
    img_f.grad = None
    probe_loss(img_f, probes, truth).backward()
    assert img_f.grad.abs().max() > 1e-3
    assert probes["colour"].weight.grad is None and probes["shape"].weight.grad.abs().max() > 0  # colour is all -1


def test_world_two_batches_depend_only_on_seed_and_step_whatever_the_workers():
    from clipterm.toyworld.batches import batch_stream, world_batch
    from clipterm.toyworld.recipe import RECIPES

    inline = list(batch_stream(5, first=3, steps=4, batch_size=8, recipe=RECIPES[2], workers=0))
    pooled = list(batch_stream(5, first=3, steps=4, batch_size=8, recipe=RECIPES[2], workers=2))
    assert len(inline) == len(pooled) == 4
    for (img, cap, truth), (img2, cap2, truth2) in zip(inline, pooled):
        assert np.array_equal(img, np.asarray(img2)) and cap == list(cap2) and np.array_equal(truth, np.asarray(truth2))
    img, cap, truth = world_batch(5, 4, 8, RECIPES[2])
    assert np.array_equal(img, inline[1][0]) and not np.array_equal(img, inline[0][0])
    assert truth.shape == (8, 6) and (truth >= -1).all()
