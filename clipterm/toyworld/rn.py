"""`toy-rn`: the toy recipe with a small ModifiedResNet image tower instead of the toy ViT.

The world, the captions, the text tower and the schedule are the toy recipe's (`toyworld/train.py`); only the
vision config differs: one Bottleneck per stage, width 16 (512 channels into the attention pool, 8 pool heads
of 64), at the toy's 64 px (a 2 x 2 grid into the pool). Train it with `clipterm toy train OUT --arch rn`.
Width 16, not the issue's example 32, because of the 10 MB budget: at width 32 the image tower alone is 6.1M
parameters (3.3M in the pool's four 1024 x 1024 projections), 12.2 MB in fp16. At width 16 the tower is 1.55M
(3.1 MB), the text transformer 0.8M (1.6 MB), and the 49408-token embedding (6.3M, 12.6 MB) ships pruned to
the rows the toy's texts use (`vit/pruned.py`).
"""

from __future__ import annotations

from clipterm.toyworld.recipe import MODEL_CFG

RN_MODEL_CFG = {
    "embed_dim": MODEL_CFG["embed_dim"],
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16},  # heads = width * 32 // 64 = 8
    "text_cfg": MODEL_CFG["text_cfg"],
}
ARCHS = {"vit": MODEL_CFG, "rn": RN_MODEL_CFG}
