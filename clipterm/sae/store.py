"""SAE files in a cache: trained or imported, written atomically under the cache's lock, read back checked.

Two files per layer: `sae.L4.safetensors` (the SAE, the open format of `clipterm.sae.model`) and
`sae.L4.images.safetensors` (`image_max` (N, F) f16: per image, each feature's maximum over the trained tokens,
for top images and `cache.sae_activations`). Both are listed in the manifest's `files` (so `cache verify`
checks them) and tied to the cache's build. Nothing is written until training ends: an interrupted run
leaves the cache as it was, and a rerun starts cleanly.
"""

from __future__ import annotations

import errno
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from clipterm import files, names
from clipterm.errors import ClipTermError, ExitCode
from clipterm.sae import model as sae_model
from clipterm.sae.train import Options, evaluate, site_for, train


def images_file(directory: str | Path, layer: int) -> Path:
    return Path(directory) / f"sae.{names.layer(layer)}.images.safetensors"


def _load(reader: Any, loaded: Any, device: str) -> Any:
    if loaded is not None:
        from clipterm.cache.reader import check_model

        check_model(reader, loaded.info)
        return loaded
    from clipterm.cache.reader import model_for_cache

    return model_for_cache(reader, device)


def _write(reader: Any, loaded: Any, site: Any, sae: sae_model.SAE, training: dict, device: str, what: str,
           again: str) -> dict:
    from clipterm.cache import store
    from clipterm.cache.neurons import _identity, _record

    try:
        figures, image_max = evaluate(reader, loaded, site, sae, sae.config.tokens, device)
        training = {**training, "final": figures}
        layer = sae.config.layer
        with store.CacheLock(reader.path):
            path = sae_model.sae_file(reader.path, layer)
            sha = sae_model.save(sae, path, training, _identity(reader))
            _record(reader, path.name, sha)
            side = images_file(reader.path, layer)
            side_sha = files.save_tensors(side, {"image_max": image_max.half()},
                                          metadata={"format": "clipterm.sae.images/1", **_identity(reader)})
            _record(reader, side.name, side_sha)
    except KeyboardInterrupt:
        raise ClipTermError(f"interrupted: {what} was not written; the cache is unchanged", hint=again,
                            code=ExitCode.INTERRUPTED) from None
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        raise ClipTermError(f"the disk is full: {what} was not written; the cache is unchanged", hint=again) from None
    return {"path": str(path), "bytes": path.stat().st_size, **training}


def train_into(reader: Any, options: Options, loaded: Any = None,
               progress: Callable[[int, Any], None] | None = None) -> dict:
    """Train an SAE on the cache's images at `options.layer` and write it into the cache; returns its figures."""
    loaded = _load(reader, loaded, options.device)
    loaded.model.to(options.device).eval()
    site = site_for(loaded, options.layer)
    what = f"the SAE for {names.layer(options.layer)} of cache {reader.name}"
    again = f"rerun `clipterm sae train {reader.name} --layer {names.layer(options.layer)}` (training starts over)"
    try:
        sae, training = train(reader, loaded, site, options, progress)
    except KeyboardInterrupt:
        raise ClipTermError(f"interrupted: {what} was not written; the cache is unchanged", hint=again,
                            code=ExitCode.INTERRUPTED) from None
    return _write(reader, loaded, site, sae, training, options.device, what, again)


def import_into(reader: Any, path: Path, layer: int, tokens: str | None = None, loaded: Any = None,
                device: str = "cpu") -> dict:
    """Import an SAE trained elsewhere for `layer`: its width must be the layer's; written as clipterm's format."""
    tensors, meta = sae_model.read_foreign(path)
    meta = {**meta, "layer": names.layer(layer)}
    if tokens is not None:
        meta["tokens"] = tokens
    loaded = _load(reader, loaded, device)
    site = site_for(loaded, layer)
    sae = sae_model.from_tensors(tensors, meta, path.name)
    width = _site_width(reader, loaded, site)
    if sae.config.width != width:
        raise ClipTermError(f"{path.name} reads {sae.config.width}-wide residuals, and {names.layer(layer)} of this "
                            f"model is {width} wide", hint="import an SAE trained on this layer of this model",
                            code=ExitCode.INVALID_DATA)
    sae.config.layer = layer
    if sae.config.tokens not in sae_model.TOKENS:
        sae.config.tokens = "all"
    what = f"the imported SAE for {names.layer(layer)} of cache {reader.name}"
    again = f"rerun `clipterm sae import {path} --layer {names.layer(layer)}`"
    return _write(reader, loaded, site, sae, {"imported_from": path.name}, device, what, again)


def _site_width(reader: Any, loaded: Any, site: Any) -> int:
    if site.width:
        return site.width
    from clipterm.sae.capture import image_batches, tokens_of

    _, pixels = next(image_batches(reader, loaded, [0], 1, "cpu"))
    return int(tokens_of(loaded.model, site, pixels).shape[-1])


class SaeFile:
    """One layer's SAE in a cache, checked against the manifest and the cache's build."""

    def __init__(self, reader: Any, layer: int):
        from clipterm.cache.neurons import _identity

        self.reader, self.layer = reader, layer
        self.path = sae_model.sae_file(reader.path, layer)
        hint = f"run `clipterm sae train {reader.name} --layer {names.layer(layer)}`"
        if not self.path.is_file():
            built = ", ".join(names.layer(l) for l in sae_model.built_layers(reader.path)) or "none"
            raise ClipTermError(f"cache {reader.name} has no SAE for {names.layer(layer)} (trained: {built})", hint=hint,
                                code=ExitCode.NOT_FOUND)
        reader.checked(self.path.name)
        reader.checked(images_file(reader.path, layer).name)
        self.sae, self.meta = sae_model.load(self.path)
        stale = [key for key, value in _identity(reader).items() if self.meta.get(key) != value]
        if stale:
            raise ClipTermError(f"{self.path.name} was trained on an earlier build of {reader.name} ({stale[0]} differs)",
                                hint=hint, code=ExitCode.INVALID_DATA)

    @property
    def features(self) -> int:
        return self.sae.config.features

    @property
    def tokens(self) -> str:
        return self.sae.config.tokens

    @cached_property
    def image_max(self) -> Tensor:
        """(N, F) fp32: per image, each feature's maximum over its tokens."""
        return files.load_tensors(images_file(self.reader.path, self.layer))["image_max"].float()

    def check_feature(self, index: int) -> None:
        if not 0 <= index < self.features:
            raise ClipTermError(f"no feature {index} in the SAE of {names.layer(self.layer)}",
                                hint=f"features run {names.feature(self.layer, 0)}..{names.feature(self.layer, self.features - 1)}")

    def patch_map(self, loaded: Any, pixels: Tensor, index: int) -> Tensor:
        """(B, T) one feature's activation per token of a batch of images."""
        from clipterm.sae.capture import tokens_of

        site = site_for(loaded, self.layer)
        with torch.no_grad():
            tok = tokens_of(loaded.model, site, pixels).float()
            return self.sae.encode(tok)[..., index]
