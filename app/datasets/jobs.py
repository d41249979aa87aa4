"""Statistics of large datasets, computed in the background by a child process.

A dataset's duplicates and split (`summary.json`) and its token lengths under a model (`lengths-*.json`)
are cached beside its rows. For a small dataset (few rows, a small file) the request computes them
itself (a few seconds at most). For a larger one the request starts `python -m app.datasets.stats_job`
once and answers at once with its progress; the child streams the rows in bounded memory, reports
progress in a file, writes the cache and exits, so the web process neither blocks nor keeps the memory;
its address space is capped (STATS_MEMORY_BYTES), so no dataset can take the machine's memory either.
Everything a job needs to be found again lives in files next to its cache: `<cache>.lock` (the child's
pid), `<cache>.progress`, `<cache>.error`.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from app.config import PROJECT_ROOT
from app.processes import stop_process


class StatsPending(Exception):
    """Statistics are being computed; `done` of `total` rows so far."""

    def __init__(self, done: int, total: int):
        super().__init__(f"{done:,} of {total:,} rows")
        self.done, self.total = done, total

    @property
    def percent(self) -> int:
        return int(100 * self.done / self.total) if self.total else 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": "computing",
            "done": self.done,
            "total": self.total,
            "message": f"Statistics are being computed ({self}); ask again shortly.",
        }


_children: list[subprocess.Popen] = []  # reaped on the next call; the files are the job's state
_lock = threading.Lock()


def side_file(cache: Path, suffix: str) -> Path:
    return cache.with_name(cache.name + suffix)


def start_or_poll(cache: Path, spec: dict[str, Any], total: int) -> StatsPending:
    """Make sure a job computing `cache` from `spec` is running; returns its progress. Raises ValueError
    with the job's sentence if the last attempt failed (the next call starts a new one)."""
    error = side_file(cache, ".error")
    if error.is_file():
        message = error.read_text(encoding="utf-8").strip()
        error.unlink(missing_ok=True)
        raise ValueError(message)
    with _lock:
        _children[:] = [child for child in _children if child.poll() is None]
        lock = side_file(cache, ".lock")
        if not _running(lock):
            lock.unlink(missing_ok=True)
            try:
                descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:  # another thread or process won the race: it runs the job
                return progress(cache, total)
            child = subprocess.Popen(
                [sys.executable, "-m", "app.datasets.stats_job", json.dumps({**spec, "cache": str(cache)})],
                cwd=PROJECT_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                preexec_fn=_capped,  # noqa: PLW1509 - only setrlimit between fork and exec
                env=dict(os.environ, MALLOC_ARENA_MAX="2"),  # address space the cap need not count
            )
            os.write(descriptor, str(child.pid).encode())
            os.close(descriptor)
            _children.append(child)
    return progress(cache, total)


STATS_MEMORY_BYTES = 3 << 30  # the address space a statistics job may use; past it, MemoryError


def _capped() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (STATS_MEMORY_BYTES, STATS_MEMORY_BYTES))


def progress(cache: Path, total: int) -> StatsPending:
    try:
        done = json.loads(side_file(cache, ".progress").read_text(encoding="utf-8"))["done"]
    except (OSError, ValueError, KeyError, TypeError):
        done = 0
    return StatsPending(done, total)


def _running(lock: Path) -> bool:
    """Whether the job that holds `lock` is still alive (a lock left by a crash is not)."""
    try:
        pid = int(lock.read_text() or "0")
    except (OSError, ValueError):
        return False
    if pid <= 0:  # just created by another starter that has not written the pid yet (or died doing so)
        try:
            return time.time() - lock.stat().st_mtime < 60
        except OSError:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_all(grace: float = 5.0) -> None:
    """Stop this process's running jobs (the web server is stopping); the next request starts them again."""
    with _lock:
        children = list(_children)
        _children.clear()
    for child in children:
        stop_process(child, grace)
