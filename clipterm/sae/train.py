"""Training an SAE on a cache's residual stream at one site, with bounded memory.

Activations are captured from the model (they are not stored in the cache). When all of them fit in
`keep_bytes` they are captured once and reshuffled every epoch; otherwise they stream: the images are visited
in a fresh seeded order each epoch, `buffer_rows` activations are gathered, shuffled, and served as batches,
then the buffer is refilled. Memory is the buffer, whatever the number of images.

The loss is the squared error of normalised inputs (norm_scale makes E‖x‖² = d), plus the AuxK term (Gao et al.
2024) for TopK/BatchTopK that lets dead features learn from the residual error, an L1 penalty for ReLU and
an L0 penalty through the straight-through estimator for JumpReLU. Decoder rows stay at unit norm.
A seed fixes the initialisation, the image order and the shuffles: on the CPU the same seed gives the same SAE.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from clipterm import names
from clipterm.errors import ClipTermError, ExitCode
from clipterm.sae.capture import image_batches, select, tokens_of
from clipterm.sae.model import SAE, Config

KEEP_IN_MEMORY = 256 << 20
AUX_COEFFICIENT = 1 / 32
DEAD_AFTER = 2_000_000  # a feature is dead when it has not fired on this many training activations (or all of them)


@dataclass
class Options:
    layer: int
    tokens: str = "all"
    features: int = 0  # 0: 8 × the width
    k: int = 16
    arch: str = "topk"
    steps: int = 2000
    batch_size: int = 2048
    lr: float = 1e-3
    l1: float = 1e-3
    seed: int = 0
    device: str = "cpu"
    image_batch: int = 64
    keep_bytes: int = KEEP_IN_MEMORY
    buffer_rows: int = 1 << 17
    workers: int | None = None


@dataclass
class Figures:
    loss: float = 0.0
    explained_variance: float = 0.0
    l0: float = 0.0
    dead: int = 0

    def note(self) -> str:
        return f"loss {self.loss:.4f} · EV {self.explained_variance:.3f} · L0 {self.l0:.1f} · dead {self.dead}"


class Stream:
    """Batches of shuffled activations, (B, W), forever; memory bounded by `keep_bytes` or `buffer_rows`."""

    def __init__(self, reader: Any, loaded: Any, site: Any, options: Options, generator: torch.Generator):
        self.reader, self.loaded, self.site, self.o, self.g = reader, loaded, site, options, generator
        self.model = loaded.model
        self.per_image = None
        self.kept: Tensor | None = None
        self.epochs = 0
        self.peak_rows = 0

    def _captured(self, rows: list[int]) -> Iterator[Tensor]:
        for _, pixels in image_batches(self.reader, self.loaded, rows, self.o.image_batch, self.o.device, self.o.workers):
            yield select(self.site, tokens_of(self.model, self.site, pixels), self.o.tokens).float()

    def _order(self) -> list[int]:
        self.epochs += 1
        return torch.randperm(self.reader.n, generator=self.g).tolist()

    def batches(self) -> Iterator[Tensor]:
        first = next(self._captured([0]))
        width, self.per_image = first.shape[-1], first.shape[0]
        total_bytes = self.reader.n * self.per_image * width * 4
        if total_bytes <= self.o.keep_bytes:
            self.kept = torch.cat(list(self._captured(list(range(self.reader.n)))))  # (N·T, W)
            self.peak_rows = len(self.kept)
            while True:
                self.epochs += 1
                yield from self._shuffled(self.kept)
        capacity = max(self.o.buffer_rows, self.o.batch_size)
        while True:
            buffer: list[Tensor] = []
            held = 0
            for chunk in self._captured(self._order()):
                buffer.append(chunk)
                held += len(chunk)
                if held >= capacity:
                    yield from self._serve(buffer)
                    buffer, held = [], 0
            if buffer:
                yield from self._serve(buffer)

    def _serve(self, buffer: list[Tensor]) -> Iterator[Tensor]:
        rows = torch.cat(buffer)
        self.peak_rows = max(self.peak_rows, len(rows))
        yield from self._shuffled(rows)

    def _shuffled(self, rows: Tensor) -> Iterator[Tensor]:
        """Batches of a shuffle of `rows`; fewer rows than a batch: one batch drawn with replacement."""
        size = self.o.batch_size
        if len(rows) < size:
            yield rows[torch.randint(len(rows), (size,), generator=self.g)]
            return
        order = torch.randperm(len(rows), generator=self.g)
        for lo in range(0, len(order) - size + 1, size):
            yield rows[order[lo:lo + size]]


def default_features(width: int) -> int:
    return 8 * width


def check_options(options: Options, width: int) -> Config:
    if options.steps < 1 or options.batch_size < 1 or options.lr <= 0:
        raise ClipTermError("--steps, --batch-size and --lr must be positive", hint="e.g. --steps 2000 --batch-size 2048")
    config = Config(width, options.features or default_features(width), options.arch, options.k, options.l1,
                    options.tokens, options.layer)
    config.check()
    return config


def step_loss(sae: SAE, x: Tensor, fired_recently: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, features, reconstruction) of a normalised batch x (B, W)."""
    pre = sae.pre(x)
    f = sae.activate(pre, training=True)
    x_hat = f @ sae.W_dec + sae.b_dec
    err = (x - x_hat).pow(2).sum(-1).mean()
    loss = err
    arch = sae.config.arch
    if arch == "relu":
        loss = loss + sae.config.l1 * f.abs().sum(-1).mean()
    elif arch == "jumprelu":
        from clipterm.sae.model import _Step

        loss = loss + sae.config.l1 * _Step.apply(pre, sae.log_threshold.exp()).sum(-1).mean()
    elif fired_recently is not None and (~fired_recently).any():  # AuxK: dead features model the residual error
        dead = ~fired_recently
        k_aux = min(int(dead.sum()), x.shape[1] // 2)
        masked = pre.relu().masked_fill(~dead, 0)
        values, indices = masked.topk(k_aux, dim=-1)
        aux = torch.zeros_like(pre).scatter_(-1, indices, values) @ sae.W_dec
        residual = (x - x_hat).detach()
        aux_err = (residual - aux).pow(2).sum(-1).mean() / residual.pow(2).sum(-1).mean().clamp(min=1e-8)
        loss = loss + AUX_COEFFICIENT * aux_err
    return loss, f, x_hat


def fit(sae: SAE, first: Tensor, batches: Iterator[Tensor], options: Options,
        progress: Callable[[int, Figures], None] | None = None) -> tuple[int, Figures]:
    """The optimisation loop over raw activation batches (`first`, then `batches`); returns (activations seen, the
    last figures). BatchTopK's inference threshold is set at the end."""
    config = sae.config
    optimiser = torch.optim.Adam(sae.parameters(), lr=options.lr)
    last_fired = torch.zeros(config.features, dtype=torch.long, device=options.device)
    seen, figures, threshold_sum, threshold_n = 0, Figures(), 0.0, 0
    batch = first
    for step in range(options.steps):
        x = batch.to(options.device) * sae.norm_scale
        recent = (seen - last_fired) < DEAD_AFTER if seen >= DEAD_AFTER else None
        loss, f, x_hat = step_loss(sae, x, recent)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        sae.normalise_decoder()
        with torch.no_grad():
            seen += len(x)
            last_fired[(f > 0).any(0)] = seen
            if config.arch == "batchtopk":
                positive = f[f > 0]
                if positive.numel():
                    threshold_sum, threshold_n = threshold_sum + float(positive.min()), threshold_n + 1
            if progress is not None and (step % 20 == 0 or step == options.steps - 1):
                centred = (x - x.mean(0)).pow(2).sum()
                figures = Figures(float(loss), float(1 - (x - x_hat).pow(2).sum() / centred.clamp(min=1e-12)),
                                  float((f > 0).sum(-1).float().mean()),
                                  int(((seen - last_fired) >= min(DEAD_AFTER, seen)).sum()))
                progress(step + 1, figures)
        if step < options.steps - 1:
            batch = next(batches)
    if config.arch == "batchtopk" and threshold_n:
        sae.threshold.fill_(threshold_sum / threshold_n)
    return seen, figures


def train(reader: Any, loaded: Any, site: Any, options: Options,
          progress: Callable[[int, Figures], None] | None = None) -> tuple[SAE, dict]:
    """Train an SAE at `site`; returns it and its training figures (the file is written by the caller)."""
    started = time.perf_counter()
    torch.manual_seed(options.seed)
    generator = torch.Generator().manual_seed(options.seed)
    stream = Stream(reader, loaded, site, options, generator)
    batches = stream.batches()
    first = next(batches)
    config = check_options(options, first.shape[-1])
    sae = SAE(config, generator).to(options.device)
    scale = (first.shape[-1] / first.pow(2).sum(-1).mean()).sqrt()
    with torch.no_grad():
        sae.norm_scale.fill_(float(scale))
        sae.b_dec.copy_((first * scale).mean(0))
    capture_seconds = time.perf_counter() - started
    seen, figures = fit(sae, first, batches, options, progress)
    sae.eval()
    seconds = time.perf_counter() - started
    step_seconds = seconds - capture_seconds
    training = {"steps": options.steps, "batch_size": options.batch_size, "lr": options.lr, "seed": options.seed,
                "activations": seen, "epochs": stream.epochs, "seconds": round(seconds, 3),
                "activations_per_s": round(seen / seconds, 1) if seconds > 0 else 0.0,
                "capture_seconds": round(capture_seconds, 3),  # up to the first batch: all of it when kept in memory
                "step_activations_per_s": round(seen / step_seconds, 1) if step_seconds > 0 else 0.0,
                "buffer_rows": stream.peak_rows, "in_memory": stream.kept is not None,
                "last": asdict(figures)}
    return sae, training


@torch.no_grad()
def evaluate(reader: Any, loaded: Any, site: Any, sae: SAE, tokens: str, device: str = "cpu",
             image_batch: int = 64) -> tuple[dict, Tensor]:
    """One pass over every image: explained variance, L0 and dead features over all of them, and the (N, F)
    per-image maximum of each feature over its tokens (the image's activation, as `images` ranks it)."""
    n, feats = reader.n, sae.config.features
    image_max = torch.zeros(n, feats)
    sq_err = total = 0.0
    s1 = s2 = None
    count = l0_sum = 0
    fired = torch.zeros(feats, dtype=torch.bool)
    for rows, pixels in image_batches(reader, loaded, list(range(n)), image_batch, device):
        tok = tokens_of(loaded.model, site, pixels)  # (B, T, W)
        x = select(site, tok, tokens).float()  # (B·T or B, W)
        f = sae.encode(x)
        x_hat = sae.decode(f)
        sq_err += float((x - x_hat).pow(2).sum())
        s1 = x.sum(0).double() if s1 is None else s1 + x.sum(0).double()
        s2 = x.pow(2).sum().double() if s2 is None else s2 + x.pow(2).sum().double()
        count += len(x)
        l0_sum += float((f > 0).sum())
        fired |= (f > 0).any(0).cpu()
        per_image = f.view(len(rows), -1, feats).amax(1) if tokens == "all" else f
        image_max[rows] = per_image.cpu()
    total = float(s2 - s1.pow(2).sum() / count)
    figures = {"explained_variance": round(1 - sq_err / max(total, 1e-12), 4), "l0": round(l0_sum / count, 2),
               "dead": int((~fired).sum()), "activations": count}
    return figures, image_max


def site_for(loaded: Any, layer: int) -> Any:
    from clipterm.vit.sites import site

    return site(loaded.model, layer)


def layer_of(spec: str) -> int:
    """`L4` (or `4`) -> 4; anything else is refused in one line."""
    spec = spec.strip()
    component = names.parse(names.layer(int(spec)) if spec.isdigit() else spec)
    if component.kind != "layer" or component.site != "block":
        raise ClipTermError(f"--layer takes a layer, not {spec!r}", hint="e.g. --layer L4", code=ExitCode.USAGE)
    return int(component.layer)
