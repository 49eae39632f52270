"""Plan layouts (phrases + boxes) for captions, for ``scripts/sample.py``.

One caption, printed as a JSON item::

    python scripts/plan.py --caption "a red cat to the left of two blue dogs"

A file of captions (one per line) -> a JSONL that ``scripts/sample.py --jsonl`` reads::

    python scripts/plan.py --captions prompts.txt --output layouts.jsonl

Planners (``--planner``): ``rule`` (offline, templated prompts), ``openai`` (any
OpenAI-compatible chat endpoint: ``--api_base`` / ``$GOAL_PLANNER_API_BASE``, ``--model`` /
``$GOAL_PLANNER_MODEL``, key in ``$GOAL_PLANNER_API_KEY`` or ``$OPENAI_API_KEY``), ``local``
(a transformers causal LM folder: ``--lm`` / ``$GOAL_PLANNER_LM``) and ``auto`` (default: the
configured LLM, else ``rule``). LLM planners take in-context examples from ``--examples`` (a
layout JSONL, a dataset annotations JSONL or an NSR-1K json), ``--k`` per prompt.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from goal_jax import layout as layout_lib  # noqa: E402
from goal_jax import planner as planner_lib  # noqa: E402


def add_planner_flags(p: argparse.ArgumentParser) -> None:
    """The planner flags (shared with scripts/evaluate.py)."""
    g = p.add_argument_group("planner")
    g.add_argument("--planner", choices=planner_lib.PLANNERS, default="auto",
                   help="auto: the configured LLM, else the rule planner")
    g.add_argument("--api_base", default=None, help="OpenAI-compatible API base URL")
    g.add_argument("--model", default=None, help="chat model name (openai planner)")
    g.add_argument("--api_key_env", default=None,
                   help="name of the environment variable holding the API key")
    g.add_argument("--lm", default=None, help="transformers causal LM folder (local planner)")
    g.add_argument("--examples", default=None, help="in-context layout set")
    g.add_argument("--k", type=int, default=8, help="in-context examples per prompt")
    g.add_argument("--canvas", type=int, default=64, help="px canvas the LLM plans on")
    g.add_argument("--attempts", type=int, default=3, help="tries per caption")


def make_planner(args) -> planner_lib.Planner:
    api_key = None
    if args.api_key_env:
        if args.api_key_env not in os.environ:
            raise planner_lib.PlannerError(f"--api_key_env: ${args.api_key_env} is not set")
        api_key = os.environ[args.api_key_env]
    return planner_lib.make_planner(
        args.planner, api_base=args.api_base, model=args.model, api_key=api_key,
        lm_folder=args.lm, examples=args.examples, k=args.k, canvas=args.canvas,
        attempts=args.attempts)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--caption", help="one caption")
    src.add_argument("--captions", help="text file, one caption per line")
    p.add_argument("--output", default=None, help="JSONL output (default: stdout)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed written into each item (line N gets seed + N - 1)")
    add_planner_flags(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.caption is not None:
        captions = [(1, args.caption)]
    else:
        if not os.path.isfile(args.captions):
            print(f"error: --captions: no such file: {args.captions}", file=sys.stderr)
            return 2
        with open(args.captions, encoding="utf-8") as f:
            captions = [(n, line.strip()) for n, line in enumerate(f, start=1) if line.strip()]
    try:
        planner = make_planner(args)
        lines = []
        for n, caption in captions:
            layout = planner.plan(caption)
            seed = None if args.seed is None else args.seed + n - 1
            item_id = None if args.caption is not None else f"line{n:05d}"
            lines.append(json.dumps(layout_lib.LayoutItem(caption, layout, seed,
                                                          item_id).to_dict()))
    except planner_lib.PlannerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = "\n".join(lines) + "\n"
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"planned {len(lines)} caption(s) with the {planner.name} planner -> "
              f"{args.output}")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
