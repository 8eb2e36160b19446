"""Feature visualisation on a ResNet (issue 29): channels of any stage, pool heads, texts and the article's facets.

The objectives are checked against the exact decomposition of `vit/resnet.py`, the facet term against a direct
autograd computation of f(g(x)) + wᵀ(g(x) ⊙ ∇f(g(x))) with g a stage's output. The model is the shipped toy-rn.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from clipterm.analyses import facets, featvis
from clipterm.cache.build import BuildOptions, build_cache
from clipterm.cache.reader import open_cache
from clipterm.errors import ClipTermError, ExitCode

FAST = {"steps": 12, "size": 32}


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def rn():
    from clipterm.vit.models import load_model

    return load_model("toy-rn")


@pytest.fixture(scope="module")
def rn_cache(rn, tmp_path_factory):
    """A 160-image labelled world-2 cache of toy-rn with its L3 channels file."""
    from clipterm.cache.neurons import build_neurons

    root = tmp_path_factory.mktemp("featvis-rn")
    build_cache(BuildOptions(images="toy:160", model="toy-rn", name="rnfv", cache_dir=str(root), neurons=True,
                             workers=0), loaded=rn)
    build_neurons(open_cache(root / "rnfv"), 3, device="cpu", top_k=8, loaded=rn)
    return root / "rnfv"


def run(loaded, target, reader=None, facet=None, **settings):
    config = featvis.Config(**{**FAST, **settings})
    return list(featvis.visualise(loaded, featvis.objective_for(target, loaded, reader, config.objective), config, facet))


def _scored(loaded, objective, pixels):
    climb = featvis.climb_for(loaded)
    recorder = climb.recorder(objective.terms)
    try:
        with torch.no_grad():
            return featvis.score(objective, climb, recorder, climb.visual(pixels))
    finally:
        recorder.close()


def test_resnet_objectives_equal_the_exact_decomposition(rn, rn_cache):
    from clipterm.analyses.spatial import model_pixels, open_image
    from clipterm.vit.resnet import channel_effects, decompose, readout

    reader = open_cache(rn_cache)
    pixels = torch.cat([model_pixels(rn, open_image(f"toy2:0/{i}")) for i in range(3)])  # (3, 3, 64, 64)
    out = decompose(rn.model, pixels, neurons=True)
    head = featvis.objective_for("pool.H3", rn, reader)
    direct = out.head_out[:, 0, 3] @ readout(rn.model)[0, 3] @ head.terms[0].direction  # (3,)
    assert head.kind == "effect" and torch.allclose(_scored(rn, head, pixels), direct, atol=1e-4)
    channel = featvis.objective_for("L3.N12", rn, reader)
    assert channel.kind == "activation"
    assert torch.allclose(_scored(rn, channel, pixels), out.neurons[:, 0, 12], atol=1e-5)
    effect = featvis.objective_for("L3.N12", rn, reader, "effect")
    through = channel_effects(rn.model, out.channels, torch.tensor([12]))[:, 0] @ effect.terms[0].direction  # (3,)
    assert torch.allclose(_scored(rn, effect, pixels), through, atol=1e-4)
    seen = {}
    hook = rn.model.visual.layer3.register_forward_hook(lambda _m, _i, o: seen.__setitem__("grid", o))
    try:
        with torch.no_grad():
            rn.model.visual(pixels)
    finally:
        hook.remove()
    lower = featvis.objective_for("L2.N40", rn, reader)
    assert torch.allclose(_scored(rn, lower, pixels), seen["grid"][:, 40].mean((1, 2)), atol=1e-5)


@pytest.mark.parametrize("target, objective, kind", [
    ("L3.N12", "auto", "activation"),
    ("L2.N8", "auto", "activation"),
    ("L0.N3", "activation", "activation"),
    ("L3.N12", "effect", "effect"),
    ("pool.H3", "auto", "effect"),
    ("pool.H3", "direction", "direction"),
    ("text:a red shape", "auto", "direction"),
    ("L3.N12 - text:a blue shape", "auto", "activation"),
])
def test_every_resnet_target_kind_climbs(rn, rn_cache, target, objective, kind):
    reader = open_cache(rn_cache)
    frames = run(rn, target, reader, objective=objective, steps=16)
    assert featvis.objective_for(target, rn, reader, objective).kind == kind
    assert len(frames) == 16 and frames[-1].done and frames[-1].pixels.shape == (1, 32, 32, 3)
    assert np.mean([f.objective for f in frames[-4:]]) > np.mean([f.objective for f in frames[:4]])


def test_diverse_resnet_images_climb_together(rn, rn_cache):
    frames = run(rn, "L3.N12", open_cache(rn_cache), images=2, diversity=1.0, steps=4)
    assert frames[-1].pixels.shape == (2, 32, 32, 3)


@pytest.mark.parametrize("target, objective, words", [
    ("pool.H3", "activation", "not an activation"),
    ("L2.N40", "effect", "not this ResNet's last stage"),
    ("L4.N1", "auto", "no stage 4"),
    ("L2.N300", "auto", "no channel 300 in stage L2"),
    ("L3.H1", "auto", "ViT name"),
])
def test_resnet_objectives_a_unit_cannot_have(rn, rn_cache, target, objective, words):
    with pytest.raises(ClipTermError, match=words):
        featvis.objective_for(target, rn, open_cache(rn_cache), objective)


@pytest.mark.parametrize("objective", facets.OBJECTIVES)
def test_a_resnet_facet_probes_a_stage_below_the_unit(rn, rn_cache, objective):
    reader = open_cache(rn_cache)
    facet = facets.train_facet(rn, reader, "colour/red", layer=2, objective=objective)
    assert facet.accuracy > facet.chance + 0.2 and facet.to_json()["layer"] == "L2" and not facet.class_token
    plain = run(rn, "L3.N1", reader, steps=12, size=64)[-1].pixels  # a channel alive on the start: ∇f is not 0
    faceted = run(rn, "L3.N1", reader, facet, steps=12, size=64, facet_weight=1.0)[-1].pixels
    assert not np.array_equal(plain, faceted)
    if objective == "attribution":  # logprob reads any layer: it is not the unit's attribution
        with pytest.raises(ClipTermError, match="not below the unit"):
            run(rn, "L2.N5", reader, facet, steps=1, size=32)
    with pytest.raises(ClipTermError, match="layers L0..L3 to probe"):
        facets.train_facet(rn, reader, "colour", layer=4)


def test_the_articles_facet_objective_on_a_resnet_equals_direct_autograd(rn, rn_cache):
    """f(g(x)) + wᵀ(g(x) ⊙ ∇f(g(x))), g the output of stage L2 cut out as a leaf, f the channel's effect."""
    reader = open_cache(rn_cache)
    facet = facets.train_facet(rn, reader, "word/red", layer=2, steps=50)
    goal = featvis.objective_for("L3.N1", rn, reader, "effect")  # alive on noise (L3.N12 is 0 there)
    climb = featvis.climb_for(rn)
    visual = rn.model.visual
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    recorder = climb.recorder(goal.terms, {2})
    try:
        value = featvis.score(goal, climb, recorder, visual(pixels))  # (B,)
        ours = value + featvis.facet_term(facet, climb, recorder, value)  # (B,)
    finally:
        recorder.close()
    leaf = {}

    def cut(_module, _inputs, output):
        leaf["g"] = output.detach().requires_grad_(True)
        return leaf["g"]

    handle = visual.layer3.register_forward_hook(cut)
    recorder = climb.recorder(goal.terms)
    try:
        f = featvis.score(goal, climb, recorder, visual(pixels))  # (B,)
    finally:
        recorder.close()
        handle.remove()
    (grad,) = torch.autograd.grad(f.sum(), leaf["g"])  # (B, C, h, w)
    w = facet.weight[facet.target] / facet.std  # (C,)
    attribution = (leaf["g"] * grad).sum((2, 3)) @ w  # (B,)
    direct = f + attribution
    assert float((direct - ours).detach().abs().max()) < 1e-4 * float(direct.detach().abs().max())
    assert float(attribution.detach().abs().min()) > 0


def test_cli_visualises_a_resnet_channel_with_a_facet(cli, rn_cache, tmp_path):
    out = tmp_path / "vis"
    result = cli("visualise", "-t", "L3.N12", "--cache", str(rn_cache), "--steps", "3", "--size", "32",
                 "--facet", "word", "--out", str(out), "--json")
    assert result.code == 0, result
    record = json.loads(result.out)
    assert record["objective"] == "activation" and record["facet"]["layer"] == "L2" and record["model"] == "toy-rn"
    assert record["facet"]["accuracy"] > record["facet"]["chance"] and len(record["files"]) == 1
    bad = cli("visualise", "-t", "L3.N12", "--cache", str(rn_cache), "--facet", "texture", "--out", str(tmp_path / "n"))
    assert bad.code == ExitCode.USAGE and "no labels for task 'texture'" in bad.err and not (tmp_path / "n").exists()
