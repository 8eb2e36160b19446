"""`cache rm` and `cache build` never delete or overwrite what is not a clipterm cache (reliability issue, items 1-4)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from cache_helpers import pristine_cache, root_holding

from clipterm.cache import store
from clipterm.cache.build import BuildOptions, build_cache
from clipterm.cache.store import CacheLock
from clipterm.errors import ClipTermError, ExitCode


@pytest.fixture(scope="module")
def built(toy, tmp_path_factory):
    return pristine_cache(toy, tmp_path_factory, "rm-safety", images=8, shard_rows=4)


@pytest.fixture
def root(built, tmp_path, monkeypatch):
    """A cache root `tmp/root` holding a copy of `pets`, set as $CLIPTERM_CACHE; the test runs from `tmp`."""
    monkeypatch.chdir(tmp_path)
    return root_holding(built, tmp_path / "root", monkeypatch)


def test_rm_refuses_a_folder_with_a_foreign_manifest(cli, root, tmp_path):
    """Item 1: a folder holding someone's `manifest.json` is not a cache, whatever path names it."""
    folder = tmp_path / "d"
    (folder / "src").mkdir(parents=True)
    (folder / "manifest.json").write_text("{}")
    (folder / "src" / "a.js").write_text("x")
    for given in ("./d", str(folder)):
        result = cli("cache", "rm", given, "--yes")
        assert result.code != 0 and len(result.err.strip().splitlines()) <= 2, result.err
        assert (folder / "src" / "a.js").read_text() == "x"
    assert "not a clipterm cache" in cli("cache", "rm", str(folder), "--yes").err


def test_rm_dot_dot_never_reaches_the_root_or_above(cli, root, tmp_path):
    """Item 2: `cache rm ..` with a manifest above the root removes nothing."""
    (tmp_path / "manifest.json").write_text("{}")
    for given in ("..", ".", str(root), str(tmp_path)):
        result = cli("cache", "rm", given, "--yes", "--cache-dir", str(root))
        assert result.code != 0, given
    assert (root / "pets" / "manifest.json").is_file() and (tmp_path / "manifest.json").is_file()
    # Even a real cache manifest in the root itself does not make the root removable.
    shutil.copy(root / "pets" / "manifest.json", root / "manifest.json")
    result = cli("cache", "rm", str(root), "--yes")
    assert result.code == ExitCode.USAGE and "cache root" in result.err and (root / "pets").is_dir()


def test_rm_of_a_relative_path_outside_the_root_needs_an_absolute_path(cli, root, tmp_path):
    shutil.copytree(root / "pets", tmp_path / "elsewhere")
    result = cli("cache", "rm", "elsewhere", "--yes")
    assert result.code == ExitCode.USAGE and "absolute path" in result.err and (tmp_path / "elsewhere").is_dir()
    done = cli("cache", "rm", str(tmp_path / "elsewhere"), "--yes")
    assert done.code == 0 and not (tmp_path / "elsewhere").exists()


def test_rm_keeps_a_stray_file_and_says_so(cli, root):
    (root / "pets" / "notes.txt").write_text("mine")
    result = cli("cache", "rm", "pets", "--yes", "--json")
    report = json.loads(result.out)
    assert result.code == 0 and report["cache"] == "pets" and report["path"] == str((root / "pets").resolve())
    assert report["kept"] == ["notes.txt"] and report["folder_removed"] is False
    assert sorted(p.name for p in (root / "pets").iterdir()) == ["notes.txt"]


def test_rm_prompt_names_the_cache_its_absolute_path_and_size(root, monkeypatch):
    from clipterm.cache.store import plan_removal

    plan = plan_removal("pets", root)
    assert plan.name == "pets" and plan.path == (root / "pets").resolve() and plan.bytes > 0
    assert plan.files[-1].name in ("manifest.json", ".lock") and plan.strays == ()


def test_rm_refuses_a_symlinked_cache(cli, root, tmp_path):
    os.symlink(root / "pets", root / "alias")
    result = cli("cache", "rm", "alias", "--yes")
    assert result.code == ExitCode.USAGE and "symbolic link" in result.err
    assert (root / "pets" / "manifest.json").is_file() and (root / "alias").is_symlink()


def test_rm_refuses_a_cache_whose_manifest_lacks_keys(cli, root):
    manifest = json.loads((root / "pets" / "manifest.json").read_text())
    del manifest["shape"]
    store.write_manifest(root / "pets", manifest)
    result = cli("cache", "rm", "pets", "--yes")
    assert result.code == ExitCode.INVALID_DATA and "by hand" in result.err and (root / "pets").is_dir()


def test_a_symlinked_lock_is_never_followed(root, tmp_path):
    """Item 3: the lock's target is neither truncated nor written."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (root / "pets" / ".lock").unlink(missing_ok=True)
    os.symlink(victim, root / "pets" / ".lock")
    with pytest.raises(ClipTermError, match="symbolic link"):
        CacheLock(root / "pets").acquire()
    assert victim.read_text() == "precious"


def test_build_refuses_an_existing_folder_that_is_not_a_cache(toy, root):
    """Item 4: a user's folder under the root keeps its images.jsonl, with and without --force."""
    folder = root / "mine"
    folder.mkdir()
    (folder / "images.jsonl").write_text("my own data\n")
    for force in (False, True):
        with pytest.raises(ClipTermError, match="neither empty nor a clipterm cache"):
            build_cache(BuildOptions(images="toy:4", name="mine", cache_dir=str(root), force=force), loaded=toy)
    assert (folder / "images.jsonl").read_text() == "my own data\n" and sorted(os.listdir(folder)) == ["images.jsonl"]


def test_build_refuses_a_folder_with_a_foreign_manifest_without_suggesting_force(toy, root):
    folder = root / "other"
    folder.mkdir()
    (folder / "manifest.json").write_text('{"schema": "someone-else/1"}')
    with pytest.raises(ClipTermError) as info:
        build_cache(BuildOptions(images="toy:4", name="other", cache_dir=str(root), force=True), loaded=toy)
    assert "not a clipterm cache" in info.value.message and "--force" not in (info.value.hint or "")
    assert json.loads((folder / "manifest.json").read_text()) == {"schema": "someone-else/1"}
