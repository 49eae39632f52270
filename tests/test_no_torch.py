"""goal_jax imports and runs without torch or diffusers (they are test-only dependencies)."""

import os
import subprocess
import sys

SCRIPT = r"""
import sys

# A None entry makes `import torch` raise ImportError and importlib.util.find_spec("torch")
# return None, which is how transformers and goal_jax see a machine without torch.
for name in ("torch", "diffusers", "torchvision"):
    sys.modules[name] = None

import numpy as np
from goal_jax import demo_models, layout, objectives, sampling, schedule, train, weights  # noqa

folder = sys.argv[1]
paths = demo_models.write_demo_models(folder, resolution=32)
pipe = weights.load_pipeline(paths.pipeline)
clip, clip_params = weights.load_clip(paths.clip)
sampler = sampling.GLIGENPipeline(pipe)
out = sampler.sample(["a red circle"], [layout.Layout(("a red circle",), ((0.1, 0.1, 0.6, 0.7),))],
                     [0], sampling.SampleOptions(num_steps=2, guidance_scale=2.0))
assert out.images.dtype == np.uint8 and out.images.shape == (1, 32, 32, 3), out.images.shape
assert sys.modules["torch"] is None and sys.modules["diffusers"] is None  # never imported
print("OK", out.images.shape, int(out.images.std() > 0))
"""


def test_package_runs_without_torch_and_diffusers(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "demo")],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "OK (1, 32, 32, 3) 1"
