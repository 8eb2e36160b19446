"""`clipterm neurons build|list` and `clipterm images`: second-order neuron effects, their words, and top images."""

from __future__ import annotations

from enum import Enum

import typer

from clipterm import names
from clipterm.cli.common import (
    CacheArg,
    CacheDirOpt,
    Device,
    DeviceOpt,
    JsonOpt,
    default_pool_for,
    embed_reporting,
    layer_of,
    load_pool_reporting,
)
from clipterm.cli.common import open_reader as _open
from clipterm.cli.output import emit_json, progress, stdout
from clipterm.errors import ClipTermError

neurons_app = typer.Typer(help="MLP neurons through their second-order effects (Gandelsman et al., 2024).",
                          no_args_is_help=True)

LayerOpt = typer.Option(..., "--layer", help="The MLP layer, e.g. L9 (not the last layer: it has no second-order effect).")
PoolOpt = typer.Option(None, "--pool", help="`toy`, `general`, or a UTF-8 file (default: toy for the toy model, else general).")


class Sort(str, Enum):
    norm = "norm"
    sparsity = "sparsity"


def _positive(value: int, option: str, example: str) -> int:
    if value < 1:
        raise ClipTermError(f"{option} {value}: must be at least 1", hint=f"e.g. {option} {example}")
    return value


def _pool_embeddings(reader, pool: str | None, cache_dir: str | None):
    """(embeddings (P, D), pool) of a text pool under the cache's model (cached on disk)."""
    from clipterm.cache.reader import model_for_cache

    text_pool = load_pool_reporting(default_pool_for(reader, pool))
    return embed_reporting(model_for_cache(reader), text_pool, cache_dir), text_pool


@neurons_app.command()
def build(
    cache: str = CacheArg,
    layer: str = LayerOpt,
    device: Device = DeviceOpt,
    top_k: int = typer.Option(100, "--top-images", "--top-k", help="Images per neuron whose effect is farthest from its mean: behind its "
                              "principal direction, and its significant set for `ablate --second-order`."),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per forward pass."),
    workers: int = typer.Option(None, "--workers", min=0, help="DataLoader worker processes (default: picked for this machine)."),
    convention: str = typer.Option("clipterm", "--convention", help="clipterm (each write centred by its own mean), or "
                                   "reference: second_order_lens' numbers (equal shares of means and biases, x100/|embedding|); "
                                   "see docs/conventions.md."),
    cache_dir: str = CacheDirOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Run the cache's images through its model once and store every neuron's second-order effects.

    Writes neurons.L{l}.safetensors into the cache: per neuron its mean effect and principal direction,
    and per image its effect norm and CLS activation. JSON schema: clipterm.neurons.build/2.
    """
    from clipterm.cache.neurons import build_neurons

    reader = _open(cache, cache_dir)
    result = build_neurons(reader, layer_of(layer, reader), device=device.value, top_k=_positive(top_k, "--top-images", "100"),
                           batch_size=_positive(batch_size, "--batch-size", "64"), workers=workers, progress=progress,
                           convention=convention)
    if json_out:
        emit_json(result.to_json(), schema="clipterm.neurons.build/2")
        return
    notes = [f"{result.missing} images could not be read again and were left out"] if result.missing else []
    if result.changed:
        notes.append(f"{result.changed} images now give another embedding than the cache's (changed on disk?)")
    convention = " in the reference's convention (x100/|embedding|)" if result.convention == "reference" else ""
    what = "channel effects (through the pool)" if reader.shape.tower == "resnet" else "second-order effects"
    stdout.print(f"built {what} of {result.layer}{convention} for {result.images:,} images of [bold]{result.cache}[/] "
                 f"({result.images_per_s:,.1f} images/s): {result.path}")
    for note in notes:
        stdout.print(f"[yellow]note:[/] {note}")


@neurons_app.command("list")
def list_(
    cache: str = CacheArg,
    layer: str = LayerOpt,
    top: int = typer.Option(20, "--top", help="How many neurons to list."),
    sort: Sort = typer.Option(Sort.norm, "--sort", help="norm: mean second-order effect norm; sparsity: share of the "
                              "effect carried by the neuron's top 1% of images."),
    decompose: bool = typer.Option(False, "--decompose", help="Describe each neuron's principal direction by a sparse "
                                   "combination of pool texts (orthogonal matching pursuit)."),
    pool: str = PoolOpt,
    k: int = typer.Option(32, "--k", help="Texts per sparse decomposition."),
    texts: int = typer.Option(3, "--texts", help="Texts shown per neuron in the table, in the order OMP chose them "
                              "(--json gives all k)."),
    cache_dir: str = CacheDirOpt,
    json_out: bool = JsonOpt,
) -> None:
    """List a layer's neurons by the size or sparsity of their second-order effects, optionally with texts.

    JSON schema: clipterm.neurons.list/2.
    """
    from clipterm.cache.neurons import NeuronFile, decompose_neurons

    reader = _open(cache, cache_dir)
    neuron_file = NeuronFile(reader, layer_of(layer, reader))
    ids = neuron_file.ranking(sort.value)[: _positive(top, "--top", "20")].tolist()
    norm_mean, top1, pc1_share = (neuron_file.tensor(key) for key in ("norm_mean", "top1_share", "pc1_share"))
    mean_norm = neuron_file.tensor("mean").norm(dim=-1)  # (M,)
    rows = [{"component": names.neuron(neuron_file.layer, n), "norm_mean": float(norm_mean[n]), "top1_share": float(top1[n]),
             "pc1_share": float(pc1_share[n]), "mean_effect_norm": float(mean_norm[n])} for n in ids]
    payload = {"cache": reader.name, "layer": names.layer(neuron_file.layer), "sort": sort.value, "top_images": neuron_file.top_k,
               "images": reader.n, "neurons": rows}
    if decompose:
        embeds, text_pool = _pool_embeddings(reader, pool, cache_dir)
        code = decompose_neurons(neuron_file, ids, embeds, _positive(k, "--k", "32"))
        payload["pool"] = text_pool.summary()
        for i, row in enumerate(rows):
            leading = code.leading(i)
            texts_chosen = [{"row": j, "text": text_pool.texts[j], "coefficient": c} for j, c in code.texts(i)]
            row["decomposition"] = {"cosine": float(code.cosine[i]), "texts": texts_chosen,
                                    "top_text": None if leading is None else text_pool.texts[leading]}
    if json_out:
        emit_json(payload, schema="clipterm.neurons.list/2")
        return
    _print_list(payload, _positive(texts, "--texts", "3"))


def _print_list(payload: dict, n_texts: int) -> None:
    from rich.table import Table

    title = f"{payload['layer']} neurons of {payload['cache']} by {payload['sort']} ({payload['images']:,} images)"
    columns = ["neuron", "mean |effect|", "top-1% share", "pc1 share"]
    if "pool" in payload:
        columns += ["texts (coefficient)", "cos"]
    table = Table(*columns, title=title)
    for row in payload["neurons"]:
        cells = [row["component"], f"{row['norm_mean']:.4f}", f"{100 * row['top1_share']:.1f}%", f"{100 * row['pc1_share']:.0f}%"]
        if "decomposition" in row:
            words = [f"{t['text']} ({t['coefficient']:+.2f})" for t in row["decomposition"]["texts"][:n_texts]]
            cells += [" · ".join(words), f"{row['decomposition']['cosine']:.2f}"]
        table.add_row(*cells)
    stdout.print(table)


def images(
    cache: str = CacheArg,
    component: str = typer.Option(..., "--component", "-c", help="A neuron (L9.N123), a head (L5.H2, L5.H2:pc2) or an MLP (L5.MLP)."),
    top: int = typer.Option(16, "--top", help="How many images."),
    by: str = typer.Option(None, "--by", help="Neurons: norm (default) or activation. Heads and MLPs: textspan (default), "
                           "pc or norm."),
    pool: str = PoolOpt,
    show: bool = typer.Option(False, "--show", help="Draw the images in the terminal (half-block thumbnails)."),
    size: int = typer.Option(24, "--size", help="Thumbnail size in pixels (two pixels per character row)."),
    cache_dir: str = CacheDirOpt,
    json_out: bool = JsonOpt,
) -> None:
    """The cache's images that excite a component most: dataset examples. JSON schema: clipterm.images/2."""
    from clipterm.analyses.examples import top_images

    reader = _open(cache, cache_dir)

    def text_embeds():
        embeds, text_pool = _pool_embeddings(reader, pool, cache_dir)
        return embeds, list(text_pool.texts)

    ranking = top_images(reader, component, _positive(top, "--top", "16"), by, text_embeds)
    if json_out:
        emit_json({"cache": reader.name, "component": ranking.component, "by": ranking.by, "score": ranking.about,
                   "images": reader.n, "examples": [e.to_json() for e in ranking.examples]}, schema="clipterm.images/2")
        return
    stdout.print(f"[bold]{ranking.component}[/]: top {len(ranking.examples)} images of {reader.name} by {ranking.about}")
    if show:
        from clipterm.thumbnails import ThumbnailGrid, Tile, load_thumbnail

        side = _positive(size, "--size", "24") + size % 2
        tiles = [Tile(None if e.missing else load_thumbnail(e.path, e.id, side), f"#{e.rank} {e.score:.3g}")
                 for e in ranking.examples]
        stdout.print(ThumbnailGrid(tiles, side))
        return
    from rich.table import Table

    table = Table("#", "score", "image", "labels")
    for e in ranking.examples:
        name = e.path or e.id or ""
        table.add_row(str(e.rank), f"{e.score:.4g}", f"{name} [red](missing)[/]" if e.missing else name, " ".join(e.labels.values()))
    stdout.print(table)


def register(app: typer.Typer) -> None:
    app.add_typer(neurons_app, name="neurons")
    app.command("images")(images)
