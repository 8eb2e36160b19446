"""The recipe that trains the shipped toy CLIP on freshly generated world data.

Standard symmetric contrastive (InfoNCE) loss. Each batch is made of groups of
scenes that differ in a single attribute (hard negatives), so that shape,
position and the written word have to be read, not guessed from colour alone.
Everything is drawn from one seed, so the recipe is reproducible.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np

from clipterm.toyworld.captions import caption
from clipterm.toyworld.world import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZES, WORDS, Scene, render, sample_scene

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)

MODEL_CFG = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "layers": 6, "width": 128, "head_width": 16, "patch_size": 8, "mlp_ratio": 4.0},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 4},
}
PREPROCESS_CFG = {"size": 64, "mean": list(MEAN), "std": list(STD), "interpolation": "bicubic", "resize_mode": "shortest"}


def variant(scene: Scene, rng: np.random.Generator) -> Scene:
    """The same scene with exactly one attribute of its first object (or the scene) changed."""
    first = scene.objects[0]
    options = {
        "colour": [c for c in COLOURS if c != first.colour],
        "shape": [s for s in SHAPES if s != first.shape],
        "size": [s for s in SIZES if s != first.size],
        "position": [p for p in POSITIONS if p not in {o.position for o in scene.objects} | {scene.word_position}],
        "background": [b for b in BACKGROUNDS if b != scene.background],
    }
    if scene.word is not None:
        options["word"] = [w for w in WORDS if w != scene.word]
    attr = str(rng.choice([k for k, v in options.items() if v]))
    value = str(rng.choice(options[attr]))
    if attr == "background":
        return replace(scene, background=value)
    if attr == "word":
        return replace(scene, word=value)
    return replace(scene, objects=(replace(first, **{attr: value}), *scene.objects[1:]))


def make_batch(rng: np.random.Generator, batch_size: int, group: int = 4) -> tuple[np.ndarray, list[str]]:
    """Images (B, 64, 64, 3) uint8 and one caption each, in groups of `group` near-duplicates."""
    scenes: list[Scene] = []
    while len(scenes) < batch_size:
        base = sample_scene(rng)
        scenes.append(base)
        scenes.extend(variant(base, rng) for _ in range(group - 1))
    scenes = scenes[:batch_size]
    images = np.stack([render(s)[0] for s in scenes])
    return images, [caption(s, rng) for s in scenes]


def to_tensor(images: np.ndarray):
    """uint8 (B, H, W, 3) -> normalised float (B, 3, H, W), as the model's preprocess does."""
    import torch

    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    return (pixels - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


def train(
    out_dir: Path,
    steps: int = 3000,
    batch_size: int = 256,
    lr: float = 1e-3,
    warmup: int = 150,
    seed: int = 0,
    threads: int | None = None,
    log: Callable[[str], None] = lambda line: print(line, flush=True),
    eval_every: int = 500,
    init: Path | None = None,
    model_cfg: dict | None = None,
) -> dict:
    """Train the toy CLIP and save it as a `local-dir:` model folder: from scratch, or on from the toy
    checkpoint in `init` (a folder this wrote), whose steps and history the new notes carry on."""
    import open_clip
    import torch

    from clipterm.toyworld.evaluate import evaluate_model, save_model_dir

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    if model_cfg is None and init is not None:  # training on: the checkpoint's own tower
        model_cfg = json.loads((Path(init) / "open_clip_config.json").read_text())["model_cfg"]
    model_cfg = model_cfg or MODEL_CFG  # the toy ViT; toyworld/rn.py holds toy-rn's
    model = open_clip.model.CLIP(**model_cfg)
    done, history, stages = 0, [], []
    if init is not None:
        from clipterm.files import load_tensors

        notes = json.loads((Path(init) / "training.json").read_text())
        model.load_state_dict({k: v.float() for k, v in load_tensors(Path(init) / "open_clip_model.safetensors").items()})
        done, history = notes["steps"], notes.get("history", [])
        stages = notes.get("stages") or [{key: notes[key] for key in ("steps", "seed", "batch_size", "lr") if key in notes}]
    stage = {"steps": steps, "seed": seed, "batch_size": batch_size, "lr": lr, "warmup": warmup}
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=model_cfg["text_cfg"]["context_length"])
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))
    schedule = lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    start = time.time()
    for step in range(steps):
        model.train()
        images, captions = make_batch(rng, batch_size)
        img_f, txt_f, scale = model(to_tensor(images), tokenizer(captions))
        logits = scale * img_f @ txt_f.T  # (B, B)
        target = torch.arange(len(logits))
        loss = (torch.nn.functional.cross_entropy(logits, target) + torch.nn.functional.cross_entropy(logits.T, target)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 25 == 0:
            log(f"step {step}/{steps} loss {loss.item():.3f} scale {scale.item():.1f} {time.time() - start:.0f}s")
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            model.eval()
            acc = evaluate_model(model, tokenizer, n=512, seed=seed + 1)
            history.append({"step": done + step + 1, "seconds": round(time.time() - start), **acc})
            log(json.dumps(history[-1]))
            save_model_dir(model, out_dir, {"steps": done + step + 1, "seed": seed, "batch_size": batch_size, "lr": lr,
                                            "stages": [*stages, {**stage, "steps": step + 1}], "history": history},
                           model_cfg=model_cfg)
    return history[-1]
