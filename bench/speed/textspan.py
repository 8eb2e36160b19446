"""TextSpan over every head from sufficient statistics, against the direct per-image reference.

Synthetic effects with the shape of ViT-B-32 (12 layers x 12 heads, head dim 64, D = 512) for
N images, and a pool of M random texts (3,498 by default, the size of the paper's text set).
clipterm's TextSpan runs on every head from (count, sum, outer products, readout); the direct
reference (Algorithm 1 on the per-image (N, D) effects, float32 as the original runs) is timed
on --reference-heads heads and extrapolated to all of them. The chosen texts must be identical.
Goal: >= 100x.

    python -m bench.speed.textspan [--n 10000] [--texts 3498] [--reference-heads 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from bench._common import write_result
from clipterm.analyses.textspan import text_span
from tests.test_textspan import reference_text_span  # one reference implementation, shared with the test

LAYERS, HEADS, HEAD_DIM, D = 12, 12, 64, 512


def synthetic_heads(n: int, m: int, seed: int = 0):
    """Per head: outputs (N, dh) with a decaying spectrum and a mean, and a readout (dh, D); plus M texts."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -2, HEAD_DIM)
    head_out = torch.randn(LAYERS * HEADS, n, HEAD_DIM, generator=g) * scales + torch.randn(LAYERS * HEADS, 1, HEAD_DIM, generator=g)
    readout = torch.randn(LAYERS * HEADS, HEAD_DIM, D, generator=g) / D**0.5
    texts = torch.randn(m, D, generator=g)
    texts[: m // 4] += 2 * torch.randn(m // 4, HEAD_DIM, generator=g) @ readout[0]  # some texts near the first heads
    texts[m // 4 : 2 * (m // 4)] += 2 * torch.randn(m // 4, HEAD_DIM, generator=g) @ readout[1]
    return head_out, readout, texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--texts", type=int, default=3498)
    parser.add_argument("--per-head", type=int, default=10, help="texts chosen per head")
    parser.add_argument("--reference-heads", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    head_out, readout, texts = synthetic_heads(args.n, args.texts)
    # What the cache stores: fp64 count, sum and sum of outer products per head (not timed: built once).
    doubled = head_out.double()
    sums, outers = doubled.sum(1), doubled.transpose(1, 2) @ doubled  # (LH, dh) (LH, dh, dh)

    start = time.perf_counter()
    ours = [text_span(float(args.n), sums[k], outers[k], readout[k], texts, n_texts=args.per_head) for k in range(LAYERS * HEADS)]
    ours_s = time.perf_counter() - start

    reference, reference_s = [], 0.0
    for k in range(args.reference_heads):
        start = time.perf_counter()
        chosen, _, _ = reference_text_span(head_out[k] @ readout[k], texts, args.per_head, rank=HEAD_DIM, dtype=torch.float32)
        reference_s += time.perf_counter() - start
        reference.append(chosen)
    identical = all(ours[k].indices == reference[k] for k in range(args.reference_heads))
    per_head_ref = reference_s / args.reference_heads
    per_head_ours = ours_s / (LAYERS * HEADS)
    ratio = per_head_ref / per_head_ours
    print(f"TextSpan, {LAYERS * HEADS} heads of dim {HEAD_DIM}, N={args.n:,}, {args.texts:,} texts, {args.threads} thread(s): "
          f"clipterm {per_head_ours * 1e3:.1f} ms/head ({ours_s:.2f} s for all heads); reference {per_head_ref:.2f} s/head "
          f"(~{per_head_ref * LAYERS * HEADS / 60:.1f} min for all heads); speed-up {ratio:,.0f}x "
          f"(goal >= 100x: {'met' if ratio >= 100 else 'MISSED'}); identical texts on {args.reference_heads} heads: {identical}")
    write_result("textspan", {
        "n": args.n, "texts": args.texts, "per_head": args.per_head, "heads": LAYERS * HEADS, "head_dim": HEAD_DIM, "d": D,
        "threads": args.threads, "clipterm_s_per_head": per_head_ours, "clipterm_s_all_heads": ours_s,
        "reference_s_per_head": per_head_ref, "reference_heads_timed": args.reference_heads,
        "ratio": ratio, "goal_ratio": 100.0, "identical_texts": identical,
    })
    if not identical:
        sys.exit(1)


if __name__ == "__main__":
    main()
