"""`clipterm search`: hill-climb the text strings a head, neuron, text, image or class likes best, live."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Any, Iterator

import typer

from clipterm.cli.common import CacheDirOpt, Device, DeviceOpt, JsonLinesOpt, PretrainedOpt
from clipterm.cli.output import emit_json_line, stderr, stdout

SCHEMA = "clipterm.search/1"


def search(
    target: str = typer.Option(..., "--target", "-t", help="What to search towards: L5.H2, L5.H2:pc2, L9.N123, "
                               "'text:a red circle', image:PATH, class:NAME, or differences like 'text:red - text:blue'."),
    model: str = typer.Option(None, "--model", help="`toy`, an open_clip arch, or a local-dir model folder "
                              "(default: the cache's model, else toy)."),
    pretrained: str = PretrainedOpt,
    cache: str = typer.Option(None, "--cache", help="Cache (path or name) for head and neuron targets and its classes."),
    cache_dir: str = CacheDirOpt,
    beam: int = typer.Option(5, "--beam", help="Strings kept from step to step."),
    topk: int = typer.Option(16, "--top-tokens", "--topk", help="Tokens scored exactly per position, ranked by the gradient."),
    random_moves: int = typer.Option(8, "--random", help="Random moves per beam string and step."),
    steps: int = typer.Option(100, "--steps", help="Stop after this many steps."),
    patience: int = typer.Option(10, "--patience", help="Stop when the best score has not improved for this many steps "
                                 "(0: never)."),
    time_limit: float = typer.Option(None, "--time", help="Stop after this many seconds."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random moves: the same seed repeats the same run."),
    lam: float = typer.Option(0.0025, "--lambda", help="Weight of the word-frequency prior (0: off)."),
    max_tokens: int = typer.Option(12, "--max-tokens", help="Longest string, in tokens."),
    vocab: str = typer.Option(None, "--vocab", help="UTF-8 file of words to build strings from (default: every "
                              "whole-word token of the BPE vocabulary)."),
    device: Device = DeviceOpt,
    json_out: bool = JsonLinesOpt,
) -> None:
    """Find the strings whose text embedding points along a target (OpenAI's "Multimodal Neurons" search).

    Adds, deletes or replaces one word at a time, guided by the gradient, and keeps a beam of the best
    strings by cos(text, target) - lambda * prior. Ctrl-C stops after the current step and prints the
    best found so far. JSON: one event per line, schema clipterm.search/1.
    """
    from clipterm.analyses import targets
    from clipterm.analyses.search import SearchConfig, search_model

    config = SearchConfig(beam=beam, topk=topk, random=random_moves, steps=steps, patience=patience or None,
                          time_limit=time_limit, lam=lam, max_tokens=max_tokens, seed=seed)
    config.check()
    targets.require_cache(targets.parse(target), cache is not None)
    loaded, reader = _load(model, pretrained, cache, cache_dir, device.value)
    words = _vocabulary(loaded, vocab)
    direction = targets.resolve(target, loaded, reader).direction
    cancelled = threading.Event()
    events = search_model(loaded, direction, words, config, cancel=cancelled.is_set)
    with _stop_on_ctrl_c(cancelled):
        if json_out:
            last = _json(events)
        elif stdout.is_terminal:
            last = _live(events, target)
        else:
            last = _plain(events)
    if last is not None and last.reason == "cancelled":
        raise typer.Exit(130)


def _load(model: str | None, pretrained: str | None, cache: str | None, cache_dir: str | None, device: str
          ) -> tuple[Any, Any]:
    """The model (the cache's by default), and the cache reader when one is given, checked to match."""
    from clipterm.vit.models import load_model, pick_device

    device = pick_device(device)
    if cache is None:
        return load_model(model or "toy", pretrained, device=device), None
    from clipterm.cache.reader import model_for_cache, open_cache

    reader = open_cache(cache, cache_dir)
    return model_for_cache(reader, device, model, pretrained), reader


def _vocabulary(loaded: Any, path: str | None) -> Any:
    from clipterm.inputs.vocab import default_vocabulary, file_vocabulary

    if path is None:
        return default_vocabulary(loaded.tokenizer)
    words = file_vocabulary(loaded.tokenizer, path)
    if words.dropped:
        shown = ", ".join(words.dropped[:5]) + (", ..." if len(words.dropped) > 5 else "")
        stderr.print(f"[yellow]warning:[/] {len(words.dropped)} words of {path} are not one BPE token and are left out: "
                     f"{shown}", highlight=False)
    return words


@contextmanager
def _stop_on_ctrl_c(cancelled: threading.Event) -> Iterator[None]:
    """The first Ctrl-C asks the search to stop after its current step; a second one interrupts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)

    def stop(signum, frame) -> None:
        cancelled.set()
        signal.signal(signal.SIGINT, previous)
        stderr.print("[dim]stopping after this step (Ctrl-C again to abort)[/]")

    signal.signal(signal.SIGINT, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _event_json(event: Any) -> dict[str, Any]:
    return {
        "schema": SCHEMA, "step": event.step,
        "best": [{"text": h.text, "score": round(h.score, 6), "cosine": round(h.cosine, 6)} for h in event.best],
        "evals": event.evals, "evals_per_s": round(event.evals_per_s, 1), "elapsed": round(event.elapsed, 3),
        "done": event.done, "reason": event.reason,
    }


def _json(events: Iterator[Any]) -> Any:
    last = None
    for last in events:
        emit_json_line(_event_json(last))
    return last


def _plain(events: Iterator[Any]) -> Any:
    """One line per step, then the final beam, one string per line: score, cosine, text (tab-separated)."""
    last = None
    for last in events:
        if last.done:
            break
        top = last.best[0]
        print(f"step {last.step}\t{last.evals} evals\t{last.evals_per_s:.0f}/s\t{last.elapsed:.1f}s\t"
              f"{top.score:.4f}\t{top.text}", flush=True)
    if last is not None:
        print(f"# stopped: {last.reason}")
        for hit in last.best:
            print(f"{hit.score:.4f}\t{hit.cosine:.4f}\t{hit.text}", flush=True)
    return last


def _table(event: Any, target: str) -> Any:
    from rich.table import Table

    status = f"stopped: {event.reason}" if event.done else "searching (Ctrl-C stops)"
    table = Table("#", "score", "cosine", "text", title=f"search: {target}",
                  caption=f"step {event.step} · {event.evals:,} evals · {event.evals_per_s:,.0f}/s · "
                          f"{event.elapsed:.1f} s · {status}")
    for rank, hit in enumerate(event.best, 1):
        table.add_row(str(rank), f"{hit.score:.4f}", f"{hit.cosine:.4f}", hit.text or "[dim](empty)[/]")
    return table


def _live(events: Iterator[Any], target: str) -> Any:
    from rich.live import Live

    last = None
    with Live(console=stdout, auto_refresh=False, transient=False) as live:
        for last in events:
            live.update(_table(last, target), refresh=True)
    return last


def register(app: typer.Typer) -> None:
    app.command()(search)
