"""T2I-CompBench: prompt files -> planned layouts -> images in the folder their scorers read.

T2I-CompBench's prompt files (``examples/dataset/color_val.txt``, ``shape_val.txt``,
``texture_val.txt``, ``spatial_val.txt``, ``non_spatial_val.txt``, ``complex_val.txt``...) hold
one prompt per line (a tab and anything after it is ignored, as their ``inference_eval.py``
does; blank lines are skipped). :func:`run` writes, into ``out_dir``:

* ``samples/{prompt}_{index:06d}.png`` -- ``n_images`` images per prompt, ``index`` counting
  up over the whole run (prompt-major), exactly their ``inference_eval.py`` naming. Their
  scorers take the prompt from the file name (``name.split("_")[0]``; UniDet's loader sorts
  on ``name.split("_")[1]``), so a prompt containing ``_`` or ``/`` is rejected (naming the
  line).
* ``annotation_clip/vqa_result.json`` -- CLIPScore (cosine of CLIP image and prompt
  embeddings; their metric for the non-spatial category), computed natively with the Flax
  CLIP when a scorer is given, in their json layout ``[{"question_id": index, "answer":
  cosine}]``.
* ``layouts.jsonl`` -- per prompt: the planned layout and its image names.
* ``SCORING.md`` -- the commands that run T2I-CompBench's own scorer for the file's category
  on ``out_dir`` unchanged (:data:`SCORERS`), and where each writes its per-image scores
  (:data:`RESULT_FILES`): BLIP-VQA for color / shape / texture, UniDet
  ``2D_spatial_eval.py`` / ``3D_spatial_eval.py`` / ``numeracy_eval.py`` for spatial /
  3d_spatial / numeracy, CLIPScore for non_spatial, and for complex the 3-in-1 average of
  BLIP-VQA, UniDet 2D (``--complex=True``) and CLIPScore (``--complex=True``).

3-in-1 (``3_in_1_eval/3_in_1.py``) assumes exactly 10 images per prompt, prompt-major, for
every line of T2I-CompBench's ``complex_val.txt``: a complex prompt file run with another
``n_images`` or a ``limit`` is refused up front (:func:`preflight`) unless
``complex_partial`` (then SCORING.md leaves 3-in-1 out). :func:`collect_scores` reads the
scorers' outputs back (mean of ``answer``), :func:`scores_markdown` tabulates them next to
the GOAL paper's Table 1 (:data:`PAPER`).

Use one ``out_dir`` per prompt file: their scorers read every image in ``samples/``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Sequence

import numpy as np


from goal_jax import distributed
from goal_jax import layout as layout_lib
from goal_jax.evaluation import generate as generate_lib
from goal_jax.evaluation import metrics
from goal_jax.planner import PlannerError

CATEGORIES = ("color", "shape", "texture", "spatial", "non_spatial", "complex", "3d_spatial",
              "numeracy")
SCORER = {
    "color": "BLIP-VQA", "shape": "BLIP-VQA", "texture": "BLIP-VQA", "spatial": "UniDet",
    "3d_spatial": "UniDet (3D_spatial_eval.py)", "numeracy": "UniDet (numeracy_eval.py)",
    "non_spatial": "CLIPScore", "complex": "3-in-1",
}
# Per category: the scorer commands, run from a T2I-CompBench checkout ("{d}": out_dir + "/").
_BLIP = "cd BLIPvqa_eval && python BLIP_vqa.py --out_dir={d} && cd .."
_UNIDET_2D = "cd UniDet_eval && python 2D_spatial_eval.py --outpath={d} && cd .."
_CLIP = "python CLIPScore_eval/CLIP_similarity.py --outpath={d}"
SCORERS = {
    "color": (_BLIP,), "shape": (_BLIP,), "texture": (_BLIP,),
    "spatial": (_UNIDET_2D,),
    "3d_spatial": ("cd UniDet_eval && python 3D_spatial_eval.py --outpath={d} && cd ..",),
    "numeracy": ("cd UniDet_eval && python numeracy_eval.py --outpath={d} && cd ..",),
    "non_spatial": (_CLIP,),
    "complex": (_BLIP, _UNIDET_2D.replace("--outpath={d}", "--outpath={d} --complex=True"),
                _CLIP + " --complex=True",
                "cd 3_in_1_eval && python 3_in_1.py --outpath={d} && cd .."),
}
# Per category: the scorer's per-image scores ([{"question_id", "answer"}]) under out_dir.
RESULT_FILES = {
    "color": "annotation_blip/vqa_result.json", "shape": "annotation_blip/vqa_result.json",
    "texture": "annotation_blip/vqa_result.json",
    "spatial": "labels/annotation_obj_detection_2d/vqa_result.json",
    "3d_spatial": "labels/annotation_obj_detection_3d/vqa_result.json",
    "numeracy": "annotation_num/vqa_result.json",
    "non_spatial": "annotation_clip/vqa_result.json",
    "complex": "annotation_3_in_1/vqa_result.json",
}
# The GOAL paper's Table 1 (T2I-CompBench, x100): (GLIGEN, GOAL); other categories not given.
PAPER = {"color": (34.41, 53.55), "shape": (38.61, 51.19), "texture": (46.34, 58.37),
         "spatial": (35.42, 37.28)}
THREE_IN_ONE_IMAGES = 10  # 3_in_1.py's fixed images per prompt
MAX_NAME_BYTES = 240  # file-name limit 255 minus "_000000.png" and a margin


class CompBenchError(ValueError):
    """A T2I-CompBench run that their scorers could not score as asked (the message says
    what to change)."""


class PromptFileError(CompBenchError):
    """A prompt file line that their scorers could not read back from a file name."""


def category_of(path: str) -> str | None:
    """``color_val.txt`` -> ``"color"``; ``non_spatial_val.txt`` -> ``"non_spatial"``; None
    when the name matches no category."""
    stem = os.path.splitext(os.path.basename(path))[0]
    stem = re.sub(r"_(val|train|test)(_seen|_unseen)?$", "", stem)
    return stem if stem in CATEGORIES else None


def read_prompts(path: str) -> list[str]:
    """One prompt per line (text before the first tab, stripped; blank lines skipped).

    Raises:
      PromptFileError: naming ``path`` and the line of a prompt with ``_`` or ``/`` or too
        long for a file name.
    """
    if not os.path.isfile(path):
        raise PromptFileError(f"prompt file not found: {path}")
    prompts = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f.read().splitlines(), start=1):
            prompt = line.split("\t")[0].strip()
            if not prompt:
                continue
            for bad in ("_", "/", "\x00"):
                if bad in prompt:
                    raise PromptFileError(
                        f"{path} line {n}: prompt {prompt!r} contains {bad!r}; T2I-CompBench's "
                        "scorers read the prompt back from '<prompt>_<index>.png'")
            if len(prompt.encode("utf-8")) > MAX_NAME_BYTES:
                raise PromptFileError(f"{path} line {n}: prompt is longer than "
                                      f"{MAX_NAME_BYTES} bytes (too long for a file name)")
            prompts.append(prompt)
    if not prompts:
        raise PromptFileError(f"{path}: no prompts")
    return prompts


def sample_name(prompt: str, index: int) -> str:
    """Their image file name: ``{prompt}_{index:06d}.png``."""
    return f"{prompt}_{index:06d}.png"


def scoring_commands(out_dir: str, category: str | None, three_in_one: bool = True) -> str:
    """Markdown with the commands that score ``out_dir`` with T2I-CompBench's own scorer(s)
    for ``category`` (every category's when unknown) and where the scores are written."""
    d = os.path.abspath(out_dir).rstrip("/") + "/"
    cats = [category] if category in SCORERS else list(CATEGORIES)
    lines = [
        "# Scoring these samples with T2I-CompBench",
        "",
        f"Category: {category or 'unknown'} (official metric: "
        f"{SCORER.get(category or '', 'see below')}). Run from a T2I-CompBench checkout, in "
        "its environment (their scripts parse `--complex` with `type=bool`, so leave it out "
        "rather than passing False):",
    ]
    for cat in cats:
        cmds = list(SCORERS[cat])
        if cat == "complex" and not three_in_one:
            cmds = cmds[:-1]
        lines += ["", f"## {cat}", "", "```bash"] + [c.format(d=d) for c in cmds] + ["```", ""]
        if cat == "complex" and not three_in_one:
            lines.append("3-in-1 is left out: it needs exactly "
                         f"{THREE_IN_ONE_IMAGES} images per prompt for all of complex_val.txt.")
        else:
            lines.append(f"Scores: `{d}{RESULT_FILES[cat]}` (mean of `answer`; "
                         f"`scripts/evaluate.py compbench summarize {d}` tabulates it).")
            if cat == "complex":
                lines.append(f"3_in_1.py averages the three scorers' outputs in blocks of "
                             f"{THREE_IN_ONE_IMAGES} images per line of complex_val.txt, "
                             "complex_val_spatial.txt and complex_val_action.txt (read from "
                             "its `--data_path`, default `../examples/dataset`).")
        if cat == "non_spatial":
            lines.append("CLIPScore is also computed natively with `--clip`.")
    return "\n".join(lines) + "\n"


def preflight(prompt_file: str, n_images: int, limit: int | None = None,
              complex_partial: bool = False) -> list[str]:
    """Reads ``prompt_file`` and checks that its scorers can score the run; -> the prompts.

    Raises:
      PromptFileError: a prompt that cannot be a file name (:func:`read_prompts`).
      CompBenchError: a complex prompt file with ``n_images`` != 10 or a ``limit`` below its
        size (3-in-1 scores blocks of exactly 10 images per line of complex_val.txt), unless
        ``complex_partial``.
    """
    if n_images < 1:
        raise CompBenchError(f"n_images must be >= 1, got {n_images}")
    prompts = read_prompts(prompt_file)
    if category_of(prompt_file) == "complex" and not complex_partial:
        if n_images != THREE_IN_ONE_IMAGES:
            raise CompBenchError(
                f"{prompt_file}: T2I-CompBench's 3-in-1 scorer reads exactly "
                f"{THREE_IN_ONE_IMAGES} images per complex prompt, got n_images={n_images}; "
                f"use --n_images {THREE_IN_ONE_IMAGES} (or --complex_partial to generate "
                "anyway without 3-in-1)")
        if limit is not None and limit < len(prompts):
            raise CompBenchError(
                f"{prompt_file}: T2I-CompBench's 3-in-1 scorer scores every line of "
                f"complex_val.txt ({len(prompts)} prompts here), got limit={limit}; drop "
                "--limit (or --complex_partial to generate anyway without 3-in-1)")
    return prompts[:limit] if limit is not None else prompts


def _stray_files(samples: str, expected: set[str]) -> list[str]:
    """Files in ``samples`` of no request of this run; interrupted writes (``.tmp-*``, see
    ``generate.render``) are removed first."""
    if distributed.is_primary():
        generate_lib.remove_partial_writes([samples])
    return sorted(n for n in set(os.listdir(samples)) - expected
                  if not n.startswith(generate_lib.TMP_PREFIX))


def run(prompt_file: str, out_dir: str, planner, generator=None, n_images: int = 10,
        seed: int = 42, clip_scorer: metrics.ClipScorer | None = None,
        limit: int | None = None, overwrite: bool = False, complex_partial: bool = False
        ) -> dict[str, Any]:
    """Plans, generates and (optionally) CLIP-scores one prompt file.

    Args:
      prompt_file: a T2I-CompBench prompt file.
      out_dir: their ``--out_dir`` / ``--outpath`` (``samples/`` is created in it).
      planner: ``.plan(caption) -> Layout``; a prompt the planner fails on is generated with
        an empty layout and counted.
      generator: the generator hook (None: plan only).
      n_images: images per prompt (their default 10); image n of a prompt uses seed
        ``seed + n`` (their ``inference_eval.py`` seeds 42, 43, ...).
      clip_scorer: writes ``annotation_clip/vqa_result.json``.
      limit: use the first ``limit`` prompts.
      complex_partial: allow a complex file with n_images != 10 or a limit (:func:`preflight`).

    Raises:
      CompBenchError: from :func:`preflight`, or ``out_dir/samples`` holds files of another
        run.

    Returns:
      ``{"category", "prompts", "images", "planner_failures", "clip"?}``.
    """
    prompts = preflight(prompt_file, n_images, limit, complex_partial)
    category = category_of(prompt_file)
    os.makedirs(os.path.join(out_dir, "samples"), exist_ok=True)
    expected = {sample_name(p, k * n_images + n) for k, p in enumerate(prompts)
                for n in range(n_images)}
    stray = _stray_files(os.path.join(out_dir, "samples"), expected)
    if stray:
        raise CompBenchError(
            f"{out_dir}/samples holds {len(stray)} file(s) of another run (e.g. {stray[0]!r}: "
            "a run with another prompt file, --limit or --n_images); their scorers read the "
            "whole folder: use a new --output_dir, or delete that samples/ folder")
    layouts, failures, rows = [], 0, []
    for prompt in prompts:
        try:
            layouts.append(planner.plan(prompt))
            error = None
        except PlannerError as e:
            layouts.append(layout_lib.Layout())
            failures += 1
            error = str(e)
        rows.append({"prompt": prompt, **layouts[-1].to_dict(), "images": []})
        if error:
            rows[-1]["planner_error"] = error
    requests = []
    for k, (prompt, layout) in enumerate(zip(prompts, layouts)):
        for n in range(n_images):
            index = k * n_images + n
            name = sample_name(prompt, index)
            rows[k]["images"].append(name)
            requests.append(generate_lib.Request(prompt, layout, seed + n,
                                                 os.path.join(out_dir, "samples", name)))
    out: dict[str, Any] = {"category": category, "prompt_file": os.path.abspath(prompt_file),
                           "prompts": len(prompts), "n_images": n_images,
                           "planner": getattr(planner, "name", None),
                           "planner_failures": failures}
    if distributed.is_primary():  # several processes: process 0 writes the files
        with open(os.path.join(out_dir, "layouts.jsonl"), "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        with open(os.path.join(out_dir, "SCORING.md"), "w", encoding="utf-8") as f:
            f.write(scoring_commands(out_dir, category, not complex_partial or (
                n_images == THREE_IN_ONE_IMAGES and limit is None)))
    if generator is None:
        return out
    generated = generate_lib.render(requests, generator, overwrite)
    out.update(images=len(requests), generated=generated)
    if clip_scorer is not None:  # scripts/evaluate.py: on process 0 only
        clip = []
        for start, images in generate_lib.load_images([r.path for r in requests]):
            chunk = requests[start:start + len(images)]
            clip += [float(c) for c in clip_scorer.score(images, [r.caption for r in chunk])]
        os.makedirs(os.path.join(out_dir, "annotation_clip"), exist_ok=True)
        with open(os.path.join(out_dir, "annotation_clip", "vqa_result.json"), "w",
                  encoding="utf-8") as f:
            json.dump([{"question_id": i, "answer": c} for i, c in enumerate(clip)], f)
        out["clip"] = dataclasses.asdict(metrics.Summary.of(clip))
    return out


# ----------------------------------------------------------------------------------------------
# Reading the scorers' outputs back.
# ----------------------------------------------------------------------------------------------


def _run_dirs(dirs: Sequence[str]) -> list[str]:
    out = []
    for d in dirs:
        if not os.path.isdir(d):
            raise CompBenchError(f"not a folder: {d}")
        if os.path.isdir(os.path.join(d, "samples")):
            out.append(d)
            continue
        subs = sorted(os.path.join(d, x) for x in os.listdir(d)
                      if os.path.isdir(os.path.join(d, x, "samples")))
        if not subs:
            raise CompBenchError(f"{d} holds no samples/ folder nor run folders with one")
        out += subs
    return out


def read_scores(path: str) -> list[float]:
    """A scorer's ``vqa_result.json`` (``[{"question_id", "answer"}]``, answers numbers or
    numeric strings) -> the answers."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise CompBenchError(f"{path}: malformed JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, list):
        raise CompBenchError(f"{path}: expected a list of {{question_id, answer}}")
    out = []
    for k, row in enumerate(data):
        try:
            out.append(float(row["answer"]))
        except (TypeError, KeyError, ValueError):
            raise CompBenchError(f"{path} entry {k}: no numeric 'answer': {row!r}") from None
    return out


def collect_scores(dirs: Sequence[str]) -> list[dict[str, Any]]:
    """Run folders (or folders of them) -> one row per run: ``{"run", "category",
    "scorer", "file", "score"`` (mean x100, None when not scored yet), ``"n"`` (images
    scored), ``"samples"`` (images in samples/), ``"paper_gligen", "paper_goal"}``."""
    rows = []
    for d in _run_dirs(dirs):
        name = os.path.basename(os.path.normpath(d))
        category = category_of(name + ".txt")
        samples = sum(1 for x in os.listdir(os.path.join(d, "samples"))
                      if x.endswith(".png"))
        row: dict[str, Any] = {"run": name, "category": category,
                               "scorer": SCORER.get(category or "", None), "samples": samples,
                               "score": None, "n": 0, "file": None}
        if category is not None:
            path = os.path.join(d, RESULT_FILES[category])
            row["file"] = path
            if os.path.isfile(path):
                scores = read_scores(path)
                row["n"] = len(scores)
                row["score"] = 100 * float(np.mean(scores)) if scores else None
        row["paper_gligen"], row["paper_goal"] = PAPER.get(category or "", (None, None))
        rows.append(row)
    return rows


def scores_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The table of :func:`collect_scores` rows."""
    def f(v):
        return "-" if v is None else f"{v:.2f}"

    out = ["# T2I-CompBench scores", "",
           "Scores x100: the mean of the official scorer's per-image `answer`. Paper columns: "
           "the GOAL paper's Table 1 (GLIGEN and GOAL; it reports color, shape, texture and "
           "spatial only).", "",
           "| run | category | scorer | score | n scored | images | GLIGEN (paper) | "
           "GOAL (paper) |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        score = f(r["score"]) if r["file"] is None or r["n"] else "not scored yet"
        out.append(f"| {r['run']} | {r['category'] or 'unknown'} | {r['scorer'] or '-'} | "
                   f"{score} | {r['n']} | {r['samples']} | {f(r['paper_gligen'])} | "
                   f"{f(r['paper_goal'])} |")
    unscored = [r for r in rows if r["file"] is not None and not r["n"]]
    if unscored:
        out += ["", "Not scored yet (no scorer output): run the commands in each run's "
                "SCORING.md: " + ", ".join(f"`{r['file']}`" for r in unscored)]
    return "\n".join(out) + "\n"
