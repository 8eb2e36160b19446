"""`clipterm spatial`: where in an image a text query or a component acts, or which parts push together."""

from __future__ import annotations

import math
from enum import Enum
from typing import Any

import typer

from clipterm.cli.common import CacheDirOpt, Device, DeviceOpt, JsonOpt, PretrainedOpt, QuickGeluOpt
from clipterm.cli.output import emit_json, stdout
from clipterm.errors import ClipTermError

SCHEMA = "clipterm.spatial/1"


class Method(str, Enum):
    nmf = "nmf"
    pca = "pca"


class Of(str, Enum):
    activations = "activations"
    classes = "classes"


class Center(str, Enum):
    auto = "auto"
    position = "position"
    none = "none"


def spatial(
    image: str = typer.Argument(..., help="An image file, row:N of the --cache, or a toy scene toy:SEED/INDEX."),
    query: str = typer.Option(None, "--query", "-q", help="A text ('a red star'), or class:NAME for a class's prompts."),
    component: str = typer.Option(None, "--component", "-c", help="A head (L5.H2, L5.H2:pc1), a layer's heads (L5), "
                                  "an MLP (L4.MLP) or a neuron (L4.N12)."),
    nmf: int = typer.Option(None, "--nmf", help="Factorise the image's per-patch activations (or --of classes: class "
                            "attributions) into K parts."),
    of: Of = typer.Option(Of.activations, "--of", help="With --nmf: activations (MLP neurons, a ResNet's channels) or "
                          "classes (each class's exact direct effect per patch, through the heads of --layer on)."),
    task: str = typer.Option(None, "--task", help="With --of classes: the task whose classes to attribute, or several (colour,shape; default: all)."),
    classes: str = typer.Option(None, "--classes", help="With --of classes: a file of class names, one per line."),
    center: Center = typer.Option(Center.auto, "--center", help="With --nmf on activations: position subtracts each "
                                  "position's mean over reference images (the cache's rows, or the toy world's); auto: "
                                  "position where there are reference images, else none."),
    method: Method = typer.Option(Method.nmf, "--method", help="With --nmf: nmf (activations clipped at 0) or pca."),
    layers: str = typer.Option(None, "--layers", help="Layers to sum (--query; default: the last 4) or factorise "
                               "(--nmf; default: the middle one), e.g. L4-5. With --nmf, `all` sweeps the layers one "
                               "by one."),
    layer: str = typer.Option(None, "--layer", help="With --nmf: one layer (--of classes: the heads of this layer and "
                              "later; default L0)."),
    model: str = typer.Option(None, "--model", help="`toy`, an open_clip arch, or a local-dir folder. Default: toy "
                              "without --cache; with --cache, none: maps come from the cache's stored tokens."),
    pretrained: str = PretrainedOpt,
    quick_gelu: bool = QuickGeluOpt,
    cache: str = typer.Option(None, "--cache", help="Cache (path or name) for row:N images and stored tokens."),
    cache_dir: str = CacheDirOpt,
    contrast: str = typer.Option("auto", "--contrast", help="Pool whose mean text is subtracted from the query "
                                 "(auto: toy for the toy model, else general; none: no contrast)."),
    pool: str = typer.Option("auto", "--pool", help="Pool the factors' nearest texts come from (auto as --contrast)."),
    show: bool = typer.Option(False, "--show", help="Draw the map over the image in half-block colour cells."),
    size: int = typer.Option(32, "--size", min=8, help="Image size in pixels with --show (two pixels per character row)."),
    device: Device = DeviceOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Where in the image: a text query's zero-shot segmentation map, a component's per-patch map, or NMF factors.

    Query and head maps come from per-token direct effects (TextSpan), read from the cache's tokens when it
    stored them, else from one forward pass. JSON schema: clipterm.spatial/1 (raw per-patch grids).
    """
    from clipterm import names
    from clipterm.analyses import spatial as core
    modes = [name for name, given in (("--query", query), ("--component", component), ("--nmf", nmf)) if given is not None]
    if len(modes) != 1:
        raise ClipTermError(f"give one of --query, --component or --nmf ({'none' if not modes else ' and '.join(modes)} given)",
                            hint="e.g. --query 'a red star', --component L5.H2, or --nmf 3")
    if layers is not None and component is not None:
        raise ClipTermError("--layers goes with --query or --nmf: a component names its own layer", hint="drop --layers")
    _check_nmf_options(nmf, of, task, classes, center, layers, layer)
    loaded, reader = _load(model, pretrained, cache, cache_dir, device.value, quick_gelu)
    picture = core.open_image(image, reader)
    n_layers = reader.shape.layers if reader is not None else loaded.info.layers
    sweeping = nmf is not None and layers is not None and layers.strip().lower() == "all"
    chosen = names.parse_layers(layer or layers, n_layers) if (layer or layers) is not None and not sweeping else None
    if nmf is not None:

        run_nmf(picture, nmf, of.value, loaded=loaded, reader=reader, layers=chosen, sweep=sweeping, task=task,
                classes=classes, center=center.value, method=method.value, pool=pool, cache_dir=cache_dir,
                show=show, size=size + size % 2, json_out=json_out, meta={"image": image, "row": picture.row})
        return
    if query is not None:
        result = core.query_map(picture, query, loaded=loaded, reader=reader, layers=chosen,
                                contrast=None if contrast == "none" else contrast, cache_dir=cache_dir)
    else:
        result = core.component_map(picture, component, reader=reader, loaded=loaded)
    if json_out:
        mode = "query" if query is not None else "component"
        emit_json({"image": image, "row": picture.row, "cache": reader.name if reader is not None else None,
                   "model": loaded.info.spec if loaded is not None else None, "mode": mode, **result.to_json()},
                  schema=SCHEMA)
        return
    _print(result, picture, show, size + size % 2)


def _check_nmf_options(nmf: int | None, of: Of, task: str | None, classes: str | None, center: Center,
                       layers: str | None, layer: str | None) -> None:
    """Options that only make sense with --nmf (or with --of classes) are refused elsewhere, in one line."""
    given = [name for name, value in (("--task", task), ("--classes", classes), ("--layer", layer)) if value is not None]
    if nmf is None and (given or of != Of.activations or center != Center.auto):
        extra = given + (["--of"] if of != Of.activations else []) + (["--center"] if center != Center.auto else [])
        raise ClipTermError(f"{' and '.join(extra)} go with --nmf", hint="e.g. --nmf 2 --of classes")
    if of == Of.activations and (task is not None or classes is not None):
        raise ClipTermError("--task and --classes name the classes of --of classes", hint="add --of classes")
    if of == Of.classes and center != Center.auto:
        raise ClipTermError("--center applies to activations: class attributions are factored as they are",
                            hint="drop --center, or use --of activations")
    if layer is not None and layers is not None:
        raise ClipTermError("give --layer or --layers, not both", hint="--layer L2, or --layers all for the sweep")
    if of == Of.classes and layers is not None and layers.strip().lower() != "all":
        raise ClipTermError("--of classes attributes through the heads of one layer on: give --layer L",
                            hint="e.g. --layer L2, or --layers all for the sweep")


def _load(model: str | None, pretrained: str | None, cache: str | None, cache_dir: str | None, device: str,
          quick_gelu: bool | None = None) -> tuple[Any, Any]:
    """The model (None with a cache and no --model) and the cache reader, checked to match."""
    from clipterm.vit.models import load_model, pick_device

    reader = None
    if cache is not None:
        from clipterm.cache.reader import open_cache

        reader = open_cache(cache, cache_dir)
    if reader is None:
        return load_model(model or "toy", pretrained, device=pick_device(device), quick_gelu=quick_gelu), None
    if model is None:
        return None, reader
    from clipterm.cache.reader import model_for_cache

    return model_for_cache(reader, pick_device(device), model, pretrained, quick_gelu), reader


def _print(result: Any, picture: Any, show: bool, size: int) -> None:
    from rich.table import Table

    where = "the cache's tokens" if result.source == "cache" else "a forward pass"
    stdout.print(f"[bold]{result.title}[/] in {picture.ref}: {result.measure}; {result.layer_names}, "
                 f"from {where}; {result.first_token} {result.cls:+.4f}, peak at {peak(result.grid)}")
    exponent = math.floor(math.log10(max(float(result.grid.abs().max()), 1e-30)))
    scale = f", ×1e{exponent}" if exponent else ""
    table = Table(*[""] + [str(c) for c in range(result.grid.shape[1])], title=f"per patch (row, column){scale}")
    for r, row in enumerate(result.grid.tolist()):
        table.add_row(str(r), *[f"{v / 10**exponent:+.2f}" for v in row])
    if show:
        from clipterm.thumbnails import map_view

        stdout.print(map_view(result, picture.pixels(size), picture.ref, size))
    if not show:
        stdout.print(table)


def peak(grid: Any) -> str:
    index = int(grid.argmax())
    return f"({index // grid.shape[1]}, {index % grid.shape[1]})"


def register(app: typer.Typer) -> None:
    app.command()(spatial)


# --------------------------------------------------------------------------- --nmf K: Building Blocks' factors of one image


def run_nmf(picture: Any, k: int, of: str, *, loaded: Any, reader: Any, layers: list[int] | None, sweep: bool,
            task: str | None, classes: str | None, center: str, method: str, pool: str, cache_dir: Any, show: bool,
            size: int, json_out: bool, meta: dict) -> None:
    from clipterm.analyses import classfactors, factorise, factorsweep

    if of == "classes":
        if method != "nmf":
            from clipterm.errors import ClipTermError

            raise ClipTermError("--of classes factors with NMF only: attributions are clipped at 0",
                                hint="drop --method pca")
        known = classfactors.class_set(loaded, reader, task, classes)
        run = lambda layer: classfactors.factorise_classes(picture, k, loaded=loaded, reader=reader,  # noqa: E731
                                                           layer=layer, classes=known)
        fixed = layers[0] if layers else None
    else:
        run = lambda layer: factorise.factorise(picture, k, loaded=loaded, reader=reader,  # noqa: E731
                                                layers=layers if layer is None else [layer], method=method, pool=pool,
                                                cache_dir=cache_dir, center=center)
        fixed = None
    header = {**meta, "cache": reader.name if reader is not None else None,
              "model": loaded.info.spec if loaded is not None else None, "mode": "nmf"}
    if sweep:
        if loaded is None:
            from clipterm.analyses.spatial import model_hint
            from clipterm.errors import ClipTermError

            raise ClipTermError("factorising needs per-patch activations, so a forward pass", hint=model_hint(reader))
        rows = factorsweep.sweep(picture, sweep_layers(loaded, of), run)
        if json_out:
            emit_json({**header, "sweep": [row.to_json() for row in rows], "of": of, "k": k}, schema=_schema())
            return
        _print_sweep(rows, picture, of)
        return
    result = run(fixed)
    if json_out:
        emit_json({**header, **result.to_json()}, schema=_schema())
        return
    _print_factors(result, picture, show, size)


def _schema() -> str:
    return SCHEMA


def sweep_layers(loaded: Any, of: str) -> list[int]:
    """Every layer the sweep visits: each block (class attributions through the heads of that layer on, or that
    layer's activations); a ResNet's last stage and pool alone."""
    from clipterm.vit.towers import position_layers

    if of == "classes":
        from clipterm.analyses.spatial import _readout

        return list(range(_readout(loaded.model).shape[0]))
    if loaded.info.tower == "resnet":
        return position_layers(loaded.model, None, loaded.info.layers)
    return list(range(loaded.info.layers))


def _print_factors(result: Any, picture: Any, show: bool, size: int) -> None:
    from rich.table import Table

    from clipterm.names import format_layers

    where = f"the heads of {format_layers(result.layers)} on" if result.of == "classes" else format_layers(result.layers)
    stdout.print(f"[bold]{result.title}[/] through {where} in {picture.ref} (relative error {result.error:.3f})")
    classes = result.of == "classes"
    table = Table("factor", "share", "peak patch", *(["top classes (weight)", "classes spanned"] if classes
                                                      else ["nearest texts (cosine)"]))
    for i, factor in enumerate(result.factors, 1):
        named = " · ".join(f"{text} ({value:.2f})" for text, value in factor.texts[:4])
        table.add_row(str(i), f"{100 * factor.share:.0f}%", peak(factor.grid), named,
                      *([f"{factor.spread:.1f}"] if classes else []))
    if show:
        from clipterm.thumbnails import map_view

        stdout.print(map_view(result, picture.pixels(size), picture.ref, size))
    stdout.print(table)


def _print_sweep(rows: list[Any], picture: Any, of: str) -> None:
    from rich.table import Table

    from clipterm import names

    known = rows and rows[0].iou is not None
    stdout.print(f"[bold]{rows[0].factors.title if rows else 'factors'}[/], layer by layer, in {picture.ref}"
                 + ("" if known else " (no object masks: a toy:SEED/INDEX scene with two objects has them)"))
    table = Table("layer", *(["object IoU"] if known else []), "map overlap",
                  *(["classes spanned"] if of == "classes" else []), "factors (top 2)")
    for row in rows:
        tops = " | ".join(" · ".join(text for text, _ in f.texts[:2]) for f in row.factors.factors)
        table.add_row(names.layer(row.layer), *([f"{row.iou:.2f}"] if known else []), f"{row.overlap:.2f}",
                      *([" ".join(f"{s:.1f}" for s in row.spans)] if of == "classes" else []), tops)
    stdout.print(table)
