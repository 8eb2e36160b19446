"""Synthetic-world rendering speed on one core, against the plain cost of allocating and filling the same images.

Goal: at least 1000 images/s on one core.
"""

from __future__ import annotations

import time

import numpy as np
from _common import write_result

from clipterm.toyworld.world import render, scene_at


def main(n: int = 5000) -> None:
    start = time.perf_counter()
    for i in range(n):
        render(scene_at(0, i))
    world_rate = n / (time.perf_counter() - start)
    start = time.perf_counter()
    for i in range(n):
        rng = np.random.default_rng([0, i])
        np.clip(rng.uniform(0, 255, size=(64, 64, 3)), 0, 255).astype(np.uint8)
    floor_rate = n / (time.perf_counter() - start)
    print(f"toy world: {world_rate:,.0f} images/s; noise-image floor: {floor_rate:,.0f} images/s; "
          f"ratio {world_rate / floor_rate:.2f}; goal >= 1000 images/s: {'met' if world_rate >= 1000 else 'MISSED'}")
    write_result("toyworld", {"n": n, "images_per_s": world_rate, "noise_floor_images_per_s": floor_rate,
                              "ratio": world_rate / floor_rate, "goal_images_per_s": 1000})


if __name__ == "__main__":
    main()
