"""`clipterm toy render|train|eval`: the synthetic world and the built-in toy CLIP."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from clipterm.cli.common import Device, DeviceOpt, JsonOpt, accuracy_table
from clipterm.cli.output import emit_json, progress, stderr, stdout
from clipterm.errors import ClipTermError

ForceOpt = typer.Option(False, "--force", help="Replace files that OUT already holds (a model, labels.jsonl, images).")
WORLD_HELP = "World version: 1 (toy-v1's and toy-rn-v1's) or 2 (the toy's and toy-rn's: legible words; see docs/toy.md)."

toy_app = typer.Typer(help="The synthetic world and the built-in toy CLIPs: render images, train, evaluate, ship.", no_args_is_help=True)


@toy_app.command()
def render(
    out_dir: Path = typer.Argument(..., help="Folder to write PNGs into, one sub-folder per class."),
    n: int = typer.Option(100, "--n", min=1, help="Number of images."),
    task: str = typer.Option("colour", "--task", help="Task whose class names the sub-folders get."),
    seed: int = typer.Option(0, "--seed", help="World seed; image i depends only on (seed, i)."),
    world: int = typer.Option(1, "--world", help=WORLD_HELP),
    force: bool = ForceOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Write N synthetic scenes as PNG files in class sub-folders, plus labels.jsonl with every task's label."""
    from clipterm.toyworld.files import render_folder

    check_world(world)
    with progress("rendering", total=n) as advance:
        summary = render_folder(out_dir, n=n, task=task, seed=seed, on_image=advance, world=world, force=force)
    if json_out:
        emit_json(summary, schema="clipterm.toy.render/2")
    else:
        stdout.print(f"wrote {summary['images']} images to {out_dir} ({', '.join(f'{k}: {v}' for k, v in summary['classes'].items())})")


@toy_app.command()
def train(
    out_dir: Path = typer.Argument(..., help="Folder for the trained model (open_clip local-dir layout)."),
    world: int = typer.Option(None, "--world", help=WORLD_HELP + " Default: the --from checkpoint's world, else 1."),
    steps: int = typer.Option(None, "--steps", min=1, help="Optimiser steps (default: the world's recipe, 1800 or 2400)."),
    batch_size: int = typer.Option(None, "--batch-size", min=8, help="Images per step, in groups of 4 near-duplicates "
                                                                     "(default: the recipe's, 256 or 128)."),
    lr: float = typer.Option(None, "--lr", help="Peak learning rate (AdamW, warmup then cosine; default 1e-3)."),
    seed: int = typer.Option(0, "--seed", help="Seed for data and initialisation: the recipe is reproducible."),
    threads: int = typer.Option(0, "--threads", help="CPU threads for torch (0: torch's default)."),
    eval_every: int = typer.Option(300, "--eval-every", min=1, help="Evaluate and save every this many steps."),
    warmup: int = typer.Option(None, "--warmup", min=1, help="Steps of linear learning-rate warmup (default: the recipe's)."),
    arch: str = typer.Option("vit", "--arch", help="Image tower: `vit` (the toy) or `rn` (toy-rn, a small ModifiedResNet; "
                                                    "clipterm/toyworld/rn.py). With --from, the checkpoint's own."),
    init: str = typer.Option(None, "--from", help="Train on from this checkpoint: `toy` (the shipped model) or a folder "
                                                  "written by `clipterm toy train`. Its steps and history carry on."),
    device: Device = DeviceOpt,
    workers: int = typer.Option(0, "--workers", min=0, help="Processes that draw world-2 batches (0: the training "
                                                            "process). The data is the same for any number."),
    sparsity: float = typer.Option(None, "--sparsity", min=0.0, help="Weight of the effective number of heads and MLPs "
                                   "whose direct effects carry each task, which makes few heads carry each attribute "
                                   "(clipterm/toyworld/sparsity.py; default: the recipe's). ViT towers only."),
    force: bool = ForceOpt,
) -> None:
    """Train the toy CLIP on freshly generated world data: from scratch (about an hour on 2 CPU cores), or on
    from a checkpoint with --from (each stage is recorded in training.json). The recipes are in docs/toy.md."""
    from clipterm.locations import TOY_MODEL_DIRS
    from clipterm.toyworld.evaluate import trained_world
    from clipterm.toyworld.recipe import RECIPES
    from clipterm.toyworld.rn import ARCHS
    from clipterm.toyworld.train import train as run
    from clipterm.vit.models import pick_device

    if arch not in ARCHS:
        raise ClipTermError(f"--arch {arch!r}: no such toy image tower", hint=f"use {' or '.join(ARCHS)}")

    start = None if init is None else TOY_MODEL_DIRS.get(init) or Path(init)
    if start is not None and not (start / "training.json").is_file():
        raise ClipTermError(f"--from {init}: not a folder written by `clipterm toy train` (no training.json)",
                            hint="pass `--from toy` or a folder a previous `clipterm toy train OUT` wrote")
    if start is not None and start.resolve() == out_dir.resolve():
        raise ClipTermError(f"--from {init} is the output folder: it would be overwritten while training",
                            hint="write to a new folder")
    world = world if world is not None else trained_world(start) if start is not None else 1
    check_world(world)
    tower = json.loads((start / "open_clip_config.json").read_text())["model_cfg"] if start else ARCHS[arch]
    if sparsity and isinstance(tower["vision_cfg"]["layers"], (list, tuple)):
        raise ClipTermError("--sparsity is for ViT towers: a ResNet's direct effects are not split by head",
                            hint="leave --sparsity out, or train a ViT (--arch vit)")
    check_model_folder(out_dir, force)  # last: a refused command writes nothing
    defaults = RECIPES[world].defaults
    final = run(out_dir, steps=steps or defaults["steps"], batch_size=batch_size or defaults["batch_size"],
                lr=lr or defaults["lr"], warmup=warmup or defaults["warmup"], seed=seed, threads=threads or None,
                eval_every=eval_every, init=start, world=world, model_cfg=ARCHS[arch] if start is None else None,
                device=pick_device(device.value), workers=workers, sparsity=sparsity,
                log=lambda line: stderr.print(line, highlight=False))
    stdout.print(f"saved {out_dir} (world {world}): " + ", ".join(f"{k} {v}" for k, v in final.items()))


@toy_app.command()
def ship(
    source: Path = typer.Argument(..., help="A model folder written by `clipterm toy train`."),
    out_dir: Path = typer.Argument(..., help="Where to write the shipped copy (e.g. clipterm/toyworld/model_rn)."),
    force: bool = ForceOpt,
) -> None:
    """Copy a trained toy with its token embedding pruned to the rows the toy's texts use (docs: vit/pruned.py):
    its captions, prompts and the built-in pools encode exactly as before, in a fraction of the bytes."""
    from clipterm.toyworld.ship import ship as run

    if not (source / "training.json").is_file():
        raise ClipTermError(f"{source}: not a folder written by `clipterm toy train` (no training.json)",
                            hint="train one with `clipterm toy train OUT`")
    if source.resolve() == out_dir.resolve():
        raise ClipTermError(f"{out_dir} is the source folder", hint="write to a new folder")
    check_model_folder(out_dir, force)
    summary = run(source, out_dir)
    stdout.print(f"shipped {out_dir}: {summary['kept_tokens']} tokens kept, {summary['bytes'] / 2**20:.1f} MB")


EVAL_MAX = 200_000


@toy_app.command("eval")
def evaluate(
    model: str = typer.Option("toy", "--model", help="`toy`, `toy-v1`, `toy-rn`, `toy-rn-v1`, or a local-dir model folder trained by `clipterm toy train`."),
    n: int = typer.Option(1000, "--n", min=10, help="Held-out images to evaluate on."),
    seed: int = typer.Option(None, "--seed", help="Seed of the held-out scenes (default: the fixed held-out seed)."),
    world: int = typer.Option(None, "--world", help=WORLD_HELP + " Default: the world the model was trained on."),
    json_out: bool = JsonOpt,
) -> None:
    """Zero-shot accuracy per task on freshly generated held-out images of the world the model was trained on."""
    from clipterm.toyworld.evaluate import HELDOUT_SEED, evaluate_model, model_world
    from clipterm.vit.models import load_model

    if n > EVAL_MAX:  # held-out scenes are rendered in memory, 12 KB each
        raise ClipTermError(f"--n {n:,}: toy eval renders its scenes in memory (12 KB each), so it takes at most {EVAL_MAX:,}",
                            hint="accuracy on 10,000 scenes is within about 1% of the truth; use --seed for other scenes")
    loaded = load_model(model)
    if world is None:
        world = model_world(model)
    check_world(world)
    acc = evaluate_model(loaded.model, loaded.tokenizer, n=n, seed=HELDOUT_SEED if seed is None else seed, world=world)
    if json_out:
        emit_json({"model": model, "images": n, "world": world, "accuracy": acc}, schema="clipterm.toy.eval/2")
        return
    stdout.print(accuracy_table(acc, title=f"zero-shot accuracy of {model} on {n} held-out images of world {world}"))


def check_model_folder(out_dir: Path, force: bool) -> None:
    """OUT must be a folder (or not yet exist), and holding no model unless --force: a trained model is hours of work."""
    from clipterm.files import check_replacing, output_folder
    from clipterm.toyworld.train import MODEL_FILES

    if out_dir.exists() and not out_dir.is_dir():
        raise ClipTermError(f"{out_dir} is a file, not a folder", hint="give a folder for the model (it is created when missing)")
    check_replacing(out_dir, MODEL_FILES, force, "model folder")
    output_folder(out_dir, "model folder")


def check_world(world: int) -> None:
    from clipterm.toyworld.world import WORLDS

    if world not in WORLDS:
        raise ClipTermError(f"unknown toy world {world}", hint=f"worlds: {', '.join(map(str, WORLDS))}")


def register(app: typer.Typer) -> None:
    app.add_typer(toy_app, name="toy")
