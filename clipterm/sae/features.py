"""What an SAE feature means: how often and how strongly it fires, the texts nearest its exact effect on the
embedding, and what removing it (or replacing the residual by the SAE's reconstruction) costs each task.

- **Effects.** A feature writes `f · W_dec[f] / norm_scale` into the residual. Its decoder direction, carried
  to the embedding through the tower's exact linear path (`clipterm.vit.sites.direction_effects`), is its
  direct effect (through the class token, ln_post and the projection) and its second-order effect (through
  the later heads' values, attention spread evenly). Each is described by the nearest texts of a pool.
- **Ablation.** A forward hook at the site removes `f(x) · W_dec[f] / norm_scale` from every token it fires
  on and the model runs on; the per-task accuracy drop comes with a bootstrap interval, as `ablate`'s.
- **Splicing.** The same hook replaces the residual by the reconstruction: the SAE's faithfulness in accuracy.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from clipterm import names
from clipterm.sae.capture import image_batches
from clipterm.sae.store import SaeFile
from clipterm.sae.train import site_for


@dataclass
class FeatureRow:
    component: str
    index: int
    frequency: float  # share of images on which it fires (on any token)
    mean_activation: float  # mean per-image maximum, over the images it fires on
    texts: list[str]  # nearest texts to its direct effect, nearest first
    second_order_texts: list[str]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def effects(sae_file: SaeFile, loaded: Any) -> tuple[Tensor, Tensor]:
    """(direct (F, D), second-order (F, D)) effects of every feature's unit decoder direction."""
    from clipterm.vit.sites import direction_effects

    w = sae_file.sae.W_dec.detach()
    return direction_effects(loaded.model, sae_file.layer, F.normalize(w, dim=-1))


@torch.no_grad()
def image_effects(sae_file: SaeFile, loaded: Any, features: list[int], top: int = 20) -> Tensor:
    """(m, D) each feature's mean effect on the embedding over its `top` images, through the exact linear path with
    each image's attention and norms frozen: the class token's direct path plus every later head's value path,
    weighted by how much the class token attends to the tokens the feature fires on (as for neurons)."""
    from clipterm.vit.sites import frozen_terms, path_vectors

    from clipterm.vit.towers import refuse_model_analysis

    refuse_model_analysis(loaded.model, "frozen-attention feature effects")
    sae = sae_file.sae
    direct, paths = path_vectors(loaded.model, sae_file.layer, sae.W_dec.detach()[features])  # (m, D), (m, K, D)
    out = []
    for j, f in enumerate(features):
        rows, _ = top_images(sae_file, f, top)
        pixels = torch.cat([p for _, p in image_batches(sae_file.reader, loaded, rows.tolist(), top, "cpu")])
        attn_rows, sigma, tokens = frozen_terms(loaded.model, sae_file.layer, pixels)
        a = sae.encode(tokens.float())[..., f]  # (B, T)
        scalars = (attn_rows * a[:, None, :]).sum(-1)  # (B, K)
        effect = (a[:, :1] * direct[j] + scalars @ paths[j]) / (sigma[:, None] * sae.norm_scale)  # (B, D)
        out.append(effect.mean(0))
    return torch.stack(out)


def nearest(effect: Tensor, text_embeds: Tensor, n: int) -> Tensor:
    """(F, n) indices of the texts whose unit embeddings are nearest each effect (cosine)."""
    sims = F.normalize(effect.float(), dim=-1) @ F.normalize(text_embeds.float(), dim=-1).T  # (F, P)
    return sims.topk(min(n, sims.shape[1]), dim=-1).indices


def feature_table(sae_file: SaeFile, loaded: Any, text_embeds: Tensor, texts: list[str], n_texts: int = 3,
                  top: int | None = None) -> list[FeatureRow]:
    """Every feature that fires, strongest first (frequency × mean activation), with its nearest texts."""
    image_max = sae_file.image_max  # (N, F)
    fires = image_max > 0
    frequency = fires.float().mean(0)  # (F,)
    mean = (image_max.sum(0) / fires.sum(0).clamp(min=1))  # (F,)
    order = [int(i) for i in (frequency * mean).argsort(descending=True) if frequency[i] > 0]
    order = order[:top] if top else order
    try:
        direct, second = effects(sae_file, loaded)
        near, near2 = nearest(direct[order], text_embeds, n_texts), nearest(second[order], text_embeds, n_texts)
    except Exception as exc:  # noqa: BLE001 - a tower without an exact path: no texts, the rest still holds
        from clipterm.errors import ClipTermError

        if not isinstance(exc, ClipTermError):
            raise
        near = near2 = None
    rows = []
    for k, i in enumerate(order):
        t1 = [texts[j] for j in near[k].tolist()] if near is not None else []
        t2 = [texts[j] for j in near2[k].tolist()] if near2 is not None else []
        rows.append(FeatureRow(names.feature(sae_file.layer, i), i, round(float(frequency[i]), 4),
                               round(float(mean[i]), 4), t1, t2))
    return rows


def top_images(sae_file: SaeFile, index: int, k: int) -> tuple[Tensor, Tensor]:
    """(rows, values) of the k images where the feature is strongest (its maximum over tokens)."""
    sae_file.check_feature(index)
    column = sae_file.image_max[:, index]
    values, rows = column.topk(min(k, len(column)))
    return rows, values


# --------------------------------------------------------------------------- runs with the residual edited


@contextmanager
def edited(site: Any, sae_file: SaeFile, mode: str, features: list[int] | None = None) -> Iterator[None]:
    """A hook at the site: `splice` replaces the trained tokens by the reconstruction; `ablate` removes the
    given features' writes from them. For `cls` SAEs only the class token (the summary) is edited."""
    sae = sae_file.sae
    cls = sae_file.tokens == "cls"

    def hook(_module, _inputs, output):
        tokens = site.tokens(output)
        x = site.summary(tokens).unsqueeze(1) if cls else tokens  # (B, T', W)
        f = sae.encode(x.float())
        if mode == "splice":
            delta = sae.decode(f) - x.float()
        else:
            keep = torch.zeros(f.shape[-1], dtype=f.dtype, device=f.device)
            keep[features] = 1
            delta = -((f * keep) @ sae.W_dec) / sae.norm_scale
        if cls:
            delta = delta.expand(-1, tokens.shape[1], -1) if not site.class_token else \
                torch.cat([delta, torch.zeros_like(tokens[:, 1:])], 1)
        return site.replace(output, tokens + delta.to(tokens.dtype))

    handle = site.module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def embeds_with(reader: Any, loaded: Any, sae_file: SaeFile, mode: str | None, features: list[int] | None = None,
                batch_size: int = 64, device: str = "cpu") -> Tensor:
    """(N, D) image embeddings of every cache row with the residual edited (`mode` None: unedited)."""
    site = site_for(loaded, sae_file.layer)
    out = torch.empty(reader.n, reader.image_embeds([0]).shape[-1])
    for rows, pixels in image_batches(reader, loaded, list(range(reader.n)), batch_size, device):
        if mode is None:
            out[rows] = loaded.model.encode_image(pixels).float().cpu()
            continue
        with edited(site, sae_file, mode, features):
            out[rows] = loaded.model.encode_image(pixels).float().cpu()
    return out


def accuracy_drops(reader: Any, scorings: dict[str, Any], embeds: Tensor, draws: int = 1000) -> dict[str, dict]:
    """Per task: accuracy before and after, and the drop with its bootstrap 95% interval."""
    from clipterm.analyses.ablation import bootstrap_drop

    shift = embeds - reader.image_embeds()  # (N, D)
    out = {}
    for task, scoring in scorings.items():
        before, after = scoring.outcome(), scoring.outcome(shift)
        drop, lo, hi = bootstrap_drop(before, after, draws)
        out[task] = {"before": round(float(before.float().mean()), 4), "after": round(float(after.float().mean()), 4),
                     "drop": round(drop, 4), "low": round(lo, 4), "high": round(hi, 4)}
    return out
