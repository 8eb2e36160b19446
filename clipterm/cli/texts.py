"""`clipterm texts ls|show|build`: text pools and their cached embeddings."""

from __future__ import annotations

import typer

from clipterm.cli.common import (
    CacheDirOpt,
    Device,
    DeviceOpt,
    JsonOpt,
    PretrainedOpt,
    QuickGeluOpt,
    embed_reporting,
    load_pool_reporting,
)
from clipterm.cli.output import emit_json, stdout

texts_app = typer.Typer(help="Text pools (built-in `toy` and `general`, or a UTF-8 file) and their cached embeddings.",
                        no_args_is_help=True)

PoolOpt = typer.Option("toy", "--pool", help="`toy`, `general`, or a UTF-8 file with one text per line.")


@texts_app.command("ls")
def ls(cache_dir: str = CacheDirOpt, json_out: bool = JsonOpt) -> None:
    """List the built-in pools and the pool embeddings cached under the cache root."""
    from clipterm.inputs.texts import BUILTIN_POOLS, cached_embeddings, load_pool, texts_dir

    builtin = [{"name": name, "texts": len(load_pool(name)), "about": about} for name, about in BUILTIN_POOLS.items()]
    cached = cached_embeddings(cache_dir)
    if json_out:
        emit_json({"builtin": builtin, "cached": cached, "dir": str(texts_dir(cache_dir))}, schema="clipterm.texts.ls/2")
        return
    from rich.table import Table

    table = Table("pool", "texts", "about", title="built-in pools")
    for row in builtin:
        table.add_row(row["name"], f"{row['texts']:,}", row["about"])
    stdout.print(table)
    if not cached:
        stdout.print(f"[dim]no cached embeddings in {texts_dir(cache_dir)}; make some with `clipterm texts build`[/]")
        return
    table = Table("pool", "model", "texts", "MB", "file", title=f"cached embeddings in {texts_dir(cache_dir)}")
    for row in cached:
        table.add_row(str(row["pool"]), str(row["model"]), str(row["texts"]), f"{row['bytes'] / 1e6:.1f}", row["path"].rsplit("/", 1)[-1])
    stdout.print(table)


@texts_app.command()
def show(
    pool: str = typer.Argument("toy", help="`toy`, `general`, or a UTF-8 file with one text per line."),
    limit: int = typer.Option(40, "--limit", min=0, help="Texts to print (0: all)."),
    grep: str = typer.Option(None, "--grep", help="Only texts containing this string (case-insensitive)."),
    json_out: bool = JsonOpt,
) -> None:
    """Print a pool's texts, with their topics for the built-in pools, and its size and sha256."""
    text_pool = load_pool_reporting(pool)
    rows = [{"row": i, "text": t, "topic": text_pool.topics[i] if text_pool.topics else None}
            for i, t in enumerate(text_pool.texts) if grep is None or grep.lower() in t.lower()]
    shown = rows if limit == 0 else rows[:limit]
    if json_out:
        emit_json({"pool": text_pool.summary(), "matching": len(rows), "texts": shown}, schema="clipterm.texts.show/2")
        return
    from rich.table import Table

    table = Table("row", "text", "topic", title=f"{text_pool.name}: {len(text_pool):,} texts, sha256 {text_pool.sha256[:12]}",
                  caption=f"{len(shown)} of {len(rows)} shown" + ("" if len(shown) == len(rows) else "; --limit 0 shows all"))
    for row in shown:
        table.add_row(str(row["row"]), row["text"], row["topic"] or "")
    stdout.print(table)


@texts_app.command()
def build(
    model: str = typer.Option("toy", "--model", help="`toy`, an open_clip arch, or a local-dir model folder."),
    pretrained: str = PretrainedOpt,
    quick_gelu: bool = QuickGeluOpt,
    pool: str = PoolOpt,
    cache_dir: str = CacheDirOpt,
    device: Device = DeviceOpt,
    refresh: bool = typer.Option(False, "--refresh", help="Embed again even when cached."),
    json_out: bool = JsonOpt,
) -> None:
    """Embed a pool with a model's text tower and cache it per (weights sha256, pool sha256)."""
    import time

    from clipterm.inputs.texts import embeddings_path, model_key
    from clipterm.vit.models import load_model, pick_device

    text_pool = load_pool_reporting(pool)
    loaded = load_model(model, pretrained, device=pick_device(device.value), quick_gelu=quick_gelu)
    started = time.perf_counter()
    embeds = embed_reporting(loaded, text_pool, cache_dir=cache_dir, refresh=refresh)
    seconds = time.perf_counter() - started
    path = embeddings_path(model_key(loaded), text_pool, cache_dir)
    summary = {"pool": text_pool.summary(), "model": loaded.info.spec, "shape": list(embeds.shape), "path": str(path),
               "seconds": round(seconds, 3)}
    if json_out:
        emit_json(summary, schema="clipterm.texts.build/2")
    else:
        stdout.print(f"{len(text_pool):,} texts of {text_pool.name} embedded with {loaded.info.spec} "
                     f"({embeds.shape[1]} dims, {seconds:.1f}s): {path}")


def register(app: typer.Typer) -> None:
    app.add_typer(texts_app, name="texts")
