"""Every analysis on every tower family, from the CLI: the towers issue's 54 cells.

Six families, each a tiny random tower (or a shipped toy) with an 8-image cache: the toy ViT (class token), toy-rn
(ModifiedResNet, attention pool), a SigLIP-style timm ViT with a MAP head, an average-pooled open_clip ViT, a timm
ConvNeXt and a timm class-token ViT. Nine analyses each. A cell passes when the command exits 0 with JSON; a
cell that the capability table of `docs/models.md` marks ✗ must be refused in one line
instead."""

from __future__ import annotations

import json

import pytest
from siglip_helpers import save_tiny_siglip
from test_timm_caches import save_tiny_convnext
from tower_helpers import save_model_folder

TEXT = {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}
AVG_VIT = {"model_cfg": {"embed_dim": 24, "vision_cfg": {"image_size": 48, "patch_size": 16, "layers": 2, "width": 32,
                                                         "head_width": 16, "pool_type": "avg"}, "text_cfg": TEXT},
           "preprocess_cfg": {"size": 48}}
TIMM_VIT = {"model_cfg": {"embed_dim": 24, "vision_cfg": {"image_size": 160, "timm_model_name": "test_vit",
                                                          "timm_model_pretrained": False, "timm_pool": "token",
                                                          "timm_proj": "linear"}, "text_cfg": TEXT},
            "preprocess_cfg": {"size": 160}}
FAMILIES = ["toy", "toy-rn", "siglip", "avg-vit", "convnext", "timm-vit"]
ANALYSES = ["textspan", "ablate", "attribute", "images", "neurons", "spatial", "search", "visualise-unit",
            "visualise-text"]


def _model(family: str, folder) -> str:
    if family in ("toy", "toy-rn"):
        return family
    made = {"siglip": lambda: save_tiny_siglip(folder), "convnext": lambda: save_tiny_convnext(folder),
            "avg-vit": lambda: save_model_folder(folder, AVG_VIT),
            "timm-vit": lambda: save_model_folder(folder, TIMM_VIT)}[family]()
    return f"local-dir:{made}"


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """family -> (cache root, cache name, model spec), built once through the CLI."""
    from clipterm.cli.app import main

    root = tmp_path_factory.mktemp("matrix")
    built = {}
    for family in FAMILIES:
        model = _model(family, root / "models" / family)
        try:
            main(["cache", "build", "--images", "toy:8", "--model", model, "--name", family, "--cache-dir",
                  str(root / "caches"), "--dtype", "float32", "--device", "cpu", "--workers", "0", "--json"])
        except SystemExit as exc:
            assert not exc.code, f"cache build of {family} failed"
        built[family] = (root / "caches", family, model)
    return built


def _unit(reader) -> str:
    """The unit the cells ask about: the last head (a pool head where the tower has one), else the last block."""
    heads = reader.tower.heads()
    return str(heads[-1]) if heads else reader.tower.layers()[-1]


def _args(analysis: str, name: str, model: str, unit: str, layer: str, out) -> list[str]:
    return {
        "textspan": ["textspan", name, "-c", unit, "--texts", "2", "--pool", "toy"],
        "ablate": ["ablate", name, "--task", "colour", "--pool", "toy"],
        "attribute": ["attribute", name, "--image", "0", "--text", "a red circle"],
        "images": ["images", name, "--component", unit, "--top", "3"],
        "neurons": ["neurons", "build", name, "--layer", layer],
        "spatial": ["spatial", "row:0", "--cache", name, "--component", unit, "--model", model],
        "search": ["search", "--cache", name, "--target", unit, "--steps", "2", "--beam", "2"],
        "visualise-unit": ["visualise", "--cache", name, "--target", unit, "--steps", "1", "--out", str(out)],
        "visualise-text": ["visualise", "--cache", name, "--target", "text:a red circle", "--steps", "1",
                           "--out", str(out)],
    }[analysis]


CELL = {"neurons": "neurons build", "visualise-unit": "visualise", "visualise-text": "visualise"}


def _expected(family: str, analysis: str) -> str | None:
    """The table's verdict for a cell: None where it runs, else the refusal."""
    from clipterm.vit.towers import FAMILY_EXAMPLES, capability

    info = list(FAMILY_EXAMPLES.values())[FAMILIES.index(family)]
    return capability(info, CELL.get(analysis, analysis))


def test_the_capability_table_in_the_docs_is_the_codes():
    from pathlib import Path

    from clipterm.vit.towers import capability_table

    text = (Path(__file__).parent.parent / "docs" / "models.md").read_text()
    table = text.split("<!-- capabilities:start -->\n", 1)[1].split("\n<!-- capabilities:end -->", 1)[0]
    assert table == capability_table()


@pytest.mark.parametrize("analysis", ANALYSES)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_analysis_runs_on_every_tower(caches, cli, monkeypatch, tmp_path, family, analysis):
    """A cell the table marks ✓ runs and prints JSON; a ✗ is one line naming the model part, exit 5."""
    from clipterm import names
    from clipterm.cache.reader import open_cache


    root, name, model = caches[family]
    monkeypatch.setenv("CLIPTERM_CACHE", str(root))
    reader = open_cache(name)
    unit = _unit(reader)
    layer = names.layer(reader.tower.neuron_layers()[-1])
    result = cli(*_args(analysis, name, model, unit, layer, tmp_path / "out"), "--json")
    refusal = _expected(family, analysis)
    if refusal is not None:
        errors = [line for line in result.err.splitlines() if line.startswith("error:")]
        assert result.code == 5 and errors == [f"error: {refusal}"], result.err
        return
    assert result.code == 0, result.err
    assert "Traceback" not in result.err
    lines = [line for line in result.out.splitlines() if line.strip()]
    assert lines, "no output"
    json.loads(result.out) if not analysis.startswith("search") else [json.loads(line) for line in lines]
