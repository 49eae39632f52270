"""GOAL fine-tuning entry point (absl + ml_collections config files).

    python scripts/train.py --config configs/goal.py:demo --workdir runs/demo
    python scripts/train.py --config configs/goal.py --workdir runs/goal \
        --config.train.model.pipeline=/models/gligen-1-4-generation-text-box \
        --config.train.model.clip=/models/clip-vit-large-patch14 --config.data.source=/data/goal2k

Several processes (one per host; README "Multi-host"): every host runs the same command with
``--config.train.sharding.distributed=True`` (Cloud TPU, SLURM: JAX detects the job) or with
``--coordinator_address=HOST:PORT --num_processes=N --process_id=I``; ``--heartbeat_timeout_s``
sets how soon the others stop when one dies. Without them the run is single-process.

Resumes from the latest checkpoint in --workdir. Exit codes: 0 when finished or preempted
(SIGTERM: a checkpoint is saved at the current step first); 1 on a non-finite loss (the
message names the step and the last good checkpoint) or a failed checkpoint save (one line,
at the step it happened); 2 on a bad command line or config (unknown preset or field, a value
of the wrong type, an inconsistent value) before anything is loaded or compiled. The loop is
goal_jax.loop.train_and_evaluate; the config checks are goal_jax.config_checks.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(_REPO, "configs", "goal.py"),
    "Training config file, with an optional preset: configs/goal.py:demo.", lock_config=True)
flags.DEFINE_string("workdir", None, "Output folder (checkpoints, TensorBoard, metrics).")
flags.mark_flags_as_required(["workdir"])
# Multi-process (one process per host; goal_jax.distributed, README "Multi-host").
flags.DEFINE_string("coordinator_address", None,
                    "HOST:PORT of process 0 (default $JAX_COORDINATOR_ADDRESS, or auto-detected "
                    "with --config.train.sharding.distributed=True).")
flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process job.")
flags.DEFINE_integer("process_id", None, "This process's index in [0, --num_processes).")
flags.DEFINE_integer("heartbeat_timeout_s", None,
                     "A process silent this many seconds counts as dead (JAX's default 100).")


def _override_keys(argv) -> list[str]:
    """The field names of ``--config.a.b=value`` / ``--config.a.b value`` arguments."""
    keys = []
    for arg in argv[1:]:
        if arg == "--":
            break
        if arg.startswith("--config.") or arg.startswith("-config."):
            keys.append(arg.split("config.", 1)[1].split("=", 1)[0])
    return keys


def _config_string(argv) -> str | None:
    for i, arg in enumerate(argv[1:], start=1):
        if arg.startswith(("--config=", "-config=")):
            return arg.split("=", 1)[1]
        if arg in ("--config", "-config") and i + 1 < len(argv):
            return argv[i + 1]
    return None


def precheck(argv) -> None:
    """Fails with one clear line (exit 2) on an unknown preset or unknown config field,
    before absl/ml_collections print a traceback."""
    from goal_jax.config_checks import check_override_keys

    spec = _config_string(argv) or os.path.join(_REPO, "configs", "goal.py")
    path, _, arg = spec.partition(":")
    if os.path.basename(path) != "goal.py" or not os.path.isfile(path):
        return  # another config file: ml_collections reports its own errors
    import importlib.util

    module_spec = importlib.util.spec_from_file_location("_goal_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    try:
        config = module.get_config(arg or None)
        check_override_keys(config, _override_keys(argv))
    except ValueError as e:
        print(f"train.py: bad config: {e}", file=sys.stderr)
        sys.exit(2)


def parse_flags(argv):
    """absl's flag parsing with one line and exit 2 on a bad flag (a value of the wrong type
    such as ``--config.train.steps=abc``, a missing --workdir) instead of exit 1."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        print(f"train.py: bad command line: {e}", file=sys.stderr)
        sys.exit(2)


def join_job(config) -> None:
    """Joins the multi-process job the flags (or config.train.sharding.distributed, JAX's
    auto-detection) ask for; single-process otherwise. Exit 2 on inconsistent flags."""
    from goal_jax import distributed

    f = flags.FLAGS
    if not (distributed.requested(f.coordinator_address, f.num_processes, f.process_id)
            or config.train.sharding.distributed):
        return
    try:
        distributed.initialize(f.coordinator_address, f.num_processes, f.process_id,
                               f.heartbeat_timeout_s)
    except ValueError as e:
        print(f"train.py: bad command line: {e}", file=sys.stderr)
        sys.exit(2)


def main(argv):
    if len(argv) > 1:
        print(f"train.py: bad command line: unexpected arguments {argv[1:]}", file=sys.stderr)
        sys.exit(2)
    from goal_jax import config_checks, loop

    loop.quiet_library_logs()
    config = _CONFIG.value
    join_job(config)
    try:
        config_checks.validate_config(config)
    except ValueError as e:
        print(f"train.py: bad config: {e}", file=sys.stderr)
        sys.exit(2)
    try:
        loop.train_and_evaluate(config, flags.FLAGS.workdir)
    except (loop.NonFiniteLossError, loop.CheckpointSaveError) as e:
        fail(f"train.py: {e}", 1)
    except ValueError as e:  # checks that need the workdir or the data (config field ...)
        if not str(e).startswith("config field"):
            fail_job(e)
            raise
        fail(f"train.py: bad config: {e}", 2)
    except Exception as e:  # noqa: BLE001 - a job's process reports and stops at once
        fail_job(e)
        raise


def fail(message: str, code: int) -> None:
    """Prints ``message`` and exits with ``code``. In a multi-process job: names this process
    and says what to do, and exits at once (JAX's normal exit would wait up to its shutdown
    timeout for the other processes, which may be dead or stopping too)."""
    from goal_jax import distributed

    index, count = distributed.process_index_and_count()
    if count == 1:
        print(message, file=sys.stderr)
        sys.exit(code)
    print(f"{message.replace('train.py: ', f'train.py: process {index} of {count}: ', 1)}\n"
          "train.py: the job stops (when another process died, this is its consequence): "
          "start it again on every host; it resumes from the last complete checkpoint",
          file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)


def fail_job(error: Exception) -> None:
    """In a multi-process job, :func:`fail` with exit 1 for an unexpected error (e.g. a
    collective whose peer died); single-process it returns (the traceback follows)."""
    from goal_jax import distributed

    if distributed.process_index_and_count()[1] > 1:
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        fail(f"train.py: {type(error).__name__}: {first}", 1)


if __name__ == "__main__":
    precheck(sys.argv)
    app.run(main, flags_parser=parse_flags)
