"""Model loading: the toy, open_clip archs with local weights, QuickGELU for openai tags, and refusals."""

import os
import pickle

import pytest
import torch

from clipterm.errors import ClipTermError, ExitCode
from clipterm.vit.models import load_model, model_shape
from clipterm.vit.support import resolved_model_cfg


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
