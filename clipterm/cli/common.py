"""Options and argument types shared by every command, so each means the same thing everywhere."""

from __future__ import annotations

import math
from enum import Enum
from typing import Any, Callable

import typer

from clipterm.cli.output import JSON_HELP, progress, stderr
from clipterm.errors import ClipTermError

JsonOpt = typer.Option(False, "--json", help=JSON_HELP)
JsonLinesOpt = typer.Option(False, "--json", help=JSON_HELP + " One event per line, as it happens.")
CacheDirOpt = typer.Option(None, "--cache-dir", help="Cache root to use instead of the default rule (`clipterm locate cache`).")
PretrainedOpt = typer.Option(None, "--pretrained", help="Pretrained tag or weights file (open_clip archs).")
QuickGeluOpt = typer.Option(None, "--quick-gelu/--no-quick-gelu", "--force-quick-gelu",
                            help="The activation a --pretrained weights file was trained with, where neither the file "
                                 "nor an open_clip_config.json beside it says (OpenAI's weights: QuickGELU; LAION's: GELU).")
CacheArg = typer.Argument(..., help="A cache name under the cache root, or a path to a cache folder.")


def _refuse_non_finite(callback: Callable[..., Any] | None) -> Callable[..., Any]:
    def check(ctx: Any, param: Any, value: Any) -> Any:
        for number in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(number, float) and not math.isfinite(number):
                raise typer.BadParameter(f"{number} is not a finite number", ctx=ctx, param=param)
        return callback(ctx, param, value) if callback is not None else value

    return check


def finite_floats(command: Any) -> Any:
    """Make every option and argument of `command` and its sub-commands refuse nan and ±inf (`--lambda nan`)."""
    for param in command.params:
        if not getattr(param, "_finite", False):
            param.callback, param._finite = _refuse_non_finite(param.callback), True  # type: ignore[attr-defined]
    for sub in getattr(command, "commands", {}).values():
        finite_floats(sub)
    return command


def clean_interrupts(command: Any, path: str = "clipterm") -> Any:
    """Make Ctrl-C in any command of `command` one line and exit code 130, instead of typer's silent exit or a
    prompt's "Aborted!". Commands that know more (a build: what it kept) raise their own ClipTermError first."""
    if getattr(command, "callback", None) is not None and not getattr(command, "_interrupts", False):
        command.callback, command._interrupts = _interruptible(command.callback, path), True  # type: ignore[attr-defined]
    for name, sub in getattr(command, "commands", {}).items():
        clean_interrupts(sub, f"{path} {name}")
    return command


def _interruptible(callback: Callable[..., Any], path: str) -> Callable[..., Any]:
    import functools

    from clipterm.errors import ExitCode

    again = f"rerun the same `{path}` command to start it again"

    @functools.wraps(callback)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return callback(*args, **kwargs)
        except typer.Abort as exc:  # Ctrl-C at a prompt: nothing was done yet
            if not isinstance(exc.__context__, KeyboardInterrupt):
                raise
            raise ClipTermError("interrupted at the prompt, before anything was changed", hint=again,
                                code=ExitCode.INTERRUPTED) from None
        except KeyboardInterrupt:
            raise ClipTermError("interrupted: nothing was lost (clipterm writes each file whole: a temporary file, "
                                "then a rename)", hint=again, code=ExitCode.INTERRUPTED) from None

    return run


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


DeviceOpt = typer.Option(Device.auto, "--device", help="auto picks CUDA when torch sees it (this rank's GPU under torchrun).")


def open_reader(cache: str, cache_dir: str | None) -> Any:
    """The cache a command names (first positional argument), as a reader."""
    from clipterm.cache.reader import open_cache

    return open_cache(cache, cache_dir)


def load_model_and_cache(model: str | None, pretrained: str | None, cache: str | None, cache_dir: str | None,
                         device: str, quick_gelu: bool | None = None) -> tuple[Any, Any]:
    """`--model` (the cache's by default, else toy) and the `--cache` reader when one is given, checked to match."""
    from clipterm.vit.models import load_model, pick_device

    device = pick_device(device)
    if cache is None:
        return load_model(model or "toy", pretrained, device=device, quick_gelu=quick_gelu), None
    from clipterm.cache.reader import model_for_cache

    reader = open_reader(cache, cache_dir)
    return model_for_cache(reader, device, model, pretrained, quick_gelu), reader


def default_pool_for(reader: Any, pool: str | None) -> str:
    """The text pool a command uses when `--pool` is not given: `toy` for the toy model, else `general`."""
    return pool or ("toy" if reader.manifest["model"].get("spec") == "toy" else "general")


def layer_of(spec: str, reader: Any, option: str = "--layer") -> int:
    """The layer number of a `--layer L9` (or `--layer 9`) option, checked: it must exist and must not be the last."""
    from clipterm import names
    from clipterm.cache.neurons import check_neuron_layer

    component = names.parse(names.layer(int(spec.strip())) if spec.strip().isdigit() else spec)
    if component.kind != "layer":
        raise ClipTermError(f"{option} takes a layer, not {spec!r}",
                            hint=f"e.g. {option} {names.layer(max(reader.shape.layers - 2, 0))}")
    check_neuron_layer(reader.shape, component.layer)
    return component.layer


def load_pool_reporting(spec: str) -> Any:
    """Load a text pool and say on stderr what was dropped."""
    from clipterm.inputs.texts import load_pool

    pool = load_pool(spec)
    if pool.dropped_blank or pool.dropped_duplicates:
        stderr.print(f"[dim]pool {pool.name}: dropped {pool.dropped_blank} blank and {pool.dropped_duplicates} duplicate lines[/]")
    return pool


def embed_reporting(loaded: Any, pool: Any, cache_dir: str | None = None, refresh: bool = False) -> Any:
    """Embeddings of a pool under a model (cached), with a progress bar and a warning for over-long texts."""
    from clipterm.inputs.texts import embed_pool

    too_long = pool.too_long(loaded.tokenizer, loaded.info.context_length)
    if too_long:
        stderr.print(f"[yellow]warning:[/] {len(too_long)} text(s) longer than the context ({loaded.info.context_length} "
                     f"tokens) will be truncated, e.g. text {too_long[0] + 1}: {pool.texts[too_long[0]][:60]!r}")
    with progress(f"embedding {pool.name}", total=len(pool), unit="texts") as advance:
        return embed_pool(loaded, pool, cache_dir=cache_dir, on_batch=advance, refresh=refresh)


def accuracy_table(acc: dict[str, float], title: str):
    from rich.table import Table

    from clipterm.toyworld.world import TASKS

    table = Table("task", "classes", "accuracy", "chance", title=title)
    for task, value in acc.items():
        table.add_row(task, str(len(TASKS[task])), f"{value:.3f}", f"{1 / len(TASKS[task]):.3f}")
    return table


# A command that has printed everything may ask to skip the interpreter's teardown: after a torch import, unloading
# its modules and libraries takes over a second and grows the peak memory by about 100 MB, for nothing.
_fast_exit: list[bool] = []


def request_fast_exit() -> None:
    """Once the command has succeeded and printed everything: let `clipterm.cli.app.main`, when it is the process's
    entry point, end the process right after the atexit handlers (output flushed) instead of tearing it down."""
    _fast_exit.append(True)


def fast_exit_requested() -> bool:
    return bool(_fast_exit)


# The TUI registers its launcher when the app is assembled (clipterm.tui.command), so that no CLI module imports it.
_tui_launcher: list[Callable[..., None]] = []


def set_tui_launcher(launch: Callable[..., None]) -> None:
    _tui_launcher[:] = [launch]


def open_tui(cache: str, **options: Any) -> None:
    """Run the TUI on a cache (`clipterm tui`, `clipterm demo`)."""
    if not _tui_launcher:
        raise ClipTermError("the TUI is not available in this build of clipterm", hint="reinstall clipterm with its tui package")
    _tui_launcher[0](cache, **options)


# --------------------------------------------------------------------------- bounds on the size-like options
# Upper bounds on the size-like options, tied to the memory a value costs: a value over its bound is refused in
# one line that names the bound, before anything is loaded or allocated (`--draws 10^12` would otherwise ask numpy
# for 22 TB). docs/reliability.md ("Every input bounded") gives the reasoning behind each number.
#
# `BOUNDS` maps (command, option) to (bound, what the bound protects); `UNBOUNDED` lists every other integer option
# with why it needs none (a seed, a count of steps that costs time, not memory, a slice of rows already in memory,
# or one checked against the model or the cache where it is used). tests/test_reliability3.py checks that every
# integer option of the CLI is in one of the two.
BOUNDS: dict[tuple[str, str], tuple[int, str]] = {
    ("visualise", "--size"): (4096, "the image, its gradient and Adam's two moments hold 48 bytes a pixel: 800 MB at 4096"),
    ("visualise", "--diverse"): (64, "each image is a forward and backward pass of the model, all in memory at once"),
    ("ablate", "--draws"): (1_000_000, "each bootstrap draw holds 32 bytes per task: 32 MB at a million"),
    ("textspan", "--texts"): (4096, "texts per component, each a projection of the whole pool"),
    ("textspan", "--rank"): (4096, "the subspace's basis is rank x embedding width per component"),
    ("textspan", "--baseline-draws"): (1000, "each draw projects the component on as many random pool texts"),
    ("search", "--beam"): (64, "the beam's candidates, beam x (top tokens x positions + random), are encoded each step"),
    ("search", "--top-tokens"): (256, "tokens scored exactly per position and beam string, each a text-model pass"),
    ("search", "--random"): (256, "random moves per beam string and step, each a text-model pass"),
    ("images", "--top"): (1000, "each image is decoded and held as a thumbnail"),
    ("images", "--size"): (512, "thumbnail side in pixels: 512 is 256 terminal rows, 0.8 MB an image"),
    ("spatial", "--nmf"): (256, "factors of the tokens' activations: K x (tokens + width) floats per step"),
    ("spatial", "--size"): (512, "thumbnail side in pixels: 512 is 256 terminal rows"),
    ("demo", "--n"): (200_000, "held-out scenes are drawn and held together, 12 kB each: 2.4 GB at 200,000, as toy eval"),
    ("demo", "--scenes"): (1_000_000, "scenes in the demo cache: its shards hold every row on disk"),
    ("toy render", "--n"): (1_000_000, "images written, each a PNG on disk"),
    ("toy train", "--batch-size"): (4096, "images per step, each a forward and backward pass held at once"),
    ("toy train", "--workers"): (64, "each worker is a process with its own copy of the world"),
    ("cache build", "--batch-size"): (4096, "images per forward pass, every component's output held at once"),
    ("cache build", "--workers"): (64, "each worker is a process decoding images ahead"),
    ("cache build", "--shard-rows"): (16_384, "a shard is held in memory until written: 2.4 GB at 16,384 rows of ViT-B"),
    ("neurons build", "--top-images"): (10_000, "the top images of every neuron are held: neurons x top x 8 bytes"),
    ("neurons build", "--batch-size"): (4096, "images per forward pass, every neuron's second-order effect held at once"),
    ("neurons build", "--workers"): (64, "each worker is a process decoding images ahead"),
    ("neurons list", "--k"): (1024, "texts per sparse decomposition: k x pool similarities per neuron"),
    ("sae train", "--features"): (262_144, "the encoder and decoder are 2 x width x features floats, with Adam's moments"),
    ("sae train", "--batch-size"): (65_536, "activations per step, each encoded into every feature at once"),
    ("unit", "--size"): (4096, "each feature visualisation, its gradient and Adam's moments: 48 bytes a pixel"),
    ("unit", "--top"): (1000, "each top image is decoded and held as a thumbnail in the page"),
    ("sae train", "--k"): (4096, "active features kept per activation (checked below --features too)"),
}

UNBOUNDED: dict[tuple[str, str], str] = {
    ("textspan", "--evaluate"): "a number of layers, checked against the model",
    ("ablate", "--top"): "rows printed, a slice of rows already computed",
    ("attribute", "--top"): "rows printed, a slice of rows already computed",
    ("search", "--steps"): "time, not memory",
    ("search", "--patience"): "time, not memory",
    ("search", "--seed"): "a seed",
    ("search", "--max-tokens"): "checked against the model's context length",
    ("visualise", "--steps"): "time, not memory (a float a step)",
    ("visualise", "--seed"): "a seed",
    ("demo", "--seed"): "a seed",
    ("tui", "--port"): "a port, 1..65535",
    ("toy render", "--seed"): "a seed",
    ("toy render", "--world"): "checked: 1 or 2",
    ("toy train", "--world"): "checked: 1 or 2",
    ("toy train", "--steps"): "time, not memory",
    ("toy train", "--seed"): "a seed",
    ("toy train", "--threads"): "torch's thread count",
    ("toy train", "--eval-every"): "time, not memory",
    ("toy train", "--warmup"): "steps of warmup, not memory",
    ("toy eval", "--n"): "bounded by toy eval itself (EVAL_MAX: 200,000 scenes of 12 kB)",
    ("toy eval", "--seed"): "a seed",
    ("toy eval", "--world"): "checked: 1 or 2",
    ("texts show", "--limit"): "texts printed, a slice of the pool already loaded",
    ("neurons list", "--top"): "rows printed, a slice of neurons already ranked",
    ("neurons list", "--texts"): "texts printed per neuron, a slice of the k chosen",
    ("sae train", "--steps"): "time, not memory",
    ("unit", "--steps"): "time, not memory",
    ("unit", "--search-steps"): "time, not memory",
    ("unit", "--seed"): "a seed",
    ("sae train", "--seed"): "a seed",
    ("sae list", "--top"): "rows printed, a slice of features already ranked",
    ("sae list", "--texts"): "texts printed per feature, a slice of the pool's ranking",
}


def _refuse_over(bound: int, why: str, callback: Callable[..., Any] | None) -> Callable[..., Any]:
    def check(ctx: Any, param: Any, value: Any) -> Any:
        if isinstance(value, int) and value > bound:
            option = param.opts[0]
            raise ClipTermError(f"{option} {value:,} is too large: at most {bound:,} ({why})",
                                hint=f"use {option} {bound} or less")
        return callback(ctx, param, value) if callback is not None else value

    return check


def bounded_sizes(command: Any, path: str = "") -> Any:
    """Make every option in BOUNDS, in `command` and its sub-commands, refuse a value over its bound."""
    for param in command.params:
        bound = BOUNDS.get((path, param.opts[0]))
        if bound is not None and not getattr(param, "_bounded", False):
            param.callback, param._bounded = _refuse_over(*bound, param.callback), True  # type: ignore[attr-defined]
    for name, sub in getattr(command, "commands", {}).items():
        bounded_sizes(sub, f"{path} {name}".strip())
    return command
