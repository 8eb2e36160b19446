"""A random-weight tiny SigLIP saved as a local open_clip model folder, for end-to-end tests on a MAP-head tower.

Its image tower is timm's `test_vit3`: a VisionTransformer with a MAP head (`AttentionPoolLatent`), LayerScale, a
register token and `pool_include_prefix`, 9 blocks of 96 wide on 160 px (its timm default), i.e. SigLIP's structure at a tiny size (open_clip
builds timm towers from the name alone, so the real SigLIP archs cannot be shrunk through a config). The text tower
is a tiny open_clip one with SigLIP's logit bias."""

from __future__ import annotations

from pathlib import Path

from tower_helpers import save_model_folder

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
    return save_model_folder(folder, CONFIG, seed=seed)
