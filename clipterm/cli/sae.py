"""`clipterm sae train|import|list|ablate`: sparse autoencoders on a layer's residual stream, and their features."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from clipterm import names
from clipterm.cli.common import CacheArg, CacheDirOpt, Device, DeviceOpt, JsonOpt, default_pool_for, embed_reporting, \
    load_pool_reporting
from clipterm.cli.common import open_reader as _open
from clipterm.cli.output import emit_json, progress, stdout
from clipterm.errors import ClipTermError

sae_app = typer.Typer(help="Sparse autoencoders on a layer's residual stream: train, import, list and ablate features.",
                      no_args_is_help=True)

LayerOpt = typer.Option(..., "--layer", help="The residual after this block (a stage's output for a ResNet or ConvNeXt), e.g. L4.")


class Tokens(str, Enum):
    all = "all"
    cls = "cls"


class Arch(str, Enum):
    topk = "topk"
    batchtopk = "batchtopk"
    relu = "relu"
    jumprelu = "jumprelu"


def _positive(value: int, option: str, example: str) -> int:
    if value < 1:
        raise ClipTermError(f"{option} {value}: must be at least 1", hint=f"e.g. {option} {example}")
    return value


def _model(reader, device: str):
    from clipterm.cache.reader import model_for_cache
    from clipterm.vit.models import pick_device

    return model_for_cache(reader, pick_device(device))


@sae_app.command()
def train(
    cache: str = CacheArg,
    layer: str = LayerOpt,
    tokens: Tokens = typer.Option(Tokens.all, "--tokens", help="all: every token or position; cls: the class token "
                                  "(the mean over positions for a tower without one)."),
    features: int = typer.Option(0, "--features", help="Features F (default: 8 × the residual's width)."),
    k: int = typer.Option(16, "--k", help="Active features per token (topk, batchtopk)."),
    arch: Arch = typer.Option(Arch.topk, "--arch", help="topk, batchtopk, relu (L1 penalty) or jumprelu (L0 penalty)."),
    steps: int = typer.Option(2000, "--steps", help="Optimiser steps."),
    batch_size: int = typer.Option(2048, "--batch-size", help="Activations per step."),
    lr: float = typer.Option(1e-3, "--lr", help="Adam's learning rate."),
    l1: float = typer.Option(1e-3, "--l1", help="The sparsity coefficient of relu (L1) and jumprelu (L0)."),
    seed: int = typer.Option(0, "--seed", help="Initialisation, image order and shuffles: the same seed gives the same SAE on the CPU."),
    device: Device = DeviceOpt,
    cache_dir: str = CacheDirOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Train an SAE on the cache's images at one layer and write sae.L{l}.safetensors into the cache.

    Activations are captured from the model as it trains (memory stays bounded). JSON schema: clipterm.sae.train/1.
    """
    from clipterm.sae import Options, train_into
    from clipterm.sae.train import layer_of
    from clipterm.vit.models import pick_device

    reader = _open(cache, cache_dir)
    options = Options(layer=layer_of(layer), tokens=tokens.value, features=features, k=k, arch=arch.value,
                      steps=_positive(steps, "--steps", "2000"), batch_size=_positive(batch_size, "--batch-size", "2048"),
                      lr=lr, l1=l1, seed=seed, device=pick_device(device.value))
    if features and arch.value in ("topk", "batchtopk") and not 0 < k < features:
        raise ClipTermError(f"--k {k} must be between 1 and --features − 1 ({features - 1})",
                            hint=f"k is how many of the {features} features fire per token; try 16")
    with progress(f"SAE {names.layer(options.layer)}", options.steps, "steps") as advance:
        done = [0]

        def report(step: int, figures) -> None:
            advance(step - done[0], figures.note())
            done[0] = step

        result = train_into(reader, options, progress=report)
    if json_out:
        emit_json({"cache": reader.name, "layer": names.layer(options.layer), **result}, schema="clipterm.sae.train/1")
        return
    final = result["final"]
    stdout.print(f"trained an SAE on {names.layer(options.layer)} of [bold]{reader.name}[/] ({options.tokens} tokens): "
                 f"explained variance {final['explained_variance']:.3f}, L0 {final['l0']:.1f}, {final['dead']} dead "
                 f"features, {result['activations_per_s']:,.0f} activations/s: {result['path']}")


@sae_app.command("import")
def import_(
    file: Path = typer.Argument(..., help="An SAE trained elsewhere: safetensors, or .pt (read with weights_only=True)."),
    cache: str = typer.Option(..., "--cache", help="The cache whose layer it reads."),
    layer: str = LayerOpt,
    tokens: Tokens = typer.Option(None, "--tokens", help="The tokens it was trained on (default: its metadata's, else all)."),
    device: Device = DeviceOpt,
    cache_dir: str = CacheDirOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Import an SAE (W_enc, b_enc, W_dec, b_dec as sae-lens names them), checked against the layer's width."""
    from clipterm.sae import import_into
    from clipterm.sae.train import layer_of
    from clipterm.vit.models import pick_device

    reader = _open(cache, cache_dir)
    result = import_into(reader, file, layer_of(layer), None if tokens is None else tokens.value,
                         device=pick_device(device.value))
    if json_out:
        emit_json({"cache": reader.name, "layer": layer, **result}, schema="clipterm.sae.import/1")
        return
    final = result["final"]
    stdout.print(f"imported {file.name} for {layer} of [bold]{reader.name}[/]: explained variance "
                 f"{final['explained_variance']:.3f}, L0 {final['l0']:.1f}: {result['path']}")


@sae_app.command("list")
def list_(
    cache: str = CacheArg,
    layer: str = LayerOpt,
    top: int = typer.Option(20, "--top", help="How many features to list, strongest first."),
    pool: str = typer.Option(None, "--pool", help="`toy`, `general`, or a UTF-8 file (default: toy for the toy model)."),
    texts: int = typer.Option(3, "--texts", help="Texts per feature, nearest its direct effect first."),
    cache_dir: str = CacheDirOpt,
    json_out: bool = JsonOpt,
) -> None:
    """A layer's SAE features: how often they fire, how strongly, and the texts nearest their direct effect.

    JSON schema: clipterm.sae.list/1.
    """
    from clipterm.sae import SaeFile
    from clipterm.sae.features import feature_table
    from clipterm.sae.train import layer_of

    reader = _open(cache, cache_dir)
    sae_file = SaeFile(reader, layer_of(layer))
    loaded = _model(reader, "cpu")
    text_pool = load_pool_reporting(default_pool_for(reader, pool))
    embeds = embed_reporting(loaded, text_pool, cache_dir)
    rows = feature_table(sae_file, loaded, embeds, list(text_pool.texts), _positive(texts, "--texts", "3"),
                         _positive(top, "--top", "20"))
    payload = {"cache": reader.name, "layer": names.layer(sae_file.layer), "features": sae_file.features,
               "tokens": sae_file.tokens, "images": reader.n, "components": [r.to_json() for r in rows]}
    if json_out:
        emit_json(payload, schema="clipterm.sae.list/1")
        return
    from rich.table import Table

    table = Table("feature", "frequency", "mean act.", "direct effect texts",
                  title=f"{payload['layer']} SAE features of {reader.name} ({sae_file.features} features, "
                        f"{sae_file.tokens} tokens, {reader.n:,} images)")
    for r in rows:
        table.add_row(r.component, f"{r.frequency:.3f}", f"{r.mean_activation:.3g}", " · ".join(r.texts))
    stdout.print(table)


@sae_app.command()
def ablate(
    cache: str = CacheArg,
    feature: str = typer.Argument(..., help="A feature, e.g. L4.F12."),
    device: Device = DeviceOpt,
    cache_dir: str = CacheDirOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Remove a feature's write from the residual and run the rest of the model: each task's accuracy drop."""
    from clipterm.analyses import ablation
    from clipterm.sae import SaeFile
    from clipterm.sae.features import accuracy_drops, embeds_with
    from clipterm.vit.textencode import encode_texts

    reader = _open(cache, cache_dir)
    component = reader.tower.parse(feature)
    if component.kind != "feature":
        raise ClipTermError(f"{feature} is not an SAE feature", hint="features look like L4.F12; `clipterm ablate` takes heads")
    sae_file = SaeFile(reader, component.layer)
    sae_file.check_feature(component.index)
    loaded = _model(reader, device.value)
    scorings = ablation.scorings(reader, lambda t: encode_texts(loaded.model, loaded.tokenizer, t))
    drops = accuracy_drops(reader, scorings, embeds_with(reader, loaded, sae_file, "ablate", [component.index]))
    if json_out:
        emit_json({"cache": reader.name, "feature": str(component), "tasks": drops}, schema="clipterm.sae.ablate/1")
        return
    from rich.table import Table

    table = Table("task", "before", "after", "drop", "95% interval", title=f"ablating {component} in {reader.name}")
    for task, row in drops.items():
        table.add_row(task, f"{row['before']:.3f}", f"{row['after']:.3f}", f"{row['drop']:+.3f}",
                      f"[{row['low']:+.3f}, {row['high']:+.3f}]")
    stdout.print(table)


def register(app: typer.Typer) -> None:
    app.add_typer(sae_app, name="sae")
