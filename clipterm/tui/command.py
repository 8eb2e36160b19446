"""`clipterm tui CACHE`: open the interactive browser (registered with the CLI when the app is assembled). Everything that can fail for the user fails here, before it starts."""

from __future__ import annotations

import os
import sys
from enum import Enum
from typing import Any

import typer

from clipterm.cli.common import CacheArg, CacheDirOpt, PretrainedOpt, set_tui_launcher


class ImageMode(str, Enum):
    auto = "auto"
    half = "half"
    off = "off"


def tui(
    cache: str = CacheArg,
    model: str = typer.Option(None, "--model", help="Model to analyse with (default: the one the cache was built "
                              "with). Must be the same weights; `toy`, an open_clip arch, or a local-dir: folder."),
    pretrained: str = PretrainedOpt,
    pool: str = typer.Option(None, "--pool", help="`toy`, `general`, or a UTF-8 file (default: toy for the toy model, else general)."),
    theme: str = typer.Option(None, "--theme", help="A theme from the bundled themes/ or your theme dir, e.g. clipterm-dark."),
    images: ImageMode = typer.Option(ImageMode.auto, "--images", help="auto: the terminal's best image protocol "
                                     "(kitty, sixel; half blocks under tmux or when unsure); half: coloured half "
                                     "blocks; off: no thumbnails."),
    cache_dir: str = CacheDirOpt,
    serve: bool = typer.Option(False, "--serve", help="Serve the TUI to a browser tab (textual-serve) instead of this "
                               "terminal; images are drawn as half blocks there."),
    port: int = typer.Option(8000, "--port", min=1, max=65535, help="With --serve: the port to listen on."),
    host: str = typer.Option("127.0.0.1", "--host", help="With --serve: the address to listen on (default loopback "
                             "only; another address shows the cache to the network)."),
) -> None:
    """Browse a cache with the keyboard: the model tree (layer, head, MLP, neuron; a ResNet's pool heads and
    channels; a ConvNeXt's last-stage blocks) and panes for TextSpan texts,
    ablation, live text search, top images and info. Press ? for keys, ctrl+p to jump anywhere."""
    if serve:
        serve_tui(cache, host, port, cache_dir=cache_dir, model=model, pretrained=pretrained, pool=pool, theme=theme)
        return
    open_tui(cache, cache_dir=cache_dir, model=model, pretrained=pretrained, pool=pool, theme=theme, images=images.value)


def serve_tui(cache: str, host: str, port: int, cache_dir: str | None = None, model: str | None = None,
              pretrained: str | None = None, pool: str | None = None, theme: str | None = None) -> None:
    """Check the arguments here, then let textual-serve start `clipterm tui CACHE --images half` for each browser tab."""
    import shlex

    from clipterm.cache.reader import open_cache
    from clipterm.errors import ClipTermError, ExitCode
    from clipterm.inputs.texts import BUILTIN_POOLS, load_pool

    reader = open_cache(cache, cache_dir)
    check_browsable(reader)
    if pool is not None and pool not in BUILTIN_POOLS:
        load_pool(pool)
    if theme is not None:
        from clipterm.tui.themes import load_theme

        load_theme(theme)
    try:
        from textual_serve.server import Server
    except ImportError:
        raise ClipTermError("--serve needs the textual-serve package", hint="pip install 'clipterm[serve]'",
                            code=ExitCode.USAGE) from None
    argv = [sys.executable, "-m", "clipterm", "tui", str(reader.path.resolve()), "--images", "half"]
    for flag, value in (("--model", model), ("--pretrained", pretrained), ("--pool", pool), ("--theme", theme)):
        if value is not None:
            argv += [flag, value]
    print(f"serving clipterm tui {reader.name} on http://{host}:{port} (ctrl+c stops it)", file=sys.stderr)
    Server(shlex.join(argv), host=host, port=port, title=f"clipterm {reader.name}").serve()


BROWSABLE = ("vit", "resnet", "convnext")  # the towers whose components the tree knows how to lay out


def check_browsable(reader: Any) -> None:
    """Refuse, in one line, a cache whose tower the TUI's tree cannot show."""
    if reader.shape.tower not in BROWSABLE:
        from clipterm.errors import ClipTermError, ExitCode

        raise ClipTermError(f"the TUI does not show {reader.shape.tower} caches ({reader.name}): its tree lays out "
                            f"{', '.join(BROWSABLE)} towers only",
                            hint="use the CLI on it: textspan, ablate, attribute, images, search", code=ExitCode.UNSUPPORTED)


def open_tui(cache: str, cache_dir: str | None = None, model: str | None = None, pretrained: str | None = None,
             pool: str | None = None, theme: str | None = None, images: str = "auto", loaded: Any = None) -> None:
    """Check everything a user can get wrong, then run the app (also used by `clipterm demo`)."""
    from clipterm.cache.reader import open_cache
    from clipterm.inputs.texts import BUILTIN_POOLS, load_pool
    from clipterm.tui.config import load_keymap

    reader = open_cache(cache, cache_dir)
    check_browsable(reader)
    if pool is not None and pool not in BUILTIN_POOLS:
        load_pool(pool)  # a missing or empty pool file fails now, not in a worker
    chosen = None
    if theme is not None:
        from clipterm.tui.themes import load_theme

        chosen = load_theme(theme)
    from clipterm.tui.app import ClipTermApp

    keymap = load_keymap({b.id for b in ClipTermApp.BINDINGS if b.id})
    app = ClipTermApp(reader, pool=pool, cache_dir=cache_dir, theme=chosen, images=resolve_images(images),
                      keymap=keymap, loaded=loaded or _load_checked(reader, model, pretrained))
    app.run()


def resolve_images(mode: str) -> str:
    """`auto` keeps textual-image's detection only where it can work: a real terminal, not tmux."""
    if mode != "auto":
        return mode
    if os.environ.get("TMUX") or not sys.stdout.isatty():
        return "half"
    import logging

    # textual-image logs a traceback when a terminal doesn't answer its size query; it then assumes a size
    logging.getLogger("textual_image").setLevel(logging.CRITICAL)
    import textual_image.widget  # noqa: F401  (queries the terminal now: it can't once the app runs)

    return "auto"


def _load_checked(reader: Any, model: str | None, pretrained: str | None) -> Any:
    """The --model, loaded now so that wrong or missing weights fail before the app starts (None: load lazily)."""
    if model is None:
        return None
    from clipterm.cache.reader import model_for_cache

    return model_for_cache(reader, "cpu", model, pretrained)


def register(app: typer.Typer) -> None:
    set_tui_launcher(open_tui)
    app.command()(tui)
