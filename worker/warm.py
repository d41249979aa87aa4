"""Training processes that start warm: a worker's one-process runs are forked from a server process that has
imported torch, transformers and PEFT once (Python's `multiprocessing` forkserver, with those modules
preloaded), instead of a fresh interpreter that imports them again for every run — about 7 s on a laptop
core, more on a busy one, most of what a short run costs.

A warm child is a training process like any other: its own session (the supervisor signals its process
group), its output appended to the run's log, the worker's environment with the run's additions, and the
run's exit code. Settings the libraries read when imported (cache folders, offline switches, devices) are
those of the worker when the server started: should the worker's own environment change in these since,
a run starts cold as before (`fresh_environment`). The run's own additions (its thread count) are read
by the trainer when it starts. Runs trained by several processes keep `accelerate launch`.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger("tuneboard.worker")

# What the server imports once: what every training process imports before it reads its run.yaml (the
# trainer module brings torch and transformers' Trainer; peft its tuners).
PRELOAD = ["worker.train", "worker.trainer", "worker.evaluate", "worker.callbacks", "peft", "accelerate"]
# Environment read when those modules are imported (cache folders, offline switches, devices)
IMPORT_TIME = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TORCH", "PYTORCH_", "CUDA_", "MKL_", "PEFT_")

_lock = threading.Lock()
_server: dict[str, str] | None = None  # the worker's import-time environment when the server started


class WarmProcess:
    """A warm child, with the part of `subprocess.Popen` the supervisor uses."""

    def __init__(self, process: multiprocessing.process.BaseProcess, args: list[str]):
        assert process.pid is not None, "a started process has its id"
        self._process = process
        self.args = args
        self.pid: int = process.pid

    def poll(self) -> int | None:
        """The exit code once the child has ended. The fork server reports it; should the server itself
        have died (it answers 255 then), the child is still running for as long as its process lives."""
        code = self._process.exitcode
        if code == LOST_SERVER and _alive(self.pid):
            return None
        return code

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        self._process.join(timeout)
        while (code := self.poll()) is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(self.args, timeout or 0)
            time.sleep(0.2)
        return code

    def terminate(self) -> None:
        self._process.terminate()

    def kill(self) -> None:
        self._process.kill()


LOST_SERVER = 255  # multiprocessing's exit code for a child whose fork server stopped answering


def _alive(pid: int) -> bool:
    """Whether the process `pid` still runs (a zombie has ended; the fork server may no longer reap it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True
    return state != "Z"


def import_time() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(IMPORT_TIME)}


def fresh_environment() -> bool:
    """Whether a child may be forked from the server: it is not started yet (it starts with the worker's
    environment as it is now), or was started with the same import-time settings."""
    return _server is None or _server == import_time()


def _context() -> multiprocessing.context.ForkServerContext:
    global _server
    context = multiprocessing.get_context("forkserver")
    assert isinstance(context, multiprocessing.context.ForkServerContext)
    if _server is None:
        context.set_forkserver_preload(PRELOAD)
        _server = import_time()
    return context


def _child(argv: list[str], env: dict[str, str], log_path: str) -> None:
    """In the forked child: become a process group of its own, write to the run's log, take the run's
    environment, train, and exit with the trainer's code (the interpreter's exit handlers run first)."""
    os.setsid()
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)
    os.environ.clear()
    os.environ.update(env)
    sys.argv = ["worker.train", *argv]
    from worker.train import main

    try:
        code = main(argv)
    finally:
        atexit._run_exitfuncs()
    sys.exit(code)


def start(argv: list[str], env: dict[str, str], log_path: Path) -> WarmProcess | None:
    """`python -m worker.train ARGV` with `env`, forked warm; None when this machine cannot (no fork), or
    when the worker's import-time environment has changed (the caller then starts a fresh interpreter)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return None
    with _lock:
        if not fresh_environment():
            return None
        try:
            process = _context().Process(
                target=_child, args=(argv, env, str(log_path)), name="tuneboard-train", daemon=False
            )
            process.start()
        except Exception as exc:  # noqa: BLE001 - a server that failed to start: a fresh interpreter does it
            log.warning("could not start the training process warm (%s); starting it afresh", exc)
            return None
    return WarmProcess(process, [sys.executable, "-m", "worker.train", *argv])
