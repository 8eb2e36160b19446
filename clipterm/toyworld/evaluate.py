"""Zero-shot accuracy of a CLIP on held-out toy scenes, one classifier per task."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from clipterm.toyworld.captions import task_prompts
from clipterm.toyworld.recipe import to_tensor
from clipterm.toyworld.world import TASKS, labels, render, scene_at

# Held-out scenes come from a seed the training stream never uses.
HELDOUT_SEED = 1_000_003


def heldout(n: int, seed: int = HELDOUT_SEED, world: int = 1) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """n fresh scenes: images (n, 64, 64, 3) uint8 and labels per task (n,) with -1 where undefined."""
    scenes = [scene_at(seed, i, world) for i in range(n)]
    images = np.stack([render(s)[0] for s in scenes])
    per_task = {t: np.array([labels(s)[t] for s in scenes]) for t in TASKS}
    return images, per_task


def task_classifiers(model, tokenizer) -> dict:
    """Unit text embeddings per task: {task: (n_classes, D)}, averaged over templates."""
    import torch

    device = next(model.parameters()).device
    with torch.no_grad():
        return class_embeddings(model, {t: tok.to(device) for t, tok in task_prompt_tokens(tokenizer).items()})


def task_prompt_tokens(tokenizer) -> dict:
    """Every task's zero-shot prompts, tokenized: {task: (n_classes, n_templates, context)}."""
    out = {}
    for task in TASKS:
        prompts = task_prompts(task)  # [C][T]
        out[task] = tokenizer([p for per_class in prompts for p in per_class]).view(len(prompts), len(prompts[0]), -1)
    return out


def class_embeddings(model, tokens: dict) -> dict:
    """{task: (C, D)} unit class embeddings of `task_prompt_tokens`, averaged over templates (with autograd,
    so that training can classify by them too)."""
    import torch.nn.functional as F

    out = {}
    for task, tok in tokens.items():
        n_classes, n_templates = tok.shape[:2]
        emb = F.normalize(model.encode_text(tok.flatten(0, 1)).float(), dim=-1)  # (C*T, D)
        out[task] = F.normalize(emb.view(n_classes, n_templates, -1).mean(1), dim=-1)  # (C, D)
    return out


def evaluate_model(model, tokenizer, n: int = 1000, seed: int = HELDOUT_SEED, batch_size: int = 256,
                   world: int = 1) -> dict[str, float]:
    """Zero-shot accuracy per task on n held-out scenes of `world`."""
    import torch

    images, per_task = heldout(n, seed, world)
    classifiers = task_classifiers(model, tokenizer)
    with torch.no_grad():
        device = next(model.parameters()).device
        feats = torch.cat([model.encode_image(to_tensor(images[i : i + batch_size]).to(device)).float().cpu()
                           for i in range(0, n, batch_size)])
    feats = torch.nn.functional.normalize(feats, dim=-1)  # (n, D)
    acc = {}
    for task, clf in classifiers.items():
        keep = per_task[task] >= 0
        pred = (feats[torch.from_numpy(keep)] @ clf.cpu().T).argmax(-1).numpy()
        acc[task] = round(float((pred == per_task[task][keep]).mean()), 4)
    return acc


def trained_world(model_dir: Path) -> int:
    """The world a model folder written by `clipterm toy train` was trained on (1 for folders that predate worlds)."""
    notes = Path(model_dir) / "training.json"
    return int(json.loads(notes.read_text()).get("world", 1)) if notes.is_file() else 1


def model_world(model: str) -> int:
    """The world a model spec was trained on: a built-in toy's, or the notes of a folder `clipterm toy train` wrote;
    1 for any other model (`toy:N` images then draw world 1, as they always have)."""
    from clipterm.locations import TOY_MODEL_DIRS

    return trained_world(TOY_MODEL_DIRS.get(model) or Path(model.removeprefix("local-dir:")))
