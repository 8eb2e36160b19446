"""The toy ViT against its world (issue 16): every acceptance measure of the toy, on one model folder.

- accuracy: zero-shot, per task, on held-out scenes of the world the model was trained on;
- neurons: issue 5's ground truth (tests/test_neurons.py, `ground_truth_rates`): goal >= 5 attribute neurons,
  >= 60% named by their first OMP text, >= 2x random;
- heads: per task (colour, position, word), the heads whose mean-ablation costs the most accuracy, and how many of
  the top-5 TextSpan texts (pool `toy`) of the top-3 heads carry that task's topic, against 3 random heads
  (goal: the top head costs >= 2 points, and its texts name the task more often than random heads' do);
- multimodal: neurons whose top-20 images (by CLS activation, and by second-order effect norm) hold >= 5 objects
  of colour X and >= 5 scenes with the word X in another ink, and whether their first OMP text names X.

    python bench/toy_truth.py [--model toy|PATH] [--images 1000] [--threads 1]
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

import torch
from _common import write_result

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_neurons import ground_truth_rates  # noqa: E402  (one measure, shared with the tests)

from clipterm import names  # noqa: E402
from clipterm.analyses import ablation, textspan  # noqa: E402
from clipterm.cache.build import BuildOptions, build_cache  # noqa: E402
from clipterm.cache.neurons import NeuronFile, build_neurons, decompose_neurons  # noqa: E402
from clipterm.cache.reader import open_cache  # noqa: E402
from clipterm.inputs.images import toy_scene_of  # noqa: E402
from clipterm.inputs.texts import embed_pool, load_pool  # noqa: E402
from clipterm.toyworld.evaluate import HELDOUT_SEED, evaluate_model, model_world  # noqa: E402
from clipterm.toyworld.world import COLOURS  # noqa: E402
from clipterm.vit.models import load_model  # noqa: E402
from clipterm.vit.textencode import encode_texts  # noqa: E402

TASK_HEADS = ("colour", "position", "word")


def head_study(loaded, reader, root, draws: int = 200, n_texts: int = 5) -> dict:
    """Per task: every head's accuracy drop under mean-ablation, the top-3 heads with their TextSpan texts, and
    their texts' share of the task's topic against all heads' (the expectation for random heads)."""
    heads = [str(h) for h in names.heads(reader.shape)]
    pool = load_pool("toy")
    spans = textspan.describe(reader, heads, embed_pool(loaded, pool, cache_dir=str(root)), n_texts=n_texts,
                              baseline_draws=0)
    top_texts = {h: [int(i) for i in spans[h].indices[:n_texts]] for h in heads}
    encode = lambda texts: encode_texts(loaded.model, loaded.tokenizer, texts)  # noqa: E731
    out = {}
    for task in TASK_HEADS:
        scorings = ablation.scorings(reader, encode, task=task)
        drops = {row.component: row.drop for row in ablation.ablate(scorings, ablation.shifts(reader, heads), draws)[task]}
        on_topic = {h: sum(task in pool.topics[i].split("+") for i in top_texts[h]) / n_texts for h in heads}
        top = sorted(heads, key=lambda h: -drops[h])[:3]
        out[task] = {"top_heads": [{"component": h, "drop": round(drops[h], 4), "on_topic": on_topic[h],
                                    "texts": [pool.texts[i] for i in top_texts[h]]} for h in top],
                     "top_drop": round(drops[top[0]], 4), "top3_on_topic": sum(on_topic[h] for h in top) / 3,
                     "random_on_topic": sum(on_topic.values()) / len(heads)}
    return out


def multimodal(reader, loaded, root, layer: int, top: int = 20, least: int = 5) -> dict:
    """Neurons of `layer` whose top images show both objects of colour X and the word X in another ink."""
    scenes = [toy_scene_of(reader.images()[int(i)]["id"]) for i in reader.index()]

    def both(rows: list[int]) -> dict | None:
        chosen = [scenes[i] for i in rows]
        for colour in COLOURS:
            objects = sum(any(o.colour == colour for o in s.objects) and s.word != colour for s in chosen)
            words = sum(s.word == colour and s.ink != colour for s in chosen)
            if objects >= least and words >= least:
                return {"colour": colour, "objects": objects, "words": words}
        return None

    neuron_file = NeuronFile(reader, layer)
    pool = load_pool("toy")
    embeds = embed_pool(loaded, pool, cache_dir=str(root))
    activations = reader.neurons(layer).float()  # (N, M)
    found = {}
    for by in ("activation", "norm"):
        hits = []
        for n in range(activations.shape[1]):
            column = activations[:, n] if by == "activation" else neuron_file.column("norms", n).float()
            hit = both(column.topk(top).indices.tolist())
            if hit is not None:
                hits.append({"neuron": f"L{layer}.N{n}", "index": n, **hit})
        if hits:
            code = decompose_neurons(neuron_file, [h["index"] for h in hits], embeds, k=32)
            for k, h in enumerate(hits):
                lead = code.leading(k)
                h["text"] = pool.texts[lead] if lead is not None else ""
                h["named"] = re.search(rf"\b{h['colour']}\b", h["text"]) is not None
        found[by] = hits
    generator = torch.Generator().manual_seed(0)
    drawn = [torch.randperm(len(scenes), generator=generator)[:top].tolist() for _ in range(500)]
    chance = sum(both(rows) is not None for rows in drawn) / len(drawn)
    return {"layer": layer, "neurons": activations.shape[1], "random_rate": chance, **found}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="toy")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--eval", type=int, default=2000, help="held-out scenes for the accuracy table")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = args.model if args.model in ("toy", "toy-rn") else f"local-dir:{Path(args.model).resolve()}"
    loaded = load_model(spec)
    world = model_world(spec)
    accuracy = evaluate_model(loaded.model, loaded.tokenizer, n=args.eval, seed=HELDOUT_SEED, world=world)
    print(f"zero-shot accuracy ({args.eval} held-out scenes of world {world}):", accuracy, flush=True)
    with tempfile.TemporaryDirectory(prefix="toy-truth-") as tmp:
        build_cache(BuildOptions(images=f"toy:{args.images}", model=spec, name="truth", cache_dir=tmp, neurons=True,
                                 workers=0), loaded=loaded)
        reader = open_cache(Path(tmp) / "truth")
        layer = loaded.info.layers - 2
        build_neurons(reader, layer, device="cpu", loaded=loaded)
        reader = open_cache(Path(tmp) / "truth")
        rates = ground_truth_rates(loaded, tmp, n_images=args.images)
        print(f"neurons: {len(rates['attribute_neurons'])} attribute neurons, named {rates['rate']:.0%} vs "
              f"{rates['random_rate']:.0%} random (goal >= 5, >= 60%, >= 2x)", flush=True)
        heads = head_study(loaded, reader, tmp)
        for task, row in heads.items():
            print(f"heads/{task}: top drop {row['top_drop']:+.3f}; top-3 on topic {row['top3_on_topic']:.0%} vs "
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
