"""`clipterm unit CACHE UNIT`: one unit's page (top images, feature visualisation and its facets, hill-climb strings,
sparse text decomposition, ablation effect), in the terminal, as JSON, or as one self-contained HTML file."""

from __future__ import annotations

from pathlib import Path

import typer

from clipterm.cli.common import CacheArg, CacheDirOpt, Device, DeviceOpt, JsonOpt, open_reader
from clipterm.cli.output import emit_json, progress, stdout
from clipterm.errors import ClipTermError, ExitCode

SCHEMA = "clipterm.unit/1"


def unit(
    cache: str = CacheArg,
    component: str = typer.Argument(..., help="The unit: a head (L5.H2), a pool head (pool.H3), a neuron (L4.N12) "
                                    "or a ResNet channel of any stage (L3.N12, L2.N40)."),
    facets: str = typer.Option(None, "--facets", help="Comma-separated TASK or TASK/CLASS facets to visualise "
                               "(default: every labelled task of the cache)."),
    steps: int = typer.Option(128, "--steps", min=1, help="Feature visualisation steps, per picture."),
    size: int = typer.Option(None, "--size", help="Side of the visualisations (default: the model's input size)."),
    facet_weight: float = typer.Option(1.0, "--facet-weight", help="Weight of each facet's term (the article's form)."),
    search_steps: int = typer.Option(60, "--search-steps", min=1, help="Hill-climb steps of the text search."),
    top: int = typer.Option(12, "--top", min=1, help="How many top dataset images."),
    pool: str = typer.Option(None, "--pool", help="Text pool: `toy`, `general` or a file (default: toy for a toy "
                             "model, else general)."),
    html: Path = typer.Option(None, "--html", help="Write the page as one self-contained HTML file (images inline; "
                              "opens with no network)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the visualisations, the search and the ablation sample."),
    cache_dir: str = CacheDirOpt,
    device: Device = DeviceOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Everything clipterm knows about one unit, as OpenAI Microscope's neuron pages (and the Multimodal Neurons
    article's tools): top dataset images; feature visualisation, plain and one per facet; best hill-climb strings;
    sparse text decomposition; ablation effect per task. JSON schema: clipterm.unit/1."""
    from clipterm.analyses import unit as pages
    from clipterm.analyses.session import Analyses
    from clipterm.cache.reader import model_for_cache
    from clipterm.vit.models import pick_device

    if html is not None and not html.parent.is_dir():
        raise ClipTermError(f"--html {html}: the folder {html.parent} does not exist",
                            hint="create it first, or give a file in an existing folder", code=ExitCode.USAGE)
    if html is not None and html.is_dir():
        raise ClipTermError(f"--html {html} is a folder", hint="give a file name, e.g. --html unit.html", code=ExitCode.USAGE)
    reader = open_reader(cache, cache_dir)
    loaded = model_for_cache(reader, pick_device(device.value))
    analyses = Analyses(reader, pool=pool, cache_dir=cache_dir, loaded=loaded)
    wanted = [f.strip() for f in facets.split(",") if f.strip()] if facets is not None else None
    options = pages.Options(facets=wanted, steps=steps, size=size, facet_weight=facet_weight, search_steps=search_steps,
                            top=top, seed=seed, cache_dir=cache_dir)
    pages.check(reader, component, options, loaded)  # bad inputs fail before the progress bar
    with progress(f"unit {component}", total=len(pages.SECTIONS), unit="sections") as advance:
        options.progress = lambda section: advance(1, note=section)
        page = pages.unit_page(analyses, component, options)
    if html is not None:
        from clipterm.analyses.unit_html import render
        from clipterm.files import atomic_write

        atomic_write(html, render(page).encode("utf-8"), durable=False)
    record = pages.to_json(page) | ({"html": str(html)} if html is not None else {})
    if json_out:
        emit_json(record, schema=SCHEMA)
        return
    _print(record)


def _print(page: dict) -> None:
    stdout.print(f"[bold]{page['component']}[/]: {page['about']} ({page['model']}, cache {page['cache']})", highlight=False)
    for section in ("images", "visualisation", "facets", "search", "sparse", "ablation"):
        value = page[section]
        if isinstance(value, dict) and "unavailable" in value:
            stdout.print(f"  {section}: not available ({value['unavailable']})", highlight=False)
        elif section == "images":
            labels = [" ".join(e.get("labels", {}).values()) for e in value["examples"][:5]]
            stdout.print(f"  top images ({value['by']}): " + "; ".join(labels), highlight=False)
        elif section == "visualisation":
            stdout.print(f"  visualisation: {value['objective']} {value['final']:+.4g}", highlight=False)
        elif section == "facets":
            for v in value:
                stdout.print(f"  facet {v['facet']}: {v['final']:+.4g} (probe {v['probe']['layer']} "
                             f"{v['probe']['accuracy']:.0%}, chance {v['probe']['chance']:.0%})", highlight=False)
        elif section == "search":
            stdout.print("  search: " + "; ".join(f"{s['text']!r} {s['cosine']:.3f}" for s in value["strings"][:3]),
                         highlight=False)
        elif section == "sparse":
            stdout.print(f"  {value['method']}: " + "; ".join(t["text"] for t in value["terms"][:4]), highlight=False)
        else:
            stdout.print("  ablation: " + ", ".join(f"{task} {t['drop']:+.3f}" for task, t in value["tasks"].items()),
                         highlight=False)
    if "html" in page:
        stdout.print(page["html"], highlight=False)


def register(app: typer.Typer) -> None:
    app.command()(unit)
