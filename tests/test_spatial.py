"""`clipterm spatial`: per-patch maps and NMF factors, checked against the toy world's known object masks.

The helpers at the top are the ground-truth evaluation that bench/truth/spatial.py runs at full size.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipterm.analyses import spatial
from clipterm.analyses.classfactors import class_set, factorise_classes
from clipterm.analyses.factorise import factorise
from clipterm.analyses.factorsweep import separation
from clipterm.cache.build import BuildOptions, build_cache
from clipterm.cache.reader import open_cache
from clipterm.errors import ClipTermError, ExitCode
from clipterm.inputs.images import toy_id
from clipterm.toyworld import world
from clipterm.toyworld.evaluate import HELDOUT_SEED, model_world

TOY_WORLD = model_world("toy")  # the world the shipped toy was trained on: what `toy:N` draws for it

EVAL_SEED = HELDOUT_SEED + 1  # scenes no choice of method or layer was tuned on
SIZE = world.IMAGE_SIZE


# --------------------------------------------------------------------------- ground truth on the toy world


def scenes_with(n: int, objects: int, seed: int = EVAL_SEED, version: int = TOY_WORLD) -> list[tuple[str, world.Scene]]:
    """The first n scenes of a seed with this many objects and no rendered word, as (toy id, scene)."""
    found, index = [], 0
    while len(found) < n:
        scene = world.scene_at(seed, index, version)
        if len(scene.objects) == objects and scene.word is None:
            found.append((toy_id(seed, index, version), scene))
        index += 1
    return found


def iou(predicted: torch.Tensor, mask: np.ndarray) -> float:
    truth = torch.from_numpy(mask)
    return float((predicted & truth).sum() / (predicted | truth).sum().clamp(min=1))


def phrase(obj: world.Obj) -> str:
    return f"a {obj.colour} {obj.shape}"


def query_ious(loaded, scenes, contrast) -> list[float]:
    """Each image's own object phrase, its map thresholded at its mean, against the object's mask."""
    out = []
    for ref, scene in scenes:
        heat = spatial.query_map(ref, phrase(scene.objects[0]), loaded=loaded, contrast=contrast)
        out.append(iou(heat.segment(SIZE), world.render(scene)[1][0]))
    return out


def baseline_map(loaded, ref: str, text: str) -> torch.Tensor:
    """The baseline: cosine between the last layer's patch tokens, through ln_post and proj, and the text. (g, g)"""
    from clipterm.vit.textencode import encode_texts

    visual = loaded.model.visual
    pixels = spatial.model_pixels(loaded, spatial.open_image(ref))  # (1, 3, S, S)
    with torch.no_grad():
        tokens = visual.transformer(visual._embeds(pixels))[0, 1:]  # (P, W)
        patches = F.normalize(visual.ln_post(tokens) @ visual.proj, dim=-1)  # (P, D)
    scores = patches @ encode_texts(loaded.model, loaded.tokenizer, [text], normalize=True)[0]  # (P,)
    side = int(len(scores) ** 0.5)
    return scores.reshape(side, side)


def baseline_ious(loaded, scenes) -> list[float]:
    out = []
    for ref, scene in scenes:
        grid = baseline_map(loaded, ref, phrase(scene.objects[0]))
        heat = spatial.SpatialMap(grid, "baseline", "cosine", [], "forward").segment(SIZE)
        out.append(iou(heat, world.render(scene)[1][0]))
    return out


def nmf_ious(loaded, scenes, layers: list[int], k: int = 3, center: str = "none", rule: str = "argmax") -> list[float]:
    """Per image: the best assignment of two of the k factors to the two masks; `rule` argmax: each pixel to its
    strongest factor; half: to its strongest where that factor is at least half its maximum (Factorisation.segments)."""
    out = []
    for ref, scene in scenes:
        factors = factorise(ref, k, loaded=loaded, layers=layers, pool=None, center=center)
        masks = [torch.from_numpy(m) for m in world.render(scene)[1]]
        out.append(separation(factors, masks, rule))
    return out


def class_nmf_scores(loaded, scenes, layer: int, k: int = 2, classes=None) -> tuple[list[float], list[bool]]:
    """Per image, NMF of the class attributions through the heads of `layer` on: the best-assignment IoU (half
    rule) and, per assigned factor, whether its top 2 classes hold its object's colour or shape."""
    classes = classes if classes is not None else class_set(loaded)
    ious, hits = [], []
    for ref, scene in scenes:
        factors = factorise_classes(ref, k, loaded=loaded, layer=layer, classes=classes)
        masks = world.render(scene)[1]
        parts = factors.segments(SIZE)
        scores = [[iou(p, m) for m in masks] for p in parts]
        chosen = max(itertools.permutations(range(k), 2), key=lambda ab: scores[ab[0]][0] + scores[ab[1]][1])
        ious.append((scores[chosen[0]][0] + scores[chosen[1]][1]) / 2)
        for f, obj in zip(chosen, scene.objects):
            top = {name for name, _ in factors.factors[f].texts[:2]}
            hits.append(bool(top & {f"colour/{obj.colour}", f"shape/{obj.shape}"}))
    return ious, hits


NMF_LAYERS = [0, 1]  # early MLPs see colour and shape where they are; picked on the HELDOUT_SEED scenes


def test_ground_truth_goals(toy):
    """Small-sample version of bench/truth/spatial.py: the query map beats the baseline."""
    contrast, _ = spatial.pool_embeddings(toy, "toy")
    singles = scenes_with(40, 1)
    ours, baseline = np.mean(query_ious(toy, singles, contrast)), np.mean(baseline_ious(toy, singles))
    assert ours > baseline + 0.15, (ours, baseline)


def test_nmf_separates_two_objects_on_toy_v1():
    """Small-sample version of bench/truth/spatial.py's NMF goal, on toy-v1 and world 1, where it was set and holds.
    On the shipped toy it does not (0.11 to 0.24 at any layer, k=3 or 4): patch position explains 53-69% of its
    MLP activations' variance over two-object scenes (5-7% on toy-v1), so NMF's factors split the image by place."""
    from clipterm.vit.models import load_model

    separated = np.mean(nmf_ious(load_model("toy-v1"), scenes_with(40, 2, version=1), NMF_LAYERS))
    assert separated >= 0.5, separated


# --------------------------------------------------------------------------- cache and forward pass agree


@pytest.fixture(scope="module")
def cache(toy, tmp_path_factory):
    """A 6-image fp32 toy cache with per-token head outputs of L2-5."""
    root = tmp_path_factory.mktemp("spatial-caches")
    build_cache(BuildOptions(images="toy:6", name="tok", cache_dir=str(root), tokens="L2-5", dtype="float32", workers=0),
                loaded=toy)
    return root / "tok"


def test_maps_from_the_cache_equal_a_forward_pass(toy, cache):
    reader = open_cache(cache)
    stored = spatial.query_map("row:3", "a red star", loaded=toy, reader=reader, contrast="toy")
    fresh = spatial.query_map("toy2:0/3", "a red star", loaded=toy, contrast="toy")
    assert (stored.source, fresh.source, stored.layers) == ("cache", "forward", [2, 3, 4, 5])
    assert stored.grid.shape == (8, 8) and torch.allclose(stored.grid, fresh.grid, atol=1e-5)
    head_cached = spatial.component_map("row:3", "L4.H1", reader=reader)  # no model at all
    head_fresh = spatial.component_map("toy2:0/3", "L4.H1", loaded=toy)
    assert torch.allclose(head_cached.grid, head_fresh.grid, atol=1e-5)
    # A layer the cache did not store is recomputed when a model is at hand.
    assert spatial.component_map("row:3", "L1.H0", reader=reader, loaded=toy).source == "forward"


def test_a_heads_patches_add_up_to_its_direct_effect(toy, cache):
    """The per-token split is exact: patches plus the class token give the head's whole effect (over |image|)."""
    reader = open_cache(cache)
    heat = spatial.component_map("row:2", "L5.H3", reader=reader)
    effect = reader.effects("L5.H3", rows=[2])[0]  # (D,)
    assert float(heat.grid.sum()) + heat.cls == pytest.approx(float(effect.norm() / reader.image_embeds([2])[0].norm()), rel=1e-4)
    pc = spatial.component_map("row:2", "L5.H3:pc1", reader=reader)
    assert pc.grid.shape == (8, 8) and "principal" in pc.measure


def test_neuron_and_mlp_maps_come_from_activations(toy):
    acts, outs = spatial.mlp_activations(toy.model, spatial.model_pixels(toy, spatial.open_image("toy2:0/1")), [3], outputs=True)
    neuron = spatial.component_map("toy2:0/1", "L3.N17", loaded=toy)
    assert torch.allclose(neuron.grid.flatten(), acts[3][0, 1:, 17]) and neuron.measure == "post-activation"
    assert torch.allclose(spatial.component_map("toy2:0/1", "L3.MLP", loaded=toy).grid.flatten(), outs[3][0, 1:].norm(dim=-1))


def test_factorisations(toy):
    nmf = factorise("toy2:0/4", 3, loaded=toy, layers=[0, 1], pool="toy")
    assert len(nmf.factors) == 3 and [f.share for f in nmf.factors] == sorted((f.share for f in nmf.factors), reverse=True)
    assert all(len(f.texts) == 5 and f.grid.shape == (8, 8) and float(f.grid.min()) >= 0 for f in nmf.factors)
    strengths = nmf.strengths(SIZE)
    assert strengths.shape == (3, SIZE, SIZE) and float(strengths.max()) == pytest.approx(1) and float(strengths.min()) >= 0
    assert set(nmf.assignment(SIZE).unique().tolist()) <= {0, 1, 2} and 0 < nmf.error < 1
    pca = factorise("toy2:0/4", 2, loaded=toy, method="pca", pool=None)
    assert pca.method == "pca" and 0 < sum(f.share for f in pca.factors) <= 1 and pca.factors[0].texts == []
    assert all(float(f.grid.max()) >= -float(f.grid.min()) for f in pca.factors)  # signs make each map peak positive


# --------------------------------------------------------------------------- the command


def test_cli_json_and_show(cli, cache):
    result = cli("spatial", "toy2:0/3", "--query", "a red star", "--json")
    assert result.code == 0, result
    payload = json.loads(result.out)
    assert payload["schema"] == "clipterm.spatial/1" and payload["mode"] == "query" and payload["source"] == "forward"
    assert len(payload["grid"]) == 8 and len(payload["grid"][0]) == 8 and payload["layers"] == "L2-5"
    result = cli("spatial", "row:3", "--cache", str(cache), "--component", "L4.H1", "--json")  # cache only, no model
    assert result.code == 0 and json.loads(result.out)["source"] == "cache" and json.loads(result.out)["model"] is None
    result = cli("spatial", "toy2:0/4", "--nmf", "3", "--layers", "L0-1", "--json")
    factors = json.loads(result.out)["factors"]
    assert len(factors) == 3 and factors[0]["texts"] and len(factors[0]["grid"]) == 8
    shown = cli("spatial", "toy2:0/4", "--nmf", "2", "--show", "--size", "16")
    assert shown.code == 0 and "▀" in shown.out and "factor 2" in shown.out
    shown = cli("spatial", "toy2:0/4", "--query", "class:colour/red", "--show", "--size", "16")
    assert shown.code == 0 and shown.out.count("▀") >= 2 * 16 * 8


@pytest.mark.parametrize("args, code, words", [
    (["spatial", "{bad}", "--query", "red"], ExitCode.INVALID_DATA, "cannot read image"),
    (["spatial", "nowhere.png", "--query", "red"], ExitCode.NOT_FOUND, "no image file"),
    (["spatial", "toy2:0/1", "--query", "   "], ExitCode.USAGE, "tokenises to nothing"),
    (["spatial", "toy2:0/1", "--nmf", "0"], ExitCode.USAGE, "at least 1 factor"),
    (["spatial", "row:2", "--cache", "{cache}", "--component", "L1.H0"], ExitCode.USAGE, "no model to recompute"),
    (["spatial", "row:2", "--cache", "{cache}", "--query", "red"], ExitCode.USAGE, "needs the model"),
    (["spatial", "row:2", "--cache", "{cache}", "--nmf", "2"], ExitCode.USAGE, "forward pass"),
    (["spatial", "row:99", "--cache", "{cache}", "--component", "L4.H1"], ExitCode.USAGE, "no row 99"),
    (["spatial", "row:1", "--query", "red"], ExitCode.USAGE, "no cache was given"),
    (["spatial", "toy2:0/1"], ExitCode.USAGE, "give one of"),
    (["spatial", "toy2:0/1", "--component", "embed"], ExitCode.USAGE, "no position"),
])
def test_bad_inputs_say_what_is_wrong(cli, cache, tmp_path, args, code, words):
    bad = tmp_path / "broken.png"
    bad.write_text("not an image")
    result = cli(*[a.format(bad=bad, cache=cache) for a in args])
    assert result.code == code, result
    assert words in result.err and "hint:" in result.err
    if "{cache}" in args and "row:99" not in args:
        assert "--model toy" in result.err  # the hint names the cache's own model


def test_no_model_no_tokens_in_the_api(cache):
    with pytest.raises(ClipTermError, match="no model to recompute"):
        spatial.component_map("row:0", "L0.H2", reader=open_cache(cache))
