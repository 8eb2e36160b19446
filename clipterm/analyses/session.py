"""What the panes show, computed by the core and memoised per component. Runs in thread workers.

Results are plain Python (names, floats, strings, small pixel arrays), so widgets never touch
tensors. Core modules, and with them torch, are imported inside the methods: the first frame never
waits for them.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from clipterm import names
from clipterm.errors import ClipTermError

NEURONS_IN_TREE = 64  # a layer's neurons listed under its MLP node, by effect norm; the palette reaches the rest
ABLATION_SAMPLE = 5_000  # the panes ablate on a seeded random sample of a bigger cache: a visit stays interactive


@dataclass(frozen=True)
class SpanRow:
    text: str
    explained: float  # share of the component's variance along this (deflated) text
    cumulative: float


@dataclass(frozen=True)
class Description:
    component: str
    pool: str
    rows: list[SpanRow]


@dataclass(frozen=True)
class TermRow:
    text: str
    coefficient: float  # OMP coefficient of the (centred, unit) text in the neuron's direction


@dataclass(frozen=True)
class NeuronDescription:
    component: str
    pool: str
    rows: list[TermRow]  # in the order OMP chose them
    cosine: float  # between the neuron's direction and its sparse reconstruction
    norm: float  # mean second-order effect norm over the cache's images


@dataclass(frozen=True)
class AblationBar:
    component: str
    drop: float  # accuracy (or agreement) lost when the component is mean-ablated
    low: float
    high: float


@dataclass(frozen=True)
class TaskAblation:
    task: str
    metric: str  # "accuracy" or "agreement"
    baseline: float
    bars: list[AblationBar]
    sample: int | None = None  # images scored, when a sample of a bigger cache (`clipterm ablate` scores all)


@dataclass(frozen=True)
class NeuronRow:
    component: str  # L4.N12
    norm: float  # mean second-order effect norm
    hint: str  # top text of its sparse decomposition


@dataclass(frozen=True)
class Thumbnail:
    caption: str
    pixels: Any  # (S, S, 3) uint8, or None when the image can't be read any more
    path: str | None
    row: int | None = None  # row in the cache


@dataclass(frozen=True)
class ImageRanking:
    component: str
    about: str
    tiles: list[Thumbnail] = field(default_factory=list)


@dataclass(frozen=True)
class SpatialView:
    title: str  # what is mapped, on which image
    about: str  # what a cell measures, and where the tokens came from
    renderable: Any  # rich renderable: the image and the map over it (half blocks)
    copy_text: str  # the grid, one row of numbers per line


@dataclass(frozen=True)
class SpatialRequest:
    """What the Spatial pane maps: a target of the search grammar, or (with `factors` K) the image's K NMF factors
    of its activations or (`of="classes"`) of its class attributions."""

    target: str = ""  # `L5.H2`, `text:a red star`, `class:red`, …
    factors: int = 0
    of: str = "activations"

    @classmethod
    def typed(cls, text: str) -> SpatialRequest:
        """From what a user typed: `nmf K`, `nmf K classes`, a target, or plain words (taken as `text:`)."""
        words = text.split()
        if 2 <= len(words) <= 3 and words[0].lower() == "nmf" and words[1].isdigit():
            of = words[2].lower() if len(words) == 3 else "activations"
            if of in ("classes", "activations"):
                return cls(factors=int(words[1]), of=of)
        if text.startswith(("text:", "class:")):
            return cls(target=text)
        try:
            return cls(target=str(names.parse(text)))
        except ClipTermError:
            return cls(target=f"text:{text}")

    @property
    def title(self) -> str:
        if self.factors:
            return f"{self.factors} NMF factors" + (" of class attributions" if self.of == "classes" else "")
        return f"“{self.target[5:]}”" if self.target.startswith("text:") else self.target


@dataclass(frozen=True)
class VisualFrame:
    """One streamed step of a feature visualisation: plain data for the Visualise pane."""

    target: str
    step: int
    steps: int
    objective: float  # mean over the images of what is climbed
    kind: str  # activation, effect or direction
    tiles: list[Thumbnail]  # the images so far, resized for the pane
    elapsed: float
    done: bool


class Analyses:
    """Memoised results for one cache. Safe to call from several worker threads."""

    def __init__(self, reader: Any, pool: str | None = None, cache_dir: str | None = None,
                 n_texts: int = 10, draws: int = 500, loaded: Any = None, load_model: Callable[[], Any] | None = None):
        self.reader = reader
        from clipterm.vit.models import is_toy

        self.pool_spec = pool or ("toy" if is_toy(reader.manifest["model"].get("spec")) else "general")
        self.cache_dir = cache_dir
        self.n_texts = n_texts
        self.draws = draws
        self._lock = threading.RLock()  # one core call at a time: the reader's handles and the model are shared
        self._memo: dict[tuple[str, Any], Any] = {}
        self._neuron_layers: list[int] | None = None
        self._load_model = load_model  # how to get the model when it isn't the cache's own (--model)
        if loaded is not None:
            self._memo[("model", None)] = loaded

    def cached(self, kind: str, key: Any) -> Any | None:
        """A result already computed, or None; cheap enough to call on the UI thread."""
        return self._memo.get((kind, key))

    def _memoised(self, kind: str, key: Any, compute: Callable[[], Any]) -> Any:
        with self._lock:
            if (kind, key) not in self._memo:
                self._memo[(kind, key)] = compute()
            return self._memo[(kind, key)]

    # ----------------------------------------------------------------- what the cache holds (no torch)

    def neuron_layers(self) -> list[int]:
        """Layers whose neurons file was built (`clipterm neurons build`), as of the first call."""
        if self._neuron_layers is None:
            from clipterm.cache.neurons import built_layers

            self._neuron_layers = built_layers(self.reader.path)
        return self._neuron_layers

    def has_labels(self) -> bool:
        return bool(self.reader.tasks)

    # ----------------------------------------------------------------- shared inputs, loaded once

    def loaded(self) -> Any:
        from clipterm.cache.reader import model_for_cache

        return self._memoised("model", None, self._load_model or (lambda: model_for_cache(self.reader)))

    def _pool(self) -> tuple[Any, Any]:
        def load():
            from clipterm.inputs.texts import embed_pool, load_pool

            pool = load_pool(self.pool_spec)
            return pool, embed_pool(self.loaded(), pool, cache_dir=self.cache_dir)

        return self._memoised("pool", None, load)

    def _unit_pool(self) -> tuple[Any, list[str]]:
        """The pool's embeddings scaled to unit norm (P, D), and its texts: the spatial contrast and factor names."""
        def load():
            import torch.nn.functional as F

            pool, embeds = self._pool()
            return F.normalize(embeds.float(), dim=-1), list(pool.texts)

        return self._memoised("unit_pool", None, load)

    def _scorings(self) -> dict[str, Any]:
        def load():
            from clipterm.analyses import ablation
            from clipterm.vit.textencode import encode_texts

            loaded = self.loaded()
            return ablation.scorings(self.reader, lambda texts: encode_texts(loaded.model, loaded.tokenizer, texts),
                                     pool_embeds=lambda: self._pool()[1], keep=self.ablation_sample())

        return self._memoised("scorings", None, load)

    def ablation_sample(self) -> Any:
        """(N,) bool: the rows the panes' ablation scores, a seeded sample of ABLATION_SAMPLE rows; None: every row."""
        import torch

        if self.reader.n <= ABLATION_SAMPLE:
            return None
        keep = torch.zeros(self.reader.n, dtype=torch.bool)
        keep[torch.randperm(self.reader.n, generator=torch.Generator().manual_seed(0))[:ABLATION_SAMPLE]] = True
        return keep

    def _neuron_file(self, layer: int) -> Any:
        from clipterm.cache.neurons import NeuronFile

        return self._memoised("neuron_file", layer, lambda: NeuronFile(self.reader, layer))

    # ----------------------------------------------------------------- descriptions

    def description(self, component: str) -> Description:
        """TextSpan texts of a head or MLP over the pool, with the variance each explains."""
        def compute():
            from clipterm.analyses.textspan import component_stats, text_span

            pool, embeds = self._pool()
            span = text_span(*component_stats(self.reader, component), embeds, n_texts=self.n_texts)
            rows = [SpanRow(pool.texts[i], e, c) for i, e, c in zip(span.indices, span.explained, span.cumulative)]
            return Description(component, pool.name, rows)

        return self._memoised("description", component, compute)

    def neuron_description(self, component: str, k: int = 32) -> NeuronDescription:
        """A neuron's second-order direction as a sparse sum of pool texts (OMP), strongest first."""
        def compute():
            from clipterm.cache.neurons import decompose_neurons

            neuron = names.parse(component)
            pool, embeds = self._pool()
            neuron_file = self._neuron_file(neuron.layer)
            code = decompose_neurons(neuron_file, [neuron.index], embeds, k=k)
            rows = [TermRow(pool.texts[row], coefficient) for row, coefficient in code.texts(0)]
            norm = float(neuron_file.tensor("norm_mean")[neuron.index])
            return NeuronDescription(component, pool.name, rows, float(code.cosine[0]), norm)

        return self._memoised("description", component, compute)

    def neurons(self, layer: int, top: int = NEURONS_IN_TREE) -> list[NeuronRow]:
        """A layer's neurons with the largest second-order effects, each with its top decomposition text."""
        def compute():
            from clipterm.cache.neurons import decompose_neurons

            neuron_file = self._neuron_file(layer)
            norms = neuron_file.tensor("norm_mean")  # (M,)
            ids = neuron_file.ranking("norm")[:top].tolist()
            pool, embeds = self._pool()
            code = decompose_neurons(neuron_file, ids, embeds, k=8)
            hints = [pool.texts[code.leading(i)] if code.leading(i) is not None else "" for i in range(len(ids))]
            return [NeuronRow(names.neuron(layer, n), float(norms[n]), hint) for n, hint in zip(ids, hints)]

        return self._memoised("neurons", layer, compute)

    # ----------------------------------------------------------------- ablation

    def tasks(self) -> list[str]:
        """The tasks ablation can score, first one first (the cache's labels, else agreement with the model)."""
        return list(self._scorings())

    def layer_ablation(self, layer: int) -> dict[str, TaskAblation]:
        """Per task: the drop when each head (and the MLP) of a layer is mean-ablated on its own.

        A ResNet's one stored layer is its pool (`layer` is its slot): its heads, and its positional part. A
        ConvNeXt's is its last stage (`layer` is the stage's number): its blocks."""
        components = self.reader.tower.layer_group(layer)
        return self._memoised("ablation", layer, lambda: self._ablate(components))

    def model_ablation(self) -> dict[str, TaskAblation]:
        """Per task: the drop when each whole layer (its heads and MLP; a ResNet's pool) is mean-ablated; for a
        ConvNeXt, its last stage's input (`embed`) and the whole stage (`S3`)."""
        return self._memoised("ablation", "layers", lambda: self._ablate(self.top_level()))

    def ablate(self, components: list[str]) -> dict[str, TaskAblation]:
        """Per task: the drop when each of `components` is mean-ablated on its own (direct, from the cache)."""
        return self._memoised("ablation", tuple(components), lambda: self._ablate(components))

    def encode_texts(self, texts: list[str]) -> Any:
        """The model's text embeddings of `texts` (ablation's class prompts)."""
        from clipterm.vit.textencode import encode_texts

        loaded = self.loaded()
        return encode_texts(loaded.model, loaded.tokenizer, texts)

    def top_level(self) -> list[str]:
        """What the model-level ablation compares: every layer, or a ConvNeXt's stage input and last stage."""
        return self.reader.tower.top_level()

    def _ablate(self, components: list[str]) -> dict[str, TaskAblation]:
        from clipterm.analyses import ablation, direct_ablation  # (ablation first, as the tree's timing expects)

        scorings = self._scorings()
        if self.reader.joint_heads:  # an attention-pool tower: class-space scoring reads head-space blocks only
            rows = ablation.ablate(scorings, ablation.shifts(self.reader, components), self.draws)
        else:
            rows = direct_ablation.ablate_cached(scorings, self.reader, components, self.draws, cosine=False)  # no cosine
        sampled = self.reader.n > ABLATION_SAMPLE
        return {task: TaskAblation(task, "agreement" if scoring.agreement else "accuracy",
                                   float(scoring.outcome().float().mean()),
                                   [AblationBar(r.component, r.drop, r.low, r.high) for r in rows[task]],
                                   len(scoring.rows) if sampled else None)
                for task, scoring in scorings.items()}

    # ----------------------------------------------------------------- images

    def top_images(self, component: str, top: int = 12, size: int = 16) -> ImageRanking:
        """The images that score highest for a head, MLP or neuron, as small RGB thumbnails."""
        def compute():
            from clipterm.analyses.examples import top_images
            from clipterm.thumbnails import load_thumbnail

            def pool_embeds():
                pool, embeds = self._pool()
                return embeds, pool.texts

            ranking = top_images(self.reader, component, top=top, text_embeds=pool_embeds)
            tiles = []
            for example in ranking.examples:
                pixels = None if example.missing else load_thumbnail(example.path, example.id, size)
                label = " ".join(list(example.labels.values())[:2])
                tiles.append(Thumbnail(f"{example.score:+.2f} {label}", pixels, example.path or example.id, example.row))
            return ImageRanking(ranking.component, ranking.about, tiles)

        return self._memoised("images", component, compute)

    # ----------------------------------------------------------------- spatial

    def spatial(self, row: int, request: SpatialRequest) -> SpatialView:
        """Where a request acts in cache row `row`: a target of the search grammar (a component such as `L5.H2`,
        `L5`, `L4.MLP`, `L4.N12`; `text:a red star`; `class:red`), or NMF factors of the image's MLP activations."""
        def compute():
            from clipterm.analyses import factorise, spatial
            from clipterm.thumbnails import map_view

            image = spatial.open_image(f"row:{row}", reader=self.reader)
            if request.factors and request.of == "classes":
                from clipterm.analyses.classfactors import factorise_classes

                result = factorise_classes(image, request.factors, loaded=self.loaded(), reader=self.reader)
                grid = result.factors[0].grid
                about = "classes that push together, and where (Building Blocks: NMF of class attributions)"
            elif request.factors:
                result = factorise.factorise(image, request.factors, loaded=self.loaded(), reader=self.reader,
                                             pool=self._unit_pool())
                grid, about = result.factors[0].grid, "parts of the image that push together (Building Blocks)"
            elif request.target.startswith(("text:", "class:")):
                result = spatial.query_map(image, request.target, loaded=self.loaded(), reader=self.reader,
                                           contrast=self._unit_pool()[0], cache_dir=self.cache_dir)
                grid, about = result.grid, result.measure
            else:
                result = spatial.component_map(image, request.target, reader=self.reader, loaded=self.loaded())
                grid, about = result.grid, result.measure
            copy_text = "\n".join(" ".join(f"{v:.4g}" for v in line) for line in grid.tolist())
            return SpatialView(f"{request.title} · row {row}", about, map_view(result, image.pixels(32), f"row {row}"),
                               copy_text)

        return self._memoised("spatial", (row, request), compute)

    # ----------------------------------------------------------------- search

    def search_target(self, component: str) -> str | None:
        """The search target for a tree node, if it has a direction: a head, an MLP or a ConvNeXt block (their
        principal direction), or a neuron of a built layer."""
        if component == "model":
            return None
        parsed = names.parse(component)
        if parsed.kind in ("head", "mlp") or (parsed.kind == "neuron" and parsed.layer in self.neuron_layers()):
            return str(parsed)
        return None

    def search(self, target: str, cancel: Callable[[], bool], seed: int = 0, steps: int = 200,
               lm: str | None = "ngram") -> Iterator[Any]:
        """Stream `SearchEvent`s of a hill-climb towards a target (any `clipterm search` target syntax), guided by
        the language model `lm` (`clipterm search --lm`: ngram, a Hugging Face name or folder; None: unguided)."""
        from clipterm.analyses import targets
        from clipterm.analyses.lm import DEFAULT_WEIGHT, load_lm
        from clipterm.analyses.search import SearchConfig, search_model
        from clipterm.inputs.vocab import default_vocabulary

        loaded = self.loaded()
        with self._lock:  # the direction reads the cache; the climb itself only needs the text tower
            direction = targets.resolve(target, loaded, self.reader).direction
        vocab = self._memoised("vocab", None, lambda: default_vocabulary(loaded.tokenizer, loaded.text_tokens))
        language = self._memoised("lm", lm, lambda: load_lm(lm, vocab, loaded.info.spec, cache_dir=self.cache_dir,
                                                             device=next(loaded.model.parameters()).device))
        config = SearchConfig(steps=steps, patience=25, seed=seed, lm_weight=DEFAULT_WEIGHT)
        return search_model(loaded, direction, vocab, config=config, cancel=cancel, lm=language)

    # ----------------------------------------------------------------- feature visualisation

    def visual_target(self, component: str) -> str | None:
        """The visualisation target for a tree node: a head (its direct effect) or a neuron (its activation)."""
        if component == "model":
            return None
        parsed = names.parse(component)
        return str(parsed) if parsed.kind in ("head", "neuron") else None

    def visualise(self, target: str, cancel: Callable[[], bool], steps: int = 128, every: int = 4, size: int = 32,
                  seed: int = 0) -> Iterator[VisualFrame]:
        """Stream frames of a feature visualisation of `target` (any `clipterm visualise` target); the last one is
        memoised under ("visualise", target) when it ran to the end."""
        import numpy as np
        from PIL import Image

        from clipterm.analyses import featvis

        loaded = self.loaded()
        with self._lock:  # directions read the cache
            objective = featvis.objective_for(target, loaded, self.reader)
        config = featvis.Config(steps=steps, every=every, seed=seed)
        tiles: list[Thumbnail] = []
        for frame in featvis.visualise(loaded, objective, config, cancel=cancel):
            if frame.pixels is not None:
                tiles = [Thumbnail(f"step {frame.step}", np.asarray(Image.fromarray(p).resize((size, size), Image.BILINEAR)),
                                   None) for p in frame.pixels]
            out = VisualFrame(target, frame.step, steps, frame.objective, objective.kind, tiles, frame.elapsed,
                              frame.done)
            if frame.done and frame.step == steps:
                self._memo[("visualise", target)] = out
            yield out

    # ----------------------------------------------------------------- info

    def info(self, component: str) -> dict[str, Any]:
        """Shapes and provenance from the manifest: no tensors, so the UI thread may call it."""
        manifest = self.reader.manifest
        model, dims_of = manifest["model"], manifest["shape"]
        comp = names.parse(component) if component != "model" else None
        dims, overview = self.reader.tower.info_shapes(comp, dims_of)
        built = self.neuron_layers()
        no_neurons = self.reader.tower.no_neurons()
        return {
            "component": component,
            "what": self.reader.tower.describe(comp) if comp else overview,
            "shape": dims.get(comp.kind, "") if comp else f"width {dims_of.get('width')}, embed {dims_of.get('embed_dim')}",
            "cache": self.reader.name, "n": self.reader.n,
            "model": " ".join(str(v) for v in (model.get("arch"), model.get("pretrained")) if v) or model.get("spec", ""),
            "source": manifest["dataset"].get("source"),
            "tasks": ", ".join(self.reader.tasks) or "none",
            "neurons": ", ".join(names.layer(l) for l in built) or no_neurons,
            "tokens": ", ".join(self.reader.tower.layers()[l] for l in self.token_layers()) or "none",
            "pool": self.pool_spec,
        }

    def refusal(self, analysis: str) -> str | None:
        """Why `analysis` cannot run on this cache's tower, in one line naming the model part (None: it can)."""
        from clipterm.vit.towers import analysis_refusal

        return analysis_refusal(self.reader.manifest["model"], analysis)

    def token_layers(self) -> list[int]:
        """Layers whose per-token head outputs the cache stores (`tokens.L{l}`)."""
        return sorted(int(l) for l in self.reader.manifest.get("stored", {}).get("tokens", []) or [])
