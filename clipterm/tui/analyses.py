"""What the panes show, computed by the core and memoised per component. Runs in thread workers.

Results are plain Python (names, floats, strings), so widgets never touch tensors. Core modules, and
with them torch, are imported inside the methods: the first frame never waits for them.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any


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
class AblationBar:
    component: str
    drop: float  # accuracy (or agreement) lost when the component is mean-ablated
    low: float
    high: float


@dataclass(frozen=True)
class LayerAblation:
    layer: int
    task: str
    metric: str  # "accuracy" or "agreement"
    baseline: float
    bars: list[AblationBar]


class Analyses:
    """Memoised TextSpan and ablation results for one cache. Safe to call from several worker threads."""

    def __init__(self, reader: Any, pool: str | None = None, cache_dir: str | None = None,
                 n_texts: int = 10, draws: int = 500):
        self.reader = reader
        self.pool_spec = pool or ("toy" if reader.manifest["model"].get("spec") == "toy" else "general")
        self.cache_dir = cache_dir
        self.n_texts = n_texts
        self.draws = draws
        self._lock = threading.RLock()  # one core call at a time: the reader's handles and the model are shared
        self._memo: dict[tuple[str, Any], Any] = {}

    def cached(self, kind: str, key: Any) -> Any | None:
        """A result already computed, or None; cheap enough to call on the UI thread."""
        return self._memo.get((kind, key))

    def _memoised(self, kind: str, key: Any, compute) -> Any:
        with self._lock:
            if (kind, key) not in self._memo:
                self._memo[(kind, key)] = compute()
            return self._memo[(kind, key)]

    # ----------------------------------------------------------------- shared inputs, loaded once

    def _loaded(self) -> Any:
        from clipterm.texts import model_for_cache

        return self._memoised("model", None, lambda: model_for_cache(self.reader))

    def _pool(self) -> tuple[Any, Any]:
        def load():
            from clipterm.texts import embed_pool, load_pool

            pool = load_pool(self.pool_spec)
            return pool, embed_pool(self._loaded(), pool, cache_dir=self.cache_dir)

        return self._memoised("pool", None, load)

    def _scorings(self) -> dict[str, Any]:
        def load():
            from clipterm import ablation
            from clipterm.textencode import encode_texts

            loaded = self._loaded()
            return ablation.scorings(self.reader, lambda texts: encode_texts(loaded.model, loaded.tokenizer, texts),
                                     pool_embeds=lambda: self._pool()[1])

        return self._memoised("scorings", None, load)

    # ----------------------------------------------------------------- what the panes show

    def description(self, component: str) -> Description:
        """TextSpan texts of a head or MLP over the pool, with the variance each explains."""
        def compute():
            from clipterm.textspan import component_stats, text_span

            pool, embeds = self._pool()
            span = text_span(*component_stats(self.reader, component), embeds, n_texts=self.n_texts)
            rows = [SpanRow(pool.texts[i], e, c) for i, e, c in zip(span.indices, span.explained, span.cumulative)]
            return Description(component, pool.name, rows)

        return self._memoised("description", component, compute)

    def layer_ablation(self, layer: int) -> LayerAblation:
        """Drop in the default task's score when each head (and the MLP) of a layer is mean-ablated."""
        def compute():
            from clipterm import ablation

            scorings = self._scorings()
            task, scoring = next(iter(scorings.items()))
            shape = self.reader.shape
            components = [f"L{layer}.H{h}" for h in range(shape.heads)] + [f"L{layer}.MLP"]
            rows = ablation.ablate({task: scoring}, ablation.shifts(self.reader, components), self.draws)[task]
            return LayerAblation(layer, task, "agreement" if scoring.agreement else "accuracy",
                                 float(scoring.outcome().float().mean()),
                                 [AblationBar(r.component, r.drop, r.low, r.high) for r in rows])

        return self._memoised("ablation", layer, compute)

    def info(self, component: str) -> dict[str, Any]:
        """Shapes and provenance from the manifest: no tensors, so the UI thread may call it."""
        from clipterm import names

        manifest = self.reader.manifest
        model, dims_of, shape = manifest["model"], manifest["shape"], self.reader.shape
        comp = names.parse(component) if component != "model" else None
        dims = {"head": f"head_out (N, {dims_of.get('head_dim')}) → joint space ({dims_of.get('embed_dim')})",
                "mlp": f"(N, {dims_of.get('embed_dim')}) in joint space, {shape.neurons} neurons",
                "layer": f"{shape.heads} heads + MLP"}
        return {
            "component": component,
            "what": names.describe(comp) if comp else f"{shape.layers} layers × {shape.heads} heads",
            "shape": dims.get(comp.kind, "") if comp else f"width {dims_of.get('width')}, embed {dims_of.get('embed_dim')}",
            "cache": self.reader.name, "n": self.reader.n,
            "model": " ".join(str(v) for v in (model.get("arch"), model.get("pretrained")) if v),
            "source": manifest["dataset"].get("source"),
            "tasks": ", ".join(self.reader.tasks) or "none",
            "pool": self.pool_spec,
        }
