"""Targets: one syntax for a unit direction in CLIP's joint space, shared by every command.

| target            | direction                                                                  |
|-------------------|----------------------------------------------------------------------------|
| `L5.H2`           | the head's first principal direction (`:pc1`, as TextSpan sees it); needs a cache |
| `L5.H2:pc2`       | the head's second principal direction of its centred joint-space effects     |
| `L5.MLP`, `S3.B1` | an MLP's (or ConvNeXt block's) first principal direction, as for a head; needs a cache |
| `L9.N123`         | the neuron's second-order principal direction (`neurons.L9.safetensors`); needs a cache |
| `L4.F12`          | the SAE feature's direct effect: its decoder direction through the exact path (`sae.L4.safetensors`); needs a cache |
| `text:a red circle` | the text's embedding                                                     |
| `image:PATH`      | the image's embedding                                                      |
| `class:NAME`      | a class of the cache's labels (or a toy class, or an ImageNet class): its prompts' mean embedding |
| `class:TASK/NAME` | the same, naming the task where a class is in several (`class:colour/red`) |
| `A - B`, `A + B`  | the sum of the unit directions, normalised: `text:red - text:blue`          |

A principal direction's sign is chosen so that the component's mean effect projects positively.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from clipterm import names
from clipterm.errors import ClipTermError, ExitCode
from clipterm.vit.models import is_toy

_KINDS = ("text", "image", "class")
UNITS = ("head", "neuron", "mlp", "feature")  # component targets: their directions come from a cache
# Terms split at " + " / " - " only where a new target starts, so that texts may hold dashes.
_SPLIT = re.compile(r"\s+([+-])\s+(?=(?:text|image|class):|L\d)")
HINT = "targets look like L5.H2, L5.H2:pc2, L9.N123, L4.F12, text:a red circle, image:PATH, class:NAME, or text:red - text:blue"


@dataclass(frozen=True)
class Term:
    sign: int  # +1 or -1
    kind: str  # text, image, class, head, mlp, neuron or feature
    value: str  # the text, path or class; the component name for heads and neurons

    def __str__(self) -> str:
        return self.value if self.kind in UNITS else f"{self.kind}:{self.value}"


@dataclass
class Target:
    spec: str
    terms: list[Term]
    direction: torch.Tensor  # (D,) unit, on the CPU

    @property
    def needs_cache(self) -> bool:
        return any(t.kind in UNITS for t in self.terms)


def parse(spec: str) -> list[Term]:
    """Split a target into signed terms and check each one's syntax (no model needed)."""
    pieces = _SPLIT.split(spec.strip())
    signs = [1] + [1 if p == "+" else -1 for p in pieces[1::2]]
    terms = []
    for sign, piece in zip(signs, pieces[0::2]):
        piece = piece.strip()
        head, _, rest = piece.partition(":")
        if head in _KINDS:
            if not rest.strip():
                raise ClipTermError(f"empty {head} target: {piece!r}", hint=HINT)
            terms.append(Term(sign, head, rest.strip()))
            continue
        try:
            component = names.parse(piece)
        except ClipTermError:
            raise ClipTermError(f"unknown target {piece!r}", hint=HINT) from None
        if component.kind not in UNITS:
            raise ClipTermError(f"{piece} has no direction to search towards",
                                hint="use a head (L5.H2), an MLP or block (L5.MLP, S3.B1), a neuron (L9.N123) or an SAE feature (L4.F12)")
        if component.kind == "neuron" and (component.pc or 1) != 1:
            raise ClipTermError(f"neurons have one second-order direction: {piece}", hint=f"use {component.base}")
        terms.append(Term(sign, component.kind, str(component)))
    return terms


def require_cache(terms: list[Term], have_cache: bool) -> None:
    """Refuse head and neuron targets when no cache is given: their directions come from its statistics."""
    needing = [str(t) for t in terms if t.kind in UNITS]
    if needing and not have_cache:
        raise ClipTermError(f"target {needing[0]} needs a cache (its direction comes from the cache's statistics)",
                            hint="pass --cache NAME, built with this model (`clipterm cache build`)")


def resolve(spec: str, loaded: Any, reader: Any | None = None) -> Target:
    """The unit direction (D,) of a target under a loaded model, with a cache reader for components."""
    terms = parse(spec)
    require_cache(terms, reader is not None)
    total = None
    for term in terms:
        unit = F.normalize(_direction(term, loaded, reader).float().cpu(), dim=0)  # (D,)
        total = term.sign * unit if total is None else total + term.sign * unit
    if total is None or float(total.norm()) < 1e-6:
        raise ClipTermError(f"target {spec!r} is the zero vector", hint="its terms cancel out; give different ones")
    return Target(spec, terms, F.normalize(total, dim=0))


def _direction(term: Term, loaded: Any, reader: Any | None) -> torch.Tensor:
    if term.kind == "text":
        return _encode(loaded, [term.value])[0]
    if term.kind == "image":
        return image_direction(loaded, term.value)
    if term.kind == "class":
        return class_direction(loaded, term.value, reader)
    component = reader.tower.validate(names.parse(term.value))
    if component.kind in ("head", "mlp"):  # an MLP or a ConvNeXt block: the principal direction of its effects
        return head_direction(reader, str(component.base), component.pc or 1)
    if component.kind == "feature":
        return feature_direction(reader, loaded, component.layer, component.index)
    return neuron_direction(reader, component.layer, component.index)


def _encode(loaded: Any, texts: list[str]) -> torch.Tensor:
    from clipterm.vit.textencode import encode_texts

    return encode_texts(loaded.model, loaded.tokenizer, texts, normalize=True)  # (n, D)


def image_direction(loaded: Any, path: str) -> torch.Tensor:
    """The unit embedding (D,) of one image file."""
    from clipterm.inputs.images import MAX_ASPECT, MAX_PIXELS, SkipImage, decode

    file = Path(path).expanduser()
    if not file.is_file():
        raise ClipTermError(f"no image file {path}", hint="give a path to a PNG, JPEG, ... file", code=ExitCode.NOT_FOUND)
    try:
        image = decode(file, min_side=loaded.info.image_size)
    except SkipImage as exc:
        raise ClipTermError(f"cannot use image {path}: {exc}", hint=f"give an image file that decodes (PNG, JPEG, ...) of at most "
                            f"{MAX_PIXELS:,} pixels, its long side at most {MAX_ASPECT} times its short side",
                            code=ExitCode.INVALID_DATA) from None
    device = next(loaded.model.parameters()).device
    with torch.no_grad():
        embed = loaded.model.encode_image(loaded.preprocess(image)[None].to(device))[0]  # (D,)
    return F.normalize(embed.float(), dim=0)


def class_direction(loaded: Any, spec: str, reader: Any | None = None) -> torch.Tensor:
    """A class's template-averaged unit embedding (D,): the cache's classes first, then the toy world's
    (for the toy model), then ImageNet's. `TASK/NAME` picks the task when a name is in several."""
    from clipterm.analyses.ablation import class_weights, imagenet_templates, prompts_for

    task, _, name = spec.rpartition("/")
    kind, tasks = "", {}
    if reader is not None:
        kind, tasks = reader.manifest["dataset"].get("kind", ""), dict(reader.tasks)
    elif is_toy(loaded.info.spec):
        from clipterm.toyworld.world import TASKS

        kind, tasks = "toy", {t: list(classes) for t, classes in TASKS.items()}
    found = [t for t, classes in tasks.items() if name in classes and task in ("", t)]
    if len(found) > 1:
        raise ClipTermError(f"class {name!r} is in several tasks: {', '.join(found)}",
                            hint=f"name the task: {', '.join(f'class:{t}/{name}' for t in found)}")
    if found:
        return class_weights(lambda texts: _encode(loaded, texts), prompts_for(kind, found[0], [name], None))[0]
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    if not task and name in IMAGENET_CLASSNAMES and not is_toy(loaded.info.spec):
        return class_weights(lambda texts: _encode(loaded, texts), [[t.format(name) for t in imagenet_templates()]])[0]
    known = "; ".join(f"{t}: {', '.join(c[:8])}" for t, c in tasks.items()) or "ImageNet class names"
    raise ClipTermError(f"unknown class {spec!r}", hint=f"classes: {known}"[:300])


def head_direction(reader: Any, head: str, pc: int = 1) -> torch.Tensor:
    """The pc-th principal direction (D,) of a head's centred joint-space effects, from the cache's
    statistics: the top eigenvectors of R^T Σ R, found in head space (Σ the head-space covariance,
    R the readout). Its sign makes the mean effect project positively."""
    from clipterm.analyses.textspan import component_stats, head_moments

    count, total, outer, readout = component_stats(reader, head)
    moments = head_moments(count, total, outer, readout)  # covariance in orthonormal coordinates of R's row space
    rank = moments.cov.shape[0]
    if pc > rank:
        raise ClipTermError(f"{head} has {rank} principal directions, not {pc}", hint=f"use :pc1 .. :pc{rank}")
    values, vectors = torch.linalg.eigh(moments.cov)  # ascending
    direction = vectors[:, values.argsort(descending=True)[pc - 1]] @ moments.basis  # (D,)
    if float(direction @ moments.mean) < 0:
        direction = -direction
    return direction.float()


def feature_direction(reader: Any, loaded: Any, layer: int, index: int) -> torch.Tensor:
    """An SAE feature's direct effect (D,): its decoder direction through the tower's exact path to the embedding."""
    from clipterm.sae.features import effects
    from clipterm.sae.store import SaeFile

    sae_file = SaeFile(reader, layer)
    sae_file.check_feature(index)
    return effects(sae_file, loaded)[0][index]


def neuron_direction(reader: Any, layer: int, index: int) -> torch.Tensor:
    """A neuron's second-order principal direction (D,): `pc1` of the cache's `neurons.L{layer}.safetensors`."""
    from clipterm.cache.neurons import NeuronFile

    return NeuronFile(reader, layer).tensor("pc1")[index].float()  # (D,)
