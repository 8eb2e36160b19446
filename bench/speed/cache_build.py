"""Benchmark the cache build against plain `encode_image` and a reference-style baseline, in one run.

For each model (ViT-B-32, RN50 and ViT-B-16-SigLIP with random weights at 224 px, the toy and toy-rn) it
measures, on the same preloaded pixel tensors:

- plain `model.encode_image` images/s (the ceiling; plain and clipterm are timed in interleaved
  repeats and the best of each counts, so a busy machine does not favour either);
- clipterm's per-batch work (decompose, cast to fp16, fp64 stats) images/s: goal >= 0.8 of plain;
- a reference-style baseline in the manner of clip_text_span's compute_prs.py: batch 2, every
  head's output for every query and source token materialised ([B, N, N, H, width]) before the
  CLS row is reduced, fp32 `.npy` of [N, L, H, D] plus MLPs: goal clipterm >= 10x faster (open_clip class-token
  ViTs only: the reference has no ResNet or MAP-head path, so RN50 and SigLIP report plain vs clipterm and end to
  end; SigLIP's split runs every block component through its MAP head with the pool attention frozen);

and end to end, `build_cache` from PNG files on disk (the renders, at the input size), and from
photo-sized JPEGs (500x375, as ImageNet's, over twice the input size) with the default faithful
decode and with `--fast-decode` (reduced-scale JPEG draft), with the largest relative gap between
the two builds' image_embeds. It also reports the bytes per image of the
default fp16 cache (shard bytes per row; readout and stats are a fixed cost) against the baseline's
`.npy` bytes per image: goal <= 1/8. Figures print as a table and go to bench/results/*.json.

    python -m bench.speed.cache_build --n 64 --n-baseline 8            # both models
    python -m bench.speed.cache_build --models toy --n 512
    python -m bench.speed.cache_build --models RN50 --n 16 --repeat 2 --batch-size 8
    python -m bench.speed.cache_build --models RN50 toy-rn --n 32 --batch-size 16     # the ResNet path
    python -m bench.speed.cache_build --models ViT-B-16-SigLIP --n 16 --repeat 2 --batch-size 8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench._common import RESULTS


def images_per_s(step, batches: list[torch.Tensor], warmup: int = 1) -> float:
    """Run `step` on every batch after `warmup` untimed ones; images per second."""
    for batch in batches[:warmup]:
        step(batch)
    start = time.perf_counter()
    for batch in batches:
        step(batch)
    return sum(len(b) for b in batches) / (time.perf_counter() - start)


# --------------------------------------------------------------------------- the reference-style baseline


@torch.no_grad()
def reference_prs(model, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-head direct effects the way compute_prs.py gets them: materialise every head's output for every
    (query, source) pair, keep the CLS query, then linearise ln_post. Returns ([B, L, H, D], [B, L+1, D]) fp32."""
    visual = model.visual
    x = visual._embeds(images)  # (B, N, W)
    per_layer, mlps = [], [x[:, 0]]
    for block in visual.transformer.resblocks:
        attn = block.attn
        heads, width = attn.num_heads, attn.embed_dim
        dh = width // heads
        normed = block.ln_1(x)
        q, k, v = (normed @ attn.in_proj_weight.T + attn.in_proj_bias).split(width, dim=-1)  # (B, N, W) each
        q, k, v = (t.unflatten(-1, (heads, dh)).transpose(1, 2) for t in (q, k, v))  # (B, H, N, dh)
        weights = torch.softmax(q @ k.transpose(-1, -2) / dh**0.5, dim=-1)  # (B, H, N, N)
        w_o = attn.out_proj.weight.T.unflatten(0, (heads, dh))  # (H, dh, W)
        everything = torch.einsum("bhqk,bhkd,hdw->bqkhw", weights, v, w_o)  # (B, N, N, H, W): the reference's big tensor
        per_layer.append(everything[:, 0].clone())  # (B, N, H, W) the CLS query row
        x = x + everything.sum(dim=(2, 3)) + attn.out_proj.bias
        mlp = block.mlp(block.ln_2(x))  # (B, N, W)
        mlps.append(mlp[:, 0])
        x = x + mlp
    ln = visual.ln_post
    sigma = (x[:, 0].var(-1, unbiased=False) + ln.eps).sqrt()  # (B,)

    def joint(component: torch.Tensor) -> torch.Tensor:  # (..., W) -> (..., D)
        centred = component - component.mean(-1, keepdim=True)
        return (centred / sigma.view(-1, *[1] * (component.dim() - 2), 1) * ln.weight) @ visual.proj

    heads_out = torch.stack([joint(layer).sum(1) for layer in per_layer], 1)  # (B, L, H, D) summed over source tokens
    mlp_out = torch.stack([joint(m) for m in mlps], 1)  # (B, L+1, D)
    return heads_out.float().numpy(), mlp_out.float().numpy()


def run_reference(model, pixels: torch.Tensor, out_dir: Path) -> tuple[float, int]:
    """Batch 2 over `pixels`, then two fp32 .npy files; returns (images/s, bytes per image)."""
    start = time.perf_counter()
    heads, mlps = [], []
    for i in range(0, len(pixels), 2):
        h, m = reference_prs(model, pixels[i : i + 2])
        heads.append(h)
        mlps.append(m)
    np.save(out_dir / "attentions.npy", np.concatenate(heads))
    np.save(out_dir / "mlps.npy", np.concatenate(mlps))
    seconds = time.perf_counter() - start
    size = (out_dir / "attentions.npy").stat().st_size + (out_dir / "mlps.npy").stat().st_size
    return len(pixels) / seconds, size // len(pixels)


# --------------------------------------------------------------------------- one model


def random_weights(arch: str, folder: Path):
    """An open_clip arch (ViT-B-32, RN50, ViT-B-16-SigLIP) with seeded random weights, loaded through clipterm like any
    local weights file (a SigLIP's Hugging Face tokenizer is not needed: nothing here encodes text)."""
    import open_clip
    from safetensors.torch import save_file

    from clipterm.vit.models import load_model

    torch.manual_seed(0)
    model = open_clip.create_model(arch, pretrained=None)
    path = folder / f"{arch.lower()}-random.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return load_model(arch, pretrained=str(path))


def bench_model(name: str, n: int, n_baseline: int, batch_size: int, repeat: int, work: Path) -> dict:
    from PIL import Image

    from clipterm.cache.build import BuildOptions, build_cache, decompose_batch
    from clipterm.cache.reader import CacheReader
    from clipterm.toyworld import world
    from clipterm.vit.models import load_model

    loaded = load_model(name) if name in ("toy", "toy-rn") else random_weights(name, work)
    model = loaded.model.eval()
    renders = [Image.fromarray(world.render(world.scene_at(0, i))[0]) for i in range(n)]
    pixels = torch.stack([loaded.preprocess(image) for image in renders])  # (n, 3, S, S) preloaded once
    batches = list(pixels.split(batch_size))
    options = BuildOptions(images="-", dtype="float16")

    plain = ours = 0.0
    for _ in range(repeat):  # interleaved, best of each: a busy machine slows one side or the other, not both
        with torch.no_grad():
            plain = max(plain, images_per_s(lambda b: model.encode_image(b), batches))
        ours = max(ours, images_per_s(lambda b: decompose_batch(model, b, "cpu", options, []), batches))
    vit = loaded.info.tower == "vit" and loaded.info.pool == "tok" and hasattr(model.visual, "transformer")
    reference, reference_bytes = run_reference(model, pixels[: max(2, n_baseline)], work) if vit else (None, None)

    folder = work / f"png-{name}"  # end to end: PNG files on disk -> decode -> preprocess -> decompose -> shards
    for i, image in enumerate(renders):
        (folder / world.TASKS["colour"][i % 8]).mkdir(parents=True, exist_ok=True)
        image.save(folder / world.TASKS["colour"][i % 8] / f"{i:05d}.png")
    result = build_cache(BuildOptions(images=str(folder), name=f"bench-{name}", cache_dir=str(work / "caches"),
                                      batch_size=batch_size, force=True), loaded=loaded)
    cache = Path(result.path)
    shard_bytes = sum(p.stat().st_size for p in cache.glob("shard-*.safetensors"))
    fixed_bytes = sum(p.stat().st_size for p in cache.iterdir() if p.is_file() and not p.name.startswith("shard-"))
    per_image = shard_bytes / result.images
    jpegs = work / f"jpeg-{name}"  # photo-sized JPEGs: where --fast-decode's draft applies
    rng = np.random.default_rng(0)
    for i, image in enumerate(renders):
        (jpegs / world.TASKS["colour"][i % 8]).mkdir(parents=True, exist_ok=True)
        big = np.asarray(image.resize((500, 375), Image.BICUBIC), dtype=np.float64) + rng.normal(0, 8, (375, 500, 3))
        Image.fromarray(np.clip(big, 0, 255).astype(np.uint8)).save(jpegs / world.TASKS["colour"][i % 8] / f"{i:05d}.jpg", quality=90)
    decoded = {}
    for fast in (False, True):
        built = build_cache(BuildOptions(images=str(jpegs), name=f"bench-{name}-jpeg-{fast}", cache_dir=str(work / "caches"),
                                         batch_size=batch_size, force=True, fast_decode=fast), loaded=loaded)
        decoded[fast] = (built.images_per_s, CacheReader(Path(built.path)).image_embeds())
    gap = ((decoded[True][1] - decoded[False][1]).norm(dim=-1) / decoded[False][1].norm(dim=-1)).max()
    return {
        "model": name, "n": n, "n_baseline": max(2, n_baseline), "batch_size": batch_size, "repeat": repeat,
        "plain_encode_image_per_s": round(plain, 2),
        "clipterm_per_s": round(ours, 2),
        "clipterm_end_to_end_files_per_s": round(result.images_per_s, 2),
        "reference_per_s": round(reference, 3) if reference else None,
        "ratio_clipterm_vs_plain": round(ours / plain, 3),
        "ratio_end_to_end_vs_plain": round(result.images_per_s / plain, 3),
        "end_to_end_jpeg_500x375_per_s": round(decoded[False][0], 2),
        "end_to_end_jpeg_500x375_fast_decode_per_s": round(decoded[True][0], 2),
        "ratio_fast_decode_vs_default": round(decoded[True][0] / decoded[False][0], 3),
        "fast_decode_max_relative_gap": round(float(gap), 5),
        "speedup_vs_reference": round(ours / reference, 1) if reference else None,
        "cache_bytes_per_image": round(per_image),
        "cache_fixed_bytes": fixed_bytes,
        "reference_bytes_per_image": reference_bytes,
        "size_ratio_vs_reference": round(per_image / reference_bytes, 4) if reference_bytes else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["ViT-B-32", "toy"], choices=["ViT-B-32", "RN50", "ViT-B-16-SigLIP", "toy", "toy-rn"])
    parser.add_argument("--n", type=int, default=64, help="images for plain, clipterm and end-to-end figures")
    parser.add_argument("--n-baseline", type=int, default=8, help="images for the (slow) reference-style baseline")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3, help="interleaved repeats of plain and clipterm; the best of each counts")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="clipterm-bench-") as tmp:
        os.environ["CLIPTERM_CACHE"] = str(Path(tmp) / "caches")  # the weights-hash memo lands here too, not in ./cache
        for name in args.models:
            rows.append(bench_model(name, args.n, args.n_baseline, args.batch_size, args.repeat, Path(tmp)))
            r = rows[-1]
            if r["reference_per_s"] is None:
                print(f"{name}: plain {r['plain_encode_image_per_s']} img/s | clipterm {r['clipterm_per_s']} img/s "
                      f"({r['ratio_clipterm_vs_plain']}x plain, goal >= 0.8) | end-to-end from files "
                      f"{r['clipterm_end_to_end_files_per_s']} img/s ({r['ratio_end_to_end_vs_plain']}x plain) | "
                      f"bytes/image {r['cache_bytes_per_image']:,} (+{r['cache_fixed_bytes']:,} fixed)", flush=True)
                continue
            print(f"{name}: plain {r['plain_encode_image_per_s']} img/s | clipterm {r['clipterm_per_s']} img/s "
                  f"({r['ratio_clipterm_vs_plain']}x plain, goal >= 0.8) | end-to-end from files {r['clipterm_end_to_end_files_per_s']} img/s "
                  f"({r['ratio_end_to_end_vs_plain']}x plain) | end-to-end from 500x375 JPEGs {r['end_to_end_jpeg_500x375_per_s']} img/s, "
                  f"--fast-decode {r['end_to_end_jpeg_500x375_fast_decode_per_s']} img/s ({r['ratio_fast_decode_vs_default']}x, "
                  f"image_embeds within {r['fast_decode_max_relative_gap']:.2%}) | reference {r['reference_per_s']} img/s "
                  f"(clipterm {r['speedup_vs_reference']}x faster, goal >= 10) | bytes/image {r['cache_bytes_per_image']:,} "
                  f"vs {r['reference_bytes_per_image']:,} ({r['size_ratio_vs_reference']}, goal <= 0.125; "
                  f"+{r['cache_fixed_bytes']:,} fixed)", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = RESULTS / f"cache_build-{stamp}.json"
    meta = {"bench": "cache_build", "when": stamp, "device": "cpu", "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": sys.version.split()[0], "platform": platform.platform()}
    out.write_text(json.dumps({**meta, "results": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
