"""Factorise one image's class attributions over positions (Olah et al., "The Building Blocks of
Interpretability", Distill 2018, as its authors' code does it: attributions of every class at a layer,
stacked into a (positions × classes) matrix, clipped at 0, factored by NMF).

The attribution is the exact direct effect per source token: a head's class-token output is
`Σ_t A[0, t]·v_t`, so what the heads of layers L, L+1, … read from patch t reaches the image embedding as a
joint-space vector e_t (clipterm.analyses.spatial.token_effects, the same split the query maps use). The
attribution of class c at patch t is `e_t · (c − mean of c's task) / |image|`: its contribution to the
class's logit (a cosine) relative to the other classes of its task, which is all a task's softmax sees.
Summed over the patches and the class token it is exactly the part of the (task-centred) logit that the
heads of layers ≥ L carry, with no gradient approximation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from clipterm import names
from clipterm.analyses.spatial import SpatialImage, model_hint, open_image, token_effects
from clipterm.errors import ClipTermError


@dataclass
class ClassSet:
    """Classes to attribute: `task/name` labels and their task-centred class directions (C, D)."""

    labels: list[str]
    directions: Tensor  # (C, D) each unit class embedding minus its task's mean
    source: str  # where the classes came from: the cache's tasks, the toy world's, or a --classes file


def class_set(loaded: Any, reader: Any = None, task: str | None = None, classes_file: str | None = None) -> ClassSet:
    """The classes of a task (`colour`, or several: `colour,shape`; default every task) of the cache, or of the toy
    world for a toy model, or of a file."""
    from clipterm.analyses.ablation import class_weights, prompts_for, read_lines
    from clipterm.vit.models import is_toy
    from clipterm.vit.textencode import encode_texts

    if loaded is None:
        raise ClipTermError("class attributions need the model's text tower to embed the classes", hint=model_hint(reader))
    encode = lambda texts: encode_texts(loaded.model, loaded.tokenizer, texts)  # noqa: E731
    if classes_file is not None:
        if task is not None:
            raise ClipTermError("--task and --classes both name the classes", hint="give one of them")
        listed = read_lines(classes_file, "classes")
        weights = class_weights(encode, prompts_for("", None, listed, None)).float().cpu()  # (C, D)
        return ClassSet(listed, weights - weights.mean(0), f"file {classes_file}")
    if reader is not None:
        kind, tasks, where = reader.manifest["dataset"].get("kind", ""), dict(reader.tasks), f"cache {reader.name}"
    elif is_toy(loaded.info.spec):
        from clipterm.toyworld.world import TASKS

        kind, tasks, where = "toy", {t: list(c) for t, c in TASKS.items()}, "the toy world"
    else:
        raise ClipTermError(f"--of classes needs classes, and {loaded.info.spec} without a cache knows none",
                            hint="give --classes FILE (one class per line), or a --cache with labels")
    if not tasks:
        raise ClipTermError(f"{where} has no labelled tasks, so no classes to attribute", hint="give --classes FILE")
    wanted = [t.strip() for t in task.split(",")] if task is not None else list(tasks)
    for name in wanted:
        if name not in tasks:
            raise ClipTermError(f"{where} has no labels for task {name!r}", hint=f"tasks: {', '.join(tasks)}")
    labels, rows = [], []
    for name in wanted:
        weights = class_weights(encode, prompts_for(kind, name, list(tasks[name]), None)).float().cpu()  # (c, D)
        rows.append(weights - weights.mean(0))  # a task's softmax sees its logits up to a shared constant
        labels += [f"{name}/{c}" for c in tasks[name]]
    return ClassSet(labels, torch.cat(rows), where)


def class_attributions(image: SpatialImage, classes: ClassSet, layer: int, *, loaded: Any, reader: Any = None) -> Tensor:
    """(T, C) unclipped: each token's exact direct effect through the heads of layers ≥ `layer`, dotted with each
    class's task-centred direction, over |image|. Row 0 is the class token (a ResNet pool's mean token)."""
    from clipterm.analyses.spatial import _readout

    last = (reader.readout if reader is not None and loaded is None else _readout(loaded.model)).shape[0]  # (L, H, dh, D)
    check_layer(layer, last)  # a ResNet's readout is its attention pool alone: layer 0
    layers = list(range(layer, last))
    effects = token_effects(image, layers, reader, loaded)
    joint = sum(torch.einsum("htk,hke->te", effects.tokens[l].float(), effects.readout[l].float()) for l in layers)  # (T, D)
    return joint @ classes.directions.T.float() / effects.image_embed.float().norm()  # (T, C)


def check_layer(layer: int, n_layers: int) -> None:
    if not 0 <= layer < n_layers:
        raise ClipTermError(f"no layer {names.layer(layer)}: the model has {n_layers}",
                            hint=f"use {names.layer(0)}..{names.layer(n_layers - 1)}")


def default_layer(n_layers: int) -> int:
    """Layer 0: every head's direct effect (measured best on the toy, bench/truth/spatial.py)."""
    return 0


def factorise_classes(image: str | SpatialImage, k: int, *, loaded: Any, reader: Any = None, layer: int | None = None,
                      classes: ClassSet | None = None, task: str | None = None, classes_file: str | None = None,
                      n_classes: int = 5) -> Any:
    """NMF of the per-patch class attributions of `layer` (clipped at 0) into k factors, each named by its top
    classes with their weights (the factor's row of H over its largest entry)."""
    from clipterm.analyses.factorise import Factor, Factorisation, _nmf, check_k

    if k < 1:
        check_k(k, 1)
    image = open_image(image, reader) if isinstance(image, str) else image
    classes = classes if classes is not None else class_set(loaded, reader, task, classes_file)
    layer = layer if layer is not None else default_layer(0)
    attributions = class_attributions(image, classes, layer, loaded=loaded, reader=reader)[1:].double()  # (P, C)
    check_k(k, attributions.shape[0])
    maps, loadings, shares, error = _nmf(attributions, k, what="class attribution")  # (P, k), (k, C), (k,)
    side = int(round(attributions.shape[0] ** 0.5))
    factors = []
    for i in shares.argsort(descending=True).tolist():
        weights = loadings[i] / loadings[i].max().clamp(min=1e-12)  # (C,)
        top = weights.topk(min(n_classes, len(classes.labels)))
        named = [(classes.labels[j], float(w)) for w, j in zip(top.values, top.indices.tolist()) if float(w) > 0]
        direction = F.normalize(loadings[i].float() @ classes.directions.float(), dim=0)  # (D,)
        factors.append(Factor(maps[:, i].float().reshape(side, side), float(shares[i]), direction, named,
                              spread=participation(loadings[i])))
    return Factorisation(factors, "nmf", [layer], error, of="classes", center="none")


def participation(weights: Tensor) -> float:
    """How many classes a factor spans: (Σw)² / Σw² of its non-negative class weights (1 for a single class)."""
    weights = weights.double().clamp(min=0)
    return float(weights.sum() ** 2 / (weights**2).sum().clamp(min=1e-24))
