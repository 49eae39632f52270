"""The faults a hostile probe found in demo runs, each injected and checked to be caught.

1. a diverging step is never the last checkpoint (lr 1e30, then resume with a sane lr);
2. the dataset build is keyed by its source; a mistyped data.source is an error;
3. a failed checkpoint save stops training at once with one error, and never hangs;
4. scripts/sample.py and evaluate.py read the orbax pipeline folders convert.py writes;
5. damaged or non-finite checkpoints and non-finite images are refused; sampling reads the
   trained params only, never the optimizer state;
6. a JSONL with bad lines: tests/test_sample_script.py::
   test_bad_jsonl_lines_listed_and_good_lines_sampled;
7. one-line errors for bad sample.py arguments, long-text warnings, metrics.jsonl steps once
   after a restart, convert.py finds a moved workdir's pipeline (the bad-flag exit code:
   tests/test_configs.py; steps_per_sec once and no tf.data finalization error:
   tests/test_train_program.py).

Each test fails on the main of the time the probe was run (docs/probe.md lists the failure
lines): the observable fault is checked first, with built-in exception and warning types (the
classes this fix added, e.g. SourceChangedError, are subclasses of them and are checked after).
"""

import errno
import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from goal_jax import checkpoints, loop, sampling, train, weights
from goal_jax.data import goal2k, shapes
from test_sampling import STEPS, tiny_pipeline
from test_train_program import make_config, new_workdir, shared, stored_state  # noqa: F401


def sample_script_module():
    from test_sample_script import sample_script

    return sample_script


@pytest.fixture(scope="module")
def sample_main():
    return sample_script_module().main


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tokenizer_dir):
    return tiny_pipeline(tmp_path_factory, tokenizer_dir)[0]


def _sample_args(folder, out, *extra):
    return ["--pretrained", folder, "--output_dir", str(out), "--steps", str(STEPS),
            "--cfg", "7.5", "--beta", "0.3", "--batch_size", "2", "--num_devices", "2",
            "--no_progress", "--caption", "a red cat", "--layout",
            json.dumps({"phrases": ["a red cat"], "boxes": [[0.1, 0.1, 0.9, 0.9]]}), *extra]


def _train_state_checkpoint(folder, trainable, step=7):
    """A checkpoint as the training loop writes it: TrainState(params=trainable leaves)."""
    state = train.TrainState(step=jnp.int32(step), params=trainable,
                             opt_state=optax.adam(1e-3).init(trainable), rng=jax.random.key(1))
    manager = checkpoints.CheckpointManager(folder, async_save=False)
    manager.save(step, state, metadata={"pipeline": "/nowhere/pipeline"})
    manager.close()


# ---------------------------------------------------------------------------------- 1


def test_diverged_step_is_never_the_last_checkpoint(shared, tmp_path):  # noqa: F811
    """lr 1e30: step 1's update diverges (finite, huge weights, saved as checkpoint 1) and
    step 2's loss is the first non-finite one; checkpoint 1 is deleted, so resuming with a
    sane learning rate trains on instead of failing again."""
    workdir = new_workdir(shared, tmp_path, "diverge")
    every = {"checkpoint.every_steps": 1, "train.steps": 3}
    with pytest.raises(loop.NonFiniteLossError,
                       match=r"non-finite .*no good checkpoint was saved") as raised:
        loop.train_and_evaluate(
            make_config(shared, **every, **{"train.optimizer.learning_rate": 1e30}), workdir)
    assert raised.value.step == 2
    with checkpoints.CheckpointManager(os.path.join(workdir, "checkpoints")) as manager:
        assert manager.all_steps() == []
    result = loop.train_and_evaluate(make_config(shared, **every), workdir)
    assert sorted(result.history) == [1, 2, 3]
    assert all(np.isfinite(v) for m in result.history.values() for v in m.values())


# ---------------------------------------------------------------------------------- 2


def test_dataset_build_is_keyed_by_its_source(shared, tmp_path):  # noqa: F811
    data_dir = str(tmp_path / "tfds")
    first = str(tmp_path / "a")
    shutil.copytree(shared / "shapes", first)
    goal2k.build_goal2k(first, data_dir)
    goal2k.build_goal2k(first, data_dir)  # same source: reused
    other = str(tmp_path / "b")
    shapes.write_shapes_dataset(other, 8, 64, seed=1)
    with pytest.raises(ValueError,  # not the build of "a" reused for "b"
                       match=r"holds goal2k built from another folder \(.*a, fingerprint "
                             r"[0-9a-f]{12}\); the source is now .*b \(fingerprint") as raised:
        goal2k.build_goal2k(other, data_dir)
    assert raised.type is goal2k.SourceChangedError
    with open(os.path.join(first, "annotations.jsonl"), "a", encoding="utf-8") as f:
        f.write("\n")  # any content change
    with pytest.raises(goal2k.SourceChangedError, match="this folder before its content "
                                                        "changed.*Delete .* to rebuild it"):
        goal2k.build_goal2k(first, data_dir)


def test_mistyped_data_source_is_an_error_not_a_new_dataset(shared, tmp_path):  # noqa: F811
    workdir = new_workdir(shared, tmp_path, "typo")
    typo = str(tmp_path / "my_dataset_typo")
    config = make_config(shared, **{"data.source": typo, "data.data_dir": ""})
    with pytest.raises(ValueError, match=r"config field data.source: no dataset in .*"
                                         r"my_dataset_typo.*set data.shapes_items=0"):
        loop.prepare(config, workdir)
    assert not os.path.exists(typo)
    inside = make_config(shared, **{"data.source": "", "data.data_dir": ""})
    prepared = loop.prepare(inside, workdir)  # '' = <workdir>/shapes: generated there
    assert prepared.data.source == os.path.join(workdir, "shapes")
    assert os.path.isfile(os.path.join(workdir, "shapes", "annotations.jsonl"))


# ---------------------------------------------------------------------------------- 3


def test_failed_save_stops_training_at_once(shared, tmp_path, monkeypatch):  # noqa: F811
    from orbax.checkpoint._src.handlers import json_checkpoint_handler as handler

    original = handler.JsonCheckpointHandler._save_fn

    async def disk_full_at_step_4(self, item, directory):
        if isinstance(item, dict) and item.get("step") == 4 and "reason" in item:
            raise OSError(errno.ENOSPC, "No space left on device")
        return await original(self, item, directory)

    monkeypatch.setattr(handler.JsonCheckpointHandler, "_save_fn", disk_full_at_step_4)
    workdir = new_workdir(shared, tmp_path, "diskfull")
    config = make_config(shared, **{"train.steps": 12, "checkpoint.every_steps": 4})
    with pytest.raises(Exception) as raised:  # its type and message are checked below
        loop.train_and_evaluate(config, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        logged = [json.loads(line)["step"] for line in f]
    assert 4 <= max(logged) < 8, logged  # stopped before the next save, not at it
    assert raised.type is loop.CheckpointSaveError, raised.value
    assert re.search(r"saving checkpoint step 4 in .* failed: .*No space left",
                     str(raised.value)), raised.value


def test_unwritable_checkpoint_folder_fails_before_training(shared, tmp_path):  # noqa: F811
    workdir = new_workdir(shared, tmp_path, "unwritable")
    with open(os.path.join(workdir, "checkpoints"), "w") as f:  # a file where the folder goes
        f.write("not a folder")
    with pytest.raises(Exception) as raised:  # its type and message are checked below
        loop.train_and_evaluate(make_config(shared), workdir)
    assert not os.path.exists(os.path.join(workdir, "metrics.jsonl"))  # no step was trained
    assert raised.type is loop.CheckpointSaveError, raised.value
    assert re.search(r"checkpoint folder .*checkpoints is not writable", str(raised.value)), \
        raised.value


# ---------------------------------------------------------------------------------- 4


def test_orbax_pipeline_folder_samples_and_evaluates(pipeline, tmp_path, sample_main):
    from conftest import load_script

    orbax_dir = str(tmp_path / "orbax")
    load_script("convert").to_orbax(pipeline, orbax_dir)
    assert os.path.isdir(os.path.join(orbax_dir, "unet", "params"))  # an orbax U-Net folder
    out = tmp_path / "out"
    assert sample_main(_sample_args(orbax_dir, out)) == 0
    assert (out / "sample.png").exists()
    evaluate = load_script("evaluate")
    args = evaluate.build_parser().parse_args(
        ["compbench", "--prompts", "p.txt", "--output_dir", str(tmp_path / "e"),
         "--pretrained", orbax_dir, "--steps", str(STEPS), "--num_devices", "2"])
    generator, settings = evaluate.load_generator(args)
    assert settings["num_devices"] == 2 and generator.batch_size >= 1


# ---------------------------------------------------------------------------------- 5


def test_non_finite_checkpoint_is_refused(pipeline, tmp_path, sample_main, capsys):
    base = weights.load_pipeline(pipeline)
    bias = np.asarray(base.unet_params["conv_out"]["bias"]).copy()
    bias[1] = np.nan
    ckpt = str(tmp_path / "ckpt")
    _train_state_checkpoint(ckpt, {"conv_out": {"bias": jnp.asarray(bias)}})
    out = tmp_path / "out"
    assert sample_main(_sample_args(pipeline, out, "--checkpoint", ckpt)) == 2
    err = capsys.readouterr().err
    assert "holds non-finite parameters: conv_out/bias (1 of 4 values)" in err
    assert not (out / "sample.png").exists()


def test_flipped_bytes_never_sample_silently(pipeline, tmp_path, sample_main, capsys):
    base = weights.load_pipeline(pipeline)
    ckpt = str(tmp_path / "ckpt")
    trainable = {"conv_out": {"bias": jnp.asarray(base.unet_params["conv_out"]["bias"])},
                 "conv_in": {"kernel": jnp.asarray(base.unet_params["conv_in"]["kernel"])}}
    _train_state_checkpoint(ckpt, trainable)
    damaged = 0
    for root, _, files in os.walk(os.path.join(ckpt, "7", "state")):
        for name in files:
            path = os.path.join(root, name)
            if "/d/" in path.replace(os.sep, "/"):  # the array data files of OCDBT
                data = bytearray(open(path, "rb").read())
                for i in range(0, len(data), 7):
                    data[i] ^= 0xFF
                open(path, "wb").write(bytes(data))
                damaged += 1
    assert damaged
    out = tmp_path / "out"
    code = sample_main(_sample_args(pipeline, out, "--checkpoint", ckpt))
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith(f"error: cannot read the array metadata of checkpoint {ckpt}/7: ") or \
        err.startswith(f"error: cannot read 'params' of checkpoint {ckpt}/7: ") or \
        f"checkpoint {ckpt}/7 holds non-finite parameters" in err, err
    assert not (out / "sample.png").exists()


# The settings of _sample_args: every sampler call of this file runs one compiled program.
OPTIONS = sampling.SampleOptions(num_steps=STEPS, guidance_scale=7.5, beta=0.3)


def test_sampler_refuses_non_finite_images(pipeline):
    pipe = weights.load_pipeline(pipeline)
    pipe.vae_params = jax.tree_util.tree_map(lambda x: x * np.nan, pipe.vae_params)
    sampler = sampling.GLIGENPipeline(pipe, devices=jax.devices()[:2])
    from goal_jax.layout import Layout

    with pytest.raises(ValueError, match=r"2 of 2 images hold NaN or infinite values") as raised:
        sampler.sample(["a red cat", "a dog"], [Layout(), Layout()], [0, 1], OPTIONS)
    assert raised.type is sampling.NonFiniteSampleError


def test_sampling_reads_the_trained_params_only(pipeline, tmp_path, sample_main, monkeypatch):
    import orbax.checkpoint as ocp

    base = weights.load_pipeline(pipeline)
    ckpt = str(tmp_path / "ckpt")
    _train_state_checkpoint(ckpt, {"conv_out": {"bias": jnp.asarray(
        base.unet_params["conv_out"]["bias"]) + 1}})
    read = []
    original = ocp.PyTreeCheckpointer.restore

    def spy(self, directory, *args, **kwargs):
        restore = kwargs.get("args")
        read.append(sorted(restore.restore_args) if restore is not None else None)
        return original(self, directory, *args, **kwargs)

    monkeypatch.setattr(ocp.PyTreeCheckpointer, "restore", spy)
    out = tmp_path / "out"
    assert sample_main(_sample_args(pipeline, out, "--checkpoint", ckpt)) == 0
    assert read == [["params"]]  # scripts/sample.py never reads opt_state, step or rng
    assert json.loads((out / "sample.json").read_text())["checkpoint_info"]["replaced"] == 1
    read.clear()
    params, info = weights.load_trained_unet(ckpt, base.unet_params)
    assert read == [["params"]]
    assert info["replaced"] == 1 and info["metadata"]["pipeline"] == "/nowhere/pipeline"
    np.testing.assert_allclose(params["conv_out"]["bias"],
                               np.asarray(base.unet_params["conv_out"]["bias"]) + 1)


# ---------------------------------------------------------------------------------- 7


@pytest.mark.parametrize("case,message", [
    ("output_file", "--output_dir {out} exists and is not a folder"),
    ("height", "--height {height} must be a positive multiple of {factor} (the VAE "),
    ("checkpoint", "--checkpoint: checkpoint folder not found: {missing}"),
    ("pipeline", "pipeline folder not found: {missing}"),
])
def test_bad_sample_arguments_are_one_line(pipeline, tmp_path, sample_main, capsys, case,
                                           message):
    out, missing = tmp_path / "out", str(tmp_path / "missing")
    from goal_jax.models import vae as vae_lib

    factor = vae_lib.AutoencoderKLConfig.from_dict(
        weights.read_config(os.path.join(pipeline, "vae"))).downsample_factor
    height = 6 * factor + 1
    extra, folder = [], pipeline
    if case == "output_file":
        out.write_text("a file")
    elif case == "height":
        extra = ["--height", str(height)]
    elif case == "checkpoint":
        extra = ["--checkpoint", missing]
    else:
        folder = missing
    assert sample_main(_sample_args(folder, out, *extra)) == 2
    err = capsys.readouterr().err
    expected = message.format(out=out, missing=missing, height=height, factor=factor)
    assert err.startswith("error: " + expected), err
    assert err.count("\n") == 1, err  # one line, no traceback


def test_long_captions_and_phrases_warn_with_their_token_count(pipeline):
    from goal_jax.layout import Layout

    pipe = weights.load_pipeline(pipeline)
    sampler = sampling.GLIGENPipeline(pipe, devices=jax.devices()[:2])
    words = " ".join(["red cat"] * 50)
    with pytest.warns(UserWarning, match="tokens") as record:
        sampler.sample([words, "a dog"], [Layout(("a dog " + words,), ((0.1, 0.1, 0.9, 0.9),)),
                                          Layout()], [0, 1], OPTIONS)
    messages = [str(w.message) for w in record
                if issubclass(w.category, sampling.TextTruncatedWarning)]
    assert len(messages) == 2
    assert any(m.startswith("caption 0 (") and "has 102 tokens" in m for m in messages)
    assert any(m.startswith("phrase 0 (") and "has 104 tokens" in m for m in messages)


def test_metrics_jsonl_has_each_step_once_after_a_restart(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    writer = loop.JsonlMetricWriter(path, start_step=0)
    for step in range(1, 6):
        writer.write_scalars(step, {"total": step / 10})
    writer.close()
    resumed = loop.JsonlMetricWriter(path, start_step=3)  # checkpoint 3; steps 4, 5 rerun
    for step in (4, 5, 6):
        resumed.write_scalars(step, {"total": step})
    resumed.close()
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["total"] for r in rows] == [0.1, 0.2, 0.3, 4.0, 5.0, 6.0]


def test_convert_finds_the_pipeline_of_a_moved_workdir(pipeline, tmp_path):
    from conftest import load_script

    workdir = tmp_path / "moved_run"
    shutil.copytree(pipeline, workdir / "demo_models" / "pipeline")
    ckpt = str(workdir / "checkpoints")
    base = weights.load_pipeline(pipeline)
    trainable = {"conv_out": {"bias": jnp.asarray(base.unet_params["conv_out"]["bias"]) + 2}}
    state = train.TrainState(step=jnp.int32(3), params=trainable,
                             opt_state=optax.adam(1e-3).init(trainable), rng=jax.random.key(1))
    manager = checkpoints.CheckpointManager(ckpt, async_save=False)
    manager.save(3, state, metadata={"pipeline": "/old/place/demo_models/pipeline",
                                     "pipeline_relative": "../demo_models/pipeline"})
    manager.close()
    info = load_script("convert").to_diffusers(None, str(tmp_path / "export"), ckpt)
    assert info["step"] == 3 and info["trained"] == 1
    assert weights.base_pipeline_of(ckpt) == str(workdir / "demo_models" / "pipeline")
    exported = weights.load_component(str(tmp_path / "export" / "unet"), "unet")[1]
    np.testing.assert_allclose(exported["conv_out"]["bias"],
                               np.asarray(trainable["conv_out"]["bias"]), rtol=1e-6)
