"""Fuzzing the cache reader: whatever happens to a file of a small cache, a reader answers exactly as before, or
refuses with a one-line ClipTermError. Never a traceback, never a different answer without a word."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clipterm.cache import store
from clipterm.cache.build import BuildOptions, build_cache
from clipterm.cache.neurons import NeuronFile, build_neurons
from clipterm.cache.inventory import verify
from clipterm.cache.reader import CacheReader
from clipterm.errors import ClipTermError

FILES = ["manifest.json", "images.jsonl", "readout.safetensors", "stats.safetensors", "shard-00000.safetensors",
         "shard-00001.safetensors", "neurons.L1.safetensors", ".verified.json"]


@pytest.fixture(scope="module")
def pristine(toy, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    build_cache(BuildOptions(images="toy:8", name="pets", cache_dir=str(root), shard_rows=4), loaded=toy)
    build_neurons(CacheReader(root / "pets"), 1, device="cpu", top_k=2, loaded=toy)
    assert sorted(p.name for p in (root / "pets").iterdir() if p.name != ".lock") == sorted(FILES)
    return root / "pets", answers(root / "pets")


QUERIES = {
    "head": lambda r: r.effects("L1.H0"),
    "mlp": lambda r: r.effects("L0.MLP", rows=[3, 5]),
    "embed": lambda r: r.effects("embed"),
    "image_embeds": lambda r: r.image_embeds(),
    "labels": lambda r: r.labels("colour"),
    "stats_head": lambda r: r.stats("L1.H0")["cov"],
    "stats_all": lambda r: r.stats()["count"],
    "images": lambda r: r.images(),
    "tasks": lambda r: r.tasks,
    "rows": lambda r: r.n,
    "neurons_pc1": lambda r: NeuronFile(r, 1).tensor("pc1"),
    "neurons_norms": lambda r: NeuronFile(r, 1).column("norms", 7),
}


def answers(directory: Path) -> dict:
    """Each query's answer on a fresh reader, or the one-line error it raised."""
    out = {}
    for name, query in QUERIES.items():
        try:
            out[name] = query(CacheReader(directory))
        except ClipTermError as exc:
            assert "\n" not in exc.message and "\n" not in (exc.hint or ""), exc
            out[name] = exc
    return out


def same_json(a: bytes, b: bytes) -> bool:
    """Whether two manifests say the same: a truncation that drops only the final newline changes nothing."""
    try:
        return json.loads(a) == json.loads(b)
    except ValueError:
        return False


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return a == b


# --------------------------------------------------------------------------- corruptions


def truncate(path: Path, data: st.DataObject) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: data.draw(st.integers(0, max(len(raw) - 1, 0)), label="keep")])


def flip(path: Path, data: st.DataObject) -> None:
    raw = bytearray(path.read_bytes())
    at = data.draw(st.integers(0, len(raw) - 1), label="at")
    raw[at] ^= 1 << data.draw(st.integers(0, 7), label="bit")
    path.write_bytes(bytes(raw))


def _paths(node, prefix=()) -> list[tuple]:
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            found += [prefix + (key,)] + _paths(value, prefix + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node[:2]):
            found += _paths(value, prefix + (i,))
    return found


def delete_key(path: Path, data: st.DataObject, resign: bool) -> None:
    """Drop a key of a JSON file (the manifest, a line of images.jsonl), or a tensor of a safetensors file."""
    if path.suffix == ".safetensors":
        tensors, meta = _load(path)
        del tensors[data.draw(st.sampled_from(sorted(tensors)), label="tensor")]
        _save(path, tensors, meta, resign)
        return
    lines = path.read_text().splitlines() if path.suffix == ".jsonl" else [path.read_text()]
    i = data.draw(st.integers(0, len(lines) - 1), label="line")
    doc = json.loads(lines[i])
    keys = _paths(doc)
    if not keys:
        return
    *parents, last = data.draw(st.sampled_from(keys), label="key")
    node = doc
    for key in parents:
        node = node[key]
    if isinstance(node, list):
        node.pop(last)
    else:
        del node[last]
    if path.name == store.MANIFEST and resign:  # as if a buggy writer had written it: the digest matches
        doc["digest"] = store.manifest_digest(doc)
    lines[i] = json.dumps(doc)
    path.write_text("\n".join(lines) + "\n")


def retype(path: Path, data: st.DataObject, resign: bool) -> None:
    """A tensor saved with another dtype (same values), or another shape (a row dropped, or flattened)."""
    if path.suffix != ".safetensors":
        return flip(path, data)
    tensors, meta = _load(path)
    name = data.draw(st.sampled_from(sorted(tensors)), label="tensor")
    how = data.draw(st.sampled_from(["dtype", "drop", "flatten"]), label="how")
    tensor = tensors[name]
    if how == "dtype":
        other = data.draw(st.sampled_from([torch.float16, torch.float32, torch.float64, torch.int64, torch.bfloat16]))
        tensors[name] = tensor.to(other)
    elif how == "drop" and tensor.dim() and tensor.shape[-1] > 0:
        tensors[name] = tensor[..., :-1].contiguous()
    elif tensor.dim() > 1:
        tensors[name] = tensor.reshape(-1)
    if tensors[name].dtype == tensor.dtype and tensors[name].shape == tensor.shape:  # make sure something changed
        tensors[name] = tensor.to(torch.float64 if tensor.dtype != torch.float64 else torch.float32)
    _save(path, tensors, meta, resign)


def _load(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _save(path: Path, tensors: dict, meta: dict, resign: bool) -> None:
    """Write a changed safetensors file; `resign`: also make the manifest vouch for it (size, sha256, digest), so
    that only the header check stands between the reader and the change."""
    from clipterm.files import save_tensors

    sha = save_tensors(path, tensors, metadata=meta)
    if not resign:
        return
    directory = path.parent
    manifest = json.loads((directory / store.MANIFEST).read_text())
    for record in manifest["shards"]:
        if record["file"] == path.name:
            record.update(bytes=path.stat().st_size, sha256=sha)
    if path.name in manifest["files"]:
        manifest["files"][path.name] = sha
    store.write_manifest(directory, manifest)


def cli(*args: str) -> tuple[int, str]:
    from clipterm.cli.app import main

    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            main(list(args))
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return code, err.getvalue()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data(), file=st.sampled_from(FILES), kind=st.sampled_from(["truncate", "flip", "delete_key", "retype"]),
       resign=st.booleans())
def test_a_corrupted_cache_answers_rightly_or_refuses_in_one_line(pristine, data, file, kind, resign):
    source, expected = pristine
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "pets"
        shutil.copytree(source, directory)
        path = directory / file
        before = path.read_bytes()
        if kind == "truncate":
            truncate(path, data)
        elif kind == "flip":
            flip(path, data)
        elif kind == "delete_key":
            delete_key(path, data, resign)
        else:
            retype(path, data, resign)
        changed = path.read_bytes() != before and not (file == store.MANIFEST and same_json(path.read_bytes(), before))

        # A manifest re-signed after a deleted key stands for a buggy writer: it must not crash anything, but the
        # manifest is the root of trust, so what it then says (fewer tasks, say) is not a silent change.
        trusted = not (kind == "delete_key" and resign and file == store.MANIFEST)
        got = answers(directory)
        for name, answer in got.items():
            if trusted and not isinstance(answer, ClipTermError):
                assert same(answer, expected[name]), f"{name}: a different answer, silently, after {kind} of {file}"

        try:
            problems = verify(directory)
        except ClipTermError:
            problems = ["refused"]
        if changed and file != ".verified.json" and trusted:
            assert problems, f"verify passed a cache whose {file} changed ({kind})"

        for args in (["cache", "info", str(directory), "--json"], ["cache", "verify", str(directory)],
                     ["cache", "ls", "--cache-dir", tmp]):
            code, err = cli(*args)
            assert "unexpected" not in err and "Traceback" not in err, (args, err)
            assert code == 0 or err.strip().startswith("error:") and len(err.strip().splitlines()) <= 2, (args, err)
