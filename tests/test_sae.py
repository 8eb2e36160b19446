"""Sparse autoencoders (issue 30): the module and its open file, streaming training, the CLI, features as units, and
the bad inputs that must be one-line errors leaving the cache intact. Small caches and few steps: fast."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from clipterm import names
from clipterm.cache.build import BuildOptions, build_cache
from clipterm.cache.reader import open_cache
from clipterm.errors import ClipTermError
from clipterm.sae import SAE, Config, Options, SaeFile, train_into
from clipterm.sae import model as sae_model

FAST = dict(features=128, k=8, steps=25, batch_size=256)


@pytest.fixture(scope="module")
def built(toy, tmp_path_factory) -> Path:
    """A 24-image toy cache with an SAE on L4 (all tokens), trained once; tests copy it before changing it."""
    root = tmp_path_factory.mktemp("sae-caches")
    build_cache(BuildOptions(images="toy:24", name="toy24", cache_dir=str(root), workers=0), loaded=toy)
    train_into(open_cache(root / "toy24"), Options(layer=4, **FAST), loaded=toy)
    return root / "toy24"


@pytest.fixture
def cache(built, tmp_path, monkeypatch) -> Path:
    shutil.copytree(built, tmp_path / "root" / built.name)
    monkeypatch.setenv("CLIPTERM_CACHE", str(tmp_path / "root"))
    return tmp_path / "root" / built.name


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name != ".lock"}


# --------------------------------------------------------------------------- the module and the file


@pytest.mark.parametrize("arch", sae_model.ARCHS)
def test_every_arch_reconstructs_and_topk_fires_exactly_k(arch):
    torch.manual_seed(0)
    sae = SAE(Config(16, 64, arch, k=4))
    x = torch.randn(10, 16)
    f = sae.encode(x)
    assert f.shape == (10, 64) and sae(x).shape == (10, 16) and (f >= 0).all() or arch == "jumprelu"
    if arch == "topk":
        assert ((f > 0).sum(-1) <= 4).all() and ((f > 0).sum(-1) == 4).any()


def test_the_file_applies_with_plain_torch_as_the_docs_say(built):
    """docs/cache-format.md's recipe, from the file's tensors and metadata alone, gives the module's reconstruction."""
    from safetensors import safe_open

    path = built / "sae.L4.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        t = {k: handle.get_tensor(k) for k in handle.keys()}
        meta = handle.metadata()
    assert t["W_enc"].shape == (128, 128) and t["W_dec"].shape == (128, 128) and t["b_dec"].shape == (128,)
    assert meta["site"] == "block_output" and meta["layer"] == "L4" and meta["tokens"] == "all"
    assert meta["activation"] == "topk" and meta["k"] == "8" and "explained_variance" in json.loads(meta["training"])["final"]
    x = torch.randn(5, 128) * 3
    scale, k = float(meta["norm_scale"]), int(meta["k"])
    pre = (x * scale - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
    values, idx = pre.relu().topk(k, dim=-1)
    f = torch.zeros_like(pre).scatter_(-1, idx, values)
    x_hat = (f @ t["W_dec"] + t["b_dec"]) / scale
    sae, _ = sae_model.load(path)
    assert torch.allclose(x_hat, sae(x), atol=1e-5)


def test_k_must_be_below_the_features():
    with pytest.raises(ClipTermError, match="--k 64 must be between 1"):
        Config(16, 64, "topk", k=64).check()


# --------------------------------------------------------------------------- training


def test_a_seed_gives_the_same_sae_and_streaming_bounds_memory(toy, cache):
    """Twice with one seed: identical tensors. With nothing kept in memory the activations stream through a buffer
    of at most `buffer_rows` (plus one image batch), not the whole set, and the SAE still learns."""
    reader = open_cache(cache)
    first = SaeFile(reader, 4).sae.tensors()
    train_into(reader, Options(layer=4, **FAST), loaded=toy)
    again = SaeFile(open_cache(cache), 4).sae.tensors()
    assert all(torch.equal(first[k], again[k]) for k in first)
    out = train_into(open_cache(cache), Options(layer=4, keep_bytes=0, buffer_rows=600, image_batch=4, **FAST), loaded=toy)
    assert not out["in_memory"] and 600 <= out["buffer_rows"] < 600 + 4 * 65 < 24 * 65
    assert out["final"]["explained_variance"] > 0.3


def test_the_acceptance_measure_at_small_n(toy, tmp_path):
    """bench/truth/sae_truth.py's measure, at N=200 (the bench runs toy:3000): explained variance >= 0.8 at L0 = k;
    the reconstruction spliced in at L4 costs at most 5 points per task here (<= 2 is the goal at 3000); some feature
    covers a class; and the first text of a covering feature's direct effect names its class more often than a
    random feature's does. Class coverage against neurons and PCA needs the bench's 3000 images."""
    from bench.truth.sae_truth import measure

    build_cache(BuildOptions(images="toy:200", name="f", cache_dir=str(tmp_path), neurons=True, workers=0), loaded=toy)
    train_into(open_cache(tmp_path / "f"), Options(layer=4, features=512, k=16, steps=400, batch_size=1024), loaded=toy)
    result = measure(open_cache(tmp_path / "f"), toy, draws=100)
    print({k: result[k] for k in ("explained_variance", "l0", "max_splice_drop", "covered", "names")})
    assert result["explained_variance"] >= 0.8 and result["l0"] <= 16
    assert result["max_splice_drop"] <= 0.05
    assert result["covered"]["SAE features"] >= 1  # at 200 images a class has ~25 members: coverage is the bench's
    assert result["names"]["direct"]["named"] > result["names"]["direct"]["random"]


# --------------------------------------------------------------------------- the CLI and bad inputs


def test_train_list_images_and_verify_through_the_cli(cli, cache):
    result = cli("sae", "train", "toy24", "--layer", "L4", "--features", "64", "--k", "4", "--steps", "10",
                 "--batch-size", "128", "--json")
    assert result.code == 0, result
    payload = json.loads(result.out)
    assert payload["layer"] == "L4" and payload["final"]["l0"] <= 4
    listed = cli("sae", "list", "toy24", "--layer", "L4", "--top", "5", "--json")
    rows = json.loads(listed.out)["components"]
    assert listed.code == 0 and 0 < len(rows) <= 5 and rows[0]["texts"] and 0 < rows[0]["frequency"] <= 1
    images = cli("images", "toy24", "--component", rows[0]["component"], "--top", "3", "--json")
    assert images.code == 0, images
    assert "SAE activation" in json.loads(images.out)["score"]
    assert cli("cache", "verify", "toy24").code == 0


@pytest.mark.parametrize("args, message", [
    (("--layer", "L9"), "no layer L9 in this tower"),
    (("--layer", "L4", "--features", "32", "--k", "32"), "--k 32 must be between 1"),
])
def test_bad_training_inputs_are_one_line_errors_and_the_cache_is_intact(cli, cache, args, message):
    before = snapshot(cache)
    result = cli("sae", "train", "toy24", *args, "--steps", "2")
    assert result.code == 2 and message in result.err and "unexpected" not in result.err, result
    assert snapshot(cache) == before


def test_an_interrupted_training_leaves_the_cache_and_a_rerun_starts_cleanly(cli, cache, monkeypatch):
    from clipterm.sae import train as train_module

    before = snapshot(cache)
    real = train_module.step_loss
    calls = [0]

    def interrupting(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "step_loss", interrupting)
    result = cli("sae", "train", "toy24", "--layer", "L4", "--features", "64", "--k", "4", "--steps", "10")
    assert result.code == 130 and "the cache is unchanged" in result.err, result
    assert snapshot(cache) == before and not list(cache.glob("*.tmp"))
    monkeypatch.setattr(train_module, "step_loss", real)
    assert cli("sae", "train", "toy24", "--layer", "L4", "--features", "64", "--k", "4", "--steps", "5").code == 0


class Payload:  # a pickled object of a class: weights_only refuses to build it
    def __reduce__(self):
        return (print, ("code ran",))


def test_import_checks_width_and_refuses_pickled_code(cli, cache, tmp_path, capsys):
    good = SAE(Config(128, 32, "relu"))
    ok = tmp_path / "ok.pt"
    torch.save(good.tensors(), ok)
    result = cli("sae", "import", str(ok), "--cache", "toy24", "--layer", "L3", "--json")
    assert result.code == 0, result
    assert SaeFile(open_cache(cache), 3).features == 32
    before = snapshot(cache)
    wide = tmp_path / "wide.safetensors"
    from safetensors.torch import save_file

    save_file(SAE(Config(64, 32, "relu")).tensors(), str(wide))
    result = cli("sae", "import", str(wide), "--cache", "toy24", "--layer", "L4")
    assert result.code == 4 and "64-wide residuals" in result.err and "128 wide" in result.err, result
    evil = tmp_path / "evil.pt"
    torch.save({"W_enc": torch.zeros(2, 2), "x": Payload()}, evil)
    result = cli("sae", "import", str(evil), "--cache", "toy24", "--layer", "L4")
    assert result.code == 4 and "refused" in result.err and "code ran" not in result.out + result.err, result
    assert len(result.err.strip().splitlines()) <= 2  # the error and its hint
    assert snapshot(cache) == before


# --------------------------------------------------------------------------- features as units


def test_features_are_named_and_validated_by_the_tower(cache):
    reader = open_cache(cache)
    assert names.feature(4, 12) == "L4.F12" and str(names.parse("l4.f12")) == "L4.F12"
    assert reader.tower.parse("L4.F3").kind == "feature"
    with pytest.raises(ClipTermError, match="no layer 9"):
        reader.tower.parse("L9.F3")
    with pytest.raises(ClipTermError, match="no feature 999"):
        SaeFile(reader, 4).check_feature(999)


def test_activations_spatial_and_targets(toy, cache):
    from clipterm.analyses.spatial import component_map
    from clipterm.analyses.targets import resolve

    reader = open_cache(cache)
    acts = reader.sae_activations("L4")
    assert acts.shape == (24, 128) and (acts >= 0).all()
    feature = int(acts.sum(0).argmax())
    row = int(acts[:, feature].argmax())
    spatial = component_map(f"row:{row}", names.feature(4, feature), reader=reader, loaded=toy)
    assert spatial.grid.shape == (8, 8) and float(spatial.grid.max()) > 0
    target = resolve(names.feature(4, feature), toy, reader)
    assert target.direction.shape == (128,) and abs(float(target.direction.norm()) - 1) < 1e-5


def test_ablating_a_feature_changes_the_embeddings_only_where_it_fires(toy, cache):
    from clipterm.sae.features import embeds_with

    reader = open_cache(cache)
    sae_file = SaeFile(reader, 4)
    acts = sae_file.image_max
    fires = (acts > 0).sum(0)
    strong = acts.amax(0) * ((fires > 0) & (fires < len(acts)))  # a strong feature that some image lacks
    feature = int(strong.argmax()) if bool((strong > 0).any()) else int(acts.amax(0).argmax())
    silent = int((acts[:, feature] == 0).nonzero()[0]) if (acts[:, feature] == 0).any() else None
    plain = embeds_with(reader, toy, sae_file, None)
    ablated = embeds_with(reader, toy, sae_file, "ablate", [feature])
    firing = int(acts[:, feature].argmax())
    assert float((plain[firing] - ablated[firing]).norm()) > 1e-3 * float(plain[firing].norm())
    if silent is not None:
        assert torch.allclose(plain[silent], ablated[silent], atol=1e-5)


def test_sites_of_a_resnet_are_its_stages():
    from clipterm.vit.models import load_model
    from clipterm.vit.sites import site

    loaded = load_model("toy-rn")
    s = site(loaded.model, 3)
    assert s.layout == "grid" and s.count == 4 and not s.class_token
    with pytest.raises(ClipTermError, match="no layer L4 in this tower"):
        site(loaded.model, 4)
