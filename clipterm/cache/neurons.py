"""`neurons.L{l}.safetensors` in a cache folder: built from the cache's images, read back.

| tensor            | shape      | meaning                                                                   |
|-------------------|------------|---------------------------------------------------------------------------|
| `mean`            | (M, D) f32 | each neuron's mean second-order effect over the cache's images            |
| `pc1`             | (M, D) f32 | first principal direction of its top-k effects, centred by `mean` (unit)  |
| `pc1_share`       | (M,) f32   | share of those centred top-k effects' energy along `pc1`                  |
| `norms`           | (N, M) f16 | per image (cache row order): the norm of the second-order effect          |
| `activations`     | (N, M) f16 | per image: the neuron's CLS post-activation value                         |
| `top_rows`        | (M, k) i64 | the k rows whose effect is farthest from `mean`, farthest first           |
| `top_norms`       | (M, k) f32 | those distances, |effect − mean|: the last is the significance threshold  |
| `effect_sum`      | (N, D) f32 | per image: Σ over neurons of the effects                                  |
| `significant_sum` | (N, D) f32 | per image: Σ of (effect − mean) over the neurons whose top k it is in     |
| `norm_mean`       | (M,) f32   | mean of `norms` over the readable images                                  |
| `top1_share`      | (M,) f32   | sparsity: share of the neuron's Σ norm² carried by its top 1% of images   |
| `missing`         | (N,) u8    | 1 where the image could not be read again for this build (its rows hold 0) |

`pc1` and `top_rows` follow the reference (`compute_pcas.py`): the k images with the largest norm of
the effect *centred by the mean effect over all images*, their centred effects' first right singular
vector, signed so that most of them project positively. The mean is known only after every image,
so the ranking is a second pass: over the per-image scalars kept in memory when they fit
(KEEP_IN_MEMORY), else over the images again. `effect_sum` and `significant_sum` are what mean-
ablation of the second-order effects needs (`clipterm ablate --second-order`, `ablation.py`).

With `convention="reference"` (`neurons build --convention reference`) every effect is the reference's
(second_order_lens: equal shares of the LayerNorm means, β and biases, ×100/‖embedding‖; see
`vit/second_order.py` and docs/conventions.md), and the metadata's `convention` says so; ablation then
scales its shifts back by ‖embedding‖/100, as the reference ablates in that scaled space.

The metadata ties the file to one build of the cache (its creation time, weights and dataset), so a
cache rebuilt with `--force` refuses a stale file rather than mixing two builds.
"""

from __future__ import annotations

import errno
import json
import time
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

from clipterm import files, names
from clipterm.cache import store
from clipterm.errors import ClipTermError, ExitCode

FORMAT = "clipterm.neurons/2"
READABLE = ("clipterm.neurons/1", FORMAT)  # /1 lacks what second-order ablation needs, and ranked top_rows uncentred
KEEP_IN_MEMORY = 1 << 30  # per-image scalars up to this many bytes are kept for the ranking pass, not recomputed


def neurons_file(directory: str | Path, layer: int) -> Path:
    return Path(directory) / f"neurons.{names.layer(layer)}.safetensors"


def built_layers(directory: str | Path) -> list[int]:
    """Layers with a neurons file in a cache folder."""
    found = []
    for path in Path(directory).glob("neurons.L*.safetensors"):
        stem = path.name[len("neurons.L") : -len(".safetensors")]
        if stem.isdigit():
            found.append(int(stem))
    return sorted(found)


def _identity(reader: Any) -> dict[str, str]:
    m = reader.manifest
    return {"cache_created": str(m["created"]), "weights_sha256": str(m["model"].get("weights_sha256")),
            "dataset_fingerprint": str(m["dataset"].get("fingerprint")), "rows": str(reader.n)}


# --------------------------------------------------------------------------- the cache's images, again


def cache_source(reader: Any) -> Any:
    """The cache's inputs as an ImageSource, from images.jsonl (paths and ids as they were at build time)."""
    from clipterm.inputs.images import ImageItem, ImageSource, item_path

    dataset = reader.manifest["dataset"]
    lines = sorted(reader.images(), key=lambda row: row["index"])
    items = [ImageItem(row["index"], item_path(row), row.get("id"), row.get("labels", {})) for row in lines]
    if [item.index for item in items] != list(range(len(items))):
        raise ClipTermError(f"images.jsonl of {reader.name} does not list inputs 0..n-1",
                            hint=f"run `clipterm cache verify {reader.name}`", code=ExitCode.INVALID_DATA)
    return ImageSource(dataset["source"], dataset["kind"], dataset.get("root"), items, dataset["tasks"], dataset.get("seed"),
                       dataset.get("world", 1))


# --------------------------------------------------------------------------- the build


def neuron_paths(shape: Any) -> Any:
    """Where a tower's neurons get their paths (the tower's `neuron_paths`): a ViT's MLP neurons through later
    heads, a ResNet's or ConvNeXt's last-stage channels through the pool. Same functions, same file."""
    from clipterm.towers import tower_for

    return tower_for(shape).neuron_paths()


def check_neuron_layer(shape: Any, layer: int) -> None:
    """Refuse a layer whose neurons have no stored paths (a ViT's last layer; any stage but a CNN's last)."""
    from clipterm.towers import tower_for

    tower_for(shape).check_neuron_layer(layer)


@dataclass
class NeuronBuildResult:
    cache: str
    layer: str  # `L4`
    path: str
    images: int  # images of the cache
    missing: int  # images that could not be read again (left out of every statistic)
    changed: int  # images whose embedding now differs from the cache's by over 5% (changed on disk?)
    top_images: int  # images per neuron behind its principal direction (`--top-images`)
    convention: str
    seconds: float
    images_per_s: float
    bytes: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def build_neurons(reader: Any, layer: int, device: str = "auto", top_k: int = 100, batch_size: int = 64,
                  workers: int | None = None, progress: Callable | None = None, cancel: Callable[[], bool] | None = None,
                  loaded: Any = None, keep_bytes: int = KEEP_IN_MEMORY, convention: str = "clipterm") -> NeuronBuildResult:
    """Run the cache's images through its model and write `neurons.L{layer}.safetensors` atomically.

    `progress(description, total, unit)` is a context manager yielding `advance(n)` (as for cache builds);
    `cancel()` is polled between batches; `loaded` reuses a model already in memory (it is checked).
    The ranking by centred norm needs the mean first: it runs over the scalars kept from the first
    pass when they take at most `keep_bytes`, else over a second pass of the images.
    """
    from clipterm.cache.reader import check_model
    from clipterm.vit.models import pick_device

    from clipterm.vit.towers import refuse_analysis

    started = time.perf_counter()
    refuse_analysis(reader.manifest["model"], "second-order neuron effects")
    shape = reader.shape
    second_order = neuron_paths(shape)
    check_neuron_layer(shape, layer)
    second_order.check_convention(convention)
    if top_k < 1:
        raise ClipTermError(f"--top-k {top_k}: the principal direction needs at least one image", hint="the default is 100")
    device = pick_device(device)
    if loaded is None:
        from clipterm.cache.reader import model_for_cache

        loaded = model_for_cache(reader, device)
    check_model(reader, loaded.info)
    model = loaded.model.to(device).eval()
    vectors = second_order.path_vectors(model, layer, convention)  # (M, K, D)
    keep = reader.n * vectors.shape[0] * vectors.shape[1] * 4 <= keep_bytes
    state = _Accumulator(reader, vectors, top_k, device, keep, shared=convention == "reference")

    def passes(description: str):
        return _traced(reader, loaded, model, layer, device, batch_size, workers, progress, cancel, description, convention)

    what = f"neurons {names.layer(layer)} of cache {reader.name}"
    again = f"rerun `clipterm neurons build {reader.name} --layer {names.layer(layer)}` (a neurons build starts over)"
    try:
        with store.CacheLock(reader.path):
            for kept, out in passes(f"neurons {names.layer(layer)}"):
                state.add(kept, out)
            state.finish_first_pass()
            for rows, scalars in state.kept or ((state.rows(kept), out.scalars) for kept, out in passes(f"ranking {names.layer(layer)}")):
                state.rank(rows, scalars)
            meta = {"format": FORMAT, "layer": str(layer), "top_k": str(state.top.rows.shape[1]),
                    "paths": json.dumps(second_order.paths(shape.layers, shape.heads, layer)), "convention": convention,
                    "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **_identity(reader)}
            path = neurons_file(reader.path, layer)
            sha = files.save_tensors(path, state.tensors(), metadata=meta)
            _record(reader, path.name, sha)
    except KeyboardInterrupt:
        raise ClipTermError(f"interrupted: {what} were not written; the cache is unchanged", hint=again,
                            code=ExitCode.INTERRUPTED) from None
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        raise ClipTermError(f"the disk is full: {what} were not written; the cache is unchanged",
                            hint=f"free some space, then {again}", code=ExitCode.ERROR) from None
    seconds = time.perf_counter() - started
    n = reader.n
    return NeuronBuildResult(reader.name, names.layer(layer), str(path), n, int(state.missing.sum()), state.changed,
                             state.top.rows.shape[1], convention, round(seconds, 3), round(n / seconds, 2) if seconds > 0 else 0.0,
                             path.stat().st_size)


def _traced(reader: Any, loaded: Any, model: Any, layer: int, device: str, batch_size: int, workers: int | None,
            progress: Callable | None, cancel: Callable[[], bool] | None, description: str, convention: str = "clipterm"):
    """One pass over the cache's images: yields (input indices, NeuronPass) per batch of readable images."""
    from contextlib import nullcontext

    from torch.utils.data import DataLoader

    from clipterm.cache.build import default_workers
    from clipterm.inputs.images import ImageDataset, collate, fast_decode

    second_order = neuron_paths(reader.shape)
    source = cache_source(reader)
    indices = reader.index().tolist()  # cache row -> input index
    dataset = ImageDataset(source, loaded.preprocess, indices, min_side=reader.manifest["model"]["image_size"],
                           fast=fast_decode(reader.manifest))
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers if workers is not None else default_workers(source),
                        collate_fn=collate, pin_memory=device.startswith("cuda"))
    bar = progress(description, len(indices), "images") if progress else nullcontext(lambda _n: None)
    with bar as advance:
        for kept, pixels, skipped in loader:
            if cancel is not None and cancel():
                raise ClipTermError("neuron build cancelled", hint="run it again; nothing was written",
                                    code=ExitCode.INTERRUPTED)
            if pixels is not None:
                yield kept, second_order.trace(model, pixels.to(device), layer, convention)
            advance(len(kept) + len(skipped))


class _Accumulator:
    """A build's state: per-image norms, activations and effect sums, the scalar sum, then the top k by centred norm.

    `shared`: the reference convention, whose effects all carry a per-image term common to the layer's
    neurons (the pass's constant summed over paths); it is kept per row and folded into every statistic.
    """

    def __init__(self, reader: Any, vectors: Any, top_k: int, device: str, keep: bool, shared: bool = False):
        import torch

        from clipterm.vit import second_order

        n, (m, k_paths, d) = reader.n, vectors.shape
        self.reader, self.vectors, self.top_k, self.name = reader, vectors, top_k, reader.name
        self.row_of = {index: row for row, index in enumerate(reader.index().tolist())}
        self.expected = reader.image_embeds().to(device)  # (N, D)
        self.grams = second_order.gram(vectors)  # (M, K, K)
        self.norms = torch.zeros(n, m, dtype=torch.float16)  # (N, M)
        self.activations = torch.zeros(n, m, dtype=torch.float16)  # (N, M)
        self.effect_sum = torch.zeros(n, d)  # (N, D)
        self.missing = torch.ones(n, dtype=torch.uint8)  # (N,) until the image is seen
        self.scalar_sum = torch.zeros(m, k_paths, dtype=torch.float64, device=device)  # (M, K)
        self.top = second_order.TopK.empty(m, k_paths, device=device)
        self.kept: list | None = [] if keep else None  # (rows (B,), scalars (B, M, K)) per batch, for the ranking pass
        self.mean_scalars = None
        self.changed = 0
        self.offsets = torch.zeros(n, d, device=device) if shared else None  # (N, D) the shared term per row
        self.offset_sum = torch.zeros(d, dtype=torch.float64, device=device)  # (D,)
        self.mean_offset = None

    def rows(self, kept: list[int]) -> Any:
        import torch

        return torch.tensor([self.row_of[index] for index in kept])  # (B,)

    def add(self, kept: list[int], out: Any) -> None:
        """First pass: everything that does not need the mean."""
        from clipterm.vit import second_order

        rows = self.rows(kept)  # (B,)
        shared = None if self.offsets is None else out.constant.sum(1)  # (B, D)
        norms = second_order.effect_norms(out.scalars, self.grams, self.vectors, shared)  # (B, M)
        self.norms[rows], self.activations[rows] = norms.half().cpu(), out.activations.half().cpu()
        sums = second_order.effect_sums(out.scalars, self.vectors)  # (B, D)
        if shared is not None:
            self.offsets[rows.to(shared.device)] = shared
            self.offset_sum += shared.double().sum(0)
            sums = sums + self.vectors.shape[0] * shared  # every neuron carries it
        self.effect_sum[rows] = sums.cpu()  # (B, D)
        self.missing[rows] = 0
        self.scalar_sum += out.scalars.double().sum(0)  # (M, K)
        if self.kept is not None:
            self.kept.append((rows, out.scalars))
        expected = self.expected[rows.to(norms.device)]  # (B, D)
        gap = (out.image_embeds - expected).norm(dim=-1) / expected.norm(dim=-1)  # (B,)
        self.changed += int((gap > 0.05).sum())

    def finish_first_pass(self) -> None:
        """The mean scalars, over the images that could be read."""
        readable = int(len(self.missing) - self.missing.sum())
        if readable == 0:
            raise ClipTermError(f"none of the {len(self.missing)} images of {self.name} could be read again",
                                hint="the images moved or were deleted since the cache was built", code=ExitCode.NOT_FOUND)
        self.readable = readable
        self.mean_scalars = (self.scalar_sum / readable).float()  # (M, K)
        self.mean_offset = (self.offset_sum / readable).float()  # (D,)

    def rank(self, rows: Any, scalars: Any) -> None:
        """Second pass: keep each neuron's top k by the norm of the centred effect."""
        from clipterm.vit import second_order

        offsets = None if self.offsets is None else self.offsets[rows.to(self.offsets.device)] - self.mean_offset  # (B, D)
        centred = second_order.effect_norms(scalars - self.mean_scalars, self.grams, self.vectors, offsets)  # (B, M)
        self.top = self.top.add(centred, rows.to(centred.device), scalars, self.top_k)

    def tensors(self) -> dict[str, Any]:
        """Everything the file holds; the means are over the images that could be read."""
        import torch

        from clipterm.vit import second_order

        top_offsets = None
        if self.offsets is not None:
            offsets, rows, mean_offset = self.offsets, self.top.rows, self.mean_offset

            def top_offsets(part: slice) -> Any:
                return offsets[rows[part].to(offsets.device)] - mean_offset  # (c, k, D)
        pc1, share = second_order.principal_directions(self.top.scalars, self.mean_scalars, self.vectors,
                                                       top_offsets)  # (M, D), (M,)
        significant = second_order.top_effect_sums(self.top.scalars, self.top.rows, self.mean_scalars, self.vectors,
                                                   len(self.missing), top_offsets=top_offsets)  # (N, D)
        mean = second_order.mean_effects(self.mean_scalars, self.vectors)  # (M, D)
        if self.mean_offset is not None and self.offsets is not None:
            mean = mean + self.mean_offset
        seen = self.norms[self.missing == 0].float()  # (n, M)
        squared = seen**2  # (n, M)
        top1 = squared.topk(max(1, self.readable // 100), dim=0).values.sum(0)  # (M,)
        total = squared.sum(0)  # (M,)
        return {
            "mean": mean.cpu(),  # (M, D)
            "pc1": pc1.cpu(), "pc1_share": share.cpu(),  # (M, D), (M,)
            "norms": self.norms, "activations": self.activations, "missing": self.missing,  # (N, M), (N, M), (N,)
            "top_rows": self.top.rows.cpu(), "top_norms": self.top.norms.float().cpu(),  # (M, k), (M, k)
            "effect_sum": self.effect_sum, "significant_sum": significant.cpu(),  # (N, D), (N, D)
            "norm_mean": seen.mean(0),  # (M,)
            "top1_share": torch.where(total > 0, top1 / total.clamp_min(1e-30), torch.zeros_like(total)),  # (M,)
        }


def _record(reader: Any, name: str, sha: str) -> None:
    """List a new neurons file in the manifest (under the cache's lock), so that readers and `verify` check it."""
    from clipterm.cache.integrity import remember_written

    manifest = store.read_manifest(reader.path) or reader.manifest
    manifest["files"] = {**manifest.get("files", {}), name: sha}
    store.write_manifest(reader.path, manifest)
    reader.manifest["files"] = manifest["files"]
    remember_written(reader.path, {name: sha})


# --------------------------------------------------------------------------- reading


class NeuronFile:
    """One layer's neurons file, checked against the cache it sits in. Tensors come back on the CPU."""

    def __init__(self, reader: Any, layer: int):
        check_neuron_layer(reader.shape, layer)
        self.reader, self.layer, self.path = reader, layer, neurons_file(reader.path, layer)
        hint = f"run `clipterm neurons build {reader.name} --layer {names.layer(layer)}`"
        if not self.path.is_file():
            built = ", ".join(names.layer(l) for l in built_layers(reader.path)) or "none"
            raise ClipTermError(f"cache {reader.name} has no neurons file for {names.layer(layer)} (built: {built})", hint=hint,
                                code=ExitCode.NOT_FOUND)
        from safetensors import safe_open

        from clipterm.cache.integrity import neurons_layout, neurons_required

        reader.checked(self.path.name, neurons_layout(reader.manifest, reader.n), required=neurons_required(self.path))
        try:
            self._file = safe_open(str(self.path), framework="pt")
            self.meta: dict[str, str] = self._file.metadata() or {}
            self._names = set(self._file.keys())
        except Exception as exc:
            raise ClipTermError(f"cannot read {self.path.name}: {str(exc)[:160]}", hint=hint, code=ExitCode.INVALID_DATA) from None
        if self.meta.get("format") not in READABLE:
            found = self.meta.get("format") or "no format"
            raise ClipTermError(f"{self.path.name} is not a {FORMAT} file ({found})", hint=hint, code=ExitCode.INVALID_DATA)
        self._hint = hint
        stale = [key for key, value in _identity(reader).items() if self.meta.get(key) != value]
        if stale:
            raise ClipTermError(f"{self.path.name} was built for an earlier build of {reader.name} ({stale[0]} differs)",
                                hint=hint, code=ExitCode.INVALID_DATA)

    def tensor(self, name: str) -> Any:
        if name not in self._names:  # a clipterm.neurons/1 file: no top_norms, effect_sum, significant_sum
            raise ClipTermError(f"{self.path.name} has no {name!r}: an older clipterm built it", hint=self._hint,
                                code=ExitCode.INVALID_DATA)
        return self._file.get_tensor(name)

    @property
    def convention(self) -> str:
        """"clipterm", or "reference" (effects ×100/‖embedding‖ with the reference's shares); older files: clipterm."""
        return self.meta.get("convention", "clipterm")

    @property
    def top_k(self) -> int:
        return int(self.meta["top_k"])

    @property
    def paths(self) -> list[str]:
        """Names of the later heads the second-order effects flow through."""
        return json.loads(self.meta["paths"])

    @cached_property
    def missing(self) -> Any:
        return self.tensor("missing").bool()  # (N,)

    def column(self, name: str, neuron: int) -> Any:
        """One neuron's per-image `norms` or `activations`, (N,) fp32."""
        return self._file.get_slice(name)[:, neuron].reshape(-1).float()

    def ranking(self, sort: str = "norm") -> Any:
        """Neuron ids, most notable first: by mean effect norm (`norm`) or by top-1% share (`sparsity`)."""
        key = {"norm": "norm_mean", "sparsity": "top1_share"}.get(sort)
        if key is None:
            raise ClipTermError(f"unknown sort {sort!r}", hint="sort by norm or sparsity")
        return self.tensor(key).argsort(descending=True)  # (M,)


def decompose_neurons(neuron_file: NeuronFile, ids: list[int], text_embeds: Any, k: int = 32) -> Any:
    """Sparse text decomposition (OMP over the centred, unit pool texts) of the neurons' `pc1` directions."""
    from clipterm.analyses.sparse import omp, text_dictionary

    pc1 = neuron_file.tensor("pc1")[ids]  # (m, D)
    return omp(pc1.to(text_embeds.device), text_dictionary(text_embeds), k)
