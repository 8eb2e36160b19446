"""`clipterm cache build|ls|info|verify|rm`: build activation caches and look after them."""

from __future__ import annotations

import sys
from enum import Enum

import typer

from clipterm.cli.common import CacheArg, CacheDirOpt, Device, DeviceOpt, JsonOpt, PretrainedOpt, QuickGeluOpt
from clipterm.cli.output import emit_json, progress, stderr, stdout
from clipterm.errors import ClipTermError, ExitCode

cache_app = typer.Typer(help="Build activation caches (the exact decomposition of many images) and manage them.",
                        no_args_is_help=True)



class Dtype(str, Enum):
    float16 = "float16"
    float32 = "float32"


@cache_app.command()
def build(
    images: str = typer.Option(..., "--images", help="A folder (class = sub-folder), a list file (path[TAB class] per line), "
                               "toy:N[@SEED], webdataset shards ('data/{000000..000099}.tar' or a folder of .tar), "
                               "or hf:PATH[:split] (a local Hugging Face dataset)."),
    model: str = typer.Option("toy", "--model", help="toy, an open_clip architecture, or local-dir:PATH."),
    pretrained: str = PretrainedOpt,
    quick_gelu: bool = QuickGeluOpt,
    name: str = typer.Option(None, "--name", help="Cache name under the cache root (default: model and images)."),
    cache_dir: str = CacheDirOpt,
    device: Device = DeviceOpt,
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Images per forward pass."),
    workers: int = typer.Option(None, "--workers", min=0, help="DataLoader worker processes (default: picked for this machine)."),
    dtype: Dtype = typer.Option(Dtype.float16, "--dtype", help="Storage dtype of the components; image_embeds stay float32."),
    neurons: bool = typer.Option(False, "--neurons", help="Also store every MLP neuron's CLS activation."),
    tokens: str = typer.Option(None, "--tokens", help="Also store per-token head outputs for these layers, e.g. L8-11."),
    resume: bool = typer.Option(True, "--resume/--force", help="Resume an interrupted build (default), or start over."),
    shard_rows: int = typer.Option(1024, "--shard-rows", min=1, help="Inputs per shard file."),
    fast_decode: bool = typer.Option(False, "--fast-decode", help="Decode large JPEGs at reduced scale and shrink huge "
                                     "images first: faster, but embeddings differ from open_clip's by a few %."),
    label_key: str = typer.Option(None, "--label-key", help="Tar shards: the member (.cls, the default) or .json field holding the label."),
    image_column: str = typer.Option(None, "--image-column", help="hf: the image column (default: the dataset's image feature)."),
    label_column: str = typer.Option(None, "--label-column", help="hf: the label column (default: no labels)."),
    json_out: bool = JsonOpt,
) -> None:
    """Run images through the model and store each component's exact direct effect. Works under torchrun."""
    from clipterm.cache.build import BuildOptions, build_cache

    options = BuildOptions(images=images, model=model, pretrained=pretrained, quick_gelu=quick_gelu, name=name, cache_dir=cache_dir,
                           device=device.value, batch_size=batch_size, workers=workers, dtype=dtype.value, neurons=neurons,
                           tokens=tokens, force=not resume, shard_rows=shard_rows, fast_decode=fast_decode,
                           label_key=label_key, image_column=image_column, label_column=label_column)
    result = build_cache(options, progress=progress)
    if _rank() != 0:
        return
    if json_out:
        emit_json(result.to_json(), schema="clipterm.cache.build/2")
        return
    if result.already_complete:
        stdout.print(f"cache [bold]{result.name}[/] is already complete ({result.images:,} images): {result.path}")
        stderr.print("[dim]hint:[/] pass --force to build it again", highlight=False)
        return
    skipped = f", {result.skipped} skipped (see `clipterm cache info {result.name}`)" if result.skipped else ""
    stdout.print(f"built cache [bold]{result.name}[/]: {result.images:,} images{skipped}, {result.shards} shards, "
                 f"{result.images_per_s:,.1f} images/s: {result.path}")


@cache_app.command("ls")
def list_(cache_dir: str = CacheDirOpt, json_out: bool = JsonOpt) -> None:
    """List the caches under the cache root."""
    from clipterm import locations
    from clipterm.cache.inventory import list_caches

    root, why = locations.cache_root(cache_dir)
    caches = list_caches(root)
    if json_out:
        emit_json({"root": str(root), "reason": why, "caches": caches}, schema="clipterm.cache.ls/2")
        return
    from rich.table import Table

    table = Table("name", "model", "images", "dtype", "size", "state", title=f"{len(caches)} caches in {root} ({why})")
    for c in caches:
        if "error" in c:
            table.add_row(c["name"], "", "", "", "", f"[red]{c['error']}[/]")
            continue
        model = f"{c['model']['arch']} {c['model']['pretrained'] or ''}".strip()
        state = "[green]complete[/]" if c["complete"] else "[yellow]incomplete[/]"
        table.add_row(c["name"], model, f"{c['images']:,}", c["dtype"], _size(c["bytes"]), state)
    stdout.print(table)


@cache_app.command()
def info(cache: str = CacheArg, cache_dir: str = CacheDirOpt, json_out: bool = JsonOpt) -> None:
    """Show a cache's model, inputs, shards, size on disk, what was stored, and skipped inputs."""
    from clipterm.cache.reader import CacheReader, resolve

    reader = CacheReader(resolve(cache, cache_dir), allow_incomplete=True)
    dataset = {k: v for k, v in reader.manifest["dataset"].items() if k not in ("n", "rows")}
    summary = {**reader.info, "decode": reader.manifest.get("decode", "fast"),
               "skipped_inputs": reader.manifest.get("skipped", []),
               "dataset": {**dataset, "inputs": reader.manifest["dataset"]["n"], "images": reader.n},
               "shape": reader.manifest["shape"]}
    if json_out:
        emit_json(summary, schema="clipterm.cache.info/2")
        return
    from rich.table import Table

    from clipterm.names import format_layers

    table = Table(show_header=False, box=None, pad_edge=False)
    s, m = summary["shape"], summary["model"]
    stored = ["components"] + (["neurons"] if summary["stored"]["neurons"] else [])
    if summary["stored"]["tokens"]:
        stored.append(f"tokens {format_layers(summary['stored']['tokens'])}")
    rows = {
        "path": summary["path"],
        "state": "complete" if summary["complete"] else "incomplete: rerun the build command to resume",
        "model": " ".join(filter(None, [m["arch"], m["pretrained"], f"(sha256 {str(m['weights_sha256'])[:12]})"])),
        "shape": _shape_line(s),
        "images": f"{summary['source']}: {summary['inputs']:,} inputs, {summary['images']:,} images stored, {summary['skipped']} skipped",
        "labels": ", ".join(f"{t} ({k} classes)" for t, k in summary["tasks"].items()) or "none",
        "stored": f"{', '.join(stored)} in {summary['dtype']}",
        "decode": "fast (reduced-scale JPEG, box-reduced huge files)" if summary["decode"] == "fast" else "full, as open_clip",
        "size": f"{_size(summary['bytes'])} in {summary['shards']} shards ({_size(summary['bytes_per_row'])} per image)",
        "created": summary["created"],
    }
    for key, value in rows.items():
        table.add_row(f"[bold]{key}[/]", value)
    stdout.print(table)
    for item in summary["skipped_inputs"][:20]:
        stdout.print(f"  skipped #{item['index']}: {item['reason']}", highlight=False)
    if len(summary["skipped_inputs"]) > 20:
        stdout.print(f"  ... and {len(summary['skipped_inputs']) - 20} more (--json lists all)")


def _shape_line(s: dict) -> str:
    """The shape of a cache in words, for its tower."""
    if s.get("tower") == "resnet":
        return (f"ResNet: attention pool of {s['heads']} heads (head dim {s['head_dim']}) over {s['mlp_width']} channels, "
                f"embed dim {s['embed_dim']}")
    if s.get("tower") == "convnext":
        return f"ConvNeXt: {s['layers']} blocks of stage {s.get('stage')} (S{s.get('stage')}.B*), no heads, embed dim {s['embed_dim']}"
    line = f"{s['layers']} layers x {s['heads']} heads"
    if s.get("head_space") == "joint":
        pool = f"attention pool of {s['pool_heads']} heads (head dim {s['pool_head_dim']})" + (" and an MLP" if s.get("pool_mlp") else "")
        return f"{line} stored in joint space, then an {pool}; embed dim {s['embed_dim']}"
    pooled = ", average-pooled" if s.get("pool") == "avg" else ""
    return f"{line} (head dim {s['head_dim']}){pooled}, embed dim {s['embed_dim']}"


@cache_app.command()
def verify(cache: str = CacheArg, cache_dir: str = CacheDirOpt, json_out: bool = JsonOpt) -> None:
    """Re-hash every file and check shard shapes against the manifest; exit non-zero naming any damaged file."""
    from clipterm.cache.reader import resolve
    from clipterm.cache.inventory import verify as check

    path = resolve(cache, cache_dir)
    problems = check(path)
    if json_out:
        emit_json({"cache": path.name, "path": str(path), "ok": not problems, "problems": problems},
                  schema="clipterm.cache.verify/2")
    elif not problems:
        stdout.print(f"cache [bold]{path.name}[/] is intact: every file matches its sha256 and the manifest")
    if problems:
        files = sorted({p["file"] for p in problems})
        if not json_out:
            for p in problems:
                stdout.print(f"[red]{p['file']}[/]: {p['problem']}", highlight=False)
        raise ClipTermError(f"cache {path.name} is {_state(problems)}: {', '.join(files)}",
                            hint=_verify_hint(problems), code=ExitCode.INVALID_DATA)


@cache_app.command()
def rm(
    cache: str = CacheArg,
    cache_dir: str = CacheDirOpt,
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only say what would be removed."),
    json_out: bool = JsonOpt,
) -> None:
    """Delete a cache: its own files, then its folder if nothing else is in it (asks first, unless --yes).

    Only a folder with a clipterm cache manifest, inside the cache root or given by absolute path, is removed."""
    from clipterm import locations
    from clipterm.cache.store import plan_removal, remove

    plan = plan_removal(cache, locations.cache_root(cache_dir)[0])
    kept = f"; {len(plan.strays)} other entries ({', '.join(plan.strays[:3])}) are not the cache's and stay" if plan.strays else ""
    if not dry_run and not yes:
        if not sys.stdin.isatty():
            raise ClipTermError(f"refusing to remove cache {plan.name} at {plan.path} without confirmation",
                                hint="pass --yes to remove it")
        typer.confirm(f"remove cache {plan.name} ({_size(plan.bytes)}, {len(plan.files)} files) at {plan.path}{kept}?",
                      abort=True)
    folder_gone = remove(plan) if not dry_run else False
    if json_out:
        emit_json({"cache": plan.name, "path": str(plan.path), "bytes": plan.bytes, "removed": not dry_run,
                   "folder_removed": folder_gone, "kept": list(plan.strays)}, schema="clipterm.cache.rm/2")
    else:
        verb = "would remove" if dry_run else "removed"
        stdout.print(f"{verb} cache {plan.name} ({_size(plan.bytes)}) at {plan.path}{kept}", highlight=False)


def _unfinished_only(problems: list[dict]) -> bool:
    """Whether the only problem is a build that has not finished (stopped, or still running): nothing is damaged."""
    return all(p["file"] == "manifest.json" and ("incomplete" in p["problem"] or "running" in p["problem"]) for p in problems)


def _state(problems: list[dict]) -> str:
    return "not finished" if _unfinished_only(problems) else "damaged"


def _verify_hint(problems: list[dict]) -> str:
    """What to do: an unfinished build resumes (keeping its finished shards); only damage calls for --force."""
    if not _unfinished_only(problems):
        return "rebuild it with the same `clipterm cache build ... --force` (damaged files cannot be trusted)"
    if any("running" in p["problem"] for p in problems):
        return "a build is running: wait for it to finish"
    return "resume it: rerun the same `clipterm cache build` command (its finished shards are kept)"


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _rank() -> int:
    import os

    return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0


def register(app: typer.Typer) -> None:
    app.add_typer(cache_app, name="cache")
