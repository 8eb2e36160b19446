"""Direct mean-ablation of cached components, scored in class space and streamed shard by shard.

The same numbers as `ablation.ablate` over `ablation.shifts` (Gandelsman, Efros, Steinhardt, ICLR 2024,
Sec. 3), without ever building an (N, D) shift. A component's effect is a sum of stored blocks,
c = Σ_t x_t R_t (a head: its head_out x (n, dh) and readout R (dh, D); an MLP, embed or bias: its joint-space
rows, R = I), and its mean m comes from the cache's statistics. Mean-ablating it moves the logits by

    (m - c) W^T = m W^T - Σ_t x_t (R_t W^T)        W (K, D): the unit class embeddings

so a head costs N·dh·K, read from its own block only. The cosine between e and e + (m - c) needs
e·c, m·c and |c|² per image: for a head z·(R e), z·(R m) and z (R Rᵀ) z, at N·dh·D (`cosine=False`
skips it, as the TUI does). A layer (several blocks) is summed in joint space one chunk of rows at a time.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import torch

from clipterm import names
from clipterm.analyses.ablation import AblationRow, Scoring, bootstrap_drop
from clipterm.errors import ClipTermError


@dataclass(frozen=True)
class Term:
    """One stored block of a component: rows `tensor[index]` (n, d), read into joint space by `readout`."""

    tensor: str  # head_out, mlps, embed or bias
    index: tuple[int, ...]  # (l, h) a head; (l,) an MLP, or a layer's heads; () embed, bias
    readout: torch.Tensor | None  # (d, D); None: the rows are in joint space
    mean: torch.Tensor  # (d,) fp64 over every row of the cache, from its stats


@dataclass
class Piece:
    """What one row of the result ablates: the sum of its terms (plus, when `extends`, the previous piece's)."""

    name: str
    terms: list[Term]
    extends: bool = False


def terms(reader: Any, name: str) -> list[Term]:
    """The stored blocks whose sum is a component's direct effect (as `reader.effects(name)` sums them); a layer's
    heads are one block, `head_out[l]`, read as (n, H·dh) with the heads' readouts stacked (H·dh, D)."""
    comp = reader.tower.validate(names.parse(name)).base
    if comp.kind in ("embed", "bias"):
        return [Term(comp.kind, (), None, reader.stats(str(comp))["mean"])]
    if comp.kind == "mlp":
        return [Term("mlps", (comp.layer,), None, reader.stats(str(comp))["mean"])]
    if comp.kind == "head":
        return [Term("head_out", (comp.layer, comp.index), reader.readout[comp.layer, comp.index],
                     reader.stats(str(comp))["mean"])]
    if comp.kind == "layer" and comp.site == "stage":  # a ConvNeXt's stage: all its blocks
        return [term for k in range(reader.shape.layers) for term in terms(reader, names.block(comp.stage, k))]
    if comp.kind == "layer" and not (comp.site == "block" and reader.shape.tower == "resnet"):
        heads = [str(names.Component("head", comp.layer, h, site=comp.site)) for h in range(reader.shape.heads)]
        readout = reader.readout[comp.layer]  # (H, dh, D)
        mean = torch.cat([reader.stats(head)["mean"] for head in heads])  # (H·dh,)
        stacked = [Term("head_out", (comp.layer,), readout.reshape(-1, readout.shape[-1]), mean)]
        return stacked if comp.site == "pool" else stacked + terms(reader, names.mlp(comp.layer))
    reader.effects(name)  # raises the reader's own error for what has no stored direct effect
    raise ClipTermError(f"{name} has no stored direct effect")


def read_rows(reader: Any, term: Term, rows: torch.Tensor) -> torch.Tensor:
    """A term's rows (n, d) in fp32; a layer's head_out[l] (H, n, dh) comes back as (n, H·dh)."""
    values = reader.gather(term.tensor, term.index, rows).float()
    if term.tensor == "head_out" and len(term.index) == 1:
        values = values.permute(1, 0, 2).reshape(len(rows), -1)  # (n, H·dh)
    return values


def pieces(reader: Any, components: list[str]) -> list[Piece]:
    return [Piece(name, terms(reader, name)) for name in components]


def cumulative_pieces(reader: Any, by: str) -> list[Piece]:
    """Layers 0..l all mean-ablated (their heads, MLPs, or both), for each l: `ablation.cumulative_shifts`' rows."""
    out = []
    for layer in range(reader.shape.layers):
        tower = reader.tower
        parts = {"head": [str(c) for c in tower.heads([layer])], "mlp": tower.mlps()[layer:layer + 1],
                 "layer": tower.layers()[layer:layer + 1]}[by]
        label = tower.cumulative_label(layer)
        out.append(Piece(label, [t for name in parts for t in terms(reader, name)], extends=bool(out)))
    return out


def _joint(term: Term, rows: torch.Tensor) -> torch.Tensor:
    return rows if term.readout is None else rows @ term.readout  # (n, D)


def _cosines(chunk: _Chunk, mean: torch.Tensor, e_c: torch.Tensor, m_c: torch.Tensor, c_sq: torch.Tensor) -> torch.Tensor:
    """(n,) cos(e, e + s) for s = m - c, from the chunk's e (n, D), m (D,) and the per-image e·c, m·c and |c|²."""
    embeds, e_sq = chunk.embeds, chunk.embed_sq  # (n, D), (n,)
    e_s = (embeds @ mean - e_c).double()  # (n,) e·s
    s_sq = (float(mean @ mean) - 2 * m_c + c_sq).double()  # (n,) |s|²
    return (e_sq + e_s) / (e_sq * (e_sq + 2 * e_s + s_sq).clamp_min(0)).sqrt().clamp_min(1e-8)


class _Chunk:
    """One chunk's scored rows, shared by every piece: which cache rows are read, where each task's rows sit among
    them, their embeddings (for cosines), and the current layer's heads when they are read in one go."""

    def __init__(self, reader: Any, scorings: dict[str, Scoring], lo: int, hi: int, cosine: bool):
        self.reader = reader
        self.spans = {task: s.span(lo, hi) for task, s in scorings.items()}  # slices of each task's `rows`
        self.rows = torch.unique(torch.cat([s.rows[self.spans[t]] for t, s in scorings.items()]))  # (n,) cache rows
        self.at = {t: torch.searchsorted(self.rows, s.rows[self.spans[t]]) for t, s in scorings.items()}  # into `rows`
        self.embeds = reader.gather("image_embeds", (), self.rows).float() if cosine else None  # (n, D)
        self.embed_sq = (self.embeds.double() ** 2).sum(1) if cosine else None  # (n,) |e|²
        self.layer: tuple[int, Any, Any] | None = None  # (l, head_out[l] (H, n, dh), R_h e (n, H, dh) or None)

    def head(self, term: Term) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A head's rows (n, dh) and R e (n, dh), its whole layer read once (one gather, one GEMM for R e)."""
        layer, head = term.index
        if self.layer is None or self.layer[0] != layer:
            readout = self.reader.readout[layer].flatten(0, 1)  # (H·dh, D)
            on_heads = None if self.embeds is None else (self.embeds @ readout.T).unflatten(1, (self.reader.shape.heads, -1))
            self.layer = (layer, self.reader.gather("head_out", (layer,), self.rows), on_heads)
        _, rows, on_heads = self.layer
        return rows[head].float(), None if on_heads is None else on_heads[:, head]


def ablate_cached(scorings: dict[str, Scoring], reader: Any, components: list[str] | list[Piece], draws: int = 2000,
                  cosine: bool = True, on_rows: Callable[[int], None] | None = None,
                  chunk_rows: int = 4096) -> dict[str, list[AblationRow]]:
    """`ablation.ablate(scorings, ablation.shifts(reader, components), draws)`, streamed: one pass over the cache's
    rows, each component reading its own blocks. Without `cosine`, rows carry NaN cosines. `on_rows(n)` after each chunk
    of whole shards holding about `chunk_rows` scored rows."""
    parts = components if components and isinstance(components[0], Piece) else pieces(reader, components)  # type: ignore[arg-type]
    means, total = [], None  # (D,) joint-space mean of each piece
    for piece in parts:
        own = sum(t.mean.double() if t.readout is None else t.mean.double() @ t.readout.double() for t in piece.terms)
        total = own + total if piece.extends and total is not None else own
        means.append(total.float())
    chained = any(p.extends for p in parts)  # the cumulative curve: every piece is summed in joint space
    # A piece of one head-space block (a head, or a pool's stacked heads) stays in head space. Without cosines nothing
    # needs joint space at all: every block goes straight to class space, x (R Wᵀ).
    in_head_space = {id(p) for p in parts if len(p.terms) == 1 and p.terms[0].readout is not None and not chained}
    to_class = [t for p in parts for t in p.terms if id(p) in in_head_space or not (cosine or chained)]
    in_class = {task: {id(t): s.weights.T if t.readout is None else t.readout @ s.weights.T for t in to_class}
                for task, s in scorings.items()}  # (d, K) per term
    grams = {id(t): t.readout @ t.readout.T for t in to_class if cosine and t.readout is not None}  # (dh, dh)
    heads_per_layer = Counter(p.terms[0].index[0] for p in parts if id(p) in in_head_space and len(p.terms[0].index) == 2)
    mean_logits = {task: [m @ s.weights.T for m in means] for task, s in scorings.items()}  # (K,) per piece
    after = {task: torch.zeros(len(parts), len(s.rows), dtype=torch.bool) for task, s in scorings.items()}  # (pieces, n)
    cos_sum = {task: [0.0] * len(parts) for task in scorings}
    scored = max(len(s.rows) for s in scorings.values())  # a sample of a big cache: chunks of ~chunk_rows scored rows
    for lo, hi in reader.row_chunks(chunk_rows * reader.n // max(scored, 1)):
        chunk = _Chunk(reader, scorings, lo, hi, cosine)
        previous = None  # the previous piece's joint effect on these rows, for `extends`
        for k, piece in enumerate(parts if chunk.rows.numel() else []):
            term = piece.terms[0]
            if id(piece) in in_head_space and len(term.index) == 2 and heads_per_layer[term.index[0]] > 1:
                z, r_e = chunk.head(term)  # (n, dh), (n, dh)
                blocks = [z]
            else:
                blocks = [read_rows(reader, t, chunk.rows) for t in piece.terms]  # (n, d) each
                r_e = None if chunk.embeds is None or id(piece) not in in_head_space else chunk.embeds @ term.readout.T
            if id(piece) not in in_head_space and (cosine or chained):
                effect = sum(_joint(t, x) for t, x in zip(piece.terms, blocks))  # (n, D)
                effect = previous = effect + previous if piece.extends and previous is not None else effect
            if cosine and id(piece) in in_head_space:  # e·c = z·(R e), m·c = z·(R m), |c|² = z R Rᵀ z
                z = blocks[0]
                cosines = _cosines(chunk, means[k], (z * r_e).sum(1), z @ (term.readout @ means[k]),
                                   ((z @ grams[id(term)]) * z).sum(1))  # (n,)
            elif cosine:
                cosines = _cosines(chunk, means[k], (effect * chunk.embeds).sum(1), effect @ means[k],
                                   (effect * effect).sum(1))  # (n,)
            for task, scoring in scorings.items():
                span, rows = chunk.spans[task], chunk.at[task]
                if id(piece) in in_head_space or not (cosine or chained):  # c Wᵀ = Σ_t x_t (R_t Wᵀ)
                    moved = sum(x[rows] @ in_class[task][id(t)] for t, x in zip(piece.terms, blocks))  # (n_s, K)
                else:
                    moved = effect[rows] @ scoring.weights.T  # (n_s, K)
                logits = scoring.base_logits[span] + mean_logits[task][k] - moved  # (n_s, K)
                after[task][k, span] = logits.argmax(1) == scoring.target[span]  # filled in place: no small tensors kept
                if cosine:
                    cos_sum[task][k] += float(cosines[rows].sum())
        if on_rows is not None:
            on_rows(hi - lo)
    out: dict[str, list[AblationRow]] = {}
    for task, scoring in scorings.items():
        before, n = scoring.outcome(), len(scoring.rows)
        out[task] = []
        for k, piece in enumerate(parts):
            outcome = after[task][k]  # (n,)
            drop, low, high = bootstrap_drop(before, outcome, draws)
            out[task].append(AblationRow(piece.name, float(outcome.float().mean()), drop, low, high,
                                         cos_sum[task][k] / n if cosine else float("nan")))
    return out
