"""Facets for feature visualisation: a linear probe of a layer's activations, trained on a cache's labels.

Goh et al., "Multimodal Neurons in Artificial Neural Networks" (Distill, 2021), faceted feature visualisation. A
probe tells one facet of the data from the rest (here: the classes of one labelled task) on the activations g(x)
of a layer below the unit, and the climb maximises, with f the unit's objective read from those activations,

    f(g(x)) + λ · wᵀ (g(x) ⊙ ∇f(g(x)))          (`attribution`, the article's form)

where w are the probe's weights for the facet's class and the product is summed over positions: the probe reads
the attribution of the objective to the layer, so the picture shows what of the facet the unit uses. Features are
the token-mean of layer `layer`'s output (a ViT block's, a ResNet stage's over its grid), standardised; the tower's
climb (`vit/climb.py`) records it. `logprob` instead adds λ · log p(class) of a probe on the class-token residual
(a ResNet's mean over the grid), LayerNorm'ed without affine: another objective, kept for comparison.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from clipterm import names
from clipterm.errors import ClipTermError


OBJECTIVES = ("attribution", "logprob")


@dataclass
class Facet:
    """A linear probe (softmax regression) on layer `layer`'s activations: with `attribution`, their token-mean
    standardised by (`mean`, `std`); with `logprob`, the class-token residual LayerNorm'ed without affine."""

    task: str
    layer: int
    classes: list[str]
    weight: Tensor  # (C, W), on the features
    bias: Tensor  # (C,)
    target: int | None  # the class pushed toward; None: whichever the probe is surest of
    accuracy: float  # on held-out cache rows
    chance: float  # the held-out rows' majority-class rate
    rows: int  # cache rows used (train + held out)
    objective: str = "attribution"
    mean: Tensor | None = None  # (W,) token-mean activations over the training rows (attribution)
    std: Tensor | None = None  # (W,)
    class_token: bool = True  # the layer's tokens start with a class token (a ViT's); else logprob reads their mean

    def features(self, acts: Tensor) -> Tensor:
        """The probe's input for layer outputs as tokens (B, T, W): (B, W)."""
        if self.objective == "logprob":
            return F.layer_norm(_summary(acts, self.class_token), acts.shape[-1:])  # (B, W)
        return (acts.float().mean(1) - self.mean.to(acts.device)) / self.std.to(acts.device)  # (B, W)

    def log_prob(self, acts: Tensor) -> Tensor:
        """(B,) log-probability of the facet's class (or the top class) for block outputs (B, T, W)."""
        features = self.features(acts)  # (B, W)
        logits = features @ self.weight.to(features).T + self.bias.to(features)  # (B, C)
        log_probs = logits.log_softmax(-1)  # (B, C)
        return log_probs[:, self.target] if self.target is not None else log_probs.max(-1).values

    def attribution(self, acts: Tensor, grad: Tensor) -> Tensor:
        """(B,) wᵀ (g ⊙ ∇f), summed over positions, for block outputs g (B, T, W) and ∂f/∂g (B, T, W); w is the
        probe's weight on raw activations (its standardisation folded in), for the facet's class or the largest."""
        weight = self.weight.to(acts.device) / self.std.to(acts.device)  # (C, W)
        scores = (acts.float() * grad.float()).sum(1) @ weight.T  # (B, C)
        return scores[:, self.target] if self.target is not None else scores.max(-1).values

    def to_json(self) -> dict[str, Any]:
        return {"task": self.task, "class": self.classes[self.target] if self.target is not None else None,
                "layer": names.layer(self.layer), "objective": self.objective, "accuracy": round(self.accuracy, 4),
                "chance": round(self.chance, 4), "images": self.rows}


def _summary(tokens: Tensor, class_token: bool) -> Tensor:
    """What a logprob probe reads of tokens (B, T, W): the class token, or the mean over positions (B, W)."""
    return tokens[:, 0].float() if class_token else tokens.float().mean(1)


def default_layer(n_layers: int, unit_layer: int | None) -> int:
    """The layer (a ViT's block, a ResNet's stage) whose output a facet probes by default: the one just below the
    unit, else two thirds deep."""
    return unit_layer - 1 if unit_layer else (2 * n_layers) // 3


def train_facet(loaded: Any, reader: Any, spec: str, layer: int | None = None, max_rows: int = 1024, seed: int = 0,
                steps: int = 300, objective: str = "attribution") -> Facet:
    """Fit a probe for `TASK` or `TASK/CLASS` on the cache's labels: 80% of the labelled rows train, 20% test."""
    from clipterm.analyses.featvis import climb_for
    from clipterm.analyses.spatial import open_image

    task, _, wanted = spec.partition("/")
    if reader is None:
        raise ClipTermError(f"--facet {spec} needs a cache with labels", hint="pass --cache NAME (a labelled cache)")
    if task not in reader.tasks:
        raise ClipTermError(f"cache {reader.name} has no labels for task {task!r}",
                            hint=f"tasks with labels: {', '.join(reader.tasks) or 'none'}")
    classes = list(reader.tasks[task])
    if wanted and wanted not in classes:
        raise ClipTermError(f"no class {wanted!r} in task {task}", hint=f"classes: {', '.join(classes)}"[:300])
    if objective not in OBJECTIVES:
        raise ClipTermError(f"unknown facet objective {objective!r}", hint=f"use {' or '.join(OBJECTIVES)}")
    climb = climb_for(loaded)
    layer = layer if layer is not None else default_layer(climb.layers, None)
    if not 0 <= layer < climb.layers:
        raise ClipTermError(f"--facet-layer {names.layer(layer)}: this model has layers {names.layer(0)}.."
                            f"{names.layer(climb.layers - 1)} to probe", hint=f"e.g. --facet-layer {names.layer(climb.layers - 1)}")
    labels = reader.labels(task)  # (N,)
    rows = torch.nonzero(labels >= 0).flatten()
    rows = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))][:max_rows]
    if len(rows) < 10:
        raise ClipTermError(f"cache {reader.name} has only {len(rows)} rows labelled for {task}",
                            hint="build a larger cache")
    recorder = climb.recorder([], {layer})
    features = []
    stem = climb.visual.conv1.weight
    try:
        with torch.no_grad():
            for start in range(0, len(rows), 128):
                images = [open_image(f"row:{int(r)}", reader).image for r in rows[start : start + 128]]
                batch = torch.stack([loaded.preprocess(image) for image in images])  # (b, 3, S, S)
                climb.visual(batch.to(device=stem.device, dtype=stem.dtype))
                acts = climb.tokens(climb.layer_acts(recorder, layer)).float()  # (b, T, W)
                features.append((F.layer_norm(_summary(acts, climb.class_token), acts.shape[-1:]) if objective == "logprob"
                                 else acts.mean(1)).cpu())  # (b, W)
    finally:
        recorder.close()
    x, y = torch.cat(features), labels[rows].long()  # (n, W), (n,)
    mean = std = None
    if objective == "attribution":
        mean, std = x.mean(0), x.std(0).clamp(min=1e-6)  # (W,) each
        x = (x - mean) / std
    split = int(0.8 * len(rows))
    weight = torch.zeros(len(classes), x.shape[1], requires_grad=True)  # (C, W)
    bias = torch.zeros(len(classes), requires_grad=True)  # (C,)
    optimiser = torch.optim.Adam([weight, bias], lr=0.05)
    for _ in range(steps):
        loss = F.cross_entropy(x[:split] @ weight.T + bias, y[:split]) + 1e-3 * weight.pow(2).sum()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        predicted = (x[split:] @ weight.T + bias).argmax(-1)  # (n_test,)
    accuracy = float((predicted == y[split:]).float().mean())
    chance = float(torch.bincount(y[split:], minlength=len(classes)).max() / max(len(y) - split, 1))
    target = classes.index(wanted) if wanted else None
    return Facet(task, layer, classes, weight.detach(), bias.detach(), target, accuracy, chance, len(rows), objective,
                 mean, std, climb.class_token)
