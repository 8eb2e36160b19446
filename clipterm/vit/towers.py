"""Which decomposition a vision tower gets, and what family it belongs to.

Every tower module (`vit.decompose` for open_clip's ViT, `vit.resnet`, `vit.timm_vit`, `vit.convnext`) gives
`check_supported(model, name)`, `check_stored(model, neurons, token_layers)`, `readout(model)`,
`decompose(model, images, neurons, token_layers)` and `CONVENTION`,
with the same cache layout: `embed + bias + Σ head_out @ readout + Σ mlps == image_embeds`.
"""

from __future__ import annotations

from typing import Any


def tower_module(model: Any) -> Any:
    """The decomposition module for a model's vision tower."""
    from clipterm.vit import convnext, decompose, resnet, timm_vit

    if resnet.is_resnet(model):
        return resnet
    if timm_vit.is_timm_transformer(model):
        return timm_vit
    if hasattr(decompose.vision_tower(model), "trunk") and convnext.is_convnext(model):
        return convnext
    return decompose


def family(model: Any) -> str:
    """A short name of the tower's family and pooling, e.g. `timm VisionTransformer (map)`; caches record it."""
    from clipterm.vit import decompose, resnet

    visual = decompose.vision_tower(model)
    if resnet.is_resnet(model):
        return "open_clip ModifiedResNet (attention pool)"
    trunk = getattr(visual, "trunk", None)
    if trunk is not None:
        pool = "map" if getattr(trunk, "attn_pool", None) is not None else getattr(trunk, "global_pool", "") or "avg"
        return f"timm {type(trunk).__name__} ({pool})"
    pool = {"tok": "class token", "avg": "average pool", "attn": "attentional pool"}[decompose.pooling_of(model)]
    return f"open_clip VisionTransformer ({pool})"


def climb_for(loaded: Any) -> Any:
    """The model side of feature visualisation for a loaded model's tower (`vit/climb.py`); refuses a tower that has
    no objective to climb, in one line."""
    from clipterm.vit import climb, resnet

    refuse_model_analysis(loaded.model, "feature visualisation")
    if resnet.is_resnet(loaded.model):
        return resnet.ResNetClimb(loaded)
    return climb.VitClimb(loaded)


def pool_readout(model: Any) -> Any:
    """(G, dh', D) for a tower that pools by attention after its blocks (a MAP head, CoCa); else None."""
    module = tower_module(model)
    return getattr(module, "pool_readout", lambda _m: None)(model)


CONVNEXT_ANALYSES = ("second-order neuron effects", "a per-patch map", "a per-patch MLP map")  # its channels, blocks


def analysis_refusal(model_info: dict, analysis: str) -> str | None:
    """Why an analysis that follows open_clip's class-token ViT (second-order neurons, per-token maps, feature
    visualisation) cannot run on a tower, in one line naming the model part; None when it can.

    `model_info` is a ModelInfo's JSON (a cache manifest's `model`); caches from before towers were recorded
    read as class-token ViTs or ResNets."""
    tower, pool, fam = model_info.get("tower", "vit"), model_info.get("pool", "tok"), model_info.get("family", "")
    if tower == "convnext":
        return None if analysis in CONVNEXT_ANALYSES else \
            f"{analysis} cannot be computed for a ConvNeXt: it has no attention heads or tokens (its components " \
            "are the last stage's blocks)"
    if pool == "attn":
        return f"{analysis} cannot be computed through an attention-pool head ({fam or 'MAP / attentional pool'}): " \
               "the pool reads every token with its own attention (pool.H*), so no class-token path reaches the embedding"
    if pool == "avg":
        return f"{analysis} cannot be computed for an average-pooled tower ({fam or 'pool_type=avg'}): the embedding " \
               "averages every token, so no class-token path reaches it"
    if fam.startswith("timm"):
        return f"{analysis} follows open_clip's own ViT blocks; this image tower is {fam}, not decomposed that far yet"
    return None


def refuse_analysis(model_info: Any, analysis: str) -> None:
    """Raise the one-line refusal of `analysis_refusal`, if any (exit code: unsupported)."""
    from clipterm.errors import ClipTermError, ExitCode

    info = model_info.to_json() if hasattr(model_info, "to_json") else dict(model_info)
    reason = analysis_refusal(info, analysis)
    if reason:
        raise ClipTermError(reason, hint="TextSpan, ablation, attribution, top images and search work on this cache",
                            code=ExitCode.UNSUPPORTED)


def model_analysis_info(model: Any) -> dict:
    """The tower, pooling and family of a model in hand, as `analysis_refusal` reads them from a manifest."""
    from clipterm.vit import convnext, decompose, resnet

    if resnet.is_resnet(model):
        return {"tower": "resnet", "pool": "tok", "family": family(model)}
    visual = decompose.vision_tower(model)
    trunk = getattr(visual, "trunk", None)
    if trunk is not None:
        if convnext.is_convnext(model):
            return {"tower": "convnext", "pool": "avg", "family": family(model)}
        pool = "attn" if getattr(trunk, "attn_pool", None) is not None else (
            "tok" if getattr(trunk, "global_pool", "") == "token" else "avg")
        return {"tower": "vit", "pool": pool, "family": family(model)}
    return {"tower": "vit", "pool": decompose.pooling_of(model), "family": family(model)}


def refuse_model_analysis(model: Any, analysis: str) -> None:
    """`refuse_analysis` for a model in hand."""
    refuse_analysis(model_analysis_info(model), analysis)


# --------------------------------------------------------------------------- the capability table (docs/models.md)

FAMILY_EXAMPLES = {  # one ModelInfo JSON per family, as a cache manifest records it
    "open_clip ViT, class token (toy)": {"tower": "vit", "pool": "tok", "family": "open_clip VisionTransformer (class token)"},
    "open_clip ModifiedResNet (toy-rn)": {"tower": "resnet", "pool": "tok", "family": "open_clip ModifiedResNet (attention pool)"},
    "timm ViT, MAP head (SigLIP)": {"tower": "vit", "pool": "attn", "family": "timm VisionTransformer (map)"},
    "open_clip ViT, average pool": {"tower": "vit", "pool": "avg", "family": "open_clip VisionTransformer (average pool)"},
    "timm ConvNeXt": {"tower": "convnext", "pool": "avg", "family": "timm ConvNeXt (avg)"},
    "timm ViT, class token": {"tower": "vit", "pool": "tok", "family": "timm VisionTransformer (token)"},
}
GATED = {"neurons build": "second-order neuron effects", "spatial": "a per-patch map",
         "visualise": "feature visualisation"}  # the analyses `analysis_refusal` decides; the rest run everywhere
ANALYSES = ("textspan", "ablate", "attribute", "images", "search", "neurons build", "spatial", "visualise")


def capability(family_info: dict, analysis: str) -> str | None:
    """None where `analysis` runs on the family, else the one-line reason it is refused."""
    gated = GATED.get(analysis)
    return analysis_refusal(family_info, gated) if gated else None


def capability_table() -> str:
    """The Markdown table of docs/models.md: family by analysis, ✓ or ✗ (the refusal follows the table)."""
    rows = ["| family | " + " | ".join(ANALYSES) + " |", "|---|" + "---|" * len(ANALYSES)]
    for family_name, info in FAMILY_EXAMPLES.items():
        cells = ["✓" if capability(info, a) is None else "✗" for a in ANALYSES]
        rows.append(f"| {family_name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)
def position_layers(model: Any, layers: list[int] | None, n_layers: int) -> list[int]:
    """The layers whose per-position activations factorise: a ViT's MLPs (default: the middle one), a ResNet's
    last stage (the grid its attention pool reads, the only one it has)."""
    from clipterm.vit import resnet

    if resnet.is_resnet(model):
        return [resnet.STAGES - 1]
    return layers if layers is not None else [n_layers // 2]


def position_activations(model: Any, pixels: Any, layers: list[int]) -> Any:
    """(B, P, F) per-position activations, patches only: a ViT's MLP post-activations of `layers` side by side,
    or a ResNet's last-stage channels at each cell of its grid."""
    import torch

    from clipterm.vit import resnet

    if resnet.is_resnet(model):
        grid = resnet.last_stage(model, pixels).float().cpu()  # (B, C, h, w)
        return grid.flatten(2).transpose(1, 2)  # (B, hw, C)
    from clipterm.analyses.spatial import mlp_activations

    acts, _ = mlp_activations(model, pixels, layers)
    return torch.cat([acts[layer][:, 1:] for layer in layers], dim=-1)  # (B, P, |layers|·M)


def activation_directions(model: Any, layers: list[int], loadings: Any) -> Any:
    """Unit joint-space directions (k, D) of activation loadings (k, F): what they write towards the embedding.
    A ViT's neurons through c_proj and the linearised ln_post; a ResNet's channels through the pool's value and
    output maps (each head's attention taken as uniform)."""
    import torch.nn.functional as F

    from clipterm.vit import resnet

    if resnet.is_resnet(model):
        import torch

        channels = torch.arange(loadings.shape[1])
        with torch.no_grad():
            basis = resnet.channel_basis(model, channels).sum(0).float().cpu()  # (C, D)
        return F.normalize(loadings.float() @ basis, dim=-1)  # (k, D)
    from clipterm.analyses.factorise import factor_directions

    return factor_directions(model, layers, loadings)
