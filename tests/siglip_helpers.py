"""A random-weight tiny SigLIP saved as a local open_clip model folder, for end-to-end tests on a MAP-head tower.

Its image tower is timm's `test_vit3`: a VisionTransformer with a MAP head (`AttentionPoolLatent`), LayerScale, a
register token and `pool_include_prefix`, 9 blocks of 96 wide on 160 px (its timm default), i.e. SigLIP's structure at a tiny size (open_clip
builds timm towers from the name alone, so the real SigLIP archs cannot be shrunk through a config). The text tower
is a tiny open_clip one with SigLIP's logit bias."""

from __future__ import annotations

import json
from pathlib import Path

import torch

CONFIG = {
    "model_cfg": {
        "embed_dim": 96,
        "init_logit_bias": -10,
        "vision_cfg": {"image_size": 160, "timm_model_name": "test_vit3", "timm_model_pretrained": False,
                       "timm_pool": "map", "timm_proj": "none"},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    },
    "preprocess_cfg": {"size": 160, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic",
                       "resize_mode": "shortest"},
}


def save_tiny_siglip(folder: Path, seed: int = 0) -> Path:
    """Write open_clip_config.json and open_clip_model.safetensors of a random tiny SigLIP into `folder`."""
    import open_clip
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps(CONFIG))
    torch.manual_seed(seed)
    model = open_clip.create_model(f"local-dir:{folder}", load_weights=False)
    with torch.no_grad():  # move LayerScale, norms and biases off their init so nothing is trivially 0 or 1
        for name, param in model.visual.named_parameters():
            if param.dim() == 1 or name.endswith("gamma"):
                param.mul_(torch.empty_like(param).uniform_(0.5, 1.5)).add_(0.1 * torch.randn_like(param))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder
