"""Child processes, the one place that starts, keeps and stops them.

- `stop_process`: the one way to stop a child (SIGTERM, then SIGKILL after a grace period), alone or with
  the process group it leads; `signal_group` for a caller that escalates step by step itself.
- `ChildKeeper`: keep a child alive, starting it again after a delay that doubles with each quick death
  (1 s, 2 s, 4 s … at most a minute) and resets once it has stayed up for a while. `tuneboard serve`
  keeps its worker this way, and a worker its generation host (systemd's `Restart=on-failure` with a
  backoff, in a few lines).
- `free_port`: a port for a child to listen or meet on.
- `describe_exit`: how a child ended, in words."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import threading
import time
from typing import Protocol

log = logging.getLogger("tuneboard.keeper")


class Backoff:
    """Delays for retrying a failing thing: doubling from `first` to `most`; `reset` after a success."""

    def __init__(self, first: float = 1.0, most: float = 60.0):
        self.first, self.most = first, most
        self.current = first

    def next(self) -> float:
        delay = self.current
        self.current = min(self.most, self.current * 2)
        return delay

    def reset(self) -> None:
        self.current = self.first


# A child that exits with 0 stopped on purpose (asked to from the Workers page, say): it is not restarted.
# Crashes, signals and errors exit otherwise and are. (Container restart policies: `on-failure`, alike.)
STAY_DOWN = 0


class ChildKeeper:
    """Runs `command` as a child until `close()`, restarting it with backoff whenever it exits."""

    HEALTHY_AFTER = 60.0  # a child that ran this long had a passing fault: restart it quickly again

    def __init__(self, name: str, command: list[str], env: dict[str, str], *, first_delay: float = 1.0):
        self.name, self.command, self.env = name, command, env
        self.stopping = threading.Event()
        self.backoff = Backoff(first_delay)
        self.process = self._start()
        self.watcher = threading.Thread(target=self._watch, name=f"keep-{name}", daemon=True)
        self.watcher.start()

    def _start(self) -> subprocess.Popen:
        self.started = time.monotonic()
        return subprocess.Popen(self.command, env=self.env)

    def _watch(self) -> None:
        while not self.stopping.is_set():
            code = self.process.wait()
            if self.stopping.is_set():
                return
            if code == STAY_DOWN:
                log.warning("%s stopped by itself (exit code 0); not starting it again", self.name)
                return
            if time.monotonic() - self.started > self.HEALTHY_AFTER:
                self.backoff.reset()
            delay = self.backoff.next()
            log.warning("%s exited (%s); starting it again in %.0f s", self.name, describe_exit(code), delay)
            if self.stopping.wait(delay):
                return
            self.process = self._start()

    def close(self, grace: float = 15.0) -> None:
        """Stop restarting, then stop the child: SIGTERM, and SIGKILL after `grace` seconds."""
        self.stopping.set()
        stop_process(self.process, grace)


class Child(Protocol):
    """What the stoppers need of a child: a `subprocess.Popen`, or a process forked otherwise
    (worker.warm)."""

    pid: int

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def terminate(self) -> None: ...

    def kill(self) -> None: ...


def signal_group(process: Child, sig: int) -> None:
    """Send `sig` to the process group `process` leads (started with `start_new_session=True`): the
    process and every process it started. A group already gone is no error."""
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass


def stop_process(process: Child, grace: float, *, group: bool = False) -> int:
    """Stop `process` politely, then firmly: SIGTERM, and SIGKILL once `grace` seconds have passed.
    `group`: signal the whole process group it leads (a launcher and its children). Returns the exit
    code; a process that already ended is only reaped."""
    if process.poll() is None:
        if group:
            signal_group(process, signal.SIGTERM)
        else:
            process.terminate()
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            if group:
                signal_group(process, signal.SIGKILL)
            else:
                process.kill()
    return process.wait()


def free_port() -> int:
    """A TCP port free on this machine's loopback now (a server to start, a run's processes to meet on)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
