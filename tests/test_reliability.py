"""Nothing lost, nothing wrong (reliability issue, items 5-13): damage is caught on read, every failure is one line."""

from __future__ import annotations

import errno
import json
import shutil

import pytest
from cache_helpers import pristine_cache, root_holding

from clipterm.cache import integrity, store
from clipterm.cache.build import BuildOptions, build_cache
from clipterm.cache.reader import open_cache
from clipterm.errors import ClipTermError, ExitCode


@pytest.fixture(scope="module")
def built(toy, tmp_path_factory):
    return pristine_cache(toy, tmp_path_factory, "reliability", images=12, shard_rows=4)


@pytest.fixture
def root(built, tmp_path, monkeypatch):
    """A cache root holding a fresh copy of `pets` (3 shards of 4 rows), set as $CLIPTERM_CACHE."""
    return root_holding(built, tmp_path, monkeypatch)


def flip(path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x01
    path.write_bytes(bytes(data))


def one_line_error(result) -> str:
    lines = result.err.strip().splitlines()
    assert result.code != 0 and "unexpected" not in result.err, result
    assert len(lines) <= 2 and lines[0].startswith("error:") and "Traceback" not in result.err, result
    return result.err


# --------------------------------------------------------------------------- item 5: verification on read


def test_a_flipped_byte_in_a_shard_is_refused_naming_the_file(cli, root):
    flip(root / "pets" / "shard-00000.safetensors", at=0.9)  # inside head_out's neighbours, past the header
    result = cli("attribute", "pets", "--image", "3", "--text", "a red circle")
    err = one_line_error(result)
    assert result.code == ExitCode.INVALID_DATA and "shard-00000.safetensors" in err and "clipterm cache verify" in err


def test_a_flipped_byte_in_stats_is_refused(root):
    flip(root / "pets" / "stats.safetensors", at=0.8)
    with pytest.raises(ClipTermError, match="stats.safetensors") as caught:
        open_cache("pets").stats("L1.H0")
    assert "clipterm cache verify" in caught.value.hint


@pytest.mark.parametrize("name", ["stats.safetensors", "readout.safetensors", "images.jsonl"])
def test_a_truncated_file_is_a_one_line_error(cli, root, name):
    """Item 10: a truncated stats, readout or images.jsonl is named, not an unexpected error."""
    path = root / "pets" / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    reader = open_cache("pets")
    with pytest.raises(ClipTermError, match=name.replace(".", r"\.")):
        {"stats.safetensors": lambda: reader.stats(), "readout.safetensors": lambda: reader.readout,
         "images.jsonl": reader.images}[name]()


def test_a_header_with_the_wrong_shape_is_refused_even_with_no_hash_to_compare(root):
    from safetensors.torch import load_file, save_file

    path = root / "pets" / "readout.safetensors"
    heads = load_file(str(path))["heads"]
    save_file({"heads": heads[:, :1].contiguous()}, str(path))
    manifest = json.loads((root / "pets" / "manifest.json").read_text())
    del manifest["files"]["readout.safetensors"]  # even then, the header must match the manifest's shape
    store.write_manifest(root / "pets", manifest)
    with pytest.raises(ClipTermError, match="readout.safetensors.*heads is F32"):
        open_cache("pets").readout


def test_a_fresh_cache_is_never_hashed_again_and_a_changed_file_is_hashed_once(root, monkeypatch):
    records = integrity.load_records(root / "pets")
    assert set(records) >= {"shard-00000.safetensors", "stats.safetensors", "readout.safetensors", "images.jsonl"}
    calls = []
    real = integrity.file_sha256
    monkeypatch.setattr(integrity, "file_sha256", lambda path: calls.append(path.name) or real(path))
    open_cache("pets").effects("L1.H0")
    assert calls == []  # the build remembered what it wrote
    shard = root / "pets" / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes())  # same bytes, new mtime: hashed once, then remembered
    open_cache("pets").effects("L1.H0")
    open_cache("pets").effects("L1.H0")
    assert calls == ["shard-00001.safetensors"]


def test_verified_record_is_the_caches_own_file(root):
    assert store.owned(integrity.VERIFIED)
    plan = store.plan_removal("pets", root)
    assert integrity.VERIFIED in {p.name for p in plan.files} and plan.strays == ()


def test_a_resumed_build_redoes_a_damaged_finished_shard(toy, root):
    manifest = json.loads((root / "pets" / "manifest.json").read_text())
    manifest["complete"] = False
    store.write_manifest(root / "pets", manifest)
    flip(root / "pets" / "shard-00001.safetensors", at=0.9)
    build_cache(BuildOptions(images="toy:12", name="pets", shard_rows=4), loaded=toy)
    from clipterm.cache.inventory import verify

    assert verify(root / "pets") == []


# --------------------------------------------------------------------------- item 6: a damaged manifest


def test_a_manifest_with_missing_keys_is_listed_as_damaged(cli, root):
    shutil.copytree(root / "pets", root / "broken")
    manifest = json.loads((root / "broken" / "manifest.json").read_text())
    del manifest["shape"]["heads"]
    store.write_manifest(root / "broken", manifest)
    shutil.copytree(root / "pets", root / "odd")
    manifest["shape"]["heads"] = 2
    manifest["shards"][0] = {"file": "x"}  # every key there, but a shard record without its fields
    store.write_manifest(root / "odd", manifest)
    listing = json.loads(cli("cache", "ls", "--json").out)
    by_name = {c["name"]: c for c in listing["caches"]}
    assert by_name["pets"]["images"] == 12 and "damaged" in by_name["broken"]["error"] and "damaged" in by_name["odd"]["error"]
    assert "broken" in cli("cache", "ls").out
    missing = cli("cache", "info", "petz")
    assert missing.code == ExitCode.NOT_FOUND and "pets" in missing.err
    assert cli("cache", "info", "broken").code == ExitCode.INVALID_DATA


# --------------------------------------------------------------------------- items 9, 10: a stopped build


def _fail_on_second_shard(monkeypatch, exc: BaseException) -> None:
    from clipterm.cache import build

    real, calls = store.write_shard, []

    def write_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(build.store, "write_shard", write_shard)


@pytest.mark.parametrize("exc, code, words", [
    (KeyboardInterrupt(), ExitCode.INTERRUPTED, "interrupted"),
    (OSError(errno.ENOSPC, "No space left on device"), ExitCode.ERROR, "disk is full"),
])
def test_a_stopped_build_says_what_was_kept_and_how_to_resume(cli, toy, tmp_path, monkeypatch, exc, code, words):
    _fail_on_second_shard(monkeypatch, exc)
    result = cli("cache", "build", "--images", "toy:12", "--name", "stopped", "--shard-rows", "4")
    err = one_line_error(result)
    assert result.code == code and words in err and "1 of 3 shards (4 images)" in err and "resume" in err
    monkeypatch.undo()
    monkeypatch.setenv("CLIPTERM_CACHE", str(tmp_path))


@pytest.mark.parametrize("args", [("cache", "info", "pets"), ("textspan", "pets"), ("cache", "verify", "pets")])
def test_ctrl_c_in_any_command_says_nothing_was_lost_and_exits_130(cli, root, monkeypatch, args):
    """Typer turns a KeyboardInterrupt into a silent exit 130; every command now says so in one line."""
    from clipterm.cache import reader

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(reader, "resolve", interrupted)  # where every command that names a cache starts
    result = cli(*args)
    err = one_line_error(result)
    assert result.code == ExitCode.INTERRUPTED and "interrupted: nothing was lost" in err
    assert f"rerun the same `clipterm {' '.join(args[:-1])}` command" in err


def test_ctrl_c_at_the_rm_prompt_removes_nothing(cli, root, monkeypatch):
    import importlib
    import sys

    import typer

    def ctrl_c(*_args, **_kwargs):
        raise KeyboardInterrupt

    termui = importlib.import_module(typer.confirm.__module__)  # typer vendors click's prompts
    monkeypatch.setattr(termui, "visible_prompt_func", ctrl_c)
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True, raising=False)
    result = cli("cache", "rm", "pets")
    assert result.code == ExitCode.INTERRUPTED and "Aborted" not in result.err
    assert "interrupted at the prompt, before anything was changed" in one_line_error(result)
    assert (root / "pets" / "manifest.json").is_file()


def test_every_command_turns_ctrl_c_into_one_line():
    import typer

    from clipterm.cli.app import app
    from clipterm.cli.common import clean_interrupts

    command = clean_interrupts(typer.main.get_command(app))
    leaves = [c for sub in command.commands.values() for c in getattr(sub, "commands", {sub.name: sub}).values()]
    assert len(leaves) > 20 and all(getattr(c, "_interrupts", False) for c in leaves)


def test_a_cache_dir_that_is_a_file_is_a_one_line_error(cli, tmp_path):
    (tmp_path / "afile").write_text("x")
    for args in (["cache", "ls"], ["cache", "info", "pets"], ["cache", "build", "--images", "toy:4"]):
        result = cli(*args, "--cache-dir", str(tmp_path / "afile"))
        assert result.code == ExitCode.USAGE and "is a file, not a folder" in one_line_error(result)


def test_a_theme_colour_that_is_not_a_colour(tmp_path, monkeypatch):
    from clipterm.tui.themes import load_theme

    monkeypatch.setenv("CLIPTERM_CONFIG", str(tmp_path))
    (tmp_path / "themes").mkdir()
    (tmp_path / "themes" / "bad.toml").write_text('primary = "notacolour"\n')
    with pytest.raises(ClipTermError, match="primary = 'notacolour' is not a colour"):
        load_theme("bad")


# --------------------------------------------------------------------------- item 11: hints that say the right thing


def _interrupt(root):
    manifest = json.loads((root / "pets" / "manifest.json").read_text())
    manifest["complete"] = False
    store.write_manifest(root / "pets", manifest)


def test_verify_of_an_interrupted_build_says_resume_not_force(cli, root):
    _interrupt(root)
    result = cli("cache", "verify", "pets")
    assert result.code == ExitCode.INVALID_DATA and "--force" not in result.err and "resume" in result.err


def test_commands_during_a_live_build_say_a_build_is_running(cli, root):
    _interrupt(root)
    stopped = cli("attribute", "pets", "--image", "0", "--text", "red")
    assert "was stopped" in stopped.err and "resume" in stopped.err
    with store.CacheLock(root / "pets"):
        live = cli("attribute", "pets", "--image", "0", "--text", "red")
        assert live.code == ExitCode.BUSY and "being built" in live.err and "stopped" not in live.err
        assert "running" in cli("cache", "verify", "pets").err


def test_a_foreign_manifest_is_never_told_to_rebuild_with_force(cli, root):
    (root / "theirs").mkdir()
    (root / "theirs" / "manifest.json").write_text('{"name": "my-web-app"}')
    for args in (["cache", "verify", "theirs"], ["cache", "info", "theirs"], ["cache", "rm", "theirs", "--yes"],
                 ["cache", "build", "--images", "toy:4", "--name", "theirs"]):
        result = cli(*args)
        assert result.code != 0 and "--force" not in result.err and "not a clipterm cache" in result.err, args


# --------------------------------------------------------------------------- item 12: ./cache only in a checkout


def test_dot_cache_is_the_root_only_in_a_checkout_of_clipterm(tmp_path, monkeypatch):
    from clipterm import locations

    monkeypatch.delenv("CLIPTERM_CACHE")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cache").mkdir()
    assert locations.cache_root()[0] != tmp_path / "cache"  # any project with a cache/ folder
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "someone-else"\n')
    assert locations.cache_root()[0] != tmp_path / "cache"
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "clipterm"\n')
    assert locations.cache_root() == ((tmp_path / "cache").resolve(), "./cache (a checkout of clipterm)")


# --------------------------------------------------------------------------- item 13: values that are not values


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_floats_are_refused(cli, value):
    result = cli("search", "--target", "text:red", "--lambda", value, "--steps", "1")
    assert result.code == ExitCode.USAGE and "not a finite number" in result.err


def test_every_float_option_is_checked():
    import typer

    from clipterm.cli.app import app
    from clipterm.cli.common import finite_floats

    command = finite_floats(typer.main.get_command(app))
    floats = [p for sub in command.commands.values() for c in getattr(sub, "commands", {sub.name: sub}).values()
              for p in c.params if getattr(getattr(p, "type_descriptor", None), "annotation", None) is float]
    assert floats and all(getattr(p, "_finite", False) for p in floats)


def test_a_key_name_that_is_not_a_key_is_refused(tmp_path):
    from clipterm.tui.config import load_keymap

    config = tmp_path / "config.toml"
    config.write_text('[keys]\n"tree.down" = "notakey!!"\n')
    with pytest.raises(ClipTermError, match="'notakey!!'.*is not a key name"):
        load_keymap({"tree.down"}, config)
    config.write_text('[keys]\n"tree.down" = "n, ctrl+down, f5, question_mark"\n')
    assert load_keymap({"tree.down"}, config) == {"tree.down": "n,ctrl+down,f5,question_mark"}


# --------------------------------------------------------------------------- item 7: file names that are not UTF-8


def test_a_file_name_that_is_not_utf8_is_kept_exactly(toy, tmp_path, monkeypatch):
    import os

    from PIL import Image

    from clipterm.cache.neurons import cache_source
    from clipterm.inputs.images import item_path

    folder = tmp_path / "photos"
    (folder / "cats").mkdir(parents=True)
    odd = os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes: undecodable as UTF-8
    for name in ("plain.png", odd):
        Image.new("RGB", (40, 40), (200, 30, 30)).save(folder / "cats" / name)
    monkeypatch.setenv("CLIPTERM_CACHE", str(tmp_path / "root"))
    build_cache(BuildOptions(images=str(folder), name="odd", shard_rows=1), loaded=toy)
    reader = open_cache("odd")
    rows = reader.images()
    assert [item_path(row) for row in rows] == [str(folder / "cats" / odd), str(folder / "cats" / "plain.png")]
    assert rows[0]["path"].endswith("caf\\xe9.png") and rows[0]["path_bytes"] == os.fsencode(item_path(rows[0])).hex()
    assert os.path.isfile(cache_source(reader).items[0].path)
    # An interrupted build resumes, and a finished one is recognised as such
    store.write_manifest(reader.path, {**reader.manifest, "complete": False})
    assert build_cache(BuildOptions(images=str(folder), name="odd", shard_rows=1), loaded=toy).images == 2
    assert build_cache(BuildOptions(images=str(folder), name="odd", shard_rows=1), loaded=toy).already_complete


# --------------------------------------------------------------------------- item 8: a huge toy world


def test_a_huge_toy_source_is_lazy_and_capped(cli):
    import time

    from clipterm.inputs.images import TOY_MAX, open_source, toy_source

    start = time.perf_counter()
    source = open_source("toy:1000000000")
    assert len(source) == 10**9 and time.perf_counter() - start < 1.0  # nothing drawn yet
    assert source.items[123_456_789].id == "toy:0/123456789" and set(source.items[5].labels) >= {"colour", "shape"}
    assert [item.to_json() for item in toy_source(3).items] == [item.to_json() for item in toy_source(3).items[:3]]
    too_many = cli("cache", "build", "--images", f"toy:{TOY_MAX + 1}")
    assert too_many.code == ExitCode.USAGE and "more scenes than the synthetic world has" in one_line_error(too_many)
    evaluation = cli("toy", "eval", "--n", "1000000000")
    assert evaluation.code == ExitCode.USAGE and "at most 200,000" in one_line_error(evaluation)


def test_the_toy_fingerprint_is_unchanged_by_lazy_labels():
    import hashlib

    from clipterm.inputs.images import toy_source

    source = toy_source(5, seed=3)
    digest = hashlib.sha256(b"toy\n3\n")
    for i in range(5):
        digest.update(f"toy:3/{i}\n".encode())
    assert source.fingerprint() == digest.hexdigest()  # so existing toy caches still resume and count as complete
