"""Ship a trained toy model small: its token embedding pruned to the tokens the toy's texts use (`vit/pruned.py`).

The kept tokens are those of every text the shipped analyses hand the toy's text tower: training-style captions
of the world, every task's zero-shot prompts, each class name alone, and the built-in text pools (`toy`, and
`general`, which ablation and search fall back on). Other tokens embed as zeros in the shipped model.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

CAPTIONS = 20_000  # training-style captions sampled per shipped model: every word of the grammar, many times


@lru_cache(maxsize=2)
def toy_texts(captions: int = CAPTIONS, seed: int = 0) -> tuple[str, ...]:
    """The texts whose tokens a shipped toy keeps."""
    from clipterm.inputs.texts import load_pool
    from clipterm.toyworld.captions import sample_captions, task_prompts
    from clipterm.toyworld.world import TASKS

    texts = sample_captions(captions, seed)
    texts += [prompt for task in TASKS for prompts in task_prompts(task) for prompt in prompts]
    texts += [name for names in TASKS.values() for name in names]
    for pool in ("toy", "general"):
        texts += list(load_pool(pool).texts)
    return tuple(texts)


def ship(source: Path, out_dir: Path, texts: tuple[str, ...] | None = None) -> dict:
    """Copy the model folder `source` (written by `clipterm toy train`) to `out_dir` with a pruned token embedding."""
    import open_clip

    from clipterm.files import atomic_write, load_tensors, save_tensors
    from clipterm.vit import pruned

    config = json.loads((source / "open_clip_config.json").read_text())
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=config["model_cfg"]["text_cfg"]["context_length"])
    state = load_tensors(source / "open_clip_model.safetensors")
    keep = pruned.token_ids(tokenizer, toy_texts() if texts is None else texts)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_tensors(out_dir / "open_clip_model.safetensors", pruned.prune(state, keep))
    for name in ("open_clip_config.json", "training.json"):
        if (source / name).is_file():
            atomic_write(out_dir / name, (source / name).read_bytes())  # never through a link at the destination
    return {"kept_tokens": len(keep), "bytes": (out_dir / "open_clip_model.safetensors").stat().st_size}
