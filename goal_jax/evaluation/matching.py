"""Which predicted boxes denote an NSR-1K object name: two rule sets.

``"layoutgpt"`` (the default; :data:`LAYOUTGPT`) is the matching of LayoutGPT's own layout
scorers, ``eval_counting_layout.py`` and ``eval_spatial_layout.py``, so numbers are comparable
with LayoutGPT's and the GOAL paper's Table 8:

* counting (:func:`layoutgpt_count_name`): a predicted name loses its leading characters from
  the set ``{"a", " "}``, then ``{"a", "n", " "}``, then ``{"t", "h", "e", " "}`` (Python's
  ``str.lstrip`` with those character sets, so ``"apple"`` becomes ``"pple"`` and
  ``"elephant"`` ``"lephant"``); then each ground-truth name in order that contains the
  stripped name, or is contained in it, replaces it (the next name is compared with the
  replacement). The box counts for the final name; a name that matched nothing still counts
  as a predicted box. Boxes without a name (``None``) are left out.
* spatial (:func:`layoutgpt_spatial_boxes`): boxes without a name or with box ``[0, 0, 0,
  0]`` are left out; the predicted name closest to obj1 (``difflib.get_close_matches``
  defaults: ratio >= 0.6, the best one) selects every box with exactly that name; likewise
  obj2.

``"goal_jax"`` (:data:`GOAL_JAX`, :func:`goal_jax_matches`) is stricter: a phrase denotes a
name when its head chunk ends with the name's words. The head chunk is the phrase's words
(lower case, leading articles and counts removed, every word singular) up to the first
preposition, conjunction, relation word or ``-ing`` word after the first word ("window next
to a chair" -> "window"; "giraffes eating leaves" -> "giraffe"; "parking meter" stays); a
compound that merely ends with the name does not match it ("hot dog" is no "dog", "teddy
bear" no "bear"). A head chunk shorter than the name matches when it is the name's tail
("hydrant" for "fire hydrant", but not "dog" for "hot dog"). Words are split at any
non-alphanumeric character, so LayoutGPT's hyphenated names ("potted-plant") match. Each
predicted phrase counts for the first ground-truth name it denotes; in spatial prompts,
``[0, 0, 0, 0]`` boxes are left out as LayoutGPT does.
"""

from __future__ import annotations

import difflib
from typing import Sequence

from goal_jax.planner import ARTICLES, NUMBER_WORDS, singular, words

LAYOUTGPT = "layoutgpt"
GOAL_JAX = "goal_jax"
MATCHINGS = (LAYOUTGPT, GOAL_JAX)
LABELS = {LAYOUTGPT: "LayoutGPT matching", GOAL_JAX: "goal_jax matching"}

_LEADING_SETS = ("a ", "an ", "the ")

# Words that end the head chunk of a phrase.
_CUT_WORDS = frozenset("""
    about above across after against along alongside among around at before behind below
    beneath beside besides between beyond by close down during except for from in inside into
    near next of off on onto opposite out outside over past through to toward towards under
    underneath up upon with within without and or but while that which who whose where left
    right top bottom front back is are was were has have having
""".split())
# Compound names that end with another object's name without being one ("hot dog" is no dog).
_COMPOUNDS = tuple(tuple(c.split()) for c in (
    "hot dog", "teddy bear", "toy car", "baseball bat", "computer mouse", "sea lion",
    "traffic light", "toy train", "cat toy", "dog toy"))


def layoutgpt_strip(name: str) -> str:
    """LayoutGPT's article removal: leading characters of ``"a "``, then ``"an "``, then
    ``"the "`` taken off as character sets (``"a cat"`` -> ``"cat"``, ``"apple"`` ->
    ``"pple"``)."""
    for chars in _LEADING_SETS:
        name = name.lstrip(chars)
    return name


def layoutgpt_count_name(name: str, gt_names: Sequence[str]) -> str:
    """The name a predicted box counts for in LayoutGPT's counting score: ``name`` replaced by
    every ground-truth name (in order) that contains, or is contained in, the current name
    with :func:`layoutgpt_strip` applied; ``name`` itself when none does."""
    current = name
    for gt in gt_names:
        stripped = layoutgpt_strip(current)
        if stripped in gt or gt in stripped:
            current = gt
    return current


def layoutgpt_spatial_boxes(obj: str, names: Sequence[str | None],
                            boxes: Sequence[Sequence[float]]) -> list[Sequence[float]]:
    """Boxes LayoutGPT's spatial score takes for ``obj``: among boxes with a name and not
    ``[0, 0, 0, 0]``, those named exactly as the name closest to ``obj``
    (``difflib.get_close_matches(obj, names)[0]``); empty when none is close."""
    kept = [(n, b) for n, b in zip(names, boxes)
            if n is not None and [float(v) for v in b] != [0.0] * 4]
    best = difflib.get_close_matches(obj, [n for n, _ in kept])[:1]
    return [b for n, b in kept if n in best]


def head_words(text: str) -> tuple[str, ...]:
    """The head chunk of a phrase or name as singular words (module docstring):
    ``"two red Apples on a table"`` -> ``("red", "apple")``."""
    ws = words(text)
    while ws and (ws[0] in ARTICLES or ws[0] in NUMBER_WORDS or ws[0].isdigit()):
        ws = ws[1:]
    out = []
    for w in ws:
        if w in _CUT_WORDS or (out and len(w) > 4 and w.endswith("ing")):
            break
        out.append(singular(w))
    return tuple(out)


def goal_jax_matches(name: str, phrase: str | None) -> bool:
    """Whether ``phrase`` denotes object ``name`` under the goal_jax rules (module
    docstring)."""
    if phrase is None:
        return False
    n, p = head_words(name), head_words(phrase)
    if not n or not p:
        return False
    if len(p) < len(n):  # "hydrant" for "fire hydrant", not "dog" for "hot dog"
        return n[len(n) - len(p):] == p and n not in _COMPOUNDS
    if p[len(p) - len(n):] != n:
        return False
    for c in _COMPOUNDS:
        if len(c) > len(n) and c[len(c) - len(n):] == n and p[max(0, len(p) - len(c)):] == c:
            return False
    return True


def count_by_name(gt_names: Sequence[str], phrases: Sequence[str | None],
                  matching: str = LAYOUTGPT) -> tuple[dict[str, int], int]:
    """Predicted boxes per ground-truth name and the number of predicted boxes counted (boxes
    without a name are not counted)."""
    check(matching)
    counts = {n: 0 for n in gt_names}
    total = 0
    for phrase in phrases:
        if phrase is None:
            continue
        total += 1
        if matching == LAYOUTGPT:
            name = layoutgpt_count_name(phrase, gt_names)
            if name in counts:
                counts[name] += 1
        else:
            for n in gt_names:
                if goal_jax_matches(n, phrase):
                    counts[n] += 1
                    break
    return counts, total


def spatial_boxes(obj: str, phrases: Sequence[str | None], boxes: Sequence[Sequence[float]],
                  matching: str = LAYOUTGPT) -> list[Sequence[float]]:
    """The predicted boxes that stand for ``obj`` in a spatial prompt."""
    check(matching)
    if matching == LAYOUTGPT:
        return layoutgpt_spatial_boxes(obj, phrases, boxes)
    return [b for p, b in zip(phrases, boxes)
            if goal_jax_matches(obj, p) and [float(v) for v in b] != [0.0] * 4]


def check(matching: str) -> None:
    if matching not in MATCHINGS:
        raise ValueError(f"unknown matching {matching!r}; expected one of {MATCHINGS}")
