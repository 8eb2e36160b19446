"""`clipterm textspan | ablate | attribute`: what heads say in words, what matters, and why CLIP said this."""

from __future__ import annotations

from enum import Enum

import typer

from clipterm import names
from clipterm.cli.common import (
    CacheArg,
    CacheDirOpt,
    JsonOpt,
    default_pool_for,
    embed_reporting,
    layer_of,
    load_pool_reporting,
)
from clipterm.cli.common import open_reader as _open
from clipterm.cli.output import emit_json, progress, stdout
from clipterm.towers import tower_for

TaskOpt = typer.Option(None, "--task", help="Label task to score (default: every task of the cache).")
ClassesOpt = typer.Option(None, "--classes", help="File of class names, one per line in label order (overrides the cache's).")
TemplatesOpt = typer.Option(None, "--templates", help="File of prompt templates with `{}`, one per line (default: the "
                                                      "toy task's templates, or open_clip's ImageNet templates).")


class SecondOrderSet(str, Enum):
    all = "all"
    significant = "significant"
    insignificant = "insignificant"


def _encoder(loaded):
    from clipterm.vit.textencode import encode_texts

    return lambda texts: encode_texts(loaded.model, loaded.tokenizer, texts)


def _scorings(reader, loaded, task, classes, templates, pool, cache_dir, keep=None):
    from clipterm.analyses.ablation import read_lines, scorings

    return scorings(
        reader, _encoder(loaded), task,
        classes=read_lines(classes, "classes") if classes else None,
        templates=_templates(templates),
        pool_embeds=lambda: embed_reporting(loaded, load_pool_reporting(default_pool_for(reader, pool)), cache_dir),
        keep=keep,
    )


def _templates(path: str | None) -> list[str] | None:
    from clipterm.analyses.ablation import read_lines
    from clipterm.errors import ClipTermError

    if not path:
        return None
    lines = read_lines(path, "templates")
    bad = [t for t in lines if t.count("{}") != 1]
    if bad:
        raise ClipTermError(f"template without exactly one {{}}: {bad[0]!r}", hint="write templates like: a photo of a {}.")
    return lines


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def textspan(
    cache: str = CacheArg,
    component: list[str] = typer.Option(None, "--component", "-c", help="Head or MLP to describe, e.g. L5.H2 (repeatable)."),
    layers: str = typer.Option(None, "--layers", help="Describe every head of these layers, e.g. L4-5 (default: the last 4)."),
    n_texts: int = typer.Option(10, "--texts", min=1, help="Texts per component."),
    rank: int = typer.Option(None, "--rank", min=1, help="Rank r of the effects' subspace the texts are projected on (default: head dim)."),
    pool: str = typer.Option(None, "--pool", help="`toy`, `general`, or a UTF-8 file (default: toy for the toy model, else general)."),
    draws: int = typer.Option(5, "--baseline-draws", min=0, help="Random-text draws for the baseline (0: skip it)."),
    evaluate: int = typer.Option(None, "--evaluate", min=1, help="Replace the heads of the last K layers by their TextSpan "
                                 "reconstructions, mean-ablate earlier heads, and report zero-shot accuracy."),
    task: str = TaskOpt,
    convention: str = typer.Option("clipterm", "--convention", help="clipterm (each write centred by its own mean), or "
                                   "reference: clip_text_span's head effects and rank min(images, head dim) (--rank "
                                   "overrides the head dim); heads only, needs a --neurons cache. See docs/conventions.md."),
    cache_dir: str = CacheDirOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Describe heads by texts: TextSpan (Gandelsman et al., ICLR 2024), from the cache's statistics.

    For each text: the share of the component's variance it explains, and the running total; the
    baseline is the same share for as many random pool texts. JSON schema: clipterm.textspan/2.
    """
    from clipterm import names
    from clipterm.analyses import conventions
    from clipterm.analyses import textspan as span
    from clipterm.cache.reader import model_for_cache
    from clipterm.errors import ClipTermError

    conventions.check_convention(convention)
    reference = convention == "reference"
    if reference and evaluate is not None:
        raise ClipTermError("--convention reference does not combine with --evaluate",
                            hint="--evaluate scores clipterm's effects; run it without --convention")
    reader = _open(cache, cache_dir)
    shape = reader.shape
    if component:
        components = [str(tower_for(shape).parse(c).base) for c in component]
    else:
        chosen = names.parse_layers(layers, shape.layers) if layers else list(range(max(shape.layers - 4, 0), shape.layers))
        components = [str(c) for c in tower_for(shape).heads(chosen)]
    if reference:
        span.check_reference(components)
        conventions.require(reader)
    if evaluate is not None and evaluate > shape.layers:
        raise ClipTermError(f"--evaluate {evaluate}: the model has {shape.layers} layers", hint=f"use 1..{shape.layers}")
    requested = list(components)
    if evaluate is not None:
        components += [str(c) for c in tower_for(shape).heads(list(range(shape.layers - evaluate, shape.layers)))
                       if str(c) not in components]
    text_pool = load_pool_reporting(default_pool_for(reader, pool))
    loaded = model_for_cache(reader)
    embeds = embed_reporting(loaded, text_pool, cache_dir)
    with progress("textspan", total=None, unit="heads"):
        view = conventions.ReferenceView(reader, loaded.model) if reference else None
        results = span.describe(reader, components, embeds, n_texts=n_texts, rank=rank, baseline_draws=draws, view=view)
    if reference:
        rank = span.reference_rank(reader.n, reader.readout.shape[2], rank)
    payload = {
        "cache": reader.name, "pool": text_pool.summary(), "convention": convention, "rank": rank,
        "texts_per_component": n_texts,
        "components": [{
            "component": name, "total_variance": results[name].total_variance, "baseline": results[name].baseline,
            "explained": results[name].cumulative[-1] if results[name].cumulative else 0.0,
            "texts": [{"row": i, "text": text_pool.texts[i], "explained": e, "cumulative": c}
                      for i, e, c in zip(results[name].indices, results[name].explained, results[name].cumulative)],
        } for name in requested],
    }
    if evaluate is not None:
        from clipterm.analyses.ablation import textspan_evaluation

        spans = {name: results[name] for name in components}
        payload["evaluation"] = {"last_layers": evaluate, "tasks": {
            t: textspan_evaluation(reader, s, spans, evaluate)
            for t, s in _scorings(reader, loaded, task, None, None, pool, cache_dir).items()}}
    if json_out:
        emit_json(payload, schema="clipterm.textspan/2")
        return
    _print_textspan(payload)


def _print_textspan(payload: dict) -> None:
    from rich.table import Table

    convention = " (clip_text_span's convention)" if payload["convention"] == "reference" else ""
    table = Table("component", "#", "text", "explained", "cumulative",
                  title=f"TextSpan of {payload['cache']}{convention} over pool {payload['pool']['name']} "
                        f"({payload['pool']['texts']:,} texts)")
    for entry in payload["components"]:
        baseline = f"random texts: {_pct(entry['baseline'])}" if entry["baseline"] is not None else ""
        for k, text in enumerate(entry["texts"]):
            label = f"[bold]{entry['component']}[/]" if k == 0 else (f"[dim]{baseline}[/]" if k == 1 else "")
            table.add_row(label, str(k + 1), text["text"], _pct(text["explained"]), _pct(text["cumulative"]))
        table.add_section()
    stdout.print(table)
    for task, accs in payload.get("evaluation", {}).get("tasks", {}).items():
        stdout.print(f"[bold]{task}[/]: baseline {_pct(accs['baseline'])}, heads before the last "
                     f"{payload['evaluation']['last_layers']} layers mean-ablated {_pct(accs['early_heads_mean_ablated'])}, "
                     f"and the last layers' heads replaced by TextSpan {_pct(accs['textspan_replaced'])}")


def ablate(
    cache: str = CacheArg,
    by: str = typer.Option("head", "--by", help="Ablate each `layer` (its heads and MLP), `head` or `mlp`."),
    cumulative: bool = typer.Option(False, "--cumulative", help="Also the curve with layers 0..l all mean-ablated."),
    task: str = TaskOpt,
    classes: str = ClassesOpt,
    templates: str = TemplatesOpt,
    pool: str = typer.Option(None, "--pool", help="For caches without labels: score agreement over this pool's texts."),
    top: int = typer.Option(0, "--top", min=0, help="Rows per task, largest drop first (0: all)."),
    draws: int = typer.Option(2000, "--draws", min=100, help="Bootstrap draws for the 95% intervals."),
    forward: bool = typer.Option(False, "--forward", help="Also ablate in the real forward pass (hooks replace each "
                                 "component's output by its mean, so indirect effects count); needs the images."),
    second_order: str = typer.Option(None, "--second-order", help="Instead, mean-ablate the second-order effects of this "
                                     "layer's neurons (e.g. L4; needs `clipterm neurons build CACHE --layer L4`)."),
    which: list[SecondOrderSet] = typer.Option(None, "--which", help="With --second-order: all of them, the significant "
                                               "ones (per neuron, its top-k images by |effect - mean|) or the rest "
                                               "(repeatable; default: all three)."),
    convention: str = typer.Option("clipterm", "--convention", help="clipterm (each write centred by its own mean), or "
                                   "reference: clip_text_span's effects (equal shares of ln_post's mean and beta, each image "
                                   "divided by |embedding|; embed counts as an MLP; needs a --neurons cache). With "
                                   "--second-order it must match the neurons file's. See docs/conventions.md."),
    cache_dir: str = CacheDirOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Mean-ablate components one at a time, directly from the cache, and report the zero-shot accuracy drop.

    Drops carry bootstrap 95% intervals over images. Without labels, the score is agreement with the
    unablated top-1 prediction. With --forward, each row also gets the forward-pass drop, and each
    task the largest gap between the two. With --second-order L4, the rows are L4's neurons' second-order
    effects mean-ablated: all, significant only and insignificant only (Gandelsman et al., 2024).
    JSON schema: clipterm.ablate/2.
    """
    from clipterm.analyses import ablation, conventions
    from clipterm.cache.reader import model_for_cache
    from clipterm.errors import ClipTermError

    conventions.check_convention(convention)
    reference = convention == "reference"
    reader = _open(cache, cache_dir)
    neuron_file = None
    if second_order is not None:
        from clipterm.cache.neurons import NeuronFile

        if forward or cumulative:
            flag = "--forward" if forward else "--cumulative"
            raise ClipTermError(f"--second-order does not combine with {flag}", hint=f"run {flag} as a separate `clipterm ablate`")
        neuron_file = NeuronFile(reader, layer_of(second_order, reader, "--second-order"))
        if neuron_file.convention != convention:
            raise ClipTermError(f"the neurons file of {names.layer(neuron_file.layer)} holds {neuron_file.convention}-convention "
                                f"effects, not {convention}",
                                hint=f"run `clipterm neurons build {reader.name} --layer {names.layer(neuron_file.layer)} "
                                     f"--convention {convention}`, or pass --convention {neuron_file.convention}")
        by = "second-order"
        components = [w.value for w in which] if which else list(ablation.SECOND_ORDER)
        second_order_shifts = ablation.second_order_shifts(neuron_file, components)  # before the model loads
    else:
        if which:
            raise ClipTermError("--which needs --second-order", hint="e.g. --second-order L4 --which significant")
        if reference and forward:
            raise ClipTermError("--convention reference does not combine with --forward",
                                hint="the forward pass replaces outputs by their means; run it without --convention")
        if reference:
            conventions.require(reader)
        components = ablation.group(reader, by, reference)
    if task is not None:
        ablation.task_names(reader, task)  # fail before loading the model
    loaded = model_for_cache(reader)
    keep = None if neuron_file is None else ~neuron_file.missing
    scorings = _scorings(reader, loaded, task, classes, templates, pool, cache_dir, keep)
    view = conventions.ReferenceView(reader, loaded.model) if reference and neuron_file is None else None
    if neuron_file is not None:
        rows = ablation.ablate(scorings, second_order_shifts, draws)
    elif view is None and not reader.joint_heads:  # class space, streamed: one pass over the components' own blocks
        from clipterm.analyses import direct_ablation

        with progress("ablating", total=reader.n, unit="images") as advance:
            rows = direct_ablation.ablate_cached(scorings, reader, components, draws, on_rows=advance)
    else:
        with progress("ablating", total=len(components), unit="components") as advance:
            def counted(items):
                for item in items:
                    yield item
                    advance(1)
            rows = ablation.ablate(scorings, counted(ablation.shifts(reader, components, view)), draws)
    curve = {}
    if cumulative and view is None and not reader.joint_heads:
        from clipterm.analyses import direct_ablation

        curve = direct_ablation.ablate_cached(scorings, reader, direct_ablation.cumulative_pieces(reader, by), draws)
    elif cumulative:
        curve = ablation.ablate(scorings, ablation.cumulative_shifts(reader, by, view), draws)
    forward_rows = {}
    if forward:
        from clipterm.analyses.forward_ablation import forward_shifts

        with progress("forward passes", total=len(components) + 1, unit="passes") as advance:
            forward_rows = ablation.ablate(scorings, forward_shifts(reader, loaded, components, on_pass=advance), draws)
    payload = {"cache": reader.name, "by": by, "images": reader.n, "forward": forward, "convention": convention, "tasks": {}}
    if neuron_file is not None:
        payload["second_order"] = {"layer": names.layer(neuron_file.layer), "top_images": neuron_file.top_k,
                                   "missing": int(neuron_file.missing.sum())}
    for name, scoring in scorings.items():
        entries = [r.to_json() for r in rows[name]]
        if neuron_file is not None:  # rows are the sets of one layer's neurons: the component is the layer
            entries = [{"component": names.layer(neuron_file.layer), "set": e.pop("component"), **e} for e in entries]
        for entry, other in zip(entries, forward_rows.get(name, [])):
            entry["forward"] = {k: v for k, v in other.to_json().items() if k != "component"}
            entry["gap"] = round(abs(other.drop - entry["drop"]), 5)
        if neuron_file is None:
            entries.sort(key=lambda e: -e["drop"])
        payload["tasks"][name] = {
            "metric": "agreement" if scoring.agreement else "accuracy", "images": int(len(scoring.rows)),
            "baseline": float(scoring.outcome().float().mean()),
            "components": entries[:top] if top else entries,
            **({"largest_gap": max(({"component": e["component"], "gap": e["gap"]} for e in entries), key=lambda g: g["gap"])}
               if forward else {}),
            **({"cumulative": [r.to_json() for r in curve[name]]} if cumulative else {}),
        }
    if json_out:
        emit_json(payload, schema="clipterm.ablate/2")
        return
    _print_ablation(payload)


def _print_ablation(payload: dict) -> None:
    from rich.table import Table

    for task, result in payload["tasks"].items():
        title = (f"{task}: {result['metric']} {_pct(result['baseline'])} on {result['images']:,} images; "
                 f"drop when mean-ablated, with 95% interval")
        forward = payload.get("forward")
        table = Table(payload["by"], result["metric"], "drop", "95% interval", "cosine", *(["forward drop"] if forward else []),
                      title=title)
        for r in result["components"]:
            table.add_row(" ".join(filter(None, (r["component"], r.get("set")))), _pct(r["score"]), _pct(r["drop"]), f"[{_pct(r['low'])}, {_pct(r['high'])}]",
                          f"{r['cosine']:.3f}", *([_pct(r["forward"]["drop"])] if forward else []))
        stdout.print(table)
        if "second_order" in payload:
            about = payload["second_order"]
            stdout.print(f"significant: per neuron of {about['layer']}, its top {about['top_images']} images by |effect - mean|"
                         + (f"; {about['missing']} images the neurons build could not read are left out" if about["missing"] else ""))
        if forward:
            gap = result["largest_gap"]
            stdout.print(f"largest gap between direct and forward ablation: {_pct(gap['gap'])} ({gap['component']})")
        if "cumulative" in result:
            curve = Table("layers ablated", result["metric"], "drop", "95% interval", title=f"{task}: cumulative mean-ablation")
            for r in result["cumulative"]:
                curve.add_row(r["component"], _pct(r["score"]), _pct(r["drop"]), f"[{_pct(r['low'])}, {_pct(r['high'])}]")
            stdout.print(curve)


def attribute(
    cache: str = CacheArg,
    image: str = typer.Option(..., "--image", help="Row of the cache, or the image's path or id."),
    text: str = typer.Option(None, "--text", help="Text to explain the image's score for."),
    class_name: str = typer.Option(None, "--class", help="Class (of --task, or of the only task that has it) instead of --text."),
    vs: str = typer.Option(None, "--vs", help="A second text (or class) to contrast with: explains score(A) - score(B)."),
    task: str = typer.Option(None, "--task", help="Task whose classifier --class uses."),
    top: int = typer.Option(20, "--top", min=1, help="Components to list, largest contribution first."),
    cache_dir: str = CacheDirOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Why did CLIP say this? Rank the components by their share of one image's cosine score for a text.

    Each component's direct effect e_c contributes e_c . t / |image| to cos(image, t); the shares add
    up to the score exactly. JSON schema: clipterm.attribute/1.
    """
    import torch.nn.functional as F

    from clipterm.analyses import ablation
    from clipterm.cache.reader import model_for_cache
    from clipterm.errors import ClipTermError

    if (text is None) == (class_name is None):
        raise ClipTermError("give exactly one of --text and --class", hint='e.g. --text "a red circle"')
    reader = _open(cache, cache_dir)
    row = ablation.find_row(reader, image)
    loaded = model_for_cache(reader)
    encode = _encoder(loaded)
    if text is not None:
        targets = [text] + ([vs] if vs else [])
        directions = F.normalize(encode(targets).float(), dim=-1)  # (1 or 2, D)
    else:
        targets = [class_name] + ([vs] if vs else [])
        directions = ablation.class_directions(reader, encode, targets, task)
    direction = directions[0] - directions[1] if vs else directions[0]
    contributions = ablation.image_contributions(reader, row)
    image_embed = reader.image_embeds([row])[0]
    ranked = ablation.attribute(contributions, direction, image_embed)
    unit = F.normalize(image_embed.float(), dim=0)
    scores = (directions @ unit).tolist()
    payload = {
        "cache": reader.name, "row": row, "image": reader.images()[int(reader.index()[row])], "targets": targets,
        "scores": scores, "explained": scores[0] - scores[1] if vs else scores[0],
        "components": [{"component": n, "contribution": c} for n, c in ranked[:top]],
        "rest": sum(c for _, c in ranked[top:]),
    }
    if json_out:
        emit_json(payload, schema="clipterm.attribute/1")
        return
    from rich.table import Table

    what = f"cos({targets[0]!r}) - cos({targets[1]!r}) = {payload['explained']:.4f}" if vs else f"cos({targets[0]!r}) = {scores[0]:.4f}"
    table = Table("component", "contribution", "share", title=f"row {row} of {reader.name}: {what}")
    total = payload["explained"] or 1.0
    for entry in payload["components"]:
        colour = "green" if entry["contribution"] >= 0 else "red"
        table.add_row(entry["component"], f"[{colour}]{entry['contribution']:+.4f}[/]", _pct(entry["contribution"] / total))
    table.add_row("[dim]the rest[/]", f"{payload['rest']:+.4f}", _pct(payload["rest"] / total))
    stdout.print(table)


def register(app: typer.Typer) -> None:
    app.command()(textspan)
    app.command()(ablate)
    app.command()(attribute)
