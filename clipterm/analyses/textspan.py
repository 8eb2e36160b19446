"""TextSpan: describe a head's output space by a few texts (Gandelsman, Efros, Steinhardt, ICLR 2024).

Algorithm 1 of "Interpreting CLIP's Image Representation via Text-Based Decomposition", as in
the reference `replace_with_iterative_removal` (github.com/yossigandelsman/clip_text_span):
project the unit text embeddings onto the top-r right singular subspace of the head's
(uncentred) joint-space effects, centre the effects, then repeatedly pick the text whose
projection of the effects has the largest variance, and deflate effects and texts along it.

Everything the algorithm touches is a second moment of the effects, so it runs here from the
head's sufficient statistics (count, sum, sum of outer products in head space) and its readout
R (dh, D), never from per-image rows: a head of ViT-B-32 takes milliseconds. Work happens in
orthonormal coordinates of R's row space (rho <= dh dimensions), where joint-space inner
products are preserved. The same code serves an MLP, with R = I and its joint-space stats.

`--convention reference` runs the same algorithm on the reference's own head effects (ln_post's
mean and β in equal shares, each image divided by its ‖e‖; see `conventions.py`), which factor as
(dh+3) coordinates per image times a fixed readout, at the reference's rank min(N, dh).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class SpanResult:
    """The texts chosen for one component, in order, and how much of its variance they explain."""

    indices: list[int]  # rows of the text pool, in the order chosen
    explained: list[float]  # fraction of the component's variance along each chosen (deflated) text
    cumulative: list[float]  # running total of `explained`
    total_variance: float  # trace of the centred covariance of the joint-space effects
    directions: torch.Tensor  # (k, D) orthonormal joint-space directions of the chosen texts
    mean: torch.Tensor  # (D,) mean joint-space effect
    baseline: float | None = None  # share of variance in the span of as many random pool texts (mean of draws)


@dataclass
class _Moments:
    """A component's effects in orthonormal coordinates of its readout's row space."""

    basis: torch.Tensor  # (rho, D) orthonormal rows spanning the readout's row space
    second: torch.Tensor  # (rho, rho) uncentred second moment of the coordinates
    cov: torch.Tensor  # (rho, rho) centred covariance (unbiased, as torch.std)
    mean: torch.Tensor  # (D,) mean joint-space effect


def head_moments(count: float, total: torch.Tensor, outer: torch.Tensor, readout: torch.Tensor) -> _Moments:
    readout = readout.double()  # (dh, D)
    left, singular, right = torch.linalg.svd(readout, full_matrices=False)  # (dh, k) (k,) (k, D)
    keep = singular > singular.max() * 1e-9
    to_coords = left[:, keep] * singular[keep]  # (dh, rho): coords = head_out @ to_coords
    mean = total.double() / count  # (dh,)
    centred = (outer.double() - count * torch.outer(mean, mean)) / max(count - 1.0, 1.0)  # (dh, dh)
    return _Moments(
        basis=right[keep],  # (rho, D)
        second=to_coords.T @ (outer.double() / count) @ to_coords,  # (rho, rho)
        cov=to_coords.T @ centred @ to_coords,  # (rho, rho)
        mean=mean @ readout,  # (D,)
    )


def _project_texts(moments: _Moments, text_embeds: torch.Tensor, rank: int | None) -> torch.Tensor:
    """Unit texts in row-space coordinates, projected onto the top-`rank` singular subspace: (M, rho)."""
    units = F.normalize(text_embeds.float(), dim=-1)  # (M, D)
    coords = (units @ moments.basis.float().T).double()  # (M, rho)
    rho = moments.basis.shape[0]
    rank = rho if rank is None else min(rank, rho)
    eigvals, eigvecs = torch.linalg.eigh(moments.second)  # ascending
    top = eigvecs[:, eigvals.argsort(descending=True)[:rank]]  # (rho, r)
    return coords @ top @ top.T  # (M, rho)


def _cov_factor(cov: torch.Tensor) -> torch.Tensor:
    """F with F @ F.T == cov, so that the variance along t is |t @ F|^2."""
    eigvals, eigvecs = torch.linalg.eigh(cov)
    return eigvecs * eigvals.clamp_min(0).sqrt()  # (rho, rho)


def text_span(
    count: float,
    total: torch.Tensor,
    outer: torch.Tensor,
    readout: torch.Tensor,
    text_embeds: torch.Tensor,
    n_texts: int = 10,
    rank: int | None = None,
    baseline_draws: int = 0,
) -> SpanResult:
    """TextSpan of one component from its statistics.

    count, total (dh,), outer (dh, dh): number of images, sum and sum of outer products of its
    head-space outputs; readout (dh, D): head space -> joint space; text_embeds (M, D) the pool.
    `rank` defaults to the head dim. With `baseline_draws`, also the random-text baseline.
    """
    moments = head_moments(count, total, outer, readout)
    texts = _project_texts(moments, text_embeds, rank)  # (M, rho)
    factor = _cov_factor(moments.cov)  # (rho, rho)
    total_var = float(torch.trace(moments.cov))
    whitened = texts @ factor  # (M, rho): text j's projection variance is |row j|^2 before deflation
    chosen = torch.empty(texts.shape[1], 0, dtype=texts.dtype)  # (rho, k) orthonormal deflated texts
    on_chosen = torch.empty(texts.shape[0], 0, dtype=texts.dtype)  # (M, k) texts @ chosen
    indices, explained = [], []
    for _ in range(min(n_texts, texts.shape[0])):
        residual = whitened - on_chosen @ (chosen.T @ factor)  # (M, rho)
        variance = (residual**2).sum(dim=1)  # (M,)
        best = int(variance.argmax())
        direction = texts[best] - chosen @ on_chosen[best]  # (rho,) the deflated text
        norm_sq = float(direction @ direction)
        if norm_sq <= 1e-24:  # the pool spans nothing more
            break
        unit = direction / norm_sq**0.5  # (rho,)
        indices.append(best)
        explained.append(float(variance[best]) / norm_sq / total_var if total_var > 0 else 0.0)
        chosen = torch.cat([chosen, unit[:, None]], dim=1)  # (rho, k+1)
        on_chosen = torch.cat([on_chosen, (texts @ unit)[:, None]], dim=1)  # (M, k+1)
    cumulative = torch.tensor(explained, dtype=torch.float64).cumsum(0).tolist()
    baseline = _baseline(moments, texts, len(indices), baseline_draws) if baseline_draws else None
    directions = (chosen.T @ moments.basis).float()  # (k, D)
    return SpanResult(indices, explained, cumulative, total_var, directions, moments.mean.float(), baseline)


def random_baseline(
    count: float,
    total: torch.Tensor,
    outer: torch.Tensor,
    readout: torch.Tensor,
    text_embeds: torch.Tensor,
    n_texts: int = 10,
    rank: int | None = None,
    draws: int = 5,
    seed: int = 0,
) -> float:
    """Fraction of the component's variance in the span of `n_texts` random pool texts (mean of `draws`)."""
    moments = head_moments(count, total, outer, readout)
    return _baseline(moments, _project_texts(moments, text_embeds, rank), n_texts, draws, seed)


def _baseline(moments: _Moments, texts: torch.Tensor, n_texts: int, draws: int, seed: int = 0) -> float:
    total_var = float(torch.trace(moments.cov))
    generator = torch.Generator().manual_seed(seed)
    shares = []
    for _ in range(draws):
        rows = torch.randperm(texts.shape[0], generator=generator)[:n_texts]
        span = _orthonormal(texts[rows].T)  # (rho, k)
        shares.append(float(torch.trace(span.T @ moments.cov @ span)) / total_var if total_var > 0 else 0.0)
    return sum(shares) / len(shares)


def _orthonormal(columns: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis (rho, k') of the columns' span, dropping dependent columns."""
    left, singular, _ = torch.linalg.svd(columns, full_matrices=False)
    return left[:, singular > singular.max() * 1e-9] if singular.numel() and singular.max() > 0 else left[:, :0]


def reconstruct(effects: torch.Tensor, result: SpanResult) -> torch.Tensor:
    """Each image's effect replaced by its mean plus its centred part inside the chosen texts' span: (N, D).

    This equals the reference's running `reconstruct`, because each deflated text is orthogonal to
    the ones before it.
    """
    centred = effects.float() - result.mean  # (N, D)
    return result.mean + (centred @ result.directions.T) @ result.directions  # (N, D)


def component_stats(reader, name: str) -> tuple[float, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(count, sum, outer, readout) of a head (head space) or an MLP (joint space, identity readout) of a cache."""
    from clipterm import names

    comp = reader.tower.validate(names.parse(name)).base
    if comp.kind not in ("head", "mlp"):
        from clipterm.errors import ClipTermError

        raise ClipTermError(f"TextSpan describes heads and MLPs, not {name}", hint="try L5.H2, L5.MLP or --layers L4-5")
    stats = reader.stats(str(comp))
    count = float(stats["count"])
    if comp.kind == "head" and comp.site == "pool" and reader.shape.pool_heads:  # a MAP head's (or CoCa pooler's) head
        return count, stats["sum"], stats["outer"], reader.pool_readout[comp.index]
    if comp.kind == "head":
        return count, stats["sum"], stats["outer"], reader.readout[comp.layer, comp.index]
    return count, stats["sum"], stats["outer"], torch.eye(stats["sum"].shape[0])


def check_reference(components: list[str]) -> None:
    """Refuse, before any model loads, a component the reference's TextSpan does not describe."""
    from clipterm import names
    from clipterm.errors import ClipTermError, ExitCode

    for name in components:
        comp = names.parse(name).base
        if comp.kind != "head" or comp.site == "pool":
            raise ClipTermError(f"--convention reference describes attention heads only, not {name}",
                                hint="clip_text_span runs TextSpan on heads; describe MLPs without --convention",
                                code=ExitCode.USAGE)


def reference_stats(view, name: str) -> tuple[float, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(count, sum, outer, readout) of a head's reference-convention effects (a `conventions.ReferenceView`)."""
    from clipterm import names

    check_reference([name])
    comp = view.reader.tower.validate(names.parse(name)).base
    coords, readout = view.head_factors(comp.layer, comp.index)  # (N, dh+3), (dh+3, D)
    coords = coords.double()
    return float(len(coords)), coords.sum(0), coords.T @ coords, readout  # (dh+3,), (dh+3, dh+3)


def reference_rank(count: float, head_dim: int, rank: int | None = None) -> int:
    """The reference's rank: its `w_ov_rank` (the head dim unless given), capped by the N rows its SVD sees."""
    return int(min(count, rank or head_dim))


def describe(reader, components: list[str], text_embeds: torch.Tensor, n_texts: int = 10, rank: int | None = None,
             baseline_draws: int = 5, view=None) -> dict[str, SpanResult]:
    """TextSpan, with its random-text baseline, for each component of a cache.

    With `view` (a `conventions.ReferenceView`), on the reference's head effects at the reference's rank.
    """
    if view is None:
        return {name: text_span(*component_stats(reader, name), text_embeds, n_texts, rank, baseline_draws)
                for name in components}
    rank = reference_rank(reader.n, reader.readout.shape[2], rank)
    return {name: text_span(*reference_stats(view, name), text_embeds, n_texts, rank, baseline_draws)
            for name in components}
