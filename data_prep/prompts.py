"""Template prompts for a GOAL2K-style dataset, optionally rewritten by an LLM.

Prompts are drawn from the 80 COCO object names (``vocab/coco_objects.txt``) and attribute
vocabularies (``vocab/colors.txt``, ``shapes.txt``, ``textures.txt``, ``spatial_relations.txt``,
``actions.txt``, ``counts.txt``), one template per category:

==============  ===================================================================
category        template (articles and plurals filled in)
==============  ===================================================================
color           a {color} {object} and a {color} {object}
shape           a {shape} {object} and a {shape} {object}
texture         a {texture} {object} and a {texture} {object}
spatial         a {object} {relation} a {object}
counting        {n} {objects} and {m} {objects}  |  {n} {objects} and a {object}
non_spatial     a {person or animal} {action} a {portable object}
complex         a {color} {object} {relation} a {texture} {object}  |
                a {color} {object}, a {color} {object} and a {texture} {object}
==============  ===================================================================

Within a prompt the two objects (and the two attributes) differ. Every record carries its
intended phrases (the objects with their attributes, exact substrings of the prompt, with a
``count`` for counting phrases), which annotate.py grounds with GroundingDINO.

Counts: ``--total`` (default 1,000) split evenly over ``--categories`` (the first categories get
the remainder), or explicit ``--counts color=300,spatial=200``. Drawing is deterministic:
category c uses ``random.Random("goal2k:<seed>:<c>")``, so a category's prompts do not depend
on the others. Prompts are unique over the whole file (a category whose vocabulary cannot give
enough distinct prompts is an error).

``--rewrite llm`` asks an OpenAI-compatible chat API (``/chat/completions``; endpoint from
``--base-url`` or ``$OPENAI_BASE_URL``, key from ``$OPENAI_API_KEY``) to make each prompt fluent
while keeping every phrase verbatim. A rewrite that drops or changes a phrase, is empty, spans
several lines or has more than 60 words is rejected and the template prompt kept (the record
gets ``rewrite_error``). Rewrites are appended to ``<out>.rewrites.jsonl`` as they arrive and
reused for the same id, template and model, so an interrupted run resumes where it stopped
(and a rerun with more prompts only asks for the new ones). The template output needs no
network (the default).

Output: JSONL, one record per prompt::

    {"id": "color_0000", "category": "color", "prompt": "a red car and a blue bench",
     "phrases": [{"phrase": "a red car", "count": 1}, {"phrase": "a blue bench", "count": 1}],
     "template": "a red car and a blue bench", "source": "template", "seed": 0}
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from typing import Callable

if __package__ in (None, ""):  # python data_prep/prompts.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_prep import common  # noqa: E402
from data_prep import phrases as phrases_lib  # noqa: E402
from data_prep.common import DataPrepError  # noqa: E402

CATEGORIES = ("color", "shape", "texture", "spatial", "counting", "non_spatial", "complex")
SUBJECT_SUPERCATEGORIES = ("person", "animal")
PORTABLE_SUPERCATEGORIES = ("accessory", "sports", "kitchen", "food", "indoor")
MAX_REWRITE_WORDS = 60


class Vocabulary:
    """The word lists the templates draw from (see the module docstring)."""

    def __init__(self, vocab_dir: str | None = None):
        rows = [line.split("\t") for line in common.read_vocab("coco_objects", vocab_dir)]
        bad = [r for r in rows if len(r) != 2]
        if bad:
            raise DataPrepError(f"coco_objects.txt: expected 'name<TAB>supercategory' lines, got {bad[0]!r}")
        self.objects = [r[0].strip() for r in rows]
        self.supercategory = {r[0].strip(): r[1].strip() for r in rows}
        self.colors = common.read_vocab("colors", vocab_dir)
        self.shapes = common.read_vocab("shapes", vocab_dir)
        self.textures = common.read_vocab("textures", vocab_dir)
        self.relations = common.read_vocab("spatial_relations", vocab_dir)
        self.actions = common.read_vocab("actions", vocab_dir)
        self.counts = []
        for line in common.read_vocab("counts", vocab_dir):
            word, _, value = line.partition("\t")
            if not value.strip().isdigit() or int(value) < 2:
                raise DataPrepError(f"counts.txt: expected 'word<TAB>number >= 2' lines, got {line!r}")
            self.counts.append((word.strip(), int(value)))
        self.subjects = [o for o in self.objects if self.supercategory[o] in SUBJECT_SUPERCATEGORIES]
        self.portable = [o for o in self.objects if self.supercategory[o] in PORTABLE_SUPERCATEGORIES]
        if not self.subjects or not self.portable:
            raise DataPrepError("coco_objects.txt needs person/animal objects and portable objects "
                                f"({PORTABLE_SUPERCATEGORIES}) for the non_spatial template")


def _two(rng: random.Random, items: list) -> tuple:
    a, b = rng.sample(items, 2)
    return a, b


def _template(category: str, rng: random.Random, v: Vocabulary) -> tuple[str, list[tuple[str, int]]]:
    """One prompt of ``category`` -> (prompt, [(phrase, count)])."""
    art = phrases_lib.with_article
    if category in ("color", "shape", "texture"):
        words = {"color": v.colors, "shape": v.shapes, "texture": v.textures}[category]
        (a1, a2), (o1, o2) = _two(rng, words), _two(rng, v.objects)
        p1, p2 = art(f"{a1} {o1}"), art(f"{a2} {o2}")
        return f"{p1} and {p2}", [(p1, 1), (p2, 1)]
    if category == "spatial":
        (o1, o2), rel = _two(rng, v.objects), rng.choice(v.relations)
        p1, p2 = art(o1), art(o2)
        return f"{p1} {rel} {p2}", [(p1, 1), (p2, 1)]
    if category == "counting":
        (o1, o2), (w1, n1) = _two(rng, v.objects), rng.choice(v.counts)
        p1 = f"{w1} {phrases_lib.plural(o1)}"
        if rng.random() < 0.5:
            w2, n2 = rng.choice(v.counts)
            p2 = f"{w2} {phrases_lib.plural(o2)}"
            return f"{p1} and {p2}", [(p1, n1), (p2, n2)]
        p2 = art(o2)
        return f"{p1} and {p2}", [(p1, n1), (p2, 1)]
    if category == "non_spatial":
        subject = rng.choice(v.subjects)
        obj = rng.choice([o for o in v.portable if o != subject])
        p1, p2 = art(subject), art(obj)
        return f"{p1} {rng.choice(v.actions)} {p2}", [(p1, 1), (p2, 1)]
    if category == "complex":
        if rng.random() < 0.5:
            (o1, o2), rel = _two(rng, v.objects), rng.choice(v.relations)
            p1, p2 = art(f"{rng.choice(v.colors)} {o1}"), art(f"{rng.choice(v.textures)} {o2}")
            return f"{p1} {rel} {p2}", [(p1, 1), (p2, 1)]
        o1, o2, o3 = rng.sample(v.objects, 3)
        c1, c2 = _two(rng, v.colors)
        p1, p2 = art(f"{c1} {o1}"), art(f"{c2} {o2}")
        p3 = art(f"{rng.choice(v.textures)} {o3}")
        return f"{p1}, {p2} and {p3}", [(p1, 1), (p2, 1), (p3, 1)]
    raise DataPrepError(f"unknown prompt category {category!r}; expected one of {CATEGORIES}")


def split_counts(total: int, categories: list[str]) -> dict[str, int]:
    """``total`` split evenly over ``categories``; the first ``total % len`` get one more."""
    if total < 0:
        raise DataPrepError(f"--total must be >= 0, got {total}")
    if not categories:
        raise DataPrepError("no categories given")
    base, extra = divmod(total, len(categories))
    return {c: base + (1 if i < extra else 0) for i, c in enumerate(categories)}


def parse_counts(text: str) -> dict[str, int]:
    """``"color=300,spatial=200"`` -> {"color": 300, "spatial": 200}."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in CATEGORIES:
            raise DataPrepError(f"--counts: unknown category {name!r}; expected one of {CATEGORIES}")
        if not value.strip().isdigit():
            raise DataPrepError(f"--counts: {name} needs a non-negative integer, got {value!r}")
        out[name] = int(value)
    if not out:
        raise DataPrepError("--counts is empty")
    return out


def generate_prompts(counts: dict[str, int], seed: int = 0, vocab_dir: str | None = None,
                     max_attempts_per_prompt: int = 200) -> list[dict]:
    """Template prompt records, ``counts[category]`` per category, in category order.

    Raises:
      DataPrepError: an unknown category, or a vocabulary too small for the requested count.
    """
    vocab = Vocabulary(vocab_dir)
    seen: set[str] = set()
    records = []
    for category, n in counts.items():
        if category not in CATEGORIES:
            raise DataPrepError(f"unknown prompt category {category!r}; expected one of {CATEGORIES}")
        rng = random.Random(f"goal2k:{seed}:{category}")
        made, attempts = 0, 0
        while made < n:
            attempts += 1
            if attempts > max_attempts_per_prompt * max(n, 1):
                raise DataPrepError(f"category {category}: only {made} distinct prompts after "
                                    f"{attempts - 1} draws, {n} requested: enlarge the vocabulary "
                                    "or lower the count")
            prompt, phrases = _template(category, rng, vocab)
            if prompt in seen:
                continue
            seen.add(prompt)
            records.append({
                "id": f"{category}_{made:04d}", "category": category, "prompt": prompt,
                "phrases": [{"phrase": p, "count": c} for p, c in phrases],
                "template": prompt, "source": "template", "seed": seed,
            })
            made += 1
    return records


# ----------------------------------------------------------------------------------------------
# LLM rewriting.
# ----------------------------------------------------------------------------------------------

SYSTEM_PROMPT = (
    "You rewrite prompts for a text-to-image model into one fluent, natural English sentence. "
    "Keep every listed phrase exactly as written (same words, same spelling). Do not add, remove "
    "or change objects, colors, shapes, textures, numbers or spatial relations. Answer with the "
    "sentence only, no quotes.")


def rewrite_request(record: dict, model: str, temperature: float) -> dict:
    phrases = "; ".join(f'"{p["phrase"]}"' for p in record["phrases"])
    return {
        "model": model, "temperature": temperature,
        "messages": [{"role": "system", "content": SYSTEM_PROMPT},
                     {"role": "user", "content": f"Prompt: {record['template']}\n"
                                                 f"Phrases to keep verbatim: {phrases}"}],
    }


def check_rewrite(record: dict, text: str) -> tuple[str, list[dict]]:
    """Validates an LLM rewrite -> (prompt, phrases with the rewrite's exact substrings).

    Raises:
      DataPrepError: naming what is wrong (missing phrase, several lines, too long, empty).
    """
    text = text.strip().strip('"').strip()
    if not text:
        raise DataPrepError("empty rewrite")
    if "\n" in text:
        raise DataPrepError("rewrite spans several lines")
    if len(text.split()) > MAX_REWRITE_WORDS:
        raise DataPrepError(f"rewrite has {len(text.split())} words (> {MAX_REWRITE_WORDS})")
    out = []
    for p in record["phrases"]:
        at = phrases_lib.find_phrase(text, p["phrase"])
        if at < 0:
            raise DataPrepError(f"rewrite lost the phrase {p['phrase']!r}")
        out.append(dict(p, phrase=text[at:at + len(p["phrase"])]))
    return text, out


def rewrite_records(records: list[dict], call: Callable[[dict], dict], model: str,
                    partial_path: str, temperature: float = 0.7, show_progress: bool = True
                    ) -> dict[str, int]:
    """Rewrites ``records`` in place through ``call(payload) -> chat completion dict``.

    Finished rewrites are appended to ``partial_path`` and reused when the same id has the same
    template there (resume). Returns counts {"rewritten", "rejected", "reused"}.
    """
    cache = {}
    if os.path.isfile(partial_path):
        cache = {r["id"]: r for r in common.read_jsonl(partial_path, "partial rewrite file")
                 if isinstance(r.get("id"), str)}
    stats = {"rewritten": 0, "rejected": 0, "reused": 0}
    for i, rec in enumerate(common.progress(records, len(records), "rewrite", not show_progress)):
        old = cache.get(rec["id"])
        if old is not None and old.get("template") == rec["template"] and old.get("model") == model:
            result = old
            stats["reused"] += 1
        else:
            try:
                answer = call(rewrite_request(rec, model, temperature))
                content = answer["choices"][0]["message"]["content"]
                if not isinstance(content, str):
                    raise DataPrepError("answer has no text content")
                prompt, phrases = check_rewrite(rec, content)
                result = {"id": rec["id"], "template": rec["template"], "model": model,
                          "prompt": prompt, "phrases": phrases}
                stats["rewritten"] += 1
            except (DataPrepError, common.HTTPError, KeyError, IndexError, TypeError) as e:
                if isinstance(e, common.HTTPError) and (
                        e.status is None or e.status in common.FATAL_STATUS
                        or e.status in common.RETRY_STATUS):
                    raise  # network down, wrong key or retries spent: stop, resume later
                result = {"id": rec["id"], "template": rec["template"], "model": model,
                          "error": str(e) if isinstance(e, (DataPrepError, common.HTTPError))
                          else f"malformed chat answer ({type(e).__name__}: {e})"}
                stats["rejected"] += 1
            common.append_jsonl(partial_path, result)
        if "error" in result:
            rec["rewrite_error"] = result["error"]
        else:
            rec["prompt"], rec["phrases"] = result["prompt"], result["phrases"]
            rec["rewritten_by"] = model
    return stats


# ----------------------------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m data_prep.prompts", description=__doc__.split("\n\n")[0],
        epilog="Example: python -m data_prep.prompts --out work/prompts.jsonl --total 1000",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output JSONL file")
    p.add_argument("--total", type=int, default=1000, help="prompts in all (default: %(default)s)")
    p.add_argument("--categories", default=",".join(CATEGORIES),
                   help="comma-separated categories sharing --total (default: all: %(default)s)")
    p.add_argument("--counts", default=None,
                   help="explicit prompts per category, e.g. color=300,spatial=200 (overrides "
                        "--total/--categories)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--vocab-dir", default=None,
                   help=f"folder with the vocabulary .txt files (default: {common.VOCAB_DIR})")
    p.add_argument("--rewrite", choices=("none", "llm"), default="none",
                   help="none = template prompts (offline, default); llm = fluent rewrite by a chat API")
    p.add_argument("--llm-model", default="gpt-4o-mini", help="chat model name (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    common.add_endpoint_args(p, "LLM rewriter")
    p.set_defaults(rpm=60.0)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.counts:
            counts = parse_counts(args.counts)
        else:
            cats = [c.strip() for c in args.categories.split(",") if c.strip()]
            unknown = [c for c in cats if c not in CATEGORIES]
            if unknown:
                raise DataPrepError(f"--categories: unknown {unknown}; expected from {CATEGORIES}")
            counts = split_counts(args.total, cats)
        records = generate_prompts(counts, args.seed, args.vocab_dir)
        partial = args.out + ".rewrites.jsonl"
        if args.rewrite == "llm":
            url, key = common.endpoint_settings(args.base_url, args.api_key_env)
            if not key:
                raise DataPrepError(f"--rewrite llm needs an API key in ${args.api_key_env}")
            client = common.client_from_args(args)
            stats = rewrite_records(records, lambda payload: client.post("chat/completions", payload),
                                    args.llm_model, partial, args.temperature, not args.quiet)
            print(f"rewrite: {stats}", file=sys.stderr)
        n = common.write_jsonl(args.out, records)
    except (DataPrepError, common.HTTPError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    per = {c: sum(r["category"] == c for r in records) for c in counts}
    print(f"wrote {n} prompts to {args.out}: {per}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
