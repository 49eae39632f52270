"""Several JAX processes on this machine running the real entry points (tests/multiprocess.py):
2 processes x 2 simulated CPU devices against 1 process x 4 devices, joined through
``--coordinator_address/--num_processes/--process_id`` with gloo collectives.

* 2 x 2 trains as 1 x 4: the same losses and parameters after 4 steps, for replicated and FSDP
  parameters; each process reads its own items, together every item of an epoch once, and the
  global batch of each step is the same item list;
* checkpoints move between process counts: 2 x 2's checkpoint resumes on 1 x 4 and the reverse,
  exactly (as the run that never stopped);
* kill -9 of one process: the other stops with an error within the heartbeat timeout, and the
  restart resumes from the last complete checkpoint; SIGTERM to one process: both save the same
  step and exit 0;
* sampling during training and scripts/sample.py / scripts/evaluate.py spread the layouts over
  the processes, each image made by one process.

The runs train the demo models with the LDM loss only (``demo,ldm_only``: the multi-process
logic is the same, the program compiles in half the time). Tolerance: the cross-process
all-reduce sums the gradients in another order than one process does; AdamW turns that into
parameter differences proportional to the learning rate, so these runs use 1e-4 (measured max
|diff| of the train state after 4 steps: 3.0e-8 replicated, 2.8e-7 FSDP; with all three losses
at the demo's 1e-3 it was 1.7e-6).

Time: about 21 min wall on a 2-core machine shared with other jobs (load ~10), 7 min of CPU;
every job compiles with XLA's backend optimisation off and a shared persistent compilation
cache (tests/multiprocess.py).
"""

import json
import os
import shutil
import signal
import sys
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import multiprocess as mp  # noqa: E402
from goal_jax import checkpoints  # noqa: E402
from test_train_program import tensorboard_images  # noqa: E402

ITEMS = 8  # shapes items: 2 global batches of 4 per epoch
STEPS = 4
TIMEOUT_S = 480  # one job, compile included, on a loaded 2-core machine
HEARTBEAT_S = 10
TOPOLOGIES = {"2x2": (2, 2), "1x4": (1, 4)}
PARAMS_TOL = 1e-6


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """The shapes dataset (built), the demo models and a compilation cache, made once."""
    from goal_jax import demo_models
    from goal_jax.data import goal2k, shapes

    root = tmp_path_factory.mktemp("multiprocess")
    shapes.write_shapes_dataset(str(root / "shapes"), ITEMS, 64, seed=0)
    goal2k.build_goal2k(str(root / "shapes"), str(root / "tfds"))
    demo_models.write_demo_models(str(root / "demo_models"), seed=0, resolution=64)
    return root


def train_args(shared, workdir, *, steps=STEPS, **overrides):
    config = {
        "train.steps": steps, "train.per_device_batch_size": 1,
        "train.optimizer.learning_rate": 1e-4,
        # AdamW divides by sqrt(v) + eps: with the default eps 1e-8 a parameter whose gradient
        # is ~1e-7 moves by ~lr whatever that gradient is, so the all-reduce's summation order
        # (2 x 2 vs 1 x 4: ~1e-9 apart) moved one FSDP kernel entry by 1.8e-6 (measured). With
        # eps 1e-3 the update is smooth in the gradient and both topologies must agree to 1e-6.
        "train.optimizer.eps": 1e-3,
        "data.source": shared / "shapes", "data.data_dir": shared / "tfds",
        "data.shapes_items": ITEMS, "checkpoint.every_steps": 2, "checkpoint.max_to_keep": 10,
        "log.every_steps": 1, "log.progress": False, "log.data_ids": True,
        "sample.every_steps": 0,
    }
    config.update(overrides)
    return (["--config=" + os.path.join(REPO, "configs", "goal.py") + ":demo,ldm_only",
             f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in config.items()])


def new_workdir(shared, path):
    shutil.copytree(shared / "demo_models", path / "demo_models")  # reused (same marker)
    return path


def train(shared, workdir, topology, **overrides):
    """Runs scripts/train.py on ``topology`` ("2x2" / "1x4") in ``workdir``; returns results."""
    processes, devices = TOPOLOGIES[topology]
    start = time.time()
    results = mp.run("train.py", train_args(shared, workdir, **overrides), processes=processes,
                     devices=devices, log_dir=workdir / f"logs_{topology}_{time.time():.0f}",
                     timeout_s=TIMEOUT_S, heartbeat_timeout_s=HEARTBEAT_S,
                     compilation_cache=shared / "jax_cache")
    print(f"train.py {topology} in {workdir.name}: {time.time() - start:.1f} s")
    return results


def metrics(workdir):
    with open(workdir / "metrics.jsonl") as f:
        return {row["step"]: row for row in map(json.loads, f)}


def data_ids(workdir, processes):
    """[{step: [item ids]}] of every process (log.data_ids)."""
    out = []
    for p in range(processes):
        with open(workdir / "data_ids" / f"process_{p}.jsonl") as f:
            rows = [json.loads(line) for line in f]
        assert all(r["process"] == p for r in rows)
        out.append({r["step"]: r["ids"] for r in rows})
    return out


def state_arrays(workdir, step):
    manager = checkpoints.CheckpointManager(str(workdir / "checkpoints"), async_save=False)
    try:
        return manager.restore_arrays(step)
    finally:
        manager.close()


def max_state_diff(a, b) -> float:
    """Max |a - b| over every array of two stored train states (same tree)."""
    import jax

    la, lb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    assert [p for p, _ in la] == [p for p, _ in lb]
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for (_, x), (_, y) in zip(la, lb) if np.size(x))


def assert_same_losses(a, b, steps):
    for step in steps:
        for key in ("total", "ldm", "dsa", "maa", "grad_norm"):
            assert a[step][key] == pytest.approx(b[step][key], rel=1e-5, abs=1e-7), (step, key)


@pytest.fixture(scope="module")
def straight(shared, tmp_path_factory):
    """{(params mode, topology): (workdir, results)} of 4-step runs, made on first use. The
    replicated 2 x 2 run samples the demo layouts at step 4 (2 DDIM steps)."""
    runs = {}

    def get(mode, topology):
        if (mode, topology) not in runs:
            workdir = new_workdir(shared, tmp_path_factory.mktemp(f"{mode}_{topology}"))
            overrides = ({"train.sharding.params": "fsdp", "train.sharding.fsdp": 2,
                          "train.sharding.fsdp_min_size": 1024} if mode == "fsdp" else {})
            if (mode, topology) == ("replicated", "2x2"):
                overrides.update({"sample.every_steps": STEPS, "sample.num_steps": 2})
            results = train(shared, workdir, topology, **overrides)
            runs[(mode, topology)] = (workdir, results)
        return runs[(mode, topology)]

    return get


@pytest.mark.parametrize("mode", ["replicated", "fsdp"])
def test_two_processes_train_as_one(straight, mode):
    """2 x 2 devices with replicated or FSDP parameters against 1 x 4 replicated (FSDP equals
    replicated on one process: tests/test_sharding.py)."""
    (two, results), (one, _) = straight(mode, "2x2"), straight("replicated", "1x4")
    assert all("Finished 4 steps" in r.stdout for r in results)
    assert_same_losses(metrics(two), metrics(one), range(1, STEPS + 1))
    for step in (2, 4):
        diff = max_state_diff(state_arrays(two, step), state_arrays(one, step))
        print(f"{mode}: step {step} max |params/opt state 2x2 - 1x4| = {diff:.3g}")
        assert diff <= PARAMS_TOL

    # Data: each process reads its own 2 items per step; per epoch (2 steps) the 4 halves are
    # the 8 items once; the global batch of a step is the same item list on 1 process.
    ids2, (ids1,) = data_ids(two, 2), data_ids(one, 1)
    every = [f"shapes-train-{i:06d}" for i in range(ITEMS)]
    for epoch_steps in ((1, 2), (3, 4)):
        read = [i for p in range(2) for s in epoch_steps for i in ids2[p][s]]
        assert sorted(read) == every
        for s in epoch_steps:
            assert len(ids2[0][s]) == len(ids2[1][s]) == 2
            assert not set(ids2[0][s]) & set(ids2[1][s])
            assert ids2[0][s] + ids2[1][s] == ids1[s]
    assert ids1[1] != ids1[3] or ids1[2] != ids1[4]  # a new order every epoch

    if mode == "replicated":  # the 3 layouts sampled at step 4: 0 and 2 on 0, 1 on 1 (their
        # images: test_sample_script_spreads_items_over_processes)
        assert "process 0: sampled layouts [0, 2] of 3" in results[0].stdout
        assert "process 1: sampled layouts [1] of 3" in results[1].stdout


@pytest.mark.parametrize("first,then", [("2x2", "1x4"), ("1x4", "2x2")])
def test_checkpoint_resumes_exactly_on_another_process_count(shared, straight, tmp_path,
                                                             first, then):
    source, _ = straight("replicated", first)
    reference, _ = straight("replicated", then)
    workdir = new_workdir(shared, tmp_path / "moved")
    shutil.copytree(source / "checkpoints", workdir / "checkpoints")
    shutil.rmtree(workdir / "checkpoints" / str(STEPS))  # keep step 2
    results = train(shared, workdir, then)
    assert all("checkpoints/2 (step 2)" in r.stdout for r in results)  # "Resumed from"
    assert sorted(metrics(workdir)) == [3, 4]
    assert_same_losses(metrics(workdir), metrics(reference), (3, 4))
    diff = max_state_diff(state_arrays(workdir, STEPS), state_arrays(reference, STEPS))
    print(f"{first} -> {then}: max |state - uninterrupted {then}| = {diff:.3g}")
    assert diff <= PARAMS_TOL
    processes = TOPOLOGIES[then][0]
    resumed = [i for ids in data_ids(workdir, processes) for s in (3, 4) for i in ids[s]]
    straight_ids = [i for ids in data_ids(reference, processes) for s in (3, 4) for i in ids[s]]
    assert resumed == straight_ids


def test_kill_9_then_restart_then_sigterm_to_one_process(shared, tmp_path):
    workdir = new_workdir(shared, tmp_path / "faults")
    args = train_args(shared, workdir, steps=60)

    # ---- kill -9 of process 1 after the checkpoint of step 2: process 0 stops with an error
    # within the heartbeat timeout (no hang).
    job = mp.Job("train.py", args, processes=2, devices=2, log_dir=workdir / "logs_kill",
                 heartbeat_timeout_s=HEARTBEAT_S, compilation_cache=shared / "jax_cache")
    job.wait_for_output(0, r"\] \[4\] ", TIMEOUT_S)  # step 4 logged: checkpoint 2 is done
    job.signal(1, signal.SIGKILL)
    killed = time.monotonic()
    results = job.wait(timeout_s=HEARTBEAT_S + 60, check=False)
    waited = time.monotonic() - killed
    report = [line for line in results[0].stderr.splitlines()
              if line.startswith("train.py: process 0 of 2: ")]
    print(f"kill -9 of process 1: process 0 exited {results[0].returncode} after {waited:.1f} s"
          f": {report}")
    assert results[1].returncode == -signal.SIGKILL
    assert results[0].returncode == 1 and waited <= HEARTBEAT_S + 60
    assert len(report) == 1  # one line naming the process and the error (a dead peer's)
    assert "start it again on every host; it resumes from the last complete checkpoint" in \
        results[0].stderr
    manager = checkpoints.CheckpointManager(str(workdir / "checkpoints"), async_save=False)
    complete = manager.latest_step()
    manager.close()
    assert complete is not None and complete >= 2 and complete % 2 == 0

    # ---- the restart resumes from the last complete checkpoint; SIGTERM to process 1 only:
    # both processes save the same step and exit 0.
    job = mp.Job("train.py", args, processes=2, devices=2, log_dir=workdir / "logs_restart",
                 heartbeat_timeout_s=HEARTBEAT_S, compilation_cache=shared / "jax_cache")
    for p in range(2):
        job.wait_for_output(p, rf"Resumed from .*checkpoints/{complete} \(step {complete}\)",
                            TIMEOUT_S)
    job.wait_for_output(0, rf"\] \[{complete + 2}\] ", TIMEOUT_S)
    job.signal(1, signal.SIGTERM)
    results = job.wait(timeout_s=120)
    stops = [int(r.stdout.split("Stopping at step ")[1].split()[0]) for r in results]
    print(f"SIGTERM to process 1 at step >= {complete + 2}: both stopped at {stops}")
    assert stops[0] == stops[1] and complete + 2 <= stops[0] < 60
    assert all("preemption sync point" in r.stdout for r in results)
    manager = checkpoints.CheckpointManager(str(workdir / "checkpoints"), async_save=False)
    try:
        assert manager.latest_step() == stops[0]
        assert manager.restore_metadata(stops[0])["reason"] == "preempted"
    finally:
        manager.close()


def test_sample_script_spreads_items_over_processes(shared, straight, tmp_path):
    """scripts/sample.py --jsonl on 2 processes: every item once, by process k % 2. The images
    equal those of one process, and those the 2-process training sampled at the same step with
    the same settings (the sample layouts split over the processes, gathered in order)."""
    workdir, _ = straight("replicated", "2x2")
    args = ["--pretrained", workdir / "demo_models" / "pipeline", "--checkpoint",
            workdir / "checkpoints", "--checkpoint_step", STEPS,
            "--jsonl", workdir / "sample_layouts.jsonl", "--steps", 2, "--cfg", 7.5,
            "--beta", 0.3, "--batch_size", 2, "--no_progress"]
    from PIL import Image

    start = time.time()
    mp.run("sample.py", args + ["--output_dir", tmp_path / "one", "--num_devices", 2],
           processes=1, devices=2, log_dir=tmp_path / "logs_one", timeout_s=TIMEOUT_S,
           compilation_cache=shared / "jax_cache")
    one = [np.asarray(Image.open(tmp_path / "one" / f"layout{k}.png")) for k in range(3)]
    print(f"sample.py 1 process: {time.time() - start:.1f} s")
    out = tmp_path / "samples"
    start = time.time()
    results = mp.run("sample.py", args + ["--output_dir", out], processes=2, devices=2,
                     log_dir=tmp_path / "logs", timeout_s=TIMEOUT_S,
                     heartbeat_timeout_s=HEARTBEAT_S, compilation_cache=shared / "jax_cache")
    print(f"sample.py 2 processes: {time.time() - start:.1f} s")
    assert "3 item(s) (process 0 of 2: 2 of them); skipping 0" in results[0].stdout
    assert "3 item(s) (process 1 of 2: 1 of them); skipping 0" in results[1].stdout
    names = sorted(n for n in os.listdir(out) if n.endswith(".json"))
    assert names == ["layout0.json", "layout1.json", "layout2.json"]
    trained = tensorboard_images(workdir)
    assert list(trained) == [STEPS] and trained[STEPS].shape == (3, 64, 64, 3)
    for k, name in enumerate(names):
        meta = json.loads((out / name).read_text())
        assert (meta["process_index"], meta["process_count"]) == (k % 2, 2)
        image = np.asarray(Image.open(out / meta["image"])).astype(int)
        assert image.std() > 0
        for reference in (one[k], trained[STEPS][k]):
            assert np.abs(image - reference.astype(int)).max() <= 1, name


def test_evaluate_script_spreads_images_over_processes(shared, tmp_path):
    """scripts/evaluate.py compbench on 2 processes: each makes half of the images (each once),
    process 0 CLIP-scores all of them and writes the results."""
    prompts = tmp_path / "spatial_val.txt"
    prompts.write_text("a red circle to the left of a blue square\n"
                       "a green triangle above a yellow star\n")
    out = tmp_path / "cb"
    models = shared / "demo_models"
    args = ["compbench", "--prompts", prompts, "--output_dir", out, "--pretrained",
            models / "pipeline", "--steps", 2, "--cfg", 7.5, "--n_images", 2, "--clip",
            models / "clip", "--clip_tokenizer", models / "pipeline" / "tokenizer"]
    start = time.time()
    results = mp.run("evaluate.py", args, processes=2, devices=2, log_dir=tmp_path / "logs",
                     timeout_s=TIMEOUT_S, heartbeat_timeout_s=HEARTBEAT_S,
                     compilation_cache=shared / "jax_cache")
    print(f"evaluate.py 2x2: {time.time() - start:.1f} s")
    for p in range(2):
        assert f"process {p} of 2: made 2 of 4 image(s)" in results[p].stdout
    assert "wrote" in results[0].stdout and "wrote" not in results[1].stdout
    samples = sorted(os.listdir(out / "spatial_val" / "samples"))
    assert len(samples) == 4 and all(n.endswith(".png") for n in samples)
    doc = json.loads((out / "results.json").read_text())
    res = doc["results"]["spatial_val"]
    assert (res["images"], res["generated"], res["clip"]["n"]) == (4, 4, 4)
