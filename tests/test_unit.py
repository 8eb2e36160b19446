"""`clipterm unit CACHE UNIT` (issue 29): a unit's page on toy-rn, as JSON and as one self-contained HTML file."""

from __future__ import annotations

import json
import re

import pytest

from clipterm.errors import ExitCode

FAST = ("--steps", "2", "--search-steps", "2", "--size", "32", "--top", "4")


@pytest.fixture(scope="module")
def rn_unit_cache(tmp_path_factory):
    from clipterm.cache.build import BuildOptions, build_cache
    from clipterm.cache.neurons import build_neurons
    from clipterm.cache.reader import open_cache
    from clipterm.vit.models import load_model

    loaded = load_model("toy-rn")
    root = tmp_path_factory.mktemp("unit")
    build_cache(BuildOptions(images="toy:40", model="toy-rn", name="u", cache_dir=str(root), neurons=True, workers=0),
                loaded=loaded)
    build_neurons(open_cache(root / "u"), 3, device="cpu", top_k=4, loaded=loaded)
    return root / "u"


def test_a_channel_page_has_every_section_inline_and_no_network(cli, rn_unit_cache, tmp_path):
    page = tmp_path / "page.html"
    result = cli("unit", str(rn_unit_cache), "L3.N1", *FAST, "--facets", "word,colour/red", "--html", str(page), "--json")
    assert result.code == 0, result
    record = json.loads(result.out)
    assert record["component"] == "L3.N1" and len(record["images"]["examples"]) == 4
    assert [f["facet"] for f in record["facets"]] == ["word", "colour/red"]
    assert all(f["probe"]["layer"] == "L2" for f in record["facets"]) and record["sparse"]["method"] == "OMP"
    assert record["search"]["strings"] and set(record["ablation"]["tasks"]) >= {"colour", "word"}
    text = page.read_text()
    for section in ("images", "visualisation", "facets", "search", "sparse", "ablation"):
        assert f'<section id="{section}">' in text
    assert text.count('src="data:image/png;base64,') == 4 + 1 + 2  # top images, the plain picture, two facets
    assert not re.search(r"(src|href)=\"(?!data:)", text) and "http://" not in text and "https://" not in text
    assert "default-src 'none'" in text


def test_a_lower_stage_channel_says_which_sections_it_lacks(cli, rn_unit_cache):
    result = cli("unit", str(rn_unit_cache), "L2.N8", *FAST, "--facets", "colour", "--json")
    assert result.code == 0, result
    record = json.loads(result.out)
    assert "unavailable" in record["images"] and "unavailable" in record["sparse"] and "uri" not in record["visualisation"]
    assert record["visualisation"]["objective"] == "activation"


@pytest.mark.parametrize("args, words", [
    (["L3.N1", "--facets", "texture"], "no labels for task 'texture'"),
    (["L4.N1"], "no stage 4"),
    (["L3.N1", "--html", "/no/such/folder/page.html"], "does not exist"),
])
def test_bad_unit_inputs_are_one_line(cli, rn_unit_cache, args, words):
    result = cli("unit", str(rn_unit_cache), *args, *FAST)
    assert result.code == ExitCode.USAGE, result
    assert words in result.err and "hint:" in result.err
