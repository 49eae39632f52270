"""The GOAL training program: ``train_and_evaluate(config, workdir)`` (configs/goal.py configs).

scripts/train.py is the absl entry point; tests and the notebooks call
:func:`train_and_evaluate` in-process. The file reads top to bottom, as flax/examples' train.py:

  set-up      :func:`prepare` (demo models, shapes data, hub downloads), :func:`create_mesh`,
              the models and train state (goal_jax.train), :func:`create_input_pipeline`,
              :func:`restore_or_init`
  writers     :func:`create_writers`: clu's MultiWriter over the TensorBoard / console writer
              and :class:`JsonlMetricWriter` (metrics.jsonl); :class:`MetricLog` averages the
              step metrics between writes and checks them finite
  actions     :func:`save_checkpoint`, :func:`sample_layouts`: top-level functions with
              explicit arguments, called by the loop
  the loop    :func:`train_and_evaluate`

Config checks live in goal_jax.config_checks (re-exported here).

Workdir layout::

    <workdir>/checkpoints/<step>/   orbax: trainable params + optimizer state + step + rng,
                                    the data-iterator state of every host and metadata (base
                                    pipeline and CLIP paths, config; goal_jax.checkpoints)
    <workdir>/sample_layouts.jsonl  the config's fixed sample layouts (scripts/sample.py --jsonl)
    <workdir>/metrics.jsonl         the scalars written to TensorBoard, one JSON line per log step
    <workdir>/events.out.tfevents*  TensorBoard (clu metric writer)
    <workdir>/demo_models/, shapes/, tfds/   demo models, generated and built datasets

Runs never lie:

* Resume is exact: the checkpoint holds the train state (step, trainable params, optimizer
  state, PRNG key) and the data iterator's (epoch, batch) position.
* A non-finite loss raises :class:`NonFiniteLossError` naming the step. The loss of step k+1
  is the first test of the weights saved at step k, so when it is non-finite the checkpoint of
  step k is deleted: the last checkpoint left on disk gives a finite loss. Weights are also
  checked finite before every save.
* A failed save (full disk, unwritable folder) raises :class:`CheckpointSaveError` at the next
  step, not at the next save; an unwritable checkpoint folder fails before training starts.
* SIGTERM (preemption) saves a checkpoint at the current step and returns normally
  (``TrainResult.stopped == "preempted"``); metrics.jsonl holds each step once after a restart.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
from typing import Any

import ml_collections

from goal_jax.checkpoints import CheckpointSaveError  # noqa: F401 - re-exported
from goal_jax.config_checks import (  # noqa: F401 - re-exported for scripts and notebooks
    apply_overrides,
    check_override_keys,
    resolve_model_path,
    validate_config,
)


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or infinite; the message names the step (``.step``)."""

    def __init__(self, message: str, step: int | None = None):
        super().__init__(message)
        self.step = step


# ----------------------------------------------------------------------------------------------
# Set-up.
# ----------------------------------------------------------------------------------------------


def prepare(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
    """A copy of ``config`` with every path resolved to a local folder, creating what the run
    needs first: the demo models, the generated shapes dataset, downloads of hub ids.

    The shapes dataset (``data.shapes_items`` > 0) is generated into ``data.source`` only when
    that folder is inside ``workdir`` (default ``<workdir>/shapes``); an explicit folder
    elsewhere must already hold a dataset, so a mistyped path is an error, not a new dataset.
    """
    import jax

    from goal_jax import distributed

    config = ml_collections.ConfigDict(config.to_dict())
    t, d = config.train, config.data
    first = jax.process_index() == 0  # writes shared files; the others wait, then reuse them
    if config.demo_models:
        from goal_jax import demo_models

        def write_demo_models():
            return demo_models.write_demo_models(os.path.join(workdir, "demo_models"),
                                                 seed=t.seed, resolution=d.resolution)

        paths = write_demo_models() if first else None
        distributed.barrier("goal_jax.prepare.demo_models")
        paths = paths or write_demo_models()  # the others find process 0's files and reuse them
        t.model.pipeline, t.model.clip = paths.pipeline, paths.clip
    else:
        t.model.pipeline = resolve_model_path(t.model.pipeline, "train.model.pipeline", True)
        t.model.clip = resolve_model_path(t.model.clip, "train.model.clip", True)
    if d.shapes_items:
        d.source = os.path.abspath(d.source or os.path.join(workdir, "shapes"))
        if not os.path.isfile(os.path.join(d.source, "annotations.jsonl")):
            if not d.source.startswith(os.path.abspath(workdir) + os.sep):
                raise ValueError(
                    f"config field data.source: no dataset in {d.source} (no annotations.jsonl)"
                    f"; data.shapes_items={d.shapes_items} generates the shapes dataset only "
                    "inside the workdir (data.source='' = <workdir>/shapes). To train on a "
                    "folder of yours set data.shapes_items=0")
            if first:
                from goal_jax.data import shapes

                print(f"Generating the shapes dataset ({d.shapes_items} items) in {d.source}",
                      flush=True)
                shapes.write_shapes_dataset(d.source, d.shapes_items, d.resolution, seed=d.seed)
        distributed.barrier("goal_jax.prepare.shapes")
    d.data_dir = d.data_dir or os.path.join(workdir, "tfds")
    return config


def create_mesh(config: ml_collections.ConfigDict):
    """(mesh, devices, global batch, per-host batch) from ``num_devices``, ``train.sharding``
    and ``train.per_device_batch_size``."""
    import jax

    from goal_jax import sharding as sharding_lib

    t = config.train
    devices = jax.devices()[: config.num_devices] if config.num_devices else jax.devices()
    mesh = sharding_lib.create_mesh(t.sharding.data, t.sharding.fsdp, devices)
    global_batch = t.per_device_batch_size * mesh.devices.size
    if global_batch % jax.process_count():
        raise ValueError(f"global batch {global_batch} is not divisible by the "
                         f"{jax.process_count()} processes")
    return mesh, devices, global_batch, global_batch // jax.process_count()


def create_input_pipeline(config: ml_collections.ConfigDict, models, local_batch: int):
    """The training iterator (goal_jax.data.pipeline) over ``config.data``, checked against the
    trimmed encodings of ``config.train`` (encoded_box_slots / encoded_phrase_tokens) on every
    item before the first step."""
    from goal_jax import train as train_lib
    from goal_jax.data import pipeline as data_pipeline

    from goal_jax.data import goal2k

    t, d = config.train, config.data
    try:
        data_iter = data_pipeline.make_train_iterator(
            d.data_dir, os.path.join(t.model.pipeline, "tokenizer"), batch_size=local_batch,
            resolution=d.resolution, max_boxes=d.max_boxes, seed=d.seed, flip=d.flip,
            random_crop=d.random_crop, min_box_size=d.min_box_size,
            source_dir=d.source or None, shuffle=d.shuffle)
    except goal2k.SourceChangedError as e:
        raise ValueError(f"config fields data.source and data.data_dir: {e}") from e
    try:  # the trimmed encodings must give the loss of the full ones on every item
        slots = train_lib.encoded_box_slots(t, d.max_boxes)
        tokens = train_lib.encoded_phrase_tokens(t, data_pipeline.MAX_LENGTH)
        if slots < d.max_boxes or tokens < data_pipeline.MAX_LENGTH:  # reads every record once
            for box_masks, phrase_ids, phrase_masks, names in data_iter.annotation_chunks():
                train_lib.check_box_slots(box_masks, slots, names)
                train_lib.check_phrase_tokens(phrase_ids, phrase_masks, tokens,
                                              train_lib.phrase_eos_token_ids(models), names)
    except ValueError as e:
        data_iter.close()
        raise ValueError(f"config field train.{e}") from e
    return data_iter


def restore_or_init(ckpt, state, data_iter):
    """``state`` restored from the latest checkpoint in ``ckpt`` (with the data iterator moved
    to its position), or ``state`` itself when there is none."""
    if ckpt.latest_step() is None:
        return state
    restored = ckpt.restore(state)
    data_iter.set_state(data_state_of_this_process(
        restored.data_state, f"{ckpt.directory}/{restored.step}"))
    print(f"Resumed from {ckpt.directory}/{restored.step} (step {int(restored.state.step)})",
          flush=True)
    return restored.state


def checkpoint_metadata(config: ml_collections.ConfigDict, checkpoint_dir: str) -> dict:
    """The JSON metadata of every checkpoint: the base models (absolute, and relative to the
    checkpoint folder so a moved workdir still finds its demo models), the trainable patterns
    and the config."""
    from goal_jax import train as train_lib

    t = config.train
    return {"pipeline": t.model.pipeline, "clip": t.model.clip,
            "pipeline_relative": os.path.relpath(t.model.pipeline, checkpoint_dir),
            "trainable_patterns": list(train_lib.trainable_patterns(t)),
            "config": json.loads(config.to_json_best_effort())}


@dataclasses.dataclass
class TrainResult:
    """What :func:`train_and_evaluate` returns.

    step: the last step done; stopped: "finished" | "preempted" | "stop_at_step";
    history: {step: {metric: float}} of every step run in this call; checkpoint_step: the
    newest checkpoint on disk; config: the resolved config the run used.
    """

    step: int
    stopped: str
    history: dict
    checkpoint_step: int | None
    config: Any = None


class _StopFlag:
    """Set by SIGTERM (preemption): the loop saves at the current step and returns."""

    def __init__(self):
        self.signal = None

    def __call__(self, signum, frame):
        del frame
        self.signal = signum

    def __bool__(self):
        return self.signal is not None


def quiet_library_logs() -> None:
    """Drops the INFO chatter of orbax and tfds (every save logs ~30 lines) from absl logging;
    their warnings and errors, and the metric lines of clu's writer, stay."""
    import logging

    def keep(record) -> bool:
        path = record.pathname.replace(os.sep, "/")
        noisy = any(p in path for p in ("/orbax/", "/tensorflow_datasets/", "/jax/_src/"))
        return record.levelno >= logging.WARNING or not noisy

    logging.getLogger("absl").addFilter(keep)


def data_states_of_all_processes(local_state) -> dict:
    """{"processes": [iterator state of process 0, 1, ...]} (gathered across hosts: orbax
    writes the JSON item from the primary host only, and every host has its own position)."""
    import jax

    if jax.process_count() == 1:
        return {"processes": [local_state]}
    import numpy as np
    from jax.experimental import multihost_utils

    blob = np.frombuffer(json.dumps(local_state).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([blob.size]))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: blob.size] = blob
    every = np.asarray(multihost_utils.process_allgather(padded))
    return {"processes": [json.loads(bytes(every[i, : sizes[i]]).decode())
                          for i in range(len(sizes))]}


def data_state_of_this_process(stored, source: str):
    """Inverse of :func:`data_states_of_all_processes` for this host. The input pipeline's
    position is global (goal_jax.data.pipeline: the same on every host), so a checkpoint of
    another number of hosts resumes too, when its hosts agree on the position."""
    import jax

    states = stored.get("processes") if isinstance(stored, dict) else None
    if states is None and jax.process_count() == 1:
        return stored  # a single-host state saved as is
    if not isinstance(states, list) or not states:
        raise ValueError(f"{source}: the data-iterator state holds no per-process states")
    if len(states) == jax.process_count():
        return states[jax.process_index()]
    positions = sorted({json.dumps([s.get("epoch"), s.get("batch")]) if isinstance(s, dict)
                        else repr(s) for s in states})
    if len(positions) != 1:
        raise ValueError(
            f"{source}: the data-iterator states of its {len(states)} processes are at "
            f"different positions ({', '.join(positions)}); this run has "
            f"{jax.process_count()} processes: resume with {len(states)}")
    return states[0]


# ----------------------------------------------------------------------------------------------
# Metrics: clu writers and the interval average.
# ----------------------------------------------------------------------------------------------


def _jsonl_writer_base():
    from clu import metric_writers

    return metric_writers.MetricWriter


class JsonlMetricWriter(_jsonl_writer_base()):
    """A clu MetricWriter that appends ``{"step": step, **scalars}`` lines to a JSONL file.

    On open, the lines of steps after ``start_step`` are dropped (a run stopped between its
    last checkpoint and its last log line logged them; the resumed run logs them again), so
    every step appears once. Only scalars are written; other summaries are ignored.
    """

    def __init__(self, path: str, start_step: int = 0):
        kept = []
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        if json.loads(line).get("step", 0) <= start_step:
                            kept.append(line if line.endswith("\n") else line + "\n")
                    except (json.JSONDecodeError, AttributeError):
                        continue  # a line cut by a crash
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(kept)
        self._file = open(path, "a", encoding="utf-8")

    def write_scalars(self, step, scalars):
        self._file.write(json.dumps({"step": int(step),
                                     **{k: float(v) for k, v in scalars.items()}}) + "\n")
        self._file.flush()

    def write_summaries(self, step, values, metadata=None):
        del step, values, metadata

    def write_images(self, step, images):
        del step, images

    def write_videos(self, step, videos):
        del step, videos

    def write_audios(self, step, audios, *, sample_rate):
        del step, audios, sample_rate

    def write_texts(self, step, texts):
        del step, texts

    def write_histograms(self, step, arrays, num_buckets=None):
        del step, arrays, num_buckets

    def write_hparams(self, hparams):
        del hparams

    def flush(self):
        self._file.flush()

    def close(self):
        self._file.close()


def create_writers(workdir: str, start_step: int, is_main: bool):
    """clu's MultiWriter over the default writer (TensorBoard + console on the main host,
    console only elsewhere) and, on the main host, ``<workdir>/metrics.jsonl``."""
    from clu import metric_writers

    writers = [metric_writers.create_default_writer(workdir, just_logging=not is_main)]
    if is_main:
        writers.append(JsonlMetricWriter(os.path.join(workdir, "metrics.jsonl"), start_step))
    return metric_writers.MultiWriter(writers)


class MetricLog:
    """The train-step metrics between two writes.

    ``add`` keeps the device metrics of a step without waiting for it; ``fetch`` copies them to
    the host (``history``) and raises :class:`NonFiniteLossError` at the first non-finite value;
    ``interval`` returns the average since the last call with steps/s and examples/s.
    """

    def __init__(self, global_batch: int):
        self.global_batch = global_batch
        self.history: dict[int, dict] = {}
        self._pending: list = []
        self._unwritten: list[int] = []
        self._t0 = time.time()

    def add(self, step: int, metrics) -> None:
        self._pending.append((step, metrics))

    def fetch(self) -> None:
        import jax
        import numpy as np

        pending, self._pending = self._pending, []
        for (step, _), values in zip(pending, jax.device_get([m for _, m in pending])):
            values = {k: float(np.asarray(v)) for k, v in values.items()}
            self.history[step] = values
            bad = sorted(k for k, v in values.items() if not math.isfinite(v))
            if bad:
                raise NonFiniteLossError(f"non-finite loss at step {step}: {', '.join(bad)} "
                                         f"({_fmt(values)})", step)
            self._unwritten.append(step)

    def interval(self) -> dict | None:
        """Mean metrics of the steps since the last call (None when there are none)."""
        import numpy as np

        self.fetch()
        steps, self._unwritten = self._unwritten, []
        if not steps:
            return None
        mean = {k: float(np.mean([self.history[s][k] for s in steps]))
                for k in self.history[steps[-1]]}
        elapsed = max(time.time() - self._t0, 1e-9)
        self._t0 = time.time()
        mean["steps_per_sec"] = len(steps) / elapsed
        mean["examples_per_sec"] = len(steps) * self.global_batch / elapsed
        return mean


def _fmt(metrics: dict) -> str:
    return ", ".join(f"{k}={v:.6g}" for k, v in sorted(metrics.items()))


# ----------------------------------------------------------------------------------------------
# Actions: checkpoints and samples.
# ----------------------------------------------------------------------------------------------


def _all_finite(tree):
    import jax
    import jax.numpy as jnp

    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def save_checkpoint(ckpt, step: int, state, data_iter, metadata: dict, reason: str) -> None:
    """Starts saving ``state`` (the TrainState: what trains, no frozen params), the data
    position of every host and ``metadata`` at ``step``; raises NonFiniteLossError instead when
    the trainable params are not all finite (a diverged step is never saved)."""
    import jax

    if not bool(jax.jit(_all_finite)(state.params)):  # step + 1 would be the first bad loss
        raise NonFiniteLossError(f"non-finite parameters after step {step}", step + 1)
    ckpt.save(step, state, data_states_of_all_processes(data_iter.get_state()),
              dict(metadata, reason=reason, time=time.time()))


def discard_diverged_checkpoint(ckpt, bad_step: int) -> int | None:
    """After a non-finite loss at ``bad_step``: deletes the checkpoint of ``bad_step - 1``
    (its weights gave that loss) and returns the newest step left (None if none)."""
    ckpt.wait()
    if bad_step - 1 in ckpt.all_steps():
        ckpt.delete(bad_step - 1)
        print(f"Deleted checkpoint {ckpt.directory}/{bad_step - 1}: its weights give the "
              f"non-finite loss of step {bad_step}", flush=True)
    return ckpt.latest_step()


def write_sample_layouts(path: str, layouts) -> None:
    """The fixed sample layouts as JSONL for scripts/sample.py --jsonl (make demo)."""
    with open(path, "w", encoding="utf-8") as f:
        for i, item in enumerate(layouts):
            seed = item.seed if item.seed is not None else i
            f.write(json.dumps(dict(item.to_dict(), seed=seed, id=f"layout{i}")) + "\n")


def host_copy(tree):
    """``tree``'s arrays (global arrays on one mesh) with this host's full copy of each: the
    arrays themselves with one process; with several, numpy copies (sharded arrays gathered
    across the processes in one program, a collective every process must call)."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    if jax.process_count() == 1:
        return tree
    from goal_jax import distributed

    distributed.barrier("goal_jax.host_copy")
    mesh = jax.tree_util.tree_leaves(tree)[0].sharding.mesh
    copied = jax.jit(lambda t: t, out_shardings=NamedSharding(mesh, PartitionSpec()))(tree)
    return jax.tree_util.tree_map(lambda x: np.asarray(x.addressable_data(0)), copied)


def create_sampler(models, frozen, pipeline_path: str, devices):
    """A GLIGENPipeline over the run's models and frozen weights (its U-Net params are set at
    each :func:`sample_layouts`), on this host's devices."""
    from goal_jax import distributed, sampling, weights
    from goal_jax import text as text_lib

    scheduler_config = weights.read_config(os.path.join(pipeline_path, "scheduler"),
                                           "scheduler_config.json")
    frozen = host_copy({"vae": frozen["vae"], "text_encoder": frozen["text_encoder"]})
    pipe = weights.GLIGENComponents(
        models.unet, None, models.vae, frozen["vae"], models.text_encoder,
        frozen["text_encoder"], text_lib.load_tokenizer(os.path.join(pipeline_path, "tokenizer")),
        scheduler_config, pipeline_path)
    return sampling.GLIGENPipeline(pipe, unet_params={},
                                   devices=distributed.local_devices(devices))


def sample_layouts(sampler, unet_params, layouts, sample_config, resolution: int):
    """uint8 [N, H, W, 3] images of the fixed ``layouts`` with ``unet_params``, on every
    process. With several processes each samples its share of the layouts
    (goal_jax.distributed.my_share) on its own devices and the images are gathered."""
    import jax
    import numpy as np

    from goal_jax import distributed, sampling

    sampler.set_unet_params(host_copy(unet_params))
    options = sampling.SampleOptions(
        sampler=sample_config.sampler, num_steps=sample_config.num_steps,
        guidance_scale=sample_config.guidance_scale, beta=sample_config.beta,
        height=resolution, width=resolution)
    share = distributed.my_share(len(layouts))
    images = np.zeros((0, resolution, resolution, 3), np.uint8)
    if share:
        mine = [layouts[i] for i in share]
        images = sampler.sample([x.caption for x in mine], [x.layout for x in mine],
                                [x.seed if x.seed is not None else i for i, x in zip(share, mine)],
                                options).images
    if jax.process_count() > 1:
        print(f"process {jax.process_index()}: sampled layouts {share} of {len(layouts)}",
              flush=True)
    return distributed.gather_share(images, len(layouts))


# ----------------------------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Run:
    """What set-up hands the loop (one place instead of closures over locals)."""

    config: Any
    workdir: str
    mesh: Any
    devices: list
    global_batch: int
    models: Any
    train_step: Any
    frozen: Any  # the frozen params: the train step's second argument, never in checkpoints
    data_iter: Any
    ckpt: Any
    metadata: dict
    writer: Any
    layouts: list
    sampler: Any = None
    ids_log: Any = None  # log.data_ids: this process's data_ids/process_<i>.jsonl


def _set_up(config, workdir: str):
    """Models, train state, data, checkpoint manager and writers of a (resumed) run."""
    import jax

    from goal_jax import checkpoints, layout
    from goal_jax import train as train_lib

    t = config.train
    mesh, devices, global_batch, local_batch = create_mesh(config)
    models, params = train_lib.load_models(t)
    optimizer, lr_schedule = train_lib.make_optimizer(t)
    state, frozen = train_lib.create_train_state(params, t, optimizer)
    del params
    state, frozen = train_lib.shard_state(state, frozen, mesh, t.sharding.params,
                                          t.sharding.fsdp_min_size)
    train_step = train_lib.make_train_step(models, t, optimizer, lr_schedule, mesh=mesh,
                                           example_state=state, example_frozen=frozen)
    ckpt = checkpoints.CheckpointManager(
        os.path.join(workdir, "checkpoints"), max_to_keep=config.checkpoint.max_to_keep,
        async_save=config.checkpoint.async_save, check_writable=jax.process_index() == 0)
    data_iter = create_input_pipeline(config, models, local_batch)
    state = restore_or_init(ckpt, state, data_iter)
    is_main = jax.process_index() == 0
    writer = create_writers(workdir, int(state.step), is_main)
    if int(state.step) == 0:
        writer.write_hparams(_flat_config(config))
    layouts = [layout.parse_json(text, name=f"sample.layouts[{i}]")
               for i, text in enumerate(config.sample.layouts)]
    if is_main and layouts:
        write_sample_layouts(os.path.join(workdir, "sample_layouts.jsonl"), layouts)
    n_train, n_frozen = train_lib.parameter_counts(
        train_lib.merge_params(state.params, frozen["unet"]), t)
    print(f"Training {t.steps} steps from step {int(state.step)}: global batch {global_batch} "
          f"on {mesh.devices.size} devices; U-Net params trainable {n_train:,}, frozen "
          f"{n_frozen:,}", flush=True)
    run = _Run(config, workdir, mesh, devices, global_batch, models, train_step, frozen,
               data_iter, ckpt, checkpoint_metadata(config, ckpt.directory), writer, layouts)
    if config.log.data_ids:
        os.makedirs(os.path.join(workdir, "data_ids"), exist_ok=True)
        run.ids_log = open(os.path.join(workdir, "data_ids",
                                        f"process_{jax.process_index()}.jsonl"), "a",
                           encoding="utf-8")
    return run, state


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       stop_at_step: int | None = None,
                       handle_sigterm: bool = True) -> TrainResult:
    """Trains ``config`` (configs/goal.py) in ``workdir``, resuming from its latest checkpoint.

    Args:
      config: the run config; checked by :func:`validate_config` before anything is loaded.
      workdir: output folder (checkpoints, TensorBoard, metrics.jsonl, demo files).
      stop_at_step: stop (after saving a checkpoint) once this step is done, as a preemption
        at that step would; None = run to ``config.train.steps``.
      handle_sigterm: install a SIGTERM handler (main thread only) that saves and returns.
        With several processes JAX's preemption service catches SIGTERM instead (set up by
        jax.distributed.initialize): a signal to any one process makes every process save the
        same step and return (orbax's ``reached_preemption``), so none waits for the others.

    Returns:
      TrainResult. Raises NonFiniteLossError when a loss term is NaN/inf (the message names
      the step and the last good checkpoint) and CheckpointSaveError when a save fails.
    """
    import jax

    from goal_jax import sharding as sharding_lib

    if config.train.sharding.distributed:
        sharding_lib.initialize_distributed(True)  # no-op when the entry point has joined
    validate_config(config, num_devices=jax.device_count())
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    if config.compilation_cache:
        jax.config.update("jax_compilation_cache_dir", config.compilation_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    config = prepare(config, workdir)
    validate_config(config)  # hub ids are folders now: the model checks run too

    run, state = _set_up(config, workdir)
    stop, old_handler = _StopFlag(), None
    handle_sigterm = handle_sigterm and jax.process_count() == 1  # else JAX's service does
    if handle_sigterm:
        try:
            old_handler = signal.signal(signal.SIGTERM, stop)
        except ValueError:  # not the main thread
            handle_sigterm = False
    log = MetricLog(run.global_batch)
    try:
        step, stopped = _train_steps(run, state, log, stop, stop_at_step)
    except NonFiniteLossError as e:
        good = discard_diverged_checkpoint(run.ckpt, e.step)
        where = (f"the last good checkpoint is step {good} in {run.ckpt.directory}"
                 if good is not None else "no good checkpoint was saved")
        raise NonFiniteLossError(f"{e}; the run stopped, {where}", e.step) from None
    finally:
        _close(run)
        if handle_sigterm:
            signal.signal(signal.SIGTERM, old_handler if old_handler is not None
                          else signal.SIG_DFL)
    if stopped == "finished":
        print(f"Finished {config.train.steps} steps; last checkpoint "
              f"{run.ckpt.directory}/{run.ckpt.latest_step()}", flush=True)
    return TrainResult(step=step, stopped=stopped, history=log.history,
                       checkpoint_step=run.ckpt.latest_step(), config=config)


def _train_steps(run: _Run, state, log: MetricLog, stop: _StopFlag, stop_at_step):
    """The loop proper: step, log, checkpoint, sample, preemption. Returns (step, stopped)."""
    from clu import periodic_actions

    config = run.config
    steps, start = config.train.steps, int(state.step)
    report = periodic_actions.ReportProgress(num_train_steps=steps,
                                             every_steps=config.log.every_steps)
    bar = _progress_bar(config, start)
    try:
        return _steps(run, state, log, stop, stop_at_step, report, bar)
    finally:
        if bar is not None:
            bar.close()


def _steps(run: _Run, state, log: MetricLog, stop: _StopFlag, stop_at_step, report, bar):
    import jax

    from goal_jax import sharding as sharding_lib
    from goal_jax import train as train_lib

    config, ckpt = run.config, run.ckpt
    steps, start = config.train.steps, int(state.step)
    step = start
    for step in range(start + 1, steps + 1):
        batch = sharding_lib.put_batch(next(run.data_iter), run.mesh)
        if step == start + 1 and jax.process_count() > 1:
            _compile_then_meet(run, state, batch)
        if run.ids_log is not None:
            run.ids_log.write(json.dumps({"step": step, "process": jax.process_index(),
                                          "ids": run.data_iter.last_ids}) + "\n")
            run.ids_log.flush()
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
            state, metrics = run.train_step(state, run.frozen, batch)
        log.add(step, metrics)
        ckpt.check_for_errors()  # a failed background save stops the run now
        preempted = bool(stop) or (jax.process_count() > 1 and ckpt.reached_preemption(step))
        stop_here = stop_at_step is not None and step >= stop_at_step
        last = step == steps
        if step % config.log.every_steps == 0 or last or preempted or stop_here:
            summary = log.interval()  # waits for the step: the progress timing is real
            if summary is not None:
                run.writer.write_scalars(step, summary)
            if bar is not None:
                bar.set_postfix(loss=f"{log.history[step]['total']:.4g}")
        report(step)
        if bar is not None:
            bar.update(1)
        every = config.checkpoint.every_steps
        if (every and step % every == 0) or last or preempted or stop_here:
            log.fetch()  # never save the weights of a step whose loss is not finite
            save_checkpoint(ckpt, step, state, run.data_iter, run.metadata,
                            "preempted" if preempted else "final" if last else "periodic")
        every = config.sample.every_steps
        if run.layouts and every and (step % every == 0 or last):
            if run.sampler is None:
                run.sampler = create_sampler(run.models, run.frozen,
                                             config.train.model.pipeline, run.devices)
            unet_params = train_lib.merge_params(state.params, run.frozen["unet"])
            run.writer.write_images(step, {"samples": sample_layouts(
                run.sampler, unet_params, run.layouts, config.sample, config.data.resolution)})
        if preempted or stop_here:
            why = (f"signal {stop.signal}" if stop else "preemption sync point of all processes"
                   if preempted else "stop_at_step")
            print(f"Stopping at step {step} ({why}): checkpoint saved in "
                  f"{ckpt.directory}/{step}", flush=True)
            return step, "preempted" if preempted else "stop_at_step"
    return step, "finished"


def _compile_then_meet(run: _Run, state, batch) -> None:
    """Several processes: compiles the train step, then waits for every process at a barrier of
    JAX's coordination service, so the first step starts everywhere together (a process whose
    compile takes longer would otherwise find its peers' collectives timed out)."""
    import jax

    from goal_jax import distributed

    jitted = getattr(run.train_step, "jitted", None)  # goal_jax.train.make_train_step's jit
    if jitted is not None:
        with jax.set_mesh(run.mesh):
            jitted.lower(state, run.frozen, dict(batch)).compile()
    distributed.barrier("goal_jax.train_step_compiled")


def _progress_bar(config, start: int):
    import jax

    if not (config.log.progress and jax.process_index() == 0 and sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=config.train.steps, initial=start, unit="step", dynamic_ncols=True)


def _close(run: _Run) -> None:
    """Waits for the last save, stops the data iterator's prefetch threads
    and flushes the writers; a failed save raises CheckpointSaveError here."""
    run.data_iter.close()
    if run.ids_log is not None:
        run.ids_log.close()
    try:
        run.ckpt.close()
    finally:
        run.writer.flush()
        run.writer.close()


def _flat_config(config, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            out.update(_flat_config(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float, str, bool)):
            out[f"{prefix}{key}"] = value
        else:
            out[f"{prefix}{key}"] = str(value)
    return out
