"""One unit's page (`clipterm unit CACHE L3.N12`): everything clipterm knows about a head, neuron or channel.

As OpenAI Microscope's neuron pages, and the Multimodal Neurons article's three tools side by side: its top
dataset images; its feature visualisation, plain and one per facet (`facets.py`: the article's form); its best
hill-climb strings (`search.py`); its sparse text decomposition (a neuron's OMP code over the text pool, a head's
TextSpan texts); and its ablation effect per labelled task: a head's direct mean-ablation from the cache, a
neuron's or channel's mean-ablation through the real forward pass (its output at every position replaced by its
dataset mean there, so later layers see the change). A section that cannot be computed for this unit says why
(`unavailable`) instead of failing the page; an input the user got wrong fails it first, in one line.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from clipterm import names
from clipterm.errors import ClipTermError, ExitCode

SECTIONS = ("images", "visualisation", "facets", "search", "sparse", "ablation")
ABLATION_ROWS = 1000  # rows a forward mean-ablation runs on (a seeded sample of a bigger cache)


@dataclass
class Options:
    facets: list[str] | None = None  # TASK or TASK/CLASS; None: every labelled task
    steps: int = 128  # feature visualisation steps
    size: int | None = None
    facet_weight: float = 1.0
    search_steps: int = 60
    top: int = 12
    sparse_terms: int = 8
    draws: int = 300
    seed: int = 0
    cache_dir: str | None = None
    progress: Callable[[str], None] = field(default=lambda _note: None)


def png_uri(pixels: Any) -> str:
    """An (S, S, 3) uint8 image as a `data:image/png;base64,…` URI (the page carries its images inline)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def check(reader: Any, component: str, options: Options, loaded: Any) -> tuple[Any, list[str]]:
    """The unit, parsed and checked against the tower, and the facets to draw: refuses bad inputs before any work."""
    from clipterm.analyses.featvis import climb_for

    unit = reader.tower.visual_unit(names.parse(component))
    if unit.kind not in ("head", "neuron"):
        raise ClipTermError(f"{component} is not a unit: a page describes one head, neuron or channel",
                            hint=reader.tower.vocabulary, code=ExitCode.USAGE)
    climb = climb_for(loaded)
    climb.unit_term(unit, "activation" if unit.kind == "neuron" else "effect", 1, lambda _c: torch.zeros(1))
    wanted = options.facets if options.facets is not None else list(reader.tasks)
    for spec in wanted:
        task, _, value = spec.partition("/")
        if task not in reader.tasks:
            raise ClipTermError(f"cache {reader.name} has no labels for task {task!r}",
                                hint=f"tasks with labels: {', '.join(reader.tasks) or 'none'}", code=ExitCode.USAGE)
        if value and value not in reader.tasks[task]:
            raise ClipTermError(f"no class {value!r} in task {task}", hint=f"classes: {', '.join(reader.tasks[task])}"[:300],
                                code=ExitCode.USAGE)
    return unit, wanted


def unit_page(analyses: Any, component: str, options: Options) -> dict[str, Any]:
    """The page as a dict: every section, images as PNG data URIs (`uri`), a section it cannot compute as
    {"unavailable": why}."""
    reader, loaded = analyses.reader, analyses.loaded()
    unit, wanted = check(reader, component, options, loaded)
    name = str(unit)
    page: dict[str, Any] = {"component": name, "about": reader.tower.describe(unit), "cache": reader.name,
                            "model": loaded.info.spec, "images": reader.n}
    steps = [("images", lambda: _images(analyses, name, options)),
             ("visualisation", lambda: _visualise(loaded, reader, name, None, options)),
             ("facets", lambda: [_visualise(loaded, reader, name, spec, options) for spec in wanted]),
             ("search", lambda: _search(analyses, name, options)),
             ("sparse", lambda: _sparse(analyses, unit, name, options)),
             ("ablation", lambda: _ablation(analyses, unit, name, options))]
    for section, compute in steps:
        options.progress(section)
        try:
            page[section] = compute()
        except ClipTermError as error:
            page[section] = {"unavailable": error.message}
    return page


def _images(analyses: Any, name: str, options: Options) -> dict[str, Any]:
    from clipterm.analyses.examples import top_images
    from clipterm.analyses.spatial import open_image

    def pool_embeds():
        pool, embeds = analyses._pool()
        return embeds, pool.texts

    ranking = top_images(analyses.reader, name, top=options.top, text_embeds=pool_embeds)
    rows = []
    for example in ranking.examples:
        pixels = open_image(f"row:{example.row}", analyses.reader).pixels(64)
        rows.append({**example.to_json(), "uri": png_uri(pixels) if pixels is not None else None})
    return {"by": ranking.about, "examples": rows}


def _visualise(loaded: Any, reader: Any, name: str, facet_spec: str | None, options: Options) -> dict[str, Any]:
    from clipterm.analyses import facets, featvis

    climb = featvis.climb_for(loaded)
    goal = featvis.objective_for(name, loaded, reader, climb=climb)
    probe = None
    if facet_spec is not None:
        layer = facets.default_layer(climb.layers, min(featvis.unit_layers(goal, climb)))
        probe = facets.train_facet(loaded, reader, facet_spec, layer=layer, seed=options.seed)
    config = featvis.Config(steps=options.steps, size=options.size, seed=options.seed, facet_weight=options.facet_weight)
    frame = None
    for frame in featvis.visualise(loaded, goal, config, probe, climb=climb):
        pass
    return {"facet": facet_spec, "objective": goal.kind, "final": round(frame.objective, 5), "steps": config.steps,
            "probe": probe.to_json() if probe is not None else None, "uri": png_uri(frame.pixels[0]),
            "pixels": frame.pixels[0]}


def _search(analyses: Any, name: str, options: Options) -> dict[str, Any]:
    target = analyses.search_target(name)
    if target is None:
        raise ClipTermError(f"{name} has no direction to search for (a channel needs its layer's neurons file)")
    last = None
    for last in analyses.search(target, cancel=lambda: False, seed=options.seed, steps=options.search_steps):
        pass
    return {"steps": last.step, "strings": [{"text": hit.text, "cosine": round(hit.cosine, 4)} for hit in last.best[:5]]}


def _sparse(analyses: Any, unit: Any, name: str, options: Options) -> dict[str, Any]:
    if unit.kind == "head":
        described = analyses.description(name)
        return {"method": "TextSpan", "pool": described.pool,
                "terms": [{"text": row.text, "explained": round(row.explained, 4)} for row in described.rows]}
    if unit.layer not in analyses.neuron_layers():
        raise ClipTermError(f"no neurons file for {names.layer(unit.layer)}: its units have no stored direction")
    described = analyses.neuron_description(name, k=options.sparse_terms)
    return {"method": "OMP", "pool": described.pool, "cosine": round(described.cosine, 4),
            "terms": [{"text": row.text, "coefficient": round(row.coefficient, 4)} for row in described.rows]}


def _ablation(analyses: Any, unit: Any, name: str, options: Options) -> dict[str, Any]:
    from clipterm.analyses import ablation

    if unit.kind == "head":
        return {"method": "direct mean-ablation (cache)",
                "tasks": {task: {"metric": t.metric, "baseline": round(t.baseline, 4), "drop": round(t.bars[0].drop, 4),
                                 "low": round(t.bars[0].low, 4), "high": round(t.bars[0].high, 4)}
                          for task, t in analyses.ablate([name]).items()}}
    reader, loaded = analyses.reader, analyses.loaded()
    keep = torch.zeros(reader.n, dtype=torch.bool)
    keep[torch.randperm(reader.n, generator=torch.Generator().manual_seed(options.seed))[:ABLATION_ROWS]] = True
    rows = keep.nonzero().flatten()
    shift = torch.zeros(reader.n, loaded.info.embed_dim)
    shift[rows] = forward_shift(loaded, reader, unit, rows)
    scorings = ablation.scorings(reader, analyses.encode_texts, pool_embeds=lambda: analyses._pool()[1], keep=keep)
    result = ablation.ablate(scorings, [(name, shift)], options.draws)
    return {"method": "forward mean-ablation", "rows": len(rows),
            "tasks": {task: {"metric": "agreement" if scorings[task].agreement else "accuracy",
                             "baseline": round(float(scorings[task].outcome().float().mean()), 4),
                             "drop": round(r[0].drop, 4), "low": round(r[0].low, 4), "high": round(r[0].high, 4)}
                      for task, r in result.items()}}


def forward_shift(loaded: Any, reader: Any, unit: Any, rows: torch.Tensor, batch: int = 128) -> torch.Tensor:
    """ablated − plain image embeddings (n, D) of cache rows, the unit's output replaced by its mean over those rows
    at every position (the tower's `unit_site` says where it lives)."""
    from clipterm.analyses.featvis import climb_for
    from clipterm.analyses.spatial import open_image

    climb = climb_for(loaded)
    module, dim, index = climb.unit_site(unit)
    stem = climb.visual.conv1.weight
    state: dict[str, Any] = {"sum": None, "mean": None}

    def hook(_module, _inputs, output):
        values = output.select(dim, index)
        if state["mean"] is None:  # first pass: accumulate the mean
            total = values.float().sum(0)
            state["sum"] = total if state["sum"] is None else state["sum"] + total
            return None
        output = output.clone()
        output.select(dim, index)[:] = state["mean"].to(output.dtype)
        return output

    def batches():
        for start in range(0, len(rows), batch):
            images = [open_image(f"row:{int(r)}", reader).image for r in rows[start : start + batch]]
            yield torch.stack([loaded.preprocess(image) for image in images]).to(device=stem.device, dtype=stem.dtype)

    handle = module.register_forward_hook(hook)
    plain, ablated = [], []
    try:
        with torch.no_grad():
            for pixels in batches():
                plain.append(climb.visual(pixels).float().cpu())
            state["mean"] = state["sum"] / len(rows)
            for pixels in batches():
                ablated.append(climb.visual(pixels).float().cpu())
    finally:
        handle.remove()
    return torch.cat(ablated) - torch.cat(plain)  # (n, D)


def to_json(page: dict[str, Any]) -> dict[str, Any]:
    """The page without its pixels and inline images (`--json`)."""
    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in ("uri", "pixels")}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return strip(page)
