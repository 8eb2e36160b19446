"""The component vocabulary: one spelling everywhere, validated against a model's shape."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from clipterm.errors import ClipTermError
from clipterm.names import Component, ModelShape, format_layers, parse, parse_layers
from clipterm.towers import tower_for

SHAPE = ModelShape(layers=12, heads=12, neurons=3072)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("embed", Component("embed")),
        ("bias", Component("bias")),
        ("L10", Component("layer", 10)),
        ("L10.H3", Component("head", 10, 3)),
        ("L10.H3:pc2", Component("head", 10, 3, 2)),
        ("L10.MLP", Component("mlp", 10)),
        ("L9.N1234", Component("neuron", 9, 1234)),
        ("L9.N1234:pc1", Component("neuron", 9, 1234, 1)),
        ("l9.mlp", Component("mlp", 9)),
    ],
)
def test_parse_known_names(name, expected):
    assert parse(name) == expected


@given(st.integers(0, 11), st.integers(0, 11), st.one_of(st.none(), st.integers(1, 5)))
def test_head_names_round_trip(layer, head, pc):
    component = Component("head", layer, head, pc)
    assert parse(str(component)) == component
    assert tower_for(SHAPE).parse(str(component)) == component


@pytest.mark.parametrize("bad", ["", "L", "H3", "L10.H", "L10.X3", "L10.MLP:pc1", "L1.H2:pc0", "embed.H1", "L-1.H0"])
def test_malformed_names_are_errors_with_hints(bad):
    with pytest.raises(ClipTermError) as err:
        parse(bad)
    assert err.value.hint


@pytest.mark.parametrize("name, hint", [("L99.H0", "L0..L11"), ("L3.H12", "H0..H11"), ("L3.N3072", "N0..N3071")])
def test_out_of_range_names_say_the_valid_range(name, hint):
    with pytest.raises(ClipTermError) as err:
        tower_for(SHAPE).parse(name)
    assert hint in err.value.hint


@pytest.mark.parametrize(
    "spec, layers",
    [("L9", [9]), ("L8-11", [8, 9, 10, 11]), ("L8-L11", [8, 9, 10, 11]), ("L1,L3", [1, 3]), ("all", list(range(12)))],
)
def test_layer_sets(spec, layers):
    assert parse_layers(spec, 12) == layers


@pytest.mark.parametrize("spec", ["L12", "L5-3", "9", "L1-"])
def test_bad_layer_sets(spec):
    with pytest.raises(ClipTermError):
        parse_layers(spec, 12)


@given(st.sets(st.integers(0, 11), min_size=1))
def test_format_layers_round_trips(layers):
    assert parse_layers(format_layers(sorted(layers)), 12) == sorted(layers)


RESNET = ModelShape(layers=1, heads=32, neurons=2048, tower="resnet", pool_layer=0, neuron_layer=3)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("pool.H3", Component("head", None, 3, site="pool")),
        ("pool.H3:pc2", Component("head", None, 3, 2, site="pool")),
        ("pool.bias", Component("bias", site="pool")),
        ("pool.pos", Component("embed", site="pool")),
        ("pool", Component("layer", site="pool")),
        ("POOL.h1", Component("head", None, 1, site="pool")),
    ],
)
def test_pool_names_parse_and_round_trip(name, expected):
    assert parse(name) == expected
    assert parse(str(expected)) == expected


def test_resnet_names_validate_with_the_pool_slot():
    from clipterm import names

    assert tower_for(RESNET).parse("pool.H31") == Component("head", 0, 31, site="pool")
    assert str(tower_for(RESNET).parse("L3.N2047:pc1")) == "L3.N2047:pc1"
    assert names.pool_head(3) == "pool.H3" and names.pool_bias() == "pool.bias" and names.pool_pos() == "pool.pos"
    assert [str(c) for c in tower_for(RESNET).direct_components()][:3] == ["pool.pos", "pool.bias", "pool.H0"]
    assert len(tower_for(RESNET).heads()) == 32 and tower_for(RESNET).heads([0])[0].site == "pool"


@pytest.mark.parametrize("name", ["L3.H0", "embed", "bias", "L0.MLP", "L2.N5", "L3.N2048", "pool.H32", "pool.MLP"])
def test_vit_names_on_a_resnet_are_one_line_errors_naming_its_vocabulary(name):
    with pytest.raises(ClipTermError) as err:
        tower_for(RESNET).parse(name)
    assert "\n" not in err.value.message and "pool.H0..pool.H31" in err.value.hint and "L3.N0..L3.N2047" in err.value.hint


@pytest.mark.parametrize("name", ["pool.H3", "pool.bias", "pool.pos", "pool"])
def test_pool_names_on_a_vit_are_one_line_errors_naming_its_vocabulary(name):
    with pytest.raises(ClipTermError) as err:
        tower_for(SHAPE).parse(name)
    assert "\n" not in err.value.message and "embed, bias, L0..L11" in err.value.hint


@pytest.mark.parametrize("bad", ["pool.H", "pool.X", "pool.bias:pc1", "pool.H1:pc0", "poolH1"])
def test_malformed_pool_names_are_errors(bad):
    with pytest.raises(ClipTermError):
        parse(bad)
