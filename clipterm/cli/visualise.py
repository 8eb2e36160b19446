"""`clipterm visualise`: paint the image a head, neuron, text or class direction wants (feature visualisation)."""

from __future__ import annotations

import json
import re
from enum import Enum
from pathlib import Path
from typing import Any

import typer

from clipterm.cli.common import CacheDirOpt, Device, DeviceOpt, JsonOpt, PretrainedOpt, QuickGeluOpt
from clipterm.cli.common import load_model_and_cache as _load
from clipterm.cli.output import emit_json, progress, stdout
from clipterm.errors import ClipTermError

SCHEMA = "clipterm.visualise/1"
SHOW_SIZE = 32  # pixels per tile with --show (16 character rows)


class Objective(str, Enum):
    auto = "auto"
    activation = "activation"
    effect = "effect"
    direction = "direction"


class Param(str, Enum):
    fourier = "fourier"
    pixel = "pixel"


def visualise(
    target: str = typer.Option(..., "--target", "-t", help="What to visualise: L5.H2, L5.H2:pc2, L4.N12, "
                               "'text:a red shape', image:PATH, class:NAME, or differences like 'text:red - text:blue'."),
    model: str = typer.Option(None, "--model", help="`toy`, an open_clip arch, or a local-dir model folder "
                              "(default: the cache's model, else toy)."),
    pretrained: str = PretrainedOpt,
    quick_gelu: bool = QuickGeluOpt,
    cache: str = typer.Option(None, "--cache", help="Cache (path or name): head and neuron directions, classes, --facet labels."),
    cache_dir: str = CacheDirOpt,
    objective: Objective = typer.Option(Objective.auto, "--objective", help="Heads: effect (default: direct effect along "
                                        "the head's principal direction) or direction (cos of the image embedding with it). "
                                        "Neurons: activation (default: post-activation at the class token), effect "
                                        "(second-order effect along its principal direction) or direction. Texts, images "
                                        "and classes: direction."),
    steps: int = typer.Option(128, "--steps", help="Optimisation steps."),
    size: int = typer.Option(None, "--size", help="Side of the optimised image in pixels (default: the model's input "
                             "size; it is resized to that size for the model)."),
    diverse: int = typer.Option(1, "--diverse", help="Optimise K images together, pushed apart by lucid's diversity term."),
    diversity: float = typer.Option(1.0, "--diversity", help="Weight of the diversity term with --diverse K > 1."),
    facet: str = typer.Option(None, "--facet", help="TASK or TASK/CLASS: add a linear probe of the cache's labels for "
                              "that task (faceted visualisation); TASK alone favours whichever class the probe is surest of."),
    facet_weight: float = typer.Option(0.1, "--facet-weight", help="Weight of the facet's log-probability."),
    param: Param = typer.Option(Param.fourier, "--param", help="fourier (decorrelated, 1/f scaled; lucid's default) or "
                                "pixel (plain pixels through a sigmoid, for comparison)."),
    lr: float = typer.Option(0.05, "--lr", help="Adam's learning rate."),
    seed: int = typer.Option(0, "--seed", help="The same seed repeats the same images (on the CPU)."),
    out: Path = typer.Option(Path("visualise"), "--out", help="Folder for the PNGs and the JSON record."),
    show: bool = typer.Option(False, "--show", help="Draw the images in the terminal (half-block cells)."),
    device: Device = DeviceOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Feature visualisation (Olah et al., 2017; lucid's defaults): gradient ascent on a decorrelated Fourier-space
    image under random padding, jitter, scale and rotation. Writes OUT/<target>-<k>.png and OUT/<target>.json
    (settings and the objective at every step). JSON schema: clipterm.visualise/1.
    """
    from clipterm.analyses import facets, featvis, targets

    if steps < 1:
        raise ClipTermError(f"--steps must be at least 1 (got {steps})", hint="e.g. --steps 128")
    if out.exists() and not out.is_dir():
        raise ClipTermError(f"--out {out} is a file, not a folder", hint="give a folder (it is created when missing)")
    terms = targets.parse(target)
    targets.require_cache(terms, cache is not None)
    config = featvis.Config(steps=steps, size=size, images=diverse, diversity=diversity if diverse > 1 else 0.0,
                            objective=objective.value, param=param.value, lr=lr, seed=seed, facet_weight=facet_weight)
    loaded, reader = _load(model, pretrained, cache, cache_dir, device.value, quick_gelu)
    side = featvis.check(config, loaded)
    goal = featvis.objective_for(target, loaded, reader, config.objective)
    probe = facets.train_facet(loaded, reader, facet) if facet is not None else None
    curve: list[float] = []
    with progress(f"visualising {target}", total=steps, unit="steps") as advance:
        for frame in featvis.visualise(loaded, goal, config, probe):
            curve.append(frame.objective)
            advance(1, note=f"objective {frame.objective:+.4f}")
    record = _record(target, terms, goal, config, side, loaded, reader, probe, curve, frame.elapsed)
    record["files"] = _write(out, target, frame.pixels, record)
    if json_out:
        emit_json(record, schema=SCHEMA)
        return
    facet_note = f"; facet {probe.task} probe {probe.accuracy:.0%} held out (chance {probe.chance:.0%})" if probe else ""
    stdout.print(f"[bold]{target}[/]: {goal.kind} {curve[0]:+.4f} → {curve[-1]:+.4f} in {steps} steps "
                 f"({steps / max(frame.elapsed, 1e-9):.1f}/s){facet_note}", highlight=False)
    if show:
        stdout.print(tiles(frame.pixels, [f"#{k + 1}" for k in range(len(frame.pixels))]))
    for file in record["files"]:
        stdout.print(file, highlight=False)


def tiles(pixels: Any, captions: list[str], size: int = SHOW_SIZE) -> Any:
    """The images (K, S, S, 3) uint8 as a half-block ThumbnailGrid, resized to `size`."""
    import numpy as np
    from PIL import Image

    from clipterm.thumbnails import ThumbnailGrid, Tile

    shown = [np.asarray(Image.fromarray(p).resize((size, size), Image.BILINEAR)) for p in pixels]
    return ThumbnailGrid([Tile(p, c) for p, c in zip(shown, captions)], size)


def _record(target: str, terms: list, goal: Any, config: Any, side: int, loaded: Any, reader: Any, probe: Any,
            curve: list[float], elapsed: float) -> dict[str, Any]:
    components = [t.value for t in terms if t.kind in ("head", "neuron")]
    return {"target": target, "component": components[0] if len(terms) == 1 and components else None,
            "objective": goal.kind, "model": loaded.info.spec, "cache": reader.name if reader is not None else None,
            "steps": config.steps, "size": side, "images": config.images, "diversity": config.diversity,
            "param": config.param, "lr": config.lr, "seed": config.seed,
            "facet": probe.to_json() if probe is not None else None,
            "final": round(curve[-1], 6), "curve": [round(v, 6) for v in curve],
            "elapsed": round(elapsed, 3), "steps_per_s": round(config.steps / max(elapsed, 1e-9), 2)}


def slug(target: str) -> str:
    """A file-name stem for a target: `text:a red shape` -> `text-a-red-shape`."""
    return re.sub(r"[^A-Za-z0-9.]+", "-", target).strip("-")[:80] or "target"


def _write(out: Path, target: str, pixels: Any, record: dict[str, Any]) -> list[str]:
    """OUT/<slug>-<k>.png per image and OUT/<slug>.json; returns the PNG paths."""
    from PIL import Image

    from clipterm.files import atomic_write

    out.mkdir(parents=True, exist_ok=True)
    stem = slug(target)
    files = []
    for k, image in enumerate(pixels):
        path = out / f"{stem}-{k + 1}.png"
        Image.fromarray(image).save(path)
        files.append(str(path))
    atomic_write(out / f"{stem}.json", (json.dumps({"schema": SCHEMA, **record, "files": files}, indent=2) + "\n").encode())
    return files


def register(app: typer.Typer) -> None:
    app.command()(visualise)
