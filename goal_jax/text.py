"""Tokenizer wrapper and phrase -> caption-token spans.

The tokenizer is transformers' CLIP BPE tokenizer (``CLIPTokenizerFast``) read from a local
folder (SD-1.x ``tokenizer/``: ``vocab.json`` + ``merges.txt``). Captions become ``int32``
token ids ``[B, max_length]``: ``<|startoftext|>``, the BPE tokens, ``<|endoftext|>``, then
padding with ``<|endoftext|>`` (the SD-1.x pad token) up to ``max_length`` (77).

MAAlign needs, for each layout phrase, the caption tokens that describe it:
:func:`phrase_token_spans` finds the phrase in the caption (case-insensitive character match)
and returns the positions of the tokens whose character offsets overlap that match;
:func:`phrase_token_mask` turns them into a boolean ``[max_boxes, max_length]`` mask.

:func:`write_word_vocab` writes a tiny but complete CLIP tokenizer folder (all 256 byte-level
symbols, so any text tokenizes, plus merges that make each given word a single token); tests
and the demo use it because nothing can be downloaded here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Sequence

import numpy as np

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MAX_LENGTH = 77
_END_OF_WORD = "</w>"


class TokenizerError(ValueError):
    """A tokenizer folder cannot be read."""


# ----------------------------------------------------------------------------------------------
# A small tokenizer folder.
# ----------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> list[tuple[int, str]]:
    """GPT-2 / CLIP byte -> printable unicode symbol table, in CLIP's vocabulary order."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return [(b, chr(c)) for b, c in zip(printable, chars)]


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one pre-token: repeatedly merges the lowest-ranked adjacent pair."""
    symbols = list(symbols)
    while len(symbols) > 1:
        pairs = [(ranks.get(p, None), i, p) for i, p in enumerate(zip(symbols, symbols[1:]))]
        pairs = [x for x in pairs if x[0] is not None]
        if not pairs:
            break
        _, _, best = min(pairs)
        merged, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


def write_word_vocab(folder: str, words: Sequence[str]) -> None:
    """Writes a CLIP BPE tokenizer folder in which every word of ``words`` is one token.

    The folder holds ``vocab.json``, ``merges.txt``, ``tokenizer_config.json`` and
    ``special_tokens_map.json`` and loads offline with ``CLIPTokenizer`` /
    ``CLIPTokenizerFast.from_pretrained(folder)``. The vocabulary is CLIP's layout in small:
    the 256 byte-level symbols, the same 256 with ``</w>``, the merge results, then
    ``<|startoftext|>`` and ``<|endoftext|>`` (pad token = ``<|endoftext|>``, as in SD-1.x;
    ``model_max_length`` 77). Any text tokenizes (unknown words fall back to smaller pieces).

    Args:
      folder: created if needed.
      words: lowercase alphabetic words (what CLIP's pre-tokenizer keeps as one piece).

    Raises:
      ValueError: naming a word that is not lowercase letters only.
    """
    byte_symbols = dict(_bytes_to_unicode())
    vocab: dict[str, int] = {}
    for _, ch in _bytes_to_unicode():
        vocab[ch] = len(vocab)
    for _, ch in _bytes_to_unicode():
        vocab[ch + _END_OF_WORD] = len(vocab)

    ranks: dict[tuple[str, str], int] = {}
    merges: list[tuple[str, str]] = []
    for word in dict.fromkeys(words):  # unique, order kept
        if not isinstance(word, str) or not word or not word.isalpha() or word != word.lower():
            raise ValueError(
                f"write_word_vocab: word {word!r} must be non-empty lowercase letters only "
                "(CLIP's pre-tokenizer splits anything else into several pieces)"
            )
        symbols = [byte_symbols[b] for b in word.encode("utf-8")]
        symbols[-1] += _END_OF_WORD
        # New merges get the lowest priority, so they never change how earlier words encode:
        # BPE picks the best-ranked pair first, and earlier words are single tokens before any
        # later merge could apply.
        pieces = _bpe(symbols, ranks)
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
            pieces = _bpe(symbols, ranks)
    vocab[BOS_TOKEN] = len(vocab)
    vocab[EOS_TOKEN] = len(vocab)

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")
    special = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
    }
    with open(os.path.join(folder, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(special, f, indent=2)
    config = dict(
        special,
        tokenizer_class="CLIPTokenizer",
        model_max_length=MAX_LENGTH,
        do_lower_case=True,
        errors="replace",
        add_prefix_space=False,
        clean_up_tokenization_spaces=True,
    )
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)


# ----------------------------------------------------------------------------------------------
# Loading and tokenizing.
# ----------------------------------------------------------------------------------------------


def load_tokenizer(folder: str):
    """Reads a CLIP tokenizer folder -> ``transformers.CLIPTokenizerFast``.

    Raises:
      TokenizerError: naming the folder when it is missing, lacks ``vocab.json`` +
        ``merges.txt`` (or ``tokenizer.json``), or cannot be parsed.
    """
    if not os.path.isdir(folder):
        raise TokenizerError(f"tokenizer folder not found: {folder}")
    has_bpe = all(os.path.isfile(os.path.join(folder, n)) for n in ("vocab.json", "merges.txt"))
    has_json = os.path.isfile(os.path.join(folder, "tokenizer.json"))
    if not (has_bpe or has_json):
        raise TokenizerError(
            f"tokenizer folder {folder} has neither vocab.json + merges.txt nor tokenizer.json; "
            f"it holds {sorted(os.listdir(folder))}"
        )
    from transformers import CLIPTokenizerFast

    try:
        tokenizer = CLIPTokenizerFast.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # transformers raises many types for broken files
        raise TokenizerError(f"cannot load the CLIP tokenizer in {folder}: {e!r}") from e
    if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
        raise TokenizerError(
            f"tokenizer in {folder} lacks {BOS_TOKEN} or {EOS_TOKEN} in its vocabulary"
        )
    return tokenizer


def tokenize(tokenizer, texts: str | Sequence[str], max_length: int = MAX_LENGTH) -> np.ndarray:
    """Captions -> ``int32 [B, max_length]`` token ids.

    BOS, tokens, EOS, then the pad token up to ``max_length``; longer captions are truncated
    to ``max_length - 2`` tokens (the EOS is kept), exactly as the CLIP tokenizer does in SD.
    """
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"tokenize: text {i} is {type(t).__name__}, expected str")
    if max_length < 2:
        raise ValueError(f"tokenize: max_length must be >= 2 (BOS + EOS), got {max_length}")
    ids = tokenizer(
        texts, padding="max_length", max_length=max_length, truncation=True
    )["input_ids"]
    return np.asarray(ids, dtype=np.int32).reshape(len(texts), max_length)


# ----------------------------------------------------------------------------------------------
# Phrase spans.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class PhraseSpans:
    """Caption token positions of each layout phrase.

    Attributes:
      token_indices: per phrase, the sorted positions in the ``max_length`` token sequence
        (BOS is position 0, so the first word token is position 1) of the tokens that overlap
        the phrase's match in the caption; ``[]`` when it has none.
      missing: indices of the phrases that have no caption token (absent from the caption, or
        entirely cut by truncation).
    """

    token_indices: list[list[int]]
    missing: list[int]


def _phrase_pattern(phrase: str) -> re.Pattern | None:
    words = phrase.split()
    if not words:
        return None
    return re.compile(r"\s+".join(re.escape(w) for w in words), re.IGNORECASE)


def _occurrences(pattern: re.Pattern, caption: str) -> list[tuple[int, int]]:
    """Non-overlapping matches; whole-word matches are preferred when there are any."""
    spans = [m.span() for m in pattern.finditer(caption)]

    def whole_word(span):
        s, e = span
        before = caption[s - 1] if s > 0 else " "
        after = caption[e] if e < len(caption) else " "
        return not (before.isalnum() or after.isalnum())

    whole = [s for s in spans if whole_word(s)]
    return whole or spans


def phrase_token_spans(
    tokenizer, caption: str, phrases: Sequence[str], max_length: int = MAX_LENGTH
) -> PhraseSpans:
    """Finds the caption tokens of each phrase.

    Matching is a case-insensitive character match of the phrase in the caption (runs of
    whitespace in the phrase match any whitespace run; whole-word occurrences are preferred
    over occurrences inside longer words). Repeated identical phrases (same text ignoring case
    and whitespace) take successive occurrences in the caption, left to right; once the
    occurrences are used up, further repeats reuse the first one (the object is named in the
    caption, so the phrase is not reported missing). A token belongs to a phrase when its
    character span (the fast tokenizer's offset mapping) overlaps the match. Tokens cut by
    truncation to ``max_length`` are excluded. Never raises for absent phrases: they get ``[]``
    and are listed in ``missing``.
    """
    if not isinstance(caption, str):
        raise TypeError(f"phrase_token_spans: caption is {type(caption).__name__}, expected str")
    encoding = tokenizer(
        caption, max_length=max_length, truncation=True, return_offsets_mapping=True
    )
    ids = encoding["input_ids"]
    special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    offsets = [
        (s, e) if tok not in special and e > s else None
        for tok, (s, e) in zip(ids, encoding["offset_mapping"])
    ]

    used: dict[str, int] = {}
    token_indices, missing = [], []
    for i, phrase in enumerate(phrases):
        if not isinstance(phrase, str):
            raise TypeError(f"phrase_token_spans: phrase {i} is {type(phrase).__name__}")
        pattern = _phrase_pattern(phrase)
        matches = _occurrences(pattern, caption) if pattern is not None else []
        tokens: list[int] = []
        if matches:
            key = " ".join(phrase.lower().split())
            k = used.get(key, 0)
            used[key] = k + 1
            start, end = matches[k] if k < len(matches) else matches[0]
            tokens = [
                j for j, span in enumerate(offsets)
                if span is not None and span[0] < end and span[1] > start
            ]
        if not tokens:
            missing.append(i)
        token_indices.append(tokens)
    return PhraseSpans(token_indices=token_indices, missing=missing)


def phrase_token_mask(
    spans: PhraseSpans, max_boxes: int, max_length: int = MAX_LENGTH
) -> np.ndarray:
    """``bool [max_boxes, max_length]``: row i marks the caption tokens of phrase i.

    Rows past the number of phrases, and rows of missing phrases, are all False.

    Raises:
      ValueError: when there are more phrases than ``max_boxes`` or a position is outside
        ``[0, max_length)``.
    """
    if len(spans.token_indices) > max_boxes:
        raise ValueError(
            f"phrase_token_mask: {len(spans.token_indices)} phrases but max_boxes={max_boxes}"
        )
    mask = np.zeros((max_boxes, max_length), dtype=bool)
    for i, positions in enumerate(spans.token_indices):
        for p in positions:
            if not 0 <= p < max_length:
                raise ValueError(
                    f"phrase_token_mask: phrase {i} token position {p} is outside "
                    f"[0, {max_length})"
                )
            mask[i, p] = True
    return mask
