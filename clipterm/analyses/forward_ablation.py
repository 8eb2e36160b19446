"""Mean-ablation through the real forward pass (`clipterm ablate --forward`).

Direct ablation (clipterm.ablation) swaps a component's direct effect on the image embedding
for its mean. Here the model itself runs with forward hooks that replace the component's
output, at every token position, by its dataset mean for that position, so later layers see
the change too: the result includes indirect effects. A head's output is its attention
output `z_h @ W_O^h` (recomputed from the block's normed input with the model's own weights);
an MLP's output is the block's `mlp` module output. Means come from one pass over the images.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from clipterm import names
from clipterm.errors import ClipTermError, ExitCode
from clipterm.towers import tower_for

# Preprocessed images, then residual streams, are kept between passes while they take at most this many bytes
# together; beyond it every pass streams from the pixels again, so memory does not grow with the number of images.
KEEP_IN_MEMORY = 128 << 20


def parts(component: str, shape: names.ModelShape) -> dict[int, tuple[list[int], bool]]:
    """Layer -> (heads replaced, MLP replaced) for a head, an MLP, a layer, or a layer set like `L0-3`."""
    if "-" in component or "," in component:
        return {layer: (list(range(shape.heads)), True) for layer in names.parse_layers(component, shape.layers)}
    comp = tower_for(shape).parse(component)
    if comp.kind == "head":
        return {comp.layer: ([comp.index], False)}
    if comp.kind == "mlp":
        return {comp.layer: ([], True)}
    if comp.kind == "layer":
        return {comp.layer: (list(range(shape.heads)), True)}
    raise ClipTermError(f"--forward ablates heads, MLPs and layers, not {component}")


def _head_outputs(attn: Any, normed: torch.Tensor) -> torch.Tensor:
    """Each head's attention output before out_proj, (B, H, T, dh), with head_scale applied."""
    from clipterm.vit.decompose import attention_qkv

    q, k, v, scale = attention_qkv(attn, normed)  # (B, H, T, dh) each
    heads = F.scaled_dot_product_attention(q, k, v, scale=scale)  # (B, H, T, dh)
    head_scale = getattr(attn, "head_scale", None)
    return heads * head_scale if head_scale is not None else heads


def _out_proj_per_head(attn: Any) -> torch.Tensor:
    """W_O split by head: (H, dh, W), so that head h adds `z_h @ result[h]`."""
    width = attn.out_proj.weight.shape[0]
    return attn.out_proj.weight.T.reshape(attn.num_heads, width // attn.num_heads, width)


def _replace_output(output: Any, delta: torch.Tensor) -> Any:
    """Add `delta` to an attention module's output: nn.MultiheadAttention returns a tuple, open_clip's a tensor."""
    if isinstance(output, tuple):
        return (output[0] + delta.to(output[0].dtype), *output[1:])
    return output + delta.to(output.dtype)


@contextmanager
def _hooks(blocks: Any, plan: dict[int, tuple[list[int], bool]], means: dict[int, dict[str, torch.Tensor]]) -> Iterator[None]:
    handles = []
    for layer, (heads, mlp) in plan.items():
        block = blocks[layer]
        if heads:
            def attn_hook(module, args, output, heads=heads, mean=means[layer]["heads"]):
                z = _head_outputs(module, args[0])[:, heads]  # (B, h, T, dh)
                w_out = _out_proj_per_head(module)[heads]  # (h, dh, W)
                delta = torch.einsum("bhtd,hdw->btw", mean[heads].to(z) - z, w_out)  # (B, T, W)
                return _replace_output(output, delta)
            handles.append(block.attn.register_forward_hook(attn_hook))
        if mlp:
            def mlp_hook(module, args, output, mean=means[layer]["mlp"]):
                return mean.to(output).expand_as(output)  # (B, T, W)
            handles.append(block.mlp.register_forward_hook(mlp_hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _image_batches(reader: Any, loaded: Any, batch_size: int, budget: int) -> tuple[Callable[[], Iterator[torch.Tensor]], int]:
    """The cache's images, preprocessed, in row order, and the bytes kept in memory to serve them (at most `budget`);
    refuses when the inputs changed since the build."""
    from clipterm.inputs.images import ImageDataset, collate, fast_decode, open_source

    dataset = reader.manifest["dataset"]
    source = open_source(dataset["root"] or dataset["source"])
    if source.fingerprint() != dataset["fingerprint"]:
        raise ClipTermError(f"the images of cache {reader.name} changed since it was built",
                            hint="--forward re-runs the model on them; rebuild the cache", code=ExitCode.INVALID_DATA)
    indices = reader.index().tolist()
    images = ImageDataset(source, loaded.preprocess, indices, min_side=reader.manifest["model"]["image_size"],
                          fast=fast_decode(reader.manifest))

    def decoded() -> Iterator[torch.Tensor]:
        for start in range(0, len(indices), batch_size):
            _, pixels, skipped = collate([images[i] for i in range(start, min(start + batch_size, len(indices)))])
            if skipped:
                raise ClipTermError(f"image {skipped[0][0]} of cache {reader.name} no longer decodes: {skipped[0][1]}",
                                    code=ExitCode.INVALID_DATA)
            yield pixels

    size = reader.manifest["model"]["image_size"]
    pixel_bytes = len(indices) * 3 * size * size * 4
    if pixel_bytes <= budget:  # decode once, reuse for every pass
        kept = list(decoded())
        return lambda: iter(kept), pixel_bytes
    return decoded, 0


def _tail(visual: Any, stream: torch.Tensor, start: int) -> torch.Tensor:
    """The rest of the vision tower from the residual stream entering block `start`: (B, D)."""
    for block in visual.transformer.resblocks[start:]:
        stream = block(stream)  # (B, T, W)
    pooled, _ = visual._pool(stream)  # (B, W)
    return pooled @ visual.proj if visual.proj is not None else pooled  # (B, D)


@torch.no_grad()
def forward_shifts(
    reader: Any,
    loaded: Any,
    components: list[str],
    batch_size: int = 64,
    on_pass: Callable[[], None] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, ablated embeddings - cached embeddings) for each component, mean-ablated in the real forward.

    One pass records the mean outputs (and, when they fit in memory, the residual stream entering
    each ablated layer, so that later passes start there instead of at the pixels).
    """
    from clipterm.vit.towers import refuse_model_analysis

    refuse_model_analysis(loaded.model, "forward mean-ablation (--forward)")
    model = loaded.model
    visual = model.visual
    blocks = visual.transformer.resblocks
    device = next(model.parameters()).device
    batches, used = _image_batches(reader, loaded, batch_size, KEEP_IN_MEMORY)
    plans = {name: parts(name, reader.shape) for name in components}
    layers = sorted({layer for plan in plans.values() for layer in plan})
    starts = sorted({min(plan) for plan in plans.values()})
    tokens, width = (visual.grid_size[0] * visual.grid_size[1] + 1), visual.transformer.width
    keep_streams = visual.transformer.batch_first and reader.n * tokens * width * 4 * len(starts) <= KEEP_IN_MEMORY - used

    sums: dict[int, dict[str, torch.Tensor]] = {layer: {} for layer in layers}
    streams: dict[int, list[torch.Tensor]] = {start: [] for start in starts}

    def record(layer: int, key: str, value: torch.Tensor) -> None:
        total = value.double().sum(0)  # heads (H, T, dh), mlp (T, W)
        sums[layer][key] = sums[layer][key] + total if key in sums[layer] else total

    handles = []
    for layer in layers:
        handles.append(blocks[layer].attn.register_forward_hook(
            lambda m, args, out, layer=layer: record(layer, "heads", _head_outputs(m, args[0]))))
        handles.append(blocks[layer].mlp.register_forward_hook(lambda m, args, out, layer=layer: record(layer, "mlp", out)))
    for start in starts if keep_streams else []:
        handles.append(blocks[start].register_forward_pre_hook(lambda m, args, start=start: streams[start].append(args[0])))
    try:
        for pixels in batches():
            model.encode_image(pixels.to(device))
    finally:
        for handle in handles:
            handle.remove()
    means = {layer: {key: (value / reader.n).float() for key, value in parts_.items()} for layer, parts_ in sums.items()}
    if on_pass:
        on_pass()

    cached = reader.image_embeds()  # (N, D)
    for name, plan in plans.items():
        with _hooks(blocks, plan, means):
            if keep_streams:
                start = min(plan)
                embeds = torch.cat([_tail(visual, stream, start).float().cpu() for stream in streams[start]])  # (N, D)
            else:
                embeds = torch.cat([model.encode_image(pixels.to(device)).float().cpu() for pixels in batches()])  # (N, D)
        if on_pass:
            on_pass()
        yield name, embeds - cached
