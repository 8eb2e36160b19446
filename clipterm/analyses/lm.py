"""Language models that guide the hill-climb towards readable strings.

The Multimodal Neurons article (Goh et al., Distill 2021) speeds up its text feature visualisation with a
small language model and adds a small LM penalty so that strings stay readable. Here a language model over
the search vocabulary's words gives (1) next-word log-probabilities (B, V) for a batch of prefixes, whose top
words are proposed at each insertion and replacement position, and (2) the total log-probability (B,) of a
batch of strings, end of string included, for the penalty λ_lm · NLL per word (search.py).

- `NGram`: an interpolated Kneser–Ney trigram (Kneser & Ney, ICASSP 1995; Chen & Goodman, 1998, eq. 17)
  counted from a corpus: the toy captions for the toy model, the `general` pool for other models, or a user
  file. Words outside the search vocabulary count as one unknown word. The counts are cached on disk per
  corpus sha256, beside the pool embeddings in `<cache root>/texts/`.
- `HuggingFaceLM` and `MaskedLM` (lm_hf.py): a causal or a masked (BERT-style) LM through `transformers`
  (`clipterm[lm]`), from local files only.

The penalty the search uses is the *excess* NLL per word (`excess_per_word`): how much less likely each word is
where it stands than on its own, −log p(w | context) − (−log p_unigram(w)), floored at 0 per word and averaged.
It is the negative of SLOR (Pauls & Klein, ACL 2012; Lau et al., Cognitive Science 2017), clamped: a string that
reads as the LM's text costs nothing however generic or rare its words are, so among readable strings the cosine
alone decides (a plain NLL rewards generic text: "a picture of a" beat "red" for `text:red`).
"""

from __future__ import annotations

import json
import math
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol, Sequence

import torch

from clipterm.errors import ClipTermError, ExitCode
from clipterm.inputs.vocab import Vocabulary

Tokens = tuple[int, ...]  # a string, as rows of the vocabulary
DISCOUNT = 0.75  # Kneser–Ney's absolute discount, one for every order
DEFAULT_WEIGHT = 0.06  # λ_lm of `clipterm search` and the TUI: see bench/truth/search_lm.py and docs/methods.md
THRESHOLD_QUANTILE = 0.95  # τ: the per-word NLL that 95% of the corpus's words stay under (3.9 nats on the toy)
TOY_CAPTIONS = 600  # training-style captions in the toy model's corpus, beside the `toy` pool
_WORD = re.compile(r"[a-z]+")
_START, _END = "<s>", "</s>"


class LanguageModel(Protocol):
    name: str  # what the JSON and the TUI header call it: "ngram:toy", "gpt2", a folder
    cheap: bool  # scoring a string costs less than the text tower does, so the search asks it first
    threshold: float  # τ: a word whose NLL where it stands is at most min(its unigram NLL, τ) costs nothing

    def next_logprobs(self, prefixes: Sequence[Tokens]) -> torch.Tensor:
        """log p(next word | prefix) (B, V) over the vocabulary's rows."""
        ...

    def logprob(self, strings: Sequence[Tokens]) -> torch.Tensor:
        """log p(string, then its end) (B,) in nats."""
        ...

    def word_logprobs(self, strings: Sequence[Tokens]) -> list[list[float]]:
        """log p(word | its context) of each word of each string, then of its end (n + 1 values, in nats)."""
        ...

    def unigram(self) -> list[float]:
        """log p(word) on its own (V + 1,): each vocabulary row, then the end of a string."""
        ...


def nll_per_word(lm: LanguageModel, strings: Sequence[Tokens]) -> list[float]:
    """-log p(s) / (words + 1): the end of the string counts as a word, so the empty string has a cost too."""
    return [-total / (len(s) + 1) for total, s in zip(lm.logprob(strings).tolist(), strings)]


def excess_per_word(lm: LanguageModel, strings: Sequence[Tokens],
                    logprobs: Sequence[Sequence[float]] | None = None) -> list[float]:
    """Mean over the words of a string and its end of max(0, −log p(w | context) − min(−log p_unigram(w), τ)), in
    nats: 0 for a string each of whose words is at least as likely where it stands as on its own, or at least as
    likely as the LM's typical word (τ, `lm.threshold`), so that rare words in a strange order pay too."""
    unigram, tau = lm.unigram(), lm.threshold
    end = len(unigram) - 1
    out = []
    for string, lps in zip(strings, logprobs if logprobs is not None else lm.word_logprobs(strings)):
        rows = (*string, end)
        out.append(sum(max(0.0, -lp - min(-unigram[w], tau)) for w, lp in zip(rows, lps)) / len(rows))
    return out


def penalties(lm: LanguageModel, strings: Sequence[Tokens], relative: bool = True) -> tuple[list[float], list[float]]:
    """(the penalised term, NLL per word) of each string: the excess NLL per word when `relative`, else the NLL."""
    lps = lm.word_logprobs(strings)
    nll = [-sum(lp) / len(lp) for lp in lps]
    return (excess_per_word(lm, strings, lps) if relative else nll), nll


# Words a caption may repeat ("a small star and a ring"); a guided search's strings never repeat any other word.
FUNCTION_WORDS = frozenset("a an the of on in at and or to with by for from is are it its this that as".split())


def repeats_a_word(words: Sequence[str]) -> bool:
    """Whether a string holds the same content word (not in FUNCTION_WORDS) twice."""
    content = [w for w in words if w not in FUNCTION_WORDS]
    return len(set(content)) < len(content)


# --------------------------------------------------------------------------- n-gram


class NGram:
    """Interpolated Kneser–Ney trigram over a vocabulary's V words, the end of string (row V) and one unknown
    word (row V+1). p(w | u v) = max(c(uvw) − D, 0)/c(uv·) + D·T(uv·)/c(uv·) · p2(w | v), where p2 and p1
    use continuation counts (the distinct words seen before) in place of counts, and p1 falls back to uniform."""

    cheap = True
    threshold = float("inf")  # load_ngram sets it from the corpus

    def __init__(self, trigrams: dict[tuple[str, str, str], int], vocab: Vocabulary, name: str):
        self.name, self.size = name, len(vocab)
        index = {word: row for row, word in enumerate(vocab.words)}
        end, unknown, start = self.size, self.size + 1, self.size + 2
        row = {_START: start, _END: end}
        counts: dict[tuple[int, int], dict[int, int]] = {}
        for (u, v, w), c in trigrams.items():
            following = counts.setdefault((row.get(u, index.get(u, unknown)), row.get(v, index.get(v, unknown))), {})
            w_row = row.get(w, index.get(w, unknown))
            following[w_row] = following.get(w_row, 0) + c
        self.shared = len({w for (_, _, w) in trigrams} & set(index))  # vocabulary words the corpus has
        seen = torch.zeros(self.size + 2, dtype=torch.float64)  # (V+2,) word counts
        for following in counts.values():
            for w, c in following.items():
                seen[w] += c
        # A word the corpus never has is rated as if seen once, so that it pays for being outside the LM's language
        # (with its own, tiny, unigram it would cost nothing anywhere).
        self._unigram = (seen.clamp_min(1) / seen.sum()).log()[: self.size + 1].tolist()  # words, then the end
        left: dict[int, dict[int, int]] = {}  # v -> w -> number of distinct u before "v w"
        for (_, v), following in counts.items():
            before_w = left.setdefault(v, {})
            for w in following:
                before_w[w] = before_w.get(w, 0) + 1
        before = torch.zeros(self.size + 2, dtype=torch.float64)  # (V+2,) distinct v before each w
        for following in left.values():
            before[list(following)] += 1
        total, types = float(before.sum()), float((before > 0).sum())
        self.p1 = (before - DISCOUNT).clamp_min(0) / total + DISCOUNT * types / total / (self.size + 2)  # (V+2,)
        self._p1 = self.p1.tolist()
        self.middle, self.top = _discounted(left), _discounted(counts)
        self._dense: dict[tuple[int, int], torch.Tensor] = {}

    def _context(self, prefix: Tokens) -> tuple[int, int]:
        start = self.size + 2
        padded = (start, start, *prefix)
        return padded[-2], padded[-1]

    def _p(self, u: int, v: int, w: int) -> float:
        p = self._p1[w]
        for level in (self.middle.get(v), self.top.get((u, v))):
            if level is not None:
                p = level[0] * p + level[1].get(w, 0.0)
        return p

    def next_logprobs(self, prefixes: Sequence[Tokens]) -> torch.Tensor:
        rows = []
        for prefix in prefixes:
            u, v = self._context(prefix)
            if (u, v) not in self._dense:
                p = self.p1.clone()  # (V+2,)
                for level in (self.middle.get(v), self.top.get((u, v))):
                    if level is not None:
                        p = level[0] * p
                        p[list(level[1])] += torch.tensor(list(level[1].values()), dtype=torch.float64)
                if len(self._dense) > 4096:
                    self._dense.clear()
                self._dense[(u, v)] = p[: self.size].log().float()  # (V,)
            rows.append(self._dense[(u, v)])
        return torch.stack(rows) if rows else torch.empty(0, self.size)  # (B, V)

    def logprob(self, strings: Sequence[Tokens]) -> torch.Tensor:
        return torch.tensor([sum(lps) for lps in self.word_logprobs(strings)], dtype=torch.float64)  # (B,)

    def word_logprobs(self, strings: Sequence[Tokens]) -> list[list[float]]:
        out = []
        for string in strings:
            u = v = self.size + 2
            lps = []
            for w in (*string, self.size):
                lps.append(math.log(self._p(u, v, w)))
                u, v = v, w
            out.append(lps)
        return out

    def unigram(self) -> list[float]:
        return self._unigram

    def slot_logprobs(self, moves: Sequence[tuple[Tokens, int, int]], shortlist: int = 64) -> torch.Tensor:
        """log p of the whole string with each word at the slot (P, V), up to a constant per move: the word given the
        two before it, and the (up to) two words after it given it. Only the `shortlist` words likeliest after the
        prefix are rated; the others are -inf."""
        end = self.size
        prefixes = [string[:slot] for string, slot, _ in moves]
        left = self.next_logprobs(prefixes) if moves else torch.empty(0, self.size)  # (P, V)
        top = left.topk(min(shortlist, self.size), dim=1)
        out = torch.full_like(left, float("-inf"))
        for row, ((string, slot, cut), words, lps) in enumerate(zip(moves, top.indices.tolist(), top.values.tolist())):
            v = self._context(string[:slot])[1]
            after = (*string[slot + cut :], end)[:2]
            for w, lp in zip(words, lps):
                context = (v, w)
                for x in after:
                    lp += math.log(self._p(*context, x))
                    context = (context[1], x)
                out[row, w] = lp
        return out


def _discounted(counts: dict[Any, dict[int, int]]) -> dict[Any, tuple[float, dict[int, float]]]:
    """Per context: (the weight left for the lower order, D·T/c; each seen word's max(c − D, 0)/c)."""
    out = {}
    for context, following in counts.items():
        total = sum(following.values())
        out[context] = (DISCOUNT * len(following) / total,
                        {w: (c - DISCOUNT) / total for w, c in following.items() if c > DISCOUNT})
    return out


def count_trigrams(texts: Sequence[str]) -> dict[tuple[str, str, str], int]:
    """Trigram counts of lowercase words, each text padded with two starts and one end."""
    counts: dict[tuple[str, str, str], int] = {}
    for text in texts:
        words = [_START, _START, *_WORD.findall(text.lower()), _END]
        for i in range(2, len(words)):
            key = (words[i - 2], words[i - 1], words[i])
            counts[key] = counts.get(key, 0) + 1
    return counts


@lru_cache(maxsize=2)
def builtin_corpus(model_spec: str) -> tuple[str, tuple[str, ...]]:
    """(name, texts): the `toy` pool and captions of the world a toy model was trained on, else the `general` pool."""
    from clipterm.inputs.texts import load_pool

    from clipterm.vit.models import is_toy

    if is_toy(model_spec):
        from clipterm.toyworld.captions import sample_captions
        from clipterm.toyworld.evaluate import model_world

        return "toy", (*load_pool("toy").texts, *sample_captions(TOY_CAPTIONS, world=model_world(model_spec)))
    return "general", load_pool("general").texts


def file_corpus(path: str | os.PathLike) -> tuple[str, list[str]]:
    """(path, lines) of a user's UTF-8 text file; a missing, non-UTF-8 or wordless file is refused."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ClipTermError(f"no --lm-corpus file {path}", hint="give a UTF-8 text file, e.g. one caption per line",
                            code=ExitCode.NOT_FOUND)
    raw = file.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ClipTermError(f"--lm-corpus {path} is not UTF-8 (bad byte at line {line})",
                            hint="re-save it as UTF-8, e.g. `iconv -f latin1 -t utf-8`", code=ExitCode.INVALID_DATA) from None
    lines = [line for line in text.splitlines() if _WORD.search(line.lower())]
    if not lines:
        raise ClipTermError(f"--lm-corpus {path} is empty: it has no words", hint="put some text in it, e.g. one caption per line")
    return str(file), lines


def load_ngram(vocab: Vocabulary, name: str, texts: Sequence[str], cache_dir: str | os.PathLike | None = None) -> NGram:
    """The trigram model of a corpus over `vocab`, its counts read from (or written to) the disk cache."""
    from clipterm.files import write_json
    from clipterm.inputs.texts import pool_sha256, texts_dir

    sha = pool_sha256(list(texts))
    path = texts_dir(cache_dir) / f"ngram-{sha[:16]}.json"  # beside the pool embeddings
    trigrams = None
    if path.is_file():
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
            if stored.get("corpus_sha256") == sha:
                trigrams = {(u, v, w): c for u, v, w, c in stored["trigrams"]}
        except (ValueError, KeyError, TypeError):  # a broken cache file is recounted and replaced
            trigrams = None
    if trigrams is None:
        trigrams = count_trigrams(texts)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {"schema": "clipterm.ngram/1", "corpus": name, "corpus_sha256": sha, "texts": len(texts),
                          "trigrams": [[u, v, w, c] for (u, v, w), c in sorted(trigrams.items())]})
    model = NGram(trigrams, vocab, f"ngram:{Path(name).name}")
    if model.shared == 0:
        raise ClipTermError(f"the search vocabulary ({vocab.source}) shares no words with the n-gram corpus {name}",
                            hint="give a --vocab with words of the corpus, a --lm-corpus in the vocabulary's words, or --lm none")
    model.threshold = word_nll_quantile(model, vocab, texts)
    return model


def word_nll_quantile(lm: LanguageModel, vocab: Vocabulary, texts: Sequence[str], q: float = THRESHOLD_QUANTILE) -> float:
    """The `q` quantile of the per-word NLL (end included) over up to 2,000 texts of a corpus: τ of excess_per_word."""
    index = {word: row for row, word in enumerate(vocab.words)}
    strings = [tuple(index[w] for w in _WORD.findall(t.lower()) if w in index) for t in texts[:: max(1, len(texts) // 2000)]]
    nll = sorted(-lp for lps in lm.word_logprobs(strings) for lp in lps)
    return nll[min(len(nll) - 1, int(q * len(nll)))] if nll else float("inf")


def load_lm(spec: str | None, vocab: Vocabulary, model_spec: str, corpus: str | None = None,
            cache_dir: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> LanguageModel | None:
    """The language model `--lm` names: `ngram` (trained on `corpus`, else the model's built-in corpus), `none`
    (None), or a Hugging Face causal or masked LM by name or folder (lm_hf.py)."""
    if spec in (None, "none"):
        if corpus is not None:
            raise ClipTermError("--lm-corpus trains the n-gram model, and --lm is none", hint="drop --lm none, or --lm-corpus")
        return None
    if spec == "ngram":
        name, texts = file_corpus(corpus) if corpus is not None else builtin_corpus(model_spec)
        return load_ngram(vocab, name, texts, cache_dir)
    if corpus is not None:
        raise ClipTermError(f"--lm-corpus trains an n-gram model; it does not go with --lm {spec}",
                            hint="use --lm ngram --lm-corpus FILE, or drop --lm-corpus")
    from clipterm.analyses.lm_hf import load_huggingface

    return load_huggingface(spec, vocab, device)
