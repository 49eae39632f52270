"""Layout planning: caption -> :class:`goal_jax.layout.Layout` (phrases + xyxy boxes in [0, 1]).

GOAL samples from a caption plus a layout; at inference the paper plans layouts with an LLM
(GPT-4, in the style of LayoutGPT). Two planners, one interface (``planner.plan(caption) ->
Layout``):

* :class:`LLMPlanner` -- a chat LLM asked in LayoutGPT's style. The prompt is LayoutGPT's
  instruction (CSS-like lines ``phrase {width: ?px; height: ?px; left: ?px; top: ?px; }`` on a
  ``canvas`` x ``canvas`` image, default 64), then ``k`` in-context examples chosen from a
  supplied layout set by word-overlap (Jaccard) similarity with the caption, each a user
  turn ``Prompt: <caption>\\nLayout:`` and an assistant turn with the example's layout (the
  most similar example last, next to the question, as LayoutGPT orders them). The answer is
  parsed strictly (:func:`parse_css_layout`): every non-blank line must be one object line
  (only Markdown code fences and a ``Layout:`` header are tolerated); a malformed answer is
  asked again, up to ``attempts`` times, then :class:`PlannerError` names the caption, the last
  answer and what was wrong. The LLM is a :class:`ChatClient`:

  - :class:`OpenAIChatClient`: any OpenAI-compatible ``POST {api_base}/chat/completions``
    endpoint (OpenAI, vLLM, llama.cpp server, Ollama...), through ``urllib`` (no new
    dependency). Settings from arguments or the environment: ``GOAL_PLANNER_API_BASE``
    (else ``OPENAI_BASE_URL``, else ``https://api.openai.com/v1``), ``GOAL_PLANNER_API_KEY``
    (else ``OPENAI_API_KEY``; optional for local servers), ``GOAL_PLANNER_MODEL``.
  - :class:`TransformersChatClient`: a local ``transformers`` causal LM folder (greedy
    decoding; the tokenizer's chat template when it has one, else plain ``role: content``
    turns). ``GOAL_PLANNER_LM`` names the folder.

* :class:`RulePlanner` -- offline, deterministic, for templated prompts: counts ("three
  apples", "a few zebras", digits), attribute phrases ("a red cube and a blue sphere"),
  one spatial relation ("X to the left of / on the right of / above / on top of / below /
  under / next to / near Y") and NSR-1K's comparison clause ("..., the number of X is more
  / less than that of Y", "the same number of Y"). It always returns a valid layout: a caption
  it cannot split becomes one centred box whose phrase is the caption. It is the default
  when no LLM is configured.

:func:`plan_layout` is the one-call entry point (``scripts/sample.py --plan``,
``scripts/plan.py``, ``scripts/evaluate.py``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
import urllib.error
import urllib.request
from typing import Any, Protocol, Sequence

from goal_jax import layout as layout_lib

Layout = layout_lib.Layout

ENV_API_BASE = "GOAL_PLANNER_API_BASE"
ENV_API_KEY = "GOAL_PLANNER_API_KEY"
ENV_MODEL = "GOAL_PLANNER_MODEL"
ENV_LOCAL_LM = "GOAL_PLANNER_LM"
DEFAULT_API_BASE = "https://api.openai.com/v1"
PLANNERS = ("auto", "rule", "openai", "local")


class PlannerError(layout_lib.LayoutError):
    """A caption could not be planned (bad input, unreachable LLM, or no valid answer).
    A ``LayoutError`` (hence ``ValueError``), so callers handling bad layouts handle it."""


class LayoutParseError(ValueError):
    """An LLM answer is not a valid layout; the message says which line and why."""


# ----------------------------------------------------------------------------------------------
# Words.
# ----------------------------------------------------------------------------------------------

_WORD_RE = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
NUMBER_WORDS = {
    "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
    "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "single": 1, "couple": 2, "pair": 2,
    "several": 3, "few": 3, "many": 5, "some": 2, "both": 2,
}
ARTICLES = ("a", "an", "the")
_NO_SINGULAR = ("ss", "us", "ous")
# Singular words ending in "is" ("broccolis", "skis", "taxis" are plurals).
_SINGULAR_IS = frozenset(("this", "his", "tennis", "iris", "chassis", "pelvis", "axis",
                          "basis", "oasis", "trellis", "crisis", "thesis"))


def words(text: str) -> list[str]:
    """Lowercase alphanumeric words of ``text``."""
    return _WORD_RE.findall(text.lower())


_IRREGULAR = {"buss": "bus", "buses": "bus", "people": "person", "men": "man",
              "women": "woman", "children": "child", "mice": "mouse", "feet": "foot",
              "teeth": "tooth", "geese": "goose", "knives": "knife", "leaves": "leaf"}


def singular(word: str) -> str:
    """English plural -> singular by a few irregular forms (``buss`` -> ``bus``, as NSR-1K
    spells the plural) and suffix rules (``boxes`` -> ``box``, ``cherries`` -> ``cherry``,
    ``shelves`` -> ``shelf``, ``broccolis`` -> ``broccoli``); other words unchanged."""
    w = word
    if w in _IRREGULAR:
        return _IRREGULAR[w]
    if len(w) <= 3:
        return w
    if w.endswith("ies"):
        return w[:-3] + "y"
    if w.endswith(("sses", "shes", "ches", "xes", "zes")):
        return w[:-2]
    if w.endswith("ves") and w[:-3].endswith(("l", "ar")):
        return w[:-3] + "f"
    if w.endswith("is"):
        return w if w in _SINGULAR_IS else w[:-1]
    if w.endswith("s") and not w.endswith(_NO_SINGULAR):
        return w[:-1]
    return w


def normalize_name(text: str) -> tuple[str, ...]:
    """Words of an object name or phrase without leading articles / counts, last word
    singular: ``"two red Apples"`` -> ``("red", "apple")``."""
    ws = words(text)
    while ws and (ws[0] in ARTICLES or ws[0] in NUMBER_WORDS or ws[0].isdigit()):
        ws = ws[1:]
    if ws:
        ws[-1] = singular(ws[-1])
    return tuple(ws)


def name_matches(name: str, phrase: str) -> bool:
    """Whether a predicted ``phrase`` denotes object ``name``: the normalized name's words
    occur contiguously in the normalized phrase (``"car"`` matches ``"a red car"``, not
    ``"carpet"``), or the phrase's words occur in the name (``"hydrant"`` in ``"fire
    hydrant"``)."""
    a, b = normalize_name(name), normalize_name(phrase)
    if not a or not b:
        return False

    def contains(long, short):
        return any(long[i:i + len(short)] == short for i in range(len(long) - len(short) + 1))

    return contains(b, a) or contains(a, b)


def word_overlap(a: str, b: str) -> float:
    """Jaccard similarity of the word sets of two captions, in [0, 1]."""
    wa, wb = set(words(a)), set(words(b))
    if not wa or not wb:
        return 0.0
    return len(wa & wb) / len(wa | wb)


# ----------------------------------------------------------------------------------------------
# The planner interface.
# ----------------------------------------------------------------------------------------------


class Planner(Protocol):
    name: str

    def plan(self, caption: str) -> Layout:
        """caption -> a valid Layout (or PlannerError)."""


def _check_caption(caption: Any) -> str:
    if not isinstance(caption, str):
        raise PlannerError(f"caption must be a string, got {type(caption).__name__}")
    if not caption.strip():
        raise PlannerError("caption is empty")
    return caption.strip()


# ----------------------------------------------------------------------------------------------
# Rule-based planner.
# ----------------------------------------------------------------------------------------------

# (pattern, relation of the object BEFORE the pattern to the one after it), longest first.
_RELATIONS = (
    (r"to the left side of|on the left side of|to the left of|on the left of|left of", "left"),
    (r"to the right side of|on the right side of|to the right of|on the right of|right of",
     "right"),
    (r"on the top of|on top of|at the top of|above|over", "top"),
    (r"on the bottom of|at the bottom of|underneath|beneath|below|under", "bottom"),
    (r"next to|on side of|on the side of|beside|near", "next to"),
)
_RELATION_RE = re.compile(
    r"\b(" + "|".join(p for p, _ in _RELATIONS) + r")\b")
_RELATION_OF = {}
for _pattern, _rel in _RELATIONS:
    for _alt in _pattern.split("|"):
        _RELATION_OF[_alt] = _rel

_LEADING_FILLER = re.compile(
    r"^(?:there (?:is|are)|this is|these are|here (?:is|are)|"
    r"(?:a|an|the) (?:image|photo|picture|photograph|painting|drawing|rendering|scene) "
    r"(?:of|with|showing|depicting)|(?:image|photo|picture) of)\s+")
_TRAILING_FILLER = re.compile(
    r"\s+(?:(?:is|are)\s+)?(?:in|on) (?:the|this|an?) (?:image|photo|picture|photograph|"
    r"scene)$|\s+(?:is|are)$")
_COMPARISON = re.compile(
    r"the number of (?P<a>.+?) is (?P<cmp>more|less|fewer|greater|smaller) than that of "
    r"(?P<b>.+)$")
_SAME = re.compile(r"^(?:the |an? )?(?:same|equal) (?:number|amount) of (?P<rest>.+)$")
_SPLIT = re.compile(r"\s*(?:,\s*(?:and\s+)?|\band\b|\balong with\b|\btogether with\b|"
                    r"\bwith\b|\bplus\b)\s*")


@dataclasses.dataclass
class _Group:
    """One kind of object: its per-box phrase and how many boxes."""

    phrase: str
    count: int
    same_as_first: bool = False
    name: tuple[str, ...] = ()


def _parse_group(text: str) -> _Group | None:
    """One object clause ("a few red apples", "the same number of zebra") -> _Group."""
    text = text.strip(" .;:!?\"'")
    text = _TRAILING_FILLER.sub("", text)
    text = _LEADING_FILLER.sub("", text)
    same = _SAME.match(text)
    if same:
        text = same.group("rest")
    tokens = [t.strip(".,;:!?\"'()[]") for t in text.split()]
    tokens = [t for t in tokens if t]
    j = 0
    while j < len(tokens) and tokens[j] in ARTICLES:
        j += 1
    count = None
    if j < len(tokens) and (tokens[j] in NUMBER_WORDS or tokens[j].isdigit()):
        count = int(tokens[j]) if tokens[j].isdigit() else NUMBER_WORDS[tokens[j]]
        j += 1
        if j < len(tokens) and tokens[j] == "of":
            j += 1
    rest = tokens[j:]
    while rest and rest[0] in ARTICLES:
        rest = rest[1:]
    if not rest:
        return None
    if count is not None and count > 1:
        rest[-1] = singular(rest[-1])
    phrase = " ".join(rest)
    return _Group(phrase, max(1, count or 1), same_as_first=bool(same),
                  name=normalize_name(phrase))


def _split_groups(text: str) -> list[_Group]:
    groups = []
    for part in _SPLIT.split(text):
        if part and part.strip():
            g = _parse_group(part)
            if g is not None:
                groups.append(g)
    return groups


def _grid_boxes(n: int, region: tuple[float, float, float, float], pad: float = 0.08):
    """``n`` boxes tiling ``region`` (xyxy) in a near-square grid, row by row."""
    x0, y0, x1, y1 = region
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    w, h = (x1 - x0) / cols, (y1 - y0) / rows
    out = []
    for k in range(n):
        r, c = divmod(k, cols)
        bx0, by0 = x0 + c * w, y0 + r * h
        out.append((round(bx0 + pad * w, 4), round(by0 + pad * h, 4),
                    round(bx0 + (1 - pad) * w, 4), round(by0 + (1 - pad) * h, 4)))
    return out


# Regions of the object before / after the relation word (xyxy).
_RELATION_REGIONS = {
    "left": ((0.04, 0.2, 0.48, 0.8), (0.52, 0.2, 0.96, 0.8)),
    "right": ((0.52, 0.2, 0.96, 0.8), (0.04, 0.2, 0.48, 0.8)),
    "top": ((0.2, 0.04, 0.8, 0.48), (0.2, 0.52, 0.8, 0.96)),
    "bottom": ((0.2, 0.52, 0.8, 0.96), (0.2, 0.04, 0.8, 0.48)),
    "next to": ((0.04, 0.2, 0.48, 0.8), (0.52, 0.2, 0.96, 0.8)),
}


def _columns(n: int, region=(0.04, 0.12, 0.96, 0.88)) -> list[tuple[float, float, float, float]]:
    x0, y0, x1, y1 = region
    w = (x1 - x0) / n
    return [(x0 + i * w, y0, x0 + (i + 1) * w, y1) for i in range(n)]


class RulePlanner:
    """Deterministic layouts for templated captions (see the module docstring)."""

    name = "rule"

    def __init__(self, max_boxes: int = layout_lib.MAX_BOXES):
        self.max_boxes = int(max_boxes)

    def plan(self, caption: str) -> Layout:
        caption = _check_caption(caption)
        text = " ".join(caption.lower().replace(";", ",").split()).strip(" .!?")
        comparison = None
        m = _COMPARISON.search(text)
        if m:
            comparison = (normalize_name(m.group("a")), m.group("cmp"),
                          normalize_name(m.group("b")))
            text = text[:m.start()].rstrip(" ,")
        relation = None
        rm = _RELATION_RE.search(text)
        regions: list[tuple[float, float, float, float]]
        if rm:
            before = _split_groups(text[:rm.start()])
            after = _split_groups(text[rm.end():])
            if before and after:
                relation = _RELATION_OF[rm.group(1)]
                # Extra objects in a clause ("a cat and a dog left of a car") share its region.
                groups = before + after
                first, second = _RELATION_REGIONS[relation]
                regions = (_sub_columns(len(before), first) + _sub_columns(len(after), second))
        if relation is None:
            groups = _split_groups(text)
            regions = _columns(len(groups)) if groups else []
        if not groups:
            return Layout((caption,), ((0.1, 0.1, 0.9, 0.9),))
        self._apply_counts(groups, comparison)
        budget = self.max_boxes
        phrases, boxes = [], []
        per_group = max(1, budget // len(groups))
        for g, region in zip(groups, regions):
            n = min(g.count, per_group)
            for box in _grid_boxes(n, region):
                phrases.append(g.phrase)
                boxes.append(box)
        return Layout.create(phrases, boxes, name=f"rule planner ({caption!r})")

    @staticmethod
    def _apply_counts(groups: list[_Group], comparison) -> None:
        """'the same number of Y' copies the first count; 'the number of X is more / less
        than that of Y' makes Y's count one less / more than X's when Y had no number."""
        for g in groups[1:]:
            if g.same_as_first:
                g.count = groups[0].count
        if comparison is None:
            return
        a_name, cmp, b_name = comparison
        ga = next((g for g in groups if name_matches(" ".join(a_name), g.phrase)), None)
        gb = next((g for g in groups if name_matches(" ".join(b_name), g.phrase)
                   and g is not ga), None)
        if ga is None or gb is None:
            return
        if cmp in ("more", "greater") and not gb.count < ga.count:
            gb.count = max(1, ga.count - 1)
            if gb.count >= ga.count:
                ga.count = gb.count + 1
        elif cmp in ("less", "fewer", "smaller") and not gb.count > ga.count:
            gb.count = ga.count + 1


def _sub_columns(n: int, region) -> list[tuple[float, float, float, float]]:
    if n <= 1:
        return [region] * n
    return _columns(n, region)


# ----------------------------------------------------------------------------------------------
# LLM planner: prompt, parsing, clients.
# ----------------------------------------------------------------------------------------------

INSTRUCTION = (
    "Instruction: Given a sentence prompt that will be used to generate an image, plan the "
    "layout of the image. The generated layout should follow the CSS style, where each line "
    "starts with the object description and is followed by its absolute position. Formally, "
    "each line should be like \"object {{width: ?px; height: ?px; left: ?px; top: ?px; }}\". "
    "The image is {canvas}px wide and {canvas}px high. Therefore, all properties of the "
    "positions should not exceed {canvas}px, including the addition of left and width and the "
    "addition of top and height. Answer with the layout lines only, one object per line.\n")

_CSS_LINE = re.compile(r"^\s*(?:[-*]\s+|\d+[.)]\s+)?(?P<phrase>[^{}]*?)\s*\{(?P<body>[^{}]*)\}\s*$")
_PROPERTY = re.compile(r"^\s*(?P<key>[a-zA-Z-]+)\s*:\s*(?P<value>[-+]?\d+(?:\.\d+)?)\s*(?:px)?\s*$")
_KEYS = ("width", "height", "left", "top")


def format_css_layout(layout: Layout, canvas: int = 64) -> str:
    """A layout as LayoutGPT's CSS lines on a ``canvas`` px square (integers, truncated as
    LayoutGPT writes its examples)."""
    lines = []
    for phrase, (x0, y0, x1, y1) in zip(layout.phrases, layout.boxes):
        x, y = int(x0 * canvas), int(y0 * canvas)
        w, h = int((x1 - x0) * canvas), int((y1 - y0) * canvas)
        lines.append(f"{phrase} {{width: {w}px; height: {h}px; left: {x}px; top: {y}px; }}")
    return "\n".join(lines)


def parse_css_layout(text: str, canvas: int = 64) -> Layout:
    """Strictly parses an LLM answer in LayoutGPT's CSS style -> Layout.

    Every non-blank line must be ``phrase {width: Wpx; height: Hpx; left: Lpx; top: Tpx; }``
    (the four properties exactly once each, any order, numbers with optional ``px``); lines
    that are only a Markdown code fence or ``Layout:`` are skipped, a leading list marker is
    allowed. Coordinates are px on a ``canvas`` square: ``left``/``top`` must be in
    [0, canvas), ``width``/``height`` > 0; the right / bottom edge is clipped to the canvas
    (as LayoutGPT does). At least one object, at most ``MAX_BOXES``.

    Raises:
      LayoutParseError: naming the line number, the line and what is wrong.
    """
    if not isinstance(text, str):
        raise LayoutParseError(f"the answer is not text: {type(text).__name__}")
    phrases, boxes = [], []
    for n, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("```") or stripped.lower() in ("layout:",):
            continue
        where = f"line {n} ({stripped[:80]!r})"
        m = _CSS_LINE.match(stripped)
        if not m:
            raise LayoutParseError(f"{where} is not 'object {{width: ?px; height: ?px; "
                                   "left: ?px; top: ?px; }'")
        phrase = m.group("phrase").strip().strip("\"'`").strip()
        if not phrase:
            raise LayoutParseError(f"{where} has no object description before '{{'")
        props: dict[str, float] = {}
        for part in m.group("body").split(";"):
            if not part.strip():
                continue
            pm = _PROPERTY.match(part)
            if not pm:
                raise LayoutParseError(f"{where}: property {part.strip()!r} is not 'name: "
                                       "<number>px'")
            key = pm.group("key").lower()
            if key not in _KEYS:
                raise LayoutParseError(f"{where}: unknown property {key!r} (expected "
                                       f"{', '.join(_KEYS)})")
            if key in props:
                raise LayoutParseError(f"{where}: property {key!r} given twice")
            props[key] = float(pm.group("value"))
        missing = [k for k in _KEYS if k not in props]
        if missing:
            raise LayoutParseError(f"{where}: missing {', '.join(missing)}")
        w, h, x, y = (props[k] for k in _KEYS)
        if w <= 0 or h <= 0:
            raise LayoutParseError(f"{where}: width and height must be > 0, got {w:g} x {h:g}")
        if not (0 <= x < canvas and 0 <= y < canvas):
            raise LayoutParseError(f"{where}: left/top ({x:g}, {y:g}) outside the "
                                   f"{canvas}px canvas")
        boxes.append((x / canvas, y / canvas, min(x + w, canvas) / canvas,
                      min(y + h, canvas) / canvas))
        phrases.append(phrase)
    if not phrases:
        raise LayoutParseError("the answer has no layout lines")
    if len(phrases) > layout_lib.MAX_BOXES:
        raise LayoutParseError(f"{len(phrases)} objects, at most {layout_lib.MAX_BOXES}")
    try:
        return Layout.create(phrases, boxes, name="answer")
    except layout_lib.LayoutError as e:
        raise LayoutParseError(str(e)) from None


class ChatClient(Protocol):
    """messages ([{"role", "content"}]) -> the assistant's answer text."""

    def __call__(self, messages: list[dict[str, str]]) -> str: ...


class OpenAIChatClient:
    """OpenAI-compatible chat completions over HTTP (``urllib``; no extra dependency).

    Args:
      api_base: e.g. ``https://api.openai.com/v1`` or ``http://127.0.0.1:8000/v1``
        (default: ``$GOAL_PLANNER_API_BASE``, ``$OPENAI_BASE_URL``, OpenAI).
      model: model name (default ``$GOAL_PLANNER_MODEL``; required).
      api_key: bearer token (default ``$GOAL_PLANNER_API_KEY``, ``$OPENAI_API_KEY``; may be
        empty for local servers).
      temperature, max_tokens, timeout: request settings (timeout in seconds).
    """

    def __init__(self, api_base: str | None = None, model: str | None = None,
                 api_key: str | None = None, temperature: float = 0.0, max_tokens: int = 512,
                 timeout: float = 60.0):
        self.api_base = (api_base or os.environ.get(ENV_API_BASE)
                         or os.environ.get("OPENAI_BASE_URL") or DEFAULT_API_BASE).rstrip("/")
        self.model = model or os.environ.get(ENV_MODEL)
        if not self.model:
            raise PlannerError(f"LLM planner: no model name (pass --planner_model or set "
                               f"${ENV_MODEL})")
        self.api_key = api_key if api_key is not None else (
            os.environ.get(ENV_API_KEY) or os.environ.get("OPENAI_API_KEY") or "")
        self.temperature = float(temperature)
        self.max_tokens = int(max_tokens)
        self.timeout = float(timeout)

    @property
    def url(self) -> str:
        return self.api_base + "/chat/completions"

    def __call__(self, messages: list[dict[str, str]]) -> str:
        body = json.dumps({"model": self.model, "messages": messages,
                           "temperature": self.temperature,
                           "max_tokens": self.max_tokens}).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                payload = response.read().decode("utf-8")
        except urllib.error.HTTPError as e:
            detail = e.read().decode("utf-8", "replace")[:300]
            raise _HTTPStatusError(e.code, f"{self.url} answered HTTP {e.code}: {detail}")
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            raise PlannerError(f"LLM planner: cannot reach {self.url}: {e}") from None
        try:
            return json.loads(payload)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise LayoutParseError(f"{self.url} did not return a chat completion "
                                   f"(choices[0].message.content): {payload[:200]!r}")


class _HTTPStatusError(PlannerError):
    def __init__(self, status: int, message: str):
        super().__init__(f"LLM planner: {message}")
        self.status = status


class TransformersChatClient:
    """A local ``transformers`` causal LM folder as a chat client (greedy decoding on CPU
    or the default torch device). The tokenizer's chat template is used when it has one;
    otherwise the turns are written as ``role: content`` lines ending with ``assistant:``."""

    def __init__(self, folder: str, max_new_tokens: int = 256):
        if not os.path.isdir(folder):
            raise PlannerError(f"local LM planner: folder not found: {folder}")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.folder = folder
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
        self.model.eval()
        self.max_new_tokens = int(max_new_tokens)

    def prompt_text(self, messages: list[dict[str, str]]) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=True)
        turns = [f"{m['role']}: {m['content']}" for m in messages]
        return "\n".join(turns) + "\nassistant:"

    def __call__(self, messages: list[dict[str, str]]) -> str:
        import torch

        ids = self.tokenizer(self.prompt_text(messages), return_tensors="pt")
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id
        with torch.no_grad():
            out = self.model.generate(**ids, max_new_tokens=self.max_new_tokens,
                                      do_sample=False, pad_token_id=pad)
        return self.tokenizer.decode(out[0, ids["input_ids"].shape[1]:],
                                     skip_special_tokens=True)


@dataclasses.dataclass(frozen=True)
class Example:
    """An in-context example: a caption and its layout."""

    caption: str
    layout: Layout


def load_examples(path: str) -> list[Example]:
    """Reads an in-context layout set.

    Accepted files: a sampling JSONL (``goal_jax.layout`` items: caption, phrases, boxes), a
    dataset annotations JSONL (``goal_jax.data.format``; ``xyxy_normalized`` boxes), or an
    NSR-1K ``*.json`` list (read through ``goal_jax.data.importers.import_nsr1k``). NSR-1K
    entries whose layout lost a zero-area box (spatial.val ids 919-937 have all-zero boxes)
    are not examples: they are skipped with a ``UserWarning`` naming them.

    Raises:
      PlannerError: naming the file and the first bad item.
    """
    if not os.path.isfile(path):
        raise PlannerError(f"examples: no such file: {path}")
    if path.endswith(".json"):
        import tempfile

        from goal_jax.data import importers

        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "examples.jsonl")
            try:
                summary = importers.import_nsr1k(path, out)
            except ValueError as e:
                raise PlannerError(f"examples: {e}") from None
            incomplete = list(dict.fromkeys(d["id"] for d in summary["boxes_dropped"]))
            examples = _read_annotation_examples(out, path, skip=set(incomplete))
        if incomplete:
            import warnings

            warnings.warn(f"examples {path}: skipped {len(incomplete)} entries with a zero-area "
                          f"box (no complete layout): ids {', '.join(incomplete[:20])}"
                          f"{' ...' if len(incomplete) > 20 else ''}", stacklevel=2)
        if not examples and summary["items_dropped"]:
            raise PlannerError(f"examples {path}: no usable entry; first problem: "
                               f"{summary['items_dropped'][0]}")
        return examples
    with open(path, encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), "")
    try:
        is_dataset = "annotations" in json.loads(first) if first else False
    except json.JSONDecodeError:
        raise PlannerError(f"examples {path} line 1: malformed JSON") from None
    if is_dataset:
        return _read_annotation_examples(path, path)
    try:
        items = layout_lib.read_jsonl(path)
    except layout_lib.LayoutError as e:
        raise PlannerError(f"examples: {e}") from None
    return [Example(item.caption, item.layout) for _, item in items]


def _read_annotation_examples(path: str, name: str, skip: set[str] = frozenset()
                              ) -> list[Example]:
    from goal_jax.data import format as fmt

    records, errors = fmt.read_annotations(path, require_image=False)
    if errors:
        raise PlannerError(f"examples {name}: item {errors[0]['id']}: {errors[0]['reason']}")
    out = []
    for r in records:
        if r.id in skip:
            continue
        if r.box_format != "xyxy_normalized":
            raise PlannerError(f"examples {name}: item {r.id} has {r.box_format} boxes; "
                               "in-context examples need xyxy_normalized boxes")
        boxes = [[min(max(v, 0.0), 1.0) for v in b] for b in r.boxes]
        try:
            out.append(Example(r.caption, Layout.create(r.phrases, boxes,
                                                        name=f"examples {name} item {r.id}")))
        except layout_lib.LayoutError as e:
            raise PlannerError(str(e)) from None
    return out


def select_examples(caption: str, examples: Sequence[Example], k: int) -> list[Example]:
    """The ``k`` examples most similar to ``caption`` by :func:`word_overlap` (ties keep
    the set's order), most similar first."""
    scored = sorted(range(len(examples)),
                    key=lambda i: (-word_overlap(caption, examples[i].caption), i))
    return [examples[i] for i in scored[:max(0, k)]]


def build_messages(caption: str, examples: Sequence[Example], canvas: int = 64
                   ) -> list[dict[str, str]]:
    """LayoutGPT-style chat: system instruction, the examples as user/assistant turns (the
    most similar -- first in ``examples`` -- placed last), then the question."""
    messages = [{"role": "system", "content": INSTRUCTION.format(canvas=canvas)}]
    for ex in reversed(list(examples)):
        messages.append({"role": "user", "content": f"Prompt: {ex.caption}\nLayout:"})
        messages.append({"role": "assistant", "content": format_css_layout(ex.layout, canvas)})
    messages.append({"role": "user", "content": f"Prompt: {caption}\nLayout:"})
    return messages


class LLMPlanner:
    """LayoutGPT-style planning with a chat LLM (see the module docstring).

    Args:
      client: a :class:`ChatClient` (messages -> answer text).
      examples: the in-context layout set (may be empty: zero-shot).
      k: examples per prompt.
      canvas: side of the px canvas the LLM plans on.
      attempts: tries per caption (malformed answers and HTTP 429 / 5xx are retried).
      retry_wait: seconds between tries after an HTTP error.
    """

    name = "llm"

    def __init__(self, client: ChatClient, examples: Sequence[Example] = (), k: int = 8,
                 canvas: int = 64, attempts: int = 3, retry_wait: float = 2.0):
        if attempts < 1:
            raise ValueError(f"LLMPlanner: attempts must be >= 1, got {attempts}")
        if canvas < 8:
            raise ValueError(f"LLMPlanner: canvas must be >= 8 px, got {canvas}")
        self.client = client
        self.examples = list(examples)
        self.k = int(k)
        self.canvas = int(canvas)
        self.attempts = int(attempts)
        self.retry_wait = float(retry_wait)
        self.log: list[dict[str, Any]] = []  # per caption: attempts and problems

    def messages(self, caption: str) -> list[dict[str, str]]:
        return build_messages(caption, select_examples(caption, self.examples, self.k),
                              self.canvas)

    def plan(self, caption: str) -> Layout:
        caption = _check_caption(caption)
        messages = self.messages(caption)
        problems: list[str] = []
        answer = ""
        for attempt in range(1, self.attempts + 1):
            try:
                answer = self.client(messages)
                layout = parse_css_layout(answer, self.canvas)
            except LayoutParseError as e:
                problems.append(str(e))
                continue
            except _HTTPStatusError as e:
                if e.status != 429 and e.status < 500:
                    raise
                problems.append(str(e))
                if attempt < self.attempts:
                    time.sleep(self.retry_wait)
                continue
            self.log.append({"caption": caption, "attempts": attempt, "problems": problems})
            return layout
        self.log.append({"caption": caption, "attempts": self.attempts, "problems": problems})
        raise PlannerError(
            f"LLM planner: no valid layout for caption {caption!r} after {self.attempts} "
            f"attempt(s); last problem: {problems[-1]}; last answer: {answer[:200]!r}")


# ----------------------------------------------------------------------------------------------
# Construction and the one-call entry point.
# ----------------------------------------------------------------------------------------------


def llm_configured() -> bool:
    """Whether the environment names an LLM (``$GOAL_PLANNER_MODEL`` or ``$GOAL_PLANNER_LM``)."""
    return bool(os.environ.get(ENV_MODEL) or os.environ.get(ENV_LOCAL_LM))


def make_planner(kind: str = "auto", *, api_base: str | None = None, model: str | None = None,
                 api_key: str | None = None, lm_folder: str | None = None,
                 examples: str | Sequence[Example] | None = None, k: int = 8, canvas: int = 64,
                 attempts: int = 3, timeout: float = 60.0) -> Planner:
    """A planner by name.

    ``kind``: ``"rule"``; ``"openai"`` (an OpenAI-compatible endpoint); ``"local"`` (a
    transformers folder: ``lm_folder`` or ``$GOAL_PLANNER_LM``); ``"auto"``: ``local`` when
    ``lm_folder`` / ``$GOAL_PLANNER_LM`` is set, else ``openai`` when ``model`` /
    ``$GOAL_PLANNER_MODEL`` is set, else ``rule``. ``examples``: in-context set (a path for
    :func:`load_examples` or a list).
    """
    if kind not in PLANNERS:
        raise PlannerError(f"unknown planner {kind!r}; choose one of {PLANNERS}")
    if kind == "auto":
        if lm_folder or os.environ.get(ENV_LOCAL_LM):
            kind = "local"
        elif model or os.environ.get(ENV_MODEL):
            kind = "openai"
        else:
            kind = "rule"
    if kind == "rule":
        return RulePlanner()
    if isinstance(examples, str):
        examples = load_examples(examples)
    if kind == "openai":
        client = OpenAIChatClient(api_base, model, api_key, timeout=timeout)
    else:
        folder = lm_folder or os.environ.get(ENV_LOCAL_LM)
        if not folder:
            raise PlannerError(f"local LM planner: pass a transformers folder or set "
                               f"${ENV_LOCAL_LM}")
        client = TransformersChatClient(folder)
    planner = LLMPlanner(client, examples or (), k=k, canvas=canvas, attempts=attempts)
    planner.name = kind
    return planner


def plan_layout(caption: str, planner: Planner | str | None = None, **options) -> Layout:
    """caption -> Layout with ``planner`` (an object with ``.plan``, a kind for
    :func:`make_planner`, or None = ``"auto"``: the configured LLM, else the rule planner).
    ``options`` go to :func:`make_planner`."""
    if planner is None or isinstance(planner, str):
        planner = make_planner(planner or "auto", **options)
    return planner.plan(caption)
