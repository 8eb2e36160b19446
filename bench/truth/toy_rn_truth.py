"""toy-rn against its world (issue 18): zero-shot accuracy, colour heads, channels named by their top images,
and multimodal channels. The measures are tests/test_toy_rn.py's (and test_neurons.py's for the channels).

- heads: the 3 pool heads whose mean-ablation hurts colour most; how many of their top-3 TextSpan texts (pool
  `toy`) name a colour, against the expectation for 3 random heads;
- channels: of the 40 L3 channels with the largest effect norms, those whose top-20 images share one colour or
  background >= 80% of the time, and the share of them whose first OMP text names it, against random channels
  (goal >= 50% and >= 2x random);
- multimodal: channels whose top-20 images (by mean activation) hold >= 2 objects of colour X and >= 2 scenes
  with the word X written in another ink.

    python -m bench.truth.toy_rn_truth [--model toy-rn|toy-rn-v1|PATH] [--images 1000] [--threads 1]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from bench._common import write_result
from clipterm.toyworld.evaluate import HELDOUT_SEED, evaluate_model, model_world
from clipterm.vit.models import is_toy, load_model
from tests.test_neurons import ground_truth_rates
from tests.test_toy_rn import colour_heads, multimodal_channels, rn_truth_cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="toy-rn")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model if is_toy(args.model) else f"local-dir:{args.model}")
    accuracy = evaluate_model(loaded.model, loaded.tokenizer, n=1000, seed=HELDOUT_SEED, world=model_world(loaded.info.spec))
    print("zero-shot accuracy (1000 held-out scenes):", accuracy, flush=True)
    with tempfile.TemporaryDirectory(prefix="toy-rn-truth-") as tmp:
        reader, _ = rn_truth_cache(loaded, tmp, args.images)
        heads = colour_heads(loaded, reader, tmp)
        print(f"colour heads: top-3 {heads['top_colour_texts']} colour texts of 9 vs "
              f"{heads['random_colour_texts']:.2f} for 3 random heads;", heads["top_heads"], flush=True)
        rates = ground_truth_rates(loaded, tmp, n_images=args.images, layer=3)
        rows = rates["attribute_neurons"]
        print(f"channels: {len(rows)} of the top 40 share one colour/background in their top-20 images; first OMP "
              f"text names it for {rates['rate']:.0%} vs {rates['random_rate']:.0%} for random channels "
              f"(goal >= 50% and >= 2x)", flush=True)
        multimodal = multimodal_channels(reader)
        print(f"multimodal channels: {multimodal['multimodal']} of {multimodal['channels']} (20 random images meet the "
              f"criterion {multimodal['random_rate']:.0%} of the time);", multimodal["examples"][:5])
    path = write_result("toy_rn_truth" if args.model == "toy-rn" else f"toy_rn_truth-{Path(args.model).name}", {"model": args.model, "images": args.images, "accuracy": accuracy,
                                         "colour_heads": heads, "channels": rates, "multimodal": multimodal})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
