"""`clipterm visualise`: paint the image a head, neuron, text or class direction wants (feature visualisation)."""

from __future__ import annotations

import hashlib
import json
import re
from enum import Enum
from pathlib import Path
from typing import Any

import typer

from clipterm import names
from clipterm.cli.common import CacheDirOpt, Device, DeviceOpt, JsonOpt, PretrainedOpt, QuickGeluOpt
from clipterm.cli.common import load_model_and_cache as _load
from clipterm.cli.output import emit_json, progress, stdout
from clipterm.errors import ClipTermError
from clipterm.files import check_replacing, output_folder

SCHEMA = "clipterm.visualise/1"
SHOW_SIZE = 32  # pixels per tile with --show (16 character rows)


class Objective(str, Enum):
    auto = "auto"
    activation = "activation"
    effect = "effect"
    direction = "direction"


class FacetObjective(str, Enum):
    attribution = "attribution"
    logprob = "logprob"


class Param(str, Enum):
    fourier = "fourier"
    pixel = "pixel"


def visualise(
    target: str = typer.Option(..., "--target", "-t", help="What to visualise: L5.H2, L5.H2:pc2, L4.N12; on a ResNet "
                               "pool.H3 or a channel of any stage (L3.N12, L2.N40); 'text:a red shape', image:PATH, "
                               "class:NAME, or differences like 'text:red - text:blue'."),
    model: str = typer.Option(None, "--model", help="`toy`, an open_clip arch, or a local-dir model folder "
                              "(default: the cache's model, else toy)."),
    pretrained: str = PretrainedOpt,
    quick_gelu: bool = QuickGeluOpt,
    cache: str = typer.Option(None, "--cache", help="Cache (path or name): head and neuron directions, classes, --facet labels."),
    cache_dir: str = CacheDirOpt,
    objective: Objective = typer.Option(Objective.auto, "--objective", help="Heads: effect (default: direct effect along "
                                        "the head's principal direction) or direction (cos of the image embedding with it). "
                                        "Neurons: activation (default: post-activation at the class token), effect "
                                        "(second-order effect along its principal direction) or direction. ResNet "
                                        "channels: activation (default: the mean over positions) or effect (the last "
                                        "stage's, through the attention pool along its principal direction). Texts, "
                                        "images and classes: direction."),
    steps: int = typer.Option(128, "--steps", help="Optimisation steps."),
    size: int = typer.Option(None, "--size", help="Side of the optimised image in pixels (default: the model's input "
                             "size; it is resized to that size for the model)."),
    diverse: int = typer.Option(1, "--diverse", help="Optimise K images together, pushed apart by lucid's diversity term."),
    diversity: float = typer.Option(1.0, "--diversity", help="Weight of the diversity term with --diverse K > 1."),
    facet: str = typer.Option(None, "--facet", help="TASK or TASK/CLASS: faceted visualisation (Goh et al., 2021) with a "
                              "linear probe of the cache's labels for that task; TASK alone favours whichever class "
                              "scores highest."),
    facet_layer: str = typer.Option(None, "--facet-layer", help="Layer whose output the facet's probe reads: a "
                                    "ViT's block, a ResNet's stage (default: the one below the unit; two thirds deep "
                                    "for texts and images)."),
    facet_objective: FacetObjective = typer.Option("attribution", "--facet-objective", help="attribution (the "
                                                   "article's: the probe weighs the objective's attribution to that "
                                                   "layer, wᵀ(g ⊙ ∇f)) or logprob (log p(class) of a class-token probe)."),
    facet_weight: float = typer.Option(0.1, "--facet-weight", help="Weight of the facet's term."),
    param: Param = typer.Option(Param.fourier, "--param", help="fourier (decorrelated, 1/f scaled; lucid's default) or "
                                "pixel (plain pixels through a sigmoid, for comparison)."),
    lr: float = typer.Option(0.05, "--lr", help="Adam's learning rate."),
    seed: int = typer.Option(0, "--seed", help="The same seed repeats the same images (on the CPU)."),
    out: Path = typer.Option(Path("visualise"), "--out", help="Folder for the PNGs and the JSON record. Files of an "
                             "earlier run of the same target are replaced; anything else there needs --force."),
    force: bool = typer.Option(False, "--force", help="Replace files in --out that an earlier visualise did not write."),
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
    check_replacing(out, _file_names(target, diverse), force, "--out", ours=_written_before(out, target))
    terms = targets.parse(target)
    targets.require_cache(terms, cache is not None)
    config = featvis.Config(steps=steps, size=size, images=diverse, diversity=diversity if diverse > 1 else 0.0,
                            objective=objective.value, param=param.value, lr=lr, seed=seed, facet_weight=facet_weight)
    loaded, reader = _load(model, pretrained, cache, cache_dir, device.value, quick_gelu)
    side = featvis.check(config, loaded)
    climb = featvis.climb_for(loaded)
    goal = featvis.objective_for(target, loaded, reader, config.objective, climb=climb)
    probe = None
    if facet is not None:
        units = featvis.unit_layers(goal, climb)
        layer = _one_layer(facet_layer, climb.layers) if facet_layer else \
            facets.default_layer(climb.layers, min(units, default=None))
        probe = facets.train_facet(loaded, reader, facet, layer=layer, objective=facet_objective.value)
    curve: list[float] = []
    with progress(f"visualising {target}", total=steps, unit="steps") as advance:
        for frame in featvis.visualise(loaded, goal, config, probe, climb=climb):
            curve.append(frame.objective)
            advance(1, note=f"objective {frame.objective:+.4f}")
    record = _record(target, terms, goal, config, side, loaded, reader, probe, curve, frame.elapsed)
    record["files"] = _write(out, target, frame.pixels, record)
    if json_out:
        emit_json(record, schema=SCHEMA)
        return
    facet_note = (f"; facet {probe.task} ({probe.objective}, {names.layer(probe.layer)}) probe {probe.accuracy:.0%} "
                  f"held out (chance {probe.chance:.0%})") if probe else ""
    stdout.print(f"[bold]{target}[/]: {goal.kind} {curve[0]:+.4f} → {curve[-1]:+.4f} in {steps} steps "
                 f"({steps / max(frame.elapsed, 1e-9):.1f}/s){facet_note}", highlight=False)
    if show:
        stdout.print(tiles(frame.pixels, [f"#{k + 1}" for k in range(len(frame.pixels))]))
    for file in record["files"]:
        stdout.print(file, highlight=False)


def _one_layer(spec: str, n_layers: int) -> int:
    layers = names.parse_layers(spec, n_layers)
    if len(layers) != 1:
        raise ClipTermError(f"--facet-layer {spec} names {len(layers)} layers", hint="name one block, e.g. --facet-layer L3")
    return layers[0]


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
    """A file-name stem for a target: `text:a red shape` -> `text-a-red-shape`. A long one keeps 71 characters and a
    hash of the whole target, so that two targets never share files."""
    stem = re.sub(r"[^A-Za-z0-9.]+", "-", target).strip("-") or "target"
    if len(stem) <= 80 and stem != "target":
        return stem
    return f"{stem[:71].rstrip('-')}-{hashlib.sha256(target.encode()).hexdigest()[:8]}"


def _file_names(target: str, images: int) -> list[str]:
    stem = slug(target)
    return [f"{stem}-{k + 1}.png" for k in range(images)] + [f"{stem}.json"]


def _written_before(out: Path, target: str) -> list[str]:
    """The files that an earlier visualise of `target` recorded in OUT/<slug>.json (a regular file of ours)."""
    record = out / f"{slug(target)}.json"
    try:
        if record.is_symlink() or not record.is_file():
            return []
        payload = json.loads(record.read_text(encoding="utf-8"))
        if payload.get("schema") != SCHEMA or payload.get("target") != target:
            return []
        return [record.name, *(Path(str(f)).name for f in payload.get("files", []))]
    except (OSError, ValueError, AttributeError, TypeError):
        return []


def _write(out: Path, target: str, pixels: Any, record: dict[str, Any]) -> list[str]:
    """OUT/<slug>-<k>.png per image and OUT/<slug>.json, each written atomically and never through a symlink;
    returns the PNG paths."""
    import io

    from PIL import Image

    from clipterm.files import atomic_write

    output_folder(out, "--out")
    names = _file_names(target, len(pixels))
    files = []
    for name, image in zip(names, pixels):
        png = io.BytesIO()
        Image.fromarray(image).save(png, format="PNG")
        atomic_write(out / name, png.getvalue(), durable=False)
        files.append(str(out / name))
    atomic_write(out / names[-1], (json.dumps({"schema": SCHEMA, **record, "files": files}, indent=2) + "\n").encode())
    return files


def register(app: typer.Typer) -> None:
    app.command()(visualise)
