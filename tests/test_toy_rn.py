"""toy-rn's ground truth (issues 18 and 29): its pool heads and its last stage's channels, against what the world knows.

toy-rn is the small ModifiedResNet trained on world 2 (recipe 2); toy-rn-v1, the first one, was trained on world 1
and keeps only its accuracy gate here (its figures are in bench/results/toy_rn_truth-toy-rn-v1.json).

The measures live here, shared with bench/truth/toy_rn_truth.py, which prints them in full. The tests are slow (a
1000-image cache and its channels file) and run only where the trained toy-rn is shipped.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from clipterm.locations import TOY_RN_MODEL_DIR
from clipterm.toyworld.world import COLOURS

COLOUR_WORD = re.compile(r"\b(" + "|".join(COLOURS) + r")\b")


def _toy_rn_is_trained() -> bool:
    notes = TOY_RN_MODEL_DIR / "training.json"
    return notes.is_file() and json.loads(notes.read_text()).get("steps", 0) >= 100


def rn_truth_cache(loaded, root, n_images: int = 1000):
    """A cache of n_images toy scenes with each image's channel means, and its L3 channels file."""
    from clipterm.cache.build import BuildOptions, build_cache
    from clipterm.cache.neurons import NeuronFile, build_neurons, neurons_file
    from clipterm.cache.reader import open_cache

    if not (Path(root) / "truth" / "manifest.json").is_file():
        build_cache(BuildOptions(images=f"toy:{n_images}", name="truth", cache_dir=str(root), neurons=True), loaded=loaded)
    reader = open_cache(Path(root) / "truth")
    if not neurons_file(reader.path, 3).is_file():
        build_neurons(reader, 3, device="cpu", loaded=loaded)
    return reader, NeuronFile(reader, 3)


def colour_heads(loaded, reader, root, n_texts: int = 3, draws: int = 200) -> dict:
    """The 3 pool heads whose mean-ablation hurts colour accuracy most, and how many of their top-3 TextSpan
    texts (pool `toy`) name a colour, against the same count for 3 heads drawn at random (its expectation)."""
    from clipterm.analyses import ablation, textspan
    from clipterm.inputs.texts import embed_pool, load_pool
    from clipterm.vit.textencode import encode_texts

    heads = [str(h) for h in reader.tower.heads()]
    scorings = ablation.scorings(reader, lambda texts: encode_texts(loaded.model, loaded.tokenizer, texts), task="colour")
    drops = {row.component: row.drop for row in ablation.ablate(scorings, ablation.shifts(reader, heads), draws)["colour"]}
    pool = load_pool("toy")
    spans = textspan.describe(reader, heads, embed_pool(loaded, pool, cache_dir=str(root)), n_texts=n_texts,
                              baseline_draws=0)
    texts = {head: [pool.texts[i] for i in spans[head].indices[:n_texts]] for head in heads}
    hits = {head: sum(bool(COLOUR_WORD.search(text)) for text in texts[head]) for head in heads}
    top = sorted(heads, key=lambda head: -drops[head])[:3]
    return {"top_heads": [{"component": h, "colour_drop": round(drops[h], 4), "texts": texts[h]} for h in top],
            "top_colour_texts": sum(hits[h] for h in top), "random_colour_texts": 3 * sum(hits.values()) / len(heads),
            "heads": {h: {"colour_drop": round(drops[h], 4), "colour_texts": hits[h]} for h in heads}}


def multimodal_hit(chosen: list, least: int) -> dict | None:
    """The colour X of which these scenes hold >= `least` objects (with no word X) and >= `least` words X in
    another ink, with both counts; None if no colour does."""
    for colour in COLOURS:
        objects = sum(any(o.colour == colour for o in s.objects) and s.word != colour for s in chosen)
        words = sum(s.word == colour and s.ink != colour for s in chosen)
        if objects >= least and words >= least:
            return {"colour": colour, "objects": objects, "words": words}
    return None


def random_hit_rate(scenes: list, top: int, least: int, draws: int = 500) -> float:
    """How often `top` scenes drawn at random (seeded) are a multimodal hit: the criterion's chance level."""
    generator = torch.Generator().manual_seed(0)
    drawn = [torch.randperm(len(scenes), generator=generator)[:top].tolist() for _ in range(draws)]
    return sum(multimodal_hit([scenes[i] for i in rows], least) is not None for rows in drawn) / draws


def multimodal_channels(reader, top: int = 20, least: int = 2) -> dict:
    """Channels multimodal in the article's sense: among the `top` images of highest mean activation, at least
    `least` show objects of colour X and at least `least` show the written word X in another ink."""
    from clipterm.inputs.images import toy_scene_of

    items = [reader.images()[int(i)] for i in reader.index()]
    scenes = [toy_scene_of(item["id"]) for item in items]
    activations = reader.neurons("L3").float()  # (N, C)
    found = []
    for channel in range(activations.shape[1]):
        hit = multimodal_hit([scenes[i] for i in activations[:, channel].topk(top).indices.tolist()], least)
        if hit is not None:
            found.append({"channel": channel, **hit})
    return {"channels": activations.shape[1], "multimodal": len(found), "random_rate": random_hit_rate(scenes, top, least),
            "examples": found[:10]}


@pytest.mark.parametrize(("spec", "world"), [("toy-rn", 2), ("toy-rn-v1", 1)])
def test_shipped_toy_rns_meet_their_accuracy_floors_and_10_mb(spec, world):
    from clipterm.locations import TOY_MODEL_DIRS
    from clipterm.toyworld.evaluate import evaluate_model, model_world
    from clipterm.vit.models import load_model
    from test_toyworld import TOY_FLOOR, TOY_V1_FLOOR  # toy-rn has the toy's world and recipe, toy-rn-v1 toy-v1's

    assert model_world(spec) == world
    assert (TOY_MODEL_DIRS[spec] / "open_clip_model.safetensors").stat().st_size <= 10 * 2**20
    loaded = load_model(spec)
    assert loaded.info.tower == "resnet" and loaded.text_tokens is not None
    accuracy = evaluate_model(loaded.model, loaded.tokenizer, n=400, seed=12345, world=world)
    for task, floor in (TOY_FLOOR if world == 2 else TOY_V1_FLOOR).items():
        assert accuracy[task] >= floor, (task, accuracy)


@pytest.fixture(scope="module")
def toy_rn(tmp_path_factory):
    from clipterm.vit.models import load_model

    root = tmp_path_factory.mktemp("toy-rn-truth")
    loaded = load_model("toy-rn")
    return loaded, root, *rn_truth_cache(loaded, root)


@pytest.mark.slow
@pytest.mark.skipif(not _toy_rn_is_trained(), reason="needs the trained toy-rn model")
def test_the_heads_that_carry_colour_are_described_by_colour_words(toy_rn):
    loaded, root, reader, _ = toy_rn
    result = colour_heads(loaded, reader, root)
    print(result["top_heads"], result["top_colour_texts"], result["random_colour_texts"])
    assert result["top_colour_texts"] > result["random_colour_texts"]


@pytest.mark.slow
@pytest.mark.skipif(not _toy_rn_is_trained(), reason="needs the trained toy-rn model")
def test_channels_whose_top_images_share_a_value_are_named_by_it(toy_rn):
    from test_neurons import ground_truth_rates

    loaded, root, _, _ = toy_rn
    rates = ground_truth_rates(loaded, root, layer=3)
    print({k: v for k, v in rates.items() if k != "attribute_neurons"}, rates["attribute_neurons"])
    assert len(rates["attribute_neurons"]) >= 3
    if rates["rate"] < 0.5 or rates["rate"] < 2 * rates["random_rate"]:
        pytest.xfail(f"issue 18's goal (>= 50% and >= 2x random) is not met: {rates['rate']:.0%} vs "
                     f"{rates['random_rate']:.0%} (bench/truth/toy_rn_truth.py prints the channels)")


def test_multimodal_channels_are_counted_from_the_scenes(tmp_path):
    """The count on a tiny random ResNet cache: it runs end to end, and a channel counts only when both kinds show."""
    from clipterm.cache.build import BuildOptions, build_cache
    from clipterm.cache.reader import open_cache
    from clipterm.vit.models import load_model
    from tests.test_resnet import save_tiny_resnet

    loaded = load_model(f"local-dir:{save_tiny_resnet(tmp_path / 'tiny-rn')}")
    build_cache(BuildOptions(images="toy:40", model=loaded.info.spec, name="rn", cache_dir=str(tmp_path),
                             neurons=True, device="cpu"), loaded=loaded)
    reader = open_cache(tmp_path / "rn")
    counted = multimodal_channels(reader, top=20, least=2)
    assert counted["channels"] == 512 and 0 <= counted["multimodal"] <= 512
    assert all(row["objects"] >= 2 and row["words"] >= 2 for row in counted["examples"])
    assert multimodal_channels(reader, top=20, least=21)["multimodal"] == 0  # more than the top images hold
