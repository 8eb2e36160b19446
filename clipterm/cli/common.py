"""Options and argument types shared by every command, so each means the same thing everywhere."""

from __future__ import annotations

from enum import Enum

import typer

from clipterm.cli.output import JSON_HELP

JsonOpt = typer.Option(False, "--json", help=JSON_HELP)
CacheDirOpt = typer.Option(None, "--cache-dir", help="Cache root to use instead of the default rule (`clipterm locate cache`).")
PretrainedOpt = typer.Option(None, "--pretrained", help="Pretrained tag or weights file (open_clip archs).")
CacheArg = typer.Argument(..., help="A cache name under the cache root, or a path to a cache folder.")


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"
