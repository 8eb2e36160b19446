"""Training batches: scenes in groups of near-duplicates (hard negatives), each with a caption.

A batch is made of groups of scenes that differ in a single attribute, so that shape,
position and the written word have to be read, not guessed from colour alone. World 1
draws each near-duplicate's changed attribute independently; world 2 varies one
attribute per group, chosen by the recipe's weights, and captions always name it.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from clipterm.toyworld.captions import caption, focused_caption
from clipterm.toyworld.recipe import Recipe
from clipterm.toyworld.world import (
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    WORDS,
    Scene,
    render,
    sample_scene,
    sample_scene_v2,
)


def variant(scene: Scene, rng: np.random.Generator) -> Scene:
    """The same scene with exactly one attribute of its first object (or the scene) changed (world 1)."""
    first = scene.objects[0]
    options = {
        "colour": [c for c in COLOURS if c != first.colour],
        "shape": [s for s in SHAPES if s != first.shape],
        "size": [s for s in SIZES if s != first.size],
        "position": [p for p in POSITIONS if p not in {o.position for o in scene.objects} | {scene.word_position}],
        "background": [b for b in BACKGROUNDS if b != scene.background],
    }
    if scene.word is not None:
        options["word"] = [w for w in WORDS if w != scene.word]
    attr = str(rng.choice([k for k, v in options.items() if v]))
    value = str(rng.choice(options[attr]))
    return with_attribute(scene, attr, value)


def with_attribute(scene: Scene, attr: str, value: str) -> Scene:
    """`scene` with one attribute set: a scene-level one (background, word, ink) or its first object's."""
    if attr in ("background", "word", "ink"):
        return replace(scene, **{attr: value})
    return replace(scene, objects=(replace(scene.objects[0], **{attr: value}), *scene.objects[1:]))


def alternatives(scene: Scene, attr: str) -> list[str]:
    """Values `attr` can take in a near-duplicate of `scene`: any but its own, and free positions only."""
    first = scene.objects[0]
    if attr == "position":
        return [p for p in POSITIONS if p not in {o.position for o in scene.objects} | {scene.word_position}]
    if attr in ("word", "ink"):
        own, values = getattr(scene, attr), WORDS if attr == "word" else tuple(COLOURS)
        return [v for v in values if v != own] if own is not None else []
    own = scene.background if attr == "background" else getattr(first, attr)
    values = {"colour": tuple(COLOURS), "shape": SHAPES, "size": SIZES, "background": BACKGROUNDS}[attr]
    return [v for v in values if v != own]


def make_batch(rng: np.random.Generator, batch_size: int, group: int = 4) -> tuple[np.ndarray, list[str]]:
    """World 1: images (B, 64, 64, 3) uint8 and one caption each, in groups of `group` near-duplicates."""
    scenes: list[Scene] = []
    while len(scenes) < batch_size:
        base = sample_scene(rng)
        scenes.append(base)
        scenes.extend(variant(base, rng) for _ in range(group - 1))
    scenes = scenes[:batch_size]
    images = np.stack([render(s)[0] for s in scenes])
    return images, [caption(s, rng) for s in scenes]


def make_focused_batch(rng: np.random.Generator, batch_size: int, recipe: Recipe, step: int) -> tuple[np.ndarray, list[str]]:
    """World 2: images (B, 64, 64, 3) uint8 and captions, in groups that each vary one attribute."""
    scenes, captions = focused_scenes(rng, batch_size, recipe, step)
    return np.stack([render(s)[0] for s in scenes]), captions


def focused_scenes(rng: np.random.Generator, batch_size: int, recipe: Recipe, step: int) -> tuple[list[Scene], list[str]]:
    """The scenes of a world-2 batch and their captions (`make_focused_batch` without the drawing)."""
    attrs, odds = recipe.attribute_odds()
    p_two = 0.0 if step < recipe.single_object_steps else 0.25
    scenes, captions = [], []
    while len(scenes) < batch_size:
        attr = attrs[int(rng.choice(len(attrs), p=odds))]
        base = sample_scene_v2(rng, p_two=p_two, p_word=1.0 if attr in ("word", "ink") else 0.5)
        options = alternatives(base, attr)
        picked = rng.choice(options, size=min(recipe.group - 1, len(options)), replace=False) if options else []
        for scene in [base, *(with_attribute(base, attr, str(v)) for v in picked)]:
            scenes.append(scene)
            captions.append(focused_caption(scene, rng, attr, recipe.dropout, recipe.p_single, recipe.p_ink))
    return scenes[:batch_size], captions[:batch_size]


def world_batch(seed: int, step: int, batch_size: int, recipe: Recipe) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Training batch `step` of a world-2 run with this seed: images (B, 64, 64, 3) uint8, captions, and labels
    (B, n_tasks) int64 (-1 where undefined). It depends only on (seed, step), so any process can draw any step."""
    from clipterm.toyworld.world import TASKS, labels

    scenes, captions = focused_scenes(np.random.default_rng([seed, step]), batch_size, recipe, step)
    truth = np.array([[labels(s)[t] for t in TASKS] for s in scenes], dtype=np.int64)
    return np.stack([render(s)[0] for s in scenes]), captions, truth


def batch_stream(seed: int, first: int, steps: int, batch_size: int, recipe: Recipe, workers: int = 0):
    """`world_batch` for steps first .. first+steps-1, in order, drawn by `workers` processes (0: this one)."""
    if workers <= 0:
        for step in range(first, first + steps):
            yield world_batch(seed, step, batch_size, recipe)
        return
    import torch.utils.data as tud

    class Steps(tud.IterableDataset):
        def __iter__(self):  # worker w draws steps w, w+W, ...; the loader takes them round-robin, so in order
            info = tud.get_worker_info()
            for step in range(first + info.id, first + steps, info.num_workers):
                yield world_batch(seed, step, batch_size, recipe)

    yield from tud.DataLoader(Steps(), batch_size=None, num_workers=workers, prefetch_factor=4, persistent_workers=False)
