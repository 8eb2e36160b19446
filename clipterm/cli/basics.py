"""Top-level commands: doctor, models, locate, names."""

from __future__ import annotations

from enum import Enum

import typer

from clipterm.cli.common import CacheDirOpt, JsonOpt
from clipterm.cli.output import emit_json, stdout


class Place(str, Enum):
    cache = "cache"
    config = "config"
    themes = "themes"


def doctor(json_out: bool = JsonOpt) -> None:
    """Check this machine: Python, torch, CUDA and open_clip versions, where caches live, which weights are present."""
    from clipterm.doctor import report

    info = report()
    if json_out:
        emit_json(info, schema="clipterm.doctor/1")
        return
    from rich.table import Table

    table = Table(show_header=False, box=None, pad_edge=False)
    for key in ("clipterm", "python", "platform", "torch", "open_clip", "cuda", "cache_root", "config_dir", "toy_model"):
        table.add_row(f"[bold]{key}[/]", str(info[key]))
    table.add_row("[bold]themes[/]", ", ".join(info["themes_dirs"]))
    present = [f"{m['model']} {m['pretrained'] or ''}".strip() for m in info["weights_present"]]
    table.add_row("[bold]weights present[/]", ", ".join(present))
    stdout.print(table)


def models(
    json_out: bool = JsonOpt,
    present: bool = typer.Option(False, "--present", help="Only models whose weights are already on this machine."),
    supported: bool = typer.Option(False, "--supported", help="Only models the exact decomposition supports."),
) -> None:
    """List models: the built-in toy and every open_clip arch and pretrained tag, with weights and support status."""
    from clipterm.vit.catalogue import catalogue

    rows = [r for r in catalogue() if (not present or r["weights"] == "present") and (not supported or r["supported"])]
    if json_out:
        emit_json({"models": rows}, schema="clipterm.models/1")
        return
    from rich.table import Table

    count = sum(r["supported"] for r in rows)
    table = Table("model", "pretrained", "tower", "weights", "decomposition",
                  title=f"{len(rows)} models: {count} supported, {len(rows) - count} refused")
    for r in rows:
        weights = "[green]present[/]" if r["weights"] == "present" else f"[dim]{r['weights']}[/]"
        support = "[green]supported[/]" if r["supported"] else f"[yellow]refused[/]: {r['reason']}"
        table.add_row(r["model"], r["pretrained"] or "", r["tower"], weights, support)
    stdout.print(table)


def locate(
    what: Place = typer.Argument(..., help="cache, config or themes."),
    cache_dir: str = CacheDirOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Print where clipterm keeps its caches, its config, or its themes."""
    from clipterm import locations

    if what is Place.cache:
        path, why = locations.cache_root(cache_dir)
        paths, reason = [str(path)], why
    elif what is Place.config:
        paths, reason = [str(locations.config_dir())], ("$CLIPTERM_CONFIG or the user config dir; TUI keys are "
                                                        "remapped by binding id in config.toml there (? in the TUI lists the ids)")
    else:
        paths, reason = [str(p) for p in locations.themes_dirs()], "user themes first, then the bundled ones"
    if json_out:
        emit_json({"what": what.value, "paths": paths, "reason": reason}, schema="clipterm.locate/1")
        return
    for path in paths:
        print(path)


def names(
    components: list[str] = typer.Argument(..., help="Component names: embed, bias, L10, L10.H3, L10.H3:pc2, L10.MLP, L9.N1234; a ResNet's pool.H3, pool.pos, pool.bias, L3.N1234."),
    model: str = typer.Option("toy", "--model", help="Model whose shape the names are checked against."),
    json_out: bool = JsonOpt,
) -> None:
    """Check component names against a model and print them in canonical form."""
    from clipterm.names import layer
    from clipterm.towers import tower_for
    from clipterm.vit.models import model_shape

    shape = model_shape(model)
    tower = tower_for(shape)
    parsed = [tower.parse(name) for name in components]
    rows = [{"component": str(c), "kind": c.kind, "site": c.site,
             "layer": None if c.layer is None or c.site == "pool" else layer(c.layer), "index": c.index,
             "pc": c.pc, "about": tower.describe(c)} for c in parsed]
    if json_out:
        emit_json({"model": model, "shape": shape.__dict__, "components": rows}, schema="clipterm.names/2")
        return
    for row in rows:
        stdout.print(f"[bold]{row['component']}[/]  {row['about']}")


def register(app: typer.Typer) -> None:
    app.command()(doctor)
    app.command()(models)
    app.command()(locate)
    app.command()(names)
