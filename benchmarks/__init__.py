"""Benchmarks of goal_jax against the PyTorch reference (not tests: nothing asserts a time).

* ``python -m benchmarks.run --suite cpu --size tiny|small|all``: train step, sampling and U-Net
  forward, goal_jax vs PyTorch side by side, same weights and inputs, one subprocess per
  measurement (peak RSS); rewrites benchmarks/RESULTS.md.
* ``python -m benchmarks.memory``: memory and FLOPs of the paper's train step at the real size
  (SD-1.4 GLIGEN + VAE + text encoder, CLIP ViT-L/14, 512x512) from shapes only.
* ``bash benchmarks/gpu.sh``: the GPU (H100 / H200) script; ``benchmarks/gpu_bench.py``.
* ``benchmarks/models.py``: the sizes (tiny, small, sd14), random models and inputs.
"""
