"""Evaluation: layout-planner metrics and image benchmarks (NSR-1K, T2I-CompBench).

* :mod:`metrics` -- counting / spatial scores of layouts and detections (LayoutGPT's
  definitions), CLIP image-text similarity with the Flax CLIP.
* :mod:`matching` -- which predicted boxes denote an object name: LayoutGPT's own rules (the
  default) and goal_jax's stricter ones.
* :mod:`detector` -- the detection hook (GroundingDINO through transformers, an open
  stand-in for the GLIP detector LayoutGPT used).
* :mod:`generate` -- the generator hook ``(caption, layout, seed) -> uint8 image`` and
  resumable image writing.
* :mod:`nsr` -- NSR-1K (LayoutGPT's counting and spatial prompts).
* :mod:`compbench` -- T2I-CompBench prompt files -> samples/ their scorers read.
* :mod:`report` -- results table (markdown + json) per run.
* :mod:`oracle` (+ :mod:`oracle_model`) -- the shapes-world oracle: presence, colour, shape,
  texture and IoU per box from pixels (no CLIP), category verdicts per image.
"""
