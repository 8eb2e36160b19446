"""`clipterm demo`: the main job on the built-in toy CLIP, offline. It grows as the analyses land."""

from __future__ import annotations

import time

from rich.console import Console


def run_demo(n: int, seed: int, console: Console) -> dict:
    """Load the toy CLIP, score it zero-shot on n fresh synthetic scenes, and print a short summary."""
    from clipterm.cli.toy import accuracy_table
    from clipterm.models import load_model
    from clipterm.toyworld.evaluate import evaluate_model

    start = time.perf_counter()
    with console.status("loading the toy CLIP"):
        loaded = load_model("toy")
    info = loaded.info
    console.print(
        f"[bold]clipterm demo[/] on the built-in toy CLIP: a {info.layers}-layer ViT, {info.heads} heads of width "
        f"{info.head_dim}, {info.image_size}px images in {info.patch_size}px patches, joint space {info.embed_dim}-d."
    )
    with console.status(f"scoring {n} fresh synthetic images"):
        acc = evaluate_model(loaded.model, loaded.tokenizer, n=n, seed=seed)
    console.print(accuracy_table(acc, title=f"zero-shot accuracy on {n} fresh images (seed {seed})"))
    console.print(
        f"done in {time.perf_counter() - start:.1f}s. Next: [bold]clipterm toy render --n 50 DIR[/] to see the world, "
        "[bold]clipterm models[/] for real models."
    )
    return acc
