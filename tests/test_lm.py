"""Language-model guidance of the hill-climb: the Kneser–Ney trigram, its disk cache, the toy caption grammar,
guided search, and a Hugging Face causal LM (a tiny random GPT-2 saved to a folder), all offline."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from clipterm.analyses import lm as lm_module
from clipterm.analyses.lm import NGram, count_trigrams, excess_per_word, load_lm, load_ngram, nll_per_word
from clipterm.analyses.search import SearchConfig, _Scorer, search_model
from clipterm.errors import ClipTermError
from clipterm.inputs.vocab import default_vocabulary, file_vocabulary
from clipterm.toyworld.captions import parses_as_caption, sample_captions
from clipterm.vit.textencode import TextTower

FAST = SearchConfig(beam=3, topk=8, random=4, steps=6, patience=None, lm_weight=0.01)


@pytest.fixture(scope="module")
def vocab(toy):
    return default_vocabulary(toy.tokenizer)


@pytest.fixture(scope="module")
def ngram(vocab, tmp_path_factory):
    return load_lm("ngram", vocab, "toy", cache_dir=tmp_path_factory.mktemp("lm-cache"))


def _rows(vocab, text: str) -> tuple[int, ...]:
    return tuple(vocab.words.index(word) for word in text.split())


def _embed(toy, text: str) -> torch.Tensor:
    with torch.no_grad():
        return F.normalize(toy.model.encode_text(toy.tokenizer([text]))[0].float(), dim=0)  # (D,)


def _untimed(event) -> dict:
    return {k: v for k, v in dataclasses.asdict(event).items() if k not in ("elapsed", "evals_per_s")}


# --------------------------------------------------------------------------- the n-gram model


def test_kneser_ney_is_a_distribution_in_every_context(ngram, vocab):
    for prefix in ["", "a", "a small", "zebra quantum", "the word"]:
        rows = _rows(vocab, prefix)
        u, v = ngram._context(rows)
        total = sum(ngram._p(u, v, w) for w in range(len(vocab) + 2))  # words, end, unknown
        assert total == pytest.approx(1.0, abs=1e-9), prefix
        dense = ngram.next_logprobs([rows])[0].double().exp()  # (V,)
        assert float(dense.sum()) == pytest.approx(total - ngram._p(u, v, len(vocab)) - ngram._p(u, v, len(vocab) + 1))


def test_captions_are_likelier_than_word_salad(ngram, vocab):
    caption, salad, shuffled = (_rows(vocab, t) for t in ("a small red star on the left", "ial large small kab",
                                                          "star left small the a red on"))
    nll = nll_per_word(ngram, [caption, salad, shuffled])
    assert nll[0] < 2 < nll[2] < nll[1]
    after_a = ngram.next_logprobs([_rows(vocab, "a")])[0].topk(6).indices.tolist()
    assert {"small", "large"} <= {vocab.words[i] for i in after_a}


def test_counts_are_cached_per_corpus_hash(vocab, tmp_path, monkeypatch):
    texts = ["a red circle", "a blue square", "a red square"]
    first = load_ngram(vocab, "mine.txt", texts, tmp_path)
    files = list((tmp_path / "texts").glob("ngram-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["texts"] == 3
    monkeypatch.setattr(lm_module, "count_trigrams", lambda texts: pytest.fail("recounted a cached corpus"))
    again = load_ngram(vocab, "mine.txt", texts, tmp_path)
    rows = [_rows(vocab, "a red square"), _rows(vocab, "square red")]
    assert torch.equal(first.logprob(rows), again.logprob(rows))
    monkeypatch.undo()
    load_ngram(vocab, "other.txt", texts + ["a green ring"], tmp_path)
    assert len(list((tmp_path / "texts").glob("ngram-*.json"))) == 2


def test_a_vocabulary_that_shares_no_words_is_refused(toy, tmp_path):
    words = tmp_path / "words.txt"
    words.write_text("zebra quantum violin\n")
    with pytest.raises(ClipTermError, match="shares no words"):
        load_lm("ngram", file_vocabulary(toy.tokenizer, words), "toy", cache_dir=tmp_path)


@pytest.mark.parametrize("world", [1, 2])
def test_the_caption_grammar_recogniser(world):
    captions = sample_captions(300, seed=5, world=world)
    assert all(parses_as_caption(text) for text in captions)
    assert world == 1 or any(" in " in text.split('"')[-1] for text in captions)  # world 2 names the ink
    for text in ("a small red star", "small red star", "a large blue ring at the top and a shape, dark background",
                 "something green", "the word cat", "a picture of a heart"):
        assert parses_as_caption(text), text
    for text in ("ial large small kab", "red", "a red", "small the red star", "a heart and", "large ring blue just"):
        assert not parses_as_caption(text), text


# --------------------------------------------------------------------------- guided search


@pytest.mark.parametrize("lam, expected", [(None, 0.0), (0.0025, 0.0025)])  # by default a guided search has no prior
def test_guided_scores_carry_the_cosine_and_the_lm_term(toy, vocab, ngram, lam, expected):
    target = _embed(toy, "a large green ring at the top")
    last = list(search_model(toy, target, vocab, dataclasses.replace(FAST, lam=lam, lm_relative=True), lm=ngram))[-1]
    assert last.lm == "ngram:toy"
    for hit in last.best:
        rows = _rows(vocab, hit.text)
        assert hit.cosine == pytest.approx(float(_embed(toy, hit.text) @ target), abs=1e-4)
        assert hit.lm_nll == pytest.approx(nll_per_word(ngram, [rows])[0], abs=1e-9)
        assert hit.lm_penalty == pytest.approx(excess_per_word(ngram, [rows])[0], abs=1e-9)
        prior = float(vocab.prior[list(rows)].sum()) if rows else 0.0
        assert hit.score == pytest.approx(hit.cosine - 0.01 * hit.lm_penalty - expected * prior, abs=1e-4)


def test_a_fixed_seed_repeats_exactly_with_guidance(toy, vocab, ngram):
    target = _embed(toy, "a blue heart")
    first, second = (list(search_model(toy, target, vocab, FAST, lm=ngram)) for _ in range(2))
    assert [_untimed(e) for e in first] == [_untimed(e) for e in second]


@pytest.mark.parametrize("cheap", [True, False])  # the n-gram is asked before the text tower, a costly LM after it
def test_the_lm_term_is_skipped_only_where_it_cannot_matter(toy, vocab, ngram, monkeypatch, cheap):
    """Strings that cannot beat the beam's worst are not scored in full; the beam is the same as if all were."""
    monkeypatch.setattr(ngram, "cheap", cheap)
    tokenizer = toy.tokenizer
    scorer = _Scorer(TextTower(toy.model, tokenizer.sot_token_id, tokenizer.eot_token_id), _embed(toy, "a red star"),
                     vocab, dataclasses.replace(FAST, beam=4, lam=0.0025, lm_weight=0.1, lm_relative=True), ngram)
    generator = torch.Generator().manual_seed(0)
    strings = [tuple(torch.randint(0, len(vocab), (n,), generator=generator).tolist()) for n in (1, 2, 3) for _ in range(60)]
    strings += [_rows(vocab, t) for t in ("a red star", "red star", "a red", "star", "a star", "a red shape")]
    full = [o - 0.1 * p for s, (o, _), p in zip(strings, scorer._cosines(strings), excess_per_word(ngram, strings))]
    beam = [sorted(full, reverse=True)[2]] * 4
    scored = scorer.score(strings, beam)
    assert 0 < sum(s is not None for s in scored) < len(strings)  # some were skipped
    assert all(s is None or s[0] == pytest.approx(f, abs=1e-5) for s, f in zip(scored, full))
    kept = sorted([*beam, *(s[0] for s in scored if s is not None)], reverse=True)[:4]
    assert kept == pytest.approx(sorted([*beam, *full], reverse=True)[:4], abs=1e-5)


def test_guidance_makes_the_string_read_as_a_caption(toy, vocab, ngram):
    """At the default weight, 0.06. A short caption such as "a small red star" is no test: the toy's unguided climb
    finds it word for word."""
    target = _embed(toy, "a large green ring on a striped background")
    unguided = list(search_model(toy, target, vocab, FAST))[-1].best[0]  # "a large ring green striped"
    guided = list(search_model(toy, target, vocab, dataclasses.replace(FAST, lm_weight=0.06), lm=ngram))[-1].best[0]
    assert not parses_as_caption(unguided.text), unguided
    assert parses_as_caption(guided.text) and guided.cosine >= 0.95 * unguided.cosine, guided


def test_a_negative_lm_weight_is_refused(toy, ngram):
    with pytest.raises(ClipTermError, match="--lm-weight must be 0 or more"):
        search_model(toy, _embed(toy, "red"), config=dataclasses.replace(FAST, lm_weight=-0.1), lm=ngram)


# --------------------------------------------------------------------------- a Hugging Face causal LM


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    """A randomly initialised two-layer GPT-2 with a word-level tokenizer, saved to a folder: no download."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install 'clipterm[lm]')")
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<|endoftext|>", "<unk>", "a", "the", "small", "large", "red", "green", "blue", "star", "ring", "circle",
             "square", "on", "left", "right", "and"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|endoftext|>",
                                                eos_token="<|endoftext|>", unk_token="<unk>")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=len(words), n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                     bos_token_id=0, eos_token_id=0)
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def test_hugging_face_lm_scores_whole_strings(toy, tiny_gpt2, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    words = tmp_path / "words.txt"
    words.write_text("a small red blue star ring zebra\n")
    vocab = file_vocabulary(toy.tokenizer, words)
    lm = load_lm(str(tiny_gpt2), vocab, "toy")
    assert lm.name == tiny_gpt2.name
    strings = [(), _rows(vocab, "a small red star"), _rows(vocab, "star red")]
    logp = lm.logprob(strings)  # (3,)
    with torch.no_grad():  # by hand: [start] + tokens + [end], each token's log-prob given those before it
        ids = torch.tensor([[0] + [lm.tokenizer.convert_tokens_to_ids(w) for w in "a small red star".split()] + [0]])
        manual = lm.model(input_ids=ids).logits.log_softmax(-1)[0, :-1].gather(1, ids[0, 1:, None]).sum()
    assert float(logp[1]) == pytest.approx(float(manual), abs=1e-4) and bool((logp < 0).all())
    nxt = lm.next_logprobs([(), _rows(vocab, "a small")])  # (2, V)
    assert nxt.shape == (2, len(vocab)) and torch.isinf(nxt[:, vocab.words.index("zebra")]).all()  # not one of its tokens
    assert float(nxt[0].exp()[torch.isfinite(nxt[0])].sum()) < 1  # a share of the next-token distribution


def test_hugging_face_lm_end_to_end_from_the_cli(cli, tiny_gpt2, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    words = tmp_path / "words.txt"
    words.write_text("a small large red green blue star ring circle square\n")
    result = cli("search", "--target", "text:a red star", "--beam", "3", "--topk", "4", "--random", "2", "--steps", "3",
                 "--vocab", str(words), "--lm", str(tiny_gpt2), "--json")
    assert result.code == 0, result
    last = json.loads(result.out.splitlines()[-1])
    assert last["lm"] == tiny_gpt2.name and all(hit["lm_nll"] > 0 for hit in last["best"])
    assert all(set(hit["text"].split()) <= set(words.read_text().split()) for hit in last["best"])


def test_a_hugging_face_lm_that_shares_no_words_is_refused(toy, tiny_gpt2, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    words = tmp_path / "words.txt"
    words.write_text("zebra quantum\n")
    with pytest.raises(ClipTermError, match="shares no words"):
        load_lm(str(tiny_gpt2), file_vocabulary(toy.tokenizer, words), "toy")


def test_corpus_and_lm_name_do_not_mix(vocab, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("a red star\n")
    with pytest.raises(ClipTermError, match="does not go with --lm gpt2"):
        load_lm("gpt2", vocab, "toy", corpus=str(corpus))


def test_ngram_trains_on_a_user_corpus(vocab, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("a red star\na red star\na blue ring\n")
    model = load_lm("ngram", vocab, "toy", corpus=str(corpus), cache_dir=tmp_path)
    assert isinstance(model, NGram) and model.name == "ngram:c.txt"
    assert count_trigrams(["a red star"])[("a", "red", "star")] == 1
    top = model.next_logprobs([_rows(vocab, "a")])[0].topk(2).indices.tolist()
    assert [vocab.words[i] for i in top] == ["red", "blue"]


def test_a_toy_s_corpus_is_the_captions_of_its_own_world():
    """The n-gram for the toy learns world 2's captions (the word's ink named), toy-v1's those of world 1."""
    def names_ink(spec: str) -> bool:
        return any('" in ' in text for text in lm_module.builtin_corpus(spec)[1])

    assert names_ink("toy") and not names_ink("toy-v1")


# --------------------------------------------------------------------------- a masked LM (BERT style)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A randomly initialised two-layer BertForMaskedLM with a tiny WordPiece vocabulary, saved to a folder."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install 'clipterm[lm]')")
    folder = tmp_path_factory.mktemp("tiny-bert")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "the", "small", "large", "red", "green", "blue", "star",
             "ring", "circle", "on", "left", "and", "##s"]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    tokenizer = transformers.BertTokenizer(str(folder / "vocab.txt"))
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32)
    transformers.BertForMaskedLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_masked_lm_proposes_for_a_masked_slot_and_scores_by_pseudo_likelihood(toy, tiny_bert, tmp_path, monkeypatch):
    from clipterm.analyses.lm_hf import MaskedLM

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    words = tmp_path / "words.txt"
    words.write_text("a small red blue star ring zebra\n")
    vocab = file_vocabulary(toy.tokenizer, words)
    lm = load_lm(str(tiny_bert), vocab, "toy")
    assert isinstance(lm, MaskedLM) and lm.name == tiny_bert.name
    string = _rows(vocab, "a small red star")
    ids = [lm.tokenizer.convert_tokens_to_ids(w) for w in "a small red star".split()]
    with torch.no_grad():  # by hand: each word masked in turn, its log-probability there given all the others
        manual = []
        for i, token in enumerate(ids):
            masked = torch.tensor([[lm.cls, *ids[:i], lm.mask, *ids[i + 1 :], lm.sep]])
            manual.append(float(lm.model(input_ids=masked).logits.log_softmax(-1)[0, i + 1, token]))
    assert lm.word_logprobs([string])[0] == pytest.approx([*manual, 0.0], abs=1e-4)
    assert float(lm.logprob([string])[0]) == pytest.approx(sum(manual), abs=1e-4)
    # Insertion between "small" and "red" sees both sides: the masked slot's distribution, over the shared words.
    slot = lm.slot_logprobs([(string, 2, 0), (string, 2, 1)])  # (2, V)
    with torch.no_grad():
        inserted = torch.tensor([[lm.cls, *ids[:2], lm.mask, *ids[2:], lm.sep]])
        expected = lm.model(input_ids=inserted).logits.log_softmax(-1)[0, 3]
    blue = vocab.words.index("blue")
    assert float(slot[0, blue]) == pytest.approx(float(expected[lm.tokenizer.convert_tokens_to_ids("blue")]), abs=1e-4)
    assert torch.isinf(slot[:, vocab.words.index("zebra")]).all() and not torch.equal(slot[0], slot[1])
    assert len(lm.unigram()) == len(vocab) + 1 and lm.unigram()[-1] == 0.0


def test_a_masked_lm_guides_the_search_from_the_cli(cli, tiny_bert, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    words = tmp_path / "words.txt"
    words.write_text("a small large red green blue star ring circle\n")
    result = cli("search", "--target", "text:a red star", "--beam", "3", "--topk", "4", "--random", "2", "--steps", "3",
                 "--vocab", str(words), "--lm", str(tiny_bert), "--json")
    assert result.code == 0, result
    last = json.loads(result.out.splitlines()[-1])
    assert last["lm"] == tiny_bert.name and all(hit["lm_penalty"] is not None for hit in last["best"])
    assert all(set(hit["text"].split()) <= set(words.read_text().split()) for hit in last["best"])


def test_a_masked_lm_that_is_not_here_or_shares_no_words_is_one_line(cli, toy, tiny_bert, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    result = cli("search", "--target", "text:red", "--lm", "bert-base-uncased", "--steps", "1")
    assert result.code != 0 and "no language model 'bert-base-uncased' here" in result.err
    assert "unexpected" not in result.err and len(result.err.strip().splitlines()) <= 3
    words = tmp_path / "words.txt"
    words.write_text("zebra quantum\n")
    with pytest.raises(ClipTermError, match="shares no words"):
        load_lm(str(tiny_bert), file_vocabulary(toy.tokenizer, words), "toy")


def test_the_readability_phase_keeps_the_target_s_words(toy, vocab, ngram):
    """`text:red`: a generic phrase ("an office", cosine 0.959) must not beat "red" (1.0) once the climb has found it."""
    config = dataclasses.replace(FAST, steps=12, patience=4, lm_weight=0.0, keep=0.95, lm_relative=True)
    best = list(search_model(toy, _embed(toy, "red"), vocab, config, lm=ngram))[-1].best[0]
    assert "red" in best.text.split() and best.cosine >= 0.95, best


def test_no_guided_string_repeats_a_content_word(toy, vocab, ngram):
    from clipterm.analyses.lm import repeats_a_word

    assert repeats_a_word("a orange circle orange ring".split()) and not repeats_a_word("a red star and a ring".split())
    events = list(search_model(toy, _embed(toy, "a red star and a blue ring"), vocab, FAST, lm=ngram))
    assert all(not repeats_a_word(hit.text.split()) for event in events for hit in event.best)
