"""Hill-climb text search against naive scoring, on the ViT-B-32 text tower (random weights) and on the toy.

For each model the search runs from the empty string towards a text target with the default settings
(HotFlip-ranked candidates, scored in batches by length, each cut right after its end-of-text token),
and its candidate evaluations per second are taken from its own events, gradient steps and all.
Naive scoring is OpenAI's description done plainly: each candidate string tokenised to the full
context (77 tokens for ViT-B-32) and put through `encode_text` one at a time. Goal: >= 3x.
On the toy, the time from "model loaded" to the first event (vocabulary, target and the scored
empty string included) and to the first search step. Goal: < 1 s. And on the toy, --lm-steps steps
guided by the n-gram language model (its default weight) against as many unguided: steps per second
(goal: guided >= 0.5x unguided), and the steps each takes to reach 95% of its own final best score.

    python -m bench.speed.search [--threads 1] [--seconds 20] [--naive 30] [--lm-steps 30] [--device cpu]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time

import torch
import torch.nn.functional as F

from bench._common import write_result
from clipterm.analyses import targets
from clipterm.analyses.lm import DEFAULT_WEIGHT, load_lm
from clipterm.analyses.search import SearchConfig, search_model
from clipterm.inputs.vocab import default_vocabulary


def searched(loaded, target: torch.Tensor, seconds: float, device: str) -> dict:
    """Run the search for about `seconds`; evals/s over the steps after the first event."""
    config = dataclasses.replace(SearchConfig(), time_limit=seconds, patience=None, steps=10_000)
    events = list(search_model(loaded, target, config=config))
    first, last = events[0], events[-1]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    evals_per_s = (last.evals - first.evals) / (last.elapsed - first.elapsed)
    return {"steps": last.step, "evals": last.evals, "seconds": last.elapsed, "evals_per_s": evals_per_s,
            "best": last.best[0].text, "best_cosine": last.best[0].cosine, "strings": [h.text for h in last.best]}


@torch.no_grad()
def naive(loaded, target: torch.Tensor, strings: list[str], device: str) -> dict:
    """Each string on its own, padded to the full context, through the model's own encode_text."""
    tokens = loaded.tokenizer(strings).to(device)  # (n, context)
    start = time.perf_counter()
    for row in tokens:
        F.normalize(loaded.model.encode_text(row[None]).float(), dim=-1) @ target.to(device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"evals": len(strings), "seconds": seconds, "evals_per_s": len(strings) / seconds, "context": int(tokens.shape[1])}


def first_event(loaded, target: str) -> dict:
    """Seconds from a loaded model to the first event (step 0) and to the first search step."""
    start = time.perf_counter()
    events = search_model(loaded, targets.resolve(target, loaded).direction, config=SearchConfig(steps=1))
    step0 = next(events)
    to_first = time.perf_counter() - start
    next(events)
    assert step0.step == 0
    return {"first_event_s": to_first, "first_step_s": time.perf_counter() - start}


def guided_against_unguided(loaded, target: str, steps: int) -> dict:
    """The same number of steps without and with the n-gram LM: steps/s, and steps to 95% of the final best."""
    vocab = default_vocabulary(loaded.tokenizer)
    lm = load_lm("ngram", vocab, loaded.info.spec)
    direction = targets.resolve(target, loaded).direction
    out = {}
    for name, model, weight in (("unguided", None, 0.0), ("ngram", lm, DEFAULT_WEIGHT)):
        config = dataclasses.replace(SearchConfig(), steps=steps, patience=None, lm_weight=weight)
        events = list(search_model(loaded, direction, vocab, config, lm=model))
        first, last = events[0], events[-1]
        final = last.best[0].score
        to_95 = next(e.step for e in events if e.best[0].score >= 0.95 * final)
        out[name] = {"steps": last.step, "seconds": last.elapsed - first.elapsed,
                     "steps_per_s": last.step / (last.elapsed - first.elapsed), "evals": last.evals,
                     "final_score": final, "final_cosine": last.best[0].cosine, "best": last.best[0].text,
                     "steps_to_95": to_95}
        print(f"toy {name}: {out[name]['steps_per_s']:.2f} steps/s, 95% of the final best {final:.3f} at step {to_95} "
              f"of {last.step}; best {last.best[0].text!r} (cos {last.best[0].cosine:.3f})", flush=True)
    out["ratio"] = out["ngram"]["steps_per_s"] / out["unguided"]["steps_per_s"]
    print(f"toy: steps/s guided / unguided {out['ratio']:.2f}x (goal >= 0.5x: {'met' if out['ratio'] >= 0.5 else 'MISSED'})")
    return out


def bench(name: str, loaded, args) -> dict:
    target = targets.resolve(args.target, loaded).direction
    result = searched(loaded, target, args.seconds, args.device)
    strings = (result["strings"] * args.naive)[: args.naive]  # padded to the full context, so any strings would do
    baseline = naive(loaded, target, strings, args.device)
    ratio = result["evals_per_s"] / baseline["evals_per_s"]
    print(f"{name}: search {result['evals_per_s']:,.0f} evals/s ({result['steps']} steps, {result['evals']:,} evals in "
          f"{result['seconds']:.1f} s; best {result['best']!r} cos {result['best_cosine']:.3f}); naive "
          f"{baseline['evals_per_s']:,.1f} evals/s (context {baseline['context']}, one at a time); "
          f"ratio {ratio:.1f}x (goal >= 3x: {'met' if ratio >= 3 else 'MISSED'})")
    return {"search": result, "naive": baseline, "ratio": ratio}


def main() -> None:
    import open_clip

    from clipterm.vit.models import LoadedModel, load_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=20.0, help="search time per model")
    parser.add_argument("--naive", type=int, default=30, help="candidates scored the naive way per model")
    parser.add_argument("--target", default="text:a red circle on a dark background")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--lm-steps", type=int, default=30, help="steps of the guided and unguided toy runs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    toy = load_model("toy", device=args.device)
    timing = first_event(toy, args.target)
    met = "met" if timing["first_event_s"] < 1 and timing["first_step_s"] < 1 else "MISSED"
    print(f"toy: first event {timing['first_event_s']:.3f} s, first step {timing['first_step_s']:.3f} s after the model "
          f"is loaded (goal < 1 s: {met})")
    results = {"toy": bench("toy", toy, args), "toy_lm": guided_against_unguided(toy, args.target, args.lm_steps)}

    torch.manual_seed(0)
    logging.getLogger().setLevel(logging.ERROR)  # open_clip warns that no pretrained weights were asked for
    model = open_clip.create_model("ViT-B-32").eval().to(args.device)
    vit = LoadedModel(model, None, open_clip.get_tokenizer("ViT-B-32"), toy.info)  # info is unused by the search
    results["ViT-B-32"] = bench("ViT-B-32 (random weights)", vit, args)
    write_result("search", {"threads": args.threads, "device": args.device, "target": args.target,
                            "config": dataclasses.asdict(SearchConfig()), "toy_first_event": timing, **results,
                            "goal_ratio": 3.0, "goal_first_event_s": 1.0,
                            "lm_weight": DEFAULT_WEIGHT, "goal_lm_steps_ratio": 0.5})


if __name__ == "__main__":
    main()
