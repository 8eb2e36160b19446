"""The synthetic world: seeded 64x64 scenes with known attributes, labels and masks.

Image ``i`` of seed ``s`` depends only on ``(s, i)``, so any subset can be
re-rendered exactly, in any order, by any process. Rendering is plain numpy:
shape masks are precomputed once, and a scene is a few array writes.

The world is versioned, so that a model is always evaluated on the world it was
trained on. World 1 is what the shipped toy CLIP was trained on, and stays
bit-for-bit as it was. World 2 keeps the same tasks and classes but makes them
learnable by a small ViT with 8-pixel patches: larger objects (radius 7 and 12)
at exact positions (no jitter), and a legible written word (glyphs twice as tall
and two pixels thick, on a dark label in a band of its own at the top or bottom,
under the objects). Its ink colour is independent of the word, and half of the
scenes have one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

IMAGE_SIZE = 64
WORLDS = (1, 2)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 225, 40),
    "green": (40, 180, 50),
    "cyan": (40, 210, 220),
    "blue": (35, 60, 225),
    "purple": (140, 50, 190),
    "pink": (250, 130, 190),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross", "ring", "heart")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "centre")
BACKGROUNDS = ("dark", "light", "striped", "noisy")
ANIMALS = ("cat", "dog", "bird", "fish", "horse", "cow", "frog", "bear")
WORDS = tuple(COLOURS) + ANIMALS

# Every task and its class names, in label order.
TASKS: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "size": SIZES,
    "position": POSITIONS,
    "background": BACKGROUNDS,
    "word": WORDS,
}

_CENTRES = {"left": (32, 15), "right": (32, 49), "top": (15, 32), "bottom": (49, 32), "centre": (32, 32)}
_RADIUS = {"small": 6, "large": 11}
_RADIUS_V2 = {"small": 7, "large": 12}
_BG_LEVEL = {"dark": 25, "light": 225}


@dataclass(frozen=True)
class Obj:
    colour: str
    shape: str
    size: str
    position: str
    jitter: tuple[int, int] = (0, 0)


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: str
    word: str | None = None
    ink: str | None = None  # colour the word is written in (may differ from the word)
    word_position: str | None = None
    noise_seed: int = 0
    tint: tuple[int, int, int] = field(default=(0, 0, 0))
    world: int = 1  # the world version whose drawing rules `render` follows
    word_shift: int = 0  # horizontal offset of a world-2 word, in pixels (the world draws 0)


def _shape_mask(shape: str, radius: int) -> np.ndarray:
    """A boolean (2r+1, 2r+1) stencil of one shape, centred."""
    r = radius
    y, x = np.mgrid[-r : r + 1, -r : r + 1].astype(np.float32)
    d = np.hypot(x, y)
    if shape == "circle":
        return d <= r
    if shape == "square":
        return (abs(x) <= r * 0.8) & (abs(y) <= r * 0.8)
    if shape == "triangle":
        return (y <= r * 0.8) & (y >= -r) & (abs(x) <= (y + r) * 0.55)
    if shape == "diamond":
        return abs(x) + abs(y) <= r
    if shape == "star":
        angle = np.arctan2(y, x)
        return d <= r * (0.55 + 0.45 * np.cos(5 * angle + np.pi / 2)) + 0.5
    if shape == "cross":
        return ((abs(x) <= r * 0.3) | (abs(y) <= r * 0.3)) & (abs(x) <= r) & (abs(y) <= r)
    if shape == "ring":
        return (d <= r) & (d >= r * 0.55)
    if shape == "heart":
        u, v = x / r * 1.25, -y / r * 1.25 + 0.25
        return (u**2 + v**2 - 1) ** 3 - u**2 * v**3 <= 0
    raise ValueError(f"unknown shape {shape!r}")


@lru_cache(maxsize=None)
def stencil(shape: str, size: str, world: int = 1) -> np.ndarray:
    return _shape_mask(shape, (_RADIUS if world == 1 else _RADIUS_V2)[size])


@lru_cache(maxsize=None)
def word_stencil(word: str) -> np.ndarray:
    """A boolean mask of the word in PIL's built-in bitmap font."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default_imagefont() if hasattr(ImageFont, "load_default_imagefont") else ImageFont.load_default()
    canvas = Image.new("L", (64, 16))
    ImageDraw.Draw(canvas).text((0, 0), word, fill=255, font=font)
    mask = np.asarray(canvas) > 127
    rows, cols = np.nonzero(mask)
    return mask[rows.min() : rows.max() + 1, : cols.max() + 1]


@lru_cache(maxsize=None)
def tall_word_stencil(word: str) -> np.ndarray:
    """World 2's glyphs: the bitmap font stretched to twice its height (about 14-18 px, two patch rows), and
    its one-pixel strokes thickened to two."""
    tall = np.kron(word_stencil(word), np.ones((2, 1), dtype=bool))
    bold = np.zeros((tall.shape[0], tall.shape[1] + 1), dtype=bool)
    bold[:, :-1] |= tall
    bold[:, 1:] |= tall
    return bold


def _paste(canvas: np.ndarray, mask: np.ndarray, top: int, left: int) -> np.ndarray:
    """Boolean image-sized mask of `mask` placed at (top, left), clipped at the borders."""
    full = np.zeros(canvas.shape[:2], dtype=bool)
    h, w = mask.shape
    t0, l0 = max(top, 0), max(left, 0)
    t1, l1 = min(top + h, IMAGE_SIZE), min(left + w, IMAGE_SIZE)
    if t1 > t0 and l1 > l0:
        full[t0:t1, l0:l1] = mask[t0 - top : t1 - top, l0 - left : l1 - left]
    return full


def render(scene: Scene) -> tuple[np.ndarray, list[np.ndarray]]:
    """Draw a scene. Returns the (64, 64, 3) uint8 image and one boolean mask per object."""
    rng = np.random.default_rng(scene.noise_seed)
    img = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32)
    if scene.background in _BG_LEVEL:
        img[:] = _BG_LEVEL[scene.background] + np.array(scene.tint, dtype=np.float32)
    elif scene.background == "striped":
        stripes = (np.arange(IMAGE_SIZE) // 4) % 2
        img[:] = np.where(stripes[:, None, None] == 1, 190.0, 70.0)
    else:  # noisy
        img[:] = rng.uniform(40, 200, size=(IMAGE_SIZE, IMAGE_SIZE, 1))
    if scene.world >= 2 and scene.word is not None:
        _draw_word(img, scene)  # under the objects, so that their masks stay exact
    masks = []
    for obj in scene.objects:
        st = stencil(obj.shape, obj.size, scene.world)
        cy, cx = _CENTRES[obj.position]
        top = cy + obj.jitter[0] - st.shape[0] // 2
        left = cx + obj.jitter[1] - st.shape[1] // 2
        mask = _paste(img, st, top, left)
        img[mask] = COLOURS[obj.colour]
        masks.append(mask)
    if scene.world == 1 and scene.word is not None:
        st = word_stencil(scene.word)
        cy, cx = _CENTRES[scene.word_position or "top"]
        mask = _paste(img, st, cy - st.shape[0] // 2, cx - st.shape[1] // 2)
        img[mask] = COLOURS[scene.ink or "red"]
    return np.clip(img, 0, 255).astype(np.uint8), masks


# World 2 writes words in a band of their own: centred at row 11 (top) or 53 (bottom), on a dark label.
_WORD_ROWS = {"top": 11, "bottom": 53}
_LABEL_LEVEL, _LABEL_MARGIN = 12, 2


def _draw_word(img: np.ndarray, scene: Scene) -> None:
    """Write the word of a world-2 scene in its band, horizontally centred with its jitter, inside the frame, on
    a dark label a little larger than the word (so that striped and noisy backgrounds never break its strokes)."""
    st = tall_word_stencil(scene.word)
    top = _WORD_ROWS[scene.word_position] - st.shape[0] // 2
    left = min(max(IMAGE_SIZE // 2 + scene.word_shift - st.shape[1] // 2, 0), IMAGE_SIZE - st.shape[1])
    m = _LABEL_MARGIN
    img[max(top - m, 0) : top + st.shape[0] + m, max(left - m, 0) : left + st.shape[1] + m] = _LABEL_LEVEL
    img[_paste(img, st, top, left)] = COLOURS[scene.ink]


def _draw_objects(rng: np.random.Generator, positions: list[str], jitter: int = 2) -> tuple[Obj, ...]:
    """One object at each of `positions`, its colour, shape, size and jitter (up to `jitter` px; 0: none drawn)
    drawn in that order (the world's seed stream depends on the order)."""
    return tuple(
        Obj(
            colour=str(rng.choice(list(COLOURS))),
            shape=str(rng.choice(SHAPES)),
            size=str(rng.choice(SIZES)),
            position=position,
            jitter=(int(rng.integers(-jitter, jitter + 1)), int(rng.integers(-jitter, jitter + 1))) if jitter else (0, 0),
        )
        for position in positions
    )


def sample_scene(rng: np.random.Generator, p_two: float = 0.3, p_word: float = 0.3) -> Scene:
    """Draw a random scene: 1-2 objects at distinct positions, a background, maybe a word."""
    n_obj = 2 if rng.random() < p_two else 1
    positions = rng.permutation(len(POSITIONS))
    objects = _draw_objects(rng, [POSITIONS[k] for k in positions[:n_obj]])
    word = ink = word_pos = None
    if rng.random() < p_word:
        word = str(rng.choice(WORDS))
        ink = word if (word in COLOURS and rng.random() < 0.3) else str(rng.choice(list(COLOURS)))
        word_pos = POSITIONS[positions[n_obj]]
    tint = tuple(int(t) for t in rng.integers(-12, 13, size=3))
    return Scene(objects, str(rng.choice(BACKGROUNDS)), word, ink, word_pos, int(rng.integers(2**31)), tint)


def sample_scene_v2(rng: np.random.Generator, p_two: float = 0.25, p_word: float = 0.5, p_ink_on_object: float = 0.3) -> Scene:
    """Draw a world-2 scene: 1-2 objects at distinct positions, a background, and in half the scenes a word.

    A word goes in the top or bottom band, and no object shares that position. Its ink is any colour,
    independent of the word, and in `p_ink_on_object` of scenes the first object's colour: the word "red"
    in blue ink on a blue object can only be told apart from "blue" by reading it.
    """
    word = ink = word_pos = None
    free = list(POSITIONS)
    if rng.random() < p_word:
        word = str(rng.choice(WORDS))
        word_pos = str(rng.choice(list(_WORD_ROWS)))
        free.remove(word_pos)
    n_obj = 2 if rng.random() < p_two else 1
    order = rng.permutation(len(free))
    objects = _draw_objects(rng, [free[k] for k in order[:n_obj]], jitter=0)
    if word is not None:
        ink = objects[0].colour if rng.random() < p_ink_on_object else str(rng.choice(list(COLOURS)))
    tint = tuple(int(t) for t in rng.integers(-12, 13, size=3))
    return Scene(objects, str(rng.choice(BACKGROUNDS)), word, ink, word_pos, int(rng.integers(2**31)), tint, world=2)


def check_world(world: int) -> None:
    """ValueError for a world version that does not exist."""
    if world not in WORLDS:
        raise ValueError(f"unknown toy world {world!r}; worlds: {WORLDS}")


def scene_at(seed: int, index: int, world: int = 1) -> Scene:
    """The `index`-th scene of the world with this seed (and version)."""
    check_world(world)
    rng = np.random.default_rng([seed, index])
    return sample_scene(rng) if world == 1 else sample_scene_v2(rng)


def labels(scene: Scene) -> dict[str, int]:
    """One label per task; -1 where the task is ambiguous (two objects that differ) or absent."""
    out = {}
    for task in ("colour", "shape", "size", "position"):
        values = {getattr(o, task) for o in scene.objects}
        out[task] = TASKS[task].index(values.pop()) if len(values) == 1 else -1
    out["background"] = BACKGROUNDS.index(scene.background)
    out["word"] = WORDS.index(scene.word) if scene.word is not None else -1
    return out
