"""Captions for toy scenes, and the zero-shot prompts each task is scored with.

Training captions name the objects compositionally ("a small red star on the
left") with attribute dropout; a share of them are the exact single-task prompts
used for zero-shot evaluation, so that those prompts are in distribution.
"""

from __future__ import annotations

import re
from functools import lru_cache

import numpy as np

from clipterm.toyworld.world import TASKS, Obj, Scene

POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "centre": "in the centre",
}

# One zero-shot template per task; `{}` is the class name.
TASK_TEMPLATES: dict[str, tuple[str, ...]] = {
    "colour": ("a {} object", "something {}"),
    "shape": ("a {}", "a picture of a {}"),
    "size": ("a {} object", "a {} shape"),
    "position": ("an object {}", "a shape {}"),
    "background": ("a {} background", "on a {} background"),
    "word": ('the word "{}"', "text that says {}"),
}


def class_phrase(task: str, name: str) -> str:
    return POSITION_PHRASES[name] if task == "position" else name


def task_prompts(task: str) -> list[list[str]]:
    """Prompts per class of `task`: [n_classes][n_templates]."""
    return [[t.format(class_phrase(task, c)) for t in TASK_TEMPLATES[task]] for c in TASKS[task]]


def object_phrase(obj: Obj, keep: dict[str, bool]) -> str:
    words = [w for w, k in ((obj.size, keep["size"]), (obj.colour, keep["colour"])) if k]
    noun = obj.shape if keep["shape"] else "shape"
    phrase = " ".join(["a", *words, noun])
    if keep["position"]:
        phrase += " " + POSITION_PHRASES[obj.position]
    return phrase


def caption(scene: Scene, rng: np.random.Generator, dropout: float = 0.15, p_single: float = 0.3) -> str:
    """A random caption of `scene`."""
    if rng.random() < p_single:
        task = str(rng.choice(list(TASKS)))
        name = _single_label(scene, task)
        if name is not None:
            templates = TASK_TEMPLATES[task]
            return templates[int(rng.integers(len(templates)))].format(class_phrase(task, name))
    keep = {k: rng.random() >= dropout for k in ("size", "colour", "shape", "position", "background", "word")}
    text = " and ".join(object_phrase(o, keep) for o in scene.objects)
    if keep["background"]:
        text += f", {scene.background} background"
    if scene.word is not None and keep["word"]:
        text += f', the word "{scene.word}"'
    return text


def _single_label(scene: Scene, task: str) -> str | None:
    if task == "background":
        return scene.background
    if task == "word":
        return scene.word
    values = {getattr(o, task) for o in scene.objects}
    return values.pop() if len(values) == 1 else None


def sample_captions(n: int, seed: int = 0, world: int = 1) -> list[str]:
    """`n` training-style captions of the first `n` scenes of a seed of `world`: the text a toy of that world was
    trained on, for a language model (world 2's name the attribute recipe 2 would vary, drawn with its weights)."""
    from clipterm.toyworld.recipe import RECIPES
    from clipterm.toyworld.world import scene_at

    rng = np.random.default_rng(seed)
    if world == 1:
        return [caption(scene_at(seed, i), rng) for i in range(n)]
    recipe = RECIPES[world]
    attributes, odds = recipe.attribute_odds()
    varied = rng.choice(attributes, size=n, p=odds)
    return [focused_caption(scene_at(seed, i, world), rng, str(v), recipe.dropout, recipe.p_single, recipe.p_ink)
            for i, v in enumerate(varied)]


@lru_cache(maxsize=1)
def _caption_grammar() -> re.Pattern[str]:
    """The captions `caption` and `focused_caption` write, as one regular expression over words (punctuation
    dropped)."""
    def one_of(words) -> str:
        return "(?:" + "|".join(words) + ")"

    colour, shape, size = one_of(TASKS["colour"]), one_of(TASKS["shape"]), one_of(TASKS["size"])
    position, background, word = one_of(POSITION_PHRASES.values()), one_of(TASKS["background"]), one_of(TASKS["word"])
    single = one_of([
        f"a {colour} object", f"something {colour}", f"a {shape}", f"a picture of a {shape}",
        f"a {size} (?:object|shape)", f"(?:an object|a shape) {position}",
        f"(?:on )?a {background} background", f"the word {word}", f"text that says {word}",
    ])
    thing = f"a(?: {size})?(?: {colour})? (?:{shape}|shape)(?: {position})?"
    compound = f"{thing}(?: and {thing})*(?: {background} background)?(?: the word {word}(?: in {colour})?)?"
    return re.compile(f"(?:{single}|{compound})")


def parses_as_caption(text: str) -> bool:
    """Whether `text` is a phrase of the toy caption grammar: a caption `caption` could write, with its
    punctuation dropped ("a small red star on the left and a ring, dark background"), or one such noun
    phrase without its leading article ("small red star")."""
    words = " ".join(re.findall(r"[a-z]+", text.lower()))
    grammar = _caption_grammar()
    return bool(grammar.fullmatch(words) or grammar.fullmatch(f"a {words}"))


def focused_caption(scene: Scene, rng: np.random.Generator, varied: str, dropout: float, p_single: float, p_ink: float) -> str:
    """A world-2 caption that always names `varied`, the one attribute its hard-negative group varies.

    Any other attribute is left out with chance `dropout`, so that partial descriptions ("a shape on the
    left", "a red shape") are in distribution; `p_single` of captions are a task's zero-shot prompt.
    The ink of a word is named in `p_ink` of captions, and always when the group varies the ink.
    """
    if varied in TASKS and rng.random() < p_single:
        name = _single_label(scene, varied)
        if name is not None:
            templates = TASK_TEMPLATES[varied]
            return templates[int(rng.integers(len(templates)))].format(class_phrase(varied, name))
    keep = {k: k == varied or rng.random() >= dropout for k in ("size", "colour", "shape", "position", "background")}
    text = " and ".join(object_phrase(o, keep) for o in scene.objects)
    if keep["background"]:
        text += f", {scene.background} background"
    if scene.word is not None and (varied in ("word", "ink") or rng.random() >= dropout):
        text += f', the word "{scene.word}"'
        if varied == "ink" or rng.random() < p_ink:
            text += f" in {scene.ink}"
    return text
