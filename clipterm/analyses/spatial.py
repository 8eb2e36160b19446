"""Where in the image: per-patch maps of text queries and components, from per-token direct effects.

Gandelsman, Efros & Steinhardt, "Interpreting CLIP's image representation via text-based decomposition"
(ICLR 2024), §5: a head's CLS output is a sum over source tokens, `Σ_t A[0, t]·v_t`, so its direct effect on
the image embedding splits exactly over image positions. Summed over the heads of the last layers, each patch
gets a joint-space vector; its dot product with a text embedding, minus the mean over a contrast set of texts,
is a zero-shot segmentation map. A component's map projects its per-patch effects on its own total effect.
Per-token values come from the cache's `tokens.L{l}` (head space, / σ) when it holds them, else from one
forward pass. Factorising activations over positions (Building Blocks) lives in `factorise.py`.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from clipterm import names
from clipterm.errors import ClipTermError, ExitCode
from clipterm.inputs.images import TOY_ID, item_path, synthetic_image
from clipterm.towers import Tower, tower_for

LAST_LAYERS = 4  # the paper's segmentation sums the heads of the last 4 layers
IMAGE_HINT = "IMAGE is an image file, row:N of the --cache, or a toy scene toy:SEED/INDEX"
_READOUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass
class SpatialImage:
    """One image to map: what the user called it, its RGB PIL image, and its cache row when it has one."""

    ref: str  # a path, row:N or toy:SEED/INDEX
    image: Any  # RGB PIL image, or None when a cache row's file can no longer be read
    row: int | None = None
    problem: str | None = None  # why `image` is None

    def pixels(self, size: int) -> Any:
        """(size, size, 3) uint8, centre-cropped as CLIP sees it; None when the image can't be read."""
        from clipterm.thumbnails import square

        return None if self.image is None else square(self.image, size)


@dataclass
class SpatialMap:
    """One score per image patch. Rows run top to bottom, as in the image."""

    grid: Tensor  # (g, g)
    title: str  # the query or the component
    measure: str  # what a cell holds
    layers: list[int]
    source: str  # "cache" or "forward"
    cls: float | None = None  # the part of the score that the first token (class, or a ResNet pool's mean) carries
    where: str = ""  # the layers' name when it is not a layer set (a ResNet's `pool`)
    first_token: str = "class token"  # what `cls` is: a ResNet pool's first token is the grid's mean

    @property
    def layer_names(self) -> str:
        """`L8-11`, or `pool` for a ResNet's attention pool."""
        return self.where or names.format_layers(self.layers)

    def upsampled(self, size: int) -> Tensor:
        """(size, size) bilinear."""
        return F.interpolate(self.grid[None, None].float(), size=(size, size), mode="bilinear", align_corners=False)[0, 0]

    def normalised(self, size: int) -> Tensor:
        """(size, size) in [0, 1]: upsampled, then min-max scaled."""
        heat = self.upsampled(size)  # (S, S)
        return (heat - heat.min()) / (heat.max() - heat.min()).clamp(min=1e-12)

    def segment(self, size: int) -> Tensor:
        """(size, size) bool: the upsampled map above its mean (the paper's zero-shot segmentation)."""
        heat = self.upsampled(size)  # (S, S)
        return heat > heat.mean()

    def to_json(self) -> dict[str, Any]:
        return {"title": self.title, "measure": self.measure, "layers": self.layer_names,
                "source": self.source, "grid_size": self.grid.shape[0], "cls": self.cls, "first_token": self.first_token,
                "grid": [[round(float(v), 6) for v in row] for row in self.grid]}


@dataclass
class TokenEffects:
    """Per-source-token head outputs of one image for some layers, and what turns them into joint space."""

    tokens: dict[int, Tensor]  # layer -> (H, T, dh) head space, divided by the image's ln_post σ
    readout: Tensor  # (L, H, dh, D)
    image_embed: Tensor  # (D,) the model's own image embedding
    source: str  # "cache" or "forward"
    tower: str = "vit"  # "resnet": layer 0 is the attention pool, and token 0 the grid's mean

    def labels(self) -> dict[str, str]:
        """SpatialMap's `where` and `first_token` for maps made from these tokens."""
        return {"where": names.pool(), "first_token": "mean token"} if self.tower == "resnet" else {}

    def project(self, layer: int, directions: Tensor, heads: list[int] | None = None) -> Tensor:
        """Each token's joint-space effect through the layer's heads, dotted with per-head directions (H, D): (T,)."""
        heads = heads if heads is not None else list(range(self.readout.shape[1]))
        in_head_space = torch.einsum("hke,he->hk", self.readout[layer, heads], directions[heads])  # (h, dh)
        return torch.einsum("htk,hk->t", self.tokens[layer][heads], in_head_space)  # (T,)


# --------------------------------------------------------------------------- images


def open_image(ref: str, reader: Any = None) -> SpatialImage:
    """An image from a path, a cache row (`row:N`) or a toy scene (`toy:SEED/INDEX`)."""
    if ref.startswith("row:"):
        return _cache_row(ref, reader)
    if TOY_ID.match(ref):
        return SpatialImage(ref, synthetic_image(ref))
    path = Path(ref).expanduser()
    if not path.is_file():
        raise ClipTermError(f"no image file {ref}", hint=IMAGE_HINT, code=ExitCode.NOT_FOUND)
    image, problem = _decode(path)
    if image is None:
        raise ClipTermError(f"cannot read image {ref}: {problem}", hint=IMAGE_HINT, code=ExitCode.INVALID_DATA)
    return SpatialImage(ref, image)


def _cache_row(ref: str, reader: Any) -> SpatialImage:
    if reader is None:
        raise ClipTermError(f"{ref} names a cache row, but no cache was given", hint="pass --cache NAME, or give an image file")
    if not ref[4:].isdigit():
        raise ClipTermError(f"not a cache row: {ref!r}", hint="rows look like row:0")
    row = int(ref[4:])
    if row >= reader.n:
        raise ClipTermError(f"no row {row} in cache {reader.name} (it has {reader.n} rows)", hint=f"rows run row:0..row:{reader.n - 1}")
    item = reader.images()[int(reader.index()[row])]
    if item.get("path") is not None:
        from clipterm.inputs.images import fast_decode

        image, problem = _decode(Path(item_path(item)), fast_decode(reader.manifest))
        return SpatialImage(ref, image, row, None if image is not None else f"{item['path']}: {problem}")
    from clipterm.inputs.images import SkipImage

    try:
        return SpatialImage(ref, synthetic_image(item["id"]), row)
    except SkipImage as exc:  # a tar member or dataset row gone or changed since the build
        return SpatialImage(ref, None, row, f"{item['id']}: {exc}")


def _decode(path: Path, fast: bool = False) -> tuple[Any, str | None]:
    from clipterm.inputs.images import SkipImage, decode

    try:
        return decode(path, min_side=448, fast=fast), None
    except SkipImage as exc:
        return None, str(exc)


def model_pixels(loaded: Any, image: SpatialImage) -> Tensor:
    """The image through the model's preprocess: (1, 3, S, S)."""
    if image.image is None:
        raise ClipTermError(f"cannot read image {image.problem}", hint="the cache's copy of this image moved or broke; "
                            "give the file itself", code=ExitCode.NOT_FOUND)
    return loaded.preprocess(image.image)[None]  # (1, 3, S, S)


# --------------------------------------------------------------------------- per-token direct effects


def default_layers(n_layers: int, reader: Any = None, loaded: Any = None) -> list[int]:
    """The last four layers; from a cache without a model, those of them it stored (or all it stored)."""
    last = list(range(max(0, n_layers - LAST_LAYERS), n_layers))
    if loaded is not None or reader is None:
        return last
    stored = reader.manifest["stored"]["tokens"]
    return [layer for layer in last if layer in stored] or list(stored) or last


def token_effects(image: SpatialImage, layers: list[int], reader: Any = None, loaded: Any = None) -> TokenEffects:
    """Per-token head outputs of `layers`: from the cache's tokens.L{l} when it holds them all, else one forward pass."""
    from clipterm.vit.towers import refuse_analysis

    refuse_analysis(loaded.info if loaded is not None else reader.manifest["model"] if reader is not None else {},
                    "a per-patch map")
    stored = reader.manifest["stored"]["tokens"] if reader is not None else []
    if reader is not None and image.row is not None and set(layers) <= set(stored):
        tokens = {layer: reader.tokens(layer, rows=[image.row])[:, 0].float() for layer in layers}  # (H, T, dh) each
        return TokenEffects(tokens, reader.readout, reader.image_embeds([image.row])[0].float(), "cache",
                            reader.shape.tower)
    if loaded is None:
        missing = names.format_layers([layer for layer in layers if layer not in stored])
        where = f"cache {reader.name} holds no tokens for {missing}" if reader is not None and image.row is not None \
            else f"{image.ref} is not a row of a cache with tokens for {missing}"
        raise ClipTermError(f"{where}, and there is no model to recompute them",
                            hint=f"{model_hint(reader)}, or pick stored layers with --layers, or build the cache with "
                                 f"--tokens {missing}")
    from clipterm.cache.build import tower

    out = tower(loaded.model).decompose(loaded.model, model_pixels(loaded, image), token_layers=layers)
    tokens = {layer: out.tokens[layer][0].float().cpu() for layer in layers}  # (H, T, dh) each
    return TokenEffects(tokens, _readout(loaded.model), out.image_embeds[0].cpu(), "forward", loaded.info.tower)


def model_hint(reader: Any) -> str:
    """How to give the model: the cache's own when there is one."""
    if reader is None:
        return "pass --model (the cache's model)"
    built = reader.manifest["model"]
    return f"pass --model {built.get('spec')}" + (f" --pretrained {built['pretrained']}" if built.get("pretrained") else "")


def _readout(model: Any) -> Tensor:
    """The tower's readout (vit.decompose or vit.resnet), computed once per model object."""
    from clipterm.cache.build import tower

    if model not in _READOUTS:
        _READOUTS[model] = tower(model).readout(model).detach().cpu()  # (L, H, dh, D)
    return _READOUTS[model]


def _patch_grid(scores: Tensor) -> Tensor:
    """Scores over all tokens (T,) -> the patch grid (g, g), the class token dropped."""
    side = int(round((scores.numel() - 1) ** 0.5))
    return scores[1:].reshape(side, side)  # (g, g)


# --------------------------------------------------------------------------- text queries


def check_query(tokenizer: Any, query: str) -> None:
    """Refuse a query that tokenises to nothing (blank, or only characters the tokenizer drops)."""
    encode = getattr(tokenizer, "encode", None)
    empty = not query.strip() or (not encode(query) if encode is not None else torch.equal(tokenizer([query]), tokenizer([""])))
    if empty:
        raise ClipTermError(f"query {query!r} tokenises to nothing", hint="give words, e.g. --query 'a red star'")


def pool_embeddings(loaded: Any, pool: str = "auto", cache_dir: Any = None) -> tuple[Tensor, list[str]]:
    """Unit text embeddings (C, D) and texts of a pool (`auto`: toy for the toy model, else general); disk-cached."""
    from clipterm.inputs.texts import embed_pool, load_pool

    from clipterm.vit.models import is_toy

    name = ("toy" if is_toy(loaded.info.spec) else "general") if pool == "auto" else pool
    text_pool = load_pool(name)
    return F.normalize(embed_pool(loaded, text_pool, cache_dir=cache_dir).float(), dim=-1), list(text_pool.texts)


def query_direction(loaded: Any, query: str, reader: Any = None, contrast: Tensor | None = None) -> Tensor:
    """The unit embedding (D,) of a text (or `class:NAME`: its prompts' mean), minus the contrast texts' mean."""
    from clipterm.analyses import targets
    from clipterm.vit.textencode import encode_texts

    if query.startswith("class:"):
        direction = targets.class_direction(loaded, query[6:], reader).float().cpu()  # (D,)
    else:
        text = query[5:] if query.startswith("text:") else query
        check_query(loaded.tokenizer, text)
        direction = encode_texts(loaded.model, loaded.tokenizer, [text], normalize=True)[0].float().cpu()  # (D,)
    if contrast is not None:
        direction = direction - F.normalize(contrast.float(), dim=-1).mean(0)  # (D,)
    return direction


def query_map(image: str | SpatialImage, query: str, *, loaded: Any, reader: Any = None, layers: list[int] | None = None,
              contrast: str | Tensor | None = "auto", cache_dir: Any = None) -> SpatialMap:
    """Where a text query is in an image: per-patch direct effects of `layers` · (text − mean contrast text).

    `contrast` is a pool name (`auto`: the model's default pool), unit text embeddings (C, D), or None for none.
    Cells are contributions to cos(image, text) minus the contrast's mean, so the grid plus `cls` sums to the
    part of that difference that goes through the heads of `layers`."""
    if loaded is None:
        raise ClipTermError("a text query needs the model's text tower", hint=model_hint(reader))
    image = open_image(image, reader) if isinstance(image, str) else image
    layers = layers if layers is not None else default_layers(loaded.info.layers, reader, loaded)
    if isinstance(contrast, str):
        contrast = pool_embeddings(loaded, contrast, cache_dir)[0]
    direction = query_direction(loaded, query, reader, contrast)  # (D,)
    effects = token_effects(image, layers, reader, loaded)
    heads = effects.readout.shape[1]
    scores = sum(effects.project(layer, direction.expand(heads, -1)) for layer in layers)  # (T,)
    scores = scores / effects.image_embed.norm()  # (T,)
    measure = "direct effect · text" + (" (minus contrast mean)" if contrast is not None else "") + ", over |image|"
    return SpatialMap(_patch_grid(scores), query, measure, layers, effects.source, float(scores[0]),
                      **effects.labels())


# --------------------------------------------------------------------------- components


def component_map(image: str | SpatialImage, component: str, *, reader: Any = None, loaded: Any = None) -> SpatialMap:
    """Where a component acts in an image.

    A head (`L5.H2`) or a layer's heads (`L5`): each patch's direct effect through it, projected on the
    component's total effect for this image (`L5.H2:pc1`: on the head's principal direction, from the cache);
    cells sum, with `cls`, to the length of that effect over |image|. A neuron (`L4.N12`): its post-activation
    at each patch; an MLP (`L4.MLP`): the norm of its output at each patch (MLPs act on the class token
    directly only at its own position, so their maps show activity, not direct effect)."""
    if reader is None and loaded is None:
        raise ClipTermError("a component map needs a cache or a model", hint="pass --cache or --model")
    image = open_image(image, reader) if isinstance(image, str) else image
    shape = reader.shape if reader is not None else loaded.info.shape
    comp = tower_for(shape).parse(component)
    if comp.kind in ("embed", "bias"):
        raise ClipTermError(f"{comp} has no position in the image", hint="map a head (L5.H2), a layer (L5), an MLP or a neuron")
    tower = tower_for(shape)
    if comp.kind == "feature":
        return _feature_map(image, comp, loaded, reader)
    if comp.site == "stage":
        return _position_map(image, comp, loaded, reader, tower)
    if comp.kind == "neuron" and tower.channel_units:
        return _channel_map(image, comp, loaded, reader, tower)
    if comp.kind in ("mlp", "neuron"):
        return _mlp_map(image, comp, loaded, reader)
    if comp.kind == "layer" and tower.is_unit_group(str(comp)):
        raise ClipTermError(f"{comp} is a stage of channels: map one of them ({names.neuron(comp.layer, 0)}) or the pool",
                            hint="e.g. pool, pool.H3 or " + names.neuron(comp.layer, 0))
    layer = comp.layer
    effects = token_effects(image, [layer], reader, loaded)
    heads = [comp.index] if comp.kind == "head" else list(range(shape.heads))
    if comp.pc is not None:
        if reader is None:
            raise ClipTermError(f"{comp} needs a cache: principal directions come from its statistics", hint="pass --cache")
        from clipterm.analyses.targets import head_direction

        direction = head_direction(reader, str(comp.base), comp.pc)  # (D,)
    else:
        tokens = torch.stack([effects.tokens[layer][h].sum(0) for h in heads])  # (h, dh)
        direction = F.normalize(torch.einsum("hk,hke->e", tokens, effects.readout[layer, heads]), dim=0)  # (D,)
    heads_total = effects.readout.shape[1]
    scores = effects.project(layer, direction.expand(heads_total, -1), heads) / effects.image_embed.norm()  # (T,)
    along = "its principal direction" if comp.pc is not None else "its own total effect"
    return SpatialMap(_patch_grid(scores), str(comp), f"direct effect along {along}, over |image|", [layer],
                      effects.source, float(scores[0]), **effects.labels())


def _mlp_map(image: SpatialImage, comp: names.Component, loaded: Any, reader: Any) -> SpatialMap:
    if loaded is None:
        raise ClipTermError(f"{comp.base}'s per-patch values need a forward pass (the cache keeps the class token only)",
                            hint=model_hint(reader))
    acts, outputs = mlp_activations(loaded.model, model_pixels(loaded, image), [comp.layer], outputs=comp.kind == "mlp")
    if comp.kind == "neuron":
        scores, measure = acts[comp.layer][0, :, comp.index], "post-activation"  # (T,)
    else:
        scores, measure = outputs[comp.layer][0].norm(dim=-1), "output norm"  # (T,)
    return SpatialMap(_patch_grid(scores), str(comp.base), measure, [comp.layer], "forward", float(scores[0]))


def _feature_map(image: SpatialImage, comp: names.Component, loaded: Any, reader: Any) -> SpatialMap:
    """An SAE feature's activation at each token of the site it reads (a grid's cells for a conv tower)."""
    if loaded is None or reader is None:
        raise ClipTermError(f"{comp}'s per-patch values need the cache (its SAE) and a forward pass", hint=model_hint(reader))
    from clipterm.sae.store import SaeFile
    from clipterm.sae.train import site_for

    sae_file = SaeFile(reader, comp.layer)
    sae_file.check_feature(comp.index)
    site = site_for(loaded, comp.layer)
    scores = sae_file.patch_map(loaded, model_pixels(loaded, image), comp.index)[0].float().cpu()  # (T,)
    patches = scores[site.prefix:]
    side = int(round(patches.numel() ** 0.5))
    first = float(scores[0]) if site.prefix else float(patches.mean())
    return SpatialMap(patches.reshape(side, -1), str(comp), "SAE activation", [comp.layer], "forward", first,
                      first_token="class token" if site.prefix else "mean over the grid")


def _channel_map(image: SpatialImage, comp: names.Component, loaded: Any, reader: Any, tower: Tower) -> SpatialMap:
    """A CNN channel's activation at each cell of the last stage's grid (its mean is what the pool reads)."""
    if loaded is None:
        raise ClipTermError(f"{comp.base}'s per-cell values need a forward pass (the cache keeps their mean only)",
                            hint=model_hint(reader))
    grid = tower.channel_grid(loaded.model, model_pixels(loaded, image))[0, comp.index].float().cpu()  # (h, w)
    return SpatialMap(grid, str(comp.base), "activation", [comp.layer], "forward", float(grid.mean()),
                      where=names.layer(comp.layer), first_token="mean over the grid")


def _position_map(image: SpatialImage, comp: names.Component, loaded: Any, reader: Any, tower: Tower) -> SpatialMap:
    """A ConvNeXt block's (or stage's) direct effect at each cell of the grid, along its own total effect: the pool
    is a mean over the grid, so the cells sum to the length of that effect over |image|."""
    if loaded is None:
        raise ClipTermError(f"{comp}'s per-cell effects need a forward pass (the cache keeps their mean only)",
                            hint=model_hint(reader))
    effects, embeds = tower.position_effects(loaded.model, model_pixels(loaded, image), comp)  # (1, P, D), (1, D)
    effects = effects[0].float().cpu()  # (P, D)
    direction = F.normalize(effects.sum(0), dim=0)  # (D,)
    scores = effects @ direction / embeds[0].float().cpu().norm()  # (P,)
    side = int(round(scores.numel() ** 0.5))
    return SpatialMap(scores.reshape(side, -1), str(comp), "direct effect along its own total effect, over |image|",
                      [comp.layer if comp.layer is not None else 0], "forward", 0.0, where=str(comp),
                      first_token="nothing (a ConvNeXt pools the grid's mean)")


def mlp_activations(model: Any, pixels: Tensor, layers: list[int], outputs: bool = False) -> tuple[dict, dict]:
    """One forward pass: per-token MLP post-activations {layer: (B, T, M)}, and outputs {layer: (B, T, W)} if asked."""
    from clipterm.vit.towers import refuse_model_analysis

    refuse_model_analysis(model, "a per-patch MLP map")
    from clipterm.vit.decompose import vision_tower

    visual = vision_tower(model)
    acts: dict[int, Tensor] = {}
    outs: dict[int, Tensor] = {}
    hooks = []
    for layer in layers:
        mlp = visual.transformer.resblocks[layer].mlp
        hooks.append(mlp.gelu.register_forward_hook(lambda _m, _i, out, layer=layer: acts.__setitem__(layer, out.float().cpu())))
        if outputs:
            hooks.append(mlp.register_forward_hook(lambda _m, _i, out, layer=layer: outs.__setitem__(layer, out.float().cpu())))
    try:
        with torch.no_grad():
            visual(pixels.to(device=visual.conv1.weight.device, dtype=visual.conv1.weight.dtype))
    finally:
        for hook in hooks:
            hook.remove()
    return acts, outs

