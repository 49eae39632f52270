"""Tokenizer folder, tokenization and phrase -> caption token spans on the tiny vocabulary."""

import json
import os

import numpy as np
import pytest
from conftest import TEST_WORDS

from goal_jax import text


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return text.load_tokenizer(tokenizer_dir)


def _tokens(tok, caption):
    return tok.convert_ids_to_tokens(tok(caption)["input_ids"])


def test_vocab_folder_loads_with_both_tokenizer_classes(tokenizer_dir, tok):
    from transformers import CLIPTokenizer, CLIPTokenizerFast

    assert sorted(os.listdir(tokenizer_dir)) == [
        "merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
    with open(os.path.join(tokenizer_dir, "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    # 256 byte symbols + 256 with </w> + merge results + BOS + EOS.
    assert vocab["<|startoftext|>"] == len(vocab) - 2 and vocab["<|endoftext|>"] == len(vocab) - 1
    assert sum(not k.endswith("</w>") and len(k) == 1 for k in vocab) == 256
    assert sum(k.endswith("</w>") and len(k) == 5 for k in vocab) == 256
    for cls in (CLIPTokenizer, CLIPTokenizerFast):
        other = cls.from_pretrained(tokenizer_dir)
        assert other("a red circle")["input_ids"] == tok("a red circle")["input_ids"]
    assert tok.model_max_length == 77
    assert tok.pad_token == tok.eos_token == "<|endoftext|>"
    assert tok.bos_token == "<|startoftext|>"


def test_every_word_is_one_token(tok):
    for word in TEST_WORDS:
        assert _tokens(tok, word) == ["<|startoftext|>", word + "</w>", "<|endoftext|>"], word
    # Capitals are lower-cased; unknown words fall back to byte pieces, never to unk.
    assert _tokens(tok, "A RED Cat!") == [
        "<|startoftext|>", "a</w>", "red</w>", "cat</w>", "!</w>", "<|endoftext|>"]
    pieces = _tokens(tok, "zebra")[1:-1]
    assert "".join(pieces) == "zebra</w>" and len(pieces) > 1
    ids = tok("zebra über 42")["input_ids"]
    assert tok.unk_token_id not in ids[1:-1]
    assert tok.decode(ids, skip_special_tokens=True) == "zebra über 4 2"


def test_write_word_vocab_rejects_bad_words(tmp_path):
    with pytest.raises(ValueError, match=r"word 'Red' must be non-empty lowercase letters"):
        text.write_word_vocab(str(tmp_path), ["cat", "Red"])
    with pytest.raises(ValueError, match=r"word 'two words'"):
        text.write_word_vocab(str(tmp_path), ["two words"])


def test_tokenize_pads_and_truncates(tok):
    bos, eos = tok.bos_token_id, tok.eos_token_id
    ids = text.tokenize(tok, ["a red circle", "the dog"], max_length=8)
    assert ids.dtype == np.int32 and ids.shape == (2, 8)
    word = lambda w: tok.convert_tokens_to_ids(w + "</w>")  # noqa: E731
    np.testing.assert_array_equal(
        ids[0], [bos, word("a"), word("red"), word("circle"), eos, eos, eos, eos])
    long = text.tokenize(tok, "a red circle and a blue square and a green star", max_length=6)
    np.testing.assert_array_equal(
        long[0], [bos, word("a"), word("red"), word("circle"), word("and"), eos])
    assert text.tokenize(tok, "cat").shape == (1, 77)
    with pytest.raises(TypeError, match="text 1 is int"):
        text.tokenize(tok, ["cat", 3])


def test_load_tokenizer_errors_name_the_folder(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(text.TokenizerError, match=f"tokenizer folder not found: {missing}"):
        text.load_tokenizer(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(text.TokenizerError,
                       match=f"tokenizer folder {empty} has neither vocab.json"):
        text.load_tokenizer(str(empty))
    broken = tmp_path / "broken"
    text.write_word_vocab(str(broken), ["cat"])
    (broken / "vocab.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(text.TokenizerError, match=f"cannot load the CLIP tokenizer in {broken}"):
        text.load_tokenizer(str(broken))


def test_phrase_spans_multi_token_repeated_and_missing(tok):
    caption = "A red circle left of a blue star and a red circle"
    # tokens: 0 BOS, 1 a, 2 red, 3 circle, 4 left, 5 of, 6 a, 7 blue, 8 star, 9 and, 10 a,
    #         11 red, 12 circle, 13 EOS
    spans = text.phrase_token_spans(
        tok, caption, ["red circle", "Blue  Star", "green square", "RED circle", "red circle"])
    assert spans.token_indices == [[2, 3], [7, 8], [], [11, 12], [2, 3]]
    # Repeats take successive occurrences; once used up they reuse the first one.
    assert spans.missing == [2]


def test_phrase_spans_sub_word_tokens_and_whole_words(tok):
    caption = "a zebra on the car"
    pieces = _tokens(tok, caption)
    n = len(pieces[2:-4])  # zebra's byte pieces (then on, the, car, EOS)
    spans = text.phrase_token_spans(tok, caption, ["zebra", "car", "a", ""])
    assert spans.token_indices[0] == list(range(2, 2 + n)) and n > 1
    assert spans.token_indices[1] == [2 + n + 2]
    # "a" matches the word "a" (position 1), not the letter inside "zebra" or "car".
    assert spans.token_indices[2] == [1]
    assert spans.token_indices[3] == [] and spans.missing == [3]
    # A phrase inside a longer word still matches (no whole-word occurrence exists).
    inner = text.phrase_token_spans(tok, caption, ["ebr"])
    assert inner.token_indices[0] and set(inner.token_indices[0]) <= set(range(2, 2 + n))


def test_phrase_spans_truncation(tok):
    caption = "a red circle and a blue square and a green star"
    # max_length 8: BOS + 6 tokens (a red circle and a blue) + EOS.
    spans = text.phrase_token_spans(
        tok, caption, ["red circle", "blue square", "green star"], max_length=8)
    assert spans.token_indices == [[2, 3], [6], []]
    assert spans.missing == [2]
    mask = text.phrase_token_mask(spans, max_boxes=4, max_length=8)
    assert mask.dtype == bool and mask.shape == (4, 8)
    expected = np.zeros((4, 8), bool)
    expected[0, [2, 3]] = True
    expected[1, 6] = True
    np.testing.assert_array_equal(mask, expected)
    # Positions index the tokenize() output: the mask selects exactly the phrase words.
    ids = text.tokenize(tok, caption, max_length=8)[0]
    assert tok.convert_ids_to_tokens(ids[mask[0]].tolist()) == ["red</w>", "circle</w>"]


def test_phrase_token_mask_errors():
    spans = text.PhraseSpans(token_indices=[[1], [2], [3]], missing=[])
    with pytest.raises(ValueError, match="3 phrases but max_boxes=2"):
        text.phrase_token_mask(spans, max_boxes=2)
    with pytest.raises(ValueError, match=r"phrase 1 token position 80 is outside \[0, 77\)"):
        text.phrase_token_mask(text.PhraseSpans([[1], [80]], []), max_boxes=2)
