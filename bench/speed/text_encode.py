"""Fast text encoding against open_clip's own `encode_text`, on short texts with the ViT-B-32 text tower.

Both encode the same pool (the built-in `toy` pool's short phrases, repeated up to --n texts) in
batches of the same size; the fast encoder stops each batch after its longest end-of-text token.
Goal: >= 3x, with outputs equal within 1e-5.

    python -m bench.speed.text_encode [--n 2048] [--batch-size 256] [--threads 1] [--device cpu]
"""

from __future__ import annotations

import argparse

import torch

from bench._common import best_time, write_result
from clipterm.inputs.texts import load_pool
from clipterm.vit.textencode import encode_tokens


def main() -> None:
    import open_clip

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32").eval().to(args.device)
    texts = (list(load_pool("toy").texts) * (args.n // len(load_pool("toy")) + 1))[: args.n]
    tokens = open_clip.get_tokenizer("ViT-B-32")(texts)
    lengths = (tokens.argmax(-1) + 1).float()

    @torch.no_grad()
    def plain() -> torch.Tensor:
        return torch.cat([model.encode_text(tokens[i : i + args.batch_size].to(args.device)).float().cpu()
                          for i in range(0, len(tokens), args.batch_size)])

    fast_s, fast = best_time(lambda: encode_tokens(model, tokens, batch_size=args.batch_size), args.repeats)
    plain_s, expected = best_time(plain, args.repeats)
    error = float((fast - expected).abs().max())
    ratio = plain_s / fast_s
    print(f"ViT-B-32 text tower, {len(texts)} texts (mean {lengths.mean():.1f} of {tokens.shape[1]} tokens), "
          f"batch {args.batch_size}, {args.threads} thread(s) on {args.device}: encode_text {len(texts) / plain_s:,.0f} texts/s, "
          f"fast {len(texts) / fast_s:,.0f} texts/s; speed-up {ratio:.2f}x (goal >= 3x: {'met' if ratio >= 3 else 'MISSED'}); "
          f"max abs difference {error:.2e}")
    write_result("text_encode", {
        "n": len(texts), "batch_size": args.batch_size, "threads": args.threads, "device": args.device,
        "mean_tokens": float(lengths.mean()), "context": int(tokens.shape[1]),
        "encode_text_texts_per_s": len(texts) / plain_s, "fast_texts_per_s": len(texts) / fast_s,
        "ratio": ratio, "goal_ratio": 3.0, "max_abs_difference": error,
    })


if __name__ == "__main__":
    main()
