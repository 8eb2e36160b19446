"""Facets for feature visualisation: a linear probe of a layer's class-token residual, trained on a cache's labels.

Goh et al., "Multimodal Neurons in Artificial Neural Networks" (Distill, 2021), faceted feature visualisation: a
probe that tells one facet of the data from the rest (here: the classes of one labelled task) adds its
log-probability to the objective, so the picture shows the unit's response in that facet. Features are the
class-token residual after block `layer`, LayerNorm'ed without affine, recorded with `featvis.Recorder`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from clipterm import names
from clipterm.errors import ClipTermError


@dataclass
class Facet:
    """A linear probe (softmax regression) on layer `layer`'s class-token residual, LayerNorm'ed without affine."""

    task: str
    layer: int
    classes: list[str]
    weight: Tensor  # (C, W)
    bias: Tensor  # (C,)
    target: int | None  # the class pushed toward; None: whichever the probe is surest of
    accuracy: float  # on held-out cache rows
    chance: float  # the held-out rows' majority-class rate
    rows: int  # cache rows used (train + held out)

    def log_prob(self, residual: Tensor) -> Tensor:
        """(B,) log-probability of the facet's class (or the top class) for class-token residuals (B, W)."""
        features = F.layer_norm(residual.float(), residual.shape[-1:])  # (B, W)
        logits = features @ self.weight.to(features).T + self.bias.to(features)  # (B, C)
        log_probs = logits.log_softmax(-1)  # (B, C)
        return log_probs[:, self.target] if self.target is not None else log_probs.max(-1).values

    def to_json(self) -> dict[str, Any]:
        return {"task": self.task, "class": self.classes[self.target] if self.target is not None else None,
                "layer": names.layer(self.layer), "accuracy": round(self.accuracy, 4), "chance": round(self.chance, 4),
                "images": self.rows}


def train_facet(loaded: Any, reader: Any, spec: str, layer: int | None = None, max_rows: int = 1024, seed: int = 0,
                steps: int = 300) -> Facet:
    """Fit a probe for `TASK` or `TASK/CLASS` on the cache's labels: 80% of the labelled rows train, 20% test."""
    from clipterm.analyses.featvis import Recorder
    from clipterm.analyses.spatial import open_image
    from clipterm.vit.decompose import vision_tower

    task, _, wanted = spec.partition("/")
    if reader is None:
        raise ClipTermError(f"--facet {spec} needs a cache with labels", hint="pass --cache NAME (a labelled cache)")
    if task not in reader.tasks:
        raise ClipTermError(f"cache {reader.name} has no labels for task {task!r}",
                            hint=f"tasks with labels: {', '.join(reader.tasks) or 'none'}")
    classes = list(reader.tasks[task])
    if wanted and wanted not in classes:
        raise ClipTermError(f"no class {wanted!r} in task {task}", hint=f"classes: {', '.join(classes)}"[:300])
    visual = vision_tower(loaded.model)
    layer = layer if layer is not None else (2 * len(visual.transformer.resblocks)) // 3
    labels = reader.labels(task)  # (N,)
    rows = torch.nonzero(labels >= 0).flatten()
    rows = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))][:max_rows]
    if len(rows) < 10:
        raise ClipTermError(f"cache {reader.name} has only {len(rows)} rows labelled for {task}",
                            hint="build a larger cache")
    recorder = Recorder(visual, blocks={layer})
    features = []
    device = visual.conv1.weight.device
    try:
        with torch.no_grad():
            for start in range(0, len(rows), 128):
                images = [open_image(f"row:{int(r)}", reader).image for r in rows[start : start + 128]]
                batch = torch.stack([loaded.preprocess(image) for image in images])  # (b, 3, S, S)
                visual(batch.to(device=device, dtype=visual.conv1.weight.dtype))
                residual = recorder.saved[("block", layer)][:, 0].float()  # (b, W)
                features.append(F.layer_norm(residual, residual.shape[-1:]).cpu())  # (b, W)
    finally:
        recorder.close()
    x, y = torch.cat(features), labels[rows].long()  # (n, W), (n,)
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
    return Facet(task, layer, classes, weight.detach(), bias.detach(), target, accuracy, chance, len(rows))
