"""`clipterm neurons build|list` and `clipterm images` on small toy caches, through the real entry point."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from clipterm.cache import store
from clipterm.cache.build import BuildOptions, build_cache
from clipterm.cache.reader import open_cache
from clipterm.errors import ClipTermError, ExitCode
from clipterm.inputs.images import toy_id
from clipterm.toyworld.evaluate import model_world

TOY_WORLD = model_world("toy")  # the world the shipped toy was trained on: what `toy:N` draws for it


@pytest.fixture(scope="module")
def cache(toy, tmp_path_factory) -> Path:
    """A 40-image toy cache with its L4 neurons built (top-k 8)."""
    root = tmp_path_factory.mktemp("neuron-caches")
    build_cache(BuildOptions(images="toy:40", name="toy40", cache_dir=str(root), neurons=True), loaded=toy)
    from clipterm.cache.neurons import build_neurons

    build_neurons(open_cache(root / "toy40"), 4, device="cpu", top_k=8, loaded=toy)
    return root / "toy40"


def as_json(result) -> dict:
    assert result.code == 0, result
    return json.loads(result.out)


def test_build_writes_the_file_with_progress(toy, tmp_path):
    from clipterm.cache.neurons import NeuronFile, build_neurons

    build_cache(BuildOptions(images="toy:12", name="small", cache_dir=str(tmp_path)), loaded=toy)
    reader = open_cache(tmp_path / "small")
    advanced = []

    class Bar:
        def __init__(self, description, total, unit):
            assert (description, total, unit) == ("neurons L3", 12, "images")

        def __enter__(self):
            return advanced.append

        def __exit__(self, *exc):
            return False

    result = build_neurons(reader, 3, device="cpu", top_k=100, batch_size=5, loaded=toy, progress=Bar)
    assert sum(advanced) == 12 and len(advanced) == 3
    assert (result.images, result.missing, result.changed, result.top_images) == (12, 0, 0, 12)  # top-k capped at N
    assert sorted(p.name for p in tmp_path.joinpath("small").iterdir() if p.name.startswith("neurons")) == ["neurons.L3.safetensors"]
    neuron_file = NeuronFile(reader, 3)
    assert neuron_file.tensor("norms").shape == (12, 512) and neuron_file.tensor("norms").dtype == torch.float16
    assert neuron_file.tensor("mean").shape == neuron_file.tensor("pc1").shape == (512, 128)
    assert neuron_file.paths[0] == "L4.H0" and len(neuron_file.paths) == 16


def test_file_agrees_with_forming_every_effect(toy, cache):
    """Norms, means, activations and pc1 in the file equal the same quantities from full (N, M, D) effects."""
    from test_neurons import toy_images

    from clipterm.cache.neurons import NeuronFile
    from clipterm.vit import second_order

    neuron_file = NeuronFile(open_cache(cache), 4)
    out = second_order.trace(toy.model, toy_images(40), 4)
    effects = second_order.effects(out.scalars, second_order.path_vectors(toy.model, 4))  # (N, M, D)
    norms = effects.norm(dim=-1)  # (N, M)
    assert torch.allclose(neuron_file.tensor("norms").float(), norms, rtol=2e-3, atol=1e-5)
    assert torch.allclose(neuron_file.tensor("activations").float(), out.activations, rtol=2e-3, atol=1e-3)
    assert torch.allclose(neuron_file.tensor("mean"), effects.mean(0), atol=1e-6)
    centred_norms = (effects - effects.mean(0)).norm(dim=-1)  # (N, M)
    for n in (0, 77, 300):
        top = centred_norms[:, n].topk(8)  # the reference ranks by the norm of the centred effect
        assert set(neuron_file.tensor("top_rows")[n].tolist()) == set(top.indices.tolist())
        assert torch.allclose(neuron_file.tensor("top_norms")[n], top.values, rtol=1e-4, atol=1e-6)
        centred = effects[top.indices, n] - effects[:, n].mean(0)  # (k, D)
        right = torch.linalg.svd(centred, full_matrices=False).Vh[0]
        pc1 = neuron_file.tensor("pc1")[n]
        assert abs(abs(float(pc1 @ right)) - 1) < 1e-4
        positive = int((centred @ pc1 > 0).sum())  # signed so that most of the 8 project positively; a tie by the sum
        assert positive > 4 or (positive == 4 and float((centred @ pc1).sum()) >= 0), (n, positive)
    assert torch.allclose(neuron_file.tensor("effect_sum"), effects.sum(1), rtol=1e-4, atol=1e-5)
    significant = centred_norms >= centred_norms.topk(8, dim=0).values[-1]  # (N, M): each neuron's top 8 images
    expected = ((effects - effects.mean(0)) * significant[..., None]).sum(1)  # (N, D)
    assert torch.allclose(neuron_file.tensor("significant_sum"), expected, rtol=1e-4, atol=1e-5)


def test_ranking_pass_over_the_images_equals_the_one_over_kept_scalars(toy, cache, tmp_path):
    """When the per-image scalars do not fit in memory, the ranking by centred norm runs the images again."""
    from clipterm.cache.neurons import NeuronFile, build_neurons

    copy = tmp_path / "copy"
    shutil.copytree(cache, copy)
    descriptions = []

    class Bar:
        def __init__(self, description, total, unit):
            descriptions.append(description)

        def __enter__(self):
            return lambda n: None

        def __exit__(self, *exc):
            return False

    build_neurons(open_cache(copy), 4, device="cpu", top_k=8, loaded=toy, keep_bytes=0, progress=Bar)
    assert descriptions == ["neurons L4", "ranking L4"]
    again, kept = NeuronFile(open_cache(copy), 4), NeuronFile(open_cache(cache), 4)
    for name in ("top_rows", "top_norms", "pc1", "mean", "effect_sum", "significant_sum"):
        assert torch.allclose(again.tensor(name).float(), kept.tensor(name).float(), atol=1e-6), name


def test_list_sorts_by_norm_and_sparsity(cli, cache):
    by_norm = as_json(cli("neurons", "list", str(cache), "--layer", "L4", "--top", "6", "--json"))
    assert by_norm["schema"] == "clipterm.neurons.list/2" and by_norm["images"] == 40 and by_norm["top_images"] == 8
    norms = [row["norm_mean"] for row in by_norm["neurons"]]
    assert len(norms) == 6 and norms == sorted(norms, reverse=True)
    by_sparsity = as_json(cli("neurons", "list", str(cache), "--layer", "L4", "--sort", "sparsity", "--json"))
    shares = [row["top1_share"] for row in by_sparsity["neurons"]]
    assert len(shares) == 20 and shares == sorted(shares, reverse=True) and all(0 < s <= 1 for s in shares)
    table = cli("neurons", "list", str(cache), "--layer", "L4", "--top", "3")
    assert table.code == 0 and by_norm["neurons"][0]["component"] in table.out
    bare = as_json(cli("neurons", "list", str(cache), "--layer", "4", "--top", "6", "--json"))  # a bare number is L4
    assert bare["neurons"] == by_norm["neurons"]


def test_list_decompose_gives_texts_coefficients_and_cosine(cli, cache):
    payload = as_json(cli("neurons", "list", str(cache), "--layer", "L4", "--top", "4", "--decompose", "--pool", "toy",
                          "--k", "5", "--json"))
    assert payload["pool"]["name"] == "toy"
    for row in payload["neurons"]:
        decomposition = row["decomposition"]
        assert 0 < len(decomposition["texts"]) <= 5 and 0 < decomposition["cosine"] <= 1
        positive = [t["text"] for t in decomposition["texts"] if t["coefficient"] > 0]
        assert decomposition["top_text"] == (positive[0] if positive else None)
    table = cli("neurons", "list", str(cache), "--layer", "L4", "--top", "2", "--decompose", "--k", "3")
    assert table.code == 0 and payload["neurons"][0]["decomposition"]["texts"][0]["text"][:10] in table.out


def test_images_of_a_neuron_by_norm_and_activation(cli, cache):
    from clipterm.cache.neurons import NeuronFile

    neuron_file = NeuronFile(open_cache(cache), 4)
    payload = as_json(cli("images", str(cache), "--component", "L4.N77", "--top", "5", "--json"))
    assert payload["schema"] == "clipterm.images/2" and payload["by"] == "norm"
    expected = neuron_file.column("norms", 77).topk(5).indices.tolist()
    assert [image["row"] for image in payload["examples"]] == expected
    assert payload["examples"][0]["id"] == toy_id(0, expected[0], TOY_WORLD) and payload["examples"][0]["missing"] is False
    by_activation = as_json(cli("images", str(cache), "-c", "L4.N77", "--by", "activation", "--top", "3", "--json"))
    scores = [image["score"] for image in by_activation["examples"]]
    assert scores == sorted(scores, reverse=True) and scores[0] == pytest.approx(float(neuron_file.column("activations", 77).max()))
    # The last layer has no neurons file, but the cache holds CLS activations.
    last = as_json(cli("images", str(cache), "-c", "L5.N3", "--by", "activation", "--top", "2", "--json"))
    assert len(last["examples"]) == 2


def test_images_of_a_head(cli, cache):
    for by in ("textspan", "pc", "norm"):
        payload = as_json(cli("images", str(cache), "-c", "L5.H2", "--by", by, "--top", "4", "--json"))
        scores = [image["score"] for image in payload["examples"]]
        assert len(scores) == 4 and scores == sorted(scores, reverse=True), by
    assert "TextSpan" in as_json(cli("images", str(cache), "-c", "L5.H2", "--json"))["score"]
    pc2 = as_json(cli("images", str(cache), "-c", "L5.H2:pc2", "--top", "2", "--json"))
    assert pc2["by"] == "pc" and "direction 2" in pc2["score"]


def test_show_draws_half_block_thumbnails(cli, cache):
    result = cli("images", str(cache), "-c", "L4.N77", "--top", "3", "--show", "--size", "8")
    assert result.code == 0
    assert result.out.count("▀" * 8) == 3 * 4 and "#1 " in result.out and "#3 " in result.out


def test_vanished_image_shows_a_placeholder(toy, cli, tmp_path):
    """A folder cache whose top image is deleted after the build: a placeholder, a flag in JSON, no crash."""
    from PIL import Image

    from clipterm.toyworld import world

    folder = tmp_path / "pictures"
    for i in range(6):
        (folder / ("dark" if i % 2 else "light")).mkdir(parents=True, exist_ok=True)
        Image.fromarray(world.render(world.scene_at(0, i))[0]).save(folder / ("dark" if i % 2 else "light") / f"{i}.png")
    build_cache(BuildOptions(images=str(folder), name="pics", cache_dir=str(tmp_path)), loaded=toy)
    as_json(cli("neurons", "build", str(tmp_path / "pics"), "--layer", "L4", "--device", "cpu", "--json"))
    first = as_json(cli("images", str(tmp_path / "pics"), "-c", "L4.N5", "--json"))["examples"][0]
    Path(first["path"]).unlink()
    after = as_json(cli("images", str(tmp_path / "pics"), "-c", "L4.N5", "--json"))["examples"]
    assert after[0]["path"] == first["path"] and after[0]["missing"] is True and not after[1]["missing"]
    shown = cli("images", str(tmp_path / "pics"), "-c", "L4.N5", "--show", "--size", "8")
    assert shown.code == 0 and "missing" in shown.out and shown.out.count("▀" * 8) == 5 * 4
    table = cli("images", str(tmp_path / "pics"), "-c", "L4.N5")
    assert table.code == 0 and "(missing)" in table.out
    rebuilt = as_json(cli("neurons", "build", str(tmp_path / "pics"), "--layer", "L4", "--device", "cpu", "--json"))
    assert rebuilt["missing"] == 1 and rebuilt["images"] == 6
    ablated = as_json(cli("ablate", str(tmp_path / "pics"), "--second-order", "L4", "--draws", "100", "--json"))
    assert ablated["second_order"]["missing"] == 1  # its effects are unknown: left out of every score
    assert [task["images"] for task in ablated["tasks"].values()] == [5]


def test_force_rebuild_removes_the_neurons_files_and_a_stale_one_is_refused(toy, cli, tmp_path):
    from clipterm.cache.neurons import build_neurons

    options = BuildOptions(images="toy:6", name="again", cache_dir=str(tmp_path))
    build_cache(options, loaded=toy)
    build_neurons(open_cache(tmp_path / "again"), 4, device="cpu", loaded=toy)
    old = tmp_path / "old.safetensors"
    shutil.copy(tmp_path / "again" / "neurons.L4.safetensors", old)
    import time

    time.sleep(1.1)  # the manifest's creation time has one-second resolution
    build_cache(BuildOptions(**{**options.__dict__, "force": True}), loaded=toy)
    assert not list((tmp_path / "again").glob("neurons.L*"))  # they described the old build's images
    result = cli("neurons", "list", str(tmp_path / "again"), "--layer", "L4")
    assert result.code == ExitCode.NOT_FOUND and "no neurons file for L4" in result.err and "neurons build" in result.err
    shutil.copy(old, tmp_path / "again" / "neurons.L4.safetensors")  # brought back by hand
    result = cli("neurons", "list", str(tmp_path / "again"), "--layer", "L4")
    assert result.code == ExitCode.INVALID_DATA and "earlier build" in result.err and "neurons build" in result.err


def test_a_file_from_the_first_format_still_lists_but_cannot_ablate(cli, cache, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    copy = tmp_path / "old"
    shutil.copytree(cache, copy)
    path = copy / "neurons.L4.safetensors"
    with safe_open(str(path), framework="pt") as file:
        meta = {**file.metadata(), "format": "clipterm.neurons/1"}
        tensors = {name: file.get_tensor(name) for name in file.keys() if name not in ("top_norms", "effect_sum", "significant_sum")}
    save_file(tensors, str(path), metadata=meta)
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["files"][path.name]  # an older clipterm did not list its neurons files in the manifest
    store.write_manifest(copy, manifest)
    assert as_json(cli("neurons", "list", str(copy), "--layer", "L4", "--top", "2", "--json"))["neurons"]
    result = cli("ablate", str(copy), "--second-order", "L4", "--task", "colour")
    assert result.code == ExitCode.INVALID_DATA and "an older clipterm built it" in result.err
    assert f"hint: run `clipterm neurons build {copy.name} --layer L4`" in result.err


def test_cancel_writes_nothing(toy, cache, tmp_path):
    from clipterm.cache.neurons import build_neurons

    copy = tmp_path / "copy"
    shutil.copytree(cache, copy)
    with pytest.raises(ClipTermError, match="cancelled") as caught:
        build_neurons(open_cache(copy), 2, device="cpu", loaded=toy, cancel=lambda: True)
    assert caught.value.code == ExitCode.INTERRUPTED and not list(copy.glob("neurons.L2*"))


@pytest.mark.parametrize("args, message", [
    (["neurons", "list", "{cache}", "--layer", "L9"], "no layer L9"),
    (["neurons", "list", "{cache}", "--layer", "L5"], "last layer"),
    (["neurons", "list", "{cache}", "--layer", "4.5"], "not a component name"),
    (["neurons", "build", "{cache}", "--layer", "L5"], "no second-order effect"),
    (["neurons", "list", "{cache}", "--layer", "L4", "--top", "0"], "--top 0"),
    (["neurons", "list", "{cache}", "--layer", "L3"], "no neurons file for L3"),
    (["neurons", "build", "{cache}", "--layer", "L4", "--top-images", "0"], "--top-images 0"),
    (["images", "{cache}", "-c", "L4.N7", "--top", "0"], "--top 0"),
    (["images", "{cache}", "-c", "L4.N7", "--by", "pc"], "norm or activation"),
    (["images", "{cache}", "-c", "L4.N999"], "no neuron 999"),
    (["images", "{cache}", "-c", "L5.N3"], "no second-order effect"),
    (["images", "{cache}", "-c", "L9.N3"], "no layer 9"),
    (["neurons", "list", "{cache}", "--layer", "L4", "--top", "-2"], "--top -2"),
    (["images", "{cache}", "-c", "embed"], "no top images"),
])
def test_bad_inputs_get_one_clear_line(cli, cache, args, message):
    result = cli(*[a.format(cache=cache) for a in args])
    assert result.code != 0 and "Traceback" not in result.err, result
    error, hint = result.err.strip().splitlines()
    assert message in error and hint.startswith("hint: ")
