"""A short job in a fresh interpreter (a GGUF conversion, an export): started, watched, stopped when the
worker stops, its error output kept for the sentence that says why it failed; and, in the child, ending
when the worker that started it is gone."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from app.processes import stop_process

log = logging.getLogger("tuneboard.worker")


@dataclass(frozen=True)
class Ended:
    code: int | None  # None: stopped before it finished (the worker is stopping, or `tick` said so)
    stderr: str

    def reason(self, marker: str = "") -> str:
        """The child's own sentence: the line after `marker` when it printed one, else its last line."""
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        if marker:
            said = [line.split(marker, 1)[1].strip() for line in lines if marker in line]
            if said:
                return said[-1]
        return next((line for line in reversed(lines) if not line.startswith(" ")), f"exit code {self.code}")


def run_child(
    args: list[str],
    *,
    stop: threading.Event | None = None,
    env: dict[str, str] | None = None,
    tick: Callable[[], bool] | None = None,
    every: float = 0.5,
) -> Ended:
    """Run `args` until it exits. Every `every` seconds `tick` (when given) is called; False from it, or
    `stop` being set, ends the child (SIGTERM, then SIGKILL after 10 s)."""
    child = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    output: list[str] = []
    stderr = child.stderr
    assert stderr is not None  # opened with stderr=PIPE

    def drain() -> None:
        with stderr as stream:
            output.append(stream.read())

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    stop = stop or threading.Event()
    while child.poll() is None:
        if stop.wait(every) or (tick is not None and child.poll() is None and not tick()):
            stop_process(child, 10)
            reader.join(timeout=5)
            return Ended(None, "".join(output))
    reader.join(timeout=5)
    return Ended(child.returncode, "".join(output))


def stop_with_parent(what: str) -> None:
    """In a child: end this process (SIGTERM, so `finally` blocks run) when the worker that started it is
    gone, even after a SIGKILL, so that it does not go on working for nobody."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(2)
        log.warning("the worker that started this %s is gone; stopping", what)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


@contextmanager
def beating(tick: Callable[[], object], every: float, name: str = "heartbeat") -> Iterator[None]:
    """Call `tick` every `every` seconds from a thread while the caller is busy with something long
    (converting a model, moving files), so that nobody takes the worker or its job for lost."""
    done = threading.Event()

    def beat() -> None:
        while not done.wait(every):
            tick()

    thread = threading.Thread(target=beat, name=name, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=10)


def job_tick(
    db, *, me: str, kind, job_id: int, status: str, stop: threading.Event, cancelled: threading.Event
) -> Callable[[], bool]:
    """A `run_child` tick for a job whose row has `cancel_requested` (a download, a publication): the
    worker's and the job's heartbeats; False (the child is stopped) once the job is cancelled or is no
    longer this worker's. The Workers page's stop order sets `stop`."""
    from app import jobs, workers
    from app.db import PASSING_FAULTS

    def tick() -> bool:
        try:
            with db.write_session() as session:
                orders = workers.beat(session=session, worker_id=me, status=status)
                ours, cancel = jobs.beat(
                    session=session,
                    kind=kind,
                    job_id=job_id,
                    worker_id=me,
                    returning=kind.table.cancel_requested,
                )
        except PASSING_FAULTS:
            return True
        if orders.stop:
            stop.set()
        if cancel or not ours:
            cancelled.set()
        return not cancelled.is_set()

    return tick


class Cancelled(Exception):
    """The job was cancelled, or is no longer this worker's: the child stops."""


class BytesReporter:
    """Bytes moved so far, to the job's row at most twice a second through `send(session, done, speed)`
    (False from it: stop), with the speed over the last few seconds; Cancelled once the job is cancelled or
    no longer this worker's. `already`: bytes an earlier attempt moved, counted in."""

    def __init__(self, db, send: Callable[..., bool], already: int = 0):
        self.db, self.send, self.already = db, send, already
        self.last, self.samples = 0.0, [(time.monotonic(), already)]
        self.stopped = False

    def __call__(self, moved: int, *, force: bool = False) -> None:
        """`moved`: the bytes this attempt has moved."""
        from app.db import PASSING_FAULTS

        done = self.already + moved
        now = time.monotonic()
        if self.stopped:
            raise Cancelled
        if not force and now - self.last < 0.5:
            return
        self.last = now
        self.samples = [s for s in self.samples if now - s[0] < 5] + [(now, done)]
        first = self.samples[0]
        speed = (done - first[1]) / (now - first[0]) if now - first[0] > 0.2 else None
        try:
            with self.db.write_session() as session:
                going = self.send(session, done, speed)
        except PASSING_FAULTS:  # a busy database: this report is skipped, the next one tries again
            return
        if not going:
            self.stopped = True
            raise Cancelled


CANCELLED = 3  # a job child's exit code when its job was cancelled
DONE = "tuneboard-job-done:"  # before what a job child's work returned, on its last line


def job_child(
    argv: list[str] | None,
    *,
    what: str,
    table: type,
    work: Callable[..., str | None],
    sentence: Callable[[BaseException, Any], str],
    said: str,
) -> int:
    """The main of a job's child, `python -m worker.<module> ID --worker W`: it ends with the worker that
    started it, runs `work(settings, db, ID, W)`, and exits 0 (after printing `DONE` and what `work`
    returned, when it returned something), CANCELLED, or 1 after printing `said` and the sentence for the
    failure (`sentence(exc, the job's row as it was at the start, or None)`)."""
    import argparse
    import sys

    from app.config import get_settings
    from app.db import Database

    parser = argparse.ArgumentParser(description=f"One queued {what} (started by the worker).")
    parser.add_argument("job_id", type=int)
    parser.add_argument("--worker", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    stop_with_parent(what)
    settings = get_settings()
    db = Database(settings.sqlalchemy_url)
    with db.session() as session:
        row = session.get(table, args.job_id)
        if row is not None:
            session.expunge(row)
    try:
        result = work(settings, db, args.job_id, args.worker)
    except Cancelled:
        return CANCELLED
    except Exception as exc:  # noqa: BLE001 - every failure becomes its sentence
        if _caused_by_cancel(exc):  # a library that wraps what its callbacks raise
            return CANCELLED
        print(f"{said} {sentence(exc, row)}", file=sys.stderr)
        return 1
    finally:
        db.dispose()
    if result:
        print(f"{DONE} {result}", file=sys.stderr)
    return 0


def _caused_by_cancel(exc: BaseException | None) -> bool:
    seen = 0
    while exc is not None and seen < 20:
        if isinstance(exc, Cancelled):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False
