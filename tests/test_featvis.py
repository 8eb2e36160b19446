"""`clipterm visualise`: feature visualisation of heads, neurons and directions on the toy model.

Objectives are checked against the exact decomposition; pictures against the toy world's palette
(bench/truth/featvis_truth.py runs the full ground-truth check).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from clipterm.analyses import facets, featvis
from clipterm.analyses.featvis import facet_term
from clipterm.cache.build import BuildOptions, build_cache
from clipterm.cache.reader import open_cache
from clipterm.errors import ClipTermError, ExitCode
from clipterm.toyworld import palette, world

FAST = {"steps": 12, "size": 32}


@pytest.fixture(autouse=True)
def _one_thread():
    """Small models run far faster on one thread when the cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cache(toy, tmp_path_factory):
    """A 160-image labelled toy cache with its L4 neurons built."""
    from clipterm.cache.neurons import build_neurons

    root = tmp_path_factory.mktemp("featvis-caches")
    build_cache(BuildOptions(images="toy:160", name="fv", cache_dir=str(root), neurons=True, workers=0), loaded=toy)
    build_neurons(open_cache(root / "fv"), 4, device="cpu", top_k=8, loaded=toy)
    return root / "fv"


def run(loaded, target, reader=None, facet=None, **settings):
    config = featvis.Config(**{**FAST, **settings})
    frames = list(featvis.visualise(loaded, featvis.objective_for(target, loaded, reader, config.objective), config, facet))
    return frames


# --------------------------------------------------------------------------- the objectives are the decomposition's


def _recorded_score(toy, objective, pixels):
    """Score preprocessed pixels (B, 3, S, S) through featvis's hooks, with no transform."""
    climb = featvis.climb_for(toy)
    recorder = climb.recorder(objective.terms)
    try:
        with torch.no_grad():
            embeds = climb.visual(pixels)
            return featvis.score(objective, climb, recorder, embeds)
    finally:
        recorder.close()


def test_objectives_equal_the_exact_decomposition(toy, cache):
    from clipterm.analyses.spatial import model_pixels, open_image
    from clipterm.vit import second_order
    from clipterm.vit.decompose import decompose, readout

    reader = open_cache(cache)
    pixels = torch.cat([model_pixels(toy, open_image(f"toy2:0/{i}")) for i in range(3)])  # (3, 3, 64, 64)
    out = decompose(toy.model, pixels, neurons=True)
    head = featvis.objective_for("L5.H2:pc2", toy, reader)
    direct = out.head_out[:, 5, 2] @ readout(toy.model)[5, 2] @ head.terms[0].direction  # (3,)
    assert head.kind == "effect" and torch.allclose(_recorded_score(toy, head, pixels), direct, atol=1e-5)
    neuron = featvis.objective_for("L4.N12", toy, reader)
    assert neuron.kind == "activation"
    assert torch.allclose(_recorded_score(toy, neuron, pixels), out.neurons[:, 4, 12], atol=1e-5)
    effect = featvis.objective_for("L4.N12", toy, reader, "effect")
    traced = second_order.trace(toy.model, pixels, 4)
    second = second_order.effects(traced.scalars, second_order.path_vectors(toy.model, 4))[:, 12]  # (3, D)
    assert torch.allclose(_recorded_score(toy, effect, pixels), second @ effect.terms[0].direction, atol=1e-5)
    text = featvis.objective_for("text:a red shape - text:a blue shape", toy)
    cosine = torch.nn.functional.cosine_similarity(out.image_embeds, text.terms[0].direction[None], dim=-1)
    assert text.kind == "direction" and torch.allclose(_recorded_score(toy, text, pixels), cosine, atol=1e-5)


def test_the_recorder_ignores_other_threads_passes(toy):
    """A TUI worker may run the model while a visualisation climbs: its passes must not land in the recorder."""
    import threading

    from clipterm.vit.climb import Recorder

    recorder = Recorder([(toy.model.visual.transformer.resblocks[2].mlp.gelu, "gelu", 2, False)])
    pixels = torch.zeros(1, 3, 64, 64)
    try:
        with torch.no_grad():
            other = threading.Thread(target=lambda: toy.model.visual(pixels))
            other.start()
            other.join()
            assert recorder.saved == {}
            toy.model.visual(pixels)
    finally:
        recorder.close()
    assert recorder.saved[("gelu", 2)].shape == (1, 65, toy.info.mlp_width)


@pytest.mark.parametrize("target, objective, kind", [
    ("text:a red shape", "auto", "direction"),
    ("class:colour/green", "auto", "direction"),
    ("image:{image}", "auto", "direction"),
    ("text:red - text:blue", "auto", "direction"),
    ("L5.H2", "auto", "effect"),
    ("L5.H2:pc2", "direction", "direction"),
    ("L4.N12", "auto", "activation"),
    ("L4.N12", "effect", "effect"),
    ("L5.H2 - text:a blue shape", "auto", "effect"),
])
def test_every_target_kind_climbs(toy, cache, tmp_path, target, objective, kind):
    from PIL import Image

    image = tmp_path / "scene.png"
    Image.fromarray(world.render(world.scene_at(0, 1))[0]).save(image)
    frames = run(toy, target.format(image=image), open_cache(cache), objective=objective, steps=16)
    assert featvis.objective_for(target.format(image=image), toy, open_cache(cache), objective).kind == kind
    assert len(frames) == 16 and frames[-1].done and frames[-1].pixels.shape == (1, 32, 32, 3)
    assert np.mean([f.objective for f in frames[-4:]]) > np.mean([f.objective for f in frames[:4]])


def test_seeded_and_deterministic(toy):
    first, again, other = (run(toy, "text:a red shape", seed=s) for s in (3, 3, 4))
    assert [f.objective for f in first] == [f.objective for f in again]
    assert np.array_equal(first[-1].pixels, again[-1].pixels) and not np.array_equal(first[-1].pixels, other[-1].pixels)
    frames = [f.step for f in first if f.pixels is not None]
    assert frames == [1, 8, 12]  # the first step, every 8th, and the last


def test_pixel_parametrisation_and_cancel(toy):
    frames = list(featvis.visualise(toy, featvis.objective_for("text:a red shape", toy),
                                    featvis.Config(steps=50, size=16, param="pixel"), cancel=lambda: True))
    assert len(frames) == 1 and frames[0].done and frames[0].pixels.shape == (1, 16, 16, 3)


def test_objectives_a_target_cannot_have(toy, cache):
    reader = open_cache(cache)
    with pytest.raises(ClipTermError, match="not an activation"):
        featvis.objective_for("L5.H2", toy, reader, "activation")
    with pytest.raises(ClipTermError, match="is a direction"):
        featvis.objective_for("text:red", toy, None, "effect")
    with pytest.raises(ClipTermError, match="no neurons file"):
        featvis.objective_for("L3.N1", toy, reader, "effect")


# --------------------------------------------------------------------------- pictures against the world's palette


def test_palette_statistics_on_rendered_scenes():
    scene = world.Scene((world.Obj("cyan", "square", "large", "centre"),), "dark")
    assert palette.dominant_colour(world.render(scene)[0]) == "cyan"
    plain = {kind: world.render(world.Scene((), kind, noise_seed=1))[0] for kind in world.BACKGROUNDS}
    assert all(palette.background_wins(plain).values())
    same = np.stack([plain["noisy"]] * 2)
    assert palette.mean_correlation(same) == pytest.approx(1.0)


def test_colour_words_paint_their_colour(toy):
    """A small version of bench/truth/featvis_truth.py's colour check: 3 colours, fewer steps."""
    found = [palette.dominant_colour(run(toy, f"text:a {c} shape", steps=64, size=64)[-1].pixels[0])
             for c in ("red", "green", "blue")]
    assert found == ["red", "green", "blue"]


def test_diversity_term_spreads_the_images(toy):
    target = "text:a shape"
    # The weight is relative to the objective's scale: on the toy, 1.0 barely moves them in 24 steps (0.90 against
    # 0.80 for separate seeds); 4.0 spreads them (0.61).
    together = run(toy, target, images=3, diversity=4.0, steps=24)[-1].pixels
    seeds = np.concatenate([run(toy, target, seed=s, steps=24)[-1].pixels for s in range(3)])
    assert palette.mean_correlation(together) < palette.mean_correlation(seeds)


# --------------------------------------------------------------------------- facets


@pytest.mark.parametrize("objective", facets.OBJECTIVES)
def test_facet_probe_beats_chance_on_held_out_rows(toy, cache, objective):
    reader = open_cache(cache)
    facet = facets.train_facet(toy, reader, "colour/red", layer=3, objective=objective)
    assert facet.accuracy > facet.chance + 0.2 and facet.rows == int((reader.labels("colour") >= 0).sum())
    assert facet.to_json()["class"] == "red" and facet.to_json()["layer"] == "L3"
    assert facet.to_json()["objective"] == objective
    plain = run(toy, "L4.N12", reader, steps=16, size=64)[-1].pixels
    faceted = run(toy, "L4.N12", reader, facet, steps=16, size=64, facet_weight=1.0)[-1].pixels
    assert not np.array_equal(plain, faceted)
    with pytest.raises(ClipTermError, match="no labels for task 'texture'"):
        facets.train_facet(toy, reader, "texture")


def test_the_articles_facet_objective_equals_a_direct_autograd_computation(toy, cache):
    """f(g(x)) + wᵀ(g(x) ⊙ ∇f(g(x))), with g the output of block 2 cut out of the graph as a leaf, and f the
    objective computed from it by the rest of the tower: the climb's objective, value for value."""
    import torch

    reader = open_cache(cache)
    facet = facets.train_facet(toy, reader, "colour/red", layer=2, steps=50)
    goal = featvis.objective_for("L4.N12", toy, reader)
    visual = toy.model.visual
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))

    climb = featvis.climb_for(toy)
    recorder = climb.recorder(goal.terms, {2})
    try:
        with featvis.twice_differentiable(True):
            embeds = visual(pixels)
        value = featvis.score(goal, climb, recorder, embeds)  # (B,)
        ours = value + facet_term(facet, climb, recorder, value)  # (B,)
    finally:
        recorder.close()

    leaf = {}

    def cut(_module, _inputs, output):
        leaf["g"] = output.detach().requires_grad_(True)
        return leaf["g"]

    handle = visual.transformer.resblocks[2].register_forward_hook(cut)
    recorder = climb.recorder(goal.terms)
    try:
        f = featvis.score(goal, climb, recorder, visual(pixels))  # (B,): f(g(x))
    finally:
        recorder.close()
        handle.remove()
    (grad,) = torch.autograd.grad(f.sum(), leaf["g"])  # (B, T, W): ∇f(g(x)), image by image
    w = facet.weight[facet.target] / facet.std  # (W,): the probe's weights on raw activations
    direct = f + (leaf["g"] * grad).sum(1) @ w  # (B,)
    assert float((direct - ours).detach().abs().max()) < 1e-4 * float(direct.detach().abs().max())
    assert float(((leaf["g"] * grad).sum(1) @ w).detach().abs().min()) > 0  # the facet term is there, not zero


def test_the_facet_layer_must_be_below_the_unit(toy, cache):
    reader = open_cache(cache)
    facet = facets.train_facet(toy, reader, "colour", layer=4, steps=10)
    with pytest.raises(ClipTermError, match="not below the unit"):
        run(toy, "L4.N12", reader, facet, steps=1, size=16)


# --------------------------------------------------------------------------- the command


def test_cli_writes_pngs_and_a_json_record(cli, cache, tmp_path):
    from PIL import Image

    out = tmp_path / "vis"
    result = cli("visualise", "-t", "L5.H2", "--cache", str(cache), "--steps", "5", "--size", "16", "--diverse", "2",
                 "--out", str(out), "--json")
    assert result.code == 0, result
    record = json.loads(result.out)
    assert record["schema"] == "clipterm.visualise/1" and record["component"] == "L5.H2" and record["cache"] == "fv"
    assert record["objective"] == "effect" and len(record["curve"]) == 5 and record["images"] == 2
    assert [Image.open(f).size for f in record["files"]] == [(16, 16), (16, 16)]
    assert json.loads((out / "L5.H2.json").read_text())["curve"] == record["curve"]
    faceted = cli("visualise", "-t", "text:a red shape", "--cache", str(cache), "--facet", "colour", "--steps", "3",
                  "--size", "16", "--out", str(out), "--json")
    facet = json.loads(faceted.out)["facet"]
    assert facet["task"] == "colour" and facet["accuracy"] > facet["chance"]


def test_cli_show_draws_half_blocks(cli, tmp_path):
    result = cli("visualise", "-t", "text:a red shape", "--steps", "3", "--size", "16", "--out", str(tmp_path), "--show")
    assert result.code == 0, result
    assert result.out.count("▀") >= 32 * 16 and "text-a-red-shape-1.png" in result.out


@pytest.mark.parametrize("args, words", [
    (["-t", "L9.X"], "unknown target"),
    (["-t", "text:red", "--steps", "0"], "--steps must be at least 1"),
    (["-t", "text:red", "--size", "4"], "smaller than the model's 8-pixel patch"),
    (["-t", "text:red", "--cache", "{cache}", "--facet", "texture"], "no labels for task 'texture'"),
    (["-t", "text:red", "--out", "{file}"], "is a file, not a folder"),
    (["-t", "L4.N3"], "needs a cache"),
    (["-t", "L5.H2", "--cache", "{cache}", "--objective", "activation"], "not an activation"),
])
def test_bad_inputs_say_what_is_wrong_and_write_nothing(cli, cache, tmp_path, args, words):
    file = tmp_path / "taken"
    file.write_text("")
    out = tmp_path / "never"
    result = cli("visualise", "--out", str(out), *[a.format(cache=cache, file=file) for a in args])
    assert result.code == ExitCode.USAGE, result
    assert words in result.err and "hint:" in result.err
    assert not out.exists()
