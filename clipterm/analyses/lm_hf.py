"""Hugging Face language models that guide the hill-climb (lm.py has the protocol and the n-gram), through the
optional `transformers` package (`clipterm[lm]`), from local files only unless CLIPTERM_DOWNLOAD=1.

- `HuggingFaceLM`: a causal LM (GPT-2 style). Its tokenizer is not CLIP's BPE, so a string is scored as text,
  word by word: [start] + tokens(" " + w1) + tokens(" " + w2) + ... + [end], a word's log-probability the sum of
  its tokens'. A word it proposes is one whose text (" red") is a single token of it.
- `MaskedLM`: a masked LM (BERT style), as the Multimodal Neurons article guided its search with "a small BERT
  model". It proposes the words for a masked position, to insert or to replace one, given the whole string
  around it, and scores a string by its pseudo-log-likelihood (Salazar et al., ACL 2020): each word's tokens
  masked in turn. A word it proposes is one that is a single token of its vocabulary.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch

from clipterm.errors import ClipTermError, ExitCode
from clipterm.inputs.vocab import Vocabulary

Tokens = tuple[int, ...]
Move = tuple[Tokens, int, int]  # (string, slot, words replaced there: 0 to insert, 1 to replace)


def _by_length(ids: list[list[int]]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    for i, sequence in enumerate(ids):
        groups.setdefault(len(sequence), []).append(i)
    return groups


class HuggingFaceLM:
    """A causal LM scoring whole strings as text: [start] + tokens(" " + words) + [end]."""

    cheap = False
    threshold = float("inf")  # no corpus to take τ from: the excess is over the unigram alone

    def __init__(self, model: Any, tokenizer: Any, vocab: Vocabulary, name: str, batch_size: int = 64):
        self.model, self.tokenizer, self.name, self.batch_size = model.eval(), tokenizer, name, batch_size
        self.device = next(model.parameters()).device
        self.start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        self.end = tokenizer.eos_token_id
        if self.start is None:
            raise ClipTermError(f"language model {name} has neither a start nor an end-of-text token",
                                hint="use a causal LM whose tokenizer sets bos_token or eos_token", code=ExitCode.UNSUPPORTED)
        self.words = vocab.words
        self.pieces = tokenizer([" " + word for word in vocab.words], add_special_tokens=False)["input_ids"]
        unknown = tokenizer.unk_token_id
        self.token = torch.tensor([ids[0] if len(ids) == 1 and ids[0] != unknown else -1 for ids in self.pieces])  # (V,)
        if not bool((self.token >= 0).any()):
            raise ClipTermError(f"the search vocabulary ({vocab.source}) shares no words with {name}: none is one of its tokens",
                                hint="give a --vocab of common words, or --lm ngram")
        self._unigram: list[float] | None = None

    def _ids(self, words: Tokens, end: bool) -> list[int]:
        ids = [t for w in words for t in self.pieces[w]]
        return [self.start, *ids, *([self.end] if end and self.end is not None else [])]

    @torch.no_grad()
    def _log_softmax(self, ids: list[list[int]]) -> list[torch.Tensor]:
        """Log-probabilities (T, vocab) after each position of each sequence, batched by length."""
        out: list[torch.Tensor] = [torch.empty(0)] * len(ids)
        for members in _by_length(ids).values():
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

    def word_logprobs(self, strings: Sequence[Tokens]) -> list[list[float]]:
        ids = [self._ids(s, end=True) for s in strings]
        out = []
        for string, lp, seq in zip(strings, self._log_softmax(ids), ids):
            token = lp[:-1].gather(1, torch.tensor(seq[1:])[:, None])[:, 0].tolist()  # (T-1,) each token given those before
            words, at = [], 0
            for w in string:
                words.append(sum(token[at : at + len(self.pieces[w])]))
                at += len(self.pieces[w])
            out.append([*words, sum(token[at:])])  # the end, when the tokenizer has one (else 0)
        return out

    def logprob(self, strings: Sequence[Tokens]) -> torch.Tensor:
        return torch.tensor([sum(lps) for lps in self.word_logprobs(strings)], dtype=torch.float64)  # (B,)

    def unigram(self) -> list[float]:
        """log p(word | start) for each word (its tokens in turn), then log p(end | start): the LM's context-free guess."""
        if self._unigram is None:
            single = self.word_logprobs([(w,) for w in range(len(self.words))])
            self._unigram = [lps[0] for lps in single] + [self.word_logprobs([()])[0][0]]
        return self._unigram


class MaskedLM:
    """A masked LM: proposals for a masked position given the whole string, and pseudo-log-likelihood scores."""

    cheap = False
    threshold = float("inf")  # no corpus to take τ from: the excess is over the unigram alone

    def __init__(self, model: Any, tokenizer: Any, vocab: Vocabulary, name: str, batch_size: int = 128):
        self.model, self.tokenizer, self.name, self.batch_size = model.eval(), tokenizer, name, batch_size
        self.device = next(model.parameters()).device
        self.cls, self.sep, self.mask = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.mask_token_id
        if self.mask is None:
            raise ClipTermError(f"language model {name} has no mask token", hint="use a BERT-style masked LM, or a causal LM",
                                code=ExitCode.UNSUPPORTED)
        self.words = vocab.words
        self.pieces = tokenizer(list(vocab.words), add_special_tokens=False)["input_ids"]
        unknown = tokenizer.unk_token_id
        self.pieces = [ids if ids and unknown not in ids else [unknown] for ids in self.pieces]
        self.token = torch.tensor([ids[0] if len(ids) == 1 and ids[0] != unknown else -1 for ids in self.pieces])  # (V,)
        if not bool((self.token >= 0).any()):
            raise ClipTermError(f"the search vocabulary ({vocab.source}) shares no words with {name}: none is one of its tokens",
                                hint="give a --vocab of common words, or --lm ngram")
        self._unigram: list[float] | None = None

    def _frame(self, ids: list[int]) -> list[int]:
        return [t for t in (self.cls, *ids, self.sep) if t is not None]

    @torch.no_grad()
    def _at_masks(self, sequences: list[list[int]], at: list[int]) -> torch.Tensor:
        """Log-probabilities (B, vocab) of the LM's vocabulary at position `at[i]` of each sequence."""
        out = torch.empty(len(sequences), self.model.config.vocab_size)
        for members in _by_length(sequences).values():
            for start in range(0, len(members), self.batch_size):
                chunk = members[start : start + self.batch_size]
                batch = torch.tensor([sequences[i] for i in chunk], device=self.device)  # (b, T)
                logits = self.model(input_ids=batch).logits  # (b, T, vocab)
                picked = logits[torch.arange(len(chunk)), torch.tensor([at[i] for i in chunk])]  # (b, vocab)
                out[chunk] = picked.float().log_softmax(-1).cpu()
        return out

    def _words(self, logp: torch.Tensor) -> torch.Tensor:
        return logp[:, self.token.clamp_min(0)].masked_fill(self.token < 0, float("-inf"))  # (B, V)

    def slot_logprobs(self, moves: Sequence[Move]) -> torch.Tensor:
        """log p(word at the slot | the rest of the string) (P, V), the slot masked: inserted there, or replacing a word."""
        sequences, at = [], []
        for string, slot, cut in moves:
            before = [t for w in string[:slot] for t in self.pieces[w]]
            after = [t for w in string[slot + cut :] for t in self.pieces[w]]
            sequences.append(self._frame([*before, self.mask, *after]))
            at.append(len(before) + (self.cls is not None))
        return self._words(self._at_masks(sequences, at)) if moves else torch.empty(0, len(self.words))

    def next_logprobs(self, prefixes: Sequence[Tokens]) -> torch.Tensor:
        return self.slot_logprobs([(p, len(p), 0) for p in prefixes])

    def word_logprobs(self, strings: Sequence[Tokens]) -> list[list[float]]:
        """Pseudo-log-likelihood per word: the sum over its tokens, each masked in turn; the end of a string, 0."""
        sequences, at, targets, owner = [], [], [], []
        for s, string in enumerate(strings):
            ids = [t for w in string for t in self.pieces[w]]
            framed = self._frame(ids)
            offset = self.cls is not None
            position = 0
            for k, w in enumerate(string):
                for _ in self.pieces[w]:
                    masked = list(framed)
                    masked[offset + position] = self.mask
                    sequences.append(masked)
                    at.append(offset + position)
                    targets.append(framed[offset + position])
                    owner.append((s, k))
                    position += 1
        out = [[0.0] * (len(string) + 1) for string in strings]
        if sequences:
            logp = self._at_masks(sequences, at).gather(1, torch.tensor(targets)[:, None])[:, 0].tolist()
            for (s, k), lp in zip(owner, logp):
                out[s][k] += lp
        return out

    def logprob(self, strings: Sequence[Tokens]) -> torch.Tensor:
        return torch.tensor([sum(lps) for lps in self.word_logprobs(strings)], dtype=torch.float64)  # (B,)

    def unigram(self) -> list[float]:
        """log p(word | [CLS] [MASK] [SEP]) for each word (its tokens each masked alone), then 0 for the end."""
        if self._unigram is None:
            self._unigram = [lps[0] for lps in self.word_logprobs([(w,) for w in range(len(self.words))])] + [0.0]
        return self._unigram


def _missing(name: str, why: str) -> ClipTermError:
    from clipterm.locations import hub_cache_dirs

    return ClipTermError(f"no language model {name!r} here: not a folder, and not in the local Hugging Face cache "
                         f"{hub_cache_dirs()[0]} ({why})",
                         hint=f"fetch it once with CLIPTERM_DOWNLOAD=1 clipterm search --lm {name} ... (needs internet), "
                              "or give --lm a folder written by save_pretrained", code=ExitCode.NOT_FOUND)


def _is_masked(config: Any) -> bool:
    """A BERT-style masked LM, by its architectures (`BertForMaskedLM`) or, lacking them, its model type."""
    architectures = getattr(config, "architectures", None) or []
    if architectures:
        return any(a.endswith("ForMaskedLM") for a in architectures)
    return getattr(config, "model_type", "") in ("bert", "roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2")


def load_huggingface(name: str, vocab: Vocabulary, device: str | torch.device = "cpu") -> HuggingFaceLM | MaskedLM:
    """A causal or masked LM by hub name (from the local HF cache only, unless CLIPTERM_DOWNLOAD=1) or local folder."""
    from clipterm.locations import hub_cache_dirs

    folder = Path(name).expanduser()
    cached = (hub_cache_dirs()[0] / ("models--" + name.replace("/", "--"))).is_dir()
    if not folder.is_dir() and not cached and os.environ.get("CLIPTERM_DOWNLOAD", "") != "1":
        raise _missing(name, "downloads are off by default")  # said before asking for transformers: it is not here at all
    try:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer
    except ImportError:
        raise ClipTermError(f"--lm {name} needs the transformers package", hint="pip install 'clipterm[lm]', or use --lm ngram",
                            code=ExitCode.UNSUPPORTED) from None

    download = os.environ.get("CLIPTERM_DOWNLOAD", "") == "1" and not folder.is_dir()
    source = str(folder) if folder.is_dir() else name
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=not download)
        masked = _is_masked(config)
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=not download)
        auto = AutoModelForMaskedLM if masked else AutoModelForCausalLM
        model = auto.from_pretrained(source, local_files_only=not download).to(device)
    except (OSError, ValueError, KeyError) as exc:
        if folder.is_dir():
            raise ClipTermError(f"cannot load a language model from {folder}: {str(exc).splitlines()[0]}",
                                hint="the folder needs config.json, weights and tokenizer files, as save_pretrained writes them",
                                code=ExitCode.INVALID_DATA) from None
        why = "downloads are off by default" if not download else f"the download failed: {str(exc).splitlines()[0]}"
        raise _missing(name, why) from None
    kind = MaskedLM if masked else HuggingFaceLM
    return kind(model, tokenizer, vocab, folder.name if folder.is_dir() else name)
