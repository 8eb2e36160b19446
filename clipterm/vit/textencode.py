"""Fast text encoding: run open_clip's causal text tower only as far as each batch needs.

CLIP's text transformer is causal and pools at the end-of-text token (the argmax token id,
or the tokenizer's EOS id). A token never attends to later tokens, so every position up to
the EOS is the same whether the context is padded to 77 tokens or cut right after the EOS.
Texts are sorted by EOS position and batched, and each batch runs only up to its longest
sequence: exact up to float rounding, and several times faster for short texts.

Towers where the cut is not exact fall back to the model's own `encode_text`: no causal mask
(bi-directional), last- or first-token pooling with padding, an appended class token (CoCa),
and Hugging Face towers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from clipterm.errors import ClipTermError, ExitCode


@dataclass
class _Tower:
    """The pieces of an open_clip text tower that `encode_text` runs, wherever the model keeps them."""

    token_embedding: Any
    positional_embedding: torch.Tensor  # (context, width)
    transformer: Any
    ln_final: Any
    text_projection: Any  # (width, D) parameter, nn.Linear, or None
    attn_mask: torch.Tensor | None  # (context, context) additive causal mask
    pool_type: str
    eos_id: int | None
    cls_emb: Any = None


def text_tower(model) -> _Tower | None:
    """The text tower of an open_clip CLIP or CustomTextCLIP, or None for towers clipterm can't run itself."""
    from open_clip.transformer import TextTransformer

    text = getattr(model, "text", None)
    if isinstance(text, TextTransformer):
        return _Tower(text.token_embedding, text.positional_embedding, text.transformer, text.ln_final,
                      text.text_projection, text.attn_mask, text.pool_type, getattr(text, "eos_id", None), text.cls_emb)
    if all(hasattr(model, k) for k in ("token_embedding", "positional_embedding", "transformer", "ln_final")):
        return _Tower(model.token_embedding, model.positional_embedding, model.transformer, model.ln_final,
                      model.text_projection, model.attn_mask, getattr(model, "text_pool_type", "argmax"),
                      getattr(model, "text_eos_id", None))
    return None


def fallback_reason(model) -> str | None:
    """Why truncating the context would not be exact for this model's text tower, or None when it is."""
    tower = text_tower(model)
    if tower is None:
        return f"text tower {type(getattr(model, 'text', model)).__name__} is not an open_clip TextTransformer"
    if tower.attn_mask is None:
        return "the text tower has no causal mask"
    if tower.cls_emb is not None:
        return "the text tower appends a class token"
    if tower.pool_type not in ("argmax", "eos"):
        return f"the text tower pools with pool_type={tower.pool_type!r}"
    if tower.pool_type == "eos" and tower.eos_id is None:
        return "pool_type='eos' without an eos id"
    return None


def eos_positions(tokens: torch.Tensor, pool_type: str = "argmax", eos_id: int | None = None) -> torch.Tensor:
    """The pooled position of each tokenised text: (n,) int64."""
    if pool_type == "eos":
        return (tokens == eos_id).int().argmax(dim=-1)
    return tokens.argmax(dim=-1)


@torch.no_grad()
def encode_tokens(
    model,
    tokens: torch.Tensor,
    batch_size: int = 256,
    normalize: bool = False,
    on_batch: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Text embeddings (n, D) in float32, equal to `model.encode_text(tokens)`.

    `tokens` is (n, context) from the model's tokenizer. `on_batch(k)` is called after each
    batch with the number of texts done in it.
    """
    device = next(model.parameters()).device
    tower = text_tower(model)
    exact = fallback_reason(model) is None
    pos = eos_positions(tokens, tower.pool_type, tower.eos_id) if exact else torch.zeros(len(tokens), dtype=torch.long)
    order = torch.argsort(pos, stable=True)  # (n,) short texts first
    out = torch.empty(0)
    for start in range(0, len(tokens), batch_size):
        rows = order[start : start + batch_size]  # (B,)
        batch = tokens[rows].to(device)  # (B, context)
        if exact:
            embeds = _encode_truncated(tower, batch, pos[rows].to(device), int(pos[rows].max()) + 1)
        else:
            embeds = model.encode_text(batch)
        embeds = embeds.float().cpu()  # (B, D)
        if out.numel() == 0:
            out = torch.empty(len(tokens), embeds.shape[-1])
        out[rows] = embeds
        if on_batch is not None:
            on_batch(len(rows))
    return F.normalize(out, dim=-1) if normalize else out


def _encode_truncated(tower: _Tower, tokens: torch.Tensor, pooled_at: torch.Tensor, length: int) -> torch.Tensor:
    """open_clip's `encode_text` on the first `length` positions only."""
    cast_dtype = tower.transformer.get_cast_dtype()
    x = tower.token_embedding(tokens[:, :length]).to(cast_dtype)  # (B, T, width)
    x = x + tower.positional_embedding[:length].to(cast_dtype)  # (B, T, width)
    x = tower.transformer(x, attn_mask=tower.attn_mask[:length, :length])  # (B, T, width)
    x = tower.ln_final(x)  # (B, T, width)
    pooled = x[torch.arange(x.shape[0], device=x.device), pooled_at]  # (B, width)
    if tower.text_projection is None:
        return pooled
    if isinstance(tower.text_projection, torch.nn.Linear):
        return tower.text_projection(pooled)  # (B, D)
    return pooled @ tower.text_projection  # (B, D)


def encode_texts(
    model,
    tokenizer,
    texts: list[str],
    batch_size: int = 256,
    normalize: bool = False,
    on_batch: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Tokenise and encode strings: (n, D) float32."""
    if not texts:
        return torch.empty(0, 0)
    tokens = torch.cat([tokenizer(texts[i : i + 4096]) for i in range(0, len(texts), 4096)])  # (n, context)
    return encode_tokens(model, tokens, batch_size=batch_size, normalize=normalize, on_batch=on_batch)


class TextTower:
    """open_clip's causal text tower run from token embeddings, on sequences cut right after EOT: the text search's
    forward and backward pass (analyses/search.py)."""

    def __init__(self, model, sot_id: int, eot_id: int):
        reason = fallback_reason(model)
        if reason is not None:
            raise ClipTermError(f"text search cannot run on this model: {reason}",
                                hint="search needs an open_clip causal text tower that pools at end-of-text",
                                code=ExitCode.UNSUPPORTED)
        self.parts = text_tower(model)
        self.token_embedding = self.parts.token_embedding.weight  # (vocab, width)
        self.context_length = int(self.parts.positional_embedding.shape[0])
        self.sot = self.token_embedding[sot_id].detach()  # (width,)
        self.eot = self.token_embedding[eot_id].detach()  # (width,)

    def encode(self, words: torch.Tensor) -> torch.Tensor:
        """Unit text embeddings (B, D) of [SOT, words, EOT], `words` (B, n, width) token embeddings."""
        tower, batch = self.parts, words.shape[0]
        cast = tower.transformer.get_cast_dtype()
        x = torch.cat([self.sot.expand(batch, 1, -1), words, self.eot.expand(batch, 1, -1)], dim=1)  # (B, T, width)
        length = x.shape[1]
        x = x.to(cast) + tower.positional_embedding[:length].to(cast)  # (B, T, width)
        x = tower.transformer(x, attn_mask=tower.attn_mask[:length, :length])  # (B, T, width)
        pooled = tower.ln_final(x[:, -1])  # (B, width) EOT is last
        if isinstance(tower.text_projection, torch.nn.Linear):
            pooled = tower.text_projection(pooled)  # (B, D)
        elif tower.text_projection is not None:
            pooled = pooled @ tower.text_projection  # (B, D)
        return F.normalize(pooled.float(), dim=-1)  # (B, D)
