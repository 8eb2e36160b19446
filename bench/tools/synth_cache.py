"""A valid clipterm cache of any model's shape, with random values, written without running a model.

The read side (info, verify, TextSpan, ablation, top images, the TUI) is measured at scale on these:
hours of forward passes are not needed to know how fast 200,000 rows of a ViT-L-14 can be read.
The cache goes through the same store API as a real build (`new_manifest`, `prepare`, `write_shard`,
`partial_stats` / `add_stats`, `finish`; the readout through `files.save_tensors`), so `clipterm cache
verify` passes on it and its statistics are those of the values stored.

Values are random but keep the cache's contract: `image_embeds` is the exact sum of the components
(`embed + bias + Σ head_out @ readout + Σ mlps`), and stored tokens sum over T to `head_out`.
With `weights` (a file of random open_clip weights, written once by `random_weights`), the manifest
names that model and its readout, so every analysis that loads the model (TextSpan, ablation with
class names, the TUI) runs on the cache; without, the model entry is a shape only. Rows carry the
ids of toy-world scenes (`toy:SEED/INDEX`), so panes that show images have something to show.

    python -m bench.tools.synth_cache /work/scale/b16-10k --arch ViT-B-16 --n 10000 [--labels 1000] [--neurons]
        [--tokens L11] [--weights /work/scale/weights/ViT-B-16.safetensors]
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path
from typing import Any

from clipterm import files, names
from clipterm.cache import store


def arch_shape(arch: str) -> dict[str, Any]:
    """The vision tower's shape of an open_clip arch, from its config alone (nothing is instantiated)."""
    import open_clip

    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise SystemExit(f"unknown open_clip arch {arch!r}")
    vision = cfg["vision_cfg"]
    width, head_width = vision["width"], vision.get("head_width", 64)
    image_size, patch = vision["image_size"], vision["patch_size"]
    grid = image_size // patch
    return {"layers": vision["layers"], "heads": width // head_width, "head_dim": head_width, "width": width,
            "embed_dim": cfg["embed_dim"], "mlp_width": int(width * vision.get("mlp_ratio", 4.0)),
            "tokens": grid * grid + 1, "image_size": image_size, "patch_size": patch}


def random_weights(arch: str, path: Path, seed: int = 0) -> Path:
    """Write randomly initialised open_clip weights for `arch` to `path` once (fp16); reused when present."""
    path = Path(path)
    if path.is_file():
        return path
    import open_clip
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = open_clip.create_model(arch, pretrained=None)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().half().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.rename(path)
    return path


def synth_cache(directory: str | Path, arch: str = "ViT-B-16", n: int = 10_000, labels: int = 0, neurons: bool = False,
                tokens: list[int] | None = None, dtype: str = "float16", shard_rows: int = 1024, seed: int = 0,
                weights: str | Path | None = None, class_names: list[str] | None = None,
                progress: bool = False) -> Path:
    """Write a complete cache of `n` random rows shaped like `arch`'s vision tower into `directory`; return it.

    `labels`: classes of a `class` task (0: no labels); `class_names` overrides their names. `tokens`:
    layers whose per-token head outputs are stored. `weights`: random weights of `arch` (see `random_weights`)
    to name in the manifest and take the readout from.
    """
    import torch

    directory = Path(directory)
    tokens = sorted(tokens or [])
    generator = torch.Generator().manual_seed(seed)
    if weights is not None or arch == "toy":
        from clipterm.vit import decompose
        from clipterm.vit.models import load_model

        loaded = load_model(arch, None if arch == "toy" else str(weights))
        model_entry = loaded.info.to_json()
        readout = decompose.readout(loaded.model).float()  # (L, H, dh, D)
        info = loaded.info
        del loaded
        grid = info.image_size // info.patch_size
        s = {"layers": info.layers, "heads": info.heads, "head_dim": info.head_dim, "width": info.width,
             "embed_dim": info.embed_dim, "mlp_width": info.mlp_width, "tokens": grid * grid + 1}
    else:
        s = arch_shape(arch)
        model_entry = {"spec": arch, "arch": arch, "pretrained": None, "layers": s["layers"], "heads": s["heads"],
                       "width": s["width"], "head_dim": s["head_dim"], "mlp_width": s["mlp_width"],
                       "embed_dim": s["embed_dim"], "image_size": s["image_size"], "patch_size": s["patch_size"],
                       "context_length": 77, "quick_gelu": False, "weights_path": None, "weights_sha256": None}
        readout = torch.randn(s["layers"], s["heads"], s["head_dim"], s["embed_dim"], generator=generator)  # (L, H, dh, D)
        readout /= s["head_dim"] ** 0.5
    L, H, dh, D, M, T = s["layers"], s["heads"], s["head_dim"], s["embed_dim"], s["mlp_width"], s["tokens"]
    shape = {k: s[k] for k in ("layers", "heads", "head_dim", "width", "embed_dim", "mlp_width", "tokens")}
    classes = class_names or [f"class {i:0{len(str(max(labels - 1, 0)))}d}" for i in range(labels)]
    if class_names is not None:
        labels = len(class_names)
    tasks = {"class": classes} if labels else {}
    fingerprint = hashlib.sha256(f"synthetic\n{arch}\n{n}\n{seed}\n{labels}\n".encode()).hexdigest()
    dataset = {"source": f"synthetic:{arch}:{n}@{seed}", "kind": "synthetic", "root": None, "seed": seed, "n": n,
               "tasks": tasks, "fingerprint": fingerprint}
    manifest = store.new_manifest(model=model_entry, convention="synthetic (random values; the contract holds)",
                                  dataset=dataset, dtype=dtype, stored={"neurons": neurons, "tokens": tokens},
                                  shape=shape, shard_rows=shard_rows)
    store_dtype = getattr(torch, dtype)
    flat_readout = readout.reshape(L * H * dh, D)  # (L·H·dh, D)
    started = time.perf_counter()
    with store.CacheLock(directory):
        manifest = store.prepare(directory, manifest, force=True)
        files.save_tensors(directory / store.READOUT, {"heads": readout.contiguous()})
        records, stats, row_labels = [], None, []
        for chunk in range(manifest["chunks"]):
            start, stop = chunk * shard_rows, min((chunk + 1) * shard_rows, n)
            rows = stop - start
            tensors = _random_shard(generator, rows, L, H, dh, D, M, T, neurons, tokens, store_dtype)
            heads = tensors["head_out"].permute(2, 0, 1, 3).reshape(rows, L * H * dh).float() @ flat_readout  # (n, D)
            total = (tensors["embed"].float() + tensors["bias"].float() + heads
                     + tensors["mlps"].float().sum(0))  # (n, D)
            tensors["image_embeds"] = total.contiguous()  # (n, D) fp32: the contract, exactly
            tensors["index"] = torch.arange(start, stop, dtype=torch.long)  # (n,)
            if labels:
                tensors["labels.class"] = torch.randint(0, labels, (rows,), generator=generator)  # (n,)
                row_labels += tensors["labels.class"].tolist()
            stats = store.add_stats(stats, store.partial_stats(tensors))
            records.append(store.write_shard(directory, chunk, tensors, start, stop, []))
            if progress:
                done = stop / n
                print(f"\r{directory.name}: {stop}/{n} rows ({done:.0%}, {time.perf_counter() - started:.0f} s)",
                      end="", file=sys.stderr, flush=True)
        images = [{"index": i, "id": f"toy:{seed}/{i}", "labels": {"class": label} if labels else {}}
                  for i, label in enumerate(row_labels if labels else [None] * n)]
        store.finish(directory, manifest, records, stats, images)
    if progress:
        print(file=sys.stderr)
    return directory


def _random_shard(generator: Any, rows: int, L: int, H: int, dh: int, D: int, M: int, T: int, neurons: bool,
                  tokens: list[int], store_dtype: Any) -> dict[str, Any]:
    """Component-major random tensors of one shard, in the storage dtype (`store.shard_tensors`' layout)."""
    import torch

    def randn(*size: int, scale: float = 1.0) -> Any:
        return (torch.randn(*size, generator=generator) * scale).to(store_dtype)

    head_out = randn(L, H, rows, dh, scale=0.1)  # (L, H, n, dh)
    tensors: dict[str, Any] = {}
    for layer in tokens:
        per_token = randn(H, rows, T, dh, scale=0.1 / T ** 0.5)  # (H, n, T, dh)
        tensors[f"tokens.{names.layer(layer)}"] = per_token.contiguous()
        head_out[layer] = per_token.float().sum(2).to(store_dtype)  # (H, n, dh): tokens sum to head_out
    tensors.update({
        "head_out": head_out.contiguous(),  # (L, H, n, dh)
        "mlps": randn(L, rows, D, scale=0.05),  # (L, n, D)
        "embed": randn(rows, D, scale=0.1),  # (n, D)
        "bias": randn(rows, D, scale=0.01),  # (n, D)
        "ln_scale": (1.0 + 0.1 * torch.rand(rows, generator=generator)).float(),  # (n,)
    })
    if neurons:
        tensors["neurons"] = torch.nn.functional.gelu(torch.randn(L, rows, M, generator=generator)).to(store_dtype)  # (L, n, M)
    return tensors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path, help="the cache folder to write (outside the repository)")
    parser.add_argument("--arch", default="ViT-B-16", help="an open_clip arch (ViT-B-16, ViT-L-14, ViT-H-14, ...) or toy")
    parser.add_argument("--n", type=int, default=10_000, help="rows")
    parser.add_argument("--labels", type=int, default=0, help="classes of a `class` task (0: none)")
    parser.add_argument("--neurons", action="store_true", help="also store neuron activations")
    parser.add_argument("--tokens", default=None, help="layers whose per-token head outputs are stored, e.g. L11")
    parser.add_argument("--dtype", default="float16", choices=store.DTYPES)
    parser.add_argument("--shard-rows", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weights", type=Path, default=None,
                        help="random weights of --arch to name in the manifest (written there first when missing)")
    args = parser.parse_args()
    layers = 6 if args.arch == "toy" else arch_shape(args.arch)["layers"]
    tokens = names.parse_layers(args.tokens, layers) if args.tokens else []
    weights = random_weights(args.arch, args.weights, args.seed) if args.weights else None
    started = time.perf_counter()
    path = synth_cache(args.directory, args.arch, args.n, args.labels, args.neurons, tokens, args.dtype,
                       args.shard_rows, args.seed, weights, progress=True)
    size = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    print(f"{path}: {args.n} rows of {args.arch}, {size / 1e9:.2f} GB ({size / args.n / 1e3:.1f} kB per row), "
          f"{time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
