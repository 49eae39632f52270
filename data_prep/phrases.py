"""Noun phrases (objects with their attributes) from a caption, and small English helpers.

Two extractors, the same output (:class:`Phrase`, exact substrings of the caption in order):

* ``spacy``: spaCy's ``noun_chunks`` when spaCy and an English pipeline (``en_core_web_sm`` by
  default) are installed. spaCy is *not* a dependency of goal_jax.
* ``rules`` (the fallback, no dependency). Words are ``[A-Za-z0-9]+`` with inner ``-`` or ``'``;
  punctuation ends a phrase. Rules, in order:

  1. A phrase *starts* at a determiner or quantifier (``a an the this that these those some
     several many his her their its my our your one two ... twenty`` or digits), or at an
     attribute word (color / shape / texture vocabulary) or a known object noun (the COCO
     vocabulary, its plurals and synonyms such as man, woman, people, bike, sofa).
  2. It *extends* over the following words until a boundary: punctuation, a preposition,
     conjunction, verb or relation word (the ``BOUNDARY`` list: on, in, with, and, is, near,
     next, left, ...), another determiner, or a word ending in ``-ing`` / ``-ed`` that is not a
     known noun (building, painting, ...). At most 6 words.
  3. A quantity noun followed by ``of`` (``a group of people``, ``a pair of scissors``,
     ``a plate of food``) continues through ``of`` into the next phrase.
  4. Runs that are only determiners, or whose last word (the head) is not an object
     (``the left``, ``the top``, ``a picture``, ``the background``, ``it``...: ``NON_OBJECT_HEADS``)
     are dropped.
  5. ``count``: the value of a leading number word or digit (``two dogs`` -> 2), else 1; the
     ``instance`` text (one box each) drops the number word (``dogs``).

``auto`` uses spaCy when it loads, else the rules.
"""

from __future__ import annotations

import dataclasses
import re
from functools import lru_cache
from typing import Sequence

NUMBER_WORDS = {
    "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
    "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14,
    "fifteen": 15, "sixteen": 16, "seventeen": 17, "eighteen": 18, "nineteen": 19, "twenty": 20,
}
DETERMINERS = frozenset(
    "a an the this that these those some several many his her their its my our your another "
    "each every both few various multiple".split()) | frozenset(NUMBER_WORDS)
BOUNDARY = frozenset("""
    on in at of with without near next to by under above below behind beside besides between
    among across along around through inside outside into onto over underneath beneath atop
    against toward towards from for off up down out upon via while during after before
    and or but nor so yet than as like
    is are was were be been being am has have had do does did can could will would should may
    might must there here where when which who whom whose what why how that
    it they them he she we you i me him us itself themselves
    left right top bottom front back side middle center centre near far
    holding holds hold looking looks look playing plays play carrying carries carry touching
    touches sniffing sniffs chasing chases sitting sits sit standing stands stand lying lies lay
    laying riding rides ride eating eats eat walking walks walk flying flies fly running runs
    run parked waiting waits hanging hangs filled covered topped made full displayed shown seen
    placed set sitting perched resting rests rest leaning leans
""".split())
NON_OBJECT_HEADS = frozenset("""
    left right top bottom front back side middle center centre corner edge background
    foreground picture photo photograph image view scene shot close closeup close-up way time
    day night lot other one ones something thing things area part distance air water sky
    ground it this that these those there
""".split())
QUANTITY_NOUNS = frozenset("""
    group pair couple bunch herd flock pile stack set row lot number few variety collection
    team crowd plate bowl box basket cup glass slice piece tray bag bottle loaf handful line
    display assortment kind type
""".split())
ING_NOUNS = frozenset("""
    building buildings painting paintings ceiling ceilings clothing pudding ring rings king
    string thing things wing wings evening morning icing frosting topping toppings dressing
    stuffing railing railings sibling siblings wedding parking ceiling sling swing swings
    sibling earring earrings stocking stockings bedding seasoning awning awnings shed bed
    sled
""".split())
SYNONYMS = {
    "man": "person", "men": "person", "woman": "person", "women": "person", "boy": "person",
    "boys": "person", "girl": "person", "girls": "person", "child": "person",
    "children": "person", "kid": "person", "kids": "person", "people": "person",
    "guy": "person", "guys": "person", "lady": "person", "ladies": "person",
    "player": "person", "players": "person", "baby": "person", "babies": "person",
    "skier": "person", "skiers": "person", "surfer": "person", "surfers": "person",
    "skateboarder": "person", "bike": "bicycle", "bikes": "bicycle",
    "motorbike": "motorcycle", "motorbikes": "motorcycle", "plane": "airplane",
    "planes": "airplane", "jet": "airplane", "jets": "airplane", "aeroplane": "airplane",
    "puppy": "dog", "puppies": "dog", "kitten": "cat", "kittens": "cat", "calf": "cow",
    "cattle": "cow", "television": "tv", "phone": "cell phone", "phones": "cell phone",
    "cellphone": "cell phone", "sofa": "couch", "sofas": "couch", "table": "dining table",
    "tables": "dining table", "plant": "potted plant", "plants": "potted plant",
    "doughnut": "donut", "doughnuts": "donut", "teddy": "teddy bear", "racket": "tennis racket",
    "racquet": "tennis racket", "ball": "sports ball", "balls": "sports ball",
    "glove": "baseball glove", "bat": "baseball bat", "ski": "skis", "hydrant": "fire hydrant",
    "fridge": "refrigerator", "fridges": "refrigerator", "computer": "laptop",
    "monitor": "tv", "purse": "handbag", "luggage": "suitcase", "van": "car",
    "taxi": "car", "ship": "boat", "ships": "boat", "sailboat": "boat", "hotdog": "hot dog",
    "donuts": "donut", "pizzas": "pizza", "bird": "bird",
}
IRREGULAR_PLURALS = {
    "person": "people", "mouse": "mice", "knife": "knives", "sheep": "sheep", "skis": "pairs of skis",
    "scissors": "pairs of scissors", "tv": "tvs", "bus": "buses", "wine glass": "wine glasses",
    "broccoli": "broccoli", "hair drier": "hair driers", "couch": "couches",
}


@dataclasses.dataclass(frozen=True)
class Phrase:
    """One noun phrase of a caption.

    Attributes:
      text: the exact substring ``caption[start:end]`` (determiner, attributes, noun).
      start, end: character offsets in the caption.
      count: how many objects it names (a leading number word / digit, else 1).
      instance: the text each of the ``count`` boxes gets (``text`` without the number word
        when count > 1; still a substring of the caption).
    """

    text: str
    start: int
    end: int
    count: int = 1
    instance: str = ""

    def to_json(self) -> dict:
        return {"phrase": self.text, "count": self.count}


def article(word: str) -> str:
    """``a`` or ``an`` for the word that follows (vowel-letter rule, with a few exceptions)."""
    w = word.lower()
    if w.startswith(("uni", "use", "one", "eu")):
        return "a"
    if w.startswith(("hour", "honest")):
        return "an"
    return "an" if w[:1] in "aeiou" else "a"


def with_article(noun_phrase: str) -> str:
    return f"{article(noun_phrase)} {noun_phrase}"


def plural(noun: str) -> str:
    """English plural of a (possibly multi-word) noun: irregulars, -s/-x/-z/-ch/-sh + es,
    consonant + y -> ies, else + s (the last word is inflected)."""
    if noun in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[noun]
    head, _, last = noun.rpartition(" ")
    prefix = head + " " if head else ""
    if last in IRREGULAR_PLURALS:
        return prefix + IRREGULAR_PLURALS[last]
    if last.endswith(("s", "x", "z", "ch", "sh")):
        return prefix + last + "es"
    if last.endswith("y") and last[-2:-1] not in "aeiou":
        return prefix + last[:-1] + "ies"
    if last.endswith("fe"):
        return prefix + last[:-2] + "ves"
    return prefix + last + "s"


@lru_cache(maxsize=1)
def object_lexicon() -> dict[str, str]:
    """Lower-case object words/word groups -> COCO category: the 80 names, their plurals and
    ``SYNONYMS``."""
    from data_prep import common

    lex = {}
    for line in common.read_vocab("coco_objects"):
        name = line.split("\t")[0].strip()
        lex[name] = name
        lex[plural(name)] = name
    for word, name in SYNONYMS.items():
        lex.setdefault(word, name)
    return lex


@lru_cache(maxsize=1)
def attribute_words() -> frozenset:
    from data_prep import common

    words = set()
    for name in ("colors", "shapes", "textures"):
        words.update(w.lower() for w in common.read_vocab(name))
    return frozenset(words)


_TOKEN = re.compile(r"[A-Za-z0-9]+(?:[-'][A-Za-z0-9]+)*|[^\sA-Za-z0-9]")


def _tokens(text: str) -> list[tuple[str, int, int]]:
    return [(m.group(0), m.start(), m.end()) for m in _TOKEN.finditer(text)]


def _is_word(tok: str) -> bool:
    return tok[0].isalnum()


def _count_of(words: Sequence[str]) -> int:
    first = words[0].lower() if words else ""
    if first in NUMBER_WORDS:
        return NUMBER_WORDS[first]
    if first.isdigit():
        return max(1, int(first))
    return 1


def _make_phrase(caption: str, toks: list[tuple[str, int, int]]) -> Phrase | None:
    words = [t[0] for t in toks]
    while words and words[0].lower() in DETERMINERS and len(words) > 1 \
            and words[1].lower() in DETERMINERS and words[1].lower() not in NUMBER_WORDS:
        toks, words = toks[1:], words[1:]  # "all the" -> "the"
    content = [w for w in words if w.lower() not in DETERMINERS and not w.isdigit()]
    if not content:
        return None
    head = words[-1].lower()
    if head in NON_OBJECT_HEADS:
        return None
    start, end = toks[0][1], toks[-1][2]
    count = _count_of(words)
    instance = caption[start:end]
    if count > 1:
        instance = caption[toks[1][1]:end]
    return Phrase(caption[start:end], start, end, count, instance)


def _is_boundary(word: str) -> bool:
    w = word.lower()
    if w in BOUNDARY:
        return True
    if w in ING_NOUNS or w in object_lexicon() or w in attribute_words():
        return False
    return len(w) > 4 and (w.endswith("ing") or w.endswith("ed"))


def extract_rules(caption: str, max_words: int = 6) -> list[Phrase]:
    """The rule-based noun-phrase extractor (module docstring, rules 1-5)."""
    toks = _tokens(caption)
    lexicon, attributes = object_lexicon(), attribute_words()
    phrases: list[Phrase] = []
    i = 0
    while i < len(toks):
        word = toks[i][0]
        lw = word.lower()
        starts = _is_word(word) and (lw in DETERMINERS or lw.isdigit() or lw in attributes
                                     or lw in lexicon)
        if not starts:
            i += 1
            continue
        j = i + 1
        while j < len(toks) and j - i < max_words:
            w = toks[j][0]
            if not _is_word(w) or w.lower() in DETERMINERS or _is_boundary(w):
                break
            j += 1
        # Rule 3: "a group of people", "a plate of food".
        if (j < len(toks) and toks[j][0].lower() == "of" and toks[j - 1][0].lower() in QUANTITY_NOUNS
                and j + 1 < len(toks) and _is_word(toks[j + 1][0])):
            k = j + 1
            if toks[k][0].lower() in DETERMINERS:
                k += 1
            while k < len(toks) and k - i < 2 * max_words:
                w = toks[k][0]
                if not _is_word(w) or w.lower() in DETERMINERS or _is_boundary(w):
                    break
                k += 1
            if k > j + 1 and toks[k - 1][0].lower() not in DETERMINERS:
                j = k
        phrase = _make_phrase(caption, toks[i:j])
        if phrase is not None:
            phrases.append(phrase)
        i = max(j, i + 1)
    return phrases


@lru_cache(maxsize=2)
def _spacy_pipeline(model: str):
    try:
        import spacy  # optional, not a dependency
    except ImportError:
        return None
    try:
        return spacy.load(model)
    except OSError:
        return None


def extract_spacy(caption: str, model: str = "en_core_web_sm") -> list[Phrase]:
    """spaCy noun chunks (pronouns and ``NON_OBJECT_HEADS`` heads dropped)."""
    nlp = _spacy_pipeline(model)
    if nlp is None:
        raise RuntimeError(f"spaCy with the '{model}' pipeline is not installed")
    phrases = []
    for chunk in nlp(caption).noun_chunks:
        if chunk.root.pos_ == "PRON" or chunk.root.text.lower() in NON_OBJECT_HEADS:
            continue
        toks = [(t.text, t.idx, t.idx + len(t.text)) for t in chunk]
        phrase = _make_phrase(caption, toks)
        if phrase is not None:
            phrases.append(phrase)
    return phrases


def spacy_available(model: str = "en_core_web_sm") -> bool:
    return _spacy_pipeline(model) is not None


def extract(caption: str, method: str = "auto", spacy_model: str = "en_core_web_sm") -> list[Phrase]:
    """Noun phrases of ``caption`` by ``method`` (``auto`` | ``spacy`` | ``rules``)."""
    if method not in ("auto", "spacy", "rules"):
        raise ValueError(f"phrase extractor must be auto, spacy or rules, got {method!r}")
    if method == "spacy" or (method == "auto" and spacy_available(spacy_model)):
        return extract_spacy(caption, spacy_model)
    return extract_rules(caption)


def find_phrase(caption: str, phrase: str, start: int = 0) -> int:
    """Character offset of ``phrase`` in ``caption`` as whole words (case-insensitive), at or
    after ``start``; -1 when absent."""
    m = re.compile(r"(?<![A-Za-z0-9])" + re.escape(phrase.strip()) + r"(?![A-Za-z0-9])",
                   re.IGNORECASE).search(caption, start)
    return m.start() if m else -1


def object_mentions(caption: str) -> list[tuple[str, int]]:
    """COCO categories named in a caption as (category, count) in order of appearance. Count:
    a preceding number word / digit, else 2 for a plural (or a collective like ``people``),
    else 1. Multi-word names are matched first (``hot dog`` is not a dog)."""
    lexicon = object_lexicon()
    toks = [t for t in _tokens(caption) if _is_word(t[0])]
    words = [t[0].lower() for t in toks]
    out, i = [], 0
    singular = {k for k, v in lexicon.items() if k == v}
    while i < len(words):
        match = None
        for n in (3, 2, 1):
            key = " ".join(words[i:i + n])
            if len(words[i:i + n]) == n and key in lexicon:
                match = (key, n)
                break
        if match is None:
            i += 1
            continue
        key, n = match
        prev = words[i - 1] if i else ""
        if prev in NUMBER_WORDS:
            count = NUMBER_WORDS[prev]
        elif prev.isdigit():
            count = max(1, int(prev))
        elif key in singular or key in ("man", "woman", "boy", "girl", "child", "kid", "guy",
                                         "lady", "player", "baby"):
            count = 1
        elif key in SYNONYMS and not key.endswith("s") and key not in ("people", "men", "women",
                                                                       "children", "cattle"):
            count = 1
        else:
            count = 2
        out.append((lexicon[key], count))
        i += n
    return out
