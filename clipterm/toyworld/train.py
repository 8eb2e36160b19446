"""Train the toy CLIP on freshly generated world data, following a world's recipe.

Symmetric contrastive (InfoNCE) loss over batches of hard-negative groups (see
batches.py). World 2 treats captions that are the same string as positives of
each other, instead of as negatives; with the recipe's `prompt_loss`, each image
is also classified per task among that task's zero-shot prompts (all classes at
once), and with its `probe_loss`, by a linear head per task on its embedding.
Everything is drawn from one seed, so the recipe is reproducible; a run resumes
as a new stage with `init`.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np

from clipterm.toyworld.batches import batch_stream, make_batch
from clipterm.toyworld.evaluate import class_embeddings, evaluate_model, task_prompt_tokens
from clipterm.toyworld.recipe import MODEL_CFG, PREPROCESS_CFG, RECIPES, to_tensor
from clipterm.toyworld.world import TASKS


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
    world: int = 1,
    device: str = "cpu",
    workers: int = 0,
    sparsity: float | None = None,
) -> dict:
    """Train the toy CLIP on `world` with that world's recipe and save it as a `local-dir:` model folder:
    from scratch, or on from the toy checkpoint in `init` (a folder this wrote), whose steps and history
    the new notes carry on. Every `eval_every` steps it evaluates on held-out scenes of `world` and saves.

    `sparsity` (default: the recipe's) weighs the effective number of direct-effect components (`sparsity.py`).
    World 2's batch k comes from the seed and k alone (`batches.world_batch`), drawn by `workers` processes,
    so a run gives the same data on any number of workers; on CUDA the forward runs under bf16 autocast."""
    import open_clip
    import torch
    import torch.nn.functional as F

    from clipterm.toyworld.sparsity import direct_effects, sparsity_loss

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    recipe = RECIPES[world]
    sparsity = recipe.sparsity if sparsity is None else sparsity
    if model_cfg is None and init is not None:  # training on: the checkpoint's own tower
        model_cfg = json.loads((Path(init) / "open_clip_config.json").read_text())["model_cfg"]
    model_cfg = model_cfg or MODEL_CFG  # the toy ViT; toyworld/rn.py holds toy-rn's
    model = open_clip.model.CLIP(**model_cfg)
    cuda = device.startswith("cuda")
    done, history, stages = 0, [], []
    if init is None and recipe.sincos_positions:
        # A ViT's positions live on the tower; a ModifiedResNet's on its attention pool (one row per grid cell).
        table = getattr(model.visual, "attnpool", model.visual).positional_embedding  # (1 + G*G, width)
        with torch.no_grad():
            table[1:] = sincos_positions(math.isqrt(table.shape[0] - 1), table.shape[1])
    if init is not None:
        from clipterm.files import load_tensors

        notes = json.loads((Path(init) / "training.json").read_text())
        from clipterm.vit.pruned import unprune

        state, _ = unprune(load_tensors(Path(init) / "open_clip_model.safetensors"), model_cfg["text_cfg"]["vocab_size"])
        model.load_state_dict({k: v.float() for k, v in state.items()})
        done, history = notes["steps"], notes.get("history", [])
        stages = notes.get("stages") or [{key: notes[key] for key in ("steps", "seed", "batch_size", "lr") if key in notes}]
    model.to(device)
    stage = {"steps": steps, "seed": seed, "batch_size": batch_size, "lr": lr, "warmup": warmup, "world": world,
             "prompt_loss": recipe.prompt_loss, "probe_loss": recipe.probe_loss, "sparsity": sparsity,
             "device": "cuda" if cuda else "cpu"}
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=model_cfg["text_cfg"]["context_length"])
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    probes = None
    if recipe.probe_loss and world >= 2:  # linear heads per task on the image embedding; not part of the saved model
        probes = torch.nn.ModuleDict({t: torch.nn.Linear(model_cfg["embed_dim"], len(c)) for t, c in TASKS.items()}).to(device)
        no_decay += list(probes.parameters())
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))
    schedule = lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    prompt_tokens = {t: tok.to(device) for t, tok in task_prompt_tokens(tokenizer).items()} if recipe.prompt_loss else None
    stream = None if world == 1 else batch_stream(seed, done, steps, batch_size, recipe, workers)
    start = time.time()
    for step in range(steps):
        model.train()
        if stream is None:
            images, captions = make_batch(rng, batch_size)
            truth = None
        else:  # a resumed stage continues the curriculum (and the data) where the run stands
            images, captions, truth = next(stream)
            truth = torch.as_tensor(truth).to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            pixels, tokens = to_tensor(np.asarray(images)).to(device), tokenizer(captions).to(device)
            if sparsity:  # the same forward, with every head's and MLP's direct effect on the side
                embeds, components = direct_effects(model.visual, pixels)
                img_f, scale = F.normalize(embeds, dim=-1), model.logit_scale.exp()
                txt_f = model.encode_text(tokens, normalize=True)
            else:
                img_f, txt_f, scale = model(pixels, tokens)
            img_f, txt_f = img_f.float(), txt_f.float()
            logits = scale * img_f @ txt_f.T  # (B, B)
            loss = contrastive_loss(logits, captions if world >= 2 else None)
            classes = class_embeddings(model, prompt_tokens) if prompt_tokens is not None else None
            if classes is not None and truth is not None:
                loss = loss + recipe.prompt_loss * prompt_loss(img_f, scale, classes, truth)
            if probes is not None and truth is not None:
                loss = loss + recipe.probe_loss * probe_loss(img_f, probes, truth)
            spread = sparsity_loss(components.float(), classes) if sparsity else None
            if spread is not None:
                loss = loss + sparsity * spread
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 25 == 0:
            seconds = time.time() - start
            log(f"step {step}/{steps} loss {loss.item():.3f} scale {scale.item():.1f} {seconds:.0f}s "
                f"({step * batch_size / max(seconds, 1e-9):.0f} images/s)"
                + (f" components {spread.item():.1f}" if spread is not None else ""))
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            model.eval()
            acc = evaluate_model(model, tokenizer, n=512, seed=seed + 1, world=world)
            history.append({"step": done + step + 1, "seconds": round(time.time() - start), **acc})
            log(json.dumps(history[-1]))
            save_model_dir(model, out_dir, {"steps": done + step + 1, "seed": seed, "batch_size": batch_size, "lr": lr,
                                            "world": world, "stages": [*stages, {**stage, "steps": step + 1}],
                                            "history": history}, model_cfg=model_cfg)
    return history[-1]


def sincos_positions(grid: int, width: int):
    """A (grid*grid, width) 2D sin-cos position table, rows in patch order (row-major), about unit scale.

    open_clip starts position embeddings at width**-0.5 scale, ten times smaller than a patch's content, so a
    small tower takes long to learn where things are; this table makes position readable from step 0."""
    import torch

    quarter = width // 4
    freqs = 1.0 / (10.0 ** (torch.arange(quarter) / quarter))  # (W/4,)
    coords = torch.arange(grid, dtype=torch.float32)
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")  # (G, G) each
    angles_y = ys.reshape(-1, 1) * freqs  # (G*G, W/4)
    angles_x = xs.reshape(-1, 1) * freqs  # (G*G, W/4)
    return torch.cat([angles_y.sin(), angles_y.cos(), angles_x.sin(), angles_x.cos()], dim=1)  # (G*G, W)


def prompt_loss(img_f, scale, classes: dict, truth):
    """Mean over tasks of the cross-entropy of classifying each image among its task's class prompts, as
    zero-shot evaluation does: img_f (B, D) unit, classes {task: (C, D)}, truth (B, n_tasks) labels, -1 where
    undefined, tasks in `TASKS` order."""
    return _mean_task_loss(truth, lambda task, keep: scale * img_f[keep] @ classes[task].T)


def probe_loss(img_f, probes, truth):
    """Mean over tasks of the cross-entropy of each task's linear probe on the image embeddings: img_f (B, D),
    probes {task: Linear(D, C)}, truth (B, n_tasks) labels, -1 where undefined, tasks in `TASKS` order."""
    features = img_f * img_f.shape[-1] ** 0.5  # unit vectors to unit-scale coordinates, so the heads learn fast
    return _mean_task_loss(truth, lambda task, keep: probes[task](features[keep]))


def _mean_task_loss(truth, logits_of):
    """Mean over the tasks with a defined label in the batch of CE(logits_of(task, keep) (k, C), labels (k,))."""
    import torch
    import torch.nn.functional as F

    losses = []
    for k, task in enumerate(TASKS):
        keep = truth[:, k] >= 0  # (B,)
        if keep.any():
            losses.append(F.cross_entropy(logits_of(task, keep), truth[keep, k]))
    return torch.stack(losses).mean()


def contrastive_loss(logits, captions: list[str] | None = None):
    """Symmetric InfoNCE over (B, B) image-text logits. With `captions`, images whose captions are the
    same string are positives of each other, spread evenly, rather than each other's negatives."""
    import torch
    import torch.nn.functional as F

    if captions is None:
        target = torch.arange(len(logits))
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    ids = {text: k for k, text in enumerate(dict.fromkeys(captions))}
    caption_ids = torch.tensor([ids[c] for c in captions])
    same = (caption_ids[:, None] == caption_ids[None, :]).float()  # (B, B), symmetric
    target = same / same.sum(1, keepdim=True)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


MODEL_FILES = ("open_clip_model.safetensors", "open_clip_config.json", "training.json")  # what a model folder holds


def save_model_dir(model, out_dir: Path, meta: dict, model_cfg: dict | None = None) -> None:
    """Write an open_clip `local-dir:` folder: config JSON + fp16 safetensors (+ training notes), atomically."""
    import torch

    from clipterm.files import atomic_write, save_tensors

    out_dir.mkdir(parents=True, exist_ok=True)
    save_tensors(out_dir / MODEL_FILES[0], {k: v.detach().to("cpu", torch.float16) for k, v in model.state_dict().items()})
    config = {"model_cfg": model_cfg or MODEL_CFG, "preprocess_cfg": PREPROCESS_CFG}
    atomic_write(out_dir / MODEL_FILES[1], (json.dumps(config, indent=2) + "\n").encode())
    atomic_write(out_dir / MODEL_FILES[2], (json.dumps(meta, indent=2) + "\n").encode())
