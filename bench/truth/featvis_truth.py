"""Ground truth for `clipterm visualise` on the toy world (issue 17), measured by the world's palette, not the model.

1. colours: `text:a <colour> shape` for the 8 colours; the dominant palette colour must be that colour (goal >= 7/8).
2. backgrounds: `text:a <kind> background` for the 4 kinds; each image must score highest on its own kind's statistic
   among the four (brightness for light and dark, stripe-frequency power for striped, neighbour differences for
   noisy; `toyworld.palette.background_scores`). Goal >= 3/4.
3. heads: a toy cache is built, heads are ranked by how much mean-ablating them hurts colour accuracy; for the top
   --heads heads, does the visualisation's dominant colour appear in the head's top-3 TextSpan texts? The same rate
   for as many random other heads is reported beside it.
4. diversity: `--diverse 4` on one target against 4 seeds without the term: mean pairwise pixel correlation.

    python -m bench.truth.featvis_truth [--steps 128] [--cache-images 512] [--heads 3]
        [--only colours|backgrounds|heads|diversity]

Writes bench/results/featvis_truth.json; exits 1 when a goal is missed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench._common import write_result
from clipterm.analyses import featvis
from clipterm.toyworld import palette
from clipterm.toyworld.world import BACKGROUNDS, COLOURS


def paint(loaded, target: str, reader=None, sign: int = 1, **settings) -> np.ndarray:
    """The final images (K, S, S, 3) of one run (sign -1: the other end of the target's axis)."""
    config = featvis.Config(**settings)
    objective = featvis.objective_for(target, loaded, reader, config.objective)
    for term in objective.terms:
        term.sign *= sign
    for frame in featvis.visualise(loaded, objective, config):
        pass
    return frame.pixels


def colours(loaded, steps: int) -> dict:
    rows = []
    for colour in COLOURS:
        found = palette.dominant_colour(paint(loaded, f"text:a {colour} shape", steps=steps)[0])
        rows.append({"colour": colour, "dominant": found, "match": found == colour})
        print(f"  text:a {colour} shape -> {found}", flush=True)
    hits = sum(r["match"] for r in rows)
    return {"hits": hits, "of": len(rows), "goal": 7, "passed": hits >= 7, "rows": rows}


def backgrounds(loaded, steps: int) -> dict:
    images = {kind: paint(loaded, f"text:a {kind} background", steps=steps)[0] for kind in BACKGROUNDS}
    scores = {kind: palette.background_scores(pixels) for kind, pixels in images.items()}
    wins = palette.background_wins(images)
    for kind in BACKGROUNDS:
        print(f"  text:a {kind} background: " + " ".join(f"{k} {v:+.3f}" for k, v in scores[kind].items())
              + f" -> {'shows it' if wins[kind] else 'does not'}", flush=True)
    hits = sum(wins.values())
    return {"hits": hits, "of": len(wins), "goal": 3, "passed": hits >= 3, "scores": scores, "wins": wins}


def heads(loaded, steps: int, n_images: int, n_heads: int, seed: int, root: Path) -> dict:
    from clipterm import names
    from clipterm.analyses import ablation
    from clipterm.analyses.textspan import component_stats, text_span
    from clipterm.cache.build import BuildOptions, build_cache
    from clipterm.cache.reader import open_cache
    from clipterm.inputs.texts import embed_pool, load_pool
    from clipterm.vit.textencode import encode_texts

    build_cache(BuildOptions(images=f"toy:{n_images}", cache_dir=str(root), name="featvis", workers=0), loaded=loaded)
    reader = open_cache(root / "featvis")
    encode = lambda texts: encode_texts(loaded.model, loaded.tokenizer, texts)
    scoring = {"colour": ablation.scorings(reader, encode)["colour"]}
    shape = reader.shape
    every = [names.head(l, h) for l in range(shape.layers) for h in range(shape.heads)]
    ranked = sorted(ablation.ablate(scoring, ablation.shifts(reader, every), 200)["colour"], key=lambda r: -r.drop)
    critical = [r.component for r in ranked[:n_heads]]
    others = [r.component for r in ranked[n_heads:]]
    chosen = [others[i] for i in np.random.default_rng(seed).choice(len(others), n_heads, replace=False)]
    pool = load_pool("toy")
    embeds = embed_pool(loaded, pool)
    result = {}
    for group, picked in (("critical", critical), ("random", chosen)):
        rows = []
        for head in picked:
            span = text_span(*component_stats(reader, head), embeds, n_texts=3)
            texts = [pool.texts[i] for i in span.indices]
            named = {c for c in COLOURS if any(c in t.split() for t in texts)}
            found = palette.dominant_colour(paint(loaded, head, reader, steps=steps)[0])
            # A principal direction is an axis; TextSpan's texts may sit at either end of it.
            opposite = palette.dominant_colour(paint(loaded, head, reader, sign=-1, steps=steps)[0])
            drop = next(r.drop for r in ranked if r.component == head)
            rows.append({"component": head, "colour_drop": round(drop, 4), "texts": texts, "dominant": found,
                         "opposite": opposite, "match": found in named, "either_end": bool({found, opposite} & named)})
            print(f"  {group:>8} {head:<6} drop {drop:+.3f} texts {texts} -> {found} (other end {opposite})"
                  f" {'match' if found in named else 'either end' if {found, opposite} & named else ''}", flush=True)
        result[group] = {"rate": float(np.mean([r["match"] for r in rows])),
                         "either_end_rate": float(np.mean([r["either_end"] for r in rows])), "heads": rows}
    result["passed"] = result["critical"]["rate"] > result["random"]["rate"]
    return result


def diversity(loaded, steps: int, target: str = "text:a shape") -> dict:
    together = paint(loaded, target, steps=steps, images=4, diversity=1.0)
    seeds = np.concatenate([paint(loaded, target, steps=steps, seed=s) for s in range(4)])
    with_term, without = palette.mean_correlation(together), palette.mean_correlation(seeds)
    print(f"  {target}: mean pairwise pixel correlation {with_term:.3f} with --diverse 4, {without:.3f} for 4 seeds",
          flush=True)
    return {"target": target, "diverse": with_term, "seeds": without, "passed": with_term < without}


def main() -> None:
    from clipterm.vit.models import load_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--cache-images", type=int, default=512)
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", choices=("colours", "backgrounds", "heads", "diversity"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    loaded = load_model("toy")
    results = {}
    if args.only in (None, "colours"):
        print("colours:")
        results["colours"] = colours(loaded, args.steps)
        print(f"  {results['colours']['hits']}/8 (goal >= 7)")
    if args.only in (None, "backgrounds"):
        print("backgrounds:")
        results["backgrounds"] = backgrounds(loaded, args.steps)
        print(f"  {results['backgrounds']['hits']}/4 (goal >= 3)")
    if args.only in (None, "heads"):
        print(f"heads (cache of toy:{args.cache_images}, ranked by the colour drop under mean-ablation):")
        with tempfile.TemporaryDirectory() as tmp:
            results["heads"] = heads(loaded, args.steps, args.cache_images, args.heads, args.seed, Path(tmp))
        heads_result = results["heads"]
        print(f"  top {args.heads}: {heads_result['critical']['rate']:.0%} (either end of the axis "
              f"{heads_result['critical']['either_end_rate']:.0%}), {args.heads} random: "
              f"{heads_result['random']['rate']:.0%} ({heads_result['random']['either_end_rate']:.0%})")
    if args.only in (None, "diversity"):
        print("diversity:")
        results["diversity"] = diversity(loaded, args.steps)
    name = "featvis_truth" + (f"-{args.only}" if args.only else "")
    write_result(name, {"steps": args.steps, **results, "seconds": round(time.perf_counter() - started, 1)})
    sys.exit(0 if all(r["passed"] for r in results.values()) else 1)


if __name__ == "__main__":
    main()
