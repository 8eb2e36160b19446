"""bench/ by kind: every benchmark is a module of a kind folder, imports with no sys.path edit, and is listed by
`python -m bench` with its last result file. The benchmarks themselves are slow and never run here."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

from bench.__main__ import KINDS, benchmarks, main

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
SCRIPTS = sorted(path for kind in KINDS for path in (BENCH / kind).glob("*.py") if not path.name.startswith("_"))


def test_no_benchmark_edits_sys_path():
    editing = [str(path.relative_to(ROOT)) for path in BENCH.rglob("*.py") if "sys.path" in path.read_text("utf-8")]
    assert not editing, f"import through the bench package instead (python -m bench.KIND.NAME): {editing}"


def test_every_benchmark_sits_in_a_kind_folder():
    loose = sorted(path.name for path in BENCH.iterdir() if path.is_file() and path.suffix in (".py", ".sh"))
    assert loose == ["__init__.py", "__main__.py", "_common.py"], f"move into {', '.join(KINDS)}: {loose}"
    assert all((BENCH / kind / "__init__.py").is_file() for kind in KINDS)


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_a_benchmark_imports_as_a_module(path):
    module = importlib.import_module(f"bench.{path.parent.name}.{path.stem}")
    assert callable(module.main)


def test_the_listing_names_every_benchmark_with_its_last_result(capsys):
    main(["--json"])
    rows = {row["script"]: row for row in json.loads(capsys.readouterr().out)["benchmarks"]}
    scripts = {str(path.relative_to(ROOT)) for kind in KINDS for path in (BENCH / kind).iterdir()
               if path.suffix in (".py", ".sh") and not path.name.startswith("_")}
    assert set(rows) == scripts
    spatial = rows["bench/truth/spatial.py"]  # spatial.json, spatial-toy-v1.json, spatial-before-sparsity.json
    assert spatial["kind"] == "truth" and spatial["command"] == "python -m bench.truth.spatial"
    assert spatial["results"] == 3 and spatial["last_result"] == "bench/results/spatial.json"
    assert rows["bench/speed/search.py"]["results"] == 1  # search_lm-*.json and search_acceptance*.json are not its
    assert rows["bench/tools/toy_train_gpu.sh"]["last_result"] is None
    main([])
    table = capsys.readouterr().out
    assert all(row["command"] in table for row in rows.values())


def test_docs_benchmarks_names_every_benchmark():
    page = (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    scripts = [str(bench.path.relative_to(ROOT)) for bench in benchmarks()]
    missing = [script for script in scripts if script not in page]
    assert not missing, f"say what these measure in docs/benchmarks.md: {missing}"
