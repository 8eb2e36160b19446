"""Sparse text decompositions by orthogonal matching pursuit, batched over targets in torch.

Gandelsman et al. (2024) describe each neuron by a sparse combination of text embeddings: OMP
picks, k times, the text most correlated with what is left of the target, then refits every
chosen coefficient by least squares. This is scikit-learn's `orthogonal_mp` (the same choices and
coefficients, checked in the tests), run for all targets at once, so one matrix product per step
serves every neuron (bench/speed/sparse_omp.py measures the difference).

The dictionary is the pool's text embeddings centred by the pool's mean text, as in the reference,
and scaled to unit norm per text, as OMP assumes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class SparseCode:
    """k texts per target, in the order OMP chose them, their coefficients and the fit."""

    indices: Tensor  # (M, k) dictionary rows
    coefficients: Tensor  # (M, k) zero where OMP ran out of directions before k
    cosine: Tensor  # (M,) cosine between each target and its reconstruction

    def texts(self, target: int) -> list[tuple[int, float]]:
        """(row, coefficient) of one target in the order OMP chose them, zeros left out.

        The order is the greedy one: each text explains the most of what the earlier ones left.
        It is listed this way rather than by |coefficient| (the reference's order), because when k
        is a sizeable share of the embedding dimension, late texts get large coefficients that
        cancel each other.
        """
        return [(int(i), float(c)) for i, c in zip(self.indices[target], self.coefficients[target]) if c != 0]

    def leading(self, target: int) -> int | None:
        """The first text chosen with a positive coefficient: what the direction points to."""
        return next((row for row, coefficient in self.texts(target) if coefficient > 0), None)


def text_dictionary(text_embeds: Tensor) -> Tensor:
    """Text embeddings (P, D) centred by their mean and scaled to unit norm per text: (P, D)."""
    centred = text_embeds.float() - text_embeds.float().mean(0, keepdim=True)  # (P, D)
    return F.normalize(centred, dim=-1)  # (P, D)


def omp(targets: Tensor, dictionary: Tensor, k: int = 32, tol: float = 1e-7) -> SparseCode:
    """Orthogonal matching pursuit of each target row (M, D) over dictionary rows (P, D) with unit norm.

    Stops early for a target when its residual falls below `tol` of its norm, or when no unused
    text correlates with it (fewer than k texts then get a nonzero coefficient).
    """
    targets, dictionary = targets.float(), dictionary.float().to(targets.device)
    n_targets, n_texts = targets.shape[0], dictionary.shape[0]
    k = min(k, n_texts, dictionary.shape[1])
    rows = torch.arange(n_targets, device=targets.device)  # (M,)
    chosen = torch.zeros(n_targets, k, dtype=torch.long, device=targets.device)  # (M, k)
    used = torch.zeros(n_targets, n_texts, dtype=torch.bool, device=targets.device)  # (M, P)
    active = torch.ones(n_targets, k, dtype=torch.bool, device=targets.device)  # (M, k): steps that added a text
    coefficients = torch.zeros(n_targets, 0, dtype=torch.float64, device=targets.device)
    residual, scale = targets.clone(), targets.norm(dim=-1)  # (M, D), (M,)
    for step in range(k):
        scores = (residual @ dictionary.T).abs().masked_fill(used, -1.0)  # (M, P)
        best_score, best = scores.max(1)  # (M,)
        done = (residual.norm(dim=-1) <= tol * scale) | (best_score <= tol * scale)  # (M,)
        active[:, step] = ~done
        chosen[:, step] = best
        used[rows, best] = True
        atoms = dictionary[chosen[:, : step + 1]].double() * active[:, : step + 1, None]  # (M, s, D): dead steps zeroed
        gram = atoms @ atoms.transpose(1, 2) + torch.diag_embed((~active[:, : step + 1]).double())  # (M, s, s)
        coefficients = torch.linalg.solve(gram, atoms @ targets.double()[..., None])[..., 0]  # (M, s)
        residual = targets - (coefficients[:, None] @ atoms)[:, 0].float()  # (M, D)
    coefficients = (coefficients * active).float()  # (M, k)
    fit = (coefficients[:, None] @ dictionary[chosen])[:, 0]  # (M, D)
    return SparseCode(chosen, coefficients, F.cosine_similarity(fit, targets, dim=-1))


__all__ = ["SparseCode", "omp", "text_dictionary"]
