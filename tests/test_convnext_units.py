"""A ConvNeXt's units: the last stage's channels (`L3.N{c}`) through the pool, and its blocks split over the grid.

Frozen-forward checks: the channels' direct effects plus `bias` are the model's own embedding, and a block's
per-position effects sum to its stored direct effect (fp32, 1e-5). Then the channels work wherever a ResNet's do:
`neurons build`, top images, a per-cell map, and a search target."""

from __future__ import annotations

import json

import pytest
import torch
from test_timm_caches import save_tiny_convnext

from clipterm.errors import ClipTermError


@pytest.fixture(scope="module")
def convnext(tmp_path_factory):
    from clipterm.cache.build import BuildOptions, build_cache
    from clipterm.cache.reader import open_cache
    from clipterm.vit.models import load_model

    root = tmp_path_factory.mktemp("cnx-units")
    loaded = load_model(f"local-dir:{save_tiny_convnext(root / 'tiny-convnext')}")
    build_cache(BuildOptions(images="toy:10", model=loaded.info.spec, name="cnx", cache_dir=str(root / "caches"),
                             dtype="float32", device="cpu", workers=0), loaded=loaded)
    return open_cache(root / "caches" / "cnx"), loaded


def _pixels(n: int = 3, size: int = 64) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(3))  # (n, 3, S, S)


def test_channel_effects_plus_bias_are_the_embedding(convnext):
    from clipterm.vit import convnext as cnx

    _, loaded = convnext
    model, pixels = loaded.model, _pixels()
    stage = cnx.stage_index(model)
    out = cnx.trace(model, pixels, stage)
    vectors = cnx.path_vectors(model, stage)  # (C, 1, D)
    effects = torch.einsum("bck,cke->be", out.scalars, vectors)  # (B, D): Σ_c effect_c
    parts = cnx.decompose(model, pixels)
    assert out.scalars.shape[1] == vectors.shape[0] == loaded.info.shape.neurons
    torch.testing.assert_close(effects + parts.bias, out.image_embeds, atol=1e-5, rtol=1e-5)


def test_a_blocks_cells_sum_to_its_direct_effect(convnext):
    from clipterm.vit import convnext as cnx

    _, loaded = convnext
    model, pixels = loaded.model, _pixels()
    parts = cnx.decompose(model, pixels)
    for block in range(loaded.info.layers):
        cells, embeds = cnx.block_positions(model, pixels, block)  # (B, P, D), (B, D)
        assert cells.shape[1] > 1
        torch.testing.assert_close(cells.sum(1), parts.mlps[:, block], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(embeds, parts.image_embeds, atol=1e-5, rtol=1e-5)


def test_the_last_stage_is_the_only_channel_layer(convnext):
    reader, _ = convnext
    assert reader.tower.neuron_layers() == [3]
    assert reader.tower.parse("L3.N5").index == 5
    with pytest.raises(ClipTermError, match="not a channel of this ConvNeXt's last stage"):
        reader.tower.parse("L2.N5")
    with pytest.raises(ClipTermError, match="no channel 64"):
        reader.tower.parse("L3.N64")
    with pytest.raises(ClipTermError, match="not this ConvNeXt's last stage"):
        reader.tower.check_neuron_layer(2)


def test_channels_work_wherever_a_resnets_do(convnext, cli, monkeypatch, tmp_path):
    reader, loaded = convnext
    monkeypatch.setenv("CLIPTERM_CACHE", str(reader.path.parent))
    built = cli("neurons", "build", "cnx", "--layer", "L3", "--json")
    assert built.code == 0, built.err
    assert json.loads(built.out)["layer"] == "L3"
    top = cli("images", "cnx", "--component", "L3.N5", "--top", "3", "--json")
    assert top.code == 0, top.err
    ranked = json.loads(top.out)
    assert ranked["component"] == "L3.N5" and len(ranked["examples"]) == 3
    cells = cli("spatial", "row:0", "--cache", "cnx", "--component", "L3.N5", "--model", loaded.info.spec, "--json")
    assert cells.code == 0, cells.err
    grid = json.loads(cells.out)
    assert "activation" in json.dumps(grid)
    found = cli("search", "--cache", "cnx", "--target", "L3.N5", "--steps", "2", "--beam", "2", "--json")
    assert found.code == 0, found.err


def test_an_old_convnext_cache_says_to_rebuild_for_its_channels(convnext):
    from dataclasses import replace

    from clipterm.towers import tower_for

    reader, _ = convnext
    old = tower_for(replace(reader.shape, neuron_layer=None))
    with pytest.raises(ClipTermError, match="rebuild"):
        old.parse("L3.N5")
    assert old.neuron_layers() == []
