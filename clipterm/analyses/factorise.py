"""Factorise one image's activations over positions into a few parts (Olah et al., "The Building Blocks of
Interpretability", Distill 2018).

The post-activation values of the chosen MLP layers at every patch, clipped at 0, form a non-negative
(patches × neurons) matrix A; NMF writes A ≈ W·H with k factors, W (P, k) saying where each factor is and
H (k, F) which neurons it uses. PCA of the centred, unclipped A is the signed alternative. A factor is named
by its direct effect in joint space: its neurons' writes H·W_out into the residual stream, through the
linearised ln_post and proj, compared by cosine with a pool of text embeddings.

`center="position"` first subtracts each position's mean activation over a reference set of images (the
cache's first rows, or the toy world's training scenes), so that what position alone explains (most of the
variance on the shipped toy) does not split the image by place; what is left is clipped at 0 and factored.
ResNet activations (the last stage's channels at each cell) factor the same way, through vit.towers.
Class attributions factor in `classfactors.py`; both return a `Factorisation`.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from clipterm import names
from clipterm.analyses.spatial import (
    SpatialImage,
    model_hint,
    model_pixels,
    open_image,
    pool_embeddings,
)
from clipterm.errors import ClipTermError, ExitCode

METHODS = ("nmf", "pca")
CENTERS = ("auto", "position", "none")
REFERENCE_IMAGES = 64  # images whose per-position mean is subtracted under center="position"
HALF = 0.5  # `segments`: a pixel is its strongest factor's where that factor is at least half its own maximum
_MEANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass
class Factor:
    grid: Tensor  # (g, g) where the factor is: its column of W
    share: float  # NMF: its part of Σ_j ‖W_j H_j‖_F; PCA: its part of the variance
    direction: Tensor  # (D,) unit direct effect in joint space of its neuron loadings
    texts: list[tuple[str, float]] = field(default_factory=list)  # nearest pool texts (cosines), or top classes (weights)
    spread: float | None = None  # class factors: how many classes it spans, (Σw)²/Σw² of its class weights


@dataclass
class Factorisation:
    """k factors of one image, largest first."""

    factors: list[Factor]
    method: str  # "nmf" or "pca"
    layers: list[int]
    error: float  # ‖A − W·H‖_F / ‖A‖_F
    of: str = "activations"  # or "classes": what was factored
    center: str = "none"  # "position": each position's mean over reference images subtracted first

    def strengths(self, size: int) -> Tensor:
        """(k, size, size) in [0, 1]: each factor's map upsampled bilinearly over its own maximum (negatives clipped)."""
        grids = torch.stack([f.grid for f in self.factors]).float()  # (k, g, g)
        up = F.interpolate(grids[None], size=(size, size), mode="bilinear", align_corners=False)[0].clamp(min=0)  # (k, S, S)
        return up / up.amax(dim=(1, 2), keepdim=True).clamp(min=1e-12)  # (k, S, S)

    def assignment(self, size: int) -> Tensor:
        """(size, size) int64: the strongest factor at each pixel (Building Blocks' one colour per factor)."""
        return self.strengths(size).argmax(0)  # (S, S)

    def segments(self, size: int) -> Tensor:
        """(k, size, size) bool: each pixel is its strongest factor's where that factor is ≥ HALF its own maximum,
        else nobody's, so k = 2 factors can leave the background out."""
        strengths = self.strengths(size)  # (k, S, S)
        strongest = strengths.argmax(0)  # (S, S)
        return torch.stack([(strongest == i) & (strengths[i] >= HALF) for i in range(len(strengths))])  # (k, S, S)

    @property
    def title(self) -> str:
        what = "class attributions" if self.of == "classes" else "activations" + (
            ", position-centred" if self.center == "position" else "")
        return f"{len(self.factors)} {self.method.upper()} factors of {what}"

    def to_json(self) -> dict[str, Any]:
        def named(f: Factor) -> dict[str, Any]:
            if self.of == "classes":
                return {"classes": [{"class": t, "weight": round(w, 6)} for t, w in f.texts],
                        "classes_spanned": round(f.spread or 0.0, 4)}
            return {"texts": [{"text": t, "cosine": round(c, 6)} for t, c in f.texts]}

        return {"method": self.method, "of": self.of, "center": self.center, "layers": names.format_layers(self.layers),
                "k": len(self.factors), "relative_error": round(self.error, 6),
                "factors": [{"factor": i, "share": round(f.share, 6), **named(f),
                             "grid": [[round(float(v), 6) for v in row] for row in f.grid]}
                            for i, f in enumerate(self.factors)]}


def check_k(k: int, patches: int) -> None:
    """K < 1 or more factors than patches: a one-line refusal."""
    if k < 1:
        raise ClipTermError(f"--nmf {k}: a factorisation needs at least 1 factor", hint="e.g. --nmf 3")
    if k > patches:
        raise ClipTermError(f"--nmf {k}: more factors than the image has patches ({patches})", hint="use fewer factors")


def factorise(image: str | SpatialImage, k: int, *, loaded: Any, reader: Any = None, layers: list[int] | None = None,
              method: str = "nmf", pool: str | tuple[Tensor, list[str]] | None = "auto", n_texts: int = 5,
              cache_dir: Any = None, center: str = "auto") -> Factorisation:
    """Split an image's per-patch activations of `layers` into k factors, each with its map and nearest texts.

    `pool`: a pool name (`auto`: the model's default pool), (unit embeddings (C, D), texts), or None for no texts.
    `center`: `position` subtracts each position's mean over reference images first; `auto` does so wherever
    reference images are at hand (a cache, or the toy world for a toy model), `none` never."""
    from clipterm.vit.towers import activation_directions, position_activations, position_layers

    if method not in METHODS:
        raise ClipTermError(f"unknown factorisation {method!r}", hint="use nmf or pca")
    if center not in CENTERS:
        raise ClipTermError(f"unknown centring {center!r}", hint="use auto, position or none")
    if k < 1:
        check_k(k, 1)
    if loaded is None:
        raise ClipTermError("factorising needs per-patch activations, so a forward pass", hint=model_hint(reader))
    if loaded.info.tower not in ("vit", "resnet"):
        raise ClipTermError(f"factorising reads per-position activations of a ViT or a ResNet, and {loaded.info.spec} "
                            f"is a {loaded.info.tower}", hint="map a component or a text query instead",
                            code=ExitCode.UNSUPPORTED)
    image = open_image(image, reader) if isinstance(image, str) else image
    layers = position_layers(loaded.model, layers, loaded.info.layers)
    activations = position_activations(loaded.model, model_pixels(loaded, image), layers)[0].double()  # (P, F)
    check_k(k, activations.shape[0])
    refs = reference_images(loaded, reader) if center != "none" else None
    if center == "position" and refs is None:
        raise ClipTermError(f"--center position needs reference images, and {loaded.info.spec} without a cache has none",
                            hint="pass --cache (its first rows are the reference), or --center none")
    if refs is not None:
        activations = activations - position_means(loaded, layers, refs).double()  # (P, F)
    maps, loadings, shares, error = (_nmf if method == "nmf" else _pca)(activations, k)  # (P, k), (k, F), (k,)
    directions = activation_directions(loaded.model, layers, loadings.float())  # (k, D)
    embeds, texts = pool_embeddings(loaded, pool, cache_dir) if isinstance(pool, str) else (pool or (None, None))
    side = int(round(activations.shape[0] ** 0.5))
    factors = []
    for i in shares.argsort(descending=True).tolist():
        nearest = []
        if embeds is not None:
            cosines = embeds.float() @ directions[i]  # (C,)
            top = cosines.topk(min(n_texts, len(texts)))
            nearest = [(texts[j], float(c)) for c, j in zip(top.values, top.indices.tolist())]
        factors.append(Factor(maps[:, i].float().reshape(side, side), float(shares[i]), directions[i], nearest))
    return Factorisation(factors, method, layers, error, center="position" if refs is not None else "none")


def reference_images(loaded: Any, reader: Any = None) -> list[SpatialImage] | None:
    """Images whose per-position mean is subtracted: the cache's first REFERENCE_IMAGES readable rows, or the first
    scenes of the toy world's training seed for a toy model; None when there are none."""
    from clipterm.inputs.images import synthetic_image, toy_id
    from clipterm.vit.models import is_toy

    if reader is not None:
        refs = [open_image(f"row:{row}", reader) for row in range(min(reader.n, REFERENCE_IMAGES))]
        return [ref for ref in refs if ref.image is not None] or None
    if is_toy(loaded.info.spec):
        from clipterm.toyworld.evaluate import model_world

        ids = [toy_id(0, i, model_world(loaded.info.spec)) for i in range(REFERENCE_IMAGES)]
        return [SpatialImage(ref, synthetic_image(ref)) for ref in ids]
    return None


def position_means(loaded: Any, layers: list[int], refs: list[SpatialImage]) -> Tensor:
    """(P, F) each position's mean activation over the reference images, computed once per model and set."""
    from clipterm.vit.towers import position_activations

    key = (tuple(layers), tuple(ref.ref for ref in refs))
    memo = _MEANS.setdefault(loaded.model, {})
    if key not in memo:
        total = None
        for start in range(0, len(refs), 16):
            pixels = torch.cat([model_pixels(loaded, ref) for ref in refs[start : start + 16]])  # (b, 3, S, S)
            part = position_activations(loaded.model, pixels, layers).double().sum(0)  # (P, F)
            total = part if total is None else total + part
        memo[key] = total / len(refs)  # (P, F)
    return memo[key]


def _nmf(activations: Tensor, k: int, what: str = "activation") -> tuple[Tensor, Tensor, Tensor, float]:
    """NMF of the matrix clipped at 0: W (P, k), H (k, F), each factor's share of Σ‖W_j H_j‖, relative error."""
    from sklearn.decomposition import NMF
    from sklearn.exceptions import ConvergenceWarning

    positive = activations.clamp(min=0)  # (P, F)
    if float(positive.max()) <= 0:
        raise ClipTermError(f"every {what} of these layers is ≤ 0 for this image: nothing to factorise",
                            hint="pick another layer")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = NMF(n_components=k, init="nndsvda", max_iter=500, random_state=0)
        maps = torch.from_numpy(model.fit_transform(positive.numpy()))  # (P, k)
    loadings = torch.from_numpy(model.components_)  # (k, F)
    sizes = maps.norm(dim=0) * loadings.norm(dim=1)  # (k,) ‖W_j H_j‖_F of a rank-one term
    error = float((positive - maps @ loadings).norm() / positive.norm())
    return maps, loadings, sizes / sizes.sum().clamp(min=1e-12), error


def _pca(activations: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor, float]:
    """PCA of the centred activations: scores (P, k), components (k, F), explained variance shares, relative error."""
    centred = activations - activations.mean(0)  # (P, F)
    u, s, vh = torch.linalg.svd(centred, full_matrices=False)  # (P, r), (r,), (r, F)
    k = min(k, s.numel())
    maps, loadings = u[:, :k] * s[:k], vh[:k]  # (P, k), (k, F)
    flip = torch.sign(maps.gather(0, maps.abs().argmax(0, keepdim=True)))[0]  # (k,) so each map peaks positive
    maps, loadings = maps * flip, loadings * flip[:, None]
    variance = s**2  # (r,)
    error = float((centred - maps @ loadings).norm() / activations.norm().clamp(min=1e-12))
    return maps, loadings, variance[:k] / variance.sum().clamp(min=1e-12), error


def factor_directions(model: Any, layers: list[int], loadings: Tensor) -> Tensor:
    """Unit joint-space direct effects (k, D) of neuron loadings (k, |layers|·M) over the MLPs of `layers`.

    Each layer's block of a loading is written into the residual by c_proj (with LayerScale), then centred,
    scaled by ln_post's γ and projected, as `decompose` does for an MLP's class-token output."""
    from clipterm.vit.decompose import layer_scale_vector, ln_post_affine, refuse_neuron_split, vision_tower

    visual = vision_tower(model)
    refuse_neuron_split(visual)
    width = visual.transformer.width
    gamma, _, proj = ln_post_affine(visual)  # (W,), (W,), (W, D)
    per_layer = loadings.to(gamma.device).reshape(len(loadings), len(layers), -1)  # (k, l, M)
    writes = torch.zeros(len(loadings), width, device=gamma.device)  # (k, W)
    with torch.no_grad():
        for i, layer in enumerate(layers):
            block = visual.transformer.resblocks[layer]
            c_proj = block.mlp.c_proj.weight.float()  # (W, M)
            writes += (per_layer[:, i] @ c_proj.T) * layer_scale_vector(block.ls_2, width, gamma.device)  # (k, W)
        joint = ((writes - writes.mean(-1, keepdim=True)) * gamma) @ proj  # (k, D)
    return F.normalize(joint, dim=-1).cpu()  # (k, D)
