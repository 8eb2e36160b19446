"""Zero-shot segmentation and NMF factors on the toy world, whose object masks are known.

1. For --singles held-out single-object scenes (no rendered word), query each image's own object phrase
   ("a red star"), threshold the map at its mean, and take the IoU with the object's mask. Baseline, in the
   same run: cosine between the last layer's patch tokens (through ln_post and proj) and the text.
   Goal: clipterm's map beats the baseline.
2. For --pairs two-object scenes, NMF with k=3 on the MLP activations of --nmf-layers: the best assignment of
   two factors to the two masks. Goal: mean IoU >= 0.5. Other layer sets are printed for comparison.
3. The time of one query map from a forward pass and from a cache's stored tokens.

Scenes come from seed HELDOUT_SEED + 1, which nothing was tuned on.

    python -m bench.truth.spatial [--singles 200] [--pairs 200] [--threads 1]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from bench._common import best_time, write_result
from clipterm.analyses import spatial
from clipterm.names import format_layers
from clipterm.vit.models import load_model

# one evaluation, shared with the test
from tests.test_spatial import EVAL_SEED, NMF_LAYERS, baseline_ious, nmf_ious, query_ious, scenes_with


def summary(values: list[float]) -> dict:
    return {"mean": round(float(np.mean(values)), 4), "median": round(float(np.median(values)), 4), "n": len(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--singles", type=int, default=200)
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model("toy")
    contrast, _ = spatial.pool_embeddings(loaded, "toy")

    singles = scenes_with(args.singles, 1)
    ours = query_ious(loaded, singles, contrast)
    plain = query_ious(loaded, singles, None)
    baseline = baseline_ious(loaded, singles)
    print(f"query maps, {len(singles)} single-object scenes, IoU at the mean threshold:")
    print(f"  clipterm (L2-5 direct effects, toy-pool contrast) {np.mean(ours):.3f}")
    print(f"  clipterm without the contrast                     {np.mean(plain):.3f}")
    print(f"  baseline (last-layer patch tokens, cosine)        {np.mean(baseline):.3f}"
          f"  -> ratio {np.mean(ours) / np.mean(baseline):.1f}x; clipterm wins on "
          f"{np.mean(np.array(ours) > np.array(baseline)):.0%} of images")

    pairs = scenes_with(args.pairs, 2)
    distinct = np.array([a.colour != b.colour for _, s in pairs for a, b in [s.objects]])
    per_layers = {}
    for layers in (NMF_LAYERS, [0], [1], [3], [0, 1, 2], [5]):
        values = nmf_ious(loaded, pairs, layers)
        per_layers[format_layers(layers)] = {**summary(values), "distinct_colours": summary(list(np.array(values)[distinct])),
                                             "same_colour": summary(list(np.array(values)[~distinct]))}
        print(f"NMF k=3 on {format_layers(layers):>6}: mean best-assignment IoU {np.mean(values):.3f} over {len(pairs)} "
              f"two-object scenes ({np.mean(np.array(values)[distinct]):.3f} where the colours differ, "
              f"{np.mean(np.array(values)[~distinct]):.3f} where they are the same, {int((~distinct).sum())} scenes)")

    with tempfile.TemporaryDirectory() as root:
        from clipterm.cache.build import BuildOptions, build_cache
        from clipterm.cache.reader import open_cache

        build_cache(BuildOptions(images="toy:64", name="t", cache_dir=root, tokens="L2-5", workers=0), loaded=loaded)
        reader = open_cache(Path(root) / "t")
        forward_s, _ = best_time(lambda: spatial.query_map("toy:0/7", "a red star", loaded=loaded, contrast=contrast), 5)
        cache_s, _ = best_time(lambda: spatial.query_map("row:7", "a red star", loaded=loaded, reader=reader,
                                                         contrast=contrast), 5)
    print(f"one query map: {1000 * forward_s:.1f} ms from a forward pass, {1000 * cache_s:.1f} ms from the cache's tokens")

    goal_query = float(np.mean(ours)) > float(np.mean(baseline))
    goal_nmf = per_layers[format_layers(NMF_LAYERS)]["mean"] >= 0.5
    print(f"goals: query map beats the baseline: {'met' if goal_query else 'NOT met'}; "
          f"NMF separates two objects (>= 0.5): {'met' if goal_nmf else 'NOT met'}")
    path = write_result("spatial", {
        "model": "toy", "seed": EVAL_SEED, "threads": args.threads,
        "query": {"clipterm": summary(ours), "clipterm_no_contrast": summary(plain), "baseline": summary(baseline),
                  "layers": "L2-5", "contrast": "toy pool", "threshold": "mean", "goal_met": goal_query},
        "nmf": {"k": 3, "layers": format_layers(NMF_LAYERS), "per_layers": per_layers, "goal": 0.5, "goal_met": goal_nmf},
        "time_ms": {"query_map_forward": round(1000 * forward_s, 2), "query_map_cache": round(1000 * cache_s, 2)},
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
