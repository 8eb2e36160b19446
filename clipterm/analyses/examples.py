"""Dataset examples: the cache's images that excite a component most.

| component       | `by`         | score per image                                                        |
|-----------------|--------------|------------------------------------------------------------------------|
| `L9.N123`       | `norm`       | norm of the neuron's second-order effect (`neurons.L9.safetensors`)     |
| `L9.N123`       | `activation` | its CLS post-activation (the neurons file, or the cache's `neurons`)    |
| `L5.H2`, `L5.MLP` | `textspan` | projection of the direct effect on the first TextSpan direction         |
| `L5.H2`, `L5.MLP` | `pc`       | projection on the k-th principal direction (`L5.H2:pc2`), from the stats |
| `L5.H2`, `L5.MLP` | `norm`     | norm of the direct effect                                              |
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from clipterm import names
from clipterm.errors import ClipTermError
from clipterm.inputs.images import item_path

NEURON_BY = ("norm", "activation")
DIRECT_BY = ("textspan", "pc", "norm")


@dataclass
class Example:
    """One image with its score; `path` for files, `id` for synthetic scenes."""

    rank: int
    row: int  # row in the cache
    index: int  # line in images.jsonl
    score: float
    path: str | None = None
    id: str | None = None
    missing: bool = False  # the file is gone since the cache was built
    labels: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        row = asdict(self)
        return {key: value for key, value in row.items() if value is not None}


@dataclass
class Ranking:
    component: str
    by: str
    about: str  # what the score is, in words
    examples: list[Example]


def default_by(component: names.Component) -> str:
    if component.kind == "neuron":
        return "norm"
    return "pc" if component.pc else "textspan"


def top_images(reader: Any, name: str, top: int = 16, by: str | None = None,
               text_embeds: Callable[[], tuple[Any, list[str]]] | None = None) -> Ranking:
    """The `top` images of a cache with the largest score for a head, MLP or neuron.

    `text_embeds()` returns (pool embeddings (P, D), pool texts); it is called only for `by="textspan"`.
    """
    component = reader.tower.parse(name)
    if top < 1:
        raise ClipTermError(f"--top {top}: nothing to show", hint="ask for at least one image, e.g. --top 16")
    by = by or default_by(component)
    if component.kind == "feature":
        from clipterm.sae.store import SaeFile

        sae_file = SaeFile(reader, component.layer)
        sae_file.check_feature(component.index)
        scores = sae_file.image_max[:, component.index]
        about = "SAE activation" + (" (maximum over tokens)" if sae_file.tokens == "all" else "")
    elif component.kind == "neuron":
        scores, about = _neuron_scores(reader, component, by)
    elif component.kind in ("head", "mlp"):
        scores, about = _direct_scores(reader, component, by, text_embeds)
    else:
        raise ClipTermError(f"{name} has no top images", hint="give a head (L5.H2), an MLP (L5.MLP), a neuron (L9.N123) or an SAE feature (L4.F12)")
    return Ranking(str(component), by, about, _examples(reader, scores, top))


def _neuron_scores(reader: Any, component: names.Component, by: str) -> tuple[Any, str]:
    from clipterm.cache.neurons import NeuronFile

    if by not in NEURON_BY:
        raise ClipTermError(f"a neuron's images are ranked by {' or '.join(NEURON_BY)}, not {by!r}",
                            hint="projections on a neuron's pc1 need per-image effects, which are not stored")
    if component.pc:
        raise ClipTermError(f"{component}: rank a neuron's images by norm or activation", hint=f"drop :pc{component.pc}")
    try:
        neuron_file = NeuronFile(reader, component.layer)
    except ClipTermError:
        if by == "activation" and reader.manifest["stored"]["neurons"]:  # the cache itself holds CLS activations
            return reader.neurons(component.layer)[:, component.index].float(), "CLS activation (from the cache)"
        raise
    scores = neuron_file.column("norms" if by == "norm" else "activations", component.index)  # (N,)
    scores[neuron_file.missing] = float("-inf")
    return scores, "norm of the second-order effect" if by == "norm" else "CLS activation"


def _direct_scores(reader: Any, component: names.Component, by: str, text_embeds: Callable | None) -> tuple[Any, str]:
    if by not in DIRECT_BY:
        raise ClipTermError(f"a {component.kind}'s images are ranked by {', '.join(DIRECT_BY)}, not {by!r}",
                            hint="norm and activation of second-order effects are for neurons, e.g. L9.N123")
    name = str(component.base)
    if by == "norm":
        return projected(reader, component, None), "norm of the direct effect"
    if by == "pc":
        k = component.pc or 1
        return projected(reader, component, principal_direction(reader, name, k)), f"projection on principal direction {k}"
    if text_embeds is None:
        raise ClipTermError("ranking by TextSpan needs a text pool", hint="use --by pc, or give a pool")
    from clipterm.analyses.textspan import component_stats, text_span

    embeds, texts = text_embeds()
    span = text_span(*component_stats(reader, name), embeds, n_texts=1)
    if not span.indices:
        return projected(reader, component, principal_direction(reader, name, 1)), "projection on principal direction 1"
    return projected(reader, component, span.directions[0]), f"projection on its first TextSpan direction, {texts[span.indices[0]]!r}"


def projected(reader: Any, component: names.Component, direction: Any) -> Any:
    """(N,) each image's direct effect of a head or MLP projected on `direction` (D,), or its norm (None), read shard
    by shard: a head stays in head space (its block @ R d, or the norm through the Gram R Rᵀ), never (N, D)."""
    import torch

    if reader.joint_heads:  # an attention-pool tower's heads are stored in joint space: project their effects
        effects = reader.effects(str(component.base))  # (N, D)
        return effects.norm(dim=1) if direction is None else effects @ direction.float()
    component = reader.tower.validate(component.base)  # a pool head's layer is its stored slot
    if component.kind == "head":
        tensor, index = "head_out", (component.layer, component.index)
        readout = reader.readout[component.layer, component.index]  # (dh, D)
        gram = readout @ readout.T  # (dh, dh)
        along = None if direction is None else readout @ direction.float()  # (dh,)
    else:
        tensor, index, along = "mlps", (component.layer,), None if direction is None else direction.float()
    scores = []
    for lo, hi in reader.row_chunks():
        rows = reader.gather(tensor, index, torch.arange(lo, hi)).float()  # (n, dh) or (n, D)
        if along is not None:
            scores.append(rows @ along)  # (n,)
        elif component.kind == "head":
            scores.append(((rows @ gram) * rows).sum(1).clamp_min(0).sqrt())  # (n,) |z R|
        else:
            scores.append(rows.norm(dim=-1))  # (n,)
    return torch.cat(scores)


def principal_direction(reader: Any, name: str, k: int = 1) -> Any:
    """The k-th principal direction (D,) of a head's or MLP's centred joint-space effects, from the cache's stats;
    its sign makes the mean projection positive (the names table in `clipterm.names`: `L5.H2:pc2`)."""
    import torch

    from clipterm.analyses.textspan import component_stats

    count, total, outer, head_readout = component_stats(reader, name)  # head space for heads, joint for MLPs
    head_readout = head_readout.double()  # (dh, D)
    mean = total.double() / count  # (dh,)
    cov = outer.double() / count - torch.outer(mean, mean)  # (dh, dh)
    values, vectors = torch.linalg.eigh(head_readout.T @ cov @ head_readout)  # (D,), (D, D) ascending
    if k > values.shape[0]:
        raise ClipTermError(f"{name} has {values.shape[0]} principal directions, not {k}", hint="use :pc1")
    direction = vectors[:, -k]  # (D,)
    if float((mean @ head_readout) @ direction) < 0:
        direction = -direction
    return direction.float()


def _examples(reader: Any, scores: Any, top: int) -> list[Example]:
    import torch

    indices = reader.index().tolist()  # (N,) row -> images.jsonl line
    classes = reader.tasks
    finite = torch.isfinite(scores)
    order = scores.masked_fill(~finite, float("-inf")).topk(min(top, int(finite.sum()))).indices
    lines = reader.image_records([indices[row] for row in order.tolist()])
    examples = []
    for rank, row in enumerate(order.tolist(), 1):
        line = lines[indices[row]]
        labels = {task: classes[task][label] for task, label in line.get("labels", {}).items()
                  if task in classes and 0 <= label < len(classes[task])}
        path = line.get("path")
        examples.append(Example(rank, row, indices[row], float(scores[row]), path, line.get("id"),
                                path is not None and not os.path.isfile(item_path(line)), labels))
    return examples
