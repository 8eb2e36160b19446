"""Mean-ablation from the cache, and per-image attribution.

Direct mean-ablation (Gandelsman, Efros, Steinhardt, ICLR 2024, Sec. 3): the image embedding is
the sum of its components' direct effects, so replacing one component's effect by its dataset
mean changes the embedding by `mean - effect`, and the zero-shot logits by `(mean - effect) @ W.T`.
Nothing is re-run; only the component's rows are read. The drop in accuracy (or, without labels,
in agreement with the unablated top-1) gets a bootstrap 95% interval over images: the per-image
outcome change takes values in {-1, 0, 1}, so resampling images is a multinomial draw of counts.

Second-order mean-ablation (Gandelsman et al., 2024, Sec. 4): each neuron n of layer l adds its
second-order effect e_n (`neurons.py`) to the embedding; mean-ablating a set of them adds
`Σ (mean_n - e_n)` over the set. The sets, as in the reference's `compute_ablations.py`: every
neuron; per image the "significant" neurons, whose centred effect |e_n - mean_n| is among the
neuron's top k over the images (k of the neurons file); and the rest. The neurons file stores
Σ_n e_n and the significant Σ (e_n - mean_n) per image, so nothing is re-run here either.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from clipterm.errors import ClipTermError
from clipterm.inputs.images import item_path
from clipterm.towers import tower_for


@dataclass
class Scoring:
    """Zero-shot scoring of (possibly ablated) image embeddings against one classifier."""

    weights: torch.Tensor  # (K, D) unit class embeddings
    image_embeds: Any  # (N, D) the unablated embeddings, or a cache reader: its image_embeds are then streamed
    labels: torch.Tensor | None = None  # (N,) class per image, -1 unknown; None: agreement with unablated top-1
    keep: torch.Tensor | None = None  # (N,) bool: the rows that may be scored; None: all
    task: str | None = None  # the task the labels are of, for messages
    base_logits: torch.Tensor = field(init=False)  # (n, K) on the scored rows
    target: torch.Tensor = field(init=False)  # (n,) the label, or the unablated top-1
    rows: torch.Tensor = field(init=False)  # (n,) the rows that are scored, ascending

    def __post_init__(self) -> None:
        streamed = not isinstance(self.image_embeds, torch.Tensor)
        total = self.image_embeds.n if streamed else len(self.image_embeds)
        known = torch.ones(total, dtype=torch.bool) if self.labels is None else self.labels >= 0
        if self.keep is not None:
            known = known & self.keep
        self.rows = known.nonzero().squeeze(1)  # (n,)
        if self.rows.numel() == 0:
            what = f"task {self.task!r}" if self.task else "this task"
            raise ClipTermError(f"no image in the cache has a label for {what} (its labelled inputs were all skipped "
                                "or left out)", hint="pick another --task")
        if streamed:  # shard by shard: the (N, D) embeddings are never held
            self.base_logits = torch.empty(len(self.rows), len(self.weights))  # (n, K), filled in place
            for lo, hi in self.image_embeds.row_chunks(4096):
                span = self.span(lo, hi)
                self.base_logits[span] = self.image_embeds.gather("image_embeds", (), self.rows[span]).float() @ self.weights.T
        else:
            self.base_logits = self.image_embeds[self.rows].float() @ self.weights.T  # (n, K)
        self.target = self.base_logits.argmax(1) if self.labels is None else self.labels[self.rows].long()

    @property
    def agreement(self) -> bool:
        return self.labels is None

    def span(self, lo: int, hi: int) -> slice:
        """The scored rows inside cache rows lo..hi-1, as a slice of `rows` (and of `base_logits`)."""
        first, last = (int(i) for i in torch.searchsorted(self.rows, torch.tensor([lo, hi])))
        return slice(first, last)

    def _embeds(self) -> torch.Tensor:
        if isinstance(self.image_embeds, torch.Tensor):
            return self.image_embeds[self.rows].float()
        return self.image_embeds.image_embeds(self.rows).float()

    def outcome(self, shift: torch.Tensor | None = None) -> torch.Tensor:
        """(n,) bool: correct (or agreeing) after adding `shift` (N, D) to every image embedding."""
        logits = self.base_logits if shift is None else self.base_logits + shift[self.rows].float() @ self.weights.T
        return logits.argmax(1) == self.target

    def mean_cosine(self, shift: torch.Tensor) -> float:
        """Mean cosine between each unablated embedding and its ablated one."""
        base = self._embeds()  # (n, D)
        return float(F.cosine_similarity(base, base + shift[self.rows].float(), dim=1).mean())


def bootstrap_drop(before: torch.Tensor, after: torch.Tensor, draws: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Drop in mean outcome (before - after) and its bootstrap 95% interval over images."""
    change = before.int() - after.int()  # (n,) in {-1, 0, 1}
    n = len(change)
    counts = np.array([(change == v).sum().item() for v in (-1, 0, 1)], dtype=np.float64)
    resampled = np.random.default_rng(seed).multinomial(n, counts / n, size=draws)  # (draws, 3)
    drops = (resampled[:, 2] - resampled[:, 0]) / n  # (draws,)
    low, high = np.quantile(drops, [0.025, 0.975])
    return float(change.double().mean()), float(low), float(high)


@dataclass
class AblationRow:
    component: str
    score: float  # accuracy (or agreement) with the component mean-ablated
    drop: float  # baseline - score
    low: float  # bootstrap 95% interval of the drop
    high: float
    cosine: float  # mean cosine to the unablated embedding

    def to_json(self) -> dict[str, Any]:
        return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def ablate(scorings: dict[str, Scoring], shifts: Iterable[tuple[str, torch.Tensor]], draws: int = 2000
           ) -> dict[str, list[AblationRow]]:
    """For each scoring (task), one row per (name, shift), where shift = mean - effect, (N, D)."""
    before = {task: scoring.outcome() for task, scoring in scorings.items()}
    rows: dict[str, list[AblationRow]] = {task: [] for task in scorings}
    for name, shift in shifts:
        for task, scoring in scorings.items():
            after = scoring.outcome(shift)
            drop, low, high = bootstrap_drop(before[task], after, draws)
            rows[task].append(AblationRow(name, float(after.float().mean()), drop, low, high, scoring.mean_cosine(shift)))
    return rows


# --------------------------------------------------------------------------- shifts read from a cache


def group(reader: Any, by: str, reference: bool = False) -> list[str]:
    """Component names to ablate one at a time: every head, every MLP, or every layer (its heads plus MLP).

    In the `reference` convention (analyses.conventions), `embed` counts among the MLPs, as clip_text_span's
    ln_pre term does."""
    shape = reader.shape
    if by == "head":  # a tower with an attention pool: its pool heads too (another split of the same embedding)
        pooled = [str(c) for c in tower_for(shape).pool_components() if c.kind == "head"]
        return [str(c) for c in tower_for(shape).heads()] + pooled
    if by == "mlp" and not tower_for(shape).mlps():
        raise ClipTermError("this model has no MLPs with a direct effect", hint=f"--by takes layer or head; {tower_for(shape).vocabulary}")
    if by == "mlp":
        return (["embed"] if reference else []) + tower_for(shape).mlps()
    if by == "layer":
        return tower_for(shape).layers()
    raise ClipTermError(f"cannot ablate by {by!r}", hint="--by takes layer, head or mlp")


def shift(reader: Any, name: str, view: Any = None) -> torch.Tensor:
    """mean - effect of one component (or layer), (N, D): what mean-ablating it adds to each embedding.

    With a reference `view` the mean is over the reference's effects (each image's divided by its
    ‖embedding‖), and the shift, added there to e/‖e‖, is scaled back by ‖e‖ to be added to e."""
    if view is not None:
        effects = view.effects(name)  # (N, D), in units of ‖e‖
        return (effects.mean(0, keepdim=True) - effects) * view.norm
    effects = reader.effects(name)  # (N, D)
    return effects.mean(0, keepdim=True) - effects


def shifts(reader: Any, components: list[str], view: Any = None) -> Iterable[tuple[str, torch.Tensor]]:
    for name in components:
        yield name, shift(reader, name, view)


SECOND_ORDER = ("all", "significant", "insignificant")
REFERENCE_COEFFICIENT = 100.0  # second_order_lens' scale of the normalised embedding (vit.second_order's too)


def second_order_shifts(neuron_file: Any, which: Iterable[str] = SECOND_ORDER) -> list[tuple[str, torch.Tensor]]:
    """Mean-ablation of layer l's second-order effects: (set name, shift (N, D)) per set in `which` (`all`, …).

    Rows the neurons build could not read again get a zero shift: score them out with `Scoring.keep`.
    """
    unknown = [name for name in which if name not in SECOND_ORDER]
    if unknown:
        raise ClipTermError(f"no second-order set {unknown[0]!r}", hint=f"use {', '.join(SECOND_ORDER)}")
    readable = ~neuron_file.missing[:, None]  # (N, 1)
    mean_total = neuron_file.tensor("mean").sum(0)  # (D,): Σ_n mean_n
    everything = (mean_total - neuron_file.tensor("effect_sum")) * readable  # (N, D): Σ_n (mean_n - e_n)
    significant = -neuron_file.tensor("significant_sum") * readable  # (N, D): Σ_{n significant} (mean_n - e_n)
    shifts = {"all": everything, "significant": significant, "insignificant": everything - significant}  # (N, D) each
    if neuron_file.convention == "reference":  # effects are ×100/‖e‖: the reference ablates in that scaled space
        scale = neuron_file.reader.image_embeds().norm(dim=-1, keepdim=True) / REFERENCE_COEFFICIENT  # (N, 1)
        shifts = {name: shift * scale for name, shift in shifts.items()}
    return [(name, shifts[name]) for name in which]


def cumulative_shifts(reader: Any, by: str, view: Any = None) -> Iterable[tuple[str, torch.Tensor]]:
    """Layers 0..l all mean-ablated (their heads, MLPs, or both), for each l.

    With a reference `view` and `by="mlp"`, `embed` is ablated with the MLPs from the first row on
    (the rows are named `embed+L0-l`): the last row is clip_text_span's "all MLPs" ablation."""
    with_embed = view is not None and by == "mlp"
    total = shift(reader, "embed", view) if with_embed else None
    for layer in range(reader.shape.layers):
        tower = reader.tower
        parts = {"head": [str(c) for c in tower.heads([layer])], "mlp": tower.mlps()[layer:layer + 1],
                 "layer": tower.layers()[layer:layer + 1]}[by]
        for name in parts:
            total = shift(reader, name, view) if total is None else total + shift(reader, name, view)
        label = tower.cumulative_label(layer)
        yield ("embed+" + label if with_embed else label), total


# --------------------------------------------------------------------------- classifiers


def class_weights(encode: Callable[[list[str]], torch.Tensor], prompts: list[list[str]]) -> torch.Tensor:
    """Unit class embeddings (K, D): each class's prompts encoded, normalised, averaged, normalised."""
    flat = [p for per_class in prompts for p in per_class]
    sizes = [len(per_class) for per_class in prompts]
    embeds = F.normalize(encode(flat).float(), dim=-1)  # (sum sizes, D)
    means = torch.stack([chunk.mean(0) for chunk in embeds.split(sizes)])  # (K, D)
    return F.normalize(means, dim=-1)


def imagenet_templates() -> list[str]:
    """open_clip's 80 OpenAI ImageNet templates, as format strings."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return [template("{}") for template in OPENAI_IMAGENET_TEMPLATES]


def prompts_for(kind: str, task: str, classes: list[str], templates: list[str] | None) -> list[list[str]]:
    """Prompts per class: the toy task's own templates for toy caches, else open_clip's ImageNet templates."""
    if templates is None and kind == "toy" and task is not None:
        from clipterm.toyworld.captions import TASK_TEMPLATES, class_phrase

        return [[t.format(class_phrase(task, c)) for t in TASK_TEMPLATES[task]] for c in classes]
    templates = templates or imagenet_templates()
    return [[t.format(c) for t in templates] for c in classes]


def read_lines(path: str, what: str) -> list[str]:
    """Non-blank lines of a UTF-8 file (`--classes`, `--templates`); duplicates are an error, not dropped."""
    from pathlib import Path

    file = Path(path).expanduser()
    if not file.is_file():
        raise ClipTermError(f"no {what} file {path}", hint=f"give a UTF-8 file with one {what[:-1]} per line")
    try:
        lines = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise ClipTermError(f"{what} file {path} is not UTF-8", hint="re-save it as UTF-8") from None
    if not lines:
        raise ClipTermError(f"{what} file {path} is empty", hint=f"put one {what[:-1]} per line")
    if len(set(lines)) != len(lines):
        raise ClipTermError(f"{what} file {path} repeats a line", hint=f"each {what[:-1]} must appear once")
    return lines


def task_names(reader: Any, task: str | None) -> list[str]:
    """The tasks to score: the one asked for (checked), or every labelled task of the cache."""
    if task is not None:
        if task not in reader.tasks:
            raise ClipTermError(f"cache {reader.name} has no labels for {task!r}",
                                hint=f"tasks: {', '.join(reader.tasks) or 'none: leave out --task to score agreement'}")
        return [task]
    return list(reader.tasks)


def scorings(
    reader: Any,
    encode: Callable[[list[str]], torch.Tensor],
    task: str | None = None,
    classes: list[str] | None = None,
    templates: list[str] | None = None,
    pool_embeds: Callable[[], torch.Tensor] | None = None,
    keep: torch.Tensor | None = None,
) -> dict[str, Scoring]:
    """One Scoring per task of the cache (or the one asked for); for a cache without labels, agreement
    with the unablated top-1 over `classes` (with templates) or over the pool texts `pool_embeds()`.
    `keep` (N,) bool leaves the other rows out of every score."""
    from clipterm.cache.reader import CacheReader

    image_embeds = reader if isinstance(reader, CacheReader) else reader.image_embeds()  # a cache's are streamed
    kind = reader.manifest["dataset"].get("kind", "")
    out = {}
    for name in task_names(reader, task):
        names_ = reader.tasks[name]
        if classes is not None and len(classes) != len(names_):
            raise ClipTermError(f"--classes has {len(classes)} lines, task {name!r} has {len(names_)} classes",
                                hint=f"list the classes in label order: {', '.join(names_[:5])}, ...")
        weights = class_weights(encode, prompts_for(kind, name, classes or names_, templates))
        out[name] = Scoring(weights, image_embeds, reader.labels(name), keep, task=name)
    if out:
        return out
    if classes is not None:
        weights = class_weights(encode, prompts_for("", None, classes, templates))
    elif pool_embeds is not None:
        weights = F.normalize(pool_embeds().float(), dim=-1)
    else:
        raise ClipTermError(f"cache {reader.name} has no labels", hint="give --classes FILE, or --pool to score agreement")
    return {"agreement": Scoring(weights, image_embeds, None, keep)}


def textspan_evaluation(reader: Any, scoring: Scoring, spans: dict[str, Any], last: int) -> dict[str, float]:
    """The paper's check: heads of the last `last` layers replaced by their TextSpan reconstructions,
    every earlier head mean-ablated (MLPs, embed and bias kept). `spans` maps those heads to SpanResults."""
    from clipterm.analyses.textspan import reconstruct

    shape = reader.shape
    early = None
    for layer in range(shape.layers - last):
        for head in tower_for(shape).heads([layer]):
            part = shift(reader, str(head))
            early = part if early is None else early + part
    early = torch.zeros_like(reader.image_embeds()) if early is None else early
    replaced = early.clone()
    for layer in range(shape.layers - last, shape.layers):
        for head in tower_for(shape).heads([layer]):
            name = str(head)
            effects = reader.effects(name)  # (N, D)
            replaced += reconstruct(effects, spans[name]) - effects
    accuracy = lambda s=None: float(scoring.outcome(s).float().mean())  # noqa: E731
    return {"baseline": accuracy(), "early_heads_mean_ablated": accuracy(early), "textspan_replaced": accuracy(replaced)}


def attribute(contributions: dict[str, torch.Tensor], direction: torch.Tensor, image_embed: torch.Tensor) -> list[tuple[str, float]]:
    """Each component's share of cos(image, direction): e_c . d / |image|, largest magnitude first.

    `contributions` maps names to (D,) effects for one image; they sum to `image_embed`.
    """
    norm = image_embed.float().norm()
    scores = {name: float(effect.float() @ direction.float() / norm) for name, effect in contributions.items()}
    return sorted(scores.items(), key=lambda item: -abs(item[1]))


def image_contributions(reader: Any, row: int) -> dict[str, torch.Tensor]:
    """Every top-level component's direct effect (D,) on one image (`reader.components()`: embed, bias, heads, MLPs)."""
    return {name: reader.effects(name, [row])[0] for name in reader.components()}


def find_row(reader: Any, image: str) -> int:
    """A cache row from a row number, an image path, or a synthetic id (`toy:0/17`)."""
    from pathlib import Path

    if image.strip().isdigit():
        row = int(image)
        if row >= reader.n:
            raise ClipTermError(f"row {row} is out of range: cache {reader.name} has {reader.n} rows", hint=f"rows run 0..{reader.n - 1}")
        return row
    wanted = {image, str(Path(image).expanduser().resolve())}
    for item in reader.images():
        if item.get("path") in wanted or item_path(item) in wanted or item.get("id") in wanted:
            if item.get("skipped"):
                raise ClipTermError(f"{image} was skipped when the cache was built: {item.get('reason', 'unreadable')}")
            return reader.index().tolist().index(item["index"])
    raise ClipTermError(f"no image {image!r} in cache {reader.name}", hint="give a row number, or a path or id from images.jsonl")


def class_directions(reader: Any, encode: Callable[[list[str]], torch.Tensor], classes: list[str], task: str | None) -> torch.Tensor:
    """Unit classifier rows (k, D) for class names of the cache's tasks (the task found by name when not given)."""
    kind = reader.manifest["dataset"].get("kind", "")
    rows = []
    for name in classes:
        tasks = task_names(reader, task) if task else [t for t, c in reader.tasks.items() if name in c]
        if not tasks or name not in reader.tasks[tasks[0]]:
            known = "; ".join(f"{t}: {', '.join(c[:8])}" for t, c in reader.tasks.items()) or "the cache has no classes"
            raise ClipTermError(f"no class {name!r} in {'task ' + task if task else 'any task of ' + reader.name}", hint=known[:300])
        if len(tasks) > 1:
            raise ClipTermError(f"class {name!r} is in several tasks: {', '.join(tasks)}", hint="pick one with --task")
        rows.append(class_weights(encode, prompts_for(kind, tasks[0], [name], None))[0])
    return torch.stack(rows)
