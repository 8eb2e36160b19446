"""`toy-rn`: the toy recipe with a small ModifiedResNet image tower instead of the toy ViT.

The world, the captions, the text tower and the schedule are the toy recipe's (`toyworld/train.py`); only the
vision config differs: one Bottleneck per stage, width 32 (1024 channels into the attention pool, 16 pool
heads of 64), at the toy's 64 px (a 2 x 2 grid into the pool). Train it with `clipterm toy train OUT --arch rn`.
In fp16 it is about 25 MB: 12.4M parameters, half of them the toy text tower's (its 49408-token embedding alone
is 6.3M), so the issue's 10 MB needs a smaller vocabulary, not a smaller ResNet.
"""

from __future__ import annotations

from clipterm.toyworld.recipe import MODEL_CFG

RN_MODEL_CFG = {
    "embed_dim": MODEL_CFG["embed_dim"],
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 32},  # heads = width * 32 // 64 = 16
    "text_cfg": MODEL_CFG["text_cfg"],
}
ARCHS = {"vit": MODEL_CFG, "rn": RN_MODEL_CFG}
