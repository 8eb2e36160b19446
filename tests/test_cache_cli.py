"""`clipterm cache ls|info|verify|rm`: JSON with a schema, damage named by file, deletion only when confirmed."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from cache_helpers import pristine_cache, root_holding

from clipterm.errors import ExitCode


@pytest.fixture(scope="module")
def built(toy, tmp_path_factory):
    """A pristine 3-shard cache; tests copy it before changing anything."""
    return pristine_cache(toy, tmp_path_factory, "cli-cache", images=36, shard_rows=12)


@pytest.fixture
def root(built, tmp_path, monkeypatch):
    """A cache root holding a fresh copy of `pets`, set as $CLIPTERM_CACHE."""
    return root_holding(built, tmp_path, monkeypatch)


def test_ls_and_info_json(cli, root):
    listing = json.loads(cli("cache", "ls", "--json").out)
    assert listing["schema"] == "clipterm.cache.ls/2" and listing["reason"] == "$CLIPTERM_CACHE"
    assert [c["name"] for c in listing["caches"]] == ["pets"] and listing["caches"][0]["images"] == 36
    info = json.loads(cli("cache", "info", "pets", "--json").out)
    assert info["schema"] == "clipterm.cache.info/2"
    assert (info["images"], info["shards"], info["dtype"], info["complete"]) == (36, 3, "float16", True)
    assert info["model"]["arch"] == "toy" and info["tasks"]["colour"] == 8 and info["skipped_inputs"] == []
    assert info["bytes"] > 0 and info["stored"] == {"neurons": False, "tokens": []}


def test_ls_and_info_tables(cli, root):
    assert "pets" in cli("cache", "ls").out
    text = cli("cache", "info", str(root / "pets")).out  # a path works as well as a name
    assert "36 images stored" in text and "float16" in text and "colour (8 classes)" in text


def test_verify_passes_then_names_a_damaged_shard(cli, root):
    ok = cli("cache", "verify", "pets", "--json")
    assert ok.code == 0 and json.loads(ok.out)["ok"] is True
    shard = root / "pets" / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte deep inside a tensor
    shard.write_bytes(bytes(data))
    bad = cli("cache", "verify", "pets")
    assert bad.code == ExitCode.INVALID_DATA
    assert "shard-00001.safetensors" in bad.err and "shard-00001.safetensors" in bad.out
    assert "shard-00000" not in bad.err
    report = json.loads(cli("cache", "verify", "pets", "--json").out)
    assert report["ok"] is False and [p["file"] for p in report["problems"]] == ["shard-00001.safetensors"]


def test_verify_catches_a_missing_shard_and_a_damaged_stats_file(cli, root):
    (root / "pets" / "shard-00002.safetensors").unlink()
    stats = root / "pets" / "stats.safetensors"
    stats.write_bytes(stats.read_bytes()[:-8] + b"\0" * 8)
    result = cli("cache", "verify", "pets")
    assert result.code == ExitCode.INVALID_DATA and "shard-00002.safetensors" in result.err and "stats.safetensors" in result.err


def test_rm_needs_confirmation_then_removes(cli, root):
    refused = cli("cache", "rm", "pets")  # stdin is not a terminal under pytest
    assert refused.code == ExitCode.USAGE and "--yes" in refused.err and (root / "pets").exists()
    dry = cli("cache", "rm", "pets", "--dry-run", "--json")
    assert json.loads(dry.out)["removed"] is False and (root / "pets").exists()
    done = cli("cache", "rm", "pets", "--yes", "--json")
    assert done.code == 0 and json.loads(done.out)["removed"] is True and not (root / "pets").exists()
    assert cli("cache", "rm", "pets", "--yes").code == ExitCode.NOT_FOUND


def test_rm_waits_for_no_build(cli, root):
    from clipterm.cache.store import CacheLock

    with CacheLock(root / "pets"):
        result = cli("cache", "rm", "pets", "--yes")
    assert result.code == ExitCode.BUSY and (root / "pets").exists()


def test_unknown_cache_lists_what_exists(cli, root):
    result = cli("cache", "info", "petz")
    assert result.code == ExitCode.NOT_FOUND and "pets" in result.err


def test_cache_help_does_not_import_torch():
    code = "import sys; from clipterm.cli.app import main\ntry: main(['cache', 'build', '--help'])\nexcept SystemExit: pass\n" \
           "assert 'torch' not in sys.modules, 'torch imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "--images" in done.stdout and "--resume" in done.stdout
