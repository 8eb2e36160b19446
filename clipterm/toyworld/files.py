"""Write toy scenes to disk as PNG files in class sub-folders, so folder-based commands can be tested on real files."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Callable

from clipterm.errors import ClipTermError
from clipterm.toyworld.world import TASKS, labels, render, scene_at


def render_folder(out_dir: Path, n: int, task: str = "colour", seed: int = 0, on_image: Callable[[int], None] | None = None,
                  world: int = 1) -> dict:
    """Render the first n scenes whose `task` label is defined into `out_dir/<class>/toy-<index>.png`.

    Also writes `labels.jsonl`: one line per file with the scene index, seed, world and every task's label.
    """
    from PIL import Image

    if task not in TASKS:
        raise ClipTermError(f"unknown toy task {task!r}", hint=f"tasks: {', '.join(TASKS)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    counts: Counter[str] = Counter()
    lines = []
    index = 0
    while len(lines) < n:
        scene = scene_at(seed, index, world)
        scene_labels = labels(scene)
        if scene_labels[task] >= 0:
            name = TASKS[task][scene_labels[task]]
            rel = Path(name) / f"toy-{index:06d}.png"
            (out_dir / name).mkdir(exist_ok=True)
            Image.fromarray(render(scene)[0]).save(out_dir / rel)
            counts[name] += 1
            lines.append(json.dumps({"file": rel.as_posix(), "seed": seed, "world": world, "index": index, "labels": scene_labels}))
            if on_image:
                on_image(1)
        index += 1
    (out_dir / "labels.jsonl").write_text("\n".join(lines) + "\n")
    return {"dir": str(out_dir), "images": n, "task": task, "seed": seed, "world": world, "classes": dict(sorted(counts.items()))}
