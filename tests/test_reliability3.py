"""Every input bounded (reliability round 3, the rest of issue 27): hostile webdataset tars, images of extreme
aspect, size options, odd cache roots and names, and options that would be silently ignored. Each bad input is a
one-line error with a hint, or an input skipped with a reason the cache records; never "unexpected ..."."""

from __future__ import annotations

import errno
import io
import json
import os
import resource
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_shards import add, build, png  # tests/ is on sys.path (rootdir conftest)

from clipterm.errors import ClipTermError, ExitCode
from clipterm.inputs.images import SkipImage, decode, open_source
from clipterm.inputs.shards import load_by_id


def one_line(result) -> str:
    """The first line of a refusal: an `error:` line, no traceback, no "unexpected"."""
    assert result.code not in (0, ExitCode.ERROR) and "unexpected" not in result.err and "Traceback" not in result.err, result
    lines = result.err.strip().splitlines()
    assert lines[0].startswith("error:") and any(line.startswith("hint:") for line in lines[1:]), result.err
    return lines[0]


def skip_reasons(cache) -> dict[str, str]:
    """Skipped input -> its recorded reason, by the member (or sample) its id names."""
    rows = cache.images()
    return {rows[s["index"]]["id"].partition(".tar#")[2]: s["reason"] for s in cache.manifest["skipped"]}


def tar_of(path: Path, members: list[tuple[str, bytes]], **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT, **options) as tar:
        for name, data in members:
            add(tar, name, data)
    return path


# --------------------------------------------------------------------------- webdataset tars (medium)


def test_a_tar_member_declaring_a_terabyte_is_skipped_with_a_reason(toy, tmp_path):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for key, seed in (("a", 1), ("b", 2)):
            add(tar, f"{key}.png", png(seed))
            add(tar, f"{key}.cls", str(seed).encode())
        end = tar.offset  # where the end-of-archive blocks start
    huge = tarfile.TarInfo("c.png")
    huge.size = 10**12  # the header says a terabyte; 1 KiB follows
    shard = tmp_path / "wds" / "000000.tar"
    shard.parent.mkdir()
    shard.write_bytes(buffer.getvalue()[:end] + huge.tobuf(tarfile.GNU_FORMAT) + b"\x89PNG" + bytes(1020))
    cache = build(toy, tmp_path / "root", "huge", str(shard))
    assert cache.n == 2
    reason = skip_reasons(cache)["c.[png]"]
    assert "1,000,000,000,000 bytes" in reason and "truncated" in reason, reason


def test_a_5000_digit_cls_label_is_an_unknown_label(tmp_path):
    shard = tar_of(tmp_path / "000000.tar", [("a.png", png(1)), ("a.cls", b"3"), ("b.png", png(2)), ("b.cls", b"9" * 5000)])
    source = open_source(str(shard))
    assert source.tasks == {"class": ["3"]}
    assert [item.labels["class"] for item in source.items] == [0, -1]  # the image is kept, its label unknown


def test_a_deeply_nested_json_label_is_an_unknown_label(tmp_path):
    deep = ("[" * 100_000 + "]" * 100_000).encode()
    shard = tar_of(tmp_path / "000000.tar", [("a.png", png(1)), ("a.json", b'{"cls": "cat"}'),
                                             ("b.png", png(2)), ("b.json", deep)])
    source = open_source(str(shard))
    assert source.tasks == {"class": ["cat"]} and [item.labels["class"] for item in source.items] == [0, -1]


def test_a_member_name_that_is_not_utf8_is_read(toy, tmp_path):
    odd = b"caf\xe9.png".decode("utf-8", "surrogateescape")  # Latin-1 bytes in a tar written on another system
    shard = tar_of(tmp_path / "wds" / "000000.tar", [("a.png", png(1)), (odd, png(2))],
                   encoding="utf-8", errors="surrogateescape")
    cache = build(toy, tmp_path / "root", "odd", str(shard))
    assert cache.n == 2 and cache.manifest["skipped"] == []
    ids = [row["id"] for row in cache.images()]
    assert all(i.encode("utf-8") for i in ids) and ids[1].endswith("#caf\\xe9.png"), ids
    assert load_by_id(ids[1], 40).size == (48, 40)


def test_a_member_gone_since_the_build_is_one_line(toy, tmp_path, cli):
    shard = tar_of(tmp_path / "wds" / "000000.tar", [("a.png", png(1)), ("b.png", png(2))])
    cache = build(toy, tmp_path / "root", "gone", str(shard))
    tar_of(shard, [("b.png", png(2))])  # the shard rewritten without a.png, under the cache
    with pytest.raises(SkipImage, match="a.png.*changed since"):
        load_by_id(cache.images()[0]["id"], 40)
    assert load_by_id(cache.images()[1]["id"], 40).size == (48, 40)  # b.png moved: read at its new offset
    err = one_line(cli("spatial", "row:0", "--cache", str(cache.path), "--component", "L0.H0", "--model", "toy"))
    assert "a.png" in err


def test_a_brace_range_of_100_million_shards_is_refused_without_expanding_it(tmp_path):
    spec = str(tmp_path / "{000000..99999999}.tar")
    code = ("from clipterm.errors import ClipTermError\nfrom clipterm.inputs.shards import shard_paths\n"
            f"try:\n    shard_paths({spec!r})\nexcept ClipTermError as exc:\n    print(exc)\n")

    def one_gigabyte() -> None:  # expanding it in full takes 3 GB: it must fail long before
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, preexec_fn=one_gigabyte,
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)})
    assert done.returncode == 0 and "100,000,000 shards" in done.stdout and "1,000,000" in done.stdout, done
    from clipterm.inputs.shards import shard_paths

    with pytest.raises(ClipTermError, match="no such shard"):  # a bounded range is still checked shard by shard
        shard_paths(str(tmp_path / "{000000..000999}.tar"))


# --------------------------------------------------------------------------- images of extreme aspect


def test_an_image_of_extreme_aspect_is_refused_before_resizing(tmp_path, cli):
    thin = tmp_path / "thin.png"
    Image.fromarray(np.zeros((150_000, 1, 3), dtype=np.uint8)).save(thin)
    assert thin.stat().st_size < 2000  # a few hundred bytes that would resize to gigabytes
    with pytest.raises(SkipImage, match="aspect"):
        decode(thin, 224)
    wide = tmp_path / "wide.png"
    Image.fromarray(np.zeros((1, 20_000, 3), dtype=np.uint8)).save(wide)
    err = one_line(cli("search", "--target", f"image:{wide}", "--model", "toy", "--steps", "1"))
    assert "aspect" in err and "wide.png" in err


# --------------------------------------------------------------------------- size options


@pytest.fixture(scope="module")
def small_cache(toy, tmp_path_factory):
    from clipterm.cache.build import BuildOptions, build_cache

    root = tmp_path_factory.mktemp("bounds")
    build_cache(BuildOptions(images="toy:24", name="small", cache_dir=str(root), dtype="float32", batch_size=24), loaded=toy)
    return root / "small"


@pytest.mark.parametrize("args, option, bound", [
    (("visualise", "-t", "text:blue", "--steps", "1", "--size", "1000000"), "--size", "4,096"),
    (("visualise", "-t", "text:blue", "--steps", "1", "--size", "16", "--diverse", "65"), "--diverse", "64"),
    (("ablate", "{cache}", "--draws", "1000000000000"), "--draws", "1,000,000"),
    (("cache", "build", "--images", "toy:8", "--name", "b", "--batch-size", "4097"), "--batch-size", "4,096"),
    (("cache", "build", "--images", "toy:8", "--name", "s", "--shard-rows", "16385"), "--shard-rows", "16,384"),
    (("search", "--target", "text:blue", "--model", "toy", "--steps", "1", "--beam", "65"), "--beam", "64"),
    (("images", "{cache}", "--component", "L0.H0", "--size", "513"), "--size", "512"),
])
def test_size_options_are_bounded_by_memory(cli, small_cache, tmp_path, args, option, bound):
    args = [a.replace("{cache}", str(small_cache)) for a in args]
    if args[0] == "visualise":
        args += ["--out", str(tmp_path / "out")]
    err = one_line(cli(*args))
    assert option in err and f"at most {bound}" in err, err


def test_every_size_like_option_has_a_bound():
    import typer

    from clipterm.cli.app import app
    from clipterm.cli.common import BOUNDS, UNBOUNDED

    found = set()

    def walk(command, path):
        for param in command.params:
            if param.type_descriptor.annotation in (int, int | None) and param.opts[0].startswith("--"):
                found.add((path, param.opts[0]))
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, f"{path} {name}".strip())

    walk(typer.main.get_command(app), "")
    assert found == set(BOUNDS) | set(UNBOUNDED), found ^ (set(BOUNDS) | set(UNBOUNDED))
    assert {("visualise", "--size"), ("visualise", "--diverse"), ("ablate", "--draws")} <= set(BOUNDS)


# --------------------------------------------------------------------------- cache names and roots


def test_a_300_character_cache_name_is_one_line(cli):
    err = one_line(cli("cache", "build", "--images", "toy:4", "--name", "a" * 300))
    assert "300" in err and "255" in err


def test_a_read_only_cache_root_is_one_line(cli, tmp_path, monkeypatch):
    root = tmp_path / "read-only"
    root.mkdir()
    root.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: make the folder refuse as a read-only mount would
        real = os.mkdir

        def mkdir(path, *args, **kwargs):
            if Path(path).parent == root:
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real(path, *args, **kwargs)

        monkeypatch.setattr(os, "mkdir", mkdir)
    try:
        err = one_line(cli("cache", "build", "--images", "toy:4", "--name", "x", "--cache-dir", str(root)))
    finally:
        root.chmod(0o755)
    assert str(root) in err and "Permission denied" in err


def test_a_cache_root_under_a_regular_file_is_one_line(cli, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    err = one_line(cli("cache", "build", "--images", "toy:4", "--name", "x", "--cache-dir", str(tmp_path / "notes.txt" / "caches")))
    assert "notes.txt" in err and "not a folder" in err
    assert (tmp_path / "notes.txt").read_text() == "mine"


# --------------------------------------------------------------------------- low


def test_link_members_in_a_tar_are_skipped_with_a_reason(toy, tmp_path):
    shard = tmp_path / "wds" / "000000.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tar:
        add(tar, "a.png", png(1))
        for name, kind in (("b.png", tarfile.SYMTYPE), ("c.png", tarfile.LNKTYPE)):
            link = tarfile.TarInfo(name)
            link.type, link.linkname = kind, "a.png"
            tar.addfile(link)
    cache = build(toy, tmp_path / "root", "links", str(shard))
    reasons = skip_reasons(cache)
    assert cache.n == 1 and len(reasons) == 2, reasons
    assert "symbolic link" in reasons["b.[png]"] and "hard link" in reasons["c.[png]"], reasons


def test_repeated_keys_in_a_tar_are_skipped_with_a_reason(toy, tmp_path):
    shard = tar_of(tmp_path / "wds" / "000000.tar", [("a.png", png(1)), ("a.cls", b"0"), ("b.png", png(2)),
                                                     ("a.png", png(3)), ("c.png", png(4)), ("c.png", png(5))])
    cache = build(toy, tmp_path / "root", "repeats", str(shard))
    reasons = skip_reasons(cache)
    assert cache.n == 3 and len(reasons) == 2, reasons
    assert all("repeat" in reason for reason in reasons.values()), reasons
    first = [row for row in cache.images() if row["id"].endswith("#a.png")]
    assert len(first) == 1 and np.array_equal(np.asarray(load_by_id(first[0]["id"], 40)), np.asarray(Image.open(io.BytesIO(png(1)))))


def test_a_member_named_with_a_hash_is_read(toy, tmp_path):
    shard = tar_of(tmp_path / "wds" / "000000.tar", [("x#y.png", png(1)), ("x#y.cls", b"4"), ("z.png", png(2)), ("z.cls", b"5")])
    cache = build(toy, tmp_path / "root", "hash", str(shard))
    assert cache.n == 2 and cache.manifest["skipped"] == [] and cache.tasks == {"class": ["4", "5"]}
    assert load_by_id(cache.images()[0]["id"], 40).size == (48, 40)


def test_visualise_targets_sharing_80_leading_characters_write_different_files(cli, tmp_path):
    out, stem = tmp_path / "out", "text:" + "a red shape " * 8
    for tail in ("on the left", "on the right"):
        result = cli("visualise", "-t", stem + tail, "--model", "toy", "--steps", "1", "--size", "16", "--out", str(out), "--json")
        assert result.code == 0, result
    records = sorted(out.glob("*.json"))
    assert len(records) == 2 and len(list(out.glob("*.png"))) == 2
    assert {json.loads(p.read_text())["target"] for p in records} == {stem + "on the left", stem + "on the right"}


@pytest.mark.parametrize("images, option", [("toy:4", "--label-column"), ("toy:4", "--label-key"), ("toy:4", "--image-column"),
                                            ("{tar}", "--label-column")])
def test_an_option_the_source_would_ignore_is_refused(cli, tmp_path, images, option):
    images = images.replace("{tar}", str(tar_of(tmp_path / "000000.tar", [("a.png", png(1))])))
    err = one_line(cli("cache", "build", "--images", images, "--name", "ignored", option, "label"))
    assert option in err


def test_a_task_with_no_labelled_rows_is_named(cli, toy, tmp_path):
    shard = tar_of(tmp_path / "wds" / "000000.tar", [("a.png", png(1)), ("b.png", png(2)),  # the labelled image is broken
                                                     ("c.jpg", b"not a JPEG"), ("c.cls", b"7")])
    cache = build(toy, tmp_path / "root", "unlabelled", str(shard))
    assert cache.tasks == {"class": ["7"]} and cache.n == 2
    err = one_line(cli("ablate", str(cache.path), "--task", "class"))
    assert "'class'" in err and "label" in err
