"""One vocabulary: names are built by `clipterm.names`, JSON uses the same words everywhere, imports point one way."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

from clipterm.cache.build import BuildOptions, build_cache
from clipterm.cache.neurons import build_neurons
from clipterm.cache.reader import open_cache

PACKAGE = Path(__file__).resolve().parent.parent / "clipterm"

# The words a --json payload may use, wherever they sit. A new key goes here on purpose, not by accident:
# synonyms of these (`n`, `rows`, `neuron`, `top_k`, …) are what this list keeps out.
JSON_WORDS = set("""
pool_heads pool_mlp stage
about accuracy already_complete arch background baseline best blue built builtin by bytes bytes_per_row cache cache_root
cached caches changed classes clipterm cls first_token coefficient colour complete component components config_dir contribution
convention cosine created cuda cumulative dataset decomposition dir done drop dropped_blank dropped_duplicates dtype
elapsed embed_dim evals evals_per_s examples explained fingerprint folder_removed forward green grid grid_size head_dim
heads high id image images images_per_s index inputs kept kind labels layer layers low matching mean_effect_norm
measure metric missing mlp_width mode model models name neurons norm_mean ok open_clip orange path paths pc pc1_share
platform pool pool_sha256 position pretrained problems python quick_gelu quick_gelu_source rank reason red removed rest root row score
scores second_order seconds seed set texts_per_component sha256 shape shards size skipped skipped_inputs sort source spec step stored
supported targets task tasks text texts themes_dirs title tokens top1_share top_images top_text topic torch
schema total_variance toy_model weights weights_path weights_present weights_sha256 what width word world_size yellow
cyan pink purple decode
curve diversity facet files final lr objective param steps steps_per_s target lm lm_nll lm_penalty lm_weight world tower pool_layer neuron_layer stages site
""".split())
LAYER = re.compile(r"^L\d+$")


def test_no_hand_built_component_names():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "names.py":
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if re.search(r"""f["']L\{""", line):
                offenders.append(f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}")
    assert not offenders, "build names with clipterm.names (names.head(l, h), ...):\n" + "\n".join(offenders)


def _imports(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
            modules.update(f"{node.module}.{alias.name}" for alias in node.names)
    return modules


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_one_way(path):
    """cli/ modules share code only through cli.common and cli.output; nothing outside tui/ imports tui/."""
    imported = _imports(path)
    inside = path.relative_to(PACKAGE).parts[0]
    if inside == "cli":
        siblings = {m for m in imported if m.startswith("clipterm.cli.")}
        allowed = {"clipterm.cli.common", "clipterm.cli.output"}
        assert {m for m in siblings if not any(m == a or m.startswith(a + ".") for a in allowed)} == set()
    if inside != "tui":
        assert not {m for m in imported if m == "clipterm.tui" or m.startswith("clipterm.tui.")}


def _keys(payload, where="") -> list[tuple[str, str, object]]:
    found = []
    if isinstance(payload, dict):
        for key, value in payload.items():
            found.append((where + "." + key, key, value))
            found += _keys(value, where + "." + key)
    elif isinstance(payload, list):
        for item in payload[:5]:
            found += _keys(item, where + "[]")
    return found


@pytest.fixture(scope="module")
def vocab_cache(toy, tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab")
    build_cache(BuildOptions(images="toy:24", name="words", cache_dir=str(root), shard_rows=12), loaded=toy)
    reader = open_cache(root / "words")
    build_neurons(reader, 4, device="cpu", top_k=6, loaded=toy)
    return root


COMMANDS = [
    ("cache", "build", "--images", "toy:24", "--name", "words"),
    ("cache", "ls"), ("cache", "info", "words"), ("cache", "verify", "words"), ("cache", "rm", "words", "--dry-run"),
    ("neurons", "build", "words", "--layer", "L4", "--top-images", "6"),
    ("neurons", "list", "words", "--layer", "L4", "--top", "3", "--decompose", "--pool", "toy"),
    ("images", "words", "--component", "L4.N3", "--top", "3"), ("images", "words", "--component", "L5.H2", "--top", "3"),
    ("textspan", "words", "-c", "L5.H2", "--pool", "toy"), ("ablate", "words", "--by", "layer", "--task", "colour"),
    ("ablate", "words", "--second-order", "L4", "--task", "colour"),
    ("attribute", "words", "--image", "3", "--text", "a red circle", "--top", "4"),
    ("search", "--cache", "words", "--target", "L5.H2", "--steps", "2"),
    ("spatial", "row:1", "--cache", "words", "--component", "L5.H2", "--model", "toy"),
    ("texts", "ls"), ("texts", "show", "toy", "--limit", "2"),
    ("visualise", "--target", "L5.H2", "--cache", "words", "--steps", "2", "--size", "32", "--out", "{tmp}/vis"),
    ("toy", "eval", "--n", "20"), ("names", "L5.H2", "L4.N3", "L3"), ("locate", "cache"),
]


@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: " ".join(a[:2]))
def test_every_json_output_speaks_one_vocabulary(cli, vocab_cache, monkeypatch, tmp_path, args):
    monkeypatch.setenv("CLIPTERM_CACHE", str(vocab_cache))
    result = cli(*[a.replace("{tmp}", str(tmp_path)) for a in args], "--json")
    assert result.code == 0, result.err
    try:
        payloads = [json.loads(result.out)]
    except json.JSONDecodeError:  # `search --json` writes one event per line
        payloads = [json.loads(line) for line in result.out.splitlines() if line.strip()]
    assert payloads and all("schema" in p or "step" in p for p in payloads)
    problems = []
    for payload in payloads:
        for where, key, value in _keys(payload):
            if key not in JSON_WORDS and not where.startswith((".accuracy.", ".dataset.tasks.", ".tasks.")):
                problems.append(f"key {where} is not in the JSON vocabulary")
            if key == "layer" and value is not None and not (isinstance(value, str) and LAYER.match(value)):
                problems.append(f"{where} = {value!r}: layers are written L9")
            if key == "cache" and value is not None and "/" in str(value):
                problems.append(f"{where} = {value!r}: `cache` is a name (its path goes under `path`)")
            if key == "images" and not isinstance(value, int) and not where.endswith(".stored.images"):
                problems.append(f"{where}: `images` is a row count")
    assert not problems, f"{' '.join(args)}:\n" + "\n".join(sorted(set(problems)))
