"""Nothing overwritten (reliability round 3): outputs never go through a symlink, and a user's file is replaced
only with --force, after being named."""

from __future__ import annotations

import json

import pytest

from clipterm.files import atomic_write
from clipterm.toyworld.train import MODEL_FILES

VISUALISE = ("visualise", "-t", "text:blue", "--model", "toy", "--steps", "2", "--size", "16")


def one_line(result) -> str:
    assert result.code != 0 and "unexpected" not in result.err and "Traceback" not in result.err, result
    assert result.err.strip().splitlines()[0].startswith("error:"), result.err
    return result.err


def test_visualise_never_writes_through_a_symlink_in_out(cli, tmp_path):
    victim, out = tmp_path / "victim.txt", tmp_path / "out"
    victim.write_text("precious")
    out.mkdir()
    (out / "text-blue-1.png").symlink_to(victim)
    err = one_line(cli(*VISUALISE, "--out", str(out)))
    assert "symlink" in err and "text-blue-1.png" in err and victim.read_text() == "precious"
    forced = cli(*VISUALISE, "--out", str(out), "--force")
    assert forced.code == 0, forced.err
    assert victim.read_text() == "precious"  # the link was replaced, its target left alone
    assert not (out / "text-blue-1.png").is_symlink() and (out / "text-blue-1.png").read_bytes()[:4] == b"\x89PNG"


def test_visualise_replaces_its_own_earlier_files_but_not_a_users(cli, tmp_path):
    out = tmp_path / "out"
    assert cli(*VISUALISE, "--out", str(out)).code == 0
    assert cli(*VISUALISE, "--out", str(out)).code == 0  # a rerun replaces what the first run wrote
    (out / "text-blue.json").write_text("my notes")
    err = one_line(cli(*VISUALISE, "--out", str(out)))
    assert "text-blue.json" in err and "--force" in err and (out / "text-blue.json").read_text() == "my notes"


def test_targets_sharing_80_leading_characters_write_different_files(cli, tmp_path):
    from clipterm.cli.visualise import slug

    stem = "text:" + "a red shape " * 8
    first, second = slug(stem + "on the left"), slug(stem + "on the right")
    assert first != second and len(first) <= 80 and len(second) <= 80


def test_atomic_write_replaces_a_link_and_never_its_target(tmp_path):
    victim, link = tmp_path / "victim", tmp_path / "out.json"
    victim.write_text("precious")
    link.symlink_to(victim)
    (tmp_path / f"out.json.{__import__('os').getpid()}.tmp").symlink_to(victim)  # a planted temporary name
    atomic_write(link, b"new")
    assert victim.read_text() == "precious" and link.read_bytes() == b"new" and not link.is_symlink()


@pytest.fixture
def trained(tmp_path):
    """A folder that holds a model, as `toy train` leaves one."""
    folder = tmp_path / "model"
    folder.mkdir()
    for name in MODEL_FILES:
        (folder / name).write_text(f"an hour of training: {name}")
    return folder


def test_toy_train_never_replaces_a_model_without_force(cli, trained):
    err = one_line(cli("toy", "train", str(trained), "--steps", "1", "--batch-size", "8"))
    assert "open_clip_model.safetensors" in err and "--force" in err
    assert (trained / MODEL_FILES[0]).read_text().startswith("an hour of training")


def test_toy_ship_never_replaces_a_model_without_force(cli, trained, tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    (source / "training.json").write_text("{}")
    err = one_line(cli("toy", "ship", str(source), str(trained)))
    assert "open_clip_model.safetensors" in err and "--force" in err
    assert (trained / MODEL_FILES[0]).read_text().startswith("an hour of training")


def test_toy_render_never_replaces_a_users_labels(cli, tmp_path):
    out = tmp_path / "scenes"
    out.mkdir()
    (out / "labels.jsonl").write_text("mine\n")
    err = one_line(cli("toy", "render", str(out), "--n", "3"))
    assert "labels.jsonl" in err and (out / "labels.jsonl").read_text() == "mine\n"
    assert cli("toy", "render", str(out), "--n", "3", "--force").code == 0
    assert len((out / "labels.jsonl").read_text().splitlines()) == 3


def test_toy_render_never_writes_through_a_linked_class_folder(cli, tmp_path):
    elsewhere, out = tmp_path / "elsewhere", tmp_path / "scenes"
    elsewhere.mkdir()
    out.mkdir()
    first = json.loads(cli("toy", "render", str(tmp_path / "probe"), "--n", "1", "--json").out)
    (out / next(iter(first["classes"]))).symlink_to(elsewhere, target_is_directory=True)
    err = one_line(cli("toy", "render", str(out), "--n", "1", "--force"))
    assert "symlink" in err and not any(elsewhere.iterdir())


@pytest.mark.parametrize("command", [("toy", "train", "{out}", "--steps", "1"), ("toy", "ship", "{src}", "{out}"),
                                     ("toy", "render", "{out}", "--n", "2"), (*VISUALISE, "--out", "{out}")])
def test_an_output_folder_that_is_a_file_is_one_line(cli, tmp_path, command):
    src, out = tmp_path / "src", tmp_path / "a-file"
    src.mkdir()
    (src / "training.json").write_text("{}")
    out.write_text("keep me")
    err = one_line(cli(*[part.format(out=out, src=src) for part in command]))
    assert "is a file" in err and out.read_text() == "keep me"
