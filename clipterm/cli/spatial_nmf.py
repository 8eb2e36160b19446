"""`clipterm spatial --nmf K`: Building Blocks' factors of one image, of its activations or of its class
attributions, at one layer set or swept layer by layer (`--layers all`)."""

from __future__ import annotations

from typing import Any

from clipterm.cli.output import emit_json, stdout


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
    from clipterm.cli.spatial import SCHEMA

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

    from clipterm.cli.spatial import peak
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
