"""Shared fixtures: the toy model, a CLI runner, and an isolated cache root. Nothing here touches the network."""

from __future__ import annotations

import os

import pytest

# Tests never download; a weights lookup must only look at local files.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _isolated_dirs(tmp_path_factory, monkeypatch):
    """Each test gets its own cache root and config dir, so nothing leaks between tests or into ~/.cache."""
    base = tmp_path_factory.mktemp("clipterm-home")
    monkeypatch.setenv("CLIPTERM_CACHE", str(base / "cache"))
    monkeypatch.setenv("CLIPTERM_CONFIG", str(base / "config"))


@pytest.fixture(scope="session")
def toy():
    """The shipped toy CLIP, loaded once per session."""
    import torch

    from clipterm.vit.models import load_model

    torch.manual_seed(0)
    return load_model("toy")


@pytest.fixture(scope="session")
def toy_truth_root(tmp_path_factory):
    """One root for the toy's 1000-scene ground-truth cache with its L4 neurons: test_neurons and test_toy_truth
    both measure on it, and whichever runs first builds it."""
    return tmp_path_factory.mktemp("toy-truth")


class CliResult:
    def __init__(self, code: int, out: str, err: str):
        self.code, self.out, self.err = code, out, err

    def __repr__(self) -> str:
        return f"CliResult(code={self.code}, out={self.out[-500:]!r}, err={self.err[-500:]!r})"


@pytest.fixture
def cli(capsys):
    """Run `clipterm ARGS...` in-process, through the real entry point; returns code, stdout and stderr."""
    from clipterm.cli.app import main

    def run(*args: str) -> CliResult:
        capsys.readouterr()
        try:
            main(list(args))
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run
