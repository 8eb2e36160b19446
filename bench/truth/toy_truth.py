"""The toy ViT against its world (issue 16): every acceptance measure of the toy, on one model folder.

- accuracy: zero-shot, per task, on held-out scenes of the world the model was trained on;
- neurons: issue 5's ground truth (tests/test_neurons.py, `ground_truth_rates`): goal >= 5 attribute neurons,
  >= 60% named by their first OMP text, >= 2x random;
- heads: per task (colour, position, word), the heads whose mean-ablation costs the most accuracy, and how many of
  the top-5 TextSpan texts (pool `toy`) of the heads that matter (drop >= 2 points, at most 3) carry that task's
  topic, against all heads
  (goal: the top head costs >= 2 points, and its texts name the task more often than random heads' do);
- multimodal: neurons whose top-20 images (by CLS activation, and by second-order effect norm) hold >= 5 objects
  of colour X and >= 5 scenes with the word X in another ink, and whether their first OMP text names X.

    python -m bench.truth.toy_truth [--model toy|toy-v1|PATH] [--images 1000] [--threads 1]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from bench._common import write_result
from clipterm.toyworld.evaluate import HELDOUT_SEED, evaluate_model, model_world
from clipterm.vit.models import load_model
from tests.test_neurons import ground_truth_rates  # the same measures as the tests
from tests.test_toy_truth import head_study, multimodal, truth_reader


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="toy")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--eval", type=int, default=2000, help="held-out scenes for the accuracy table")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = args.model if args.model.startswith("toy") and "/" not in args.model else f"local-dir:{Path(args.model).resolve()}"
    loaded = load_model(spec)
    world = model_world(spec)
    accuracy = evaluate_model(loaded.model, loaded.tokenizer, n=args.eval, seed=HELDOUT_SEED, world=world)
    print(f"zero-shot accuracy ({args.eval} held-out scenes of world {world}):", accuracy, flush=True)
    with tempfile.TemporaryDirectory(prefix="toy-truth-") as tmp:
        reader = truth_reader(loaded, tmp, args.images)
        layer = loaded.info.layers - 2
        rates = ground_truth_rates(loaded, tmp, n_images=args.images)
        print(f"neurons: {len(rates['attribute_neurons'])} attribute neurons, named {rates['rate']:.0%} vs "
              f"{rates['random_rate']:.0%} random (goal >= 5, >= 60%, >= 2x)", flush=True)
        heads = head_study(loaded, reader, tmp)
        for task, row in heads.items():
            print(f"heads/{task}: top drop {row['top_drop']:+.3f}; heads that matter on topic {row['top_on_topic']:.0%} vs "
                  f"random {row['random_on_topic']:.0%};", [(h["component"], h["drop"], h["texts"][:2]) for h in row["top_heads"]],
                  flush=True)
        modal = multimodal(reader, loaded, tmp, layer)
        for by in ("activation", "norm"):
            print(f"multimodal by {by}: {len(modal[by])} neurons of {modal['neurons']} (random 20: "
                  f"{modal['random_rate']:.1%});", modal[by][:6], flush=True)
    path = write_result(f"toy_truth-{Path(args.model).name}", {"model": args.model, "world": world, "images": args.images,
                                                              "accuracy": accuracy, "neurons": rates, "heads": heads,
                                                              "multimodal": modal})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
