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
