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
- `HuggingFaceLM`: a causal LM through `transformers` (`clipterm[lm]`), from the local HF cache or a folder.
  Its tokenizer is not CLIP's BPE, so whole strings are scored as text, and a word it proposes is one whose
  text (" red") is a single token of it.
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
TOY_CAPTIONS = 600  # training-style captions in the toy model's corpus, beside the `toy` pool
_WORD = re.compile(r"[a-z]+")
_START, _END = "<s>", "</s>"


class LanguageModel(Protocol):
    name: str  # what the JSON and the TUI header call it: "ngram:toy", "gpt2", a folder
    cheap: bool  # scoring a string costs less than the text tower does, so the search asks it first

    def next_logprobs(self, prefixes: Sequence[Tokens]) -> torch.Tensor:
        """log p(next word | prefix) (B, V) over the vocabulary's rows."""
        ...

    def logprob(self, strings: Sequence[Tokens]) -> torch.Tensor:
        """log p(string, then its end) (B,) in nats."""
        ...


def nll_per_word(lm: LanguageModel, strings: Sequence[Tokens]) -> list[float]:
    """-log p(s) / (words + 1): the end of the string counts as a word, so the empty string has a cost too."""
    return [-total / (len(s) + 1) for total, s in zip(lm.logprob(strings).tolist(), strings)]


# --------------------------------------------------------------------------- n-gram


class NGram:
    """Interpolated Kneser–Ney trigram over a vocabulary's V words, the end of string (row V) and one unknown
    word (row V+1). p(w | u v) = max(c(uvw) − D, 0)/c(uv·) + D·T(uv·)/c(uv·) · p2(w | v), where p2 and p1
    use continuation counts (the distinct words seen before) in place of counts, and p1 falls back to uniform."""

    cheap = True

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
        out = []
        for string in strings:
            u = v = self.size + 2
            total = 0.0
            for w in (*string, self.size):
                total += math.log(self._p(u, v, w))
                u, v = v, w
            out.append(total)
        return torch.tensor(out, dtype=torch.float64)  # (B,)


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
    return model


# --------------------------------------------------------------------------- Hugging Face


class HuggingFaceLM:
    """A causal LM scoring whole strings as text: [start] + tokens(" " + words) + [end]."""

    cheap = False

    def __init__(self, model: Any, tokenizer: Any, vocab: Vocabulary, name: str, batch_size: int = 64):
        self.model, self.tokenizer, self.name, self.batch_size = model.eval(), tokenizer, name, batch_size
        self.device = next(model.parameters()).device
        self.start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        self.end = tokenizer.eos_token_id
        if self.start is None:
            raise ClipTermError(f"language model {name} has neither a start nor an end-of-text token",
                                hint="use a causal LM whose tokenizer sets bos_token or eos_token", code=ExitCode.UNSUPPORTED)
        self.words = vocab.words
        encoded = tokenizer([" " + word for word in vocab.words], add_special_tokens=False)["input_ids"]
        unknown = tokenizer.unk_token_id
        self.token = torch.tensor([ids[0] if len(ids) == 1 and ids[0] != unknown else -1 for ids in encoded])  # (V,) -1: none
        if not bool((self.token >= 0).any()):
            raise ClipTermError(f"the search vocabulary ({vocab.source}) shares no words with {name}: none is one of its tokens",
                                hint="give a --vocab of common words, or --lm ngram")

    def _ids(self, words: Tokens, end: bool) -> list[int]:
        text = " ".join(self.words[w] for w in words)
        ids = self.tokenizer(" " + text, add_special_tokens=False)["input_ids"] if words else []
        return [self.start, *ids, *([self.end] if end and self.end is not None else [])]

    @torch.no_grad()
    def _log_softmax(self, ids: list[list[int]]) -> list[torch.Tensor]:
        """Log-probabilities (T, vocab) after each position of each sequence, batched by length."""
        out: list[torch.Tensor] = [torch.empty(0)] * len(ids)
        groups: dict[int, list[int]] = {}
        for i, sequence in enumerate(ids):
            groups.setdefault(len(sequence), []).append(i)
        for members in groups.values():
            for start in range(0, len(members), self.batch_size):
                chunk = members[start : start + self.batch_size]
                batch = torch.tensor([ids[i] for i in chunk], device=self.device)  # (b, T)
                logits = self.model(input_ids=batch).logits.float()  # (b, T, vocab)
                for row, i in enumerate(chunk):
                    out[i] = logits[row].log_softmax(-1).cpu()
        return out

    def next_logprobs(self, prefixes: Sequence[Tokens]) -> torch.Tensor:
        logp = torch.stack([lp[-1] for lp in self._log_softmax([self._ids(p, end=False) for p in prefixes])])  # (B, vocab)
        words = logp[:, self.token.clamp_min(0)]  # (B, V)
        return words.masked_fill(self.token < 0, float("-inf"))  # (B, V)

    def logprob(self, strings: Sequence[Tokens]) -> torch.Tensor:
        ids = [self._ids(s, end=True) for s in strings]
        totals = [float(lp[:-1].gather(1, torch.tensor(seq[1:])[:, None]).sum()) for lp, seq in zip(self._log_softmax(ids), ids)]
        return torch.tensor(totals, dtype=torch.float64)  # (B,)


def _missing(name: str, why: str) -> ClipTermError:
    from clipterm.locations import hub_cache_dirs

    return ClipTermError(f"no language model {name!r} here: not a folder, and not in the local Hugging Face cache "
                         f"{hub_cache_dirs()[0]} ({why})",
                         hint=f"fetch it once with CLIPTERM_DOWNLOAD=1 clipterm search --lm {name} ... (needs internet), "
                              "or give --lm a folder written by save_pretrained", code=ExitCode.NOT_FOUND)


def load_huggingface(name: str, vocab: Vocabulary, device: str | torch.device = "cpu") -> HuggingFaceLM:
    """A causal LM by hub name (from the local HF cache only, unless CLIPTERM_DOWNLOAD=1) or local folder."""
    from clipterm.locations import hub_cache_dirs

    folder = Path(name).expanduser()
    cached = (hub_cache_dirs()[0] / ("models--" + name.replace("/", "--"))).is_dir()
    if not folder.is_dir() and not cached and os.environ.get("CLIPTERM_DOWNLOAD", "") != "1":
        raise _missing(name, "downloads are off by default")  # said before asking for transformers: it is not here at all
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise ClipTermError(f"--lm {name} needs the transformers package", hint="pip install 'clipterm[lm]', or use --lm ngram",
                            code=ExitCode.UNSUPPORTED) from None

    folder = Path(name).expanduser()
    download = os.environ.get("CLIPTERM_DOWNLOAD", "") == "1" and not folder.is_dir()
    source = str(folder) if folder.is_dir() else name
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=not download)
        model = AutoModelForCausalLM.from_pretrained(source, local_files_only=not download).to(device)
    except (OSError, ValueError, KeyError) as exc:
        if folder.is_dir():
            raise ClipTermError(f"cannot load a causal language model from {folder}: {str(exc).splitlines()[0]}",
                                hint="the folder needs config.json, weights and tokenizer files, as save_pretrained writes them",
                                code=ExitCode.INVALID_DATA) from None
        why = "downloads are off by default" if not download else f"the download failed: {str(exc).splitlines()[0]}"
        raise _missing(name, why) from None
    return HuggingFaceLM(model, tokenizer, vocab, folder.name if folder.is_dir() else name)


def load_lm(spec: str | None, vocab: Vocabulary, model_spec: str, corpus: str | None = None,
            cache_dir: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> LanguageModel | None:
    """The language model `--lm` names: `ngram` (trained on `corpus`, else the model's built-in corpus), `none`
    (None), or a Hugging Face causal LM by name or folder."""
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
    return load_huggingface(spec, vocab, device)
