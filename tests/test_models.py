"""Model loading: the toy, open_clip archs with local weights, QuickGELU for openai tags and for weights files,
and refusals."""

import json
import os
import pickle
import zipfile

import pytest
import torch
from tower_helpers import save_model_folder, tiny_vit_config

from clipterm.errors import ClipTermError, ExitCode
from clipterm.vit.models import load_model, model_shape
from clipterm.vit.support import choose_quick_gelu, resolved_model_cfg
from clipterm.vit.weights import OPENAI_ARCHIVE, read_weights


def test_toy_loads_offline_with_its_shape(toy):
    info = toy.info
    assert (info.layers, info.heads, info.head_dim, info.width, info.embed_dim) == (6, 8, 16, 128, 128)
    assert (info.image_size, info.patch_size, info.context_length) == (64, 8, 32)
    assert len(info.weights_sha256) == 64
    assert model_shape("toy") == info.shape
    tokens = toy.tokenizer(["a red circle"])
    assert tokens.shape == (1, 32)
    with torch.no_grad():
        assert toy.model.encode_text(tokens).shape == (1, 128)


def test_openai_tags_resolve_to_quickgelu_without_weights():
    assert resolved_model_cfg("ViT-B-32", "openai")["quick_gelu"] is True
    assert resolved_model_cfg("ViT-B-32", "laion2b_s34b_b79k")["quick_gelu"] is False


@pytest.fixture(scope="module")
def vit_b32_file(tmp_path_factory):
    """A randomly initialised ViT-B-32 (QuickGELU, as the openai tag needs) saved to a local safetensors file."""
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", force_quick_gelu=True).eval()
    path = tmp_path_factory.mktemp("weights") / "vit-b-32-random.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, path


@pytest.fixture(scope="module")
def vit_b32_files(vit_b32_file, tmp_path_factory):
    """The same QuickGELU weights as a plain .safetensors and a plain .pt (a bare state dict, nothing else)."""
    model, safetensors = vit_b32_file
    pt = tmp_path_factory.mktemp("weights-pt") / "vit-b-32-random.pt"
    torch.save(model.state_dict(), pt)
    return model, {".safetensors": safetensors, ".pt": pt}


def assert_same_model(loaded, reference, atol: float = 1e-5) -> None:
    images = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    texts = torch.randint(0, 49408, (1, 77), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (loaded.model.encode_image(images) - reference.encode_image(images)).abs().max() <= atol
        assert (loaded.model.encode_text(texts) - reference.encode_text(texts)).abs().max() <= atol


def test_local_weights_file_gives_identical_outputs(vit_b32_file):
    reference, path = vit_b32_file
    loaded = load_model("ViT-B-32-quickgelu", pretrained=str(path))
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded.model.encode_image(images), reference.encode_image(images))
    assert loaded.info.weights_path == str(path) and loaded.info.heads == 12 and loaded.info.embed_dim == 512


def test_openai_tag_found_in_local_hf_cache_builds_quickgelu(vit_b32_file, tmp_path, monkeypatch):
    _, path = vit_b32_file
    snapshot = tmp_path / "hub" / "models--timm--vit_base_patch32_clip_224.openai" / "snapshots" / "0" 
    snapshot.mkdir(parents=True)
    os.symlink(path, snapshot / "open_clip_model.safetensors")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    loaded = load_model("ViT-B-32", pretrained="openai")
    from open_clip.transformer import QuickGELU

    assert loaded.info.quick_gelu
    assert isinstance(loaded.model.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)


def test_missing_tag_weights_say_where_clipterm_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ClipTermError) as err:
        load_model("ViT-B-32", pretrained="openai")
    assert err.value.code == ExitCode.NOT_FOUND
    assert "empty-hub" in err.value.message and "HF_HUB_OFFLINE" in err.value.message
    assert "--pretrained PATH" in err.value.hint


@pytest.mark.parametrize("name", ["ViT-B-33", "resnet-foo"])
def test_unknown_model_name(name):
    with pytest.raises(ClipTermError) as err:
        load_model(name, pretrained="openai")
    assert err.value.code == ExitCode.NOT_FOUND and "clipterm models" in err.value.hint


def test_missing_weights_file(tmp_path):
    with pytest.raises(ClipTermError) as err:
        load_model("ViT-B-32", pretrained=str(tmp_path / "nope.safetensors"))
    assert err.value.code == ExitCode.NOT_FOUND


@pytest.mark.parametrize("content", [b"", b"\x00garbage" * 100, b"PK\x03\x04truncated zip"])
@pytest.mark.parametrize("suffix", [".safetensors", ".bin", ".pt"])
def test_corrupt_weights_file(tmp_path, content, suffix):
    path = tmp_path / f"weights{suffix}"
    path.write_bytes(content)
    with pytest.raises(ClipTermError) as err:
        load_model("ViT-B-32", pretrained=str(path))
    assert err.value.code == ExitCode.INVALID_DATA and err.value.hint


class _Exploit:
    """A pickle payload that would create a file when unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    torch.save({"visual.proj": torch.zeros(1), "payload": _Exploit(str(marker))}, path)
    with pytest.raises(ClipTermError) as err:
        load_model("ViT-B-32", pretrained=str(path))
    assert "refused" in err.value.message and err.value.code == ExitCode.INVALID_DATA
    assert not marker.exists()
    plain = tmp_path / "plain.bin"
    plain.write_bytes(pickle.dumps({"x": _Exploit(str(marker))}))
    with pytest.raises(ClipTermError):
        load_model("ViT-B-32", pretrained=str(plain))
    assert not marker.exists()


def test_weights_for_another_arch_are_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "small.safetensors"
    save_file({"visual.proj": torch.zeros(3, 3)}, str(path))
    with pytest.raises(ClipTermError) as err:
        load_model("ViT-B-32", pretrained=str(path))
    assert "does not fit" in err.value.message


@pytest.mark.parametrize("arch, option", [("MobileCLIP-S1", "FastViT"), ("swin_base_patch4_window7_224", "Swin"),
                                          ("convnext_large_d", "timm_proj='mlp'")])
def test_unsupported_towers_are_refused_by_name(arch, option):
    with pytest.raises(ClipTermError) as err:
        load_model(arch, pretrained="x.safetensors")
    assert err.value.code == ExitCode.UNSUPPORTED and arch in err.value.message and option in err.value.message


def test_model_errors_reach_the_cli_as_one_line(cli, tmp_path):
    evil = tmp_path / "evil.bin"
    torch.save({"payload": _Exploit(str(tmp_path / "m"))}, evil)
    result = cli("toy", "eval", "--model", str(tmp_path / "not-a-model-dir"))
    assert result.code != 0 and "Traceback" not in result.err


# --------------------------------------------------------------------------- QuickGELU of a weights file (issue 34)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_quickgelu_weights_in_a_plain_file_never_build_a_silent_gelu_model(vit_b32_files, suffix):
    """`--model ViT-B-32 --pretrained FILE`: a plain file cannot say GELU from QuickGELU, so clipterm refuses to
    guess in one line naming both ways to say it; told, it equals the QuickGELU model."""
    reference, paths = vit_b32_files
    with pytest.raises(ClipTermError) as err:
        load_model("ViT-B-32", pretrained=str(paths[suffix]))
    assert "\n" not in str(err.value) and "QuickGELU" in err.value.message and paths[suffix].name in err.value.message
    assert "ViT-B-32-quickgelu" in err.value.hint and "--force-quick-gelu" in err.value.hint
    assert "--no-quick-gelu" in err.value.hint
    loaded = load_model("ViT-B-32", pretrained=str(paths[suffix]), quick_gelu=True)
    assert_same_model(loaded, reference)
    info = loaded.info
    assert info.quick_gelu and info.arch == "ViT-B-32-quickgelu" and info.quick_gelu_source == "--quick-gelu"


def test_an_open_clip_config_beside_the_file_decides_the_activation(vit_b32_files, tmp_path):
    """The hub layout: open_clip_config.json next to the weights says quick_gelu, and clipterm reads it."""
    reference, paths = vit_b32_files
    (tmp_path / "open_clip_model.safetensors").symlink_to(paths[".safetensors"])
    cfg = dict(resolved_model_cfg("ViT-B-32", "openai"))  # quick_gelu: true, as the hub's openai configs say
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    weights = str(tmp_path / "open_clip_model.safetensors")
    loaded = load_model("ViT-B-32", pretrained=weights)
    assert_same_model(loaded, reference)
    assert loaded.info.quick_gelu and loaded.info.quick_gelu_source.startswith("open_clip_config.json beside")
    with pytest.raises(ClipTermError) as err:  # the user and the config disagree: neither wins silently
        load_model("ViT-B-32", pretrained=weights, quick_gelu=False)
    assert "--no-quick-gelu says GELU" in err.value.message and "open_clip_config.json" in err.value.message


def test_what_a_weights_file_says_about_its_activation(tmp_path):
    """A checkpoint's own config, safetensors metadata and an open_clip config are read; nothing else is guessed."""
    from safetensors.torch import save_file

    state = {"visual.proj": torch.randn(4, 2)}
    torch.save({"state_dict": state, "model_cfg": {"embed_dim": 2, "quick_gelu": True, "vision_cfg": {}}},
               tmp_path / "checkpoint.pt")
    save_file(state, str(tmp_path / "meta.safetensors"), metadata={"open_clip_config": json.dumps(
        {"model_cfg": {"embed_dim": 2, "vision_cfg": {}}}), "format": "pt"})  # no quick_gelu in a model_cfg: GELU
    torch.save(state, tmp_path / "plain.pt")
    said = {name: read_weights(tmp_path / name).says for name in ("checkpoint.pt", "meta.safetensors", "plain.pt")}
    assert said == {"checkpoint.pt": [(True, "the config inside checkpoint.pt")],
                    "meta.safetensors": [(False, "the metadata of meta.safetensors")], "plain.pt": []}
    assert torch.equal(read_weights(tmp_path / "checkpoint.pt").state["visual.proj"], state["visual.proj"])


class _Holder(torch.nn.Module):
    def forward(self, x):
        return x


def _torchscript_archive(state: dict, path) -> None:
    """A TorchScript archive holding `state` as modules' buffers (the layout of OpenAI's .pt files), with OpenAI's
    int buffers beside them."""
    import warnings

    root = _Holder()
    root.register_buffer("input_resolution", torch.tensor(224))
    for name, tensor in state.items():
        *parents, leaf = name.split(".")
        module = root
        for part in parents:
            if part not in module._modules:
                module.add_module(part, _Holder())
            module = module._modules[part]
        module.register_buffer(leaf, tensor.clone())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(root, torch.zeros(1)), str(path))


def test_an_openai_torchscript_archive_is_read_as_quickgelu_tensors_without_running_it(tmp_path):
    """OpenAI's own .pt files are TorchScript archives (always QuickGELU): their tensors are read as data, equal to
    what torch.jit.load gives, and an archive whose data names anything but tensors is refused."""
    state = {"visual.conv1.weight": torch.randn(4, 3, 2, 2), "transformer.resblocks.0.ln_1.bias": torch.randn(4),
             "logit_scale": torch.tensor(4.6)}
    _torchscript_archive(state, tmp_path / "ViT-B-32.pt")
    weights = read_weights(tmp_path / "ViT-B-32.pt")
    assert weights.says == [(True, OPENAI_ARCHIVE)]
    assert weights.state.keys() == state.keys() and all(torch.equal(weights.state[k], v) for k, v in state.items())
    marker = tmp_path / "pwned"
    with zipfile.ZipFile(tmp_path / "evil.pt", "w") as archive:
        archive.writestr("evil/data.pkl", pickle.dumps(_Exploit(str(marker))))
        archive.writestr("evil/constants.pkl", pickle.dumps(()))
        archive.writestr("evil/code/__torch__.py", "")
    with pytest.raises(ClipTermError) as err:
        read_weights(tmp_path / "evil.pt")
    assert err.value.code == ExitCode.INVALID_DATA and not marker.exists()


def test_the_activation_is_asked_for_only_where_open_clip_has_both():
    assert choose_quick_gelu("ViT-B-32", []) == (None, "")  # ViT-B-32-quickgelu exists: a file must say
    assert choose_quick_gelu("ViT-B-32-quickgelu", [(True, "the arch name")]) == (True, "the arch name")
    assert choose_quick_gelu("ViT-SO400M-14-SigLIP", [])[0] is False  # no QuickGELU variant to be confused with
    with pytest.raises(ClipTermError):
        choose_quick_gelu("ViT-B-32", [(False, "--no-quick-gelu"), (True, "the openai tag")])


def test_a_cache_records_the_activation_and_reloads_it(cli, vit_b32_files, tmp_path):
    """The CLI refuses the plain file in one line before writing anything; `--force-quick-gelu` builds, the
    manifest says so and why, the cache's model comes back QuickGELU, and the GELU model of the same file is refused."""
    from clipterm.cache.reader import check_model, model_for_cache, open_cache

    _, paths = vit_b32_files
    args = ("cache", "build", "--images", "toy:2", "--model", "ViT-B-32", "--pretrained", str(paths[".pt"]),
            "--name", "b32", "--cache-dir", str(tmp_path), "--device", "cpu", "--workers", "0")
    refused = cli(*args)
    assert refused.code == ExitCode.USAGE and len([l for l in refused.err.splitlines() if l.startswith("error:")]) == 1
    assert "--force-quick-gelu" in refused.err and not (tmp_path / "b32").exists()
    assert cli(*args, "--force-quick-gelu").code == 0
    reader = open_cache(tmp_path / "b32")
    built = reader.manifest["model"]
    assert built["quick_gelu"] is True and built["quick_gelu_source"] == "--quick-gelu"
    assert model_for_cache(reader).info.quick_gelu
    with pytest.raises(ClipTermError) as err:  # what `load_model(..., quick_gelu=False).info` would be
        check_model(reader, {**built, "arch": "ViT-B-32", "quick_gelu": False})
    assert "QuickGELU" in err.value.message and err.value.code == ExitCode.INVALID_DATA


# --------------------------------------------------------------------------- bad models (issue 28)


def test_a_model_whose_image_and_text_embeddings_differ_in_width_is_refused_when_it_loads(tmp_path):
    """With no text projection, a text tower 24 wide gives 24-wide text embeddings beside 16-wide image ones."""
    folder = save_model_folder(tmp_path / "wide-text", tiny_vit_config(text={"proj_type": "none", "width": 24}))
    with pytest.raises(ClipTermError) as err:
        load_model(f"local-dir:{folder}")
    assert "16" in err.value.message and "24" in err.value.message and err.value.hint
    assert err.value.code == ExitCode.INVALID_DATA
