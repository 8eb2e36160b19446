"""Building Blocks' factorisations: NMF of class attributions, position-centred activations, the two-colour
picture and the layer sweep (`clipterm spatial --nmf K --of classes`, `--center position`, `--layers all`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tower_helpers import save_model_folder, tiny_vit_config

from clipterm.analyses import classfactors, factorise, factorsweep, spatial
from clipterm.errors import ClipTermError, ExitCode
from clipterm.thumbnails import TWO_FACTOR_RGB, factor_overlay

from test_spatial import scenes_with  # noqa: E402  (the held-out two-object scenes)

PAIR = scenes_with(1, 2)[0][0]  # a held-out toy scene with two objects


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 2-layer random open_clip ViT with a 2x2 patch grid, loaded as a local-dir model (no classes of its own)."""
    from clipterm.vit.models import load_model

    folder = save_model_folder(tmp_path_factory.mktemp("tiny") / "vit", tiny_vit_config())
    return load_model(f"local-dir:{folder}"), folder


def hand_attributions(loaded, pixels, directions, layer):
    """(T, C) by hand from the weights: every head of layers >= `layer`, its class-token attention times each
    token's value through its slice of out_proj, then ln_post linearised at the image's own σ, proj, the classes."""
    visual = loaded.model.visual
    width = visual.transformer.width
    with torch.no_grad():
        stream = visual._embeds(pixels)  # (1, T, W)
        parts = torch.zeros(stream.shape[1], width)  # (T, W)
        for index, block in enumerate(visual.transformer.resblocks):
            attn = block.attn
            heads, dh = attn.num_heads, width // attn.num_heads
            qkv = block.ln_1(stream)[0] @ attn.in_proj_weight.T + attn.in_proj_bias  # (T, 3W)
            q, k, v = (part.reshape(-1, heads, dh) for part in qkv.split(width, dim=-1))  # (T, H, dh) each
            weights = torch.einsum("hd,thd->ht", q[0], k).div(dh**0.5).softmax(-1)  # (H, T) the class token's row
            if index >= layer:
                for h in range(heads):
                    w_o = attn.out_proj.weight[:, h * dh:(h + 1) * dh]  # (W, dh)
                    parts += weights[h][:, None] * (v[:, h] @ w_o.T)  # (T, W)
            stream = block(stream)
        residual = stream[0, 0]  # (W,)
        sigma = (residual.var(unbiased=False) + visual.ln_post.eps).sqrt()
        joint = ((parts - parts.mean(-1, keepdim=True)) * visual.ln_post.weight) @ visual.proj / sigma  # (T, D)
        image = loaded.model.encode_image(pixels)[0]  # (D,)
    return joint @ directions.T / image.norm()  # (T, C)


@pytest.mark.parametrize("layer", [0, 1])
def test_the_attribution_matrix_is_the_decomposition_summed_by_hand(tiny, layer):
    loaded, _ = tiny
    directions = F.normalize(torch.randn(5, 16, generator=torch.Generator().manual_seed(3)), dim=-1)  # (C, D)
    classes = classfactors.ClassSet([f"c{i}" for i in range(5)], directions, "test")
    from PIL import Image

    noise = np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    image = spatial.SpatialImage("noise", Image.fromarray(noise))
    ours = classfactors.class_attributions(image, classes, layer, loaded=loaded)  # (T, C)
    by_hand = hand_attributions(loaded, spatial.model_pixels(loaded, image), directions, layer)
    assert ours.shape == (5, 5)  # the class token and a 2x2 grid
    assert torch.allclose(ours, by_hand, atol=1e-5), (ours - by_hand).abs().max()


def test_class_attributions_sum_to_the_heads_direct_effect(toy):
    """Over every token, layer 0's attributions are exactly the heads' share of each task-centred class score."""
    from clipterm.cache.build import tower

    classes = classfactors.class_set(toy, task="colour")
    image = spatial.open_image(PAIR)
    total = classfactors.class_attributions(image, classes, 0, loaded=toy).sum(0)  # (C,)
    out = tower(toy.model).decompose(toy.model, spatial.model_pixels(toy, image))
    heads = torch.einsum("lhd,lhde->e", out.head_out[0].float(), spatial._readout(toy.model))  # (D,)
    assert torch.allclose(total, heads @ classes.directions.T / out.image_embeds[0].norm(), atol=1e-5)
    assert len(classes.labels) == 8 and classes.labels[0] == "colour/red"
    assert torch.allclose(classes.directions.sum(0), torch.zeros(classes.directions.shape[1]), atol=1e-5)


def test_class_factors_are_named_by_their_classes(toy):
    result = classfactors.factorise_classes(PAIR, 2, loaded=toy, layer=0)
    assert result.of == "classes" and len(result.factors) == 2 and result.title == "2 NMF factors of class attributions"
    assert result.factors[0].share >= result.factors[1].share and 0 < result.error < 1
    for factor in result.factors:
        assert factor.texts[0][1] == pytest.approx(1.0) and all("/" in name for name, _ in factor.texts)
        assert 1 <= factor.spread <= 52 and float(factor.grid.min()) >= 0
    payload = result.to_json()
    assert payload["of"] == "classes" and payload["factors"][0]["classes"][0]["weight"] == 1.0
    segments = result.segments(64)
    assert segments.shape == (2, 64, 64) and not (segments[0] & segments[1]).any()


def test_position_centring_subtracts_the_reference_mean(toy):
    refs = factorise.reference_images(toy)
    assert len(refs) == factorise.REFERENCE_IMAGES and refs[0].ref.endswith(":0/0")
    means = factorise.position_means(toy, [2], refs[:4])  # (P, M)
    from clipterm.vit.towers import position_activations

    pixels = torch.cat([spatial.model_pixels(toy, ref) for ref in refs[:4]])
    acts = position_activations(toy.model, pixels, [2]).double()  # (4, P, M)
    assert means.shape == (64, acts.shape[-1]) and torch.allclose(means, acts.mean(0), atol=1e-6)
    centred = factorise.factorise(PAIR, 3, loaded=toy, layers=[2], pool=None)  # auto: the toy world is the reference
    plain = factorise.factorise(PAIR, 3, loaded=toy, layers=[2], pool=None, center="none")
    assert (centred.center, plain.center) == ("position", "none") and "position-centred" in centred.title
    masks = factorsweep.object_masks(PAIR)
    assert factorsweep.separation(centred, masks) > factorsweep.separation(plain, masks)


def test_resnet_activations_factor_through_the_tower():
    from clipterm.vit.models import load_model

    result = factorise.factorise(PAIR, 2, loaded=load_model("toy-rn"), pool="toy")
    assert result.layers == [3] and result.factors[0].grid.shape == (2, 2) and result.center == "position"
    assert result.factors[0].texts and all(-1 <= c <= 1 for _, c in result.factors[0].texts)


def test_two_factors_are_blue_and_orange_with_brightness_for_magnitude():
    pixels = np.full((4, 4, 3), 100, dtype=np.uint8)
    strengths = np.zeros((2, 4, 4), dtype=np.float32)
    strengths[0, 0, 0], strengths[1, 0, 1], strengths[0, 0, 2] = 1.0, 1.0, 0.5
    out = factor_overlay(pixels, strengths).astype(int)
    blue, orange = np.array(TWO_FACTOR_RGB[0]), np.array(TWO_FACTOR_RGB[1])
    dark = out[3, 3]  # no factor: the image, dimmed
    assert (out[0, 0] == np.minimum(dark + blue, 255)).all() and (out[0, 1] == np.minimum(dark + orange, 255)).all()
    assert out[0, 0].sum() > out[0, 2].sum() > out[3, 3].sum()  # half the magnitude, half as bright
    assert dark.max() < 40
    three = factor_overlay(pixels, np.concatenate([strengths, np.zeros((1, 4, 4), np.float32)]))
    assert tuple(three[0, 0]) != tuple(out[0, 0])  # three factors keep the distinct palette


def test_separation_scores_a_perfect_factorisation_highly():
    masks = factorsweep.object_masks(PAIR)
    grids = [torch.from_numpy(m.numpy().reshape(8, 8, 8, 8).mean((1, 3))).float() for m in masks]
    perfect = factorise.Factorisation([factorise.Factor(g, 0.5, torch.zeros(1)) for g in grids], "nmf", [], 0.0)
    swapped = factorise.Factorisation(list(reversed(perfect.factors)), "nmf", [], 0.0)
    assert factorsweep.separation(perfect, masks) == factorsweep.separation(swapped, masks) > 0.4
    assert factorsweep.object_masks(scenes_with(1, 1)[0][0]) is None  # one object: nothing to separate


# --------------------------------------------------------------------------- the command


def test_cli_class_factors_json_show_and_sweep(cli):
    result = cli("spatial", PAIR, "--nmf", "2", "--of", "classes", "--task", "shape", "--json")
    assert result.code == 0, result
    payload = json.loads(result.out)
    assert payload["mode"] == "nmf" and payload["of"] == "classes" and payload["layers"] == "L0"
    assert all(c["class"].startswith("shape/") for f in payload["factors"] for c in f["classes"])
    shown = cli("spatial", PAIR, "--nmf", "2", "--of", "classes", "--layer", "L1", "--show", "--size", "16")
    assert shown.code == 0 and "blue and orange" in shown.out and "top classes" in shown.out
    swept = cli("spatial", PAIR, "--nmf", "2", "--of", "classes", "--layers", "all", "--json")
    rows = json.loads(swept.out)["sweep"]
    assert [r["layer"] for r in rows] == [f"L{i}" for i in range(6)]
    assert all(0 <= r["iou"] <= 1 and len(r["classes_spanned"]) == 2 for r in rows)
    table = cli("spatial", PAIR, "--nmf", "3", "--layers", "all")
    assert table.code == 0 and "object IoU" in table.out and "position-centred" in table.out
    plain = cli("spatial", PAIR, "--nmf", "3", "--layer", "L2", "--center", "none", "--json")
    assert json.loads(plain.out)["center"] == "none" and json.loads(plain.out)["layers"] == "L2"


def test_cli_class_file(cli, tmp_path):
    listed = tmp_path / "classes.txt"
    listed.write_text("red\nblue\nstar\n")
    result = cli("spatial", PAIR, "--nmf", "2", "--of", "classes", "--classes", str(listed), "--json")
    assert result.code == 0, result
    assert {c["class"] for f in json.loads(result.out)["factors"] for c in f["classes"]} <= {"red", "blue", "star"}


@pytest.mark.parametrize("args, words", [
    (["--nmf", "0", "--of", "classes"], "at least 1 factor"),
    (["--nmf", "65", "--of", "classes"], "more factors than the image has patches (64)"),
    (["--nmf", "65"], "more factors than the image has patches (64)"),
    (["--nmf", "2", "--of", "classes", "--task", "flavour"], "no labels for task 'flavour'"),
    (["--nmf", "2", "--task", "colour"], "--of classes"),
    (["--nmf", "2", "--of", "classes", "--layers", "L2"], "give --layer L"),
    (["--nmf", "2", "--of", "classes", "--center", "position"], "--center applies to activations"),
    (["--nmf", "2", "--of", "classes", "--layer", "L9"], "no layer"),
    (["--query", "red", "--of", "classes"], "go with --nmf"),
])
def test_bad_nmf_inputs_are_one_line_errors(cli, args, words):
    result = cli("spatial", PAIR, *args)
    assert result.code == ExitCode.USAGE, result
    first, *rest = result.err.strip().splitlines()
    assert words in first and rest and rest[0].lstrip().startswith("hint:"), result.err


def test_a_model_without_classes_or_references_is_refused(cli, tiny, tmp_path):
    _, folder = tiny
    from PIL import Image

    picture = tmp_path / "p.png"
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(picture)
    result = cli("spatial", str(picture), "--model", f"local-dir:{folder}", "--nmf", "2", "--of", "classes")
    assert result.code == ExitCode.USAGE and "knows none" in result.err and "--classes FILE" in result.err
    result = cli("spatial", str(picture), "--model", f"local-dir:{folder}", "--nmf", "2", "--center", "position")
    assert result.code == ExitCode.USAGE and "needs reference images" in result.err
    result = cli("spatial", str(picture), "--model", f"local-dir:{folder}", "--nmf", "5")
    assert result.code == ExitCode.USAGE and "more factors than the image has patches (4)" in result.err
    assert cli("spatial", str(picture), "--model", f"local-dir:{folder}", "--nmf", "2", "--json").code == 0  # auto: none


def test_a_cache_without_labels_knows_no_classes(toy, tmp_path):
    reader = type("Unlabelled", (), {"manifest": {"dataset": {"kind": "folder"}}, "tasks": {}, "name": "plain"})()
    with pytest.raises(ClipTermError, match="no labelled tasks"):
        classfactors.class_set(toy, reader)
