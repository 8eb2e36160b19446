"""Write toy scenes to disk as PNG files in class sub-folders, so folder-based commands can be tested on real files."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Callable

from clipterm.errors import ClipTermError
from clipterm.files import atomic_write, check_replacing, output_folder
from clipterm.toyworld.world import TASKS, labels, render, scene_at


LABELS = "labels.jsonl"


def render_folder(out_dir: Path, n: int, task: str = "colour", seed: int = 0, on_image: Callable[[int], None] | None = None,
                  world: int = 1, force: bool = False) -> dict:
    """Render the first n scenes whose `task` label is defined into `out_dir/<class>/toy-<index>.png`.

    Also writes `labels.jsonl`: one line per file with the scene index, seed, world and every task's label.
    Files already there are replaced only with `force`, and never written through a symlink.
    """
    import io

    from PIL import Image

    if task not in TASKS:
        raise ClipTermError(f"unknown toy task {task!r}", hint=f"tasks: {', '.join(TASKS)}")
    picked = []  # (index, scene, labels, path under out_dir); scenes are cheap, rendering is not
    index = 0
    while len(picked) < n:
        scene = scene_at(seed, index, world)
        scene_labels = labels(scene)
        if scene_labels[task] >= 0:
            picked.append((index, scene, scene_labels, f"{TASKS[task][scene_labels[task]]}/toy-{index:06d}.png"))
        index += 1
    check_replacing(out_dir, [LABELS, *(rel for *_, rel in picked)], force, "folder")
    output_folder(out_dir, "folder")
    counts: Counter[str] = Counter()
    lines = []
    for index, scene, scene_labels, rel in picked:
        name = rel.split("/")[0]
        output_folder(out_dir / name, "class folder")
        png = io.BytesIO()
        Image.fromarray(render(scene)[0]).save(png, format="PNG")
        atomic_write(out_dir / rel, png.getvalue(), durable=False)
        counts[name] += 1
        lines.append(json.dumps({"file": rel, "seed": seed, "world": world, "index": index, "labels": scene_labels}))
        if on_image:
            on_image(1)
    atomic_write(out_dir / LABELS, ("\n".join(lines) + "\n").encode())
    return {"dir": str(out_dir), "images": n, "task": task, "seed": seed, "world": world, "classes": dict(sorted(counts.items()))}
