"""The GOAL training program: ``train_and_evaluate(config, workdir)`` (configs/goal.py configs).

scripts/train.py is the absl entry point; tests call :func:`train_and_evaluate` in-process.
Sections: config checks (run before anything is loaded or compiled), set-up (models, data,
mesh, train state, resume), the loop (metrics, progress, checkpoints, samples, preemption).

Workdir layout::

    <workdir>/checkpoints/<step>/   orbax: trainable params + optimizer state + step + rng,
                                    the data-iterator state of every host and metadata (base
                                    pipeline and CLIP paths, config; goal_jax.checkpoints)
    <workdir>/sample_layouts.jsonl  the config's fixed sample layouts (scripts/sample.py --jsonl)
    <workdir>/metrics.jsonl         the scalars written to TensorBoard, one JSON line per log step
    <workdir>/events.out.tfevents*  TensorBoard (clu metric writer)
    <workdir>/demo_models/, shapes/, tfds/   demo models, generated and built datasets

Resume is exact: the checkpoint holds the train state (step, trainable params, optimizer state,
PRNG key) and the data iterator's (epoch, batch) position, so a resumed run computes the same
steps on the same batches as an uninterrupted one. SIGTERM (preemption) saves a checkpoint at
the current step and returns normally (``TrainResult.stopped == "preempted"``). A non-finite
loss raises :class:`NonFiniteLossError` naming the step; metrics are checked before every save,
so the last checkpoint on disk is always a good one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import signal
import sys
import time
from typing import Any

import ml_collections


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or infinite; the message names the step."""


# ----------------------------------------------------------------------------------------------
# Overrides and validation.
# ----------------------------------------------------------------------------------------------


def _fields(config, prefix="") -> list[str]:
    out = []
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            out += _fields(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}")
    return out


def check_override_keys(config: ml_collections.ConfigDict, keys) -> None:
    """Raises ValueError naming every key of ``keys`` ("train.steps", ...) that is not a field
    of ``config`` (with the closest known fields)."""
    import difflib

    known = _fields(config)
    known_set = set(known) | {k.rsplit(".", 1)[0] for k in known if "." in k}
    bad = [k for k in keys if k not in known_set]
    if bad:
        lines = []
        for k in bad:
            close = difflib.get_close_matches(k, known, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            lines.append(f"unknown config field {k!r}{hint}")
        raise ValueError("; ".join(lines))


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict) -> None:
    """Sets ``{"train.steps": 100, ...}`` on ``config`` (unknown fields raise ValueError;
    values must have the field's type, as on the command line)."""
    check_override_keys(config, overrides)
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        try:
            node[leaf] = value
        except TypeError as e:
            raise ValueError(f"config field {key!r}: {e}") from e


HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def is_offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE set (huggingface_hub's own switches)."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def resolve_model_path(value: str, field: str, download: bool = False) -> str | None:
    """A local folder for ``value`` (a folder or a Hugging Face hub id).

    Returns the folder; for a hub id that is not downloaded returns None when ``download`` is
    False, else fetches it with huggingface_hub.snapshot_download. Raises ValueError naming
    ``field`` when the folder does not exist, or when the machine is offline for a hub id.
    """
    if not value:
        raise ValueError(f"config field {field} is empty: give a local model folder or a hub id")
    if os.path.isdir(value):
        return value
    if not HUB_ID.match(value) or value.startswith(("./", "../")):
        raise ValueError(f"config field {field}: folder not found: {value}")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(value, local_files_only=True)
    except Exception:  # not in the local cache
        pass
    if is_offline():
        raise ValueError(
            f"config field {field}: {value!r} is not a local folder and this machine is offline "
            f"(HF_HUB_OFFLINE). Download it on a machine with internet (`huggingface-cli download "
            f"{value} --local-dir <folder>`) and pass --config.{field}=<folder>")
    if not download:
        return None
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(value)
    except Exception as e:
        raise ValueError(
            f"config field {field}: cannot download {value!r} from the Hugging Face hub ({e}). "
            f"Download it elsewhere (`huggingface-cli download {value} --local-dir <folder>`) "
            f"and pass --config.{field}=<folder>") from e


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def _model_configs(config):
    """(unet config, vae downsample factor) from the pipeline folder or the demo configs;
    None when the pipeline is a hub id not downloaded yet."""
    from goal_jax.models import unet as unet_lib
    from goal_jax.models import vae as vae_lib

    if config.demo_models:
        from goal_jax import demo_models

        res = config.data.resolution
        unet = unet_lib.UNet2DConditionConfig.from_dict(demo_models.unet_config_dict(res // 4))
        return unet, vae_lib.AutoencoderKLConfig.from_dict(
            demo_models.vae_config_dict(res)).downsample_factor
    path = resolve_model_path(config.train.model.pipeline, "train.model.pipeline")
    if path is None:
        return None
    from goal_jax import weights

    for sub in ("unet", "vae"):
        _check(os.path.isdir(os.path.join(path, sub)),
               f"config field train.model.pipeline: {path} has no {sub}/ subfolder (expected a "
               "diffusers GLIGEN pipeline folder)")
    unet = unet_lib.UNet2DConditionConfig.from_dict(
        weights.read_config(os.path.join(path, "unet")), source=os.path.join(path, "unet"))
    vae = vae_lib.AutoencoderKLConfig.from_dict(
        weights.read_config(os.path.join(path, "vae")), source=os.path.join(path, "vae"))
    return unet, vae.downsample_factor


def validate_config(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Checks values before anything is loaded or compiled; raises ValueError naming the field.

    Checks: types/ranges of the numbers, the model folders (or hub ids: offline -> error), the
    data source, the resolution against the VAE x U-Net downsampling, and that the MAAlign
    layers exist at that resolution.
    """
    t, d = config.train, config.data
    _check(t.steps >= 1, f"config field train.steps must be >= 1, got {t.steps}")
    _check(t.per_device_batch_size >= 1,
           f"config field train.per_device_batch_size must be >= 1, got {t.per_device_batch_size}")
    for key in ("alpha", "beta"):
        _check(t[key] >= 0, f"config field train.{key} must be >= 0, got {t[key]}")
    _check(t.optimizer.learning_rate > 0,
           f"config field train.optimizer.learning_rate must be > 0, got "
           f"{t.optimizer.learning_rate}")
    for key in ("caption_dropout", "grounding_dropout"):
        _check(0 <= t[key] < 1, f"config field train.{key} must be in [0, 1), got {t[key]}")
    _check(t.dtype in ("float32", "bfloat16", "float16"),
           f"config field train.dtype must be float32, bfloat16 or float16, got {t.dtype!r}")
    _check(t.dsa_region in ("mask", "crop"),
           f"config field train.dsa_region must be 'mask' or 'crop', got {t.dsa_region!r}")
    _check(t.maa_part in ("down", "mid", "up"),
           f"config field train.maa_part must be 'down', 'mid' or 'up', got {t.maa_part!r}")
    _check(t.alpha == 0 or t.dsa_local or t.dsa_global,
           "config fields train.dsa_local and train.dsa_global are both off while train.alpha > 0"
           "; set train.alpha=0 to disable DSAlign")
    _check(config.checkpoint.every_steps >= 0, "config field checkpoint.every_steps must be >= 0")
    _check(config.checkpoint.max_to_keep >= 1, "config field checkpoint.max_to_keep must be >= 1")
    _check(config.log.every_steps >= 1, "config field log.every_steps must be >= 1")
    _check(config.sample.every_steps >= 0, "config field sample.every_steps must be >= 0")
    _check(d.resolution >= 8, f"config field data.resolution must be >= 8, got {d.resolution}")
    _check(1 <= d.max_boxes <= 30, f"config field data.max_boxes must be in [1, 30], got "
                                   f"{d.max_boxes}")
    _check(0 <= d.min_box_size < 1, "config field data.min_box_size must be in [0, 1)")
    _check(0 <= t.encoded_phrase_tokens <= 77,
           f"config field train.encoded_phrase_tokens must be in [0, 77] (0 = all tokens), got "
           f"{t.encoded_phrase_tokens}")
    _check(0 <= t.encoded_box_slots <= d.max_boxes,
           f"config field train.encoded_box_slots must be in [0, data.max_boxes={d.max_boxes}] "
           f"(0 = all slots), got {t.encoded_box_slots}")
    _check(d.shapes_items >= 0, "config field data.shapes_items must be >= 0")
    _check(config.num_devices >= 0, "config field num_devices must be >= 0")
    if num_devices is not None and config.num_devices:
        _check(config.num_devices <= num_devices,
               f"config field num_devices={config.num_devices} but only {num_devices} devices "
               "are present")
    if d.source and not d.shapes_items:
        _check(os.path.isdir(d.source), f"config field data.source: folder not found: {d.source}")
    if not d.source and not d.shapes_items and not config.demo_models:
        _check(bool(d.data_dir) and os.path.isdir(d.data_dir),
               "config fields data.source and data.data_dir: give data.source (a dataset folder "
               "in the on-disk format) or data.data_dir (a TFDS dir with a built goal2k)")
    for i, text in enumerate(config.sample.layouts):
        from goal_jax import layout as layout_lib

        try:
            layout_lib.parse_json(text, name=f"sample.layouts[{i}]")
        except ValueError as e:
            raise ValueError(f"config field sample.layouts[{i}]: {e}") from e

    if not config.demo_models:
        resolve_model_path(t.model.clip, "train.model.clip")
    models = _model_configs(config)
    if models is None:  # hub id to be downloaded at start: checked again after download
        return
    unet, vae_factor = models
    factor = vae_factor * 2 ** (unet.num_levels - 1)
    _check(d.resolution % factor == 0,
           f"config field data.resolution={d.resolution} is not divisible by {factor} (the VAE "
           f"downsamples {vae_factor}x and the U-Net {2 ** (unet.num_levels - 1)}x more)")
    if t.beta and not t.maa_layers:
        from goal_jax.models import unet as unet_lib

        try:
            unet_lib.cross_attention_layers(unet, t.maa_part, t.maa_resolution,
                                            sample_size=d.resolution // vae_factor)
        except ValueError as e:
            raise ValueError(f"config fields train.maa_part/train.maa_resolution: {e}") from e


# ----------------------------------------------------------------------------------------------
# Set-up.
# ----------------------------------------------------------------------------------------------


def prepare(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
    """A copy of ``config`` with every path resolved to a local folder, creating what the run
    needs first: the demo models, the generated shapes dataset, downloads of hub ids."""
    import jax

    config = ml_collections.ConfigDict(config.to_dict())
    t, d = config.train, config.data
    if config.demo_models:
        from goal_jax import demo_models

        paths = demo_models.write_demo_models(os.path.join(workdir, "demo_models"),
                                              seed=t.seed, resolution=d.resolution)
        t.model.pipeline, t.model.clip = paths.pipeline, paths.clip
    else:
        t.model.pipeline = resolve_model_path(t.model.pipeline, "train.model.pipeline", True)
        t.model.clip = resolve_model_path(t.model.clip, "train.model.clip", True)
    if d.shapes_items:
        d.source = d.source or os.path.join(workdir, "shapes")
        if not os.path.isfile(os.path.join(d.source, "annotations.jsonl")):
            if jax.process_index() == 0:
                from goal_jax.data import shapes

                shapes.write_shapes_dataset(d.source, d.shapes_items, d.resolution, seed=d.seed)
    d.data_dir = d.data_dir or os.path.join(workdir, "tfds")
    return config


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
    """Inverse of :func:`data_states_of_all_processes` for this host."""
    import jax

    states = stored.get("processes") if isinstance(stored, dict) else None
    if states is None and jax.process_count() == 1:
        return stored  # a single-host state saved as is
    if not isinstance(states, list) or len(states) != jax.process_count():
        raise ValueError(
            f"{source}: the data-iterator state is for "
            f"{len(states) if isinstance(states, list) else 'an unknown number of'} processes, "
            f"this run has {jax.process_count()}; resume with the same number of hosts")
    return states[jax.process_index()]


def _fmt(metrics: dict) -> str:
    return ", ".join(f"{k}={v:.6g}" for k, v in sorted(metrics.items()))


def _sampler_pipeline(models, state, tokenizer, scheduler_config, path):
    from goal_jax import weights

    f = state.frozen
    return weights.GLIGENPipeline(models.unet, None, models.vae, f["vae"], models.text_encoder,
                                  f["text_encoder"], tokenizer, scheduler_config, path)


# ----------------------------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------------------------


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

    Returns:
      TrainResult. Raises NonFiniteLossError when a loss term is NaN/inf (the message names
      the step and the last good checkpoint).
    """
    import jax

    from goal_jax import sharding as sharding_lib

    if config.train.sharding.distributed:
        sharding_lib.initialize_distributed(True)
    validate_config(config, num_devices=jax.device_count())
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    if config.compilation_cache:
        jax.config.update("jax_compilation_cache_dir", config.compilation_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    config = prepare(config, workdir)
    validate_config(config)  # hub ids are folders now: the model checks run too

    import numpy as np
    from clu import metric_writers, periodic_actions

    from goal_jax import checkpoints
    from goal_jax import text as text_lib
    from goal_jax import train as train_lib
    from goal_jax import weights
    from goal_jax.data import pipeline as data_pipeline

    t, d = config.train, config.data
    is_main = jax.process_index() == 0

    # ------------------------------------------------------------------ mesh, models, state
    devices = jax.devices()[: config.num_devices] if config.num_devices else jax.devices()
    mesh = sharding_lib.create_mesh(t.sharding.data, t.sharding.fsdp, devices)
    global_batch = t.per_device_batch_size * mesh.devices.size
    if global_batch % jax.process_count():
        raise ValueError(f"global batch {global_batch} is not divisible by the "
                         f"{jax.process_count()} processes")
    local_batch = global_batch // jax.process_count()

    models, params = train_lib.load_models(t)
    optimizer, lr_schedule = train_lib.make_optimizer(t)
    state = train_lib.create_train_state(params, t, optimizer)
    del params
    state = train_lib.shard_state(state, mesh, t.sharding.params, t.sharding.fsdp_min_size)
    train_step = train_lib.make_train_step(models, t, optimizer, lr_schedule, mesh=mesh,
                                           example_state=state)

    # ------------------------------------------------------------------ data
    tokenizer_dir = os.path.join(t.model.pipeline, "tokenizer")
    data_iter = data_pipeline.make_train_iterator(
        d.data_dir, tokenizer_dir, batch_size=local_batch, resolution=d.resolution,
        max_boxes=d.max_boxes, seed=d.seed, flip=d.flip, random_crop=d.random_crop,
        min_box_size=d.min_box_size, source_dir=d.source or None, shuffle=d.shuffle)
    box_masks, names = data_iter.box_masks()
    phrase_ids, phrase_masks = data_iter.phrase_token_ids()
    try:  # the trimmed encodings must give the loss of the full ones on every item
        train_lib.check_box_slots(box_masks, train_lib.encoded_box_slots(t, d.max_boxes), names)
        train_lib.check_phrase_tokens(
            phrase_ids, phrase_masks, train_lib.encoded_phrase_tokens(t, phrase_ids.shape[-1]),
            train_lib.phrase_eos_token_ids(models), names)
    except ValueError as e:
        data_iter.close()
        raise ValueError(f"config field train.{e}") from e

    # ------------------------------------------------------------------ resume
    ckpt = checkpoints.CheckpointManager(os.path.join(workdir, "checkpoints"),
                                         max_to_keep=config.checkpoint.max_to_keep,
                                         async_save=config.checkpoint.async_save)
    frozen = state.frozen
    if ckpt.latest_step() is not None:
        restored = ckpt.restore(state.replace(frozen=None))
        state = restored.state.replace(frozen=frozen)
        data_iter.set_state(data_state_of_this_process(
            restored.data_state, f"{ckpt.directory}/{restored.step}"))
        print(f"Resumed from {ckpt.directory}/{restored.step} (step {int(state.step)})",
              flush=True)
    start = int(state.step)
    meta = {"pipeline": t.model.pipeline, "clip": t.model.clip,
            "trainable_patterns": list(train_lib.trainable_patterns(t)),
            "config": json.loads(config.to_json_best_effort())}
    last_saved = ckpt.latest_step()

    # ------------------------------------------------------------------ writers
    writer = metric_writers.create_default_writer(workdir, just_logging=not is_main)
    if start == 0:
        flat = {k: v for k, v in _flat_config(config).items()}
        writer.write_hparams(flat)
    n_train, n_frozen = train_lib.parameter_counts(
        train_lib.merge_params(state.params, state.frozen["unet"]), t)
    print(f"Training {t.steps} steps from step {start}: global batch {global_batch} on "
          f"{mesh.devices.size} devices; U-Net params trainable {n_train:,}, frozen "
          f"{n_frozen:,}", flush=True)
    report = periodic_actions.ReportProgress(num_train_steps=t.steps, writer=writer,
                                             every_steps=config.log.every_steps)
    bar = None
    if config.log.progress and is_main and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=t.steps, initial=start, unit="step", dynamic_ncols=True)
    jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8") \
        if is_main else None

    sample_layouts = [layout_lib_parse(text, i) for i, text in enumerate(config.sample.layouts)]
    if is_main and sample_layouts:  # for scripts/sample.py --jsonl (make demo)
        with open(os.path.join(workdir, "sample_layouts.jsonl"), "w", encoding="utf-8") as f:
            for i, item in enumerate(sample_layouts):
                seed = item.seed if item.seed is not None else i
                f.write(json.dumps(dict(item.to_dict(), seed=seed, id=f"layout{i}")) + "\n")
    sampler = None

    stop = _StopFlag()
    old_handler = None
    if handle_sigterm:
        try:
            old_handler = signal.signal(signal.SIGTERM, stop)
        except ValueError:  # not the main thread
            handle_sigterm = False

    history: dict[int, dict] = {}
    pending: list = []
    interval = {"t0": time.time(), "unwritten": []}

    def fetch() -> None:
        """Moves the pending (device) metrics to ``history``; raises on a non-finite value."""
        if not pending:
            return
        fetched = jax.device_get([m for _, m in pending])
        steps = [s for s, _ in pending]
        pending.clear()
        for s, m in zip(steps, fetched):
            values = {k: float(np.asarray(v)) for k, v in m.items()}
            history[s] = values
            bad = sorted(k for k, v in values.items() if not math.isfinite(v))
            if bad:
                good = (f"the last good checkpoint is step {last_saved} in {ckpt.directory}"
                        if last_saved is not None else "no checkpoint was saved")
                raise NonFiniteLossError(
                    f"non-finite loss at step {s}: {', '.join(bad)} ({_fmt(values)}); the run "
                    f"stopped, {good}")
            interval["unwritten"].append(s)

    def write(step: int) -> None:
        """Writes the average of the metrics since the last write, steps/s and examples/s."""
        fetch()
        steps = interval["unwritten"]
        if not steps:
            return
        mean = {k: float(np.mean([history[s][k] for s in steps])) for k in history[steps[-1]]}
        elapsed = max(time.time() - interval["t0"], 1e-9)
        mean["steps_per_sec"] = len(steps) / elapsed
        mean["examples_per_sec"] = len(steps) * global_batch / elapsed
        interval.update(t0=time.time(), unwritten=[])
        writer.write_scalars(step, mean)
        if jsonl is not None:
            jsonl.write(json.dumps({"step": step, **mean}) + "\n")
            jsonl.flush()

    def save(step: int, reason: str) -> None:
        nonlocal last_saved
        fetch()
        ckpt.save(step, state.replace(frozen=None),
                  data_states_of_all_processes(data_iter.get_state()),
                  dict(meta, reason=reason, time=time.time()))
        last_saved = step

    def sample(step: int) -> None:
        nonlocal sampler
        from goal_jax import sampling

        unet_params = train_lib.merge_params(state.params, state.frozen["unet"])
        if sampler is None:
            scheduler_config = weights.read_config(os.path.join(t.model.pipeline, "scheduler"),
                                                   "scheduler_config.json")
            pipe = _sampler_pipeline(models, state, text_lib.load_tokenizer(tokenizer_dir),
                                     scheduler_config, t.model.pipeline)
            local = [x for x in devices if x.process_index == jax.process_index()]
            sampler = sampling.GroundedSampler(pipe, unet_params=unet_params, devices=local)
        else:
            sampler.set_unet_params(unet_params)
        options = sampling.SampleOptions(
            sampler=config.sample.sampler, num_steps=config.sample.num_steps,
            guidance_scale=config.sample.guidance_scale, beta=config.sample.beta,
            height=d.resolution, width=d.resolution)
        out = sampler.sample([x.caption for x in sample_layouts],
                             [x.layout for x in sample_layouts],
                             [x.seed if x.seed is not None else i
                              for i, x in enumerate(sample_layouts)], options)
        writer.write_images(step, {"samples": out.images})

    stopped = "finished"
    step = start
    try:
        for step in range(start + 1, t.steps + 1):
            batch = sharding_lib.put_batch(next(data_iter), mesh)
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                state, metrics = train_step(state, batch)
            pending.append((step, metrics))
            preempted = bool(stop) or (jax.process_count() > 1 and ckpt.reached_preemption(step))
            stop_here = stop_at_step is not None and step >= stop_at_step
            last = step == t.steps
            if step % config.log.every_steps == 0 or last or preempted or stop_here:
                write(step)  # waits for the step: the progress timing below is real
                if bar is not None:
                    bar.set_postfix(loss=f"{history[step]['total']:.4g}")
            report(step)
            if bar is not None:
                bar.update(1)
            every = config.checkpoint.every_steps
            if (every and step % every == 0) or last or preempted or stop_here:
                save(step, "preempted" if preempted else "final" if last else "periodic")
            every = config.sample.every_steps
            if sample_layouts and every and (step % every == 0 or last):
                sample(step)
            if preempted or stop_here:
                stopped = "preempted" if preempted else "stop_at_step"
                print(f"Stopping at step {step} ({'signal ' + str(stop.signal) if stop else stopped}"
                      f"): checkpoint saved in {ckpt.directory}/{step}", flush=True)
                break
    finally:
        ckpt.close()
        data_iter = None  # noqa: F841 - finalize the tf.data generator while Python is alive
        writer.flush()
        if jsonl is not None:
            jsonl.close()
        if bar is not None:
            bar.close()
        if handle_sigterm:
            signal.signal(signal.SIGTERM, old_handler if old_handler is not None
                          else signal.SIG_DFL)
    if stopped == "finished":
        print(f"Finished {t.steps} steps; last checkpoint {ckpt.directory}/{last_saved}",
              flush=True)
    return TrainResult(step=step, stopped=stopped, history=history,
                       checkpoint_step=last_saved, config=config)


def layout_lib_parse(text: str, index: int):
    from goal_jax import layout as layout_lib

    return layout_lib.parse_json(text, name=f"sample.layouts[{index}]")


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
