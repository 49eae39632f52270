"""The training program end to end on the demo preset (tiny models, CPU).

One train-step program is compiled for the whole file: every run uses the same config (demo
models, batch 1 on one device), and a JAX persistent compilation cache shared by the in-process
runs and the subprocess turns later compilations into cache hits.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from goal_jax import checkpoints, loop  # noqa: E402

LOSS_KEYS = ("ldm", "dsa_local", "dsa_global", "dsa", "maa_in", "maa_out", "maa", "total",
             "grad_norm", "lr")


def _goal_config():
    import importlib.util

    spec = importlib.util.spec_from_file_location("goal_config", os.path.join(REPO, "configs",
                                                                              "goal.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A compilation cache, the shapes dataset, its TFDS build and the demo models, made once."""
    root = tmp_path_factory.mktemp("train_program")
    from goal_jax import demo_models
    from goal_jax.data import shapes

    shapes.write_shapes_dataset(str(root / "shapes"), 8, 64, seed=0)
    demo_models.write_demo_models(str(root / "demo_models"), seed=0, resolution=64)
    return root


def make_config(shared, **overrides):
    config = _goal_config().get_config("demo")
    base = {
        "train.steps": 6, "train.per_device_batch_size": 1, "num_devices": 1,
        "data.source": str(shared / "shapes"), "data.data_dir": str(shared / "tfds"),
        "data.shapes_items": 8, "checkpoint.every_steps": 2, "checkpoint.max_to_keep": 3,
        "log.every_steps": 1, "log.progress": False,
        "compilation_cache": str(shared / "jax_cache"),
    }
    base.update(overrides)
    loop.apply_overrides(config, base)
    return config


def new_workdir(shared, tmp_path, name):
    workdir = tmp_path / name
    shutil.copytree(shared / "demo_models", workdir / "demo_models")  # reused (same marker)
    return str(workdir)


def stored_state(workdir, step):
    manager = checkpoints.CheckpointManager(os.path.join(workdir, "checkpoints"),
                                            async_save=False)
    try:
        return manager.restore_arrays(step), manager.restore_metadata(step), manager.all_steps()
    finally:
        manager.close()


def leaves(tree):
    import jax

    return jax.tree_util.tree_flatten_with_path(tree)[0]


def test_demo_trains_resumes_exactly_and_stops_on_nan(shared, tmp_path, monkeypatch):
    # ---- 6 steps straight: all three losses finite, checkpoints written.
    straight = new_workdir(shared, tmp_path, "straight")
    result = loop.train_and_evaluate(make_config(shared), straight)
    assert result.stopped == "finished" and result.step == 6
    assert sorted(result.history) == [1, 2, 3, 4, 5, 6]
    for step, metrics in result.history.items():
        for key in LOSS_KEYS:
            assert np.isfinite(metrics[key]), (step, key, metrics)
        assert metrics["dsa_local"] > 0 and metrics["dsa_global"] > 0
        assert metrics["maa_in"] > 0 and metrics["maa_out"] >= 0 and metrics["ldm"] > 0
        assert metrics["lr"] == pytest.approx(1e-3)
    tree, meta, steps = stored_state(straight, None)
    assert steps == [2, 4, 6]
    assert int(tree["step"]) == 6 and meta["reason"] == "final"
    assert meta["pipeline"].endswith(os.path.join("demo_models", "pipeline"))
    logged = metrics_jsonl(straight)
    # Checked together at the end: each step once in metrics.jsonl, each scalar once per log
    # step in TensorBoard (clu's ReportProgress writes no steps_per_sec of its own).
    once = {"metrics.jsonl": [row["step"] for row in logged],
            "steps_per_sec": tensorboard_tag_steps(straight, "steps_per_sec")}
    assert logged[5]["total"] == result.history[6]["total"]
    assert all(row["examples_per_sec"] > 0 for row in logged)

    # ---- 3 steps, then a fresh call with a fresh config: 3 more steps.
    resumed = new_workdir(shared, tmp_path, "resumed")
    first = loop.train_and_evaluate(
        make_config(shared, **{"sample.every_steps": 3, "sample.num_steps": 2}), resumed,
        stop_at_step=3)
    assert first.stopped == "stop_at_step" and first.checkpoint_step == 3
    images = tensorboard_images(resumed)  # the fixed layouts sampled at step 3
    assert list(images) == [3] and images[3].shape == (3, 64, 64, 3)
    assert images[3].std() > 0
    second = loop.train_and_evaluate(make_config(shared), resumed)
    assert sorted(second.history) == [4, 5, 6]
    for step in (4, 5, 6):
        for key in LOSS_KEYS:
            assert second.history[step][key] == pytest.approx(result.history[step][key],
                                                              rel=1e-6, abs=1e-7), (step, key)
    a, _, _ = stored_state(straight, 6)
    b, _, _ = stored_state(resumed, 6)
    la, lb = leaves(a), leaves(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    max_diff = max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
                   for (_, x), (_, y) in zip(la, lb) if np.size(x))
    print(f"exact resume: max abs diff over {len(la)} state arrays = {max_diff:.3g}")
    assert max_diff <= 1e-6
    data_a = stored_data(straight, 6)
    assert data_a == stored_data(resumed, 6)

    # ---- a non-finite loss at step 8 stops the run; the last good checkpoint (6) stays.
    from goal_jax.data import pipeline

    original = pipeline.TrainIterator.__next__
    calls = {"n": 0}

    def poisoned(self):
        batch = original(self)
        calls["n"] += 1
        if calls["n"] == 2:  # the batch of step 8 (the run resumes at step 7)
            batch = dict(batch, images=np.full_like(batch["images"], np.nan))
        return batch

    monkeypatch.setattr(pipeline.TrainIterator, "__next__", poisoned)
    with pytest.raises(loop.NonFiniteLossError, match=r"non-finite loss at step 8: .*the last "
                                                       r"good checkpoint is step 6"):
        loop.train_and_evaluate(make_config(shared, **{"train.steps": 10}), straight)
    _, meta, steps = stored_state(straight, None)
    assert steps == [2, 4, 6] and meta["step"] == 6

    # ---- the restart from checkpoint 6 with clean data trains on; step 7, logged by the
    # stopped run, is in metrics.jsonl once.
    monkeypatch.setattr(pipeline.TrainIterator, "__next__", original)
    after = loop.train_and_evaluate(make_config(shared, **{"train.steps": 10}), straight)
    assert sorted(after.history) == [7, 8, 9, 10]
    assert all(np.isfinite(m["total"]) for m in after.history.values())
    once["metrics.jsonl after the restart"] = [row["step"] for row in metrics_jsonl(straight)]
    assert once == {"metrics.jsonl": [1, 2, 3, 4, 5, 6], "steps_per_sec": [1, 2, 3, 4, 5, 6],
                    "metrics.jsonl after the restart": list(range(1, 11))}


def metrics_jsonl(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def tensorboard_images(workdir):
    """{step: uint8 [N, H, W, 3]} of the "samples" image summaries in the workdir's events."""
    import tensorflow as tf

    out = {}
    for name in os.listdir(workdir):
        if not name.startswith("events.out.tfevents"):
            continue
        for record in tf.data.TFRecordDataset(os.path.join(workdir, name)):
            event = tf.compat.v1.Event.FromString(record.numpy())
            for value in event.summary.value:
                if value.tag == "samples":
                    pngs = tf.make_ndarray(value.tensor)[2:]  # width, height, then images
                    out[event.step] = np.stack([tf.io.decode_png(p).numpy() for p in pngs])
    return out


def tensorboard_tag_steps(workdir, tag):
    """The steps of every scalar summary named ``tag`` in the workdir's events, in order."""
    import tensorflow as tf

    steps = []
    for name in sorted(os.listdir(workdir)):
        if name.startswith("events.out.tfevents"):
            for record in tf.data.TFRecordDataset(os.path.join(workdir, name)):
                event = tf.compat.v1.Event.FromString(record.numpy())
                steps += [event.step for v in event.summary.value if v.tag == tag]
    return steps


def stored_data(workdir, step):
    manager = checkpoints.CheckpointManager(os.path.join(workdir, "checkpoints"))
    try:
        return manager.restore_data_state(step)
    finally:
        manager.close()


def test_encoded_slots_and_tokens_checked_against_the_dataset(shared, tmp_path):
    """train.encoded_box_slots smaller than an item's box count, or train.encoded_phrase_tokens
    shorter than a phrase, stops before training, naming the items (the shapes items have 1-4
    boxes; their phrases need more than 2 tokens)."""
    workdir = new_workdir(shared, tmp_path, "slots")
    with pytest.raises(ValueError, match=r"config field train.encoded_box_slots=1 but \d+ "
                                         r"item\(s\) have a real box in slot >= 1: \S+ "
                                         r"\([2-4] boxes\)"):
        loop.train_and_evaluate(make_config(shared, **{"train.encoded_box_slots": 1}), workdir)
    with pytest.raises(ValueError, match=r"config field train.encoded_phrase_tokens=2 but \d+ "
                                         r"item\(s\) have a phrase whose EOS token is beyond "
                                         r"it: \S+ \(needs \d+\)"):
        loop.train_and_evaluate(make_config(shared, **{"train.encoded_phrase_tokens": 2}),
                                workdir)
    assert not os.path.exists(os.path.join(workdir, "checkpoints", "1"))


def test_sigterm_saves_current_step_and_exits_zero(shared, tmp_path):
    workdir = new_workdir(shared, tmp_path, "sigterm")
    args = [sys.executable, os.path.join(REPO, "scripts", "train.py"),
            "--config", os.path.join(REPO, "configs", "goal.py") + ":demo",
            "--workdir", workdir, "--config.train.steps=100000",
            "--config.train.per_device_batch_size=1", "--config.num_devices=1",
            f"--config.data.source={shared / 'shapes'}",
            f"--config.data.data_dir={shared / 'tfds'}", "--config.data.shapes_items=8",
            "--config.checkpoint.every_steps=1000", "--config.log.every_steps=1",
            f"--config.compilation_cache={shared / 'jax_cache'}"]
    # same XLA_FLAGS: compilation cache hits; TF warnings shown (the finalization check below)
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="0")
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            text=True)
    metrics = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 200
    try:
        while time.time() < deadline and proc.poll() is None:
            if os.path.isfile(metrics) and sum(1 for _ in open(metrics)) >= 2:
                break
            time.sleep(0.5)
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    assert "Error occurred when finalizing GeneratorDataset iterator" not in out
    import re

    match = re.search(r"Stopping at step (\d+) \(signal 15\): checkpoint saved", out)
    assert match, out[-3000:]
    stopped = int(match.group(1))
    tree, meta, steps = stored_state(workdir, None)
    assert steps == [stopped] and stopped >= 2
    assert int(tree["step"]) == stopped and meta["reason"] == "preempted"
    with open(metrics) as f:
        assert json.loads(f.readlines()[-1])["step"] == stopped
