"""Load CLIP models: the built-in `toy`, an open_clip arch + pretrained tag, or a local weights file.

Nothing here downloads weights unless asked (`allow_download=True`), and never when
`HF_HUB_OFFLINE=1`: tags are resolved to files already in the local caches.
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from clipterm import locations
from clipterm.errors import ClipTermError, ExitCode
from clipterm.names import ModelShape
from clipterm.vit.support import (
    arch_config,
    choose_quick_gelu,
    needs_quick_gelu,
    refuse_unsupported,
    unknown_model,
    unknown_quick_gelu,
)
from clipterm.vit.weights import OPEN_CLIP_CONFIG, read_weights

TOY = "toy"


def is_toy(spec: str | None) -> bool:
    """A built-in toy model (`toy`, `toy-v1`, `toy-rn`, `toy-rn-v1`): trained by clipterm on its synthetic world, shipped in the package."""
    return spec in locations.TOY_MODEL_DIRS
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass(frozen=True)
class ModelInfo:
    """What analyses need to know about a model, and what a cache records about it."""

    spec: str  # what the user asked for: "toy", "ViT-B-32", a local-dir path
    arch: str  # open_clip arch name (with -quickgelu when that was forced)
    pretrained: str | None  # tag, weights path, or None for the toy
    layers: int
    heads: int
    width: int
    head_dim: int
    mlp_width: int
    embed_dim: int
    image_size: int
    patch_size: int
    context_length: int
    quick_gelu: bool
    weights_path: str | None
    weights_sha256: str | None
    tower: str = "vit"  # "resnet": layers=1 (the attention pool), mlp_width = channels of the last stage;
    # "convnext": layers = blocks of the last stage (`stage`), no heads, mlp_width = channels of the last stage
    pool: str = "tok"  # how the tower pools its last tokens: tok (class token), avg, attn (MAP head / CoCa's pooler)
    pool_heads: int = 0  # attn: the pool's heads, their width, and whether an MLP follows (a MAP head)
    pool_head_dim: int = 0
    pool_mlp: bool = False
    stage: int | None = None  # convnext: the last stage's number
    family: str = ""  # e.g. "timm VisionTransformer (map)" (clipterm.vit.towers.family)
    quick_gelu_source: str = ""  # what decided quick_gelu: "the openai tag", "open_clip_config.json beside w.pt", ...

    @property
    def shape(self) -> ModelShape:
        if self.tower == "resnet":
            return resnet_shape(self.heads, self.mlp_width)
        if self.tower == "convnext":
            return ModelShape(self.layers, 0, self.mlp_width, tower="convnext", stage=self.stage, neuron_layer=self.stage)
        return ModelShape(self.layers, self.heads, self.mlp_width, pool_heads=self.pool_heads, pool_mlp=self.pool_mlp)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LoadedModel:
    model: Any  # open_clip.CLIP, in eval mode
    preprocess: Any  # PIL image -> (3, S, S) tensor
    tokenizer: Any  # list[str] -> (n, context) int tensor
    info: ModelInfo
    text_tokens: Any = None  # (K,) the token ids a pruned weights file keeps (vit/pruned.py); None: every token


# --------------------------------------------------------------------------- finding weights


def find_local_weights(arch: str, pretrained: str) -> tuple[Path | None, list[Path]]:
    """The weights file of a pretrained tag if already on disk, and every place that was looked at."""
    from open_clip.pretrained import get_pretrained_cfg

    tag = get_pretrained_cfg(arch, pretrained) or {}
    hub_dir, url_dir = locations.hub_cache_dirs()
    looked: list[Path] = []
    if tag.get("hf_hub"):
        repo, filename = os.path.split(tag["hf_hub"].rstrip("/")) if not tag["hf_hub"].endswith("/") else (tag["hf_hub"].rstrip("/"), "")
        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        if filename.endswith((".bin", ".pth")):
            names.insert(0, filename.rsplit(".", 1)[0] + ".safetensors")
        snapshots = hub_dir / f"models--{repo.replace('/', '--')}" / "snapshots"
        looked.append(snapshots)
        for snap in sorted(snapshots.glob("*")) if snapshots.is_dir() else []:
            for name in names:
                if (snap / name).is_file():
                    return snap / name, looked
    if tag.get("url"):
        candidate = url_dir / os.path.basename(tag["url"])
        looked.append(candidate)
        if candidate.is_file():
            return candidate, looked
    return None, looked


def weights_sha256(path: Path) -> str:
    """sha256 of a weights file, memoised on disk by (path, size, mtime) because real weights are large."""
    from clipterm.files import atomic_write, file_sha256

    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    memo_path = locations.cache_root()[0] / ".weights-sha256.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    if key not in memo:
        memo[key] = file_sha256(path)
        if stat.st_size > 50 << 20:  # only worth remembering for big files
            try:
                memo_path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(memo_path, json.dumps(memo).encode())
            except OSError:
                pass
    return memo[key]


# --------------------------------------------------------------------------- loading


def load_model(
    spec: str = TOY,
    pretrained: str | None = None,
    device: str = "cpu",
    allow_download: bool = False,
    quick_gelu: bool | None = None,
    quick_gelu_source: str | None = None,
) -> LoadedModel:
    """Load a model from a spec: `toy`, `local-dir:PATH` (or a folder), or an open_clip arch + `pretrained`.

    `pretrained` is a tag found in the local caches, or a path to `.safetensors`/`.bin`/`.pt` weights.
    `quick_gelu` is the user's word on the activation (`--quick-gelu`; `quick_gelu_source` says who gave it): a
    weights file whose arch has a QuickGELU twin and which does not say its own activation needs it.
    """
    import open_clip

    said = [] if quick_gelu is None else [(quick_gelu, quick_gelu_source or ("--quick-gelu" if quick_gelu else "--no-quick-gelu"))]
    if is_toy(spec) or spec.startswith("local-dir:") or Path(spec).is_dir():
        folder = locations.TOY_MODEL_DIRS[spec] if is_toy(spec) else Path(spec.removeprefix("local-dir:"))
        return _load_local_dir(folder, spec, device, said)
    if arch_config(spec) is None:
        raise unknown_model(spec)
    refuse_unsupported(spec, arch_config(spec))
    if pretrained is None:
        raise ClipTermError(
            f"{spec} needs weights: pass --pretrained TAG or --pretrained PATH",
            hint=f"tags for {spec}: {', '.join(open_clip.list_pretrained_tags_by_model(spec)) or 'none'}",
        )
    is_path = Path(pretrained).suffix in WEIGHT_SUFFIXES or os.sep in pretrained or Path(pretrained).exists()
    if is_path:
        weights = Path(pretrained).expanduser()
        read = read_weights(weights)
        if needs_quick_gelu(spec, None):
            said.append((True, f"the arch name {spec}"))
        said += read.says
    else:
        if pretrained not in open_clip.list_pretrained_tags_by_model(spec):
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(spec)) or "none"
            raise ClipTermError(f"unknown pretrained tag {pretrained!r} for {spec}", hint=f"known tags: {tags}; or give a weights file path")
        said.append((needs_quick_gelu(spec, pretrained), f"the {pretrained} tag"))  # open_clip's own word, not a file's
        weights = _weights_for_tag(spec, pretrained, allow_download)
        read = read_weights(weights)
    choice, source = choose_quick_gelu(spec, said)
    with _quiet_open_clip():
        model, _, preprocess = open_clip.create_model_and_transforms(
            spec, pretrained=None, force_quick_gelu=bool(choice), **_preprocess_overrides(spec, None if is_path else pretrained)
        )
    _load_checked(model, read.state, spec, weights)
    if choice is None:  # refused only now, so that weights of another arch are told so first
        raise unknown_quick_gelu(spec, weights.name)
    info = _info(model, spec=spec, arch=spec + ("-quickgelu" if choice and "quickgelu" not in spec else ""),
                 pretrained=pretrained, weights=weights, quick_gelu=choice, quick_gelu_source=source)
    refuse_mismatched_widths(model, info)
    return LoadedModel(model.to(device).eval(), preprocess, tokenizer_for(spec), info)


def _load_checked(model, state: dict, spec: str, weights: Path) -> None:
    """Load a state dict strictly into an open_clip model built for `spec`; a file of another arch is one line."""
    from open_clip.model import CustomTextCLIP, convert_to_custom_text_state_dict, resize_pos_embed

    try:
        if isinstance(model, CustomTextCLIP):
            state = convert_to_custom_text_state_dict(state)
        resize_pos_embed(state, model)
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ClipTermError(
            f"{weights.name} does not fit {spec}: {str(exc).splitlines()[0][:160]}",
            hint="check that --model names the architecture these weights were trained for",
            code=ExitCode.INVALID_DATA,
        ) from None


def refuse_mismatched_widths(model, info: ModelInfo) -> None:
    """CLIP compares image and text embeddings, so they must be equally wide; a model whose are not is refused here,
    rather than crashing every analysis with a shape error."""
    import torch

    if not hasattr(model, "encode_text"):
        return
    device = next(model.parameters()).device
    with torch.no_grad():  # one token is enough: the width is the projection's, not the context's
        try:
            text_width = model.encode_text(torch.zeros(1, 1, dtype=torch.long, device=device)).shape[-1]
        except RuntimeError:  # a text tower that wants its whole context
            text_width = model.encode_text(torch.zeros(1, info.context_length, dtype=torch.long, device=device)).shape[-1]
    if text_width != info.embed_dim:
        raise ClipTermError(
            f"{info.spec} cannot be used: its image embeddings are {info.embed_dim} wide and its text embeddings "
            f"{text_width}, so they cannot be compared",
            hint="check the model config's embed_dim, the text tower's proj_type and the image tower's projection",
            code=ExitCode.INVALID_DATA,
        )


class _MissingTokenizer:
    """Stands in for a tokenizer that could not be loaded (a SigLIP's Hugging Face tokenizer offline, or without
    transformers): image-only work (a cache build) runs; the first text to tokenize gets the reason in one line."""

    def __init__(self, spec: str, reason: str):
        self.spec, self.reason = spec, reason

    def __call__(self, *args, **kwargs):
        raise ClipTermError(f"the text tokenizer of {self.spec} is not available: {self.reason}",
                            hint="its files come from the Hugging Face hub: run once online (unset HF_HUB_OFFLINE), "
                                 "or pip install transformers", code=ExitCode.NOT_FOUND)

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        self(None)


def tokenizer_for(spec: str):
    """open_clip's tokenizer for a model; a stand-in that explains itself when it cannot be loaded here."""
    import open_clip

    try:
        return open_clip.get_tokenizer(spec)
    except (OSError, ImportError, ValueError) as exc:
        return _MissingTokenizer(spec, f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}")


@contextmanager
def _quiet_open_clip():
    """open_clip warns that no weights were loaded when we build first and load our checked state dict after."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(level)


def _weights_for_tag(arch: str, tag: str, allow_download: bool) -> Path:
    found, looked = find_local_weights(arch, tag)
    if found is not None:
        return found
    allow_download = allow_download or os.environ.get("CLIPTERM_DOWNLOAD", "") == "1"
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    if allow_download and not offline:
        from open_clip.pretrained import download_pretrained, get_pretrained_cfg

        try:
            return Path(download_pretrained(get_pretrained_cfg(arch, tag)))
        except Exception as exc:
            raise ClipTermError(f"download of {arch} {tag} failed: {exc}", hint="check the network, or pass --pretrained PATH", code=ExitCode.NOT_FOUND) from None
    places = "; ".join(str(p) for p in looked) or "nowhere (the tag names no source)"
    why = "HF_HUB_OFFLINE=1 is set" if offline else "downloads are off by default"
    raise ClipTermError(
        f"no local weights for {arch} {tag} (looked in {places}; {why})",
        hint="set CLIPTERM_DOWNLOAD=1 to fetch them once (needs internet), or pass --pretrained PATH to a weights file",
        code=ExitCode.NOT_FOUND,
    )


def _preprocess_overrides(arch: str, tag: str | None) -> dict:
    from open_clip.pretrained import get_pretrained_cfg

    tag_cfg = get_pretrained_cfg(arch, tag) if tag else {}
    keys = {"mean": "image_mean", "std": "image_std", "interpolation": "image_interpolation", "resize_mode": "image_resize_mode"}
    return {arg: tag_cfg[key] for key, arg in keys.items() if tag_cfg and key in tag_cfg}


def _load_local_dir(folder: Path, spec: str, device: str, said: list[tuple[bool, str]]) -> LoadedModel:
    import open_clip

    config = folder / OPEN_CLIP_CONFIG
    weights = folder / "open_clip_model.safetensors"
    if not config.is_file() or not weights.is_file():
        where = f"the installed package is missing the {spec} model" if is_toy(spec) else f"{folder} is not an open_clip model folder"
        raise ClipTermError(
            f"{where} (need open_clip_config.json and open_clip_model.safetensors)",
            hint="reinstall clipterm" if is_toy(spec) else "save one with clipterm's toy recipe or open_clip's push_to_hf_hub layout",
            code=ExitCode.NOT_FOUND,
        )
    from clipterm.vit.pruned import unprune

    cfg = json.loads(config.read_text())["model_cfg"]
    read = read_weights(weights)
    quick_gelu, source = choose_quick_gelu(spec, said + read.says)  # the folder's config decides; an option may only agree
    state, kept = unprune(read.state, cfg.get("text_cfg", {}).get("vocab_size", 49408))
    with _quiet_open_clip():
        model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}", load_weights=False)
    model.load_state_dict(state, strict=True)
    refuse_unsupported(spec, cfg)
    info = _info(model, spec=spec, arch=spec if is_toy(spec) else f"local-dir:{folder}", pretrained=None,
                 weights=weights, quick_gelu=bool(quick_gelu), quick_gelu_source=source)
    refuse_mismatched_widths(model, info)
    return LoadedModel(model.to(device).eval(), preprocess, tokenizer_for(f"local-dir:{folder}"), info, kept)


def resnet_shape(heads: int, channels: int) -> ModelShape:
    """A ModifiedResNet's names: one stored attention layer (the pool, slot 0); the channels of stage L3 as neurons."""
    from clipterm.vit.resnet import STAGES

    return ModelShape(layers=1, heads=heads, neurons=channels, tower="resnet", pool_layer=0, neuron_layer=STAGES - 1)


def _resnet_info(model, **common) -> ModelInfo:
    visual = model.visual
    pool = visual.attnpool
    channels, heads = pool.v_proj.in_features, pool.num_heads
    return ModelInfo(layers=1, heads=heads, width=channels, head_dim=channels // heads, mlp_width=channels,
                     embed_dim=visual.output_dim, image_size=int(visual.image_size), patch_size=32,
                     context_length=int(model.context_length), tower="resnet", **common)


def _info(model, spec: str, arch: str, pretrained: str | None, weights: Path | None, quick_gelu: bool,
          quick_gelu_source: str) -> ModelInfo:
    from open_clip.modified_resnet import ModifiedResNet

    from clipterm.vit.towers import family

    visual = model.visual
    common = {"spec": spec, "arch": arch, "pretrained": str(pretrained) if pretrained is not None else None,
              "quick_gelu": quick_gelu, "quick_gelu_source": quick_gelu_source,
              "weights_path": str(weights) if weights else None, "weights_sha256": weights_sha256(weights) if weights else None}
    if isinstance(visual, ModifiedResNet):
        return _resnet_info(model, **common, family=family(model))
    if hasattr(visual, "trunk"):
        return tower_info(model, **common)
    block = visual.transformer.resblocks[0]
    width = visual.transformer.width
    heads = block.attn.num_heads
    image_size = visual.image_size[0] if isinstance(visual.image_size, (tuple, list)) else visual.image_size
    patch = visual.patch_size[0] if isinstance(visual.patch_size, (tuple, list)) else visual.patch_size
    return ModelInfo(
        layers=len(visual.transformer.resblocks),
        heads=heads,
        width=width,
        head_dim=width // heads,
        mlp_width=block.mlp.c_fc.out_features,
        embed_dim=visual.output_dim,
        image_size=int(image_size),
        patch_size=int(patch),
        context_length=int(model.context_length),
        **common, **_native_pool(visual), family=family(model),
    )


def _native_pool(visual) -> dict[str, Any]:
    if getattr(visual, "attn_pool", None) is None:
        return {"pool": "avg" if visual.pool_type == "avg" else "tok"}
    attn = visual.attn_pool.attn
    return {"pool": "attn", "pool_heads": attn.num_heads, "pool_head_dim": attn.embed_dim // attn.num_heads}


def tower_info(model, **common) -> ModelInfo:
    """ModelInfo of a timm tower (open_clip's TimmModel): a transformer's blocks, or a ConvNeXt's last stage."""
    from clipterm.vit import convnext
    from clipterm.vit.towers import family

    visual = getattr(model, "visual", model)
    trunk = visual.trunk
    size = visual.image_size[0] if isinstance(visual.image_size, (tuple, list)) else visual.image_size
    context = int(getattr(model, "context_length", 0) or 0)
    if convnext.is_convnext(model):
        blocks = trunk.stages[-1].blocks
        return ModelInfo(layers=len(blocks), heads=0, width=trunk.num_features, head_dim=0,
                         mlp_width=trunk.num_features, embed_dim=_embed_dim(visual, trunk.num_features),
                         image_size=int(size), patch_size=32, context_length=context, tower="convnext",
                         stage=len(trunk.stages) - 1, pool="avg", family=family(model), **common)
    attn = trunk.blocks[0].attn
    width = trunk.embed_dim
    grid = getattr(trunk.patch_embed, "grid_size", None) or (int(size) // 16,)
    pool = getattr(trunk, "attn_pool", None)
    extra: dict[str, Any] = {"pool": "attn" if pool is not None else ("tok" if trunk.global_pool == "token" else "avg")}
    if pool is not None:
        extra.update(pool_heads=pool.num_heads, pool_head_dim=pool.head_dim, pool_mlp=pool.mlp is not None)
    pooled = pool.proj.out_features if pool is not None else width
    return ModelInfo(layers=len(trunk.blocks), heads=attn.num_heads, width=width,
                     head_dim=attn.proj.in_features // attn.num_heads, mlp_width=_last_linear(trunk.blocks[0].mlp).in_features,
                     embed_dim=_embed_dim(visual, pooled), image_size=int(size), patch_size=max(1, int(size) // int(grid[0])),
                     context_length=context, family=family(model), **extra, **common)


def _last_linear(module):
    """The last nn.Linear (or 1x1 conv) of an MLP: its input width is the number of neurons."""
    from torch import nn

    linears = [m for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return linears[-1] if not isinstance(linears[-1], nn.Conv2d) else _Width(linears[-1].in_channels)


class _Width:
    def __init__(self, width: int):
        self.in_features = width


def _embed_dim(visual, pooled_width: int) -> int:
    """The embedding's width: the last linear map after the pool (timm's head, open_clip's proj), else the pool's."""
    from torch import nn

    trunk = visual.trunk
    for module in (visual.head, getattr(trunk, "head", None)):
        linears = [m for m in module.modules() if isinstance(m, nn.Linear)] if module is not None else []
        if linears:
            return linears[-1].out_features
    return pooled_width


# --------------------------------------------------------------------------- what is available


def model_shape(spec: str = TOY) -> ModelShape:
    """Layers, heads and MLP width from the model's config alone, without loading weights."""
    if is_toy(spec) or spec.startswith("local-dir:") or Path(spec).is_dir():
        folder = locations.TOY_MODEL_DIRS[spec] if is_toy(spec) else Path(spec.removeprefix("local-dir:"))
        try:
            cfg = json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]
        except (OSError, ValueError, KeyError):
            raise ClipTermError(f"no open_clip config in {folder}", hint="pass a model folder with open_clip_config.json",
                                code=ExitCode.NOT_FOUND) from None
    else:
        cfg = arch_config(spec)
        if cfg is None:
            raise unknown_model(spec)
    vision = cfg["vision_cfg"]
    if vision.get("timm_model_name"):
        refuse_unsupported(spec, cfg)
        return _timm_shape(vision)
    if isinstance(vision.get("layers"), (list, tuple)) and not vision.get("timm_model_name"):
        width = vision.get("width", 64) * 32  # channels of the last stage
        return resnet_shape(width // vision.get("head_width", 64), width)
    if not isinstance(vision.get("layers", 12), int) or vision.get("timm_model_name"):
        refuse_unsupported(spec, cfg)
    width = vision.get("width", 768)
    pool_heads = vision.get("attn_pooler_heads", 8) if vision.get("attentional_pool") else 0  # CoCa's pooler
    return ModelShape(layers=vision.get("layers", 12), heads=width // vision.get("head_width", 64),
                      neurons=int(width * vision.get("mlp_ratio", 4.0)), pool_heads=pool_heads)


def _timm_shape(vision: dict) -> ModelShape:
    """A timm tower's names, from the timm model built on the meta device (no weights, no memory)."""
    return timm_tower_info(vision).shape


def timm_tower_info(vision: dict, arch: str = "") -> Any:
    """`tower_info` of a timm tower from its open_clip vision config, built on the meta device (no weights)."""
    import timm
    import torch

    kwargs = {"num_classes": 0}
    if vision.get("timm_pool"):
        kwargs["global_pool"] = vision["timm_pool"]
    with torch.device("meta"):
        trunk = timm.create_model(vision["timm_model_name"], pretrained=False, **kwargs)
    wrapper = torch.nn.Module()
    wrapper.trunk, wrapper.head, wrapper.image_size = trunk, torch.nn.Identity(), vision.get("image_size", 224)
    shell = torch.nn.Module()
    shell.visual = wrapper
    return tower_info(shell, spec=arch, arch=arch, pretrained=None, quick_gelu=False, weights_path=None, weights_sha256=None)


def pick_device(device: str, local_rank: int = 0) -> str:
    """`auto` -> CUDA when torch sees it, else CPU; `cuda` -> this rank's GPU under torchrun. Checked: one line if absent."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ClipTermError("--device cuda, but torch sees no CUDA device", hint="use --device cpu, or check `clipterm doctor`",
                                code=ExitCode.UNSUPPORTED)
        if device == "cuda":
            device = f"cuda:{local_rank % torch.cuda.device_count()}"
    elif device != "cpu":
        raise ClipTermError(f"unknown device {device!r}", hint="use auto, cpu, cuda or cuda:N")
    return device
