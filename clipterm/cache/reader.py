"""The cache on disk, read side: `open_cache`, the mmap reader and model checks (`inventory.py` lists and verifies).

Shards are opened with `safetensors.safe_open` (mmap) and read one component block at a time,
so nothing ever loads a whole cache. Rows come back in `index` order (the order of images.jsonl,
skipped inputs left out). Heads are stored in head space; `effects` maps them to joint space:

    embed + bias + Σ_{l,h} head_out[l,h] @ readout[l,h] + Σ_l mlps[l] = image_embeds
"""

from __future__ import annotations

import json
import os
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

from clipterm import locations, names
from clipterm.cache.blocks import CheckedHandle, ShardBlocks, row_axis
from clipterm.cache.integrity import (
    Layout,
    Verifier,
    readout_layout,
    shard_layout,
    stats_layout,
)
from clipterm.cache.store import IMAGES, MANIFEST, READOUT, STATS, CacheLock, read_manifest
from clipterm.errors import ClipTermError, ExitCode
from clipterm.files import safetensors_header
from clipterm.towers import Tower, tower_for


def resolve(path_or_name: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """A cache directory from a path, or from a name under the cache root."""
    given = Path(path_or_name).expanduser()
    if (given / MANIFEST).is_file():
        return given
    root, why = locations.cache_root(cache_dir)
    plain = str(path_or_name) not in ("", ".", "..") and given.name == str(path_or_name)  # a name, never `..`
    if plain and (root / given.name / MANIFEST).is_file():
        return root / given.name
    from clipterm.cache.inventory import list_caches  # it reads caches with CacheReader: imported when needed

    known = ", ".join(c["name"] for c in list_caches(root)[:8]) or "none yet"
    raise ClipTermError(
        f"no cache {str(path_or_name)!r} (not a cache folder, and not a name under {root}, the {why})",
        hint=f"caches there: {known}; build one with `clipterm cache build --images ... --name NAME`",
        code=ExitCode.NOT_FOUND,
    )


def open_cache(path_or_name: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
               allow_incomplete: bool = False) -> CacheReader:
    """Open a cache given as a path or as a name under the cache root."""
    return CacheReader(resolve(path_or_name, cache_dir), allow_incomplete=allow_incomplete)


def check_model(reader: CacheReader, model_info: Any) -> None:
    """Refuse a model whose weights are not the ones the cache was built with."""
    built = reader.manifest["model"]
    have = model_info.to_json() if hasattr(model_info, "to_json") else dict(model_info)
    built_family, have_family = _family(built), _family(have)
    hint = (f"load the model the cache was built with (--model {built.get('spec')}"
            + (f" --pretrained {built['pretrained']}" if built.get("pretrained") else "") + "), or build a cache for this one")
    if built_family != have_family:  # another kind of tower altogether: its components mean something else
        raise ClipTermError(
            f"cache {reader.name} was built with a {built_family} image tower ({built.get('arch')}), and "
            f"{have.get('arch')} is a {have_family} one: its components are not this cache's",
            hint=hint,
            code=ExitCode.INVALID_DATA,
        )
    if built.get("weights_sha256") != have.get("weights_sha256"):
        raise ClipTermError(
            f"cache {reader.name} was built with other weights ({built.get('arch')} {built.get('pretrained') or ''}, "
            f"sha256 {str(built.get('weights_sha256'))[:12]}) than {have.get('arch')} (sha256 {str(have.get('weights_sha256'))[:12]})",
            hint=hint,
            code=ExitCode.INVALID_DATA,
        )
    if built.get("quick_gelu") is not None and bool(built["quick_gelu"]) != bool(have.get("quick_gelu")):
        built_act, have_act = ("QuickGELU", "GELU") if built["quick_gelu"] else ("GELU", "QuickGELU")
        raise ClipTermError(
            f"cache {reader.name} was built with the {built_act} model of these weights, and {have.get('arch')} is "
            f"the {have_act} one: every effect would differ",
            hint=f"pass --{'' if built['quick_gelu'] else 'no-'}quick-gelu, or leave --model out to use the cache's own",
            code=ExitCode.INVALID_DATA,
        )


def _family(model: dict) -> str:
    """A model's tower family, from its ModelInfo JSON; manifests from before families were recorded give theirs
    from `tower` (a ResNet, else an open_clip class-token ViT)."""
    if model.get("family"):
        return model["family"]
    return "open_clip ModifiedResNet (attention pool)" if model.get("tower") == "resnet" else "open_clip VisionTransformer (class token)"


def model_for_cache(reader: Any, device: str = "cpu", model: str | None = None, pretrained: str | None = None,
                    quick_gelu: bool | None = None) -> Any:
    """Load the model a cache was built with (its activation too), or `model` (+ `pretrained`, `quick_gelu`); the
    weights are checked against the manifest, so another model is refused with a hint."""
    from clipterm.vit.models import load_model

    built = reader.manifest["model"]
    if model is None:
        loaded = load_model(built["spec"], built.get("pretrained"), device=device, quick_gelu=built.get("quick_gelu"),
                            quick_gelu_source=f"cache {reader.name}'s manifest")
    else:
        loaded = load_model(model, pretrained, device=device, quick_gelu=quick_gelu)
    check_model(reader, loaded.info)
    return loaded


class CacheReader:
    """Lazy, mmap-backed access to one cache. Tensors come back on the CPU; effects in fp32."""

    def __init__(self, directory: str | os.PathLike, allow_incomplete: bool = False):
        self.path = Path(directory)
        manifest = read_manifest(self.path)
        if manifest is None:
            raise ClipTermError(f"{self.path} is not a cache (no {MANIFEST})", hint="build one with `clipterm cache build`",
                                code=ExitCode.NOT_FOUND)
        if not manifest["complete"] and not allow_incomplete:
            if CacheLock.held(self.path):
                raise ClipTermError(f"cache {self.path.name} is still being built (a build holds its lock)",
                                    hint="wait for the build to finish, then run this again", code=ExitCode.BUSY)
            raise ClipTermError(f"cache {self.path.name} is incomplete (its build was stopped)",
                                hint="rerun the same `clipterm cache build` command to resume it", code=ExitCode.INVALID_DATA)
        self.manifest: dict[str, Any] = manifest
        self._handles: dict[str, Any] = {}
        self._maps: dict[tuple[str, str], Any] = {}
        self._verifier = Verifier(self.path, self.name)

    # ----------------------------------------------------------------- what is in it

    @property
    def name(self) -> str:
        return self.path.name

    def checked(self, name: str, layout: Layout | None = None, required: tuple[str, ...] | None = None,
                record: dict | None = None) -> Path:
        """The path of one of the cache's files, after checking it against the manifest (`clipterm.cache.integrity`)."""
        if record is not None:
            sha, size = record.get("sha256"), record.get("bytes")
        else:
            sha, size = self.manifest.get("files", {}).get(name), None
        return self._verifier.check(name, sha=sha, size=size, layout=layout, required=required)

    @property
    def n(self) -> int:
        """Rows stored: inputs minus skipped ones."""
        return sum(r["rows"] for r in self.manifest["shards"])

    @property
    def shape(self) -> names.ModelShape:
        s = self.manifest["shape"]
        return names.ModelShape(s["layers"], s["heads"], s["mlp_width"], s.get("tower", "vit"), s.get("pool_layer"),
                                s.get("neuron_layer"), pool_heads=s.get("pool_heads", 0), pool_mlp=bool(s.get("pool_mlp")),
                                stage=s.get("stage"))

    @cached_property
    def tower(self) -> Tower:
        """The tower family's units and names (`clipterm.towers`), for this cache's shape."""
        return tower_for(self.shape)

    @property
    def joint_heads(self) -> bool:
        """True when heads are stored as joint-space effects (a tower with an attention pool): readout is I."""
        return self.manifest["shape"].get("head_space") == "joint"

    def components(self) -> list[str]:
        """Every top-level component whose `effects` add up to `image_embeds`, for any tower.

        ViT: embed, bias, every L{l}.H{h} and L{l}.MLP (and pool.MLP after a MAP head). ResNet: pool.pos, pool.bias
        and every pool.H{h}. ConvNeXt: embed, bias and every block S{s}.B{k} of the last stage."""
        return [str(c) for c in self.tower.direct_components()]

    def pool_components(self) -> list[str]:
        """A tower with an attention pool after its blocks: pool.H*, pool.bias (and pool.MLP), which also add up to
        `image_embeds` (the pool's own split; empty for other towers)."""
        return [str(c) for c in self.tower.pool_components()]

    @property
    def tasks(self) -> dict[str, list[str]]:
        """Label tasks and their class names."""
        return self.manifest["dataset"]["tasks"]

    @property
    def info(self) -> dict[str, Any]:
        """A summary for `cache info` and `cache ls`."""
        m = self.manifest
        size = sum(p.stat().st_size for p in self.path.iterdir() if p.is_file())
        return {
            "name": self.name, "path": str(self.path), "complete": m["complete"], "created": m["created"],
            "model": {k: m["model"].get(k) for k in ("spec", "arch", "pretrained", "weights_sha256")},
            "inputs": m["dataset"]["n"], "images": self.n, "skipped": len(m.get("skipped", [])),
            "source": m["dataset"]["source"], "tasks": {t: len(c) for t, c in self.tasks.items()},
            "dtype": m["dtype"], "stored": m["stored"], "convention": m["convention"],
            "shards": len(m["shards"]), "bytes": size, "bytes_per_row": round(size / max(self.n, 1)),
        }

    # ----------------------------------------------------------------- components

    def effects(self, name: str, rows: Sequence[int] | None = None) -> Any:
        """Direct effect of a component on the image embedding, (N, D) fp32 in joint space.

        `embed`, `bias`, `L{l}.H{h}`, `L{l}.MLP`, or `L{l}` (all heads of the layer plus its MLP).
        """
        import torch

        comp = self.tower.validate(names.parse(name)).base
        if comp.site == "pool" and self.shape.pool_heads:
            return self._pool_effects(comp, rows)
        if comp.site == "stage":  # a ConvNeXt block is stored as an MLP; the stage is all of them
            if comp.kind == "mlp":
                return self._gather(lambda f: f.get_slice("mlps")[comp.layer], rows).float()  # (N, D)
            return self._gather(lambda f: f.get_tensor("mlps").float().sum(0), rows)  # (N, D)
        if comp.kind in ("embed", "bias"):
            return self._gather(lambda f: f.get_tensor(comp.kind), rows).float()
        if comp.kind == "mlp":
            return self._gather(lambda f: f.get_slice("mlps")[comp.layer], rows).float()  # (N, D)
        if comp.kind == "head" and self.joint_heads:
            return self.head_out((comp.layer, comp.index), rows).float()  # (N, D): stored in joint space
        if comp.kind == "head":
            return self.head_out((comp.layer, comp.index), rows).float() @ self.readout[comp.layer, comp.index]  # (N, D)
        if comp.kind == "layer" and comp.site == "block" and self.shape.tower == "resnet":
            raise ClipTermError(f"{name} is a stage: its channels are neurons, with no stored direct effect",
                                hint=f"{self.tower.vocabulary}; `pool` is all the pool's heads")
        if comp.kind == "layer":
            head_out = self._gather(lambda f: f.get_slice("head_out")[comp.layer].transpose(0, 1), rows)  # (N, H, dh)
            if self.joint_heads:
                heads = head_out.float().sum(1)  # (N, D)
            else:
                heads = torch.einsum("nhd,hde->ne", head_out.float(), self.readout[comp.layer])  # (N, D)
            return heads if comp.site == "pool" else heads + self.effects(names.mlp(comp.layer), rows)
        raise ClipTermError(f"{name} has no stored direct effect", hint="neurons have second-order effects: see `clipterm neurons`")

    def _pool_effects(self, comp: names.Component, rows: Sequence[int] | None) -> Any:
        """pool.H{g}, pool (all pool heads), pool.bias and pool.MLP of a tower with an attention pool, (N, D) fp32."""
        import torch

        if comp.kind == "mlp":
            return self._gather(lambda f: f.get_slice("mlps")[comp.layer], rows).float()  # (N, D): the last slot
        if comp.kind == "bias":
            return self._gather(lambda f: f.get_tensor("pool_bias"), rows).float()  # (N, D)
        if comp.kind == "head":
            return self.head_out(str(comp), rows).float() @ self.pool_readout[comp.index]  # (N, D)
        pooled = self._gather(lambda f: f.get_tensor("pool_heads").transpose(0, 1), rows)  # (N, G, dh')
        return torch.einsum("ngd,gde->ne", pooled.float(), self.pool_readout)  # (N, D)

    def head_out(self, head: str | tuple[int, int], rows: Sequence[int] | None = None) -> Any:
        """A head's output in head space (CLS attention output / ln_post σ), (N, dh) in the cache dtype.

        A tower with an attention pool stores its block heads' joint-space effects (N, D) here, and `pool.H{g}`
        gives the pool's heads in head space (N, dh')."""
        site = "pool" if self.shape.tower == "resnet" else "block"  # (layer, head) pairs index the stored tensors
        comp = names.parse(head) if isinstance(head, str) else names.Component("head", head[0], head[1], site=site)
        if comp.kind != "head":
            raise ClipTermError(f"{head} is not a head", hint="heads look like L10.H3 (pool.H3 for a ResNet)")
        comp = self.tower.validate(comp)
        if comp.site == "pool" and self.shape.pool_heads:
            return self._gather(lambda f: f.get_slice("pool_heads")[comp.index], rows)  # (N, dh')
        return self._gather(lambda f: f.get_slice("head_out")[comp.layer, comp.index], rows)

    @cached_property
    def readout(self) -> Any:
        """(L, H, dh, D) fp32: head space -> joint space (for joint-space heads, the identity, as a broadcast view)."""
        from safetensors.torch import load_file

        heads = load_file(str(self.checked(READOUT, readout_layout(self.manifest))))["heads"]
        if self.joint_heads:
            s = self.manifest["shape"]
            return heads.expand(s["layers"], s["heads"], -1, -1)  # (L, H, D, D), no copy
        return heads

    @cached_property
    def pool_readout(self) -> Any:
        """(G, dh', D) fp32: an attention pool's heads, head space -> joint space."""
        from safetensors.torch import load_file

        if not self.shape.pool_heads:
            raise ClipTermError(f"cache {self.name} has no attention pool after its blocks", hint=self.tower.vocabulary)
        return load_file(str(self.checked(READOUT, readout_layout(self.manifest))))["pool"]

    def image_embeds(self, rows: Sequence[int] | None = None) -> Any:
        """(N, D) fp32: the model's own `encode_image` output."""
        return self._gather(lambda f: f.get_tensor("image_embeds"), rows)

    def ln_scale(self, rows: Sequence[int] | None = None) -> Any:
        return self._gather(lambda f: f.get_tensor("ln_scale"), rows)

    def index(self) -> Any:
        """(N,) int64: each row's line in images.jsonl."""
        return self._gather(lambda f: f.get_tensor("index"), None)

    def labels(self, task: str, rows: Sequence[int] | None = None) -> Any:
        """(N,) int64 class per row, -1 where unknown; class names are `tasks[task]`."""
        if task not in self.tasks:
            raise ClipTermError(f"cache {self.name} has no labels for {task!r}",
                                hint=f"tasks: {', '.join(self.tasks) or 'none (the images had no classes)'}")
        return self._gather(lambda f: f.get_tensor(f"labels.{task}"), rows)

    def neurons(self, layer: int | str, rows: Sequence[int] | None = None) -> Any:
        """(N, M) CLS post-activation MLP values of one layer, when built with `--neurons`."""
        layer = self._layer(layer)
        if not self.manifest["stored"]["neurons"]:
            raise ClipTermError(f"cache {self.name} holds no neuron activations", hint="rebuild it with `--neurons`")
        slot = 0 if self.shape.tower == "resnet" else layer  # a ResNet stores its last stage's channel means only
        return self._gather(lambda f: f.get_slice("neurons")[slot], rows)

    def sae_activations(self, layer: int | str) -> Any:
        """(N, F) fp32: per image, each SAE feature's maximum over its tokens (`sae.L4.safetensors`)."""
        from clipterm.sae.store import SaeFile
        from clipterm.sae.train import layer_of

        return SaeFile(self, layer if isinstance(layer, int) else layer_of(layer)).image_max

    def tokens(self, layer: int | str, rows: Sequence[int] | None = None) -> Any:
        """(H, N, T, dh) per-source-token head outputs of one layer, in head space, when built with `--tokens`."""
        import torch

        pooled = self.shape.tower == "resnet" and layer in (self.shape.pool_layer, names.pool())  # stored at its slot, L0
        layer = self.shape.pool_layer if pooled else self._layer(layer)
        stored = self.manifest["stored"]["tokens"]
        if layer not in stored:
            have = names.format_layers(stored) if stored else "none"
            raise ClipTermError(f"cache {self.name} holds no tokens for {names.layer(layer)} (it has {have})", hint="rebuild it with `--tokens L8-11`")
        # (n, H, T, dh); with rows, only the span of rows each shard needs is read, not the shard's whole tensor
        parts = self._per_shard(lambda f: f.get_tensor(f"tokens.{names.layer(layer)}").transpose(0, 1), rows,
                                span=lambda f, lo, hi: f.get_slice(f"tokens.{names.layer(layer)}")[:, lo:hi].transpose(0, 1))
        return torch.cat(parts).transpose(0, 1)

    def stats(self, name: str | None = None) -> dict[str, Any]:
        """fp64 sufficient statistics. No name: every tensor of stats.safetensors. A head: count, mean, sum,
        outer and cov in head space; an MLP: the same in joint space; embed / bias: count, sum, mean."""
        from safetensors.torch import load_file

        path = self.checked(STATS, stats_layout(self.manifest))
        if name is None:
            return load_file(str(path))
        comp = self.tower.validate(names.parse(name)).base
        with _open(path) as f:
            count = f.get_tensor("count")
            if comp.kind == "head" and comp.site == "pool" and self.shape.pool_heads:
                total = f.get_slice("pool_heads.sum")[comp.index]
                outer = f.get_slice("pool_heads.outer")[comp.index]
            elif comp.kind == "head" and self.joint_heads:  # (D, D) outer products are formed on demand, not stored
                total = f.get_slice("heads.sum")[comp.layer, comp.index]
                outer = self._outer(lambda g: g.get_slice("head_out")[comp.layer, comp.index])
            elif comp.kind == "head":
                total = f.get_slice("heads.sum")[comp.layer, comp.index]
                outer = f.get_slice("heads.outer")[comp.layer, comp.index]
            elif comp.site == "pool" and comp.kind == "bias" and self.shape.pool_heads:
                total = f.get_tensor("pool_bias.sum")
                return {"count": count, "sum": total, "mean": total / count}
            elif comp.kind == "mlp":
                total, outer = f.get_slice("mlps.sum")[comp.layer], f.get_slice("mlps.outer")[comp.layer]
            elif comp.kind in ("embed", "bias"):
                total = f.get_tensor(f"{comp.kind}.sum")
                return {"count": count, "sum": total, "mean": total / count}
            else:
                raise ClipTermError(f"no statistics for {name}", hint="stats exist for embed, bias, heads and MLPs")
        mean = total / count
        return {"count": count, "sum": total, "outer": outer, "mean": mean, "cov": outer / count - mean[:, None] * mean[None, :]}

    def _outer(self, read: Any) -> Any:
        """Σ xᵀx in fp64 over every stored row of one (n, k) block per shard, read one shard at a time."""
        outer = None
        for record in self.manifest["shards"]:
            rows = read(self._handle(record)).double()  # (n, k)
            part = rows.T @ rows  # (k, k)
            outer = part if outer is None else outer + part
        return outer

    def images(self) -> list[dict[str, Any]]:
        """One dict per input (images.jsonl): index, path or id, labels, skipped (and reason)."""
        path = self.checked(IMAGES)
        try:
            with open(path, encoding="utf-8") as f:
                rows = [json.loads(line) for line in f if line.strip()]
        except (OSError, ValueError) as exc:  # a file the manifest has no hash for (an incomplete build's)
            raise self._verifier.damaged(IMAGES, f"unreadable: {str(exc)[:80]}") from None
        if not all(isinstance(row, dict) and isinstance(row.get("index"), int) for row in rows):
            raise self._verifier.damaged(IMAGES, "a line is not an input record")
        return rows

    # ----------------------------------------------------------------- streaming

    def row_chunks(self, rows: int = 16384) -> list[tuple[int, int]]:
        """Row ranges [lo, hi) of whole shards, about `rows` at a time: the steps of a streaming pass."""
        chunks, lo, hi = [], 0, 0
        for record in self.manifest["shards"]:
            if hi > lo and hi - lo + record["rows"] > rows:
                chunks.append((lo, hi))
                lo = hi
            hi += record["rows"]
        if hi > lo:
            chunks.append((lo, hi))
        return chunks

    def gather(self, tensor: str, index: tuple[int, ...], rows: Any) -> Any:
        """Cache rows `rows` (ascending positions 0..N-1) of one stored block `tensor[index]` (`head_out`, (l, h): (n, dh);
        `head_out`, (l,): (H, n, dh); `mlps`, (l,): (n, D); `image_embeds`, (): (n, D)), in the cache dtype. Read
        through a memory map, so only the pages holding those rows are touched (a sample of a big cache)."""
        import numpy as np
        import torch

        rows = torch.as_tensor(rows, dtype=torch.long)
        axis = row_axis(tensor) - len(index)
        shards = self.manifest["shards"]
        bounds = torch.searchsorted(rows, torch.tensor(self._starts)).tolist()  # (shards + 1,) into `rows`
        wanted = [k for k in range(len(shards)) if bounds[k + 1] > bounds[k]] or [len(shards) - 1]  # [] : one empty part
        parts = []
        for k in wanted:
            values = self._memmap(shards[k], tensor)
            self._handle(shards[k]).blocks.check(tensor, index)
            values = values[index] if index else values
            local = (rows[bounds[k]:bounds[k + 1]] - self._starts[k]).numpy()
            parts.append(torch.from_numpy(np.take(values, local, axis=axis)))
            if 8 * len(local) > shards[k]["rows"]:  # a streaming pass; a sample's sparse pages stay (re-faulting
                _release(self._maps[(shards[k]["file"], tensor)], index)  # them cost a TUI visit 3x at 200k)
        return torch.cat(parts, dim=axis) if len(parts) > 1 else parts[0]

    @cached_property
    def _starts(self) -> list[int]:
        """The first row of each shard, and N last."""
        starts = [0]
        for record in self.manifest["shards"]:
            starts.append(starts[-1] + record["rows"])
        return starts

    def image_records(self, indices: Sequence[int]) -> dict[int, dict[str, Any]]:
        """images.jsonl's records of some inputs, by index: only their lines are parsed (line i holds input i)."""
        wanted = set(indices)
        try:
            text, ends = self._image_lines
            found = {i: json.loads(bytes(text[(ends[i - 1] + 1 if i else 0):ends[i]])) for i in wanted if 0 <= i < len(ends)}
        except (OSError, ValueError):
            found = {}
        if len(found) == len(wanted) and all(isinstance(r, dict) and r.get("index") == i for i, r in found.items()):
            return found
        return {row["index"]: row for row in self.images() if row["index"] in wanted}  # not one line per input

    @cached_property
    def _image_lines(self) -> tuple[Any, Any]:
        """images.jsonl mapped (uint8) and the position of each of its newlines: a line's bytes without parsing the rest."""
        import numpy as np

        path = self.checked(IMAGES)
        text = np.memmap(path, dtype=np.uint8, mode="r") if path.stat().st_size else np.zeros(0, np.uint8)
        return text, np.flatnonzero(text == 10)

    # ----------------------------------------------------------------- plumbing

    def _memmap(self, record: dict, tensor: str) -> Any:
        """A read-only numpy memory map of one tensor of a shard (checked like `_handle`), from its safetensors header.
        The first call maps that tensor in every shard: a streaming pass then allocates nothing small between its big
        temporaries (a few hundred small objects made shard by shard pinned the heap, +1 GB over 200k rows)."""
        import numpy as np

        if (record["file"], tensor) not in self._maps:
            for shard in self.manifest["shards"]:
                self._handle(shard)  # the shard's checks
                path = self.path / shard["file"]
                with open(path, "rb") as f:
                    size = int.from_bytes(f.read(8), "little")
                    entry = json.loads(f.read(size))[tensor]
                dtype = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I64": np.int64}[entry["dtype"]]
                self._maps[(shard["file"], tensor)] = np.memmap(path, dtype=dtype, mode="r", shape=tuple(entry["shape"]),
                                                                offset=8 + size + entry["data_offsets"][0])
        return self._maps[(record["file"], tensor)]

    def _layer(self, layer: int | str) -> int:
        if isinstance(layer, str):
            comp = names.parse(layer)
            if comp.kind != "layer":
                raise ClipTermError(f"{layer} is not a layer", hint="layers look like L9")
            layer = comp.layer
        return self.tower.validate(names.Component("layer", layer)).layer

    def _handle(self, record: dict) -> Any:
        if record["file"] not in self._handles:
            path = self.checked(record["file"], shard_layout(self.manifest, record["rows"]), record=record)
            try:
                handle = _open(path)
                rows = handle.get_slice("index").get_shape()[0]
                header = safetensors_header(path)
            except Exception as exc:
                raise ClipTermError(f"cannot read shard {record['file']} of {self.name}: {str(exc)[:160]}",
                                    hint=f"run `clipterm cache verify {self.name}`", code=ExitCode.INVALID_DATA) from None
            if rows != record["rows"]:
                raise ClipTermError(f"shard {record['file']} holds {rows} rows, the manifest says {record['rows']}",
                                    hint=f"run `clipterm cache verify {self.name}`", code=ExitCode.INVALID_DATA)
            damaged = lambda what, name=record["file"]: self._verifier.damaged(name, what)  # noqa: E731
            self._handles[record["file"]] = CheckedHandle(handle, ShardBlocks(path, header, damaged))
        return self._handles[record["file"]]

    def _per_shard(self, read: Any, rows: Sequence[int] | None, span: Any = None) -> list[Any]:
        """`read(handle)` for each shard (rows first), restricted to `rows` (positions 0..N-1, any order) when given.

        `span(handle, lo, hi)`, when given, reads only a shard's rows lo..hi-1: for tensors too big to read whole."""
        import torch

        if rows is None:
            return [read(self._handle(record)) for record in self.manifest["shards"]]
        wanted, order = torch.sort(torch.as_tensor(rows, dtype=torch.long).reshape(-1))
        if wanted.numel() and (wanted[0] < 0 or wanted[-1] >= self.n):
            raise ClipTermError(f"row out of range for cache {self.name} (it has {self.n} rows)")
        parts, offset = [], 0
        for record in self.manifest["shards"]:
            lo, hi = offset, offset + record["rows"]
            offset = hi
            mine = wanted[(wanted >= lo) & (wanted < hi)] - lo
            if mine.numel() and span is not None:
                lo_row, hi_row = int(mine[0]), int(mine[-1]) + 1  # `mine` is sorted
                parts.append(span(self._handle(record), lo_row, hi_row)[mine - lo_row])
            elif mine.numel():
                parts.append(read(self._handle(record))[mine])
        if not parts:
            return [read(self._handle(self.manifest["shards"][0]))[:0]]
        return [torch.cat(parts)[torch.argsort(order)]]  # back to the caller's order

    def _gather(self, read: Any, rows: Sequence[int] | None) -> Any:
        import torch

        return torch.cat(self._per_shard(read, rows))


def _release(mapped: Any, index: tuple[int, ...]) -> None:
    """Drop the pages of `mapped[index]` (one block of a memory-mapped tensor) from this process; they stay in the page
    cache. A streaming pass over a big cache then holds one chunk, not every page it read, and its resident memory says
    what it really keeps."""
    import mmap

    block = mapped[index] if index else mapped
    start = mapped.offset % mmap.ALLOCATIONGRANULARITY + (block.ctypes.data - mapped.ctypes.data)  # into the mmap
    first = start - start % mmap.PAGESIZE
    try:
        mapped._mmap.madvise(mmap.MADV_DONTNEED, first, start + block.nbytes - first)
    except (AttributeError, OSError, ValueError):  # no madvise here: the pages stay mapped, and reclaimable
        pass



def _open(path: Path) -> Any:
    from safetensors import safe_open

    return safe_open(str(path), framework="pt")
