"""Tiny random-weight vision towers for every open_clip arch: the arch's own config, shrunk for speed.

Native ViTs keep their options (pooling, LayerScale, QuickGELU, ...) with 2 layers of 2 heads on a 3x3 grid; timm
towers keep their timm architecture (blocks, rotary, SwiGLU, MAP head, hybrid stems) with 2 blocks, a small width
where the stem allows it, and a small image; ResNets keep their stages with one block each. Every 1-D parameter
(norm gains and biases, LayerScale, biases) is moved off its init, so nothing is trivially 0 or 1."""

from __future__ import annotations

import contextlib
import json

import torch


def _timm_shrink(module: str) -> dict:
    """create_model overrides for a timm module's towers (img_size is filled in from the image size)."""
    small = {"depth": 2, "embed_dim": 64, "num_heads": 2}
    if module == "vision_transformer_hybrid":  # MobileCLIP's MCi: its ConvStem, narrower
        from functools import partial

        from timm.layers import HybridEmbed
        from timm.models.vision_transformer_hybrid import ConvStem

        stem = ConvStem(channels=(16, 16, 64), stride=(4, 2, 2), kernel_size=(4, 2, 2), padding=0,
                        act_layer=torch.nn.GELU)
        return dict(small, embed_layer=partial(HybridEmbed, backbone=stem, proj=False))
    if module == "vitamin":  # ViTamin's MbConv stages, narrower and one block each
        from timm.models.vitamin import VitCfg, VitConvCfg

        return dict(small, embed_cfg=VitCfg(embed_dim=(16, 32, 64), depths=(1, 1, 1), stem_width=16, head_type="1d",
                                            conv_cfg=VitConvCfg(norm_layer="layernorm2d", norm_eps=1e-6)))
    if module == "convnext":
        return {"depths": (1, 1, 1, 2), "dims": (8, 16, 24, 32)}
    return small


def vision_key(arch: str) -> str:
    """What the image tower depends on: the vision config, the embedding size and QuickGELU."""
    import open_clip

    cfg = open_clip.get_model_config(arch)
    return json.dumps({"vision": cfg["vision_cfg"], "embed_dim": cfg["embed_dim"],
                       "quick_gelu": bool(cfg.get("quick_gelu"))}, sort_keys=True)


def image_size(vision: dict) -> int:
    from clipterm.vit.support import timm_module

    name = vision.get("timm_model_name")
    if name:
        module = timm_module(name)
        if module in ("vision_transformer_hybrid", "vitamin", "convnext"):
            return 64

        return 3 * _timm_patch(name)
    if isinstance(vision.get("layers"), list):
        return 64
    return 3 * vision.get("patch_size", 16)


def _timm_patch(name: str) -> int:
    import re

    match = re.search(r"patch(\d+)", name)
    return int(match[1]) if match else 16


@contextlib.contextmanager
def shrunk_timm(module: str, size: int):
    import open_clip.timm_model as tm

    real = tm.timm.create_model

    def create(name, **kwargs):
        extra = _timm_shrink(module)
        if module != "convnext":
            extra["img_size"] = size
        return real(name, **{**kwargs, **extra})

    tm.timm.create_model = create
    try:
        yield
    finally:
        tm.timm.create_model = real


def tiny_tower(key: str, seed: int = 0):
    """The image tower of `key` (vision_key), shrunk, in eval mode, with its 1-D parameters off their init."""
    from open_clip.model import _build_vision_tower

    from clipterm.vit.support import timm_module

    spec = json.loads(key)
    vision = dict(spec["vision"])
    size = image_size(vision)
    vision["image_size"] = size
    torch.manual_seed(seed)
    context = contextlib.nullcontext()
    if vision.get("timm_model_name"):
        context = shrunk_timm(timm_module(vision["timm_model_name"]), size)
    elif isinstance(vision.get("layers"), list):  # ModifiedResNet: one block per stage, 256 channels at the end
        vision.update(layers=[1, 1, 1, 1], width=8)
    else:
        head_width = vision.get("head_width", 64)
        vision.update(layers=2, width=2 * head_width)
        if vision.get("attentional_pool"):
            vision.update(attn_pooler_queries=4, attn_pooler_heads=2)
    with context:
        visual = _build_vision_tower(spec["embed_dim"], vision, quick_gelu=spec["quick_gelu"]).eval()
    with torch.no_grad():
        for name, param in visual.named_parameters():
            if param.dim() == 1 or name.endswith(("head_scale", "logit_scale", "gamma_1", "gamma_2", "gamma")):
                param.mul_(torch.empty_like(param).uniform_(0.5, 1.5)).add_(0.1 * torch.randn_like(param))
        for module in visual.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return visual, size


def images(n: int, size: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))  # (n, 3, S, S)


def encode(visual, batch: torch.Tensor) -> torch.Tensor:
    """The tower's own embedding (a CoCa tower also returns its tokens)."""
    with torch.no_grad():
        out = visual(batch)
    return out[0] if isinstance(out, tuple) else out


def save_model_folder(folder, config: dict, seed: int = 0):
    """Write an open_clip model folder of random weights for `config` ({"model_cfg", "preprocess_cfg"}): its
    open_clip_config.json and open_clip_model.safetensors, 1-D parameters off their init. It loads as
    `local-dir:FOLDER`."""
    import open_clip
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    torch.manual_seed(seed)
    model = open_clip.create_model(f"local-dir:{folder}", load_weights=False)
    with torch.no_grad():  # move LayerScale, norms and biases off their init so nothing is trivially 0 or 1
        for name, param in model.visual.named_parameters():
            if param.dim() == 1 or name.endswith("gamma"):
                param.mul_(torch.empty_like(param).uniform_(0.5, 1.5)).add_(0.1 * torch.randn_like(param))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder


def tiny_vit_config(text: dict | None = None, **vision) -> dict:
    """The config of a 2-layer open_clip ViT (width 32, 2 heads, 16 px in 8 px patches, embeddings 16 wide) with a
    one-layer text tower; `vision` and `text` override their configs."""
    return {
        "model_cfg": {"embed_dim": 16,
                      "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 32, "head_width": 16, "layers": 2, **vision},
                      "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1,
                                   **(text or {})}},
        "preprocess_cfg": {"size": 16, "mean": [0.5] * 3, "std": [0.5] * 3},
    }
