"""Which open_clip models clipterm decomposes, decided from their configs alone (no weights, no model built):
each arch's image tower kind, the reason a tower is refused and the nearest arch that is not, and the config an
arch/tag pair resolves to.
"""

from __future__ import annotations

import functools

from clipterm import locations
from clipterm.errors import ClipTermError, ExitCode


# timm modules whose towers clipterm decomposes (clipterm.vit.timm_vit, clipterm.vit.convnext), and why the others not.
TIMM_TRANSFORMERS = ("vision_transformer", "vision_transformer_hybrid", "vitamin", "eva", "vision_transformer_relpos")
TIMM_REFUSED = {
    "fastvit": "FastViT (MobileCLIP-S*): its final_conv (a MobileOne conv, BatchNorm and GELU) follows the last stage, "
               "so no stage's blocks add up to the embedding",
    "swin_transformer": "Swin: window attention with patch merging between stages; not decomposed yet",
}


def timm_module(name: str) -> str | None:
    """The timm module that registers a model name (`vision_transformer`, `eva`, `convnext`, ...), or None."""
    try:
        import timm.models
    except ImportError:
        return None
    for module in (*TIMM_TRANSFORMERS, "convnext", *TIMM_REFUSED):
        if timm.models.is_model_in_modules(name, [module]):
            return module
    return None


def timm_reason(vision: dict) -> str | None:
    """Why a timm tower (vision_cfg with timm_model_name) does not decompose, or None when it does."""
    name = vision["timm_model_name"]
    try:
        import timm  # noqa: F401
    except ImportError:
        return f"timm-based vision tower ({name}) and timm is not installed (pip install timm)"
    module = timm_module(name)
    if module in TIMM_REFUSED:
        return TIMM_REFUSED[module]
    if module is None:
        return f"timm tower {name} (not a timm ViT, Eva or ConvNeXt)"
    if vision.get("timm_proj") == "mlp":
        return "timm_proj='mlp': a nonlinear projection head (an MLP) after the pooled features"
    if vision.get("timm_pool") in ("abs_attn", "rot_attn", "max", "avgmax"):
        return f"timm_pool={vision['timm_pool']!r} (token, avg and map pools are decomposed)"
    return None


def tower_kind(model_cfg: dict) -> str:
    """The image tower's family and pooling from its config alone, e.g. `timm vision_transformer (map)`."""
    vision = model_cfg.get("vision_cfg", {})
    if vision.get("timm_model_name"):
        module = timm_module(vision["timm_model_name"]) or "timm"
        pool = vision.get("timm_pool") or ("avg" if module in ("convnext", "vitamin", "fastvit") else
                                           _timm_default_pool(vision["timm_model_name"]))
        return f"timm {module} ({pool})"
    if isinstance(vision.get("layers"), (list, tuple)):
        return "open_clip ModifiedResNet (attention pool)"
    if vision.get("attentional_pool"):
        return "open_clip ViT (attentional pool)"
    return f"open_clip ViT ({'average pool' if vision.get('pool_type') == 'avg' else 'class token'})"


@functools.cache
def _timm_default_pool(name: str) -> str:
    """A timm model's own global_pool (`timm_pool: ''` keeps it), from the model built on the meta device."""
    try:
        import timm
        import torch

        with torch.device("meta"):
            return getattr(timm.create_model(name, pretrained=False, num_classes=0), "global_pool", "") or "none"
    except (RuntimeError, ValueError, TypeError, KeyError):  # an unknown name: the support check says why
        return "default"


def unsupported_reason(model_cfg: dict) -> str | None:
    """Why the exact decomposition cannot run on a vision tower, or None when it can."""
    vision = model_cfg.get("vision_cfg", {})
    if vision.get("timm_model_name"):
        return timm_reason(vision)
    if isinstance(vision.get("layers"), (list, tuple)):
        return None  # ModifiedResNet: decomposed through its attention pool (clipterm.vit.resnet)
    if isinstance(vision.get("attentional_pool"), str):
        return f"attentional_pool={vision['attentional_pool']!r} (open_clip's untested two-pool setup)"
    if vision.get("pool_type", "tok") not in ("tok", "avg"):
        return f"pool_type={vision['pool_type']!r} (the class token and the average are decomposed)"
    if vision.get("attentional_pool") and vision.get("pool_type", "tok") != "tok":
        return f"attentional pooling with pool_type={vision['pool_type']!r} (only the first query is decomposed)"
    if vision.get("scale_attn"):
        return "ln_attn (scale_attn=True) breaks the per-head split"
    if vision.get("scale_attn_inner"):
        return "ln_inner (scale_attn_inner=True) breaks the per-head split"
    return None


def refuse_unsupported(name: str, model_cfg: dict) -> None:
    """Raise a clear error naming the model and the option when the decomposition can't be exact."""
    reason = unsupported_reason(model_cfg)
    if reason:
        near = nearest_supported(name, model_cfg)
        raise ClipTermError(
            f"{name} is not supported: {reason}",
            hint=(f"the nearest supported arch is {near}; " if near else "") + "see docs/models.md for every arch and why",
            code=ExitCode.UNSUPPORTED,
        )


def nearest_supported(name: str, model_cfg: dict | None = None) -> str | None:
    """The supported open_clip arch closest to `name`: same family first (by embedding size), then by spelling."""
    import difflib

    import open_clip

    if name not in open_clip.list_models():  # a model in hand ("model", a folder): no arch to be near
        return None
    supported = [a for a in open_clip.list_models() if unsupported_reason(arch_config(a) or {}) is None]
    if not supported:
        return None
    family = ("MobileCLIP" if "MobileCLIP" in name else name.split("-")[0].split("_")[0]).lower()
    same = [a for a in supported if a.lower().startswith(family)]
    if same and model_cfg:
        dim = model_cfg.get("embed_dim")
        same.sort(key=lambda a: (abs((arch_config(a) or {}).get("embed_dim", 0) - (dim or 0)), a))
        return same[0]
    close = difflib.get_close_matches(name, supported, n=1, cutoff=0.0)
    return close[0] if close else None


def arch_config(arch: str) -> dict | None:
    import open_clip

    return open_clip.get_model_config(arch)


def needs_quick_gelu(arch: str, pretrained: str | None) -> bool:
    """True when the tag was trained with QuickGELU (every `openai` tag) or the arch already uses it."""
    from open_clip.pretrained import get_pretrained_cfg

    cfg = arch_config(arch) or {}
    tag_cfg = get_pretrained_cfg(arch, pretrained) if pretrained else {}
    return bool(cfg.get("quick_gelu") or (tag_cfg or {}).get("quick_gelu"))


def has_quick_gelu_twin(arch: str) -> bool:
    """Whether open_clip knows QuickGELU weights for this GELU arch (a `-quickgelu` twin, or a tag that needs it):
    then a weights file alone cannot say which activation it was trained with."""
    import open_clip

    if (arch_config(arch) or {}).get("quick_gelu"):
        return False
    return f"{arch}-quickgelu" in open_clip.list_models() or any(
        needs_quick_gelu(arch, tag) for tag in open_clip.list_pretrained_tags_by_model(arch))


def choose_quick_gelu(arch: str, said: list[tuple[bool, str]]) -> tuple[bool | None, str]:
    """The activation to build `arch` with, from what the option, tag, arch name and weights file say (in that
    order), and where it came from. Statements that disagree are refused; with none, an arch that has a QuickGELU
    twin gives (None, "") (the caller refuses, `unknown_quick_gelu`), any other arch is GELU."""
    for value, where in said[1:]:
        if value != said[0][0]:
            first = said[0][1]
            raise ClipTermError(
                f"{first} says {_activation(said[0][0])} but {where} says {_activation(value)}",
                hint="drop the option that disagrees, or pass the arch whose activation the weights were trained with",
            )
    if said:
        return said[0]
    if has_quick_gelu_twin(arch):
        return None, ""
    return False, f"{arch} (open_clip has no QuickGELU variant of it)"


def unknown_quick_gelu(arch: str, weights_name: str) -> ClipTermError:
    """The refusal for a weights file that does not say its activation, where guessing wrong is silently wrong."""
    import open_clip

    twin = f"{arch}-quickgelu"
    quick = f"--model {twin} (or --force-quick-gelu)" if twin in open_clip.list_models() else "--force-quick-gelu"
    return ClipTermError(
        f"{weights_name} does not say whether {arch} was trained with QuickGELU or GELU, and the wrong one gives "
        "silently wrong results",
        hint=f"for OpenAI's weights (and others trained with QuickGELU) pass {quick}; for GELU ones (LAION, DataComp) "
             "pass --no-quick-gelu; or put open_clip's open_clip_config.json beside the file",
    )


def _activation(quick_gelu: bool) -> str:
    return "QuickGELU" if quick_gelu else "GELU"


def resolved_model_cfg(arch: str, pretrained: str | None) -> dict:
    """The open_clip model config clipterm builds for (arch, tag), QuickGELU included."""
    cfg = arch_config(arch)
    if cfg is None:
        raise unknown_model(arch)
    cfg = dict(cfg)
    cfg["quick_gelu"] = needs_quick_gelu(arch, pretrained)
    return cfg


def unknown_model(name: str) -> ClipTermError:
    import difflib

    import open_clip

    close = difflib.get_close_matches(name, [*locations.TOY_MODEL_DIRS, *open_clip.list_models()], n=3)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return ClipTermError(f"unknown model {name!r}", hint=hint + "run `clipterm models` for the list", code=ExitCode.NOT_FOUND)
