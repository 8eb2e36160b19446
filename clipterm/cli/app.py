"""The `clipterm` command. Thin: parse arguments, call the core, render.

Torch is imported lazily inside commands, so `clipterm --help` stays fast.
"""

from __future__ import annotations

import atexit
import importlib
import os
import sys

import typer

from clipterm.errors import ClipTermError, ExitCode

app = typer.Typer(
    name="clipterm",
    help="Explain what CLIP's vision transformer does: layer by layer, head by head, neuron by neuron.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Each module has `register(app)`, which adds its commands or its sub-group. None imports torch at import time.
_COMMAND_MODULES = ["clipterm.cli.basics", "clipterm.cli.toy", "clipterm.cli.cache", "clipterm.cli.texts", "clipterm.cli.analyse",
                    "clipterm.cli.search", "clipterm.cli.neurons", "clipterm.cli.spatial", "clipterm.cli.visualise",
                    "clipterm.cli.demo", "clipterm.cli.sae", "clipterm.cli.unit", "clipterm.tui.command"]


def _register() -> None:
    for module in _COMMAND_MODULES:
        importlib.import_module(module).register(app)


_register()


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app, turning ClipTermError into one line plus a hint and an exit code."""
    from clipterm.cli.common import bounded_sizes, clean_interrupts, finite_floats
    from clipterm.cli.output import error

    debug = os.environ.get("CLIPTERM_DEBUG", "") not in ("", "0")
    if argv is None:  # the process's own entry point (not a caller in-process): registered before any torch import,
        atexit.register(_end_fast)  # so it runs after torch's own atexit handlers
    try:
        clean_interrupts(bounded_sizes(finite_floats(typer.main.get_command(app))))(args=argv, prog_name="clipterm")
    except ClipTermError as exc:
        if debug:
            raise
        error(exc.message, exc.hint)
        sys.exit(int(exc.code))
    except KeyboardInterrupt:
        error("interrupted")
        sys.exit(int(ExitCode.INTERRUPTED))
    except Exception as exc:  # a bug: still one line, unless debugging
        if debug:
            raise
        error(f"unexpected {type(exc).__name__}: {exc}", hint="rerun with CLIPTERM_DEBUG=1 for the traceback, and please report it")
        sys.exit(int(ExitCode.ERROR))


def _end_fast() -> None:
    """The last atexit handler: when the command asked for it, flush and end the process without the teardown."""
    from clipterm.cli.common import fast_exit_requested

    if fast_exit_requested():  # set only once the command has succeeded, so the status is 0
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(0)
