"""Upper bounds on the size-like options, tied to the memory a value costs: a value over its bound is refused in
one line that names the bound, before anything is loaded or allocated (`--draws 10^12` would otherwise ask numpy
for 22 TB). docs/reliability.md ("Every input bounded") gives the reasoning behind each number.

`BOUNDS` maps (command, option) to (bound, what the bound protects); `UNBOUNDED` lists every other integer option
with why it needs none (a seed, a count of steps that costs time, not memory, a slice of rows already in memory,
or one checked against the model or the cache where it is used). tests/test_reliability3.py checks that every
integer option of the CLI is in one of the two.
"""

from __future__ import annotations

from typing import Any, Callable

from clipterm.errors import ClipTermError

BOUNDS: dict[tuple[str, str], tuple[int, str]] = {
    ("visualise", "--size"): (4096, "the image, its gradient and Adam's two moments hold 48 bytes a pixel: 800 MB at 4096"),
    ("visualise", "--diverse"): (64, "each image is a forward and backward pass of the model, all in memory at once"),
    ("ablate", "--draws"): (1_000_000, "each bootstrap draw holds 32 bytes per task: 32 MB at a million"),
    ("textspan", "--texts"): (4096, "texts per component, each a projection of the whole pool"),
    ("textspan", "--rank"): (4096, "the subspace's basis is rank x embedding width per component"),
    ("textspan", "--baseline-draws"): (1000, "each draw projects the component on as many random pool texts"),
    ("search", "--beam"): (64, "the beam's candidates, beam x (top tokens x positions + random), are encoded each step"),
    ("search", "--top-tokens"): (256, "tokens scored exactly per position and beam string, each a text-model pass"),
    ("search", "--random"): (256, "random moves per beam string and step, each a text-model pass"),
    ("images", "--top"): (1000, "each image is decoded and held as a thumbnail"),
    ("images", "--size"): (512, "thumbnail side in pixels: 512 is 256 terminal rows, 0.8 MB an image"),
    ("spatial", "--nmf"): (256, "factors of the tokens' activations: K x (tokens + width) floats per step"),
    ("spatial", "--size"): (512, "thumbnail side in pixels: 512 is 256 terminal rows"),
    ("demo", "--n"): (200_000, "held-out scenes are drawn and held together, 12 kB each: 2.4 GB at 200,000, as toy eval"),
    ("demo", "--scenes"): (1_000_000, "scenes in the demo cache: its shards hold every row on disk"),
    ("toy render", "--n"): (1_000_000, "images written, each a PNG on disk"),
    ("toy train", "--batch-size"): (4096, "images per step, each a forward and backward pass held at once"),
    ("toy train", "--workers"): (64, "each worker is a process with its own copy of the world"),
    ("cache build", "--batch-size"): (4096, "images per forward pass, every component's output held at once"),
    ("cache build", "--workers"): (64, "each worker is a process decoding images ahead"),
    ("cache build", "--shard-rows"): (16_384, "a shard is held in memory until written: 2.4 GB at 16,384 rows of ViT-B"),
    ("neurons build", "--top-images"): (10_000, "the top images of every neuron are held: neurons x top x 8 bytes"),
    ("neurons build", "--batch-size"): (4096, "images per forward pass, every neuron's second-order effect held at once"),
    ("neurons build", "--workers"): (64, "each worker is a process decoding images ahead"),
    ("neurons list", "--k"): (1024, "texts per sparse decomposition: k x pool similarities per neuron"),
    ("sae train", "--features"): (262_144, "the encoder and decoder are 2 x width x features floats, with Adam's moments"),
    ("sae train", "--batch-size"): (65_536, "activations per step, each encoded into every feature at once"),
    ("sae train", "--k"): (4096, "active features kept per activation (checked below --features too)"),
}

UNBOUNDED: dict[tuple[str, str], str] = {
    ("textspan", "--evaluate"): "a number of layers, checked against the model",
    ("ablate", "--top"): "rows printed, a slice of rows already computed",
    ("attribute", "--top"): "rows printed, a slice of rows already computed",
    ("search", "--steps"): "time, not memory",
    ("search", "--patience"): "time, not memory",
    ("search", "--seed"): "a seed",
    ("search", "--max-tokens"): "checked against the model's context length",
    ("visualise", "--steps"): "time, not memory (a float a step)",
    ("visualise", "--seed"): "a seed",
    ("demo", "--seed"): "a seed",
    ("tui", "--port"): "a port, 1..65535",
    ("toy render", "--seed"): "a seed",
    ("toy render", "--world"): "checked: 1 or 2",
    ("toy train", "--world"): "checked: 1 or 2",
    ("toy train", "--steps"): "time, not memory",
    ("toy train", "--seed"): "a seed",
    ("toy train", "--threads"): "torch's thread count",
    ("toy train", "--eval-every"): "time, not memory",
    ("toy train", "--warmup"): "steps of warmup, not memory",
    ("toy eval", "--n"): "bounded by toy eval itself (EVAL_MAX: 200,000 scenes of 12 kB)",
    ("toy eval", "--seed"): "a seed",
    ("toy eval", "--world"): "checked: 1 or 2",
    ("texts show", "--limit"): "texts printed, a slice of the pool already loaded",
    ("neurons list", "--top"): "rows printed, a slice of neurons already ranked",
    ("neurons list", "--texts"): "texts printed per neuron, a slice of the k chosen",
    ("sae train", "--steps"): "time, not memory",
    ("sae train", "--seed"): "a seed",
    ("sae list", "--top"): "rows printed, a slice of features already ranked",
    ("sae list", "--texts"): "texts printed per feature, a slice of the pool's ranking",
}


def _refuse_over(bound: int, why: str, callback: Callable[..., Any] | None) -> Callable[..., Any]:
    def check(ctx: Any, param: Any, value: Any) -> Any:
        if isinstance(value, int) and value > bound:
            option = param.opts[0]
            raise ClipTermError(f"{option} {value:,} is too large: at most {bound:,} ({why})",
                                hint=f"use {option} {bound} or less")
        return callback(ctx, param, value) if callback is not None else value

    return check


def bounded_sizes(command: Any, path: str = "") -> Any:
    """Make every option in BOUNDS, in `command` and its sub-commands, refuse a value over its bound."""
    for param in command.params:
        bound = BOUNDS.get((path, param.opts[0]))
        if bound is not None and not getattr(param, "_bounded", False):
            param.callback, param._bounded = _refuse_over(*bound, param.callback), True  # type: ignore[attr-defined]
    for name, sub in getattr(command, "commands", {}).items():
        bounded_sizes(sub, f"{path} {name}".strip())
    return command
