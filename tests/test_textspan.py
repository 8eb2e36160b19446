"""TextSpan from sufficient statistics equals the reference per-image algorithm."""

from __future__ import annotations

import pytest
import torch

from clipterm.analyses.textspan import random_baseline, reconstruct, text_span


def reference_text_span(effects: torch.Tensor, texts: torch.Tensor, n_texts: int, rank: int, dtype=torch.float64):
    """Gandelsman et al.'s Algorithm 1 on per-image effects (N, D), written out directly.

    Returns the chosen rows, the reconstruction, and the variance left after each deflation.
    `bench/speed/textspan.py` times this (in float32, as the original runs) against clipterm's.
    """
    effects, texts = effects.to(dtype), torch.nn.functional.normalize(texts.to(dtype), dim=-1)
    _, _, vh = torch.linalg.svd(effects, full_matrices=False)
    vh = vh[:rank]  # (r, D)
    texts = texts @ vh.T @ torch.linalg.inv(vh @ vh.T) @ vh  # project onto the top-r right singular space
    mean = effects.mean(dim=0, keepdim=True)
    data = effects - mean
    rebuilt = mean.repeat(len(effects), 1)
    chosen, residual_var = [], []
    for _ in range(n_texts):
        best = int((data @ texts.T).std(dim=0).argmax())
        chosen.append(best)
        text = texts[best]
        norm = text @ text
        along = (data @ text / norm)[:, None] * text[None, :]  # (N, D)
        rebuilt += along
        data = data - along
        texts = texts - (texts @ text / norm)[:, None] * text[None, :]
        residual_var.append(float(data.var(dim=0).sum()))
    return chosen, rebuilt, residual_var


def synthetic_head(n: int = 3000, dh: int = 16, d: int = 64, m: int = 400, seed: int = 0):
    """Head outputs with a few strong directions and a mean, a random readout, and texts partly in its span."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0.5, -1.5, dh, dtype=torch.float64)
    head_out = torch.randn(n, dh, generator=g, dtype=torch.float64) * scales + torch.randn(dh, generator=g, dtype=torch.float64)
    readout = torch.randn(dh, d, generator=g, dtype=torch.float64) / d**0.5
    texts = torch.randn(m, d, generator=g, dtype=torch.float64)
    texts[: m // 2] += 3 * torch.randn(m // 2, dh, generator=g, dtype=torch.float64) @ readout
    return head_out, readout, texts


def stats(head_out: torch.Tensor):
    return float(len(head_out)), head_out.sum(0), head_out.T @ head_out


@pytest.mark.parametrize("rank", [16, 6])
def test_same_texts_same_order_as_the_reference(rank):
    head_out, readout, texts = synthetic_head()
    expected, rebuilt, residual_var = reference_text_span(head_out @ readout, texts, n_texts=min(10, rank), rank=rank)

    result = text_span(*stats(head_out), readout, texts, n_texts=10, rank=rank)

    # Past `rank` texts the projected pool spans nothing more: the reference would go on picking
    # by rounding noise; clipterm stops there.
    assert result.indices == expected
    total = float((head_out @ readout).var(dim=0).sum())
    if rank == 16:  # with the full rank, each chosen text removes exactly the variance reported for it
        assert result.cumulative == pytest.approx([1 - v / total for v in residual_var], abs=1e-6)
    torch.testing.assert_close(reconstruct(head_out @ readout, result).double(), rebuilt, atol=1e-5, rtol=1e-4)


def test_explained_fractions_are_ordered_and_bounded():
    head_out, readout, texts = synthetic_head(seed=1)
    result = text_span(*stats(head_out), readout, texts, n_texts=16)
    assert 0 < result.cumulative[-1] <= 1 + 1e-9
    assert all(e >= -1e-12 for e in result.explained)
    assert result.cumulative == sorted(result.cumulative)
    # Each deflated direction is orthogonal to the ones before it.
    gram = result.directions @ result.directions.T
    torch.testing.assert_close(gram, torch.eye(len(gram)), atol=1e-5, rtol=0)


def test_an_mlp_with_identity_readout_matches_the_reference():
    g = torch.Generator().manual_seed(3)
    effects = torch.randn(2000, 24, generator=g, dtype=torch.float64) * torch.linspace(2, 0.1, 24, dtype=torch.float64)
    texts = torch.randn(150, 24, generator=g, dtype=torch.float64)
    expected, _, _ = reference_text_span(effects, texts, n_texts=8, rank=24)
    assert text_span(*stats(effects), torch.eye(24), texts, n_texts=8).indices == expected


def test_textspan_beats_the_random_baseline_on_a_head_aligned_with_some_texts():
    head_out, readout, texts = synthetic_head(seed=2)
    chosen = text_span(*stats(head_out), readout, texts, n_texts=5)
    baseline = random_baseline(*stats(head_out), readout, texts, n_texts=5, draws=5)
    assert 0 <= baseline < chosen.cumulative[-1]
