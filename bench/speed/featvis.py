"""Feature-visualisation speed (issue 17): steps per second against a plain forward + backward, and the TUI's first frame.

- steps/s: `featvis.visualise` on a text target, on the toy (64 px) and on a randomly initialised ViT-B-32
  (224 px), against the same batch through `visual(x)` and `.backward()` to the input alone (no parametrisation,
  no transforms, no objective). Goal: featvis >= 0.7x the baseline.
- first frame: the TUI on a 32-image toy cache, `v` pressed in the Visualise pane right after selecting a head on a
  fresh app (model not loaded, the other panes' workers running), until the pane shows its first frame; and once
  more after the other workers are done. Goal < 2 s.

    python -m bench.speed.featvis [--toy-steps 32] [--vit-steps 4] [--batch 1] [--threads 1] [--models toy ViT-B-32]

Writes bench/results/featvis.json.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import torch

from bench._common import write_result
from bench.speed.cache_build import random_weights
from clipterm.analyses import featvis


def baseline(loaded, batch: int, steps: int) -> float:
    """Steps/s of a plain forward + backward to the input pixels, batch (B, 3, S, S)."""
    visual = loaded.model.visual
    size = loaded.info.image_size
    for parameter in loaded.model.parameters():
        parameter.requires_grad_(False)
    pixels = torch.randn(batch, 3, size, size, requires_grad=True)
    direction = torch.randn(visual.output_dim)
    visual(pixels).matmul(direction).sum().backward()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        pixels.grad = None
        visual(pixels).matmul(direction).sum().backward()
    return steps / (time.perf_counter() - start)


def ours(loaded, target: str, batch: int, steps: int, reader=None) -> float:
    objective = featvis.objective_for(target, loaded, reader)
    list(featvis.visualise(loaded, objective, featvis.Config(steps=1, images=batch)))  # warm-up
    frames = list(featvis.visualise(loaded, objective, featvis.Config(steps=steps, images=batch, every=10**9)))
    return steps / frames[-1].elapsed


def speed(name: str, loaded, target: str, batch: int, steps: int) -> dict:
    base = baseline(loaded, batch, steps)
    mine = ours(loaded, target, batch, steps)
    ratio = mine / base
    print(f"{name:>9} {loaded.info.image_size}px batch {batch}: featvis {mine:6.2f} steps/s, plain forward+backward "
          f"{base:6.2f}/s -> {ratio:.2f}x (goal >= 0.7x)", flush=True)
    return {"size": loaded.info.image_size, "batch": batch, "steps": steps, "featvis_steps_per_s": round(mine, 3),
            "baseline_steps_per_s": round(base, 3), "ratio": round(ratio, 3), "passed": ratio >= 0.7}


def first_frame(root: Path, preloaded, settle: bool) -> float:
    """Seconds from pressing `v` to the first frame in the Visualise pane; `settle`: after the other panes' workers
    are done, else at once after selecting (they run beside it, and the model loads on the way)."""
    from clipterm.cache.reader import open_cache
    from clipterm.tui.app import ClipTermApp

    reader = open_cache(root / "fv")
    app = ClipTermApp(reader, cache_dir=str(root), loaded=preloaded, hints=False)
    shown: list[float] = []

    async def drive() -> None:
        async with app.run_test(size=(120, 40)) as pilot:
            original = app._visual_frame
            app._visual_frame = lambda frame: (shown.append(time.perf_counter()), original(frame))
            app.jump("L5.H3")
            await pilot.pause()
            if settle:
                await app.workers.wait_for_complete()
            app.query_one("#tree").focus()
            app.query_one("TabbedContent").active = "visualise"
            await pilot.pause()
            start = time.perf_counter()
            await pilot.press("v")
            while not shown:
                await pilot.pause(0.01)
            shown[:] = [shown[0] - start]
            await pilot.press("v")
            await app.workers.wait_for_complete()

    asyncio.run(drive())
    return shown[0]


def main() -> None:
    from clipterm.cache.build import BuildOptions, build_cache
    from clipterm.vit.models import load_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--toy-steps", type=int, default=32)
    parser.add_argument("--vit-steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", nargs="+", default=["toy", "ViT-B-32"], choices=["toy", "ViT-B-32"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results: dict = {"threads": args.threads}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        toy = load_model("toy")
        if "toy" in args.models:
            results["toy"] = speed("toy", toy, "text:a red shape", args.batch, args.toy_steps)
        if "ViT-B-32" in args.models:
            vit = random_weights("ViT-B-32", work)
            results["ViT-B-32"] = speed("ViT-B-32", vit, "text:a photo of a dog", args.batch, args.vit_steps)
            del vit
        build_cache(BuildOptions(images="toy:32", name="fv", cache_dir=str(work), workers=0), loaded=toy)
        cold, warm = first_frame(work, None, settle=False), first_frame(work, toy, settle=True)
        print(f"TUI first frame after `v`: {cold:.2f} s pressed at once on a fresh app (the model loads, the other "
              f"panes' workers run beside it), {warm:.2f} s once they are done (goal < 2 s)", flush=True)
        results["tui_first_frame"] = {"cold_s": round(cold, 3), "warm_s": round(warm, 3), "passed": cold < 2}
    write_result("featvis", results)


if __name__ == "__main__":
    main()
