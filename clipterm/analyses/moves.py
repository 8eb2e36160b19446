"""Candidate strings for one step of the hill-climb (search.py): from each beam string, every deletion; the
insertions and replacements the gradient ranks best (HotFlip, Ebrahimi et al., ACL 2018); the language model's
next words at each position (the Multimodal Neurons article's guidance); and a few random moves, so that the beam
does not lock in. A string that stays in the beam for d steps is offered the d-th group of ranked words, so it
goes deeper instead of being offered the same words again."""

from __future__ import annotations

from typing import Any

import torch

from clipterm.analyses.lm import LanguageModel, Tokens, repeats_a_word


def proposals(scorer: Any, beam: dict[Tokens, int], vocab_size: int, generator: torch.Generator) -> list[Tokens]:
    """Candidate strings for one step, in a fixed order: deletions, gradient-ranked insertions and
    replacements, then random moves. `beam` maps each string to the steps it has spent in the beam."""
    config = scorer.config
    out: list[Tokens] = [string[:i] + string[i + 1 :] for string in beam for i in range(len(string))]
    if config.topk:
        rows: list[tuple[Tokens, int | None]] = []  # strings to differentiate
        moves: list[tuple[Tokens, int, int, int]] = []  # (string, row, slot, tokens replaced: 0 or 1)
        for string in beam:
            for j in range(len(string) + 1) if len(string) < config.max_tokens else []:
                moves.append((string, len(rows), j, 0))
                rows.append((string, j))
            if string:
                moves += [(string, len(rows), i, 1) for i in range(len(string))]
                rows.append((string, None))
        grads = scorer.gradients(rows)
        slot_grads = torch.stack([grads[row][slot] for _, row, slot, _ in moves])  # (P, width)
        depths = [beam[string] for string, *_ in moves]
        for (string, _, slot, cut), tokens in zip(moves, scorer.ranked(slot_grads, depths)):
            out += [string[:slot] + (token,) + string[slot + cut :] for token in tokens]
    if scorer.lm is not None and config.lm_topk:
        out += _guided(scorer.lm, beam, config)
    for string in beam:
        n = len(string)
        kinds = (["insert"] if n < config.max_tokens else []) + (["delete", "replace"] if n else [])
        for kind, position, token in torch.randint(0, 1 << 30, (config.random, 3), generator=generator).tolist():
            kind, token = kinds[kind % len(kinds)], token % vocab_size
            i = position % (n + 1 if kind == "insert" else n)
            out.append({"insert": string[:i] + (token,) + string[i:], "delete": string[:i] + string[i + 1 :],
                        "replace": string[:i] + (token,) + string[i + 1 :]}[kind])
    if scorer.lm is not None:  # a guided search never holds a content word twice ("a orange circle orange ring")
        words = scorer.words
        out = [s for s in out if not repeats_a_word([words[t] for t in s])]
    return out


def _guided(lm: LanguageModel, beam: dict[Tokens, int], config: Any) -> list[Tokens]:
    """The language model's words for each insertion and replacement slot of each beam string: given the whole
    string around the slot where the LM can say (`slot_logprobs`: the n-gram, a masked LM), else given the prefix
    (a causal LM). For a string of depth d, its d-th group of `lm_topk`, as with the gradient's."""
    k = config.lm_topk
    moves = [(string, j, 0) for string in beam for j in (range(len(string) + 1) if len(string) < config.max_tokens else [])]
    moves += [(string, i, 1) for string in beam for i in range(len(string))]
    if not moves:
        return []
    if hasattr(lm, "slot_logprobs"):
        logp = lm.slot_logprobs(moves)  # (P, V)
        rows = list(range(len(moves)))
    else:
        prefixes = list(dict.fromkeys(string[:slot] for string, slot, _ in moves))
        logp = lm.next_logprobs(prefixes)  # (P', V)
        where = {prefix: row for row, prefix in enumerate(prefixes)}
        rows = [where[string[:slot]] for string, slot, _ in moves]
    top = logp.topk(min(k * max(beam.values()), logp.shape[1]), dim=1)  # (P, k·max depth)
    ranked = [[w for w, lp in zip(words, values) if lp > float("-inf")]
              for words, values in zip(top.indices.tolist(), top.values.tolist())]
    out = []
    for (string, slot, cut), row in zip(moves, rows):
        depth = beam[string]
        out += [string[:slot] + (word,) + string[slot + cut :] for word in ranked[row][k * (depth - 1) : k * depth]]
    return out
