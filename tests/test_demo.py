"""`clipterm demo` without a terminal: builds its cache once (with neurons) and prints what the TUI would show."""

from __future__ import annotations

from clipterm.cache import store


def test_demo_builds_its_cache_once_and_prints_the_tui_summary(cli, tmp_path):
    first = cli("demo", "--n", "40", "--scenes", "120", "--cache-dir", str(tmp_path))
    assert first.code == 0, first.err
    assert "built cache toy-demo: 120 synthetic images" in first.out
    assert (tmp_path / "toy-demo" / "neurons.L4.safetensors").is_file()
    for expected in ("zero-shot accuracy", "L5.H", "its top text", "strongest neurons", "L4.N", "clipterm tui toy-demo"):
        assert expected in first.out
    again = cli("demo", "--n", "40", "--scenes", "120", "--cache-dir", str(tmp_path))
    assert again.code == 0 and "built cache" not in again.out and "strongest neurons" in again.out


def test_demo_rebuilds_its_cache_when_the_toy_model_or_size_changed(cli, tmp_path):
    import json

    assert cli("demo", "--n", "20", "--scenes", "60", "--cache-dir", str(tmp_path)).code == 0
    resized = cli("demo", "--n", "20", "--scenes", "80", "--cache-dir", str(tmp_path))
    assert resized.code == 0, resized.err
    assert "rebuilding cache toy-demo" in resized.out and "built cache toy-demo: 80 synthetic images" in resized.out
    manifest_path = tmp_path / "toy-demo" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["model"]["weights_sha256"] = "0" * 64  # as if an earlier clipterm's toy had built it
    store.write_manifest(manifest_path.parent, manifest)  # as a build would write it
    upgraded = cli("demo", "--n", "20", "--scenes", "80", "--cache-dir", str(tmp_path))
    assert upgraded.code == 0, upgraded.err
    assert "rebuilding cache toy-demo" in upgraded.out and (tmp_path / "toy-demo" / "neurons.L4.safetensors").is_file()
    assert json.loads(manifest_path.read_text())["model"]["weights_sha256"] != "0" * 64


# --------------------------------------------------------------------------- the stored summary


def _stored(tmp_path):
    import json

    from clipterm.cli.demo import STORED

    return json.loads((tmp_path / STORED).read_text())


def test_a_second_demo_prints_its_stored_summary_without_importing_torch(cli, tmp_path):
    import os
    import subprocess
    import sys

    assert cli("demo", "--n", "20", "--scenes", "60", "--cache-dir", str(tmp_path)).code == 0
    code = ("import sys\nfrom clipterm.cli.app import main\ntry:\n"
            f"    main(['demo', '--n', '20', '--scenes', '60', '--cache-dir', {str(tmp_path)!r}])\n"
            "except SystemExit:\n    pass\nprint('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().endswith("NO-TORCH"), run.stdout[-300:]
    assert "zero-shot accuracy" in run.stdout and "strongest neurons" in run.stdout and "L4.N" in run.stdout


def test_a_stale_or_corrupt_stored_summary_is_recomputed(cli, tmp_path):
    import json

    from clipterm import __version__
    from clipterm.cli.demo import STORED

    args = ("demo", "--n", "20", "--scenes", "60", "--cache-dir", str(tmp_path))
    assert cli(*args).code == 0
    stored = _stored(tmp_path)
    stored["key"]["clipterm"] = "0.0.0"  # as if an older clipterm had printed it
    stored["layers"] = "not a table"
    (tmp_path / STORED).write_text(json.dumps(stored))
    stale = cli(*args)
    assert stale.code == 0 and "strongest neurons" in stale.out
    assert _stored(tmp_path)["key"]["clipterm"] == __version__  # recomputed and stored again
    (tmp_path / STORED).write_text("{ not json")
    corrupt = cli(*args)
    assert corrupt.code == 0 and "strongest neurons" in corrupt.out and "L4.N" in corrupt.out
    assert _stored(tmp_path)["key"]["clipterm"] == __version__
