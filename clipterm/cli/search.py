"""`clipterm search`: hill-climb the text strings a head, neuron, text, image or class likes best, live."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Any, Iterator

import typer

from clipterm.cli.common import CacheDirOpt, Device, DeviceOpt, JsonLinesOpt, PretrainedOpt, QuickGeluOpt
from clipterm.cli.common import load_model_and_cache as _load
from clipterm.cli.output import emit_json_line, stderr, stdout

SCHEMA = "clipterm.search/1"
DEFAULT_LM_WEIGHT = 0.06  # lm.DEFAULT_WEIGHT, repeated so that `--help` does not import torch


def search(
    target: str = typer.Option(..., "--target", "-t", help="What to search towards: L5.H2, L5.H2:pc2, L9.N123, "
                               "'text:a red circle', image:PATH, class:NAME, or differences like 'text:red - text:blue'."),
    model: str = typer.Option(None, "--model", help="`toy`, an open_clip arch, or a local-dir model folder "
                              "(default: the cache's model, else toy)."),
    pretrained: str = PretrainedOpt,
    quick_gelu: bool = QuickGeluOpt,
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
    lam: float = typer.Option(None, "--lambda", help="Weight of the word-frequency prior (0: off; default 0.0025, "
                              "and 0 with an --lm, whose own unigram already counts word frequency)."),
    max_tokens: int = typer.Option(12, "--max-tokens", help="Longest string, in tokens."),
    vocab: str = typer.Option(None, "--vocab", help="UTF-8 file of words to build strings from (default: every "
                              "whole-word token of the BPE vocabulary)."),
    lm: str = typer.Option("ngram", "--lm", help="Language model that proposes words and penalises unlikely strings: "
                           "ngram (a Kneser-Ney trigram of the toy captions, or of the general pool), none, or a Hugging "
                           "Face causal LM by name (local cache only) or folder (needs clipterm[lm])."),
    lm_weight: float = typer.Option(DEFAULT_LM_WEIGHT, "--lm-weight", help="Weight of the language model's NLL per "
                                    "word, in nats (0: its proposals only)."),
    lm_corpus: str = typer.Option(None, "--lm-corpus", help="UTF-8 text file to train the ngram model on instead."),
    device: Device = DeviceOpt,
    json_out: bool = JsonLinesOpt,
) -> None:
    """Find the strings whose text embedding points along a target (OpenAI's "Multimodal Neurons" search).

    Adds, deletes or replaces one word at a time, guided by the gradient and a language model, and keeps a
    beam of the best strings by cos(text, target) - lm_weight * NLL per word - lambda * prior. Ctrl-C stops
    after the current step and prints the best found so far. JSON: one event per line, schema clipterm.search/1.
    """
    from clipterm.analyses import targets
    from clipterm.analyses.lm import load_lm
    from clipterm.analyses.search import SearchConfig, search_model

    config = SearchConfig(beam=beam, topk=topk, random=random_moves, steps=steps, patience=patience or None,
                          time_limit=time_limit, lam=lam, max_tokens=max_tokens, seed=seed,
                          lm_weight=lm_weight)
    config.check()
    targets.require_cache(targets.parse(target), cache is not None)
    loaded, reader = _load(model, pretrained, cache, cache_dir, device.value, quick_gelu)
    words = _vocabulary(loaded, vocab)
    direction = targets.resolve(target, loaded, reader).direction
    language = load_lm(lm, words, loaded.info.spec, lm_corpus, cache_dir, next(loaded.model.parameters()).device)
    cancelled = threading.Event()
    events = search_model(loaded, direction, words, config, cancel=cancelled.is_set, lm=language)
    with _stop_on_ctrl_c(cancelled):
        if json_out:
            last = _json(events, config.lm_weight)
        elif stdout.is_terminal:
            last = _live(events, target, config.lm_weight)
        else:
            last = _plain(events)
    if last is not None and last.reason == "cancelled":
        raise typer.Exit(130)


def _vocabulary(loaded: Any, path: str | None) -> Any:
    from clipterm.inputs.vocab import default_vocabulary, file_vocabulary

    if path is None:
        return default_vocabulary(loaded.tokenizer, loaded.text_tokens)
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


def _event_json(event: Any, lm_weight: float) -> dict[str, Any]:
    """One event; each string's score is its cosine - lm_weight * lm_penalty - lambda * prior (in the readability
    phase, the read weight and a shortfall below the cosine floor)."""
    return {
        "schema": SCHEMA, "step": event.step,
        "best": [{"text": h.text, "score": round(h.score, 6), "cosine": round(h.cosine, 6),
                  "lm_nll": None if h.lm_nll is None else round(h.lm_nll, 6),
                  "lm_penalty": None if h.lm_penalty is None else round(h.lm_penalty, 6)} for h in event.best],
        "evals": event.evals, "evals_per_s": round(event.evals_per_s, 1), "elapsed": round(event.elapsed, 3),
        "done": event.done, "reason": event.reason, "lm": event.lm, "lm_weight": lm_weight if event.lm else None,
    }


def _json(events: Iterator[Any], lm_weight: float) -> Any:
    last = None
    for last in events:
        emit_json_line(_event_json(last, lm_weight))
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


def _table(event: Any, target: str, lm_weight: float) -> Any:
    from rich.table import Table

    status = f"stopped: {event.reason}" if event.done else "searching (Ctrl-C stops)"
    guide = f"lm {event.lm} (weight {lm_weight:g})" if event.lm else "no lm"
    table = Table("#", "score", "cosine", "lm nll", "lm excess", "text", title=f"search: {target}",
                  caption=f"step {event.step} · {event.evals:,} evals · {event.evals_per_s:,.0f}/s · "
                          f"{event.elapsed:.1f} s · {guide} · {status}")
    for rank, hit in enumerate(event.best, 1):
        nll = "" if hit.lm_nll is None else f"{hit.lm_nll:.2f}"
        excess = "" if hit.lm_penalty is None else f"{hit.lm_penalty:.2f}"
        table.add_row(str(rank), f"{hit.score:.4f}", f"{hit.cosine:.4f}", nll, excess, hit.text or "[dim](empty)[/]")
    return table


def _live(events: Iterator[Any], target: str, lm_weight: float) -> Any:
    from rich.live import Live

    last = None
    with Live(console=stdout, auto_refresh=False, transient=False) as live:
        for last in events:
            live.update(_table(last, target, lm_weight), refresh=True)
    return last


def register(app: typer.Typer) -> None:
    app.command()(search)
