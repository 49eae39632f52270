"""The Colab notebooks (notebooks/*.ipynb) execute end to end in demo mode.

CI runs them as a user would, with nbclient on an ipykernel of this interpreter (the venv),
from the repository root, with ``GOAL_NOTEBOOK_DEMO=1``: the shipped shapes world
(assets/shapes_world: a trained 64x64 GLIGEN pipeline and its CLIP), the shapes dataset, no
download. ``train_goal.ipynb`` fine-tunes the world (configs/goal.py's ``world`` preset) first;
``sample.ipynb`` then samples held-out world layouts from the diffusers folder it exported, and
the test checks the files both wrote: metrics, checkpoint, the export against the world's
pipeline and the checkpoint, and the images.

The kernels see 2 simulated CPU devices (batches are sharded over them, as over TPU cores)
and a cheap XLA CPU optimisation level (compilation dominates the run time; the programs
are tiny). Both notebooks share a JAX compilation cache: the sampling program compiled by the
first is a cache hit in the second.
"""

import ast
import json
import math
import os
import re
import sys

import numpy as np
import pytest

import nbformat
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD = os.path.join(REPO, "assets", "shapes_world")
NOTEBOOKS = ("sample.ipynb", "train_goal.ipynb")
KERNEL = "goal-jax-test"
KERNEL_ENV = {
    "GOAL_NOTEBOOK_DEMO": "1",
    "XLA_FLAGS": ("--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0 "
                  "--xla_llvm_disable_expensive_passes=true"),
    "JAX_PLATFORMS": "cpu",
    "TF_CPP_MIN_LOG_LEVEL": "2",
    "HF_HUB_OFFLINE": "1",  # demo mode must not download anything
}


def read(name):
    return nbformat.read(os.path.join(REPO, "notebooks", name), as_version=4)


def parameters_index(nb) -> int:
    return next(i for i, c in enumerate(nb.cells)
                if "parameters" in c.metadata.get("tags", []))


def run_notebook(name, tmp_path, **params):
    """Executes notebooks/<name> with ``params`` injected after its parameters cell (as
    papermill does); returns the executed notebook. Fails with the cell's traceback."""
    nb = read(name)
    source = "\n".join(f"{k} = {v!r}" for k, v in params.items())
    cell = nbformat.v4.new_code_cell(source)
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(parameters_index(nb) + 1, cell)

    kernels = tmp_path / "kernels"
    (kernels / KERNEL).mkdir(parents=True, exist_ok=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "goal_jax (test venv)", "language": "python"}
    (kernels / KERNEL / "kernel.json").write_text(json.dumps(spec))
    km = KernelManager(kernel_name=KERNEL,
                       kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)]))
    client = NotebookClient(nb, km=km, timeout=300, resources={"metadata": {"path": REPO}},
                            shutdown_kernel="immediate")
    env = dict(os.environ, **KERNEL_ENV, IPYTHONDIR=str(tmp_path / "ipython"))
    try:
        client.execute(env=env)
    except CellExecutionError as e:
        pytest.fail(f"{name} failed in demo mode:\n{e}")
    finally:
        nbformat.write(nb, str(tmp_path / f"executed_{name}"))
    return nb


def outputs_text(nb) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.get("outputs", []) if o.output_type == "stream")


def flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = np.asarray(v)
    return out


# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_structure(name, monkeypatch):
    """Colab instructions without a placeholder URL, a first code cell tagged "parameters"
    whose DEMO follows GOAL_NOTEBOOK_DEMO, no stored outputs, valid code."""
    nb = read(name)
    nbformat.validate(nb)
    assert "**Running it on Colab.**" in nb.cells[0].source
    text = json.dumps(nb)
    assert "<org>" not in text and "colab.research.google.com/github" not in text
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert parameters_index(nb) == nb.cells.index(code[0])
    for value, expected in (("1", True), ("0", False)):
        namespace = {}
        monkeypatch.setenv("GOAL_NOTEBOOK_DEMO", value)
        exec(code[0].source, namespace)  # plain assignments only: no side effects
        assert namespace["DEMO"] is expected
        assert namespace["REPO_URL"] == ""
        assert namespace["PIPELINE"] == "masterful/gligen-1-4-generation-text-box"
        assert namespace["CLIP"] == "openai/clip-vit-large-patch14"
    for c in code:
        assert c.outputs == [] and c.execution_count is None
        ast.parse(c.source)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_install_cell(name, tmp_path, monkeypatch):
    """The install cell runs nothing inside a checkout or in demo mode, refuses demo mode
    outside a checkout, and clones + pip-installs REPO_URL on a fresh runtime."""
    import subprocess

    (install,) = [c.source for c in read(name).cells
                  if c.cell_type == "code" and '"pip", "install"' in c.source]
    calls = []

    def fake_run(cmd, check):
        calls.append(list(cmd))
        if cmd[:2] == ("git", "clone"):
            os.makedirs(cmd[-1])

    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.setattr(sys, "path", list(sys.path))
    url = "https://git.example/goal_jax.git"

    def run(cwd, demo, repo_url=url):
        monkeypatch.chdir(cwd)
        namespace = {"os": os, "DEMO": demo, "REPO_URL": repo_url}
        exec(install, namespace)
        return namespace

    for demo in (True, False):  # from the repository root and from notebooks/
        for cwd in (REPO, os.path.join(REPO, "notebooks")):
            assert run(cwd, demo)["REPO_DIR"] == REPO and calls == []
            assert os.getcwd() == REPO
    with pytest.raises(RuntimeError, match="demo mode runs inside a goal_jax checkout"):
        run(tmp_path, True)
    assert calls == []
    with pytest.raises(RuntimeError, match="set REPO_URL to a git URL of goal_jax, or upload "
                                           "the repository folder as .*goal_jax"):
        run(tmp_path, False, repo_url="")
    assert calls == []
    namespace = run(tmp_path, False)
    target = str(tmp_path / "goal_jax")
    assert namespace["REPO_DIR"] == target and os.getcwd() == target
    assert calls[:2] == [["git", "clone", "--depth", "1", url, target],
                         [sys.executable, "-m", "pip", "install", "-q", "-e", target]]
    assert calls[2:] == ([[sys.executable, "-m", "pip", "install", "-q", "-U", "jax[tpu]"]]
                         if namespace["ON_TPU"] else [])


def test_train_then_sample_notebooks_demo(tmp_path, monkeypatch):
    """train_goal.ipynb fine-tunes the shipped world 4 steps, exports and samples before/after;
    sample.ipynb samples held-out world layouts from the export for three β and scores the
    regions with the world's CLIP."""
    from goal_jax import checkpoints, train, weights

    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "jupyter_runtime"))  # connection files
    cache = str(tmp_path / "jax_cache")
    train_dir = tmp_path / "train"
    nb = run_notebook("train_goal.ipynb", tmp_path, WORKDIR=str(train_dir),
                      COMPILATION_CACHE=cache)
    text = outputs_text(nb)
    assert "Finished 4 steps" in text and "finished at step 4; checkpoint step 4" in text

    # metrics.jsonl: one line per step (LOG_EVERY = 1), every loss term finite
    rows = [json.loads(line) for line in (train_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        for key in ("total", "ldm", "dsa", "maa", "dsa_local", "dsa_global", "maa_in",
                    "maa_out"):
            assert math.isfinite(r[key]), (r["step"], key, r[key])
        assert r["total"] == pytest.approx(r["ldm"] + 0.1 * r["dsa"] + 0.1 * r["maa"],
                                           rel=1e-5)  # world preset: alpha = beta = 0.1

    # the export: trained tensors equal the checkpoint's, all others the base model's
    manager = checkpoints.CheckpointManager(str(train_dir / "checkpoints"), async_save=False)
    try:
        assert manager.latest_step() == 4
        trained = flat(manager.restore_arrays(4)["params"])
    finally:
        manager.close()
    export = train_dir / "export_step4"
    assert sorted(os.listdir(export)) == ["model_index.json", "scheduler", "text_encoder",
                                          "tokenizer", "unet", "vae"]
    assert not (train_dir / "demo_models").exists()  # the shipped world, no random models
    _, base = weights.load_unet(os.path.join(WORLD, "pipeline", "unet"))
    _, exported = weights.load_unet(str(export / "unet"))
    base, exported = flat(base), flat(exported)
    assert base.keys() == exported.keys()
    # the paper's trainable set (fusers, attn1, attn2), and nothing else
    assert set(trained) == {k for k in base
                            if any(re.search(p, k) for p in train.PAPER_TRAINABLE)}
    for k in base:
        if k in trained:
            np.testing.assert_array_equal(exported[k], trained[k], err_msg=k)
        else:
            np.testing.assert_array_equal(exported[k], base[k], err_msg=k)
    changed = [k for k in trained if not np.array_equal(trained[k], base[k])]
    assert len(changed) == len(trained)  # Adam moves every trainable tensor
    gates = [k for k in trained if k.endswith("alpha_attn")]
    assert gates and all(abs(float(trained[k])) > 0 for k in gates)  # the world is grounded

    ba = np.load(train_dir / "before_after.npz")
    assert ba["before"].shape == ba["after"].shape == (3, 64, 64, 3)
    assert ba["before"].dtype == np.uint8
    assert np.abs(ba["after"].astype(int) - ba["before"]).mean() > 1.0
    from PIL import Image

    assert Image.open(train_dir / "losses.png").size == (960, 260)
    assert Image.open(train_dir / "before_after.png").size == (3 * 256, 512)

    # sample.ipynb on the export
    sample_dir = tmp_path / "sample"
    nb = run_notebook("sample.ipynb", tmp_path, WORKDIR=str(sample_dir),
                      COMPILATION_CACHE=cache, PIPELINE=str(export))  # CLIP: the world's
    text = outputs_text(nb)
    assert "sampling mesh {'data': 2}" in text
    assert f"CLIP: {os.path.join(WORLD, 'clip')}" in text
    samples = np.load(sample_dir / "samples.npz")
    betas = ("0.0", "0.3", "1.0")
    assert sorted(samples.files) == sorted([f"beta_{b}" for b in betas]
                                           + [f"beta_{b}_float" for b in betas])
    for b in betas:
        images, floats = samples[f"beta_{b}"], samples[f"beta_{b}_float"]
        assert images.shape == floats.shape == (4, 64, 64, 3) and images.dtype == np.uint8
        assert np.isfinite(floats).all() and 0.0 <= floats.min() and floats.max() <= 1.0
        assert floats.std() > 0.05  # shapes on a background, not a flat or blank image
        np.testing.assert_array_equal(images, np.round(floats * 255).astype(np.uint8))
    # the world's gates are trained (its GLIGEN stage), so grounding for 0 / 1 / 4 of the 4
    # steps changes the images clearly (measured max |diff|: 0.86, 0.36, 0.86)
    float_diffs = {(a, b): float(np.abs(samples[f"beta_{a}_float"] - samples[f"beta_{b}_float"]
                                        ).max()) for a, b in (("1.0", "0.0"), ("1.0", "0.3"),
                                                              ("0.3", "0.0"))}
    assert all(d > 0.1 for d in float_diffs.values()), float_diffs
    scores = json.loads((sample_dir / "scores.json").read_text())
    assert sorted(scores) == ["0.0", "0.3", "1.0"]
    for s in scores.values():
        assert s["boxes"] == 8  # 4 held-out two-object layouts of the world
        assert -1.0 <= s["region"] <= 1.0 and -1.0 <= s["global"] <= 1.0
    assert Image.open(sample_dir / "beta_grid.png").size == (3 * 256, 20 + 4 * 256)
