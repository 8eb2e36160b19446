"""Acceptance checks of issue 6 that need the trained toy model: does the search find colour words?

1. Image targets: held-out toy scenes with a single object (and no written word, so that nothing but
   the object can name a colour). The best string should name the object's colour for >= 70% of them.
2. Heads: a toy cache is built and `clipterm ablate --by head --task colour` ranks the heads. The
   best string for the most colour-critical head (its :pc1 direction) should contain a colour word.
   The rate over the top --heads heads is reported next to the rate over as many random other heads.

    python -m bench.truth.search_acceptance [--model toy] [--images 20] [--cache-images 512] [--heads 3]

Exits 1 when a check fails. Writes bench/results/search_acceptance.json.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench._common import write_result
from clipterm.analyses import targets
from clipterm.analyses.search import search_model
from clipterm.toyworld.evaluate import HELDOUT_SEED, model_world
from clipterm.toyworld.world import COLOURS, render, scene_at

# Colour words: the world's own, and other common colour names a head might also like.
COLOUR_WORDS = set(COLOURS) | {"brown", "grey", "gray", "black", "white", "gold", "silver", "beige", "teal", "violet",
                               "magenta", "lime", "navy", "turquoise", "maroon", "crimson", "scarlet", "indigo"}


def best_text(loaded, target: str, reader=None) -> tuple[str, float]:
    last = None
    for last in search_model(loaded, targets.resolve(target, loaded, reader).direction):
        pass
    return last.best[0].text, last.best[0].cosine


def single_object_scenes(n: int, world: int = 1) -> list:
    scenes, index = [], 0
    while len(scenes) < n:
        scene = scene_at(HELDOUT_SEED, index, world)
        if len(scene.objects) == 1 and scene.word is None:
            scenes.append(scene)
        index += 1
    return scenes


def image_check(loaded, n: int, folder: Path) -> dict:
    from PIL import Image

    rows = []
    for i, scene in enumerate(single_object_scenes(n, model_world(loaded.info.spec))):
        path = folder / f"scene{i}.png"
        Image.fromarray(render(scene)[0]).save(path)
        text, cosine = best_text(loaded, f"image:{path}")
        colour = scene.objects[0].colour
        rows.append({"colour": colour, "shape": scene.objects[0].shape, "best": text, "cosine": cosine,
                     "names_colour": colour in text.split()})
        print(f"  {colour:>7} {scene.objects[0].shape:<8} -> {text!r} (cos {cosine:.3f})", flush=True)
    rate = float(np.mean([r["names_colour"] for r in rows]))
    return {"rate": rate, "goal": 0.7, "passed": rate >= 0.7, "images": rows}


def ablate_heads(cache: Path, task: str = "colour") -> list[dict]:
    """`clipterm ablate CACHE --by head --task TASK --json`, run in-process: heads by accuracy drop."""
    from clipterm.cli.app import main

    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            main(["ablate", str(cache), "--by", "head", "--task", task, "--draws", "200", "--json"])
    except SystemExit as exc:  # typer exits even on success
        if exc.code not in (0, None):
            raise
    return json.loads(out.getvalue())["tasks"][task]["components"]


def head_check(loaded, spec: str, n_images: int, n_heads: int, seed: int, root: Path) -> dict:
    from clipterm import open_cache
    from clipterm.cache.build import BuildOptions, build_cache

    build_cache(BuildOptions(images=f"toy:{n_images}", model=spec, cache_dir=str(root), name="acceptance", device="cpu",
                             workers=0), loaded=loaded)
    reader = open_cache(root / "acceptance")
    ranked = ablate_heads(root / "acceptance")
    critical = [row["component"] for row in ranked[:n_heads]]
    others = [row["component"] for row in ranked[n_heads:]]
    chosen = [others[i] for i in np.random.default_rng(seed).choice(len(others), n_heads, replace=False)]
    result = {}
    for group, heads in (("critical", critical), ("random", chosen)):
        rows = []
        for head in heads:
            text, cosine = best_text(loaded, head, reader)
            drop = next(r["drop"] for r in ranked if r["component"] == head)
            rows.append({"head": head, "colour_drop": drop, "best": text, "cosine": cosine,
                         "colour_word": bool(COLOUR_WORDS & set(text.split()))})
            print(f"  {group:>8} {head:<6} colour drop {drop:+.3f} -> {text!r} (cos {cosine:.3f})", flush=True)
        result[group] = {"rate": float(np.mean([r["colour_word"] for r in rows])), "heads": rows}
    result["passed"] = result["critical"]["heads"][0]["colour_word"]
    return result


def main() -> None:
    from clipterm.vit.models import load_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy", help="toy or local-dir:PATH (a toy-world model)")
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--cache-images", type=int, default=512)
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", choices=("images", "heads"), help="run one of the two checks")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    loaded = load_model(args.model)
    images = heads = None
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "images"):
            print(f"image targets ({args.images} held-out single-object scenes):")
            images = image_check(loaded, args.images, Path(tmp))
            print(f"  best string names the colour: {images['rate']:.0%} (goal >= 70%: {'met' if images['passed'] else 'MISSED'})")
        if args.only in (None, "heads"):
            print(f"head targets (cache of toy:{args.cache_images}, heads ranked by `clipterm ablate --task colour`):")
            heads = head_check(loaded, args.model, args.cache_images, args.heads, args.seed, Path(tmp))
            print(f"  most colour-critical head {heads['critical']['heads'][0]['head']}: colour word "
                  f"{'found' if heads['passed'] else 'NOT found'}; rate over the top {args.heads}: "
                  f"{heads['critical']['rate']:.0%}, over {args.heads} random heads: {heads['random']['rate']:.0%}")
    write_result("search_acceptance", {"model": args.model, "weights_sha256": loaded.info.weights_sha256,
                                       "images": images, "heads": heads, "seconds": time.perf_counter() - started})
    sys.exit(0 if all(check["passed"] for check in (images, heads) if check is not None) else 1)


if __name__ == "__main__":
    main()
