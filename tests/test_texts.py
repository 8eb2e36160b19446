"""Text pools, the fast text encoder, and the text-embedding cache."""

from __future__ import annotations

import json

import pytest
import torch

from clipterm.errors import ClipTermError
from clipterm.inputs.texts import embed_pool, embeddings_path, load_pool, model_key, pool_sha256
from clipterm.vit.textencode import encode_tokens, fallback_reason

SHORT_AND_LONG = ["a red circle", "x", 'the word "cat" written in blue on a dark striped background', "big " * 40, "a"]


# --------------------------------------------------------------------------- pools


def test_builtin_toy_pool_covers_the_world_and_has_distractors():
    from clipterm.toyworld.captions import task_prompts
    from clipterm.toyworld.world import TASKS

    pool = load_pool("toy")
    assert len(set(pool.texts)) == len(pool) and all(t.strip() == t and t for t in pool.texts)
    prompts = {p for task in TASKS for per_class in task_prompts(task) for p in per_class}
    assert prompts <= set(pool.texts)  # every zero-shot prompt is in it
    assert {"colour", "shape", "size", "position", "background", "word", "distractor"} <= set(pool.topics)
    assert pool.sha256 == pool_sha256(pool.texts)


def test_builtin_general_pool_is_large_and_varied():
    pool = load_pool("general")
    assert len(pool) >= 10_000 and len(set(pool.texts)) == len(pool)
    topics = set(pool.topics)
    assert {"imagenet", "colour", "texture", "shape", "material", "place", "art style", "photo style", "country",
            "city", "letter", "digit", "word"} <= topics
    assert "an orange cup" in pool.texts and "a orange cup" not in pool.texts


def test_user_pool_drops_blanks_and_duplicates_and_counts_them(tmp_path):
    path = tmp_path / "pool.txt"
    path.write_text("a cat\n\n  a dog  \na cat\n   \nune tête\n", encoding="utf-8")
    pool = load_pool(str(path))
    assert pool.texts == ("a cat", "a dog", "une tête")
    assert (pool.dropped_blank, pool.dropped_duplicates) == (2, 1)
    assert pool.sha256 == pool_sha256(["a cat", "a dog", "une tête"])


def test_an_empty_pool_is_an_error(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("\n  \n\n", encoding="utf-8")
    with pytest.raises(ClipTermError, match="empty"):
        load_pool(str(path))


def test_a_pool_that_is_not_utf8_is_an_error_naming_the_line(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("a cat\nune t\xeate\n".encode("latin-1"))
    with pytest.raises(ClipTermError, match="not UTF-8.*line 2") as info:
        load_pool(str(path))
    assert "UTF-8" in info.value.hint


def test_an_unknown_pool_says_which_pools_exist():
    with pytest.raises(ClipTermError) as info:
        load_pool("no-such-pool")
    assert "toy" in info.value.hint and "general" in info.value.hint


def test_texts_longer_than_the_context_are_flagged(toy, tmp_path):
    path = tmp_path / "long.txt"
    path.write_text("short\n" + "very " * 60 + "long\n", encoding="utf-8")
    assert load_pool(str(path)).too_long(toy.tokenizer, toy.info.context_length) == [1]


# --------------------------------------------------------------------------- the fast encoder


def test_fast_encoder_equals_encode_text_on_the_toy_model(toy):
    tokens = toy.tokenizer(SHORT_AND_LONG * 3)
    with torch.no_grad():
        expected = toy.model.encode_text(tokens)
    assert fallback_reason(toy.model) is None
    torch.testing.assert_close(encode_tokens(toy.model, tokens, batch_size=4), expected, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def vit_b32():
    import open_clip

    torch.manual_seed(1)
    return open_clip.create_model("ViT-B-32").eval(), open_clip.get_tokenizer("ViT-B-32")


def test_fast_encoder_equals_encode_text_on_a_random_vit_b32_text_tower(vit_b32):
    model, tokenizer = vit_b32
    tokens = tokenizer(SHORT_AND_LONG * 2)
    with torch.no_grad():
        expected = model.encode_text(tokens)
    torch.testing.assert_close(encode_tokens(model, tokens, batch_size=3), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(encode_tokens(model, tokens, normalize=True), torch.nn.functional.normalize(expected, dim=-1),
                               atol=1e-5, rtol=1e-5)


def small_custom_text_clip(**text_cfg):
    """A tiny CustomTextCLIP, whose text tower is a TextTransformer under `.text`."""
    import open_clip

    torch.manual_seed(2)
    text = dict(context_length=24, vocab_size=49408, width=32, heads=2, layers=2, **text_cfg)
    vision = dict(image_size=16, layers=1, width=32, head_width=16, patch_size=8)
    return open_clip.CustomTextCLIP(embed_dim=16, vision_cfg=vision, text_cfg=text).eval()


@pytest.mark.parametrize(
    ("text_cfg", "exact"),
    [({}, True), ({"pool_type": "last"}, False), ({"no_causal_mask": True}, False), ({"proj_bias": True}, True)],
)
def test_custom_text_towers_are_exact_or_fall_back(text_cfg, exact):
    import open_clip

    model = small_custom_text_clip(**text_cfg)
    tokens = open_clip.get_tokenizer("ViT-B-32", context_length=24)(SHORT_AND_LONG)
    with torch.no_grad():
        expected = model.encode_text(tokens)
    assert (fallback_reason(model) is None) == exact
    torch.testing.assert_close(encode_tokens(model, tokens, batch_size=2), expected, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- the embedding cache


def test_pool_embeddings_are_cached_per_weights_and_pool(toy, tmp_path, monkeypatch):
    path = tmp_path / "pool.txt"
    path.write_text("a red circle\na blue star\n", encoding="utf-8")
    pool = load_pool(str(path))
    first = embed_pool(toy, pool)
    cached = embeddings_path(model_key(toy), pool)
    assert cached.is_file() and not list(cached.parent.glob("*.tmp"))

    def refuse(*_, **__):
        raise AssertionError("should have come from the cache")

    monkeypatch.setattr("clipterm.vit.textencode.encode_texts", refuse)
    torch.testing.assert_close(embed_pool(toy, pool), first)

    path.write_text("a red circle\na green star\n", encoding="utf-8")
    with pytest.raises(AssertionError, match="from the cache"):
        embed_pool(toy, load_pool(str(path)))  # another pool sha: not served from the old file


# --------------------------------------------------------------------------- the command line


def test_texts_show_and_ls_as_json(cli):
    shown = cli("texts", "show", "toy", "--grep", "red", "--limit", "5", "--json")
    assert shown.code == 0, shown
    payload = json.loads(shown.out)
    assert payload["schema"] == "clipterm.texts.show/2" and len(payload["texts"]) == 5
    assert all("red" in row["text"] for row in payload["texts"])
    listed = json.loads(cli("texts", "ls", "--json").out)
    assert {row["name"] for row in listed["builtin"]} == {"toy", "general"}


def test_texts_build_embeds_a_user_pool_and_lists_it(cli, tmp_path):
    path = tmp_path / "pool.txt"
    path.write_text("a red circle\n\na red circle\na blue star\n" + "far " * 50 + "away\n", encoding="utf-8")
    built = cli("texts", "build", "--model", "toy", "--pool", str(path), "--json")
    assert built.code == 0, built
    payload = json.loads(built.out)
    assert payload["shape"] == [3, 128] and payload["pool"]["dropped_duplicates"] == 1
    assert "dropped 1 blank and 1 duplicate" in built.err
    assert "1 text(s) longer than the context (32 tokens) will be truncated, e.g. text 3" in built.err
    listed = json.loads(cli("texts", "ls", "--json").out)["cached"]
    assert [row["texts"] for row in listed] == [3]


def test_texts_build_on_a_bad_pool_is_one_line_with_a_hint(cli, tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"\xff\xfe\x00oops\n")
    result = cli("texts", "build", "--pool", str(path))
    assert result.code == 4 and "not UTF-8" in result.err and "hint" in result.err
    assert "Traceback" not in result.err
