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
* ``SCORING.md`` -- the commands that run their BLIP-VQA (color / shape / texture), UniDet
  (spatial), CLIPScore (non-spatial) and 3-in-1 (complex) scorers on ``out_dir`` unchanged:
  ``BLIPvqa_eval/BLIP_vqa.py --out_dir=<out_dir>/``, ``UniDet_eval/2D_spatial_eval.py
  --outpath=<out_dir>/`` (their script's default is ``../examples/``),
  ``CLIPScore_eval/CLIP_similarity.py --outpath=<out_dir>/``, ``3_in_1_eval/3_in_1.py
  --outpath=<out_dir>/``.

Use one ``out_dir`` per prompt file: their scorers read every image in ``samples/``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any


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
MAX_NAME_BYTES = 240  # file-name limit 255 minus "_000000.png" and a margin


class PromptFileError(ValueError):
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


def scoring_commands(out_dir: str, category: str | None) -> str:
    """Markdown with the commands that score ``out_dir`` with T2I-CompBench's own scorers."""
    d = os.path.abspath(out_dir).rstrip("/") + "/"
    lines = [
        "# Scoring these samples with T2I-CompBench",
        "",
        f"Category: {category or 'unknown'} (official metric: "
        f"{SCORER.get(category or '', 'see T2I-CompBench')}). Run from a T2I-CompBench "
        "checkout, in its environment:",
        "",
        "```bash",
        f"cd BLIPvqa_eval && python BLIP_vqa.py --out_dir={d} && cd ..          "
        "# color / shape / texture",
        f"cd UniDet_eval && python 2D_spatial_eval.py --outpath={d} && cd ..     # spatial",
        f"cd CLIPScore_eval && python CLIP_similarity.py --outpath={d} && cd ..  "
        "# non-spatial (also computed natively: annotation_clip/)",
        f"cd 3_in_1_eval && python 3_in_1.py --outpath={d} && cd ..             "
        "# complex (needs the three above)",
        "```",
        "",
        "Results: `annotation_blip/vqa_result.json` (BLIP-VQA), "
        "`labels/annotation_obj_detection_2d/vqa_result.json` (UniDet), "
        "`annotation_clip/vqa_result.json` (CLIPScore).",
    ]
    return "\n".join(lines) + "\n"


def run(prompt_file: str, out_dir: str, planner, generator=None, n_images: int = 10,
        seed: int = 42, clip_scorer: metrics.ClipScorer | None = None,
        limit: int | None = None, overwrite: bool = False) -> dict[str, Any]:
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

    Returns:
      ``{"category", "prompts", "images", "planner_failures", "clip"?}``.
    """
    if n_images < 1:
        raise ValueError(f"n_images must be >= 1, got {n_images}")
    prompts = read_prompts(prompt_file)
    if limit is not None:
        prompts = prompts[:limit]
    category = category_of(prompt_file)
    os.makedirs(os.path.join(out_dir, "samples"), exist_ok=True)
    expected = {sample_name(p, k * n_images + n) for k, p in enumerate(prompts)
                for n in range(n_images)}
    stray = sorted(set(os.listdir(os.path.join(out_dir, "samples"))) - expected)
    if stray:
        raise ValueError(f"{out_dir}/samples holds {len(stray)} file(s) of another run (e.g. "
                         f"{stray[0]!r}); their scorers read the whole folder: use a new "
                         "out_dir per prompt file")
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
    with open(os.path.join(out_dir, "layouts.jsonl"), "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    with open(os.path.join(out_dir, "SCORING.md"), "w", encoding="utf-8") as f:
        f.write(scoring_commands(out_dir, category))
    if generator is None:
        return out
    generated = generate_lib.render(requests, generator, overwrite)
    out.update(images=len(requests), generated=generated)
    if clip_scorer is not None:
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
