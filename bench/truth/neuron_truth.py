"""Issue 5's ground truth, layer by layer: do neurons' text labels name what their top images share?

For each layer with second-order effects, the test's measure (tests/test_neurons.py, `ground_truth_rates`):
of the 40 neurons with the largest effect norms, those whose top-20 images share one colour or background
>= 80% of the time; the share of them whose label names that attribute, against the share for 100 random
neurons. The issue's goal, at the second-to-last layer: >= 60% and >= 2x random. Labels compared:

- `clipterm`: the first text OMP picks with a positive coefficient (the shipped `neurons list --decompose`);
- `reference`: the reference script's recipe (`compute_sparse_decomposition.py`): pool texts centred and each
  *dimension* scaled to unit norm, scikit-learn's OMP with its tolerance 1e-4, the label its largest |coefficient|;
- `image oracle`: not a text method. The nearest of the 12 class-mean image directions (8 colours and 4
  backgrounds, from the labels) to the neuron's pc1. It uses what no text labeller has, so it bounds what any
  labelling of pc1 can reach on this model.

    python -m bench.truth.neuron_truth [--model toy|PATH] [--layers 1,2,3,4] [--images 1000] [--threads 1]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench._common import write_result
from clipterm.vit.models import load_model
from tests.test_neurons import ground_truth_rates, truth_cache  # one measure, shared with the test


def reference_labels(neuron_file, ids: list[int], embeds: torch.Tensor, texts: list[str]) -> list[str]:
    """The reference's dictionary and OMP (scikit-learn), labelled by the largest |coefficient|."""
    from sklearn.decomposition import SparseCoder

    if not ids:  # no attribute neurons at this layer: nothing to label
        return []
    centred = (embeds.float() - embeds.float().mean(0)).numpy()  # (P, D)
    dictionary = 100.0 * centred / np.linalg.norm(centred, axis=0, keepdims=True)  # each dimension to norm 100
    coder = SparseCoder(dictionary=dictionary, transform_algorithm="omp", transform_alpha=1e-4,
                        transform_n_nonzero_coefs=32)
    codes = coder.transform(neuron_file.tensor("pc1")[ids].float().numpy())  # (m, P)
    return [texts[int(np.abs(code).argmax())] if np.abs(code).max() > 0 else "" for code in codes]


def oracle_labeller(reader):
    """Labels from the nearest class-mean image direction (the 4 backgrounds and 8 colours of the labels)."""
    embeds = F.normalize(reader.image_embeds().float(), dim=-1)  # (N, D)
    directions, names = [], []
    for task in ("colour", "background"):
        labels = reader.labels(task)
        for index, name in enumerate(reader.tasks[task]):
            directions.append(F.normalize(embeds[labels == index].mean(0) - embeds.mean(0), dim=0))  # (D,)
            names.append(name)
    directions = torch.stack(directions)  # (C, D)

    def label(neuron_file, ids, embeds, texts) -> list[str]:
        return [names[int(i)] for i in (neuron_file.tensor("pc1")[ids].float() @ directions.T).argmax(1)]

    return label


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="toy", help="toy, or a local-dir folder of another toy checkpoint")
    parser.add_argument("--layers", default=None, help="comma-separated layers (default: every layer but the last)")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    loaded = load_model(args.model)
    layers = [int(x) for x in args.layers.split(",")] if args.layers else list(range(loaded.info.layers - 1))
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for layer in layers:
            reader, _ = truth_cache(loaded, root, args.images, layer)
            for name, label in (("clipterm", None), ("reference", reference_labels), ("image oracle", oracle_labeller(reader))):
                rates = ground_truth_rates(loaded, root, args.images, layer=layer, label=label)
                found = rates["attribute_neurons"]
                rows.append({"layer": layer, "labels": name, "neurons": len(found), "rate": round(rates["rate"], 3),
                             "random_rate": round(rates["random_rate"], 3),
                             "attributes": sorted({row["attribute"] for row in found}),
                             "texts": [[row["neuron"], row["attribute"], row["text"]] for row in found]})
                ratio = rates["rate"] / rates["random_rate"] if rates["random_rate"] else float("inf")
                print(f"L{layer} {name:13s} {len(found):3d} attribute neurons  named {rates['rate']:5.0%}  "
                      f"random {rates['random_rate']:5.0%}  ratio {ratio:4.1f}x", flush=True)
    goal = loaded.info.layers - 2
    model = "toy" if args.model == "toy" else Path(args.model).name
    path = write_result(f"neuron_truth-{model}", {"model": args.model, "images": args.images, "goal_layer": goal,
                                                  "goal": {"rate": 0.6, "ratio": 2.0}, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
