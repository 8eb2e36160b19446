"""Model files with a pruned token embedding: the toy's texts encode exactly as with the full table, and toy-rn fits 10 MB."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from clipterm.errors import ClipTermError
from clipterm.files import load_tensors
from clipterm.locations import TOY_MODEL_DIR
from clipterm.toyworld.captions import sample_captions
from clipterm.toyworld.ship import ship, toy_texts
from clipterm.vit import pruned
from clipterm.vit.models import load_model
from clipterm.vit.textencode import encode_texts


@pytest.fixture(scope="module")
def shipped_toy(tmp_path_factory):
    """The shipped toy ViT, copied, and the same model shipped with its token embedding pruned."""
    root = tmp_path_factory.mktemp("pruned")
    full = root / "full"
    shutil.copytree(TOY_MODEL_DIR, full)
    summary = ship(full, root / "pruned", texts=toy_texts(captions=2000))
    return load_model(f"local-dir:{full}"), load_model(f"local-dir:{root / 'pruned'}"), summary, root


def test_the_pruned_toy_encodes_unseen_world_captions_exactly_as_the_full_one(shipped_toy):
    full, small, summary, root = shipped_toy
    captions = sample_captions(300, seed=7)  # another seed's scenes than those the kept tokens were drawn from
    with torch.no_grad():
        expected = encode_texts(full.model, full.tokenizer, captions)  # (300, D)
        got = encode_texts(small.model, small.tokenizer, captions)  # (300, D)
    assert torch.equal(got, expected)
    assert summary["bytes"] < (root / "full" / "open_clip_model.safetensors").stat().st_size - 10_000_000
    with torch.no_grad():
        outside = encode_texts(small.model, small.tokenizer, ["zygote quasar"])  # tokens no toy text has
    assert not torch.equal(outside, encode_texts(full.model, full.tokenizer, ["zygote quasar"]))


def test_a_pruned_file_keeps_its_ids_and_the_loader_scatters_them_back(shipped_toy):
    full, small, summary, _ = shipped_toy
    ids = small.text_tokens
    assert full.text_tokens is None and len(ids) == summary["kept_tokens"] and torch.all(ids[1:] > ids[:-1])
    table = small.model.token_embedding.weight  # (V, W)
    assert torch.equal(table[ids], full.model.token_embedding.weight[ids])
    dropped = torch.ones(table.shape[0], dtype=torch.bool)
    dropped[ids] = False
    assert table[dropped].abs().max() == 0


def test_a_pruned_model_searches_over_its_kept_words_only(shipped_toy):
    from clipterm.inputs.vocab import default_vocabulary

    full, small, _, _ = shipped_toy
    every, kept = default_vocabulary(full.tokenizer), default_vocabulary(small.tokenizer, small.text_tokens)
    assert {"red", "circle", "star"} <= set(kept.words) and len(kept) < len(every) / 4
    assert set(kept.ids.tolist()) <= set(small.text_tokens.tolist())


def test_a_pruned_embedding_that_does_not_fit_the_config_is_a_one_line_error():
    state = pruned.prune({"token_embedding.weight": torch.randn(100, 4)}, [3, 99])
    with pytest.raises(ClipTermError) as err:
        pruned.unprune(state, 50)
    assert "50-token vocabulary" in err.value.message and "\n" not in err.value.message


def test_toy_rn_ships_under_10_mb(tmp_path):
    import open_clip

    from clipterm.toyworld.rn import RN_MODEL_CFG
    from clipterm.toyworld.train import save_model_dir

    torch.manual_seed(0)
    save_model_dir(open_clip.model.CLIP(**RN_MODEL_CFG).eval(), tmp_path / "full", {"steps": 0}, model_cfg=RN_MODEL_CFG)
    summary = ship(tmp_path / "full", tmp_path / "toy-rn")
    assert summary["bytes"] <= 10 * 2**20, summary
    assert json.loads((tmp_path / "toy-rn" / "training.json").read_text()) == {"steps": 0}
    loaded = load_model(f"local-dir:{tmp_path / 'toy-rn'}")
    assert loaded.info.tower == "resnet" and len(loaded.text_tokens) == summary["kept_tokens"]


def test_toy_ship_on_the_command_line(cli, shipped_toy, tmp_path):
    _, _, _, root = shipped_toy
    result = cli("toy", "ship", str(root / "full"), str(tmp_path / "shipped"))
    assert result.code == 0, result.err
    assert "tokens kept" in result.out and pruned.is_pruned(load_tensors(tmp_path / "shipped" / "open_clip_model.safetensors"))
    refused = cli("toy", "ship", str(tmp_path), str(tmp_path / "again"))
    assert refused.code != 0 and "no training.json" in refused.err
