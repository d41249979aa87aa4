"""The worker loop: prepare base models, requeue runs whose worker went silent, claim the next queued run
and supervise it; until SIGTERM or SIGINT. Beside it, the generation host (worker.gen_server) runs as a
child process, restarted if it dies."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from datetime import timedelta

from app.config import Settings
from app.db import Database
from app.runs import state
from worker.prepare import prepare_pending_models
from worker.supervise import supervise, worker_id

log = logging.getLogger("tuneboard.worker")


def run_worker(settings: Settings, *, stop: threading.Event | None = None) -> None:
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if settings.generation:
        settings.check_exposure(settings.generation_host, "the generation host")
    settings.ensure_dirs()
    db = Database(settings.sqlalchemy_url)
    me = worker_id()
    log.info("worker %s started; data in %s", me, settings.data_dir)
    host = GenerationHost(settings, stop) if settings.generation else None
    try:
        while not stop.is_set():
            if not work_once(settings, db, me=me, stop=stop):
                stop.wait(settings.worker_poll_seconds)
    finally:
        if host is not None:
            host.close()
        db.dispose()
        log.info("worker stopped")


class GenerationHost:
    """Keeps `python -m worker.gen_server` running beside the worker loop until the worker stops."""

    RESTART_DELAY = 5.0

    def __init__(self, settings: Settings, stop: threading.Event):
        self.settings, self.stop = settings, stop
        self.process = self._start()
        self.watcher = threading.Thread(target=self._watch, name="generation-host", daemon=True)
        self.watcher.start()

    def _start(self) -> subprocess.Popen:
        env = dict(os.environ, TUNEBOARD_DATA_DIR=str(self.settings.data_dir))
        if self.settings.database_url:
            env["TUNEBOARD_DATABASE_URL"] = self.settings.database_url
        log.info("generation host starting on port %d", self.settings.generation_port)
        return subprocess.Popen([sys.executable, "-m", "worker.gen_server"], env=env)

    def _watch(self) -> None:
        while not self.stop.wait(self.RESTART_DELAY):
            code = self.process.poll()
            if code is not None:
                log.warning("generation host exited with code %s; starting it again", code)
                self.process = self._start()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def work_once(settings: Settings, db: Database, *, me: str, stop: threading.Event) -> bool:
    """One pass of the loop. Returns whether it did something (then it looks again at once)."""
    if settings.prepare_models:
        prepare_pending_models(settings, db, stop=stop)
    with db.write_session() as session:
        requeued = state.requeue_stale(
            session=session, stale_after=timedelta(seconds=settings.stale_after_seconds)
        )
    if requeued:
        log.warning("requeued runs whose worker stopped responding: %s", requeued)
    if stop.is_set():
        return False
    with db.write_session() as session:
        run = state.claim_next(session=session, worker_id=me)
    if run is None:
        return False
    supervise(settings, db, run, me=me, stop=stop)
    return True
