"""Text pools and their cached embeddings.

A pool is an ordered list of distinct, non-empty texts with a sha256 over the list. The
built-in pools are generated from small word lists (no sentence lists are shipped):

- `toy`: phrases of the synthetic world (every attribute alone, the zero-shot prompts,
  pairs of attributes, words and their ink) plus distractors from outside the world;
- `general`: ImageNet class names under a few templates, plus colours, textures, shapes,
  materials, places, art and photo styles, countries, cities, letters, digits and words.

User pools are UTF-8 files, one text per line. Embeddings are cached per (model weights,
pool) under `<cache root>/texts/` as safetensors, written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import string
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

from clipterm.errors import ClipTermError, ExitCode
from clipterm.locations import PACKAGE_DIR, cache_root

BUILTIN_POOLS = {
    "toy": "phrases of the synthetic world (colours, shapes, sizes, positions, backgrounds, words) plus distractors",
    "general": "ImageNet classes, colours, textures, shapes, materials, places, styles, countries, cities, letters, words",
}
VOCAB_FILE = PACKAGE_DIR / "data" / "vocab.json"


@dataclass(frozen=True)
class TextPool:
    """An ordered list of distinct texts. `topics[i]` says what text i is about (built-in pools only)."""

    name: str  # "toy", "general", or the file path
    texts: tuple[str, ...]
    topics: tuple[str, ...] | None = None
    dropped_blank: int = 0
    dropped_duplicates: int = 0
    sha256: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha256", pool_sha256(self.texts))

    def __len__(self) -> int:
        return len(self.texts)

    def too_long(self, tokenizer: Any, context_length: int) -> list[int]:
        """Indices of texts whose tokens don't fit the context (they are truncated when embedded)."""
        encode = getattr(tokenizer, "encode", None)
        if encode is None:
            return []
        return [i for i, text in enumerate(self.texts) if len(encode(text)) + 2 > context_length]

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "texts": len(self), "sha256": self.sha256,
                "dropped_blank": self.dropped_blank, "dropped_duplicates": self.dropped_duplicates}


def pool_sha256(texts: tuple[str, ...] | list[str]) -> str:
    """sha256 over the final text list, one text per line."""
    return hashlib.sha256("\n".join(texts).encode("utf-8")).hexdigest()


def load_pool(spec: str) -> TextPool:
    """A built-in pool by name (`toy`, `general`) or a UTF-8 file with one text per line."""
    if spec in BUILTIN_POOLS:
        return _builtin(spec)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ClipTermError(
            f"no text pool {spec!r}: not a built-in pool and not a file",
            hint=f"built-in pools: {', '.join(BUILTIN_POOLS)}; or give a UTF-8 file with one text per line",
            code=ExitCode.NOT_FOUND,
        )
    try:
        lines = path.read_bytes().decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise ClipTermError(f"{path} is not UTF-8 (bad byte at line {line})",
                            hint="re-save the file as UTF-8, e.g. `iconv -f latin1 -t utf-8`", code=ExitCode.INVALID_DATA) from None
    texts, blank, dupes = _dedupe(line.strip() for line in lines)
    if not texts:
        raise ClipTermError(f"text pool {path} is empty", hint="put one text per line; blank lines are skipped")
    return TextPool(str(path), tuple(texts), None, blank, dupes)


def _dedupe(candidates) -> tuple[list[str], int, int]:
    """Distinct non-blank texts in first-seen order, with counts of blanks and duplicates dropped."""
    seen: dict[str, None] = {}
    blank = dupes = 0
    for text in candidates:
        if not text:
            blank += 1
        elif text in seen:
            dupes += 1
        else:
            seen[text] = None
    return list(seen), blank, dupes


@lru_cache(maxsize=None)
def _builtin(name: str) -> TextPool:
    pairs = toy_phrases() if name == "toy" else general_phrases()
    texts, topics, seen = [], [], set()
    for text, topic in pairs:
        if text not in seen:
            seen.add(text)
            texts.append(text)
            topics.append(topic)
    return TextPool(name, tuple(texts), tuple(topics))


# --------------------------------------------------------------------------- built-in vocabularies

TOY_DISTRACTORS = {
    "colour": ["brown", "grey", "black", "white", "gold", "silver", "beige", "teal"],
    "shape": ["hexagon", "oval", "crescent", "arrow", "spiral", "pentagon", "rectangle", "cube"],
    "thing": ["a car", "a tree", "a house", "a person", "a mountain", "a cloud", "a boat", "a flower", "a chair",
              "a cup of coffee", "a bicycle", "a book", "a clock", "a guitar", "a pizza", "a shoe"],
    "scene": ["a beach", "a forest", "a city street", "a kitchen", "the night sky", "a snowy field", "the ocean",
              "a desert", "an office", "a garden"],
    "abstract": ["happiness", "music", "a mathematical equation", "the future", "danger", "silence", "speed",
                 "a dream", "an idea", "time", "money", "friendship"],
}


def toy_phrases() -> list[tuple[str, str]]:
    """(text, topic) pairs for the `toy` pool. Topics: the world's tasks, pairs of them, or `distractor`."""
    from clipterm.toyworld.captions import POSITION_PHRASES, task_prompts
    from clipterm.toyworld.world import ANIMALS, BACKGROUNDS, COLOURS, SHAPES, SIZES, TASKS

    colours, positions = list(COLOURS), [POSITION_PHRASES[p] for p in POSITION_PHRASES]
    out: list[tuple[str, str]] = []
    for task in TASKS:
        out += [(prompt, task) for per_class in task_prompts(task) for prompt in per_class]
    out += [(t.format(c), "colour") for c in colours for t in ("{}", "the colour {}", "a {} thing", "painted {}")]
    out += [(t.format(s), "shape") for s in SHAPES for t in ("{}", "the shape of a {}", "a drawing of a {}")]
    out += [(t.format(z), "size") for z in SIZES for t in ("{}", "a {} thing", "something {}", "{} objects")]
    out += [("tiny", "size"), ("big", "size"), ("a tiny dot", "size"), ("a huge shape", "size")]
    out += [(t.format(p), "position") for p in positions for t in ("{}", "something {}", "a thing {}")]
    out += [(t.format(b), "background") for b in BACKGROUNDS for t in ("{}", "a {} scene", "{} backdrop")]
    # Pairs of attributes: a cyclic sample of each product, so that no task dominates the pool.
    out += [(f"a {c} {SHAPES[(i + k) % 8]}", "colour+shape") for i, c in enumerate(colours) for k in (0, 3)]
    out += [(f"a {z} {s}", "size+shape") for z in SIZES for s in SHAPES]
    out += [(f"a {s} {positions[(i + k) % 5]}", "shape+position") for i, s in enumerate(SHAPES) for k in (0, 2)]
    out += [(f"a {s} on a {BACKGROUNDS[(i + k) % 4]} background", "shape+background") for i, s in enumerate(SHAPES)
            for k in (0, 1)]
    out += [(f"a {c} shape {positions[(i + k) % 5]}", "colour+position") for i, c in enumerate(colours) for k in (0, 2)]
    out += [(f"{w}", "word") for w in ANIMALS] + [(f"a sign that says {w}", "word") for w in ANIMALS]
    out += [(f'the word "{w}" written in {ink}', "word+colour") for i, w in enumerate(colours)
            for ink in colours[i + 1 :: 3]]
    out += [(f"a photo of a {a}", "distractor") for a in ANIMALS]
    for kind, words in TOY_DISTRACTORS.items():
        templates = {"colour": ("{}", "a {} object"), "shape": ("a {}", "a {} shape")}.get(kind, ("{}", "a picture of {}"))
        out += [(t.format(w), "distractor") for w in words for t in templates]
    return out


@lru_cache(maxsize=1)
def vocab() -> dict[str, list[str]]:
    return json.loads(VOCAB_FILE.read_text(encoding="utf-8"))


def general_phrases() -> list[tuple[str, str]]:
    """(text, topic) pairs for the `general` pool, about 15k texts."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    v = vocab()

    def under(topic: str, words: list[str], *templates: str) -> list[tuple[str, str]]:
        return [(t.format(w), topic) for w in words for t in templates]

    def cross(topic: str, template: str, firsts: list[str], seconds: list[str]) -> list[tuple[str, str]]:
        return [(template.format(a, b), topic) for a in firsts for b in seconds]

    objects, subjects = v["objects"], v["subjects"]
    out = under("imagenet", list(IMAGENET_CLASSNAMES), "{}", "a photo of a {}.", "a drawing of a {}.",
                "a close-up photo of the {}.")
    out += under("colour", v["colours"], "{}", "the colour {}", "a {} object", "something {}", "a {} background")
    out += cross("colour", "a {} {}", v["colours"], v["shapes"] + objects)
    out += under("texture", v["textures"], "{}", "a {} texture", "a {} surface", "a {} pattern", "{} fabric")
    out += cross("texture", "a {} {}", v["textures"], objects)
    out += under("shape", v["shapes"], "a {}", "a drawing of a {}", "the shape of a {}", "a {} symbol")
    out += under("material", v["materials"], "{}", "made of {}", "a {} texture", "something made of {}")
    out += cross("material", "a {1} made of {0}", v["materials"], objects)
    out += under("place", v["places"], "{}", "a photo of {}", "a painting of {}", "{} at night", "people in {}")
    out += cross("art style", "a {} of {}", v["art_styles"], subjects)
    out += cross("photo style", "a {} of {}", v["photo_styles"], subjects)
    out += under("country", v["countries"], "{}", "a photo taken in {}", "the flag of {}", "a map of {}", "food from {}")
    out += under("city", v["cities"], "{}", "a photo of {}", "the skyline of {}", "a street in {}")
    out += under("letter", list(string.ascii_uppercase), "the letter {}", "a capital letter {}", "{}",
                 "a sign with the letter {}")
    out += under("letter", list(string.ascii_lowercase), "a lowercase letter {}")
    out += under("digit", list(string.digits) + v["numbers"], "the number {}", "{}", "a sign with the number {}")
    out += under("word", v["common_words"], "{}", 'the word "{}"', 'a sign that says "{}"', 'the text "{}"')
    return [(_articles(text), topic) for text, topic in out]


def _articles(text: str) -> str:
    """'a orange cup' -> 'an orange cup' (the toy world keeps its own phrasing, as it was trained)."""
    return re.sub(r"\b([Aa]) (?=[aeiou])", r"\1n ", text)


# --------------------------------------------------------------------------- embeddings and their cache


def texts_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    return cache_root(cache_dir)[0] / "texts"


def embeddings_path(weights_sha256: str, pool: TextPool, cache_dir: str | os.PathLike | None = None) -> Path:
    return texts_dir(cache_dir) / f"{weights_sha256[:16]}-{pool.sha256[:16]}.safetensors"


def model_key(loaded: Any) -> str:
    """The weights sha256 of a loaded model; for in-memory models, a sha256 over the text tower's tensors."""
    if loaded.info.weights_sha256:
        return loaded.info.weights_sha256
    digest = hashlib.sha256()
    for name, tensor in sorted(loaded.model.state_dict().items()):
        if not name.startswith("visual."):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def embed_pool(
    loaded: Any,
    pool: TextPool,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 256,
    on_batch: Callable[[int], None] | None = None,
    refresh: bool = False,
    use_cache: bool = True,
):
    """Unnormalised text embeddings (n, D) float32 of a pool under a loaded model, from the cache when present."""
    import torch
    from safetensors import safe_open

    from clipterm.vit.textencode import encode_texts

    weights = model_key(loaded)
    path = embeddings_path(weights, pool, cache_dir)
    if use_cache and path.is_file() and not refresh:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if meta.get("pool_sha256") == pool.sha256 and meta.get("weights_sha256") == weights:
                return f.get_tensor("embeds")
    with torch.no_grad():
        embeds = encode_texts(loaded.model, loaded.tokenizer, list(pool.texts), batch_size=batch_size, on_batch=on_batch)
    if use_cache:
        _save(path, embeds, {"pool": pool.name, "pool_sha256": pool.sha256, "weights_sha256": weights,
                             "model": loaded.info.spec, "n": str(len(pool)), "texts": json.dumps(pool.texts)})
    return embeds


def _save(path: Path, embeds, metadata: dict[str, str]) -> None:
    from clipterm.files import save_tensors

    path.parent.mkdir(parents=True, exist_ok=True)
    save_tensors(path, {"embeds": embeds}, metadata=metadata)


def cached_embeddings(cache_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Every cached pool embedding: path, pool, model, n, sizes."""
    from safetensors import safe_open

    rows = []
    for path in sorted(texts_dir(cache_dir).glob("*.safetensors")):
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
        except Exception:  # a foreign or broken file: listed, not trusted
            meta = {"pool": "?", "model": "?", "n": "?"}
        rows.append({"path": str(path), "pool": meta.get("pool"), "model": meta.get("model"),
                     "texts": int(meta["n"]) if str(meta.get("n", "")).isdigit() else None,
                     "pool_sha256": meta.get("pool_sha256"), "weights_sha256": meta.get("weights_sha256"),
                     "bytes": path.stat().st_size})
    return rows
