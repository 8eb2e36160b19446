"""The cache build end to end: exact, robust to bad inputs, resumable after SIGKILL, equal under torchrun, locked."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from test_images import write_bad_images, write_odd_images  # tests/ is on sys.path (rootdir conftest)
from tower_helpers import save_model_folder, tiny_vit_config

from clipterm.cache.build import BuildOptions, build_cache
from clipterm.cache.reader import CacheReader, check_model
from clipterm.errors import ClipTermError, ExitCode
from clipterm.toyworld.evaluate import model_world

TOY_WORLD = model_world("toy")  # the world the shipped toy was trained on: what `toy:N` draws for it

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}


def components(reader: CacheReader) -> list[str]:
    shape = reader.shape
    return ["embed", "bias", *[f"L{l}.H{h}" for l in range(shape.layers) for h in range(shape.heads)],
            *[f"L{l}.MLP" for l in range(shape.layers)]]


def contract_error(reader: CacheReader) -> float:
    """Largest relative gap of `embed + bias + Σ head_out @ readout + Σ mlps` to `image_embeds`."""
    total = sum(reader.effects(name) for name in components(reader))
    embeds = reader.image_embeds()
    return float(((total - embeds).norm(dim=-1) / embeds.norm(dim=-1)).max())


def assert_same_cache(a: CacheReader, b: CacheReader, atol: float = 1e-6) -> None:
    """DESIGN.md's equality: same rows per image in index order, values within fp tolerance, stats within 1e-9."""
    assert torch.equal(a.index(), b.index())
    assert a.manifest["skipped"] == b.manifest["skipped"] and a.images() == b.images()
    for task in a.tasks:
        assert torch.equal(a.labels(task), b.labels(task)), task
    assert torch.allclose(a.image_embeds(), b.image_embeds(), atol=atol)
    for name in components(a):
        assert torch.allclose(a.effects(name), b.effects(name), atol=atol), name
    stats_a, stats_b = a.stats(), b.stats()
    assert stats_a.keys() == stats_b.keys()
    for key in stats_a:
        scale = stats_b[key].abs().max().clamp_min(1e-300)
        assert (stats_a[key] - stats_b[key]).abs().max() / scale <= 1e-9, key


def build(toy, root, name: str, images: str = "toy:24", **options) -> CacheReader:
    build_cache(BuildOptions(images=images, name=name, cache_dir=str(root), **options), loaded=toy)
    return CacheReader(Path(root) / name)


def test_fp32_cache_is_exact_and_in_input_order(toy, tmp_path):
    from clipterm.toyworld import world
    from clipterm.vit import decompose

    # batches of 7 straddle shards of 10 rows: rows must still land in their own shard, in order
    cache = build(toy, tmp_path, "exact", dtype="float32", shard_rows=10, batch_size=7, neurons=True, tokens="L5")
    assert cache.n == 24 and [r["rows"] for r in cache.manifest["shards"]] == [10, 10, 4]
    assert contract_error(cache) < 1e-5
    from PIL import Image

    pixels = torch.stack([toy.preprocess(Image.fromarray(world.render(world.scene_at(0, i, TOY_WORLD))[0])) for i in range(24)])
    with torch.no_grad():
        direct = decompose.decompose(toy.model, pixels, neurons=True, token_layers=[5])
        embeds = toy.model.encode_image(pixels)
    assert torch.allclose(cache.image_embeds(), embeds, atol=1e-5)
    assert torch.allclose(cache.head_out("L2.H5"), direct.head_out[:, 2, 5], atol=1e-6)
    assert torch.allclose(cache.neurons("L1"), direct.neurons[:, 1], atol=1e-5)
    assert torch.allclose(cache.tokens("L5"), direct.tokens[5].transpose(0, 1), atol=1e-6)
    assert torch.allclose(cache.readout, decompose.readout(toy.model), atol=1e-7)


def test_default_fp16_cache_is_within_1e2(toy, tmp_path):
    from safetensors import safe_open

    cache = build(toy, tmp_path, "half")
    assert cache.manifest["dtype"] == "float16" and contract_error(cache) < 1e-2
    with safe_open(str(cache.path / "shard-00000.safetensors"), "pt") as f:
        assert f.get_slice("head_out").get_dtype() == "F16" and f.get_slice("image_embeds").get_dtype() == "F32"
    again = build_cache(BuildOptions(images="toy:24", name="half", cache_dir=str(tmp_path)), loaded=toy)
    assert again.already_complete and again.built == 0


def test_bad_inputs_are_skipped_with_reasons_and_odd_ones_kept(cli, tmp_path):
    reasons = write_bad_images(tmp_path / "images" / "broken")
    kept = write_odd_images(tmp_path / "images" / "odd")
    # shard-rows 3 puts the three broken files (sorted first) alone in shard 0, which then holds zero rows
    result = cli("cache", "build", "--images", str(tmp_path / "images"), "--name", "mixed", "--shard-rows", "3", "--json")
    assert result.code == 0, result
    summary = json.loads(result.out)
    assert summary["schema"] == "clipterm.cache.build/2" and (summary["images"], summary["skipped"]) == (6, 3)
    cache = CacheReader(Path(summary["path"]))
    skipped = {Path(cache.images()[s["index"]]["path"]).name: s["reason"] for s in cache.manifest["skipped"]}
    assert skipped.keys() == reasons.keys()
    for name, words in reasons.items():
        assert words in skipped[name]
    rows = [img for img in cache.images() if not img["skipped"]]
    assert sorted(Path(img["path"]).name for img in rows) == sorted(kept)
    assert cache.manifest["shards"][0]["rows"] == 0 and cache.tasks == {"class": ["broken", "odd"]}
    assert cache.labels("class").tolist() == [1] * 6
    assert contract_error(cache) < 1e-2


def test_a_folder_without_a_readable_image_is_an_error(cli, tmp_path):
    write_bad_images(tmp_path / "broken")
    result = cli("cache", "build", "--images", str(tmp_path / "broken"), "--name", "none")
    assert result.code == ExitCode.INVALID_DATA and "no readable image" in result.err and "empty file" in result.err
    assert json.loads(cli("cache", "ls", "--json").out)["caches"] == []
    empty = tmp_path / "empty"
    empty.mkdir()
    result = cli("cache", "build", "--images", str(empty))
    assert result.code == ExitCode.NOT_FOUND and "no image files" in result.err and "hint" in result.err


def _build_command(root: Path, name: str, n: int, shard_rows: int) -> list[str]:
    return ["cache", "build", "--images", f"toy:{n}", "--name", name, "--cache-dir", str(root),
            "--shard-rows", str(shard_rows), "--batch-size", "8", "--dtype", "float32"]


def _wait_for(predicate, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _shards_done(directory: Path) -> int:
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
    except (OSError, ValueError):
        return 0
    progress = sum(len(json.loads(p.read_text() or "[]")) for p in directory.glob("progress-r*.json"))
    return len(manifest["shards"]) + progress


N = 192  # inputs of the interruption and torchrun tests


@pytest.fixture(scope="module")
def reference(toy, tmp_path_factory) -> CacheReader:
    """An uninterrupted one-process fp32 build of toy:N, in shards of 50 (boundaries may differ between equal caches)."""
    return build(toy, tmp_path_factory.mktemp("reference"), "whole", images=f"toy:{N}", dtype="float32", shard_rows=50)


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (torchrun starts its workers in their own sessions, so a process group won't do)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _lock_is_free(directory: Path) -> bool:
    from clipterm.cache.store import CacheLock

    try:
        CacheLock(directory).acquire().release()
        return True
    except ClipTermError:
        return False


def _kill_after_first_shard(command: list[str], directory: Path) -> dict:
    """Start a build, and SIGKILL it with every process it started once a shard has landed; return the manifest."""
    proc = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: _shards_done(directory) >= 1 or proc.poll() is not None, "the first shard")
    finally:
        for pid in [proc.pid, *_descendants(proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
    _wait_for(lambda: _lock_is_free(directory), "the killed writers to let go of the lock", timeout=30)
    manifest = json.loads((directory / "manifest.json").read_text())
    assert not manifest["complete"], "the build finished before it could be killed"
    return manifest


def test_killed_build_resumes_to_the_same_cache(toy, reference, tmp_path):
    directory = tmp_path / "killed"
    manifest = _kill_after_first_shard([sys.executable, "-m", "clipterm", *_build_command(tmp_path, "killed", N, 32)], directory)
    assert 1 <= len(manifest["shards"]) < N // 32
    (directory / "shard-00005.safetensors").write_bytes(b"half a shard")  # no record vouches for it: redone
    (directory / "shard-00004.safetensors.tmp").write_bytes(b"torn")
    result = build_cache(BuildOptions(images=f"toy:{N}", name="killed", cache_dir=str(tmp_path), dtype="float32",
                                      shard_rows=999, batch_size=8), loaded=toy)
    assert result.built == N - 32 * len(manifest["shards"])
    resumed = CacheReader(directory)
    assert not list(directory.glob("*.tmp")) and resumed.manifest["shard_rows"] == 32  # the cache keeps its own shard size
    assert_same_cache(resumed, reference)
    from clipterm.cache.inventory import verify

    assert verify(directory) == []


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "clipterm"]


def test_torchrun_two_processes_equal_one(reference, tmp_path):
    done = subprocess.run([*TORCHRUN, *_build_command(tmp_path, "two", N, 16)], env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    two = CacheReader(tmp_path / "two")
    assert two.manifest["complete"] and len(two.manifest["shards"]) == N // 16
    assert not list(two.path.glob("progress-r*")) and not list(two.path.glob("stats-r*"))
    assert_same_cache(two, reference)


def test_killed_torchrun_build_resumes_in_one_process(toy, reference, tmp_path):
    directory = tmp_path / "killed2"
    _kill_after_first_shard([*TORCHRUN, *_build_command(tmp_path, "killed2", N, 16)], directory)
    assert list(directory.glob("progress-r*.json"))  # each rank kept its own list of finished shards
    result = build_cache(BuildOptions(images=f"toy:{N}", name="killed2", cache_dir=str(tmp_path), dtype="float32",
                                      batch_size=8), loaded=toy)
    assert 0 < result.built < N
    assert_same_cache(CacheReader(directory), reference)


def test_second_concurrent_build_fails_cleanly(cli, tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import time
            from clipterm.cache.store import CacheLock
            CacheLock({str(tmp_path / "busy")!r}).acquire()
            print("locked", flush=True)
            time.sleep(60)
        """)],
        stdout=subprocess.PIPE, text=True, env=ENV,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = cli("cache", "build", "--images", "toy:8", "--name", "busy", "--cache-dir", str(tmp_path))
        assert result.code == ExitCode.BUSY and f"pid {holder.pid}" in result.err and "hint" in result.err
    finally:
        holder.send_signal(signal.SIGKILL)  # the OS releases its lock
        holder.wait()
    assert cli("cache", "build", "--images", "toy:8", "--name", "busy", "--cache-dir", str(tmp_path)).code == 0


@pytest.fixture
def other_toy(toy, tmp_path):
    """The toy architecture with slightly different weights, as a local-dir model."""
    import shutil

    from safetensors.torch import load_file, save_file

    from clipterm import locations
    from clipterm.vit.models import load_model

    folder = tmp_path / "other-toy"
    folder.mkdir()
    shutil.copy(locations.TOY_MODEL_DIR / "open_clip_config.json", folder)
    state = load_file(str(locations.TOY_MODEL_DIR / "open_clip_model.safetensors"))
    state["visual.proj"] = state["visual.proj"] * 1.01
    save_file(state, str(folder / "open_clip_model.safetensors"))
    return load_model(f"local-dir:{folder}")


def test_a_model_with_other_weights_is_refused(toy, other_toy, tmp_path):
    cache = build(toy, tmp_path, "mine", images="toy:8")
    with pytest.raises(ClipTermError, match="other weights") as info:
        check_model(cache, other_toy.info)
    assert info.value.code == ExitCode.INVALID_DATA and "--model toy" in info.value.hint
    with pytest.raises(ClipTermError, match="another model.weights_sha256") as info:
        build_cache(BuildOptions(images="toy:8", name="mine", cache_dir=str(tmp_path)), loaded=other_toy)
    assert "--force" in info.value.hint


def test_force_starts_over_and_cancel_stops_between_batches(toy, tmp_path):
    build(toy, tmp_path, "redo", images="toy:8", shard_rows=4)
    with pytest.raises(ClipTermError, match="cancelled") as info:
        build_cache(BuildOptions(images="toy:8", name="redo", cache_dir=str(tmp_path), shard_rows=4, batch_size=4, force=True),
                    loaded=toy, cancel=lambda: True)
    assert info.value.code == ExitCode.INTERRUPTED
    assert not json.loads((tmp_path / "redo" / "manifest.json").read_text())["complete"]
    steps = []
    result = build_cache(BuildOptions(images="toy:8", name="redo", cache_dir=str(tmp_path), shard_rows=4, batch_size=4),
                         loaded=toy, progress=_recording_progress(steps))
    assert result.built == 8 and sum(steps) == 8 and CacheReader(tmp_path / "redo").n == 8


def test_force_deletes_the_files_of_the_old_build_and_nothing_else(toy, tmp_path):
    build(toy, tmp_path, "redo", images="toy:4")
    folder = tmp_path / "redo"
    for name in ("neurons.L2.safetensors", "neurons.L4.safetensors", "notes.txt", "neurons.md"):
        (folder / name).write_text("x")
    build_cache(BuildOptions(images="toy:4", name="redo", cache_dir=str(tmp_path), force=True), loaded=toy)
    assert not list(folder.glob("neurons.L*")) and {"notes.txt", "neurons.md"} <= {p.name for p in folder.iterdir()}


def _recording_progress(steps: list[int]):
    from contextlib import contextmanager

    @contextmanager
    def progress(description, total, unit):
        assert total == 8 and unit == "images"
        yield steps.append

    return progress


@pytest.mark.parametrize("stored", ["--neurons", "--tokens=L1"])
def test_a_refused_stored_option_of_an_average_pooled_vit_writes_nothing(cli, tmp_path, stored):
    """An average-pooled open_clip ViT stores no class-token neurons or tokens. The build refuses them before it
    writes anything (it used to start the cache first, so that the plain build then asked for --force)."""
    folder = save_model_folder(tmp_path / "avg-vit", tiny_vit_config(pool_type="avg"))
    root = tmp_path / "caches"
    args = ("cache", "build", "--images", "toy:4", "--model", f"local-dir:{folder}", "--name", "avg",
            "--cache-dir", str(root), "--device", "cpu", "--workers", "0")
    refused = cli(*args, stored)
    assert refused.code == ExitCode.UNSUPPORTED and "average pool" in refused.err and "build without" in refused.err
    assert not (root / "avg").exists()
    assert cli(*args).code == 0
    assert CacheReader(root / "avg").manifest["model"]["pool"] == "avg"
