"""Synthetic-world rendering speed on one core, per world version, against the plain cost of allocating and
filling the same images; and how fast world 2's training batches (scenes, near-duplicates, captions) are drawn.

Goal: at least 1000 images/s on one core, in every world.
"""

from __future__ import annotations

import time

import numpy as np

from bench._common import write_result
from clipterm.toyworld.batches import make_focused_batch
from clipterm.toyworld.recipe import RECIPES
from clipterm.toyworld.world import WORLDS, render, scene_at


def rate(fn, n: int) -> float:
    """Calls of fn(i) per second, over i < n."""
    start = time.perf_counter()
    for i in range(n):
        fn(i)
    return n / (time.perf_counter() - start)


def main(n: int = 5000) -> None:
    worlds = {w: rate(lambda i, w=w: render(scene_at(0, i, w)), n) for w in WORLDS}
    floor = rate(lambda i: np.clip(np.random.default_rng([0, i]).uniform(0, 255, size=(64, 64, 3)), 0, 255).astype(np.uint8), n)
    rng = np.random.default_rng(0)
    batches = 128 * rate(lambda i: make_focused_batch(rng, 128, RECIPES[2], step=1000), max(n // 128, 1))
    for w, r in worlds.items():
        print(f"toy world {w}: {r:,.0f} images/s; ratio to the noise-image floor {r / floor:.2f}; "
              f"goal >= 1000 images/s: {'met' if r >= 1000 else 'MISSED'}")
    print(f"noise-image floor: {floor:,.0f} images/s; world 2 training batches: {batches:,.0f} captioned images/s")
    write_result("toyworld", {"n": n, "images_per_s": worlds[1], "noise_floor_images_per_s": floor, "ratio": worlds[1] / floor,
                              "worlds": {str(w): {"images_per_s": r, "ratio": r / floor} for w, r in worlds.items()},
                              "world2_batch_images_per_s": batches, "goal_images_per_s": 1000})


if __name__ == "__main__":
    main()
