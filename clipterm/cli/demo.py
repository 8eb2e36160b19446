"""`clipterm demo`: the whole job on the built-in toy CLIP, offline.

Builds (once) a cache of synthetic images with the second-to-last layer's neurons, embeds the toy
text pool, scores the model zero-shot, then opens the TUI. Without a terminal it prints what the TUI
would show: each layer's ablation drop, each layer's most telling heads with their TextSpan texts,
and the strongest neurons with their words.
"""

from __future__ import annotations

import time
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from clipterm import names
from clipterm.cli.common import CacheDirOpt
from clipterm.cli.output import stdout

DEMO_CACHE = "toy-demo"


def prepare(n_images: int, console: Console, cache_dir: str | None = None) -> tuple[Any, Any]:
    """The toy model and the demo cache (built or resumed if missing, with neurons): (loaded, reader)."""
    from clipterm import locations
    from clipterm.cache import store
    from clipterm.cache.build import BuildOptions, build_cache
    from clipterm.cache.neurons import build_neurons, built_layers
    from clipterm.cache.reader import open_cache
    from clipterm.cli.output import progress
    from clipterm.inputs.images import toy_spec
    from clipterm.toyworld.evaluate import model_world
    from clipterm.vit.models import load_model

    with console.status("loading the toy CLIP"):
        loaded = load_model("toy")
    images = toy_spec(n_images, world=model_world("toy"))  # the world the toy was trained on
    # The demo's own cache is rebuilt when the shipped toy changed (another clipterm version) or its size did.
    old = store.read_manifest(locations.cache_root(cache_dir)[0] / DEMO_CACHE)
    stale = old is not None and ((old.get("model") or {}).get("weights_sha256") != loaded.info.weights_sha256
                                 or (old.get("dataset") or {}).get("source") != images)
    if stale:
        console.print(f"rebuilding cache {DEMO_CACHE}: it was built with another toy model or size")
    options = BuildOptions(images=images, name=DEMO_CACHE, cache_dir=cache_dir, workers=0, device="cpu",
                           force=stale)
    result = build_cache(options, progress=progress, loaded=loaded)
    if result.built:
        console.print(f"built cache {DEMO_CACHE}: {result.images:,} synthetic images in {result.seconds:.1f}s")
    reader = open_cache(result.path)
    layer = loaded.info.layers - 2  # the last layer with second-order effects
    if layer not in built_layers(reader.path):
        build_neurons(reader, layer, device="cpu", loaded=loaded, progress=progress)
        reader = open_cache(result.path)
    return loaded, reader


def run_demo(n: int, seed: int, n_images: int, console: Console, interactive: bool, cache_dir: str | None = None) -> dict:
    """Score the toy CLIP on n fresh scenes, then open the TUI on the demo cache (or print its summary)."""
    from clipterm.cli.common import accuracy_table
    from clipterm.toyworld.evaluate import evaluate_model, model_world

    start = time.perf_counter()
    loaded, reader = prepare(n_images, console, cache_dir)
    info = loaded.info
    console.print(
        f"[bold]clipterm demo[/] on the built-in toy CLIP: a {info.layers}-layer ViT, {info.heads} heads of width "
        f"{info.head_dim}, {info.image_size}px images in {info.patch_size}px patches, joint space {info.embed_dim}-d."
    )
    with console.status(f"scoring {n} fresh synthetic images"):
        acc = evaluate_model(loaded.model, loaded.tokenizer, n=n, seed=seed, world=model_world("toy"))
    console.print(accuracy_table(acc, title=f"zero-shot accuracy on {n} fresh images (seed {seed})"))
    if interactive:
        from clipterm.cli.common import open_tui

        open_tui(str(reader.path), cache_dir=cache_dir, loaded=loaded)
        return acc
    with console.status("describing layers, heads and neurons"):
        summary = summarise(reader, loaded, cache_dir)
    print_summary(summary, console)
    console.print(f"done in {time.perf_counter() - start:.1f}s. In a terminal this opens the TUI: "
                  f"[bold]clipterm tui {DEMO_CACHE}[/] (? for keys).")
    return acc


def summarise(reader: Any, loaded: Any, cache_dir: str | None = None, heads_per_layer: int = 2) -> dict:
    """What the TUI's tree and panes show for the demo cache, as plain data."""
    from clipterm.analyses.session import Analyses

    analyses = Analyses(reader, cache_dir=cache_dir, loaded=loaded)
    layers = analyses.model_ablation()  # task -> drops per layer

    def worst(results: dict, index: int) -> tuple[float, str]:
        """The largest drop of bar `index` over the tasks, and that task."""
        return max((result.bars[index].drop, task) for task, result in results.items())

    rows = []
    for layer in range(reader.shape.layers):
        per_head = analyses.layer_ablation(layer)
        drops = sorted(((*worst(per_head, h), names.head(layer, h)) for h in range(reader.shape.heads)), reverse=True)
        rows.append({"layer": names.layer(layer), "drop": worst(layers, layer),
                     "heads": [(head, drop, task, analyses.description(head).rows[0].text)
                               for drop, task, head in drops[:heads_per_layer]]})
    neurons = []
    for layer in analyses.neuron_layers():
        neurons += [(row.component, row.norm, row.hint) for row in analyses.neurons(layer, top=5)]
    return {"layers": rows, "neurons": neurons, "cache": reader.name, "images": reader.n}


def print_summary(summary: dict, console: Console) -> None:
    table = Table(title=f"{summary['cache']} ({summary['images']:,} images): accuracy lost when a layer or head is "
                        "mean-ablated (the task it hurts most), and what the head says (TextSpan)", title_justify="left")
    for column in ("layer", "drop", "head", "drop", "its top text"):
        table.add_column(column)
    for row in summary["layers"]:
        layer_drop, layer_task = row["drop"]
        for i, (head, drop, task, text) in enumerate(row["heads"]):
            first = i == 0
            table.add_row(row["layer"] if first else "", f"{100 * layer_drop:.1f}% {layer_task}" if first else "",
                          head, f"{100 * drop:.1f}% {task}", text)
    console.print(table)
    if summary["neurons"]:
        neurons = Table(title="strongest neurons by second-order effect, and their top word", title_justify="left")
        for column in ("neuron", "effect norm", "top text"):
            neurons.add_column(column)
        for name, norm, hint in summary["neurons"]:
            neurons.add_row(name, f"{norm:.3g}", hint)
        console.print(neurons)


def demo(
    n: int = typer.Option(400, "--n", min=10, help="Fresh synthetic images to score the model on."),
    seed: int = typer.Option(7, "--seed", help="Seed of the held-out sample."),
    scenes: int = typer.Option(2000, "--scenes", min=50, help="Synthetic images in the demo cache (built once)."),
    no_tui: bool = typer.Option(False, "--no-tui", help="Print the summary instead of opening the TUI."),
    cache_dir: str = CacheDirOpt,
) -> None:
    """Run the whole job offline on the built-in toy CLIP: build a cache with neurons, score the model, open the TUI.

    Without a terminal (or with --no-tui) it prints what the TUI would show and exits.
    """
    run_demo(n=n, seed=seed, n_images=scenes, console=stdout, interactive=stdout.is_terminal and not no_tui,
             cache_dir=cache_dir)


def register(app: typer.Typer) -> None:
    app.command()(demo)
