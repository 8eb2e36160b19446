"""`clipterm tui CACHE`: open the interactive browser. Everything that can fail for the user fails here, before it starts."""

from __future__ import annotations

import typer

from clipterm.cli.common import CacheArg, CacheDirOpt


def tui(
    cache: str = CacheArg,
    pool: str = typer.Option(None, "--pool", help="`toy`, `general`, or a UTF-8 file (default: toy for the toy model, else general)."),
    theme: str = typer.Option(None, "--theme", help="A theme from the bundled themes/ or your theme dir, e.g. clipterm-dark."),
    cache_dir: str = CacheDirOpt,
) -> None:
    """Browse a cache with the keyboard: the model tree, TextSpan descriptions, ablation and info panes (? for keys)."""
    from clipterm.reader import open_cache

    reader = open_cache(cache, cache_dir)
    from clipterm.texts import BUILTIN_POOLS, load_pool

    if pool is not None and pool not in BUILTIN_POOLS:
        load_pool(pool)  # a missing or empty pool file fails now, not in a worker
    chosen = None
    if theme is not None:
        from clipterm.tui.themes import load_theme

        chosen = load_theme(theme)
    from clipterm.tui.app import ClipTermApp

    ClipTermApp(reader, pool=pool, cache_dir=cache_dir, theme=chosen).run()


def register(app: typer.Typer) -> None:
    app.command()(tui)
