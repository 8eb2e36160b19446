"""Activation capture: the model over a cache's images, read at one residual site (`clipterm.vit.sites`).

The forward stops at the site (a hook raises once it has the output), so a capture costs at most one plain
forward. Images come in the order asked for (a seeded permutation while training), batch by batch.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from clipterm.errors import ClipTermError, ExitCode


class _Reached(Exception):
    """Raised by the capture hook: the rest of the forward is not needed."""


@contextmanager
def hooked(site: Any, keep: Callable[[Tensor], None], stop: bool = True) -> Iterator[None]:
    def hook(_module, _inputs, output):
        keep(site.tokens(output).detach())
        if stop:
            raise _Reached

    handle = site.module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def tokens_of(model: Any, site: Any, pixels: Tensor) -> Tensor:
    """(B, T, W) tokens at the site for a batch of preprocessed images."""
    got: list[Tensor] = []
    with torch.no_grad(), hooked(site, got.append):
        try:
            model.encode_image(pixels)
        except _Reached:
            pass
    return got[0]


def select(site: Any, tokens: Tensor, which: str) -> Tensor:
    """The rows an SAE trains on: (B·T, W) for `all`, (B, W) for `cls`."""
    return tokens.reshape(-1, tokens.shape[-1]) if which == "all" else site.summary(tokens)


def image_batches(reader: Any, loaded: Any, rows: list[int], batch_size: int, device: str,
                  workers: int | None = None) -> Iterator[tuple[list[int], Tensor]]:
    """(cache rows, pixels) for `rows` of the cache, in that order; an image that no longer decodes is refused."""
    from torch.utils.data import DataLoader

    from clipterm.cache.build import default_workers
    from clipterm.cache.neurons import cache_source
    from clipterm.inputs.images import ImageDataset, collate, fast_decode

    source = cache_source(reader)
    index = reader.index().tolist()  # cache row -> input index
    dataset = ImageDataset(source, loaded.preprocess, [index[r] for r in rows],
                           min_side=reader.manifest["model"]["image_size"], fast=fast_decode(reader.manifest))
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate,
                        num_workers=workers if workers is not None else default_workers(source))
    start = 0
    for kept, pixels, skipped in loader:
        if skipped:
            raise ClipTermError(f"image {skipped[0][0]} of cache {reader.name} no longer decodes: {skipped[0][1]}",
                                hint=f"run `clipterm cache verify {reader.name}`", code=ExitCode.INVALID_DATA)
        n = len(kept)
        yield rows[start:start + n], pixels.to(device)
        start += n
