"""Sparse text decomposition: clipterm's batched torch OMP against scikit-learn on the same inputs.

scikit-learn is run the two ways it offers: `SparseCoder(transform_algorithm="omp")`, which the
reference implementation uses and which precomputes the pool's (P, P) Gram matrix, and
`orthogonal_mp(precompute=False)`, one target at a time. All three must choose the same texts.
Goal: clearly faster than the faster scikit-learn call (>= 3x), or clipterm should use scikit-learn.

    python -m bench.speed.sparse_omp [--targets 512] [--texts 5000] [--dim 512] [--k 32] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch

from bench._common import write_result
from clipterm.analyses.sparse import omp, text_dictionary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=int, default=512, help="neurons (unit directions) to decompose")
    parser.add_argument("--texts", type=int, default=5000, help="pool size")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from sklearn.decomposition import SparseCoder
    from sklearn.linear_model import orthogonal_mp

    generator = torch.Generator().manual_seed(0)
    # Texts cluster around a common direction, as CLIP text embeddings do; centring removes it.
    texts = torch.randn(args.texts, args.dim, generator=generator) + 3 * torch.randn(1, args.dim, generator=generator)
    dictionary = text_dictionary(texts)  # (P, D)
    targets = torch.nn.functional.normalize(torch.randn(args.targets, args.dim, generator=generator), dim=-1)  # (M, D)

    start = time.perf_counter()
    code = omp(targets, dictionary, args.k)
    torch_s = time.perf_counter() - start

    start = time.perf_counter()
    coder = SparseCoder(dictionary.double().numpy(), transform_algorithm="omp", transform_n_nonzero_coefs=args.k)
    coded = coder.transform(targets.double().numpy())  # (M, P)
    coder_s = time.perf_counter() - start

    start = time.perf_counter()
    plain = orthogonal_mp(dictionary.double().T.numpy(), targets.double().T.numpy(), n_nonzero_coefs=args.k, precompute=False)  # (P, M)
    plain_s = time.perf_counter() - start

    agree = sum(set(code.indices[m].tolist()) == set(coded[m].nonzero()[0].tolist()) == set(plain[:, m].nonzero()[0].tolist())
                for m in range(args.targets)) / args.targets
    best_sklearn = min(coder_s, plain_s)
    ratio = best_sklearn / torch_s
    print(f"OMP of {args.targets} targets over {args.texts} texts (dim {args.dim}, k {args.k}, {args.threads} thread(s)): "
          f"clipterm {torch_s:.2f} s, SparseCoder {coder_s:.2f} s, orthogonal_mp {plain_s:.2f} s")
    print(f"ratio {ratio:.1f}x against the faster scikit-learn call; same texts chosen for {100 * agree:.1f}% of targets; "
          f"goal >= 3x: {'met' if ratio >= 3 else 'MISSED'}")
    write_result("sparse_omp", {"targets": args.targets, "texts": args.texts, "dim": args.dim, "k": args.k,
                                "threads": args.threads, "seconds": {"clipterm": torch_s, "sparse_coder": coder_s,
                                                                     "orthogonal_mp": plain_s},
                                "ratio": ratio, "same_texts": agree, "goal_ratio": 3})


if __name__ == "__main__":
    main()
