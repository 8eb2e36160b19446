"""`clipterm demo` without a terminal: builds its cache once (with neurons) and prints what the TUI would show."""

from __future__ import annotations


def test_demo_builds_its_cache_once_and_prints_the_tui_summary(cli, tmp_path):
    first = cli("demo", "--n", "40", "--scenes", "120", "--cache-dir", str(tmp_path))
    assert first.code == 0, first.err
    assert "built cache toy-demo: 120 synthetic images" in first.out
    assert (tmp_path / "toy-demo" / "neurons.L4.safetensors").is_file()
    for expected in ("zero-shot accuracy", "L5.H", "its top text", "strongest neurons", "L4.N", "clipterm tui toy-demo"):
        assert expected in first.out
    again = cli("demo", "--n", "40", "--scenes", "120", "--cache-dir", str(tmp_path))
    assert again.code == 0 and "built cache" not in again.out and "strongest neurons" in again.out
