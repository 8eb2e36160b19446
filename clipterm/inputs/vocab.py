"""Search vocabularies: whole-word tokens of CLIP's BPE, and an offline frequency prior from merge rank.

A vocabulary entry is one BPE token that is a whole word (`red</w>`), so a string of entries is
the words joined by spaces, and tokenising that string gives back exactly those tokens.

The prior stands in for the small language model of OpenAI's search: BPE learns its merges in
order of pair frequency, so the rank of the merge that made a whole-word token orders words
roughly by corpus frequency. Zipf's law turns the rank into a probability,
p(rank) = 1 / ((rank + 10) · Z), and a string's prior is the sum of its tokens' -log p, in nats.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from clipterm.errors import ClipTermError, ExitCode

_WORD = re.compile(r"^(?:[a-z]{2,}|a|i)</w>$")  # single letters other than "a" and "i" are noise, not words
_BYTE_TOKENS = 512  # 256 byte tokens, then the same 256 with </w>; merges come after them
_ZIPF_OFFSET = 10.0


@dataclass(frozen=True)
class Vocabulary:
    """Token ids the search may use, their words, and each one's prior cost."""

    ids: torch.Tensor  # (V,) int64 BPE token ids
    words: tuple[str, ...]  # (V,) the word each token spells
    prior: torch.Tensor  # (V,) float32: -log p(token) in nats
    source: str  # "bpe" (every whole-word token) or the vocabulary file's path
    dropped: tuple[str, ...] = ()  # file words that are not one BPE token, left out

    def __len__(self) -> int:
        return len(self.words)

    def text(self, entries: tuple[int, ...] | list[int]) -> str:
        """The string a sequence of vocabulary entries (rows, not token ids) spells."""
        return " ".join(self.words[i] for i in entries)


def bpe_tokenizer(tokenizer: Any) -> Any:
    """The tokenizer, checked to be open_clip's CLIP BPE (`SimpleTokenizer`); others are refused."""
    if not all(hasattr(tokenizer, key) for key in ("encoder", "decoder", "sot_token_id", "eot_token_id")):
        raise ClipTermError(
            f"text search needs CLIP's BPE tokenizer, and this model uses {type(tokenizer).__name__}",
            hint="search runs on open_clip models with the standard CLIP text tower (toy, ViT-B-32, ...)",
            code=ExitCode.UNSUPPORTED,
        )
    return tokenizer


def token_prior(ids: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """-log p (V,) of each token id under Zipf's law over BPE merge rank (byte tokens get rank 0)."""
    n_merges = max(n_tokens - _BYTE_TOKENS, 1)
    log_z = math.log(float((torch.arange(n_merges, dtype=torch.float64) + _ZIPF_OFFSET).reciprocal().sum()))
    rank = (ids.double() - _BYTE_TOKENS).clamp_min(0)  # (V,)
    return (torch.log(rank + _ZIPF_OFFSET) + log_z).float()  # (V,)


def default_vocabulary(tokenizer: Any, token_ids: Any = None) -> Vocabulary:
    """Every whole-word, all-letter token of the tokenizer, single letters other than a and i left out
    (about 33k for CLIP's BPE); only those among `token_ids` when given (a pruned model's kept tokens)."""
    encoder = bpe_tokenizer(tokenizer).encoder
    allowed = None if token_ids is None else {int(i) for i in token_ids}
    pairs = sorted((token_id, token[:-4]) for token, token_id in encoder.items()
                   if _WORD.match(token) and (allowed is None or token_id in allowed))
    ids = torch.tensor([token_id for token_id, _ in pairs], dtype=torch.long)
    return Vocabulary(ids, tuple(word for _, word in pairs), token_prior(ids, len(encoder)), "bpe")


def file_vocabulary(tokenizer: Any, path: str | Path) -> Vocabulary:
    """The words of a UTF-8 file (one or more per line). Words that are not one BPE token are left out
    and listed in `dropped`; an empty file, or one where no word is a single token, is refused."""
    tokenizer = bpe_tokenizer(tokenizer)
    file = Path(path).expanduser()
    if not file.is_file():
        raise ClipTermError(f"no vocabulary file {path}", hint="give a UTF-8 file with one word per line",
                            code=ExitCode.NOT_FOUND)
    try:
        words = file.read_text(encoding="utf-8").split()
    except UnicodeDecodeError:
        raise ClipTermError(f"vocabulary file {path} is not UTF-8", hint="re-save it as UTF-8") from None
    if not words:
        raise ClipTermError(f"vocabulary file {path} is empty", hint="put one word per line")
    kept: dict[int, str] = {}
    dropped: list[str] = []
    for word in words:
        token_ids = tokenizer.encode(word)
        if len(token_ids) == 1 and tokenizer.decoder[token_ids[0]].endswith("</w>"):
            kept.setdefault(token_ids[0], tokenizer.decoder[token_ids[0]][:-4])
        elif word not in dropped:
            dropped.append(word)
    if not kept:
        raise ClipTermError(
            f"no word of {path} is a single BPE token ({len(dropped)} words, e.g. {', '.join(dropped[:3])})",
            hint="search strings are made of whole-word tokens; list common single words, one per line",
        )
    ids = torch.tensor(list(kept), dtype=torch.long)
    return Vocabulary(ids, tuple(kept.values()), token_prior(ids, len(tokenizer.encoder)), str(file), tuple(dropped))
