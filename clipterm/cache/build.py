"""The cache build: images -> DataLoader -> exact decomposition -> shards, manifest and stats.

Input i belongs to chunk i // shard_rows, and each chunk becomes one shard. Under torchrun
(`RANK`/`WORLD_SIZE` set) rank r builds chunks r, r+K, r+2K, ... and writes their shards itself;
rank 0 holds the writer's lock, prepares the directory, and merges the manifest and the fp64
statistics at the end. The shard layout is the same for any number of processes, so a K-process
build equals a one-process build. A killed build resumes from its last complete shard.
"""

from __future__ import annotations

import errno
import os
import re
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager

from clipterm import files, locations, names
from clipterm.cache import store
from clipterm.errors import ClipTermError, ExitCode
from clipterm.inputs.images import DECODE_FAST, DECODE_FULL, ImageDataset, ImageSource, collate, fast_decode, open_source

# progress(description, total, unit) -> context manager yielding advance(n): clipterm.cli.output.progress fits.
ProgressFactory = Callable[[str, "int | None", str], ContextManager[Callable[[int], None]]]
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
MAX_NAME = 255  # bytes in a folder name on ext4, xfs, btrfs, apfs (a name is ASCII: bytes are characters)


@dataclass
class BuildOptions:
    """Everything `clipterm cache build` can be asked for."""

    images: str  # DIR | LIST | toy[1|2]:N[@SEED] | tar shards (data/{000000..000099}.tar, a folder of .tar) | hf:PATH[:split]
    model: str = "toy"  # toy | open_clip arch | local-dir:PATH
    pretrained: str | None = None  # tag or weights file
    quick_gelu: bool | None = None  # the activation of a weights file that does not say its own (None: refuse to guess)
    name: str | None = None  # cache name under the root; derived from model and images when None
    cache_dir: str | None = None  # cache root instead of the default rule
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    batch_size: int = 64
    workers: int | None = None  # DataLoader workers; None picks for this machine
    dtype: str = "float16"  # storage dtype of the components (image_embeds stay fp32)
    neurons: bool = False  # also store CLS post-activation MLP values
    tokens: str | None = None  # layer set whose per-token head outputs are stored, e.g. "L8-11"
    force: bool = False  # start over instead of resuming
    shard_rows: int = 1024  # inputs per shard (a resumed build keeps the cache's own value)
    fast_decode: bool = False  # decode JPEGs at reduced scale and box-reduce huge files (not open_clip's pixels)
    label_key: str | None = None  # tar shards: the member extension (or .json field) holding the label (default cls)
    image_column: str | None = None  # hf: the image column (default: the dataset's Image feature)
    label_column: str | None = None  # hf: the label column (default: no labels)


@dataclass
class BuildResult:
    name: str
    path: str
    inputs: int  # inputs in the source
    images: int  # inputs stored (inputs - skipped)
    skipped: int
    shards: int
    built: int  # inputs processed by this run (0 when the cache was already complete)
    seconds: float
    images_per_s: float
    already_complete: bool
    world_size: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def build_cache(options: BuildOptions, progress: ProgressFactory | None = None, cancel: Callable[[], bool] | None = None,
                loaded: Any = None) -> BuildResult:
    """Build (or resume) a cache. `cancel()` is polled between batches; `loaded` reuses a model already in memory."""
    ranks = Ranks.from_env()
    ranks.start()
    try:
        return _build(options, ranks, progress, cancel, loaded)
    finally:
        ranks.stop()


def _build(options: BuildOptions, ranks: Ranks, progress: ProgressFactory | None, cancel: Callable[[], bool] | None,
           loaded: Any) -> BuildResult:
    import torch

    from clipterm.names import parse_layers
    from clipterm.toyworld.evaluate import model_world
    from clipterm.vit.models import load_model, pick_device

    started = time.perf_counter()
    _check_options(options)
    toy_world = model_world(loaded.info.spec if loaded is not None else options.model)  # what `toy:N` draws
    source = open_source(options.images, toy_world=toy_world, label_key=options.label_key,
                         image_column=options.image_column, label_column=options.label_column)
    device = pick_device(options.device, ranks.local_rank)
    if loaded is None:
        loaded = load_model(options.model, options.pretrained, device=device, quick_gelu=options.quick_gelu)
    model = loaded.model.to(device).eval()
    info = loaded.info
    decompose = tower(model)
    decompose.check_supported(model, info.spec)
    token_layers = parse_layers(options.tokens, info.layers) if options.tokens else []
    decompose.check_stored(model, options.neurons, token_layers)  # before anything is written
    name = options.name or default_name(info, source)
    directory = locations.cache_root(options.cache_dir)[0] / name
    fresh = store.new_manifest(
        model=info.to_json(), convention=decompose.CONVENTION, dataset=source.describe(), dtype=options.dtype,
        stored={"neurons": options.neurons, "tokens": token_layers}, shape=_shape(info), shard_rows=options.shard_rows,
        decode=DECODE_FAST if options.fast_decode else DECODE_FULL,
    )
    lock = store.CacheLock(directory)

    def setup() -> tuple[bool, dict]:
        if directory.is_dir():
            store.refuse_foreign(directory)  # before the lock file, so nothing is written into someone's folder
        lock.acquire()
        old = None if options.force else store.read_manifest(directory)
        if old is not None and old["complete"] and store.mismatch(old, fresh) is None:
            return True, old
        manifest = store.prepare(directory, fresh, options.force)
        with torch.no_grad():
            readouts = {"heads": decompose.readout(model).float().cpu()}  # (L, H, dh, D); (1, 1, D, D) for joint heads
            pool = getattr(decompose, "pool_readout", lambda _m: None)(model)
            if pool is not None:
                readouts["pool"] = pool.float().cpu()  # (G, dh', D): an attention pool's heads
            files.save_tensors(directory / store.READOUT, readouts)
        return False, manifest

    try:
        complete, manifest = ranks.on_zero(setup)
        if complete:
            return _result(directory, manifest, ranks, built=0, started=started, already=True)
        built = len(source) - sum(r["stop"] - r["start"] for r in manifest["shards"])  # by all ranks together
        stats = _run(source, loaded, model, manifest, directory, options, token_layers, device, ranks, progress, cancel)
        if ranks.world > 1:
            files.save_tensors(directory / store.partial_stats_name(ranks.rank), stats)
            ranks.barrier()
        manifest = ranks.on_zero(lambda: _merge(directory, source, ranks, stats))
        return _result(directory, manifest, ranks, built=built, started=started, already=False)
    except KeyboardInterrupt:
        raise ClipTermError(f"interrupted: {_kept(directory)}", hint="rerun the same command to resume from there",
                            code=ExitCode.INTERRUPTED) from None
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        raise ClipTermError(f"the disk is full (writing {Path(exc.filename or directory).name}): {_kept(directory)}",
                            hint="free some space, then rerun the same command to resume", code=ExitCode.ERROR) from None
    finally:
        lock.release()


def _kept(directory: Path) -> str:
    """What a stopped build leaves: its finished shards, which a rerun keeps."""
    try:
        manifest = store.read_manifest(directory)
    except ClipTermError:
        manifest = None
    if not manifest:
        return f"nothing of cache {directory.name} was kept"
    done = manifest["shards"]
    return (f"{len(done)} of {manifest['chunks']} shards ({sum(r['rows'] for r in done):,} images) of cache "
            f"{directory.name} are kept in {directory}")


def _run(source: ImageSource, loaded: Any, model: Any, manifest: dict, directory: Path, options: BuildOptions,
         token_layers: list[int], device: str, ranks: Ranks, progress: ProgressFactory | None,
         cancel: Callable[[], bool] | None) -> dict:
    """Build this rank's missing chunks; return its fp64 stats, finished chunks included."""
    import torch
    from torch.utils.data import DataLoader

    rows, n = manifest["shard_rows"], len(source)
    done = {r["chunk"]: r for r in manifest["shards"]}
    mine = [k for k in range(manifest["chunks"]) if k % ranks.world == ranks.rank]
    pending = [k for k in mine if k not in done]
    stats = None
    for k in mine:
        if k in done:  # a resumed build: stats of finished shards come from what they hold
            stats = store.add_stats(stats, store.shard_stats(directory / done[k]["file"], device))
    indices = [i for k in pending for i in range(k * rows, min((k + 1) * rows, n))]
    workers = options.workers if options.workers is not None else default_workers(source)
    loader = DataLoader(
        ImageDataset(source, loaded.preprocess, indices, min_side=manifest["model"]["image_size"], fast=fast_decode(manifest)),
        batch_size=options.batch_size, num_workers=workers, collate_fn=collate, pin_memory=device.startswith("cuda"),
    )
    chunks = {k: {"parts": [], "skipped": [], "seen": 0, "size": min((k + 1) * rows, n) - k * rows} for k in pending}
    new_records: list[dict] = []
    total = sum(min((k + 1) * rows, n) - k * rows for k in mine)
    bar = progress("building cache", total, "images") if progress and ranks.rank == 0 else nullcontext(lambda _n: None)
    with bar as advance:
        advance(total - len(indices))
        for kept, pixels, skipped in loader:
            if cancel is not None and cancel():
                raise ClipTermError("build cancelled", hint="rerun the same command to resume it", code=ExitCode.INTERRUPTED)
            if pixels is not None:
                part, batch_stats = decompose_batch(model, pixels, device, options, token_layers)
                stats = store.add_stats(stats, batch_stats)
                part["index"] = torch.tensor(kept)  # (B,)
                for task in source.tasks:
                    part[f"labels.{task}"] = torch.tensor([source.items[i].labels[task] for i in kept])  # (B,)
                owner = part["index"] // rows  # (B,)
                for k in owner.unique().tolist():
                    chunks[k]["parts"].append({key: value[owner == k] for key, value in part.items()})
            for index, reason in skipped:
                chunks[index // rows]["skipped"].append((index, reason))
            for index in kept + [i for i, _ in skipped]:
                chunks[index // rows]["seen"] += 1
            for k in [k for k, c in chunks.items() if c["seen"] == c["size"]]:
                new_records.append(_flush(directory, k, chunks.pop(k), rows, n, manifest, options, token_layers))
                _record_progress(directory, manifest, new_records, ranks)
            advance(len(kept) + len(skipped))
    if stats is None:  # this rank had no rows at all
        stats = store.partial_stats(_empty_part(manifest, options.dtype, token_layers, with_index=False))
    return {key: value.cpu() for key, value in stats.items()}


def decompose_batch(model: Any, pixels: Any, device: str, options: BuildOptions, token_layers: list[int]) -> tuple[dict, dict]:
    """One batch through the decomposition; returns batch-major CPU tensors in the storage dtype, and their fp64 stats."""
    import torch

    decompose = tower(model)
    store_dtype = getattr(torch, options.dtype)
    autocast = torch.autocast("cuda", dtype=torch.float16) if device.startswith("cuda") and options.dtype == "float16" else nullcontext()
    with torch.no_grad(), autocast:
        out = decompose.decompose(model, pixels.to(device, non_blocking=True), neurons=options.neurons, token_layers=token_layers)
    part = {
        "head_out": out.head_out.to(store_dtype),  # (B, L, H, dh)
        "mlps": out.mlps.to(store_dtype),  # (B, L, D)
        "embed": out.embed.to(store_dtype),  # (B, D)
        "bias": out.bias.to(store_dtype),  # (B, D)
        "ln_scale": out.ln_scale.float(),  # (B,)
        "image_embeds": out.image_embeds.float(),  # (B, D)
    }
    if options.neurons:
        part["neurons"] = out.neurons.to(store_dtype)  # (B, L, M)
    if getattr(out, "pool_heads", None) is not None:  # an attention pool's own split
        part["pool_heads"] = out.pool_heads.to(store_dtype)  # (B, G, dh')
        part["pool_bias"] = out.pool_bias.to(store_dtype)  # (B, D)
    for layer in token_layers:
        part[f"tokens.{names.layer(layer)}"] = out.tokens[layer].to(store_dtype)  # (B, H, T, dh)
    with torch.no_grad():
        major = {**part, "head_out": part["head_out"].permute(1, 2, 0, 3), "mlps": part["mlps"].transpose(0, 1)}  # (L, H, B, dh), (L, B, D)
        if "pool_heads" in part:
            major["pool_heads"] = part["pool_heads"].transpose(0, 1)  # (G, B, dh')
        batch_stats = store.partial_stats(major)
    return {key: value.cpu() for key, value in part.items()}, batch_stats


def _flush(directory: Path, chunk: int, state: dict, rows: int, n: int, manifest: dict, options: BuildOptions,
           token_layers: list[int]) -> dict:
    parts = state["parts"] or [_empty_part(manifest, options.dtype, token_layers)]
    tensors = store.shard_tensors(parts, options.dtype)
    return store.write_shard(directory, chunk, tensors, chunk * rows, min((chunk + 1) * rows, n), sorted(state["skipped"]))


def _record_progress(directory: Path, manifest: dict, new_records: list[dict], ranks: Ranks) -> None:
    """One process: the manifest lists each shard as it lands. Several: each rank keeps its own progress file."""
    if ranks.world == 1:
        manifest["shards"] = sorted(manifest["shards"] + new_records[-1:], key=lambda r: r["chunk"])
        manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        store.write_manifest(directory, manifest)
    else:
        files.write_json(directory / store.progress_name(ranks.rank), new_records)


def _merge(directory: Path, source: ImageSource, ranks: Ranks, stats: dict) -> dict:
    """Rank 0, after every rank is done: gather shard records and stats, then write the complete manifest."""
    manifest = store.read_manifest(directory)
    records = store.finished_records(directory, manifest)
    missing = sorted(set(range(manifest["chunks"])) - {r["chunk"] for r in records})
    if missing:
        raise ClipTermError(f"shards {missing[:5]} of {directory.name} were not written", hint="rerun the build to resume it",
                            code=ExitCode.ERROR)
    if ranks.world > 1:
        stats = None
        for rank in range(ranks.world):
            stats = store.add_stats(stats, files.load_tensors(directory / store.partial_stats_name(rank)))
    if sum(r["rows"] for r in records) == 0:
        reasons = [f"{Path(source.items[i].path or '').name}: {why}" for r in records for i, why in r["skipped"]][:3]
        store.clear(directory)
        raise ClipTermError(
            f"no readable image among the {len(source)} inputs of {source.spec}",
            hint=f"every file was skipped ({'; '.join(reasons)}); check the folder holds real images",
            code=ExitCode.INVALID_DATA,
        )
    return store.finish(directory, manifest, records, stats, [item.to_json() for item in source.items])


def _result(directory: Path, manifest: dict, ranks: Ranks, built: int, started: float, already: bool) -> BuildResult:
    seconds = time.perf_counter() - started
    rows = sum(r["rows"] for r in manifest["shards"])
    return BuildResult(
        name=directory.name, path=str(directory), inputs=manifest["dataset"]["n"], images=rows,
        skipped=len(manifest.get("skipped", [])), shards=len(manifest["shards"]), built=built, seconds=round(seconds, 3),
        images_per_s=round(built / seconds, 2) if seconds > 0 else 0.0, already_complete=already,
        world_size=ranks.world,
    )


# --------------------------------------------------------------------------- small pieces


def tower(model: Any) -> Any:
    """The decomposition module for a model's vision tower (`clipterm.vit.towers.tower_module`): `vit.resnet` for a
    ModifiedResNet, `vit.timm_vit` for timm transformers, `vit.convnext` for timm ConvNeXts, else `vit.decompose`.

    All give `check_supported`, `readout`, `decompose` and `CONVENTION` with the same layout (a ResNet is stored
    as one attention layer, its pool, with `embed` = pool.pos, `bias` = pool.bias and no MLPs)."""
    from clipterm.vit.towers import tower_module

    return tower_module(model)


def _shape(info: Any) -> dict[str, Any]:
    grid = info.image_size // info.patch_size
    shape = {"layers": info.layers, "heads": info.heads, "head_dim": info.head_dim, "width": info.width,
             "embed_dim": info.embed_dim, "mlp_width": info.mlp_width, "tokens": grid * grid + 1}
    if getattr(info, "tower", "vit") == "resnet":
        s = info.shape
        shape.update(tower="resnet", pool_layer=s.pool_layer, neuron_layer=s.neuron_layer, mlp_layers=0)
    if getattr(info, "tower", "vit") == "convnext":  # the last stage's blocks stored as MLPs, no heads
        shape.update(tower="convnext", stage=info.stage, heads=0, head_dim=0, neuron_layer=info.stage)
    if getattr(info, "pool", "tok") == "attn":  # block heads in joint space; the pool's heads and MLP stored too
        shape.update(head_space="joint", head_dim=info.embed_dim, pool_heads=info.pool_heads,
                     pool_head_dim=info.pool_head_dim, pool_mlp=int(bool(info.pool_mlp)),
                     mlp_layers=info.layers + int(bool(info.pool_mlp)))
    if getattr(info, "pool", "tok") != "tok":
        shape["pool"] = info.pool
    return shape


def _empty_part(manifest: dict, dtype: str, token_layers: list[int], with_index: bool = True) -> dict:
    """A zero-row batch (batch-major) for a chunk whose inputs were all skipped."""
    import torch

    s, store_dtype = manifest["shape"], getattr(torch, dtype)
    part = {
        "head_out": torch.zeros(0, s["layers"], s["heads"], s["head_dim"], dtype=store_dtype),
        "mlps": torch.zeros(0, s.get("mlp_layers", s["layers"]), s["embed_dim"], dtype=store_dtype),
        "embed": torch.zeros(0, s["embed_dim"], dtype=store_dtype),
        "bias": torch.zeros(0, s["embed_dim"], dtype=store_dtype),
        "ln_scale": torch.zeros(0),
        "image_embeds": torch.zeros(0, s["embed_dim"]),
    }
    if s.get("pool_heads"):
        part["pool_heads"] = torch.zeros(0, s["pool_heads"], s["pool_head_dim"], dtype=store_dtype)
        part["pool_bias"] = torch.zeros(0, s["embed_dim"], dtype=store_dtype)
    if not with_index:  # for statistics: component-major
        major = {**part, "head_out": part["head_out"].permute(1, 2, 0, 3), "mlps": part["mlps"].transpose(0, 1)}
        if "pool_heads" in part:
            major["pool_heads"] = part["pool_heads"].transpose(0, 1)
        return major
    part["index"] = torch.zeros(0, dtype=torch.long)
    part.update({f"labels.{task}": torch.zeros(0, dtype=torch.long) for task in manifest["dataset"]["tasks"]})
    if manifest["stored"]["neurons"]:
        part["neurons"] = torch.zeros(0, s["layers"], s["mlp_width"], dtype=store_dtype)
    for layer in token_layers:
        part[f"tokens.{names.layer(layer)}"] = torch.zeros(0, s["heads"], s["tokens"], s["head_dim"], dtype=store_dtype)
    return part


def _check_options(options: BuildOptions) -> None:
    if options.dtype not in store.DTYPES:
        raise ClipTermError(f"unknown dtype {options.dtype!r}", hint="use float16 (the default) or float32")
    if options.batch_size < 1 or options.shard_rows < 1:
        raise ClipTermError("batch size and shard rows must be at least 1")
    if options.name is not None and len(options.name) > MAX_NAME:
        raise ClipTermError(f"--name is {len(options.name)} characters; a cache name is at most {MAX_NAME} (the file "
                            "system's limit on a folder name)", hint="choose a shorter --name")
    if options.name is not None and not _NAME.match(options.name):
        raise ClipTermError(f"not a cache name: {options.name!r}",
                            hint="names use letters, digits and . _ + -; use --cache-dir to put caches elsewhere")


def default_name(info: Any, source: ImageSource) -> str:
    """`<model>[-<tag>]-<images>`, e.g. `toy-toy2000` or `ViT-B-32-openai-imagenette`."""
    from clipterm.vit.models import is_toy

    model = info.arch if is_toy(info.spec) or not info.arch.startswith("local-dir:") else Path(info.arch[10:]).name
    tag = info.pretrained if info.pretrained and not Path(info.pretrained).suffix else None
    if source.kind == "toy":
        images = f"toy{len(source)}" + (f"s{source.seed}" if source.seed else "")
    else:
        images = Path(source.root or "images").stem if source.kind == "list" else Path(source.root or "images").name
    name = "-".join(part for part in (model, tag, images) if part)
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", name).strip("._-")[:MAX_NAME] or "cache"


def default_workers(source: ImageSource) -> int:
    """No workers for the synthetic world (rendering is cheap) or 2-core machines; else up to 8."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 0 if source.kind == "toy" or cpus <= 2 else min(8, cpus - 1)


@dataclass
class Ranks:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Ranks:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        return cls(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))

    def start(self) -> None:
        if self.world > 1:
            from datetime import timedelta

            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("gloo", timeout=timedelta(hours=4))  # gloo: only barriers and small objects travel

    def stop(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def on_zero(self, work: Callable[[], Any]) -> Any:
        """Run `work` on rank 0 and hand its result (or its ClipTermError) to every rank."""
        result, failure = None, None
        if self.rank == 0:
            try:
                result = work()
            except ClipTermError as exc:
                failure = (exc.message, exc.hint, int(exc.code))
        if self.world > 1:
            import torch.distributed as dist

            box = [result, failure]
            dist.broadcast_object_list(box, src=0)
            result, failure = box
        if failure is not None:
            raise ClipTermError(failure[0], hint=failure[1], code=ExitCode(failure[2]))
        return result
