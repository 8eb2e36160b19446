"""Image feature visualisation: gradient ascent on an image until a head, neuron or text direction fires.

Olah, Mordvintsev & Schubert, "Feature Visualization" (Distill, 2017), with lucid's defaults: the image is a
Fourier-space parameter whose frequencies are scaled by 1/f, its colours decorrelated by the square root of
ImageNet's colour covariance, then a sigmoid; every step sees it randomly padded, jittered, scaled and rotated,
so only features that survive those transforms grow. Diversity (lucid): K images at once, minus the cosine
similarity of their Gram matrices at a middle layer. Facets (`facets.py`): a probe of a lower layer weighs the
objective's attribution to that layer (Goh et al., 2021).

Objectives (`objective` picks where a target allows several); the tower's climb (`vit/climb.py`) scores units:
- a head `L5.H2[:pcK]` or a pool head `pool.H3`, `effect` (default): its direct effect along its principal
  (TextSpan) direction; `direction`: cos(image embedding, that direction);
- a ViT neuron `L4.N12`, `activation` (default): its post-activation at the class token; `effect`: its
  second-order effect through later heads along its principal direction; `direction`: cos(embedding, it);
- a ResNet channel `L3.N12` of any stage, `activation` (default): its mean over the grid (lucid's channel
  objective); `effect` (last stage): its direct effect through the attention pool along its principal direction;
- `text:`, `image:`, `class:` and sums of them: cos(image embedding, the target's unit direction).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from clipterm import names
from clipterm.errors import ClipTermError
from clipterm.vit.climb import Term, direction_score

OBJECTIVES = ("auto", "activation", "effect", "direction")
PARAMS = ("fourier", "pixel")
MAX_PIXELS = 1 << 26  # pixels optimised at once, all images together: 67M, about 3.2 GB at 48 bytes a pixel
# lucid's colour_correlation_svd_sqrt: the square root of ImageNet's RGB covariance.
COLOUR_SQRT = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])


@dataclass
class Config:
    steps: int = 128
    size: int | None = None  # side of the optimised image; default the model's input size
    images: int = 1  # K images optimised together (--diverse K)
    diversity: float = 0.0  # weight of lucid's Gram-similarity penalty; 0 for independent seeds
    objective: str = "auto"
    param: str = "fourier"
    lr: float = 0.05
    seed: int = 0
    every: int = 8  # a frame every this many steps
    facet_weight: float = 0.1


@dataclass
class Frame:
    """One step of the climb. `pixels` only on frame steps and the last: (K, S, S, 3) uint8."""

    step: int
    objective: float  # mean over the K images, before the diversity and facet terms
    elapsed: float
    pixels: Any = None
    done: bool = False


# --------------------------------------------------------------------------- the image parameter


class Image(torch.nn.Module):
    """K images as a parameter; `forward()` gives pixels (K, 3, S, S) in [0, 1]."""

    def __init__(self, images: int, size: int, param: str, generator: torch.Generator):
        super().__init__()
        self.size, self.param = size, param
        if param == "fourier":
            fy, fx = torch.fft.fftfreq(size)[:, None], torch.fft.rfftfreq(size)[None]  # (S, 1), (1, S//2+1)
            self.register_buffer("scale", 1 / (fy**2 + fx**2).sqrt().clamp(min=1 / size))  # (S, S//2+1)
            spectrum = 0.01 * torch.randn(images, 3, size, size // 2 + 1, 2, generator=generator)  # (K, 3, S, S//2+1, 2)
            self.spectrum = torch.nn.Parameter(spectrum)
        else:
            self.raw = torch.nn.Parameter(0.01 * torch.randn(images, 3, size, size, generator=generator))
        colour = COLOUR_SQRT / COLOUR_SQRT.norm(dim=0).max()  # (3, 3)
        self.register_buffer("colour", colour)

    def forward(self) -> Tensor:
        if self.param == "pixel":
            return torch.sigmoid(self.raw)  # (K, 3, S, S)
        spectrum = torch.view_as_complex(self.spectrum) * self.scale  # (K, 3, S, S//2+1)
        decorrelated = torch.fft.irfft2(spectrum, s=(self.size, self.size), norm="ortho") / 4  # (K, 3, S, S)
        rgb = torch.einsum("kcyx,dc->kdyx", decorrelated, self.colour)  # (K, 3, S, S)
        return torch.sigmoid(rgb)  # (K, 3, S, S)


def robust(pixels: Tensor, out_size: int, generator: torch.Generator) -> Tensor:
    """lucid's standard transforms, sized to the image: pad, jitter, scale, rotate, jitter; resize. (K, 3, S', S')."""
    size = pixels.shape[-1]
    pad, jitter = max(1, size // 16), max(1, size // 28)
    padded = F.pad(pixels, (pad,) * 4, value=0.5)  # (K, 3, S+2p, S+2p)
    padded = _crop(padded, jitter, generator)  # (K, 3, S+2p-j, ·)
    k = pixels.shape[0]
    angle = (torch.randint(-10, 11, (k,), generator=generator).float() * math.pi / 180)  # (K,)
    scale = 1 + (torch.randint(0, 11, (k,), generator=generator).float() - 5) / 50  # (K,)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    zero = torch.zeros(k)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)  # (K, 2, 3)
    grid = F.affine_grid(theta.to(pixels), list(padded.shape), align_corners=False)  # (K, H, W, 2)
    turned = F.grid_sample(padded, grid, padding_mode="border", align_corners=False)  # (K, 3, H, W)
    turned = _crop(turned, max(1, jitter // 2), generator)
    return F.interpolate(turned, size=(out_size, out_size), mode="bilinear", align_corners=False)  # (K, 3, S', S')


def _crop(pixels: Tensor, jitter: int, generator: torch.Generator) -> Tensor:
    dy, dx = torch.randint(0, jitter + 1, (2,), generator=generator).tolist()
    side = pixels.shape[-1] - jitter
    return pixels[..., dy : dy + side, dx : dx + side]


# --------------------------------------------------------------------------- objectives


@dataclass
class Objective:
    spec: str
    kind: str  # what was optimised: activation, effect or direction
    terms: list[Term] = field(default_factory=list)


def objective_for(spec: str, loaded: Any, reader: Any = None, objective: str = "auto", climb: Any = None) -> Objective:
    """The objective of a target of the search grammar (see `targets`); refuses what a target cannot mean. A unit's
    term comes from the tower's climb (`vit/climb.py`), which knows what its units can be asked for."""
    from clipterm.analyses import targets

    if objective not in OBJECTIVES:
        raise ClipTermError(f"unknown objective {objective!r}", hint=f"use one of {', '.join(OBJECTIVES[1:])}")
    parsed = targets.parse(spec)
    targets.require_cache(parsed, reader is not None)
    components = [t for t in parsed if t.kind in ("head", "neuron")]
    if objective == "direction" or not components:
        if objective in ("activation", "effect"):
            raise ClipTermError(f"{spec} is a direction, with no {objective}",
                                hint="drop --objective (it is `direction`)")
        return Objective(spec, "direction", [Term(1, "direction", targets.resolve(spec, loaded, reader).direction)])
    climb = climb or climb_for(loaded)
    units = [reader.tower.visual_unit(names.parse(t.value)) for t in components]
    kind = objective if objective != "auto" else climb.default_kind(units[0])

    def direction(comp: Any) -> Tensor:
        if comp.kind == "head":
            return targets.head_direction(reader, str(comp.base), comp.pc or 1)
        return targets.neuron_direction(reader, comp.layer, comp.index)

    terms, found = [], iter(units)
    for term in parsed:
        if term.kind in ("text", "image", "class", "feature"):  # a feature: its direct effect, as a direction
            terms.append(Term(term.sign, "direction", targets.resolve(str(term), loaded, reader).direction))
        else:
            terms.append(climb.unit_term(next(found), kind, term.sign, direction))
    return Objective(spec, kind, terms)


def climb_for(loaded: Any) -> Any:
    """The tower's differentiable forward with recordings (`vit/climb.py`); refuses a tower with nothing to climb."""
    from clipterm.vit.towers import climb_for as of_tower

    return of_tower(loaded)


def score(objective: Objective, climb: Any, recorder: Any, embeds: Tensor) -> Tensor:
    """The objective of each image of the batch: (B,)."""
    total = torch.zeros(embeds.shape[0], device=embeds.device)  # (B,)
    for term in objective.terms:
        value = direction_score(term, embeds) if term.kind == "direction" else climb.score(term, recorder, embeds)
        total = total + term.sign * value
    return total  # (B,)


def facet_term(facet: Any, climb: Any, recorder: Any, value: Tensor) -> Tensor:
    """The facet's part of the objective (`facets.py`), (B,): wᵀ(g ⊙ ∇f) for the article's form, through the graph
    of ∂f/∂g so that the climb follows it; log p(class) for `logprob`."""
    acts = climb.layer_acts(recorder, facet.layer)  # the layer's output as recorded
    if facet.objective == "logprob":
        return facet.log_prob(climb.tokens(acts))
    (grad,) = torch.autograd.grad(value.sum(), acts, create_graph=True)  # ∂f/∂g, shaped as g
    return facet.attribution(climb.tokens(acts), climb.tokens(grad))


def twice_differentiable(needed: bool) -> Any:
    """A context where attention runs on the math kernel, the one with a double backward (∇f is differentiated)."""
    import contextlib

    if not needed:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def unit_layers(objective: Objective, climb: Any) -> list[int]:
    """The layers the objective's units live in (a pool head above every stage); empty for directions."""
    return [climb.unit_layer(t) for t in objective.terms if t.kind != "direction"]


def check_facet(facet: Any, objective: Objective, climb: Any) -> None:
    """The article's facet reads the objective's attribution to a layer below every unit of the objective."""
    units = unit_layers(objective, climb)
    if facet is None or facet.objective == "logprob" or not units:
        return
    if facet.layer >= min(units):
        raise ClipTermError(f"--facet-layer {names.layer(facet.layer)} is not below the unit in "
                            f"{names.layer(min(units))}: the objective's attribution to it is zero",
                            hint=f"use --facet-layer {names.layer(max(min(units) - 1, 0))} or lower, or "
                                 "--facet-objective logprob")


def gram_similarity(tokens: Tensor, skip: int = 1) -> Tensor:
    """lucid's diversity term: the mean pairwise cosine similarity of the images' Gram matrices of tokens (B, T, W),
    past the first `skip` (a class token)."""
    patches = tokens[:, skip:].float()  # (B, P, W)
    grams = F.normalize((patches.transpose(1, 2) @ patches).flatten(1), dim=-1)  # (B, W*W)
    similar = grams @ grams.T  # (B, B)
    count = tokens.shape[0]
    return (similar.sum() - similar.diagonal().sum()) / max(count * (count - 1), 1)


# --------------------------------------------------------------------------- the climb


def check(config: Config, loaded: Any) -> int:
    """Refuse settings that cannot run; returns the image side."""
    size = config.size or loaded.info.image_size
    if config.steps < 1:
        raise ClipTermError(f"--steps must be at least 1 (got {config.steps})", hint="e.g. --steps 128")
    if size < loaded.info.patch_size:
        raise ClipTermError(f"--size {size} is smaller than the model's {loaded.info.patch_size}-pixel patch",
                            hint=f"use --size {loaded.info.patch_size} or more "
                                 f"(the model sees {loaded.info.image_size} px)")
    if config.images < 1:
        raise ClipTermError(f"--diverse must be at least 1 (got {config.images})", hint="e.g. --diverse 4")
    if config.images * size * size > MAX_PIXELS:
        raise ClipTermError(f"--diverse {config.images} images of --size {size} are {config.images * size * size:,} pixels: "
                            f"at most {MAX_PIXELS:,} (48 bytes a pixel for the image, its gradient and Adam's moments)",
                            hint=f"use fewer images or a smaller --size (e.g. --diverse {max(MAX_PIXELS // (size * size), 1)})")
    if config.param not in PARAMS:
        raise ClipTermError(f"unknown parametrisation {config.param!r}", hint=f"use one of {', '.join(PARAMS)}")
    return size


def visualise(loaded: Any, objective: Objective, config: Config, facet: Any = None,
              cancel: Callable[[], bool] = lambda: False, climb: Any = None) -> Iterator[Frame]:
    """Climb the objective; yields a Frame every step (pixels on every `every`-th and the last)."""
    climb = climb or climb_for(loaded)
    size = check(config, loaded)
    check_facet(facet, objective, climb)
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    image = Image(config.images, size, config.param, generator).to(climb.device)
    optimiser = torch.optim.Adam(image.parameters(), lr=config.lr)
    middle = climb.layers // 2
    blocks = {middle} if config.diversity and config.images > 1 else set()
    if facet is not None:
        blocks.add(facet.layer)
    trainable = [p for p in loaded.model.parameters() if p.requires_grad]
    for parameter in trainable:  # gradients reach the image only
        parameter.requires_grad_(False)
    recorder = climb.recorder(objective.terms, blocks)
    start = time.perf_counter()
    try:
        for step in range(1, config.steps + 1):
            pixels = robust(image(), loaded.info.image_size, generator)  # (K, 3, S', S')
            with twice_differentiable(facet is not None and facet.objective == "attribution"):
                embeds = climb.forward(pixels)  # (K, D)
            value = score(objective, climb, recorder, embeds)  # (K,)
            loss = -value.mean()
            if config.diversity and config.images > 1:
                tokens = climb.tokens(climb.layer_acts(recorder, middle))
                loss = loss + config.diversity * gram_similarity(tokens, 1 if climb.class_token else 0)
            if facet is not None:
                loss = loss - config.facet_weight * facet_term(facet, climb, recorder, value).mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            last = step == config.steps or cancel()
            shown = None
            if last or step % config.every == 0 or step == 1:
                with torch.no_grad():
                    shown = (image().permute(0, 2, 3, 1) * 255).round().byte().cpu().numpy()  # (K, S, S, 3)
            yield Frame(step, float(value.detach().mean()), time.perf_counter() - start, shown, last)
            if last:
                return
    finally:
        recorder.close()
        for parameter in trainable:
            parameter.requires_grad_(True)
