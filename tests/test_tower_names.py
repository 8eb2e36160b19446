"""The names of the new towers: a MAP head's pool parts, a ConvNeXt's stage blocks; parse, format, validate."""

from __future__ import annotations

import pytest

from clipterm import names
from clipterm.errors import ClipTermError
from clipterm.towers import tower_for

MAP = names.ModelShape(12, 12, 3072, pool_heads=12, pool_mlp=True)  # SigLIP ViT-B-16
COCA = names.ModelShape(12, 12, 3072, pool_heads=8)  # CoCa's attentional pooler: no MLP
CONVNEXT = names.ModelShape(3, 0, 0, tower="convnext", stage=3)


@pytest.mark.parametrize("text, canonical", [("pool.MLP", "pool.MLP"), ("pool.mlp", "pool.MLP"), ("POOL.H3", "pool.H3"),
                                             ("pool.H3:pc2", "pool.H3:pc2"), ("S3.B2", "S3.B2"), ("s3.b0", "S3.B0"),
                                             ("S3", "S3")])
def test_new_names_round_trip(text, canonical):
    assert str(names.parse(text)) == canonical
    assert names.parse(canonical) == names.parse(text)


def test_a_map_head_speaks_the_vit_names_and_its_pools():
    assert tower_for(MAP).validate(names.parse("pool.MLP")) == names.Component("mlp", 12, site="pool")  # the slot after L11
    assert tower_for(MAP).validate(names.parse("pool.H11")).index == 11
    assert str(tower_for(MAP).validate(names.parse("L11.H11"))) == "L11.H11"
    assert [str(c) for c in tower_for(MAP).direct_components()][-2:] == ["L11.MLP", "pool.MLP"]
    assert [str(c) for c in tower_for(MAP).pool_components()][-2:] == ["pool.bias", "pool.MLP"]
    assert tower_for(MAP).mlps()[-1] == "pool.MLP" and len(tower_for(MAP).heads()) == 144
    assert "pool.H0..pool.H11" in tower_for(MAP).vocabulary and "pool.MLP" in tower_for(MAP).vocabulary
    assert tower_for(MAP).describe(names.parse("pool.MLP")) == "the MAP head's MLP on the pooled vector"


@pytest.mark.parametrize("shape, name, words", [
    (MAP, "pool.H12", "no head 12 in this model's pool"),
    (MAP, "pool.pos", "no positional embedding"),
    (COCA, "pool.MLP", "has no MLP"),
    (MAP, "S3.B0", "ConvNeXt block"),
    (names.ModelShape(12, 12, 3072), "pool.MLP", "has none"),
    (CONVNEXT, "S3.B3", "no block 3 in stage 3"),
    (CONVNEXT, "S2.B0", "only the last stage's blocks"),
    (CONVNEXT, "L0.H0", "not a ConvNeXt name"),
    (CONVNEXT, "pool.H0", "not a ConvNeXt name"),
])
def test_names_of_another_tower_are_refused_with_the_models_vocabulary(shape, name, words):
    with pytest.raises(ClipTermError, match=words) as error:
        tower_for(shape).validate(names.parse(name))
    assert error.value.hint == tower_for(shape).vocabulary


def test_a_convnext_is_named_by_its_last_stage_blocks():
    assert [str(c) for c in tower_for(CONVNEXT).direct_components()] == ["embed", "bias", "S3.B0", "S3.B1", "S3.B2"]
    assert tower_for(CONVNEXT).heads() == [] and tower_for(CONVNEXT).mlps() == tower_for(CONVNEXT).layers() == ["S3.B0", "S3.B1", "S3.B2"]
    assert names.block(3, 2) == "S3.B2" and names.stage(3) == "S3"
    assert names.parse("S3.B2").base == names.parse("S3.B2")
    assert "stage 3" in tower_for(CONVNEXT).describe(names.parse("embed"))
    assert "S3.B0..S3.B2" in tower_for(CONVNEXT).vocabulary
