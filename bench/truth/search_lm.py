"""Language-model guidance of the text search on the toy model: readability and colour, guided against unguided.

Targets: --images held-out single-object toy scenes (`image:` targets, no written word) and the 8 heads that
matter most for colour and for shape (the top --heads of each by `clipterm ablate --by head --task colour|shape`
on a toy cache, their :pc1 directions). Each target is searched with the default settings unguided (`--lm
none`, so the word-frequency prior λ = 0.0025) and guided by the n-gram LM at each --weights value (λ = 0 by
default: the LM's unigram counts word frequency). Per setting:

- readable: the share of best strings that parse as phrases of the toy caption grammar
  (`toyworld.captions.parses_as_caption`). Goal, guided: >= 60%;
- names colour: the share of image targets whose best string names the object's colour. Goal: >= 85%;
- cosine: the mean ratio of the best string's cosine to the unguided best's, per target. Goal: >= 0.95.

    python -m bench.truth.search_lm [--images 20] [--heads 4] [--cache-images 512] [--weights 0.05,0.1]

Writes bench/results/search_lm.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench._common import write_result
from bench.truth.search_acceptance import ablate_heads, single_object_scenes
from clipterm.analyses import targets
from clipterm.analyses.lm import load_lm
from clipterm.analyses.search import SearchConfig, search_model
from clipterm.inputs.vocab import default_vocabulary
from clipterm.toyworld.captions import parses_as_caption
from clipterm.toyworld.evaluate import model_world
from clipterm.toyworld.world import render


def image_targets(n: int, folder: Path, world: int = 1) -> list[dict]:
    from PIL import Image

    out = []
    for i, scene in enumerate(single_object_scenes(n, world)):
        path = folder / f"scene{i}.png"
        Image.fromarray(render(scene)[0]).save(path)
        obj = scene.objects[0]
        out.append({"target": f"image:{path}", "about": f"{obj.size} {obj.colour} {obj.shape}", "colour": obj.colour})
    return out


def head_targets(loaded, n_images: int, n_heads: int, root: Path) -> tuple[list[dict], object]:
    from clipterm import open_cache
    from clipterm.cache.build import BuildOptions, build_cache

    build_cache(BuildOptions(images=f"toy:{n_images}", model="toy", cache_dir=str(root), name="heads", device="cpu",
                             workers=0), loaded=loaded)
    out = []
    for task in ("colour", "shape"):
        for row in ablate_heads(root / "heads", task)[:n_heads]:
            out.append({"target": row["component"], "about": f"{task}-critical (drop {row['drop']:+.3f})", "colour": None})
    return out, open_cache(root / "heads")


def run(loaded, vocab, lm, target: dict, reader, weight: float) -> dict:
    direction = targets.resolve(target["target"], loaded, reader).direction
    config = dataclasses.replace(SearchConfig(), lm_weight=weight)
    started = time.perf_counter()
    last = None
    for last in search_model(loaded, direction, vocab, config, lm=lm):
        pass
    best = last.best[0]
    return {"best": best.text, "cosine": best.cosine, "lm_nll": best.lm_nll, "steps": last.step,
            "seconds": time.perf_counter() - started, "readable": parses_as_caption(best.text),
            "names_colour": None if target["colour"] is None else target["colour"] in best.text.split()}


def summary(rows: list[dict], unguided: list[dict]) -> dict:
    colour = [r["names_colour"] for r in rows if r["names_colour"] is not None]
    return {"readable": float(np.mean([r["readable"] for r in rows])),
            "names_colour": float(np.mean(colour)) if colour else None,
            "cosine_ratio": float(np.mean([r["cosine"] / u["cosine"] for r, u in zip(rows, unguided)])),
            "cosine_ratio_min": float(min(r["cosine"] / u["cosine"] for r, u in zip(rows, unguided))),
            "mean_steps": float(np.mean([r["steps"] for r in rows])), "mean_seconds": float(np.mean([r["seconds"] for r in rows]))}


def main() -> None:
    from clipterm.vit.models import load_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--heads", type=int, default=4, help="heads per task (colour, shape)")
    parser.add_argument("--cache-images", type=int, default=512)
    parser.add_argument("--weights", default="0.05,0.1", help="λ_lm values to try, comma-separated")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    loaded = load_model("toy")
    vocab = default_vocabulary(loaded.tokenizer)
    weights = [float(w) for w in args.weights.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        lm = load_lm("ngram", vocab, "toy", cache_dir=tmp)
        images = image_targets(args.images, Path(tmp), model_world("toy"))
        heads, reader = head_targets(loaded, args.cache_images, args.heads, Path(tmp)) if args.heads else ([], None)
        settings = [("unguided", None, 0.0)] + [(f"guided {w:g}", lm, w) for w in weights]
        rows: dict[str, list[dict]] = {name: [] for name, _, _ in settings}
        for target in images + heads:
            line = [f"{target['target'].split('/')[-1]:<12} {target['about']:<28}"]
            for name, model, weight in settings:
                result = run(loaded, vocab, model, target, reader, weight)
                rows[name].append({**result, "target": target["target"], "about": target["about"]})
                line.append(f"{name}: {result['best']!r} {result['cosine']:.3f}{' ✓' if result['readable'] else ''}")
            print(" | ".join(line), flush=True)
    n_images = len(images)
    report = {}
    for name, _, weight in settings:
        all_rows = rows[name]
        report[name] = {"lm_weight": weight if name != "unguided" else None,
                        "lam": SearchConfig().prior_weight(guided=name != "unguided"),
                        "all": summary(all_rows, rows["unguided"]),
                        "images": summary(all_rows[:n_images], rows["unguided"][:n_images]),
                        "heads": summary(all_rows[n_images:], rows["unguided"][n_images:]) if heads else None,
                        "rows": all_rows}
    print(f"\n{'setting':<14} {'readable':>9} {'names colour':>13} {'cos/unguided':>13} {'min':>6} {'steps':>6} {'s/target':>9}")
    for name in report:
        s = report[name]["all"]
        print(f"{name:<14} {s['readable']:>9.0%} {report[name]['images']['names_colour']:>13.0%} "
              f"{s['cosine_ratio']:>13.3f} {s['cosine_ratio_min']:>6.3f} {s['mean_steps']:>6.1f} {s['mean_seconds']:>9.1f}")
    goals = {"readable": 0.6, "names_colour": 0.85, "cosine_ratio": 0.95}
    write_result("search_lm", {"images": n_images, "heads": len(heads), "weights": weights, "goals": goals,
                               "config": dataclasses.asdict(SearchConfig()), "settings": report,
                               "seconds": time.perf_counter() - started})
    guided = [report[name] for name in report if name != "unguided"]
    met = any(g["all"]["readable"] >= 0.6 and g["images"]["names_colour"] >= 0.85 and g["all"]["cosine_ratio"] >= 0.95
              for g in guided)
    sys.exit(0 if met else 1)


if __name__ == "__main__":
    main()
