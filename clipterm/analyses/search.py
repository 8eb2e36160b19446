"""Hill-climb text search: the strings whose CLIP text embedding points along a target direction.

Feature visualisation in words, after OpenAI's "Multimodal Neurons in Artificial Neural Networks"
(Goh et al., Distill 2021): from a string of tokens, add a token, delete one or replace one,
whichever raises the objective cos(text_embed(s), target) - λ·prior(s), keeping a beam of the
best B strings. OpenAI fed every option to the network. Here a HotFlip step (Ebrahimi et al.,
ACL 2018) ranks the vocabulary at each position by the gradient of the cosine with respect to the
token embeddings (one backward pass for the whole beam; an insertion is linearised around the
mean vocabulary embedding), and only the top-k per position, plus a few random moves so that the
beam does not lock in, are scored exactly (moves.py proposes the candidates). Exact scoring runs the
causal text tower only as far as the candidate's end-of-text token, which cannot see later positions,
so this equals `encode_text` (vit/textencode.py). The prior is an offline token-frequency cost (vocab.py).

With a language model (lm.py), as the article also did, the objective gains a readability penalty,
cos − λ_lm·NLL_per_word(s) − λ·prior(s), and the LM proposes its top next words at each insertion and
replacement position beside the gradient's and the random ones. The LM term only changes the rank of a
string that could still enter the beam (it only lowers the score), so only those are put to the LM.
By default a guided search drops the frequency prior (λ = 0): the LM's own unigram already counts word
frequency, and the prior, a sum over words, taxes every word a caption needs ("background", "on the left").

Every vocabulary entry is one whole-word BPE token, so a candidate is [SOT, t1..tn, EOT] and its
text is the words joined by spaces. The beam only ever gains strings that beat its worst member,
so its best score never decreases; with a fixed seed a run repeats exactly (timing aside).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple

import torch
import torch.nn.functional as F

from clipterm.analyses.lm import LanguageModel, penalties
from clipterm.analyses.moves import proposals
from clipterm.errors import ClipTermError
from clipterm.inputs.vocab import Vocabulary
from clipterm.vit.textencode import TextTower

Tokens = tuple[int, ...]  # a string, as rows of the vocabulary
PRIOR_WEIGHT = 0.0025  # λ of an unguided search; a language model's unigram already counts word frequency


@dataclass(frozen=True)
class SearchConfig:
    beam: int = 5  # strings kept from step to step
    topk: int = 16  # tokens scored exactly per position of each beam member, best by the gradient
    random: int = 8  # random moves per beam member and step
    steps: int = 100  # stop after this many steps
    patience: int | None = 10  # stop when the best score has not improved for this many steps
    time_limit: float | None = None  # stop after this many seconds
    lam: float | None = None  # weight of the prior (0 turns it off); None: PRIOR_WEIGHT unguided, 0 with a language model
    max_tokens: int = 12  # longest string, in tokens
    seed: int = 0
    batch_size: int = 1024  # candidates per forward pass
    lm_weight: float = 0.0  # λ_lm, weight of the language model's NLL per word (0: guidance without penalty)
    lm_topk: int = 8  # words the language model proposes per position of each beam member
    lm_relative: bool = False  # penalise the excess NLL per word over the unigram's (lm.excess_per_word), else the NLL
    keep: float | None = None  # guided only: after the climb, make the string readable keeping this share of its best cosine
    read_weight: float = 1.0  # λ_lm of that second, readability phase

    def prior_weight(self, guided: bool) -> float:
        """λ: as set, else PRIOR_WEIGHT for an unguided search and 0 for a guided one."""
        return self.lam if self.lam is not None else 0.0 if guided else PRIOR_WEIGHT

    def check(self, context_length: int | None = None) -> None:
        """Refuse settings that cannot run, naming the option."""
        for name, low in (("beam", 1), ("topk", 0), ("random", 0), ("steps", 0), ("max_tokens", 1), ("batch_size", 1)):
            if getattr(self, name) < low:
                raise ClipTermError(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(self, name)}")
        if self.topk == 0 and self.random == 0:
            raise ClipTermError("--topk and --random are both 0: no candidate would ever be scored", hint="use --topk 16")
        if self.patience is not None and self.patience < 1:
            raise ClipTermError(f"--patience must be at least 1, got {self.patience}")
        if self.time_limit is not None and self.time_limit <= 0:
            raise ClipTermError(f"--time must be positive, got {self.time_limit}")
        if self.lam is not None and self.lam < 0:
            raise ClipTermError(f"--lambda must be 0 or more, got {self.lam}")
        if self.lm_weight < 0:
            raise ClipTermError(f"--lm-weight must be 0 or more, got {self.lm_weight}", hint="use 0 to keep guidance without the penalty")
        if self.keep is not None and not 0 < self.keep <= 1:
            raise ClipTermError(f"--keep must be in (0, 1], got {self.keep}", hint="use 0.95: keep 95% of the best cosine")
        if self.read_weight < 0:
            raise ClipTermError(f"--read-weight must be 0 or more, got {self.read_weight}")
        if self.lm_topk < 0:
            raise ClipTermError(f"--lm-topk must be 0 or more, got {self.lm_topk}")
        if context_length is not None and self.max_tokens > context_length - 2:
            raise ClipTermError(f"--max-tokens {self.max_tokens} does not fit the context of {context_length} tokens",
                                hint=f"use at most {context_length - 2}")


class Hit(NamedTuple):
    text: str
    score: float  # cosine - λ_lm·lm_penalty - λ·prior
    cosine: float
    lm_nll: float | None = None  # the language model's NLL per word, in nats; None without one
    lm_penalty: float | None = None  # the penalised term: the excess NLL per word (or the NLL, lm_relative off)


Scored = tuple[float, float, float | None, float | None]  # (objective, cosine, NLL per word, penalty)


@dataclass
class SearchEvent:
    step: int  # 0: the starting string, scored
    best: list[Hit]  # the beam, best first
    evals: int  # candidate strings scored exactly so far
    evals_per_s: float
    elapsed: float  # seconds since the search started
    done: bool = False  # the last event of a run
    reason: str | None = None  # why it stopped: steps, patience, time, cancelled, exhausted
    lm: str | None = None  # the guiding language model's name, None when unguided


class _Scorer:
    """Exact objective and HotFlip gradients for strings of vocabulary rows."""

    def __init__(self, tower: TextTower, target: torch.Tensor, vocab: Vocabulary, config: SearchConfig,
                 lm: LanguageModel | None = None):
        device = tower.token_embedding.device
        self.tower, self.config, self.lm, self.words = tower, config, lm, vocab.words
        self.target = F.normalize(target.float().to(device), dim=0)  # (D,)
        self.embeds = tower.token_embedding[vocab.ids.to(device)].detach()  # (V, width)
        self.filler = self.embeds.mean(0)  # (width,) the point an insertion is linearised around
        self.prior = vocab.prior.to(device)  # (V,)
        self._prior = vocab.prior.tolist()
        self.lam = config.prior_weight(guided=lm is not None)
        self.weight = config.lm_weight  # λ_lm now: the readability phase raises it
        self.floor: float | None = None  # the readability phase's least cosine; below it each unit costs SHORTFALL
        self.evals = 0

    def score(self, strings: list[Tokens], beam: list[float] = ()) -> list[Scored | None]:
        """(objective, cosine, NLL per word) of each string. With a language model, strings that cannot beat
        the beam's worst (`beam`: its objectives) come back None: they could never enter it."""
        if self.lm is None:
            return [(o, c, None, None) for o, c in self._cosines(strings)]
        kept = sorted(beam, reverse=True)[: self.config.beam]
        if self.lm.cheap:
            return self._lm_first(strings, kept[-1] if len(kept) == self.config.beam else float("-inf"))
        bounds = self._cosines(strings)  # objectives without the LM term: upper bounds, as NLL >= 0
        out: list[Scored | None] = [None] * len(strings)
        order = sorted(range(len(strings)), key=lambda i: -bounds[i][0])
        for start in range(0, len(order), _LM_CHUNK):
            floor = kept[-1] if len(kept) == self.config.beam else float("-inf")
            chunk = [i for i in order[start : start + _LM_CHUNK] if bounds[i][0] >= floor]
            penalty, nll = penalties(self.lm, [strings[i] for i in chunk], self.config.lm_relative) if chunk else ([], [])
            for i, p, n in zip(chunk, penalty, nll):
                out[i] = (bounds[i][0] - self.weight * p, bounds[i][1], n, p)
            kept = sorted(kept + [out[i][0] for i in chunk], reverse=True)[: self.config.beam]
            if len(chunk) < len(order[start : start + _LM_CHUNK]):
                break  # the rest are sorted lower still
        return out

    def _lm_first(self, strings: list[Tokens], floor: float) -> list[Scored | None]:
        """A cheap LM (the n-gram) scores every string first. As cos <= 1, a string whose 1 - λ·prior - λ_lm·NLL
        is below `floor` can never enter the beam, so the text tower, the costly part, never runs on it."""
        penalty, nll = penalties(self.lm, strings, self.config.lm_relative)
        bound = [1 + 1e-6 - self.lam * sum(self._prior[t] for t in s) - self.weight * p for s, p in zip(strings, penalty)]
        live = [i for i in range(len(strings)) if bound[i] >= floor]
        out: list[Scored | None] = [None] * len(strings)
        for i, (objective, cosine) in zip(live, self._cosines([strings[i] for i in live])):
            out[i] = (objective - self.weight * penalty[i], cosine, nll[i], penalty[i])
        return out

    @torch.no_grad()
    def _cosines(self, strings: list[Tokens]) -> list[tuple[float, float]]:
        """(cosine - λ·prior, cosine) of each string, batched by length."""
        out: list[tuple[float, float]] = [(0.0, 0.0)] * len(strings)
        for length, rows in _by_length([len(s) for s in strings]).items():
            for start in range(0, len(rows), self.config.batch_size):
                chunk = rows[start : start + self.config.batch_size]
                tokens = torch.tensor([strings[i] for i in chunk], dtype=torch.long,
                                      device=self.embeds.device).reshape(len(chunk), length)  # (b, n)
                cosine = self.tower.encode(self.embeds[tokens]) @ self.target  # (b,)
                objective = cosine - self.lam * self.prior[tokens].sum(1)  # (b,)
                if self.floor is not None:
                    objective = objective - SHORTFALL * (self.floor - cosine).clamp_min(0)
                for i, o, c in zip(chunk, objective.tolist(), cosine.tolist()):
                    out[i] = (o, c)
        self.evals += len(strings)
        return out

    def gradients(self, rows: list[tuple[Tokens, int | None]]) -> list[torch.Tensor]:
        """d cos / d word embeddings (T, width) of each row: a string as it is (None), or with the
        filler inserted before its j-th token (j). One batched backward pass per length."""
        words = [self._words(string, slot) for string, slot in rows]  # each (T, width)
        grads: list[torch.Tensor] = [torch.empty(0)] * len(rows)
        for _, members in _by_length([len(w) for w in words]).items():
            for start in range(0, len(members), self.config.batch_size):
                chunk = members[start : start + self.config.batch_size]
                batch = torch.stack([words[i] for i in chunk]).requires_grad_(True)  # (b, T, width)
                cosine = self.tower.encode(batch) @ self.target  # (b,)
                (grad,) = torch.autograd.grad(cosine.sum(), batch)  # (b, T, width)
                for row, i in enumerate(chunk):
                    grads[i] = grad[row]
        return grads

    def _words(self, string: Tokens, slot: int | None) -> torch.Tensor:
        words = self.embeds[torch.tensor(string, dtype=torch.long, device=self.embeds.device)]  # (n, width)
        return words if slot is None else torch.cat([words[:slot], self.filler[None], words[slot:]])  # (n+1, width)

    def ranked(self, grads: torch.Tensor, depths: list[int]) -> list[list[int]]:
        """Vocabulary rows by first-order gain in objective at each slot: for a slot of depth d, the
        d-th group of `topk` (ranks k(d-1) .. kd-1), so a string that stays in the beam goes deeper."""
        k = self.config.topk
        gain = grads @ self.embeds.T - self.lam * self.prior  # (P, V)
        top = gain.topk(min(k * max(depths), gain.shape[1]), dim=1).indices.tolist()  # (P, k·max depth)
        return [row[k * (d - 1) : k * d] for row, d in zip(top, depths)]


_LM_CHUNK = 64  # strings put to the language model at once, best bound first
SHORTFALL = 100.0  # cost per unit of cosine below the readability phase's floor: all but a hard floor
ARCHIVE = 200  # strings of the climb, best cosine first, that the readability phase starts from


def _by_length(lengths: list[int]) -> dict[int, list[int]]:
    """Indices grouped by length, shortest first: one forward pass serves a group with no padding."""
    groups: dict[int, list[int]] = {}
    for i, length in enumerate(lengths):
        groups.setdefault(length, []).append(i)
    return dict(sorted(groups.items()))


def search(
    tower: TextTower,
    target: torch.Tensor,
    vocab: Vocabulary,
    config: SearchConfig = SearchConfig(),
    cancel: Callable[[], bool] | None = None,
    lm: LanguageModel | None = None,
) -> Iterator[SearchEvent]:
    """Hill-climb from the empty string towards `target` (D,): an iterator of one event per step, then a
    final one with `done=True`. `cancel()` is checked between steps (a threading.Event's `is_set` works).
    `lm`, a language model over `vocab` (lm.py), guides it. Bad settings raise here, before the first step."""
    config.check(tower.context_length)
    if len(vocab) == 0:
        raise ClipTermError("the search vocabulary is empty", hint="give a --vocab file with single-token words")
    return _climb(tower, target, vocab, config, cancel, lm)


def _climb(tower: TextTower, target: torch.Tensor, vocab: Vocabulary, config: SearchConfig,
           cancel: Callable[[], bool] | None, lm: LanguageModel | None) -> Iterator[SearchEvent]:
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(config.seed)
    scorer = _Scorer(tower, target, vocab, config, lm)
    beam: dict[Tokens, Scored] = {(): scorer.score([()])[0]}
    seen: set[Tokens] = {()}
    age: dict[Tokens, int] = {}  # steps each beam string has been expanded

    def event(step: int, done: bool = False, reason: str | None = None) -> SearchEvent:
        elapsed = time.perf_counter() - started
        best = [Hit(vocab.text(s), o, c, nll, p) for s, (o, c, nll, p) in beam.items()]
        return SearchEvent(step, best, scorer.evals, scorer.evals / elapsed if elapsed > 0 else 0.0, elapsed, done, reason,
                           lm.name if lm is not None else None)

    yield event(0)
    best, stale, step, reason = beam[()][0], 0, 0, "steps"
    archive: dict[Tokens, float] = {}  # the climb's strings by cosine, for the readability phase
    origin = beam[()][1]  # the empty string's cosine: what any string gets for nothing
    reading = config.keep is None or lm is None  # in the readability phase, or never to have one
    limit = config.steps
    while step < limit:
        if cancel is not None and cancel():
            reason = "cancelled"
            break
        age = {string: age.get(string, 0) + 1 for string in beam}
        candidates = [s for s in dict.fromkeys(proposals(scorer, age, len(vocab), generator)) if s not in seen]
        if not candidates:
            reason = "exhausted"
            break
        seen.update(candidates)
        scored = scorer.score(candidates, [objective for objective, *_ in beam.values()])
        pool = {**beam, **{c: s for c, s in zip(candidates, scored) if s is not None}}
        if not reading:
            archive.update((c, s[1]) for c, s in pool.items())
            if len(archive) > 4 * ARCHIVE:
                archive = dict(sorted(archive.items(), key=lambda item: -item[1])[:ARCHIVE])
        ranked = sorted(pool.items(), key=lambda item: (-item[1][0], item[0]))[: config.beam]
        beam = dict(ranked)
        step += 1
        improved = ranked[0][1][0] > best + 1e-7
        best, stale = (ranked[0][1][0], 0) if improved else (best, stale + 1)
        yield event(step)
        if not reading and ((config.patience is not None and stale >= config.patience) or step >= limit):
            reading, limit = True, step + config.steps  # climbed: now make it readable, keeping `keep` of its cosine
            beam, seen, age, best, stale = _read_phase(scorer, archive, config, origin)
            continue
        if config.patience is not None and stale >= config.patience:
            reason = "patience"
            break
        if config.time_limit is not None and time.perf_counter() - started >= config.time_limit:
            reason = "time"
            break
    yield event(step, done=True, reason=reason)


def _read_phase(scorer: _Scorer, archive: dict[Tokens, float], config: SearchConfig, origin: float):
    """Switch the scorer to the readability phase and rescore the climb's best strings: (beam, seen, age, best
    objective, stale steps). λ_lm becomes read_weight, and the cosine floor keeps `keep` of the climb's gain over the
    empty string (origin + keep·(best − origin)): on the toy a generic phrase already has 0.96 of `text:red`'s cosine,
    so a floor on the cosine itself would let it through."""
    best = max(archive.values())
    scorer.floor = origin + config.keep * (best - origin) if best > origin else config.keep * best
    scorer.weight = config.read_weight
    start = sorted(archive, key=lambda string: -archive[string])[:ARCHIVE]
    scored = scorer.score(start)
    ranked = sorted(((s, o) for s, o in zip(start, scored) if o is not None), key=lambda item: (-item[1][0], item[0]))
    beam = dict(ranked[: config.beam])
    return beam, set(start), {}, ranked[0][1][0], 0


def search_model(loaded, target: torch.Tensor, vocab: Vocabulary | None = None, config: SearchConfig = SearchConfig(),
                 cancel: Callable[[], bool] | None = None, lm: LanguageModel | None = None) -> Iterator[SearchEvent]:
    """`search` on a loaded model (models.LoadedModel), over its whole-word BPE vocabulary by default
    (a language model must be over the same vocabulary)."""
    from clipterm.inputs.vocab import bpe_tokenizer, default_vocabulary

    tokenizer = bpe_tokenizer(loaded.tokenizer)
    tower = TextTower(loaded.model, tokenizer.sot_token_id, tokenizer.eot_token_id)
    return search(tower, target, vocab if vocab is not None else default_vocabulary(tokenizer, loaded.text_tokens), config, cancel, lm)
