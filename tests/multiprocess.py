"""Launches a multi-process JAX job on this machine: N processes of a real entry point
(scripts/train.py, scripts/sample.py, scripts/evaluate.py), each with its own simulated CPU
devices, joined through ``--coordinator_address 127.0.0.1:<free port> --num_processes N
--process_id i`` (goal_jax.distributed; gloo cross-process collectives).

    job = Job("train.py", ["--config=...", "--workdir=..."], processes=2, devices=2,
              log_dir=tmp_path / "logs")
    job.wait_for_output(0, "Training 4 steps")   # optional: act while it runs
    job.signal(1, signal.SIGTERM)
    results = job.wait()                         # [Result(returncode, stdout, stderr)] * N

Time is bounded: :meth:`Job.wait` and :meth:`Job.wait_for_output` kill every process of the job
when their timeout passes and fail with the tail of each process's output. Outputs go to files
(``log_dir/process_<i>.out|err``), not pipes, so a chatty process never blocks.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal as signal_lib
import socket
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAIL = 3000  # characters of each output shown when a job fails


def free_port() -> int:
    """A TCP port nothing listens on now (the coordinator binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class Result:
    """One process's exit status (negative: killed by that signal) and outputs."""

    process: int
    returncode: int
    stdout: str
    stderr: str


def process_env(devices: int, compilation_cache: str | None = None) -> dict:
    """The environment of one process: ``devices`` simulated CPU devices (XLA's backend
    optimisation off: compiling is most of these runs' time), this checkout first on the import
    path, unbuffered output, and JAX's persistent compilation cache in
    ``compilation_cache`` (every program cached: later jobs of the same shapes skip compiling)."""
    env = dict(os.environ)
    # LLVM's optimisation passes are most of a CPU compile; these tiny runs do not need them.
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
                         "--xla_backend_optimization_level=0",
               JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1",
               PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""))
    env.pop("JAX_COORDINATOR_ADDRESS", None)
    if compilation_cache:
        env.update(JAX_COMPILATION_CACHE_DIR=str(compilation_cache),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


class Job:
    """N processes of ``scripts/<script>`` with ``args`` (plus, when N > 1, the distributed
    flags and ``--heartbeat_timeout_s``); ``extra_args[i]`` are appended for process i."""

    def __init__(self, script: str, args, *, processes: int, devices: int, log_dir,
                 heartbeat_timeout_s: int = 10, extra_args=None, compilation_cache=None):
        self.log_dir = str(log_dir)
        os.makedirs(self.log_dir, exist_ok=True)
        self.processes, self.files = [], []
        port = free_port()
        for i in range(processes):
            cmd = [sys.executable, os.path.join(REPO, "scripts", script), *map(str, args)]
            if processes > 1:
                cmd += [f"--coordinator_address=127.0.0.1:{port}",
                        f"--num_processes={processes}", f"--process_id={i}",
                        f"--heartbeat_timeout_s={heartbeat_timeout_s}"]
            if extra_args:
                cmd += [str(a) for a in extra_args[i]]
            out = open(os.path.join(self.log_dir, f"process_{i}.out"), "w")
            err = open(os.path.join(self.log_dir, f"process_{i}.err"), "w")
            self.files.append((out, err))
            self.processes.append(subprocess.Popen(
                cmd, cwd=REPO, env=process_env(devices, compilation_cache), stdout=out,
                stderr=err))

    def output(self, i: int) -> tuple[str, str]:
        """(stdout, stderr) of process ``i`` so far."""
        texts = []
        for kind in ("out", "err"):
            with open(os.path.join(self.log_dir, f"process_{i}.{kind}"), errors="replace") as f:
                texts.append(f.read())
        return texts[0], texts[1]

    def signal(self, i: int, sig: int) -> None:
        """Sends ``sig`` to process ``i`` only."""
        self.processes[i].send_signal(sig)

    def wait_for_output(self, i: int, pattern: str, timeout_s: float) -> re.Match:
        """Waits until process ``i``'s stdout or stderr (absl logs) matches ``pattern``; fails
        (killing the job) when it does not within ``timeout_s`` or a process exits first."""
        deadline = time.monotonic() + timeout_s
        while True:
            match = re.search(pattern, "\n".join(self.output(i)))
            if match:
                return match
            ended = [k for k, p in enumerate(self.processes) if p.poll() is not None]
            if ended or time.monotonic() > deadline:
                why = (f"process(es) {ended} exited" if ended
                       else f"not within {timeout_s:.0f} s")
                self.kill()
                raise AssertionError(f"waiting for {pattern!r} on process {i}: {why}\n"
                                     + self._tails())
            time.sleep(0.2)

    def wait(self, timeout_s: float, check: bool = True) -> list[Result]:
        """Waits for every process (all killed when ``timeout_s`` passes, then a failure with
        their output tails); with ``check``, fails unless every process exited 0."""
        deadline = time.monotonic() + timeout_s
        for p in self.processes:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(f"the job did not end within {timeout_s:.0f} s; killed\n"
                                     + self._tails()) from None
        results = self._results()
        if check and any(r.returncode for r in results):
            raise AssertionError("exit codes " + str([r.returncode for r in results]) + "\n"
                                 + self._tails())
        return results

    def kill(self) -> None:
        """SIGKILL to every process still running (ours only, by pid)."""
        for p in self.processes:
            if p.poll() is None:
                p.send_signal(signal_lib.SIGKILL)
        for p in self.processes:
            p.wait()
        self._close()

    def _results(self) -> list[Result]:
        self._close()
        return [Result(i, p.returncode, *self.output(i)) for i, p in enumerate(self.processes)]

    def _close(self) -> None:
        for out, err in self.files:
            out.close()
            err.close()

    def _tails(self) -> str:
        lines = []
        for i, p in enumerate(self.processes):
            out, err = self.output(i)
            lines.append(f"--- process {i} (exit {p.poll()}) stdout tail:\n{out[-TAIL:]}\n"
                         f"--- process {i} stderr tail:\n{err[-TAIL:]}")
        return "\n".join(lines)


def run(script: str, args, *, processes: int, devices: int, log_dir, timeout_s: float,
        **kwargs) -> list[Result]:
    """Starts a :class:`Job` and waits for it (every process must exit 0)."""
    return Job(script, args, processes=processes, devices=devices, log_dir=log_dir,
               **kwargs).wait(timeout_s)
