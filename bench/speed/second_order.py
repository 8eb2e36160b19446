"""Second-order neuron effects: clipterm against the naive per-image computation, on the same images.

The naive baseline computes what the reference implementation computes (Gandelsman et al., 2024,
`second_order_lens`, `prs_second_order_neurons_hook.py`), the way it does, at batch 1: it forms every
neuron's write at every token, `[T, M, W]` (plus an equal share of c_proj's bias), runs it through each
later head's ln_1 linearised in the reference's convention (an equal share of the token's mean
subtracted, of β added), values (with a share of their bias), the full attention pattern and out-proj
(with a share of its bias), reads the class token, linearises ln_post the same way and scales by
100/‖embedding‖. A second baseline, also batch 1, forms the same `[T, M, W]` writes but only the CLS
row. clipterm runs one batched forward pass for the scalars (`convention="reference"`, so the same
numbers) and forms the (B, M, D) effects from the precomputed path vectors and the per-image shared
term. All three give every image's full (M, D) effects, checked equal; clipterm's own convention
(each write centred by its own mean, docs/conventions.md) is timed too.
Goal: >= 100x faster than the naive baseline. The default is the issue's scale reference, ViT-B-32
layer 9 (random weights: the timing does not depend on them); on the toy model (`--model toy`) a
plain forward pass is already 1/75 of the naive cost, so the ratio there stays below 100x.

    python -m bench.speed.second_order [--model ViT-B-32|toy] [--layer L] [--images 16] [--naive-images 1] [--threads 1]
"""

from __future__ import annotations

import argparse

import torch

from bench._common import best_time, write_result
from clipterm.vit import second_order


def record(model, image: torch.Tensor, layer: int) -> dict:
    """One image's forward pass with hooks: block inputs, full attention patterns, post-GELU values, final residual."""
    visual = model.visual
    blocks = visual.transformer.resblocks
    inputs, saved = {}, {}
    hooks = [b.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0])) for i, b in enumerate(blocks)]
    hooks.append(blocks[layer].mlp.gelu.register_forward_hook(lambda m, a, out: saved.__setitem__("hidden", out)))
    hooks.append(visual.ln_post.register_forward_pre_hook(lambda m, a: saved.__setitem__("final", a[0])))
    embedding = model.encode_image(image)[0]  # (D,) unnormalised
    for hook in hooks:
        hook.remove()
    probs = {}
    for later in range(layer + 1, len(blocks)):
        normed = blocks[later].ln_1(inputs[later])  # (1, T, W)
        probs[later] = blocks[later].attn(normed, normed, normed, need_weights=True, average_attn_weights=False)[1]  # (1, H, T, T)
    final = saved["final"][:, 0] if saved["final"].dim() == 3 else saved["final"]  # (1, W)
    return {"inputs": inputs, "probs": probs, "hidden": saved["hidden"][0], "final": final[0], "embedding": embedding}


def naive(model, image: torch.Tensor, layer: int, cls_only: bool = False) -> torch.Tensor:
    """Second-order effects (M, D) of one image in the reference's convention, the reference's way: per-neuron, per-token tensors."""
    visual = model.visual
    blocks = visual.transformer.resblocks
    run = record(model, image, layer)
    c_proj = blocks[layer].mlp.c_proj
    n_neurons = c_proj.weight.shape[1]
    writes = run["hidden"][:, :, None] * c_proj.weight.T[None] + c_proj.bias / n_neurons  # (T, M, W)
    final = run["final"]
    mean_post, sigma_post = final.mean(), (final.var(unbiased=False) + visual.ln_post.eps).sqrt()
    total = 0.0
    for later in range(layer + 1, len(blocks)):
        attn, ln_1 = blocks[later].attn, blocks[later].ln_1
        x = run["inputs"][later][0]  # (T, W)
        mean, sigma = x.mean(-1), (x.var(-1, unbiased=False) + ln_1.eps).sqrt()  # (T,), (T,)
        share_1 = (1 + 2 * later) * n_neurons  # the layer's share of the 2l'+1 terms before l', split over M neurons
        normed = ln_1.weight * (writes - mean[:, None, None] / share_1) / sigma[:, None, None] + ln_1.bias / share_1  # (T, M, W)
        width, heads = x.shape[-1], attn.num_heads
        dh = width // heads
        share_2 = share_1 * (1 + 2 * len(blocks)) * heads  # and of the 2L+1 terms before ln_post, over the heads
        for head in range(heads):
            rows = slice(2 * width + head * dh, 2 * width + (head + 1) * dh)
            values = normed @ attn.in_proj_weight[rows].T + attn.in_proj_bias[rows] / share_1  # (T, M, dh)
            pattern = run["probs"][later][0, head]  # (T, T)
            if cls_only:
                pattern = pattern[:1]  # (1, T)
            mixed = torch.einsum("qt,tmd->qmd", pattern, values)  # (Q, M, dh)
            out = mixed @ attn.out_proj.weight[:, head * dh : (head + 1) * dh].T + attn.out_proj.bias / (share_1 * heads)  # (Q, M, W)
            cls = out[0]  # (M, W)
            post = visual.ln_post.weight * (cls - mean_post / share_2) / sigma_post + visual.ln_post.bias / share_2  # (M, W)
            total = total + post @ visual.proj  # (M, D)
    return total * second_order.REFERENCE_COEFFICIENT / run["embedding"].norm()




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32", help="toy, or an open_clip arch run with random weights (no download)")
    parser.add_argument("--layer", type=int, default=None, help="default: the third-to-last layer (L9 of ViT-B-32)")
    parser.add_argument("--images", type=int, default=16, help="images for clipterm (batched)")
    parser.add_argument("--naive-images", type=int, default=1, help="of those, images for each naive baseline (batch 1)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.model == "toy":
        from clipterm.vit.models import load_model

        model = load_model("toy").model
    else:
        import open_clip

        model = open_clip.create_model(args.model).eval()
    model = model.to(args.device)
    visual = model.visual
    layers = len(visual.transformer.resblocks)
    layer = args.layer if args.layer is not None else layers - 3
    size = visual.image_size[0] if isinstance(visual.image_size, tuple) else visual.image_size
    images = torch.randn(args.images, 3, size, size, generator=torch.Generator().manual_seed(0)).to(args.device)

    with torch.no_grad():
        second_order.effects(second_order.trace(model, images[:2], layer).scalars, second_order.path_vectors(model, layer))  # warm-up

        def clipterm_all(convention: str) -> torch.Tensor:
            vectors = second_order.path_vectors(model, layer, convention)  # (M, K, D), once per run
            parts = []
            for i in range(0, args.images, args.batch_size):
                out = second_order.trace(model, images[i : i + args.batch_size], layer, convention)
                parts.append(second_order.effects(out.scalars, vectors, out.constant))  # (B, M, D)
            return torch.cat(parts)  # (N, M, D)

        fast_s, fast = best_time(lambda: clipterm_all("reference"))
        own_s, _ = best_time(lambda: clipterm_all("clipterm"))
        n_naive = min(args.naive_images, args.images)
        naive_s, reference = best_time(lambda: torch.stack([naive(model, images[i : i + 1], layer) for i in range(n_naive)]))
        cls_s, cls_only = best_time(lambda: torch.stack([naive(model, images[i : i + 1], layer, True) for i in range(n_naive)]))
        forward_s, _ = best_time(lambda: [model.encode_image(images[i : i + args.batch_size]) for i in range(0, args.images, args.batch_size)])

    def gap(a: torch.Tensor) -> float:
        return float((a - fast[:n_naive]).norm() / fast[:n_naive].norm())

    per = {"clipterm": fast_s / args.images, "naive": naive_s / n_naive, "naive_cls_only": cls_s / n_naive,
           "forward": forward_s / args.images, "clipterm_own_convention": own_s / args.images}
    ratio, ratio_cls = per["naive"] / per["clipterm"], per["naive_cls_only"] / per["clipterm"]
    print(f"{args.model} L{layer} ({args.threads} thread(s), {args.device}): clipterm {1e3 * per['clipterm']:.2f} ms/image "
          f"({per['clipterm'] / per['forward']:.1f}x a plain forward pass), naive {1e3 * per['naive']:.1f} ms/image, "
          f"naive CLS-only {1e3 * per['naive_cls_only']:.1f} ms/image (all in the reference's convention; clipterm's own "
          f"convention {1e3 * per['clipterm_own_convention']:.2f} ms/image)")
    print(f"ratio {ratio:,.0f}x against the naive baseline ({ratio_cls:,.0f}x against CLS-only); "
          f"max relative gap {max(gap(reference), gap(cls_only)):.1e}; goal >= 100x: {'met' if ratio >= 100 else 'MISSED'}")
    write_result(f"second_order-{args.model}", {
        "model": args.model, "convention": "reference", "layer": layer, "images": args.images, "naive_images": n_naive, "threads": args.threads,
        "device": args.device, "seconds_per_image": per, "ratio": ratio, "ratio_cls_only": ratio_cls,
        "relative_gap": max(gap(reference), gap(cls_only)), "goal_ratio": 100,
    })


if __name__ == "__main__":
    main()
