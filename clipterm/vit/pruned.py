"""Model files whose token embedding keeps only the rows its texts use (the shipped toy models).

A toy text tower learns only the tokens of its world's captions; the other rows of CLIP's 49,408-token table
stay at their random initialisation and are most of the file (6.3M of toy-rn's parameters). A pruned
`open_clip_model.safetensors` holds, instead of `token_embedding.weight` (V, W):

| key                            | shape   | meaning                                         |
|--------------------------------|---------|-------------------------------------------------|
| `token_embedding.kept_ids`     | (K,)    | int64 token ids, sorted ascending               |
| `token_embedding.kept_weight`  | (K, W)  | their rows of the table, in the same order      |

`unprune` scatters them back into a (V, W) table of zeros at load, so open_clip's model and tokenizer are
unchanged; a token outside the kept set embeds as zeros (only its position remains), and the search
vocabulary of such a model is its kept whole-word tokens (`LoadedModel.text_tokens`).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor

from clipterm.errors import ClipTermError, ExitCode

FULL = "token_embedding.weight"
KEPT_IDS = "token_embedding.kept_ids"
KEPT_WEIGHT = "token_embedding.kept_weight"


def is_pruned(state: dict[str, Tensor]) -> bool:
    return KEPT_IDS in state


def prune(state: dict[str, Tensor], keep: Iterable[int]) -> dict[str, Tensor]:
    """The state dict with its token embedding cut to the rows `keep` (token ids)."""
    ids = torch.tensor(sorted(set(int(i) for i in keep)), dtype=torch.long)  # (K,)
    table = state[FULL]  # (V, W)
    if ids.numel() == 0 or ids[0] < 0 or ids[-1] >= table.shape[0]:
        raise ValueError(f"kept token ids must lie in 0..{table.shape[0] - 1}")
    pruned = {key: value for key, value in state.items() if key != FULL}
    pruned[KEPT_IDS], pruned[KEPT_WEIGHT] = ids, table[ids].contiguous()  # (K,), (K, W)
    return pruned


def unprune(state: dict[str, Tensor], vocab_size: int) -> tuple[dict[str, Tensor], Tensor | None]:
    """The full state dict, and the kept ids (None when the file was not pruned)."""
    if not is_pruned(state):
        return state, None
    ids, rows = state[KEPT_IDS].long(), state[KEPT_WEIGHT]  # (K,), (K, W)
    if ids.ndim != 1 or rows.shape[0] != ids.shape[0] or int(ids.max()) >= vocab_size or int(ids.min()) < 0:
        raise ClipTermError(f"a pruned token embedding does not fit a {vocab_size}-token vocabulary",
                            hint="the weights file and its open_clip_config.json do not belong together",
                            code=ExitCode.INVALID_DATA)
    table = rows.new_zeros(vocab_size, rows.shape[1])  # (V, W)
    table[ids] = rows
    full = {key: value for key, value in state.items() if key not in (KEPT_IDS, KEPT_WEIGHT)}
    full[FULL] = table
    return full, ids


def token_ids(tokenizer: Any, texts: Iterable[str]) -> set[int]:
    """Every token id that tokenising `texts` gives (start and end of text included)."""
    found: set[int] = set()
    texts = list(texts)
    for start in range(0, len(texts), 4096):
        found.update(tokenizer(texts[start:start + 4096]).unique().tolist())
    return found
