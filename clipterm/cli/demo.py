"""`clipterm demo`: the whole job on the built-in toy CLIP, offline.

Scores the toy CLIP zero-shot, builds (once) a cache of synthetic images with the neurons of the layer the
summary shows, then opens the TUI. Without a terminal it prints what the TUI would show: each layer's
ablation drop, each layer's most telling heads with their TextSpan texts, and the strongest neurons with
their words, each table as soon as it is ready.

What it prints is stored in the cache root (`.toy-demo-summary.json`), keyed by everything it depends on:
the toy's weights, the clipterm version, the demo's options and the demo cache's own build. A later run whose
key matches prints it from there without importing torch; any other stored summary (stale, or unreadable) is
recomputed. `--fresh` recomputes regardless.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from clipterm import names
from clipterm.cli.common import CacheDirOpt, accuracy_table, request_fast_exit
from clipterm.cli.output import stdout

DEMO_CACHE = "toy-demo"
DEMO_MODEL = "toy"
STORED = ".toy-demo-summary.json"  # in the cache root, beside the demo cache
STORED_FORMAT = "clipterm.demo-summary/1"
HEADS_PER_LAYER = 2
TOP_NEURONS = 5


def neuron_layer(layers: int) -> int:
    """The layer whose neurons the demo builds and shows: the last one with second-order effects."""
    return layers - 2


# --------------------------------------------------------------------------- the stored summary (no torch)


def stored_path(cache_dir: str | None = None) -> Path:
    from clipterm import locations

    return locations.cache_root(cache_dir)[0] / STORED


def demo_key(n: int, seed: int, n_images: int, cache_dir: str | None = None) -> dict | None:
    """What the printed summary depends on, read without torch; None when the demo cache is not complete."""
    from clipterm import __version__, locations
    from clipterm.cache import store
    from clipterm.cache.neurons import neurons_file
    from clipterm.errors import ClipTermError
    from clipterm.files import file_sha256

    directory = locations.cache_root(cache_dir)[0] / DEMO_CACHE
    try:
        manifest = store.read_manifest(directory)
    except ClipTermError:
        return None  # a damaged cache: the computing path says so, and rebuilds it
    if not manifest or not manifest.get("complete"):
        return None
    layer = neuron_layer(int(manifest["model"]["layers"]))
    neurons = neurons_file(directory, layer)
    if not neurons.is_file() or neurons.name not in manifest.get("files", {}):
        return None
    weights = locations.TOY_MODEL_DIRS[DEMO_MODEL] / "open_clip_model.safetensors"
    return {"clipterm": __version__, "weights_sha256": file_sha256(weights), "n": n, "seed": seed, "scenes": n_images,
            "heads_per_layer": HEADS_PER_LAYER, "top_neurons": TOP_NEURONS,
            "cache": {"created": manifest["created"], "source": manifest["dataset"].get("source"),
                      "weights_sha256": manifest["model"].get("weights_sha256"),
                      neurons.name: manifest["files"][neurons.name]}}


def load_stored(key: dict | None, cache_dir: str | None = None) -> dict | None:
    """The stored summary when it was made under `key`; None when missing, stale or unreadable."""
    if key is None:
        return None
    try:
        stored = json.loads(stored_path(cache_dir).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(stored, dict) or stored.get("format") != STORED_FORMAT or stored.get("key") != key:
        return None
    try:
        renderables(stored)  # a damaged summary fails here, before anything is printed
    except (KeyError, TypeError, ValueError, IndexError, AttributeError):
        return None
    return stored


def save_stored(key: dict | None, result: dict, cache_dir: str | None = None) -> None:
    """Store what was printed (best effort: a read-only root only costs the next run its speed)."""
    from clipterm.files import write_json

    if key is None:
        return
    try:
        write_json(stored_path(cache_dir), {"format": STORED_FORMAT, "key": key,
                                            "when": time.strftime("%Y-%m-%dT%H:%M:%S"), **result}, durable=False)
    except OSError:
        pass


# --------------------------------------------------------------------------- computing it (torch)


def prepare(n_images: int, console: Console, cache_dir: str | None = None, loaded: Any = None) -> tuple[Any, Any]:
    """The toy model and the demo cache (built or resumed if missing, with neurons): (loaded, reader)."""
    from clipterm import locations
    from clipterm.cache import store
    from clipterm.cache.build import BuildOptions, build_cache
    from clipterm.cache.neurons import build_neurons, built_layers
    from clipterm.cache.reader import open_cache
    from clipterm.cli.output import progress
    from clipterm.inputs.images import toy_spec
    from clipterm.toyworld.evaluate import model_world

    if loaded is None:
        loaded = load_toy(console)
    images = toy_spec(n_images, world=model_world(DEMO_MODEL))  # the world the toy was trained on
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
    layer = neuron_layer(loaded.info.layers)
    if layer not in built_layers(reader.path):
        build_neurons(reader, layer, device="cpu", loaded=loaded, progress=progress)
        reader = open_cache(result.path)
    return loaded, reader


def load_toy(console: Console) -> Any:
    from clipterm.vit.models import load_model

    with console.status("loading the toy CLIP"):
        return load_model(DEMO_MODEL)


def model_line(info: dict) -> str:
    return (f"[bold]clipterm demo[/] on the built-in toy CLIP: a {info['layers']}-layer ViT, {info['heads']} heads of "
            f"width {info['head_dim']}, {info['image_size']}px images in {info['patch_size']}px patches, joint space "
            f"{info['embed_dim']}-d.")


def accuracy_title(n: int, seed: int) -> str:
    return f"zero-shot accuracy on {n} fresh images (seed {seed})"


def run_demo(n: int, seed: int, n_images: int, console: Console, interactive: bool, cache_dir: str | None = None,
             fresh: bool = False) -> dict:
    """Score the toy CLIP on n fresh scenes, then open the TUI on the demo cache (or print its summary)."""
    start = time.perf_counter()
    key = demo_key(n, seed, n_images, cache_dir)
    stored = None if fresh else load_stored(key, cache_dir)
    if stored is not None:
        for renderable in renderables(stored, interactive):
            console.print(renderable)
        if interactive:
            from clipterm.cli.common import open_tui

            open_tui(str(Path(stored_path(cache_dir)).parent / DEMO_CACHE), cache_dir=cache_dir)
            return stored["accuracy"]
        console.print(f"done in {time.perf_counter() - start:.1f}s, from the results stored on {stored['when']} "
                      f"(`--fresh` recomputes them). In a terminal this opens the TUI: [bold]clipterm tui {DEMO_CACHE}[/] "
                      "(? for keys).")
        return stored["accuracy"]
    return compute_demo(n, seed, n_images, console, interactive, cache_dir, start)


def compute_demo(n: int, seed: int, n_images: int, console: Console, interactive: bool, cache_dir: str | None,
                 start: float) -> dict:
    """The demo from scratch, each table printed as soon as it is ready; stores what it printed."""
    from clipterm.toyworld.evaluate import evaluate_model, model_world

    loaded = load_toy(console)
    info = {key: getattr(loaded.info, key) for key in ("layers", "heads", "head_dim", "image_size", "patch_size", "embed_dim")}
    console.print(model_line(info))
    with console.status(f"scoring {n} fresh synthetic images"):
        acc = evaluate_model(loaded.model, loaded.tokenizer, n=n, seed=seed, batch_size=64,  # 64: a lower peak
                             world=model_world(DEMO_MODEL))
    console.print(accuracy_table(acc, title=accuracy_title(n, seed)))
    loaded, reader = prepare(n_images, console, cache_dir, loaded=loaded)
    if interactive:
        from clipterm.cli.common import open_tui

        open_tui(str(reader.path), cache_dir=cache_dir, loaded=loaded)
        return acc
    analyses = _analyses(reader, loaded, cache_dir)
    summary: dict[str, Any] = {"cache": reader.name, "images": reader.n}
    with console.status("describing layers and heads"):
        summary["layers"] = summarise_layers(reader, loaded, cache_dir, analyses=analyses)
    console.print(layer_table(summary))
    with console.status("describing neurons"):
        summary["neurons"] = summarise_neurons(analyses)
    if summary["neurons"]:
        console.print(neuron_table(summary))
    save_stored(demo_key(n, seed, n_images, cache_dir),
                {"model": info, "n": n, "seed": seed, "accuracy": acc, "summary": summary}, cache_dir)
    console.print(f"done in {time.perf_counter() - start:.1f}s. In a terminal this opens the TUI: "
                  f"[bold]clipterm tui {DEMO_CACHE}[/] (? for keys).")
    return acc


def _analyses(reader: Any, loaded: Any, cache_dir: str | None) -> Any:
    from clipterm.analyses.session import Analyses

    return Analyses(reader, cache_dir=cache_dir, loaded=loaded)


def summarise_layers(reader: Any, loaded: Any, cache_dir: str | None = None, heads_per_layer: int = HEADS_PER_LAYER,
                     analyses: Any = None) -> list[dict]:
    """Per layer: its ablation drop (the task it hurts most) and its most telling heads with their TextSpan text."""
    analyses = analyses or _analyses(reader, loaded, cache_dir)
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
    return rows


def summarise_neurons(analyses: Any, top: int = TOP_NEURONS) -> list[tuple[str, float, str]]:
    """The strongest neurons of each built layer, by second-order effect norm, with their top word."""
    neurons = []
    for layer in analyses.neuron_layers():
        neurons += [(row.component, row.norm, row.hint) for row in analyses.neurons(layer, top=top)]
    return neurons


def summarise(reader: Any, loaded: Any, cache_dir: str | None = None, heads_per_layer: int = HEADS_PER_LAYER) -> dict:
    """What the TUI's tree and panes show for the demo cache, as plain data."""
    analyses = _analyses(reader, loaded, cache_dir)
    return {"layers": summarise_layers(reader, loaded, cache_dir, heads_per_layer, analyses),
            "neurons": summarise_neurons(analyses), "cache": reader.name, "images": reader.n}


def layer_table(summary: dict) -> Table:
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
    return table


def neuron_table(summary: dict) -> Table:
    neurons = Table(title="strongest neurons by second-order effect, and their top word", title_justify="left")
    for column in ("neuron", "effect norm", "top text"):
        neurons.add_column(column)
    for name, norm, hint in summary["neurons"]:
        neurons.add_row(name, f"{norm:.3g}", hint)
    return neurons


def print_summary(summary: dict, console: Console) -> None:
    console.print(layer_table(summary))
    if summary["neurons"]:
        console.print(neuron_table(summary))


def renderables(stored: dict, interactive: bool = False) -> list[Any]:
    """What a stored summary prints: the model line, the accuracy table, then (without the TUI) the summary's tables."""
    out: list[Any] = [model_line(stored["model"]),
                      accuracy_table({str(task): float(value) for task, value in stored["accuracy"].items()},
                                     title=accuracy_title(int(stored["n"]), int(stored["seed"])))]
    if not interactive:
        summary = stored["summary"]
        out.append(layer_table(summary))
        if summary["neurons"]:
            out.append(neuron_table(summary))
    return out


def demo(
    n: int = typer.Option(400, "--n", min=10, help="Fresh synthetic images to score the model on."),
    seed: int = typer.Option(7, "--seed", help="Seed of the held-out sample."),
    scenes: int = typer.Option(1000, "--scenes", min=50, help="Synthetic images in the demo cache (built once)."),
    no_tui: bool = typer.Option(False, "--no-tui", help="Print the summary instead of opening the TUI."),
    fresh: bool = typer.Option(False, "--fresh", help="Recompute the summary instead of printing the stored one."),
    cache_dir: str = CacheDirOpt,
) -> None:
    """Run the whole job offline on the built-in toy CLIP: score the model, build a cache with neurons, open the TUI.

    Without a terminal (or with --no-tui) it prints what the TUI would show and exits. What it printed is stored
    in the cache root, so a second run shows it at once (without importing torch) until the toy model, clipterm,
    the options or the demo cache change.
    """
    interactive = stdout.is_terminal and not no_tui
    run_demo(n=n, seed=seed, n_images=scenes, console=stdout, interactive=interactive, cache_dir=cache_dir, fresh=fresh)
    if not interactive:
        request_fast_exit()


def register(app: typer.Typer) -> None:
    app.command()(demo)
