"""The toy CLIP's recipe: model config, preprocessing, and how each world version is trained.

One place for the constants that training, evaluation and the tests share, so that
`train.py` and `evaluate.py` depend on this module and never on each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)

MODEL_CFG = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "layers": 6, "width": 128, "head_width": 16, "patch_size": 8, "mlp_ratio": 4.0},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 4},
}
PREPROCESS_CFG = {"size": 64, "mean": list(MEAN), "std": list(STD), "interpolation": "bicubic", "resize_mode": "shortest"}


@dataclass(frozen=True)
class Recipe:
    """How batches are drawn for one world version. World 1's recipe is the one the shipped toy was trained with."""

    world: int  # world version the scenes come from (see world.py)
    group: int = 4  # scenes per hard-negative group
    # World 2: each group varies one attribute, drawn with these weights (None: world 1's mixed variants).
    attribute_weights: dict[str, float] | None = None
    p_single: float = 0.3  # share of captions that are a zero-shot prompt of one task
    dropout: float = 0.15  # chance that a caption leaves out an attribute (never the one its group varies)
    p_ink: float = 0.0  # share of word captions that also name the ink colour
    single_object_steps: int = 0  # warm-up: steps with one object per scene
    sincos_positions: bool = False  # start the image tower's position embedding from a 2D sin-cos table
    # Weight of the prompt loss: each image also classified, per task, among that task's zero-shot prompts
    # (every class at once: the densest hard negatives there are). 0: captions only.
    prompt_loss: float = 0.0
    # Weight of linear probes: one linear head per task on the image embedding, trained with the model and dropped
    # when it is saved. Without them, the text tower can map every class of a task to one point, and then neither
    # loss sends the image tower any gradient to tell those classes apart (shape, size and the word stuck at chance).
    probe_loss: float = 0.0
    # Weight of the effective number of direct-effect components (sparsity.py): few heads carry each attribute. 0: none.
    sparsity: float = 0.0
    defaults: dict = field(default_factory=dict)  # training defaults for the CLI: steps, batch_size, lr, warmup

    def attribute_odds(self) -> tuple[list[str], np.ndarray]:
        """World 2: the attributes a group may vary, and the chance of each (from `attribute_weights`)."""
        import numpy as np

        names = list(self.attribute_weights or {})
        weights = np.array([self.attribute_weights[a] for a in names], dtype=float)
        return names, weights / weights.sum()


RECIPES: dict[int, Recipe] = {
    1: Recipe(world=1, defaults={"steps": 1800, "batch_size": 256, "lr": 1e-3, "warmup": 150}),
    2: Recipe(
        world=2,
        attribute_weights={"shape": 3.0, "position": 3.0, "word": 3.0, "ink": 1.0, "colour": 1.0, "size": 1.0,
                           "background": 0.5},
        p_single=0.2,
        dropout=0.3,
        p_ink=0.3,
        single_object_steps=300,
        sincos_positions=True,
        prompt_loss=1.0,
        probe_loss=1.0,
        defaults={"steps": 2400, "batch_size": 128, "lr": 1e-3, "warmup": 100},
    ),
}


def to_tensor(images):
    """uint8 (B, H, W, 3) -> normalised float (B, 3, H, W), as the model's preprocess does."""
    import torch

    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0  # (B, 3, H, W)
    return (pixels - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
