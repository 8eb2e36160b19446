"""The model side of feature visualisation: a differentiable forward with recordings at named sites, per family.

A climb (`climb_for(loaded)`) runs the tower's own forward pass with forward hooks on its modules, and scores a
unit's objective from what they recorded, so the gradient reaches the image through the model's plain (fused)
forward. Every family gives the same interface (`VitClimb` here for open_clip's class-token ViT; `ResNetClimb` in
`vit/resnet.py`):

- `layers`: how many layers a facet's probe can read (`layer_acts`), counted as the family's own names count;
- `unit_term(component, kind, sign, direction)`: the Term of one unit, refusing an objective it cannot have;
- `default_kind(component)`, `unit_layer(term)`: the objective a unit gets by default, and the layer it lives in
  (a facet's layer must be below it);
- `recorder(terms, blocks)`, `score(term, recorder, embeds)`, `layer_acts(recorder, layer)`, `tokens(acts)`;
- `unit_site(component)`: the module, dimension and index of a neuron's or channel's output (ablation's hook).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from clipterm.errors import ClipTermError


@dataclass
class Term:
    """One signed part of an objective; a climb's `score` gives (B,)."""

    sign: int
    kind: str  # direction, head_effect, neuron_activation, neuron_effect, channel_activation, channel_effect
    direction: Tensor | None = None  # (D,) unit
    layer: int = 0
    index: int = 0
    path_gains: Tensor | None = None  # (K,) for neuron_effect: each later head's path vector · direction


class Recorder:
    """Forward hooks on the model's own modules. Only passes run by the thread that made it are recorded: a TUI
    worker may share the model with another at the same time. `saved[(kind, layer)]` is a module's output
    (`kind + "_in"` its input, where asked)."""

    def __init__(self, sites: list[tuple[Any, str, int, bool]]):
        self.saved: dict[tuple[str, int], Tensor] = {}
        self.hooks = []
        self.undo: list[Callable[[], None]] = []  # what `close` puts back (a climb's changes to the modules)
        self.thread = threading.get_ident()
        for module, kind, layer, with_input in sites:
            self.hooks.append(module.register_forward_hook(self._keep(kind, layer, with_input)))

    def _keep(self, kind: str, layer: int, with_input: bool = False) -> Callable:
        def hook(_module, inputs, output):
            if threading.get_ident() != self.thread:
                return
            self.saved[(kind, layer)] = output[0] if isinstance(output, tuple) else output
            if with_input:
                self.saved[(kind + "_in", layer)] = inputs[0]
        return hook

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()
        for undo in self.undo:
            undo()


def sigma(residual: Tensor, eps: float) -> Tensor:
    return (residual.float().var(-1, unbiased=False) + eps).sqrt()  # (...,)


def cls_attention(attn: Any, normed: Tensor) -> tuple[Tensor, Tensor]:
    """The class token's attention row (B, H, T) and its per-head output (B, H, dh), from ln_1's output."""
    from clipterm.vit.decompose import attention_qkv

    q, k, v, scale = attention_qkv(attn, normed)  # (B, H, T, dh) each
    row = (q[:, :, :1] @ k.transpose(-1, -2) * scale).softmax(-1)  # (B, H, 1, T)
    return row[:, :, 0], (row @ v)[:, :, 0]  # (B, H, T), (B, H, dh)


class Climb:
    """What every family shares: the tower, its device, its normalisation."""

    class_token = False  # whether position 0 of `tokens` is a class token (a logprob facet reads it)

    def __init__(self, loaded: Any):
        from clipterm.vit.decompose import vision_tower

        self.model = loaded.model
        self.visual = vision_tower(loaded.model)
        self.device = self.visual.conv1.weight.device
        self.mean = torch.tensor(self.visual.image_mean or (0.5,) * 3, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(self.visual.image_std or (0.5,) * 3, device=self.device).view(1, 3, 1, 1)

    def forward(self, pixels: Tensor) -> Tensor:
        """Image embeddings (B, D) of pixels (B, 3, S, S) in [0, 1], through the model's own forward."""
        return self.visual((pixels - self.mean) / self.std)

    def tokens(self, acts: Tensor) -> Tensor:
        """A recorded layer output as (B, T, W)."""
        return acts

    def default_kind(self, component: Any) -> str:
        return "effect" if component.kind == "head" else "activation"

    def unit_layer(self, term: Term) -> int:
        return term.layer


class VitClimb(Climb):
    """open_clip's class-token ViT: heads `L5.H2` (effect), neurons `L4.N12` (activation at the class token, or the
    second-order effect through later heads); facets read a block's output."""

    class_token = True

    def __init__(self, loaded: Any):
        super().__init__(loaded)
        self.blocks = self.visual.transformer.resblocks
        self.layers = len(self.blocks)
        self._readout = None

    def unit_term(self, component: Any, kind: str, sign: int, direction: Callable[[Any], Tensor]) -> Term:
        if component.kind == "head":
            if kind == "activation":
                raise ClipTermError(f"{component} is a head: it has an effect, not an activation",
                                    hint="use --objective effect or direction")
            return Term(sign, "head_effect", direction(component), component.layer, component.index)
        if kind == "activation":
            return Term(sign, "neuron_activation", None, component.layer, component.index)
        from clipterm.vit.second_order import check_layer, path_vectors

        check_layer(self.layers, component.layer)
        unit = direction(component)  # (D,)
        vectors = path_vectors(self.model, component.layer, neurons=[component.index])[0].cpu()  # (K, D)
        return Term(sign, "neuron_effect", unit, component.layer, component.index, vectors @ unit)

    def unit_site(self, component: Any) -> tuple[Any, int, int]:
        """Where a neuron lives in the forward: (module, dimension, index) of its output (mean-ablation's hook)."""
        return self.blocks[component.layer].mlp.gelu, -1, component.index

    def recorder(self, terms: list[Term], blocks: set[int] = frozenset()) -> Recorder:
        ln_1, gelu = hooks_for(terms, self.layers)
        sites = [(self.blocks[layer].ln_1, "ln_1", layer, True) for layer in sorted(ln_1)]
        sites += [(self.blocks[layer].mlp.gelu, "gelu", layer, False) for layer in sorted(gelu)]
        sites += [(self.blocks[layer], "block", layer, False) for layer in sorted(blocks)]
        sites.append((self.visual.ln_post, "ln_post", 0, True))
        return Recorder(sites)

    def layer_acts(self, recorder: Recorder, layer: int) -> Tensor:
        return recorder.saved[("block", layer)]  # (B, T, W)

    def readout(self) -> Tensor:
        if self._readout is None:
            from clipterm.vit.decompose import readout

            self._readout = readout(self.model).to(self.device)
        return self._readout

    def score(self, term: Term, recorder: Recorder, embeds: Tensor) -> Tensor:
        residual = recorder.saved[("ln_post_in", 0)]  # (B, N, W) or (B, W)
        sigma_post = sigma(residual[:, 0] if residual.dim() == 3 else residual, self.visual.ln_post.eps)  # (B,)
        if term.kind == "head_effect":
            _, heads_out = cls_attention(self.blocks[term.layer].attn, recorder.saved[("ln_1", term.layer)])  # (B, H, dh)
            along = self.readout()[term.layer, term.index] @ term.direction.to(embeds.device)  # (dh,)
            return heads_out[:, term.index].float() @ along / sigma_post  # (B,)
        if term.kind == "neuron_activation":
            return recorder.saved[("gelu", term.layer)][:, 0, term.index].float()  # (B,)
        acts = recorder.saved[("gelu", term.layer)][:, :, term.index].float()  # (B, T)
        scalars = []  # the second-order scalars s_k of the neuron, dotted with its path gains
        for later in range(term.layer + 1, self.layers):
            block = self.blocks[later]
            row, _ = cls_attention(block.attn, recorder.saved[("ln_1", later)])  # (B, H, T)
            scale = sigma(recorder.saved[("ln_1_in", later)], block.ln_1.eps)  # (B, T)
            scalars.append(torch.einsum("bht,bt->bh", row.float() / scale[:, None], acts))  # (B, H)
        return torch.cat(scalars, 1) @ term.path_gains.to(embeds.device) / sigma_post  # (B,)


def hooks_for(terms: list[Term], n_layers: int) -> tuple[set[int], set[int]]:
    """The layers whose ln_1 and whose MLP activation a ViT objective's terms read."""
    ln_1, gelu = set(), set()
    for term in terms:
        if term.kind == "head_effect":
            ln_1.add(term.layer)
        elif term.kind == "neuron_activation":
            gelu.add(term.layer)
        elif term.kind == "neuron_effect":
            gelu.add(term.layer)
            ln_1.update(range(term.layer + 1, n_layers))
    return ln_1, gelu


def direction_score(term: Term, embeds: Tensor) -> Tensor:
    """cos(image embedding, the term's direction): (B,)."""
    return F.cosine_similarity(embeds.float(), term.direction.to(embeds.device)[None], dim=-1)
