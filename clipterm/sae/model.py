"""The sparse autoencoder and its open file format, `sae.L4.safetensors` (docs/cache-format.md).

Tensors, named as sae-lens names them: `W_enc` (d, F), `b_enc` (F), `W_dec` (F, d), `b_dec` (d), and for a
JumpReLU `threshold` (F). Applied with plain torch to a residual `x` (…, d):

    x = x * norm_scale                                     # the input normalisation (metadata)
    pre = (x - b_dec) @ W_enc + b_enc                      # (…, F)
    f = activation(pre)                                    # topk / batchtopk / relu / jumprelu, below
    x_hat = (f @ W_dec + b_dec) / norm_scale               # the reconstruction, in the residual's units

- `topk`: relu(pre), all but its k largest set to 0;
- `batchtopk`: trained with the k·B largest over a batch; applied as relu(pre) where pre > `threshold` (a number);
- `relu`: relu(pre) (trained with an L1 penalty, `l1`);
- `jumprelu`: pre where pre > threshold[f] (the `threshold` tensor), else 0.

Metadata (all strings, safetensors' rule): `format`, `site` (`block_output`), `layer` (`L4`), `tokens` (`cls`
or `all`), `norm_scale`, `activation`, `k`, `threshold`, `l1`, `width`, `features`, `training` (JSON figures).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from clipterm import files, names
from clipterm.errors import ClipTermError, ExitCode

FORMAT = "clipterm.sae/1"
ARCHS = ("topk", "batchtopk", "relu", "jumprelu")
TOKENS = ("all", "cls")
JUMP_BANDWIDTH = 0.05  # the straight-through estimator's kernel width for JumpReLU thresholds (normalised units)


def sae_file(directory: str | Path, layer: int) -> Path:
    return Path(directory) / f"sae.{names.layer(layer)}.safetensors"


def built_layers(directory: str | Path) -> list[int]:
    found = []
    for path in Path(directory).glob("sae.L*.safetensors"):
        stem = path.name[len("sae.L"): -len(".safetensors")]
        if stem.isdigit():
            found.append(int(stem))
    return sorted(found)


@dataclass
class Config:
    width: int  # d: the residual's width
    features: int  # F
    arch: str = "topk"
    k: int = 16  # topk, batchtopk: active features per token
    l1: float = 1e-3  # relu: the L1 coefficient (jumprelu: the L0 coefficient)
    tokens: str = "all"
    layer: int = 0
    extra: dict = field(default_factory=dict)

    def check(self) -> None:
        if self.arch not in ARCHS:
            raise ClipTermError(f"unknown --arch {self.arch!r}", hint=f"one of {', '.join(ARCHS)}")
        if self.tokens not in TOKENS:
            raise ClipTermError(f"unknown --tokens {self.tokens!r}", hint="all (every token or position) or cls")
        if self.features < 1:
            raise ClipTermError(f"--features {self.features}: an SAE needs at least one feature", hint="try 8 × the width")
        if self.arch in ("topk", "batchtopk") and not 0 < self.k < self.features:
            raise ClipTermError(f"--k {self.k} must be between 1 and --features − 1 ({self.features - 1})",
                                hint=f"k is how many of the {self.features} features fire per token; try 16")


class SAE(nn.Module):
    """d → F → d. Decoder rows are kept at unit norm while training (`normalise_decoder`)."""

    def __init__(self, config: Config, generator: torch.Generator | None = None):
        super().__init__()
        config.check()
        self.config = config
        d, f = config.width, config.features
        w = torch.randn(f, d, generator=generator)
        w = w / w.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w.clone())  # (F, d)
        self.W_enc = nn.Parameter(w.T.clone())  # (d, F)
        self.b_enc = nn.Parameter(torch.zeros(f))
        self.b_dec = nn.Parameter(torch.zeros(d))
        self.log_threshold = nn.Parameter(torch.full((f,), -3.0)) if config.arch == "jumprelu" else None
        self.register_buffer("norm_scale", torch.tensor(1.0))
        self.register_buffer("threshold", torch.tensor(0.0))  # batchtopk: the inference threshold

    # ----------------------------------------------------------------- the forward

    def pre(self, x: Tensor) -> Tensor:
        """(…, F) pre-activations of normalised inputs."""
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def activate(self, pre: Tensor, training: bool = False) -> Tensor:
        arch, k = self.config.arch, self.config.k
        if arch == "topk" or (arch == "batchtopk" and not training and float(self.threshold) <= 0):
            values, indices = pre.relu().topk(k, dim=-1)
            return torch.zeros_like(pre).scatter_(-1, indices, values)
        if arch == "batchtopk":
            if training:
                flat = pre.relu().flatten()
                values, indices = flat.topk(k * pre.shape[0])
                return torch.zeros_like(flat).scatter_(0, indices, values).view_as(pre)
            return pre * (pre > self.threshold)
        if arch == "relu":
            return pre.relu()
        theta = self.log_threshold.exp()
        if training:
            return pre * _Step.apply(pre, theta)
        return pre * (pre > theta)

    def encode(self, x: Tensor) -> Tensor:
        """Features (…, F) of raw residuals (…, d)."""
        return self.activate(self.pre(x * self.norm_scale))

    def decode(self, f: Tensor) -> Tensor:
        """Raw residuals (…, d) from features."""
        return (f @ self.W_dec + self.b_dec) / self.norm_scale

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    @torch.no_grad()
    def normalise_decoder(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp(min=1e-8)

    def jump_threshold(self) -> Tensor | None:
        return None if self.log_threshold is None else self.log_threshold.detach().exp()

    # ----------------------------------------------------------------- the file

    def tensors(self) -> dict[str, Tensor]:
        out = {"W_enc": self.W_enc.detach(), "b_enc": self.b_enc.detach(), "W_dec": self.W_dec.detach(),
               "b_dec": self.b_dec.detach()}
        if self.log_threshold is not None:
            out["threshold"] = self.jump_threshold()
        return {k: v.float().contiguous().cpu() for k, v in out.items()}

    def metadata(self, training: dict | None = None) -> dict[str, str]:
        c = self.config
        return {"format": FORMAT, "site": "block_output", "layer": names.layer(c.layer), "tokens": c.tokens,
                "norm_scale": repr(float(self.norm_scale)), "activation": c.arch, "k": str(c.k),
                "threshold": repr(float(self.threshold)), "l1": repr(c.l1), "width": str(c.width),
                "features": str(c.features), "training": json.dumps(training or {}), **c.extra}


class _Step(torch.autograd.Function):
    """H(pre − θ) with the JumpReLU paper's pseudo-derivative for θ (a rectangle kernel of width JUMP_BANDWIDTH)."""

    @staticmethod
    def forward(ctx, pre, theta):
        ctx.save_for_backward(pre, theta)
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, theta = ctx.saved_tensors
        near = ((pre - theta).abs() < JUMP_BANDWIDTH / 2).to(pre.dtype)
        grad_theta = -(theta / JUMP_BANDWIDTH) * near * grad
        return None, grad_theta.reshape(-1, theta.shape[-1]).sum(0)


def save(sae: SAE, path: Path, training: dict | None = None, identity: dict | None = None) -> str:
    """Write atomically; returns the file's sha256."""
    meta = sae.metadata(training)
    meta.update(identity or {})
    return files.save_tensors(path, sae.tensors(), metadata=meta)


def from_tensors(tensors: dict[str, Tensor], meta: dict[str, str], what: str) -> SAE:
    """An SAE from its four tensors and metadata (missing metadata: a plain ReLU SAE of no normalisation)."""
    missing = [n for n in ("W_enc", "b_enc", "W_dec", "b_dec") if n not in tensors]
    if missing:
        raise ClipTermError(f"{what} lacks the tensor{'s' if len(missing) > 1 else ''} {', '.join(missing)}",
                            hint="an SAE file holds W_enc (d, F), b_enc (F), W_dec (F, d) and b_dec (d), as sae-lens "
                                 "names them", code=ExitCode.INVALID_DATA)
    w_enc, w_dec = tensors["W_enc"], tensors["W_dec"]
    if w_enc.dim() != 2 or w_dec.shape != w_enc.T.shape or tensors["b_enc"].shape != (w_enc.shape[1],) \
            or tensors["b_dec"].shape != (w_enc.shape[0],):
        raise ClipTermError(f"{what}: the shapes do not fit one SAE (W_enc {tuple(w_enc.shape)}, W_dec "
                            f"{tuple(w_dec.shape)}, b_enc {tuple(tensors['b_enc'].shape)}, b_dec "
                            f"{tuple(tensors['b_dec'].shape)})", hint="W_enc (d, F), b_enc (F), W_dec (F, d), b_dec (d)",
                            code=ExitCode.INVALID_DATA)
    d, f = w_enc.shape
    arch = meta.get("activation", "jumprelu" if "threshold" in tensors else "relu")
    if arch not in ARCHS:
        raise ClipTermError(f"{what}: activation {arch!r} is not one clipterm applies", hint=f"one of {', '.join(ARCHS)}",
                            code=ExitCode.UNSUPPORTED)
    k = int(meta.get("k", min(16, f - 1)))
    config = Config(d, f, arch, k=k if arch in ("topk", "batchtopk") else max(1, min(16, f - 1)),
                    l1=float(meta.get("l1", 0.0)), tokens=meta.get("tokens", "all"),
                    layer=names.parse(meta.get("layer", "L0")).layer or 0)
    sae = SAE(config)
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(sae, name).copy_(tensors[name].float())
        if arch == "jumprelu":
            if "threshold" not in tensors or tensors["threshold"].shape != (f,):
                raise ClipTermError(f"{what}: a JumpReLU SAE needs a threshold tensor of shape ({f},)",
                                    code=ExitCode.INVALID_DATA)
            sae.log_threshold.copy_(tensors["threshold"].float().clamp(min=1e-12).log())
        sae.norm_scale.fill_(float(meta.get("norm_scale", 1.0)))
        sae.threshold.fill_(float(meta.get("threshold", 0.0)))
    return sae.eval()


def load(path: Path) -> tuple[SAE, dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = dict(handle.metadata() or {})
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    return from_tensors(tensors, meta, path.name), meta


def read_foreign(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and metadata of an SAE trained elsewhere: safetensors, or a `.pt` read with `weights_only=True`."""
    if not path.is_file():
        raise ClipTermError(f"no such file: {path}", code=ExitCode.NOT_FOUND)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata() or {})
        except (SafetensorError, OSError, ValueError) as exc:
            raise ClipTermError(f"{path.name} is not a readable safetensors file: {str(exc).splitlines()[0][:120]}",
                                code=ExitCode.INVALID_DATA) from None
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - an UnpicklingError names the code it refused to run
        import re

        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        why = f"it would run {found[1]}" if found else "it is not a torch.save file of tensors"
        raise ClipTermError(f"{path.name} was refused: {why}",
                            hint="clipterm reads .pt files with weights_only=True and runs no code from them; "
                                 "save the SAE's tensors with torch.save({'W_enc': ..., ...}) or as safetensors",
                            code=ExitCode.INVALID_DATA) from None
    if isinstance(data, dict) and "state_dict" in data and isinstance(data["state_dict"], dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise ClipTermError(f"{path.name} holds a {type(data).__name__}, not a dict of tensors",
                            hint="save {'W_enc': ..., 'b_enc': ..., 'W_dec': ..., 'b_dec': ...}", code=ExitCode.INVALID_DATA)
    tensors = {str(k): v for k, v in data.items() if isinstance(v, Tensor)}
    meta = {str(k): str(v) for k, v in data.items() if isinstance(v, (str, int, float))}
    return tensors, meta


def describe_file(meta: dict[str, Any]) -> str:
    arch = meta.get("activation", "?")
    extra = f" k={meta.get('k')}" if arch in ("topk", "batchtopk") else ""
    return f"{meta.get('features', '?')} features, {arch}{extra}, {meta.get('tokens', '?')} tokens of {meta.get('layer', '?')}"
