"""Issue 30's speed figures for SAEs, each against its baseline in the same run:

- **training throughput**, activations per second of `clipterm.sae.train` on activations kept in memory, against
  a plain loop of the same matmuls, top-k, loss, backward and Adam step on one fixed tensor (the floor). Goal >= 0.7x;
- **capture**, images per second of reading the residual after L4 (`capture.tokens_of`, which stops the forward
  there), against the model's plain `encode_image` on the same pixels. Goal >= 0.9x;
- **peak memory** of a streaming training run (nothing kept in memory) at two cache sizes, each in its own
  process (ru_maxrss): it must not grow with N. The sizes are what this machine can build in the time given.
- `--overcomplete`: the same training loop with the `overcomplete` package's TopKSAE, if it imports.

    python -m bench.speed.sae [--images 300,3000] [--threads 1] [--overcomplete]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def plain_loop(x: torch.Tensor, features: int, k: int, steps: int, batch: int) -> float:
    """Activations per second of the bare matmul loop (the floor's throughput)."""
    d = x.shape[1]
    g = torch.Generator().manual_seed(0)
    w_enc = torch.randn(d, features, generator=g).requires_grad_()
    w_dec = torch.randn(features, d, generator=g).requires_grad_()
    b_enc, b_dec = torch.zeros(features, requires_grad=True), torch.zeros(d, requires_grad=True)
    opt = torch.optim.Adam([w_enc, w_dec, b_enc, b_dec], lr=1e-3)
    order = torch.randperm(len(x), generator=g)
    start = time.perf_counter()
    for step in range(steps):
        lo = (step * batch) % (len(x) - batch)
        xb = x[order[lo:lo + batch]]
        pre = (xb - b_dec) @ w_enc + b_enc
        values, idx = pre.relu().topk(k, dim=-1)
        f = torch.zeros_like(pre).scatter(-1, idx, values)
        loss = (f @ w_dec + b_dec - xb).pow(2).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return steps * batch / (time.perf_counter() - start)


def ours_loop(x: torch.Tensor, features: int, k: int, steps: int, batch: int) -> float:
    """Activations per second of clipterm's own loop (`train.fit`: loss, AuxK bookkeeping, unit decoder rows)."""
    from clipterm.sae.model import SAE, Config
    from clipterm.sae.train import Options, fit

    g = torch.Generator().manual_seed(0)
    sae = SAE(Config(x.shape[1], features, "topk", k), g)
    order = torch.randperm(len(x), generator=g)
    batches = (x[order[(s * batch) % (len(x) - batch):][:batch]] for s in range(1, steps + 1))
    start = time.perf_counter()
    fit(sae, x[order[:batch]], batches, Options(layer=4, features=features, k=k, steps=steps, batch_size=batch))
    return steps * batch / (time.perf_counter() - start)


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def overcomplete_loop(x: torch.Tensor, features: int, k: int, steps: int, batch: int) -> float | str:
    try:
        import matplotlib.cm

        if not hasattr(matplotlib.cm, "get_cmap"):  # overcomplete 0.3.0 imports its plots, which call the removed API
            matplotlib.cm.get_cmap = matplotlib.colormaps.get_cmap
        from overcomplete.sae import TopKSAE
    except Exception as exc:  # noqa: BLE001 - not installed, or a dependency missing
        return f"not importable: {type(exc).__name__}: {str(exc)[:100]}"
    sae = TopKSAE(x.shape[1], nb_concepts=features, top_k=k, device="cpu")
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(x), generator=g)
    start = time.perf_counter()
    for step in range(steps):
        lo = (step * batch) % (len(x) - batch)
        xb = x[order[lo:lo + batch]]
        _pre, z, x_hat = sae(xb)
        loss = (x_hat - xb).pow(2).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return steps * batch / (time.perf_counter() - start)


def peak_child(cache: str, steps: int, buffer_rows: int = 1 << 16) -> None:
    """In a child process: a streaming training run; prints its ru_maxrss in MiB."""
    import resource

    from clipterm.cache.reader import open_cache
    from clipterm.sae.train import Options, site_for, train
    from clipterm.vit.models import load_model

    loaded = load_model("toy")
    reader = open_cache(cache)
    base, peak = rss_mib(), [0.0]

    def sample(_step, _figures):
        peak[0] = max(peak[0], rss_mib())

    _, training = train(reader, loaded, site_for(loaded, 4), Options(layer=4, features=1024, k=16, steps=steps,
                                                                    batch_size=2048, keep_bytes=0, buffer_rows=buffer_rows),
                        progress=sample)
    print(json.dumps({"images": reader.n, "rss_before_mib": round(base, 1), "rss_peak_during_training_mib": round(peak[0], 1),
                      "growth_mib": round(peak[0] - base, 1), "buffer_rows": training["buffer_rows"],
                      "ru_maxrss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))


def main() -> None:
    from bench._common import write_result
    from clipterm.cache.build import BuildOptions, build_cache
    from clipterm.cache.reader import open_cache
    from clipterm.sae.capture import image_batches, tokens_of
    from clipterm.sae.train import site_for
    from clipterm.vit.models import load_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", default="300,3000", help="Cache sizes for the peak-memory runs.")
    parser.add_argument("--caches", help="Existing toy caches, comma-separated, instead of building --images.")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--overcomplete", action="store_true")
    parser.add_argument("--peak-child", help=argparse.SUPPRESS)
    parser.add_argument("--buffer-rows", type=int, default=8192, help="The streaming buffer of the peak-memory runs "
                        "(below the smallest cache's activations, so that every size streams).")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.peak_child:
        peak_child(args.peak_child, args.steps, args.buffer_rows)
        return
    loaded = load_model("toy")
    with tempfile.TemporaryDirectory() as tmp:
        caches = args.caches.split(",") if args.caches else []
        for n in ([] if caches else [int(v) for v in args.images.split(",")]):
            build_cache(BuildOptions(images=f"toy:{n}", name=f"c{n}", cache_dir=tmp, workers=0), loaded=loaded)
            caches.append(str(Path(tmp) / f"c{n}"))
        reader = open_cache(caches[0])
        site = site_for(loaded, 4)
        pixels = [p for _, p in image_batches(reader, loaded, list(range(min(reader.n, 512))), 64, "cpu")]
        forward = capture = float("inf")
        with torch.no_grad():
            for p in pixels[:1]:
                loaded.model.encode_image(p)
            for _ in range(3):  # interleaved, best of 3
                t0 = time.perf_counter()
                for p in pixels:
                    loaded.model.encode_image(p)
                forward = min(forward, time.perf_counter() - t0)
                t0 = time.perf_counter()
                acts = torch.cat([tokens_of(loaded.model, site, p).reshape(-1, 128).float() for p in pixels])
                capture = min(capture, time.perf_counter() - t0)
        ours_runs, floor_runs = [], []
        for _ in range(3):  # interleaved, best of 3 each: this machine is shared, its load changes by the minute
            ours_runs.append(ours_loop(acts, 1024, 16, args.steps, 2048))
            floor_runs.append(plain_loop(acts, 1024, 16, args.steps, 2048))
        ours, floor = max(ours_runs), max(floor_runs)
        result = {"threads": torch.get_num_threads(), "training": {"ours_per_s": round(ours, 1), "plain_loop_per_s": round(floor, 1),
                                                                   "ratio": round(ours / floor, 3), "goal": 0.7},
                  "capture": {"images": sum(len(p) for p in pixels), "forward_s": round(forward, 3),
                              "capture_s": round(capture, 3), "ratio": round(forward / capture, 3), "goal": 0.9}}
        if args.overcomplete:
            oc = max(overcomplete_loop(acts, 1024, 16, args.steps, 2048) for _ in range(2))
            result["overcomplete_per_s"] = oc if isinstance(oc, str) else round(oc, 1)
        peaks = []
        for cache in caches:
            out = subprocess.run([sys.executable, "-m", "bench.speed.sae", "--peak-child", cache, "--steps", "60", "--buffer-rows", str(args.buffer_rows),
                                  "--threads", str(args.threads or 0)], capture_output=True, text=True, check=True)
            peaks.append(json.loads(out.stdout.strip().splitlines()[-1]))
        result["peak_memory"] = peaks
    print(json.dumps(result, indent=1))
    print("written:", write_result("sae_speed", result))


if __name__ == "__main__":
    main()
