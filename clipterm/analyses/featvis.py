"""Image feature visualisation: gradient ascent on an image until a head, neuron or text direction fires.

Olah, Mordvintsev & Schubert, "Feature Visualization" (Distill, 2017), with lucid's defaults: the image is a
Fourier-space parameter whose frequencies are scaled by 1/f, its colours decorrelated by the square root of
ImageNet's colour covariance, then a sigmoid; every step sees it randomly padded, jittered, scaled and rotated,
so only features that survive those transforms grow. Diversity (lucid): K images at once, minus the cosine
similarity of their Gram matrices at a middle layer. Facets (`facets.py`): a probe of a lower layer weighs the
objective's attribution to that layer (Goh et al., 2021).

Objectives (`objective` picks where a target allows several):
- a head `L5.H2[:pcK]`, `effect` (default): its direct effect, CLS output / σ_post @ R_h, along its principal
  (TextSpan) direction; `direction`: cos(image embedding, that direction);
- a neuron `L4.N12`, `activation` (default): its post-activation at the class token; `effect`: its
  second-order effect through later heads along its principal direction; `direction`: cos(embedding, it);
- `text:`, `image:`, `class:` and sums of them: cos(image embedding, the target's unit direction).
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from clipterm import names
from clipterm.errors import ClipTermError

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


# --------------------------------------------------------------------------- what one forward pass records


class Recorder:
    """Forward hooks on the model's own modules, so the forward pass is the model's plain (fused) one. Only passes
    run by the thread that made it are recorded: a TUI worker may share the model with another at the same time."""

    def __init__(self, visual: Any, ln_1: set[int] = frozenset(), gelu: set[int] = frozenset(),
                 blocks: set[int] = frozenset()):
        self.saved: dict[tuple[str, int], Tensor] = {}
        self.hooks = []
        self.thread = threading.get_ident()
        for layer in ln_1:  # the ln_1 input (residual) and output, for attention rows and σ
            module = visual.transformer.resblocks[layer].ln_1
            self.hooks.append(module.register_forward_hook(self._keep("ln_1", layer, with_input=True)))
        for layer in gelu:
            gelu_module = visual.transformer.resblocks[layer].mlp.gelu
            self.hooks.append(gelu_module.register_forward_hook(self._keep("gelu", layer)))
        for layer in blocks:
            self.hooks.append(visual.transformer.resblocks[layer].register_forward_hook(self._keep("block", layer)))
        self.hooks.append(visual.ln_post.register_forward_hook(self._keep("ln_post", 0, with_input=True)))

    def _keep(self, kind: str, layer: int, with_input: bool = False) -> Callable:
        def hook(_module, inputs, output):
            if threading.get_ident() != self.thread:
                return
            self.saved[(kind, layer)] = output[0] if isinstance(output, tuple) else output
            if with_input:
                self.saved[(kind + "_in", layer)] = inputs[0]
        return hook

    def final_residual(self) -> Tensor:
        residual = self.saved[("ln_post_in", 0)]  # (B, N, W) or (B, W)
        return residual[:, 0] if residual.dim() == 3 else residual  # (B, W)

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()


def _sigma(residual: Tensor, eps: float) -> Tensor:
    return (residual.float().var(-1, unbiased=False) + eps).sqrt()  # (...,)


def _cls_attention(attn: Any, normed: Tensor) -> tuple[Tensor, Tensor]:
    """The class token's attention row (B, H, T) and its per-head output (B, H, dh), from ln_1's output."""
    from clipterm.vit.decompose import attention_qkv

    q, k, v, scale = attention_qkv(attn, normed)  # (B, H, T, dh) each
    row = (q[:, :, :1] @ k.transpose(-1, -2) * scale).softmax(-1)  # (B, H, 1, T)
    return row[:, :, 0], (row @ v)[:, :, 0]  # (B, H, T), (B, H, dh)


# --------------------------------------------------------------------------- objectives


@dataclass
class Term:
    """One signed part of an objective: `score(recorder, embeds, σ_post)` gives (B,)."""

    sign: int
    kind: str  # direction, head_effect, neuron_activation, neuron_effect
    direction: Tensor | None = None  # (D,) unit
    layer: int = 0
    index: int = 0
    path_gains: Tensor | None = None  # (K,) for neuron_effect: each later head's path vector · direction


@dataclass
class Objective:
    spec: str
    kind: str  # what was optimised: activation, effect or direction
    terms: list[Term] = field(default_factory=list)


def objective_for(spec: str, loaded: Any, reader: Any = None, objective: str = "auto") -> Objective:
    """The objective of a target of the search grammar (see `targets`); refuses what a target cannot mean."""
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
    kind = objective if objective != "auto" else ("effect" if components[0].kind == "head" else "activation")
    terms = []
    for term in parsed:
        if term.kind in ("text", "image", "class", "feature"):  # a feature: its direct effect, as a direction
            terms.append(Term(term.sign, "direction", targets.resolve(str(term), loaded, reader).direction))
            continue
        comp = reader.tower.validate(names.parse(term.value))
        if comp.kind == "head":
            if kind == "activation":
                raise ClipTermError(f"{comp} is a head: it has an effect, not an activation",
                                    hint="use --objective effect or direction")
            direction = targets.head_direction(reader, str(comp.base), comp.pc or 1)
            terms.append(Term(term.sign, "head_effect", direction, comp.layer, comp.index))
        elif kind == "activation":
            terms.append(Term(term.sign, "neuron_activation", None, comp.layer, comp.index))
        else:
            from clipterm.vit.second_order import check_layer, path_vectors

            check_layer(reader.shape.layers, comp.layer)
            direction = targets.neuron_direction(reader, comp.layer, comp.index)  # (D,)
            vectors = path_vectors(loaded.model, comp.layer, neurons=[comp.index])[0].cpu()  # (K, D)
            terms.append(Term(term.sign, "neuron_effect", direction, comp.layer, comp.index, vectors @ direction))
    return Objective(spec, kind, terms)


def hooks_for(objective: Objective, n_layers: int) -> tuple[set[int], set[int]]:
    """The layers whose ln_1 and whose MLP activation an objective reads."""
    ln_1, gelu = set(), set()
    for term in objective.terms:
        if term.kind == "head_effect":
            ln_1.add(term.layer)
        elif term.kind == "neuron_activation":
            gelu.add(term.layer)
        elif term.kind == "neuron_effect":
            gelu.add(term.layer)
            ln_1.update(range(term.layer + 1, n_layers))
    return ln_1, gelu


def score(objective: Objective, recorder: Recorder, visual: Any, embeds: Tensor, readout: Tensor) -> Tensor:
    """The objective of each image of the batch: (B,)."""
    sigma_post = _sigma(recorder.final_residual(), visual.ln_post.eps)  # (B,)
    total = torch.zeros(embeds.shape[0], device=embeds.device)  # (B,)
    for term in objective.terms:
        if term.kind == "direction":
            value = F.cosine_similarity(embeds.float(), term.direction.to(embeds.device)[None], dim=-1)  # (B,)
        elif term.kind == "head_effect":
            attn = visual.transformer.resblocks[term.layer].attn
            _, heads_out = _cls_attention(attn, recorder.saved[("ln_1", term.layer)])  # (B, H, dh)
            along = readout[term.layer, term.index].to(embeds.device) @ term.direction.to(embeds.device)  # (dh,)
            value = heads_out[:, term.index].float() @ along / sigma_post  # (B,)
        elif term.kind == "neuron_activation":
            value = recorder.saved[("gelu", term.layer)][:, 0, term.index].float()  # (B,)
        else:  # the second-order scalars s_k of the neuron, dotted with its path gains
            acts = recorder.saved[("gelu", term.layer)][:, :, term.index].float()  # (B, T)
            scalars = []
            for later in range(term.layer + 1, len(visual.transformer.resblocks)):
                block = visual.transformer.resblocks[later]
                row, _ = _cls_attention(block.attn, recorder.saved[("ln_1", later)])  # (B, H, T)
                sigma = _sigma(recorder.saved[("ln_1_in", later)], block.ln_1.eps)  # (B, T)
                scalars.append(torch.einsum("bht,bt->bh", row.float() / sigma[:, None], acts))  # (B, H)
            value = torch.cat(scalars, 1) @ term.path_gains.to(embeds.device) / sigma_post  # (B,)
        total = total + term.sign * value
    return total  # (B,)


def facet_term(facet: Any, recorder: Recorder, value: Tensor) -> Tensor:
    """The facet's part of the objective (`facets.py`), (B,): wᵀ(g ⊙ ∇f) for the article's form, through the graph
    of ∂f/∂g so that the climb follows it; log p(class) for `logprob`."""
    acts = recorder.saved[("block", facet.layer)]  # (B, T, W)
    if facet.objective == "logprob":
        return facet.log_prob(acts)
    (grad,) = torch.autograd.grad(value.sum(), acts, create_graph=True)  # (B, T, W)
    return facet.attribution(acts, grad)


def twice_differentiable(needed: bool) -> Any:
    """A context where attention runs on the math kernel, the one with a double backward (∇f is differentiated)."""
    import contextlib

    if not needed:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def check_facet(facet: Any, objective: Objective) -> None:
    """The article's facet reads the objective's attribution to a layer below every unit of the objective."""
    units = [t for t in objective.terms if t.kind != "direction"]
    if facet is None or facet.objective == "logprob" or not units:
        return
    lowest = min(units, key=lambda t: t.layer)
    if facet.layer >= lowest.layer:
        raise ClipTermError(f"--facet-layer {names.layer(facet.layer)} is not below the unit in "
                            f"{names.layer(lowest.layer)}: the objective's attribution to it is zero",
                            hint=f"use --facet-layer {names.layer(max(lowest.layer - 1, 0))} or lower, or "
                                 "--facet-objective logprob")


def gram_similarity(tokens: Tensor) -> Tensor:
    """lucid's diversity term: the mean pairwise cosine similarity of the images' Gram matrices of tokens (B, T, W)."""
    patches = tokens[:, 1:].float()  # (B, P, W)
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
              cancel: Callable[[], bool] = lambda: False) -> Iterator[Frame]:
    """Climb the objective; yields a Frame every step (pixels on every `every`-th and the last)."""
    from clipterm.vit.decompose import readout as readout_of
    from clipterm.vit.decompose import vision_tower
    from clipterm.vit.towers import refuse_model_analysis

    refuse_model_analysis(loaded.model, "feature visualisation")
    size = check(config, loaded)
    check_facet(facet, objective)
    visual = vision_tower(loaded.model)
    device = visual.conv1.weight.device
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    image = Image(config.images, size, config.param, generator).to(device)
    optimiser = torch.optim.Adam(image.parameters(), lr=config.lr)
    mean = torch.tensor(visual.image_mean or (0.5,) * 3, device=device).view(1, 3, 1, 1)
    std = torch.tensor(visual.image_std or (0.5,) * 3, device=device).view(1, 3, 1, 1)
    n_layers = len(visual.transformer.resblocks)
    ln_1, gelu = hooks_for(objective, n_layers)
    blocks = {n_layers // 2} if config.diversity and config.images > 1 else set()
    if facet is not None:
        blocks.add(facet.layer)
    readout = readout_of(loaded.model).to(device) if any(t.kind == "head_effect" for t in objective.terms) else None
    trainable = [p for p in loaded.model.parameters() if p.requires_grad]
    for parameter in trainable:  # gradients reach the image only
        parameter.requires_grad_(False)
    recorder = Recorder(visual, ln_1, gelu, blocks)
    start = time.perf_counter()
    try:
        for step in range(1, config.steps + 1):
            pixels = robust(image(), loaded.info.image_size, generator)  # (K, 3, S', S')
            with twice_differentiable(facet is not None and facet.objective == "attribution"):
                embeds = visual((pixels - mean) / std)  # (K, D)
            value = score(objective, recorder, visual, embeds, readout)  # (K,)
            loss = -value.mean()
            if blocks and config.diversity and config.images > 1:
                loss = loss + config.diversity * gram_similarity(recorder.saved[("block", n_layers // 2)])
            if facet is not None:
                loss = loss - config.facet_weight * facet_term(facet, recorder, value).mean()
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
