"""The worker loop: wake every few seconds and do what is pending, until SIGTERM or SIGINT."""

from __future__ import annotations

import logging
import signal
import threading

from app.config import Settings
from app.db import Database
from worker.prepare import prepare_pending_models

log = logging.getLogger("tuneboard.worker")


def run_worker(settings: Settings, *, stop: threading.Event | None = None) -> None:
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings.ensure_dirs()
    db = Database(settings)
    log.info("worker started; data in %s", settings.data_dir)
    try:
        while not stop.is_set():
            prepare_pending_models(settings, db, stop=stop)
            stop.wait(settings.worker_poll_seconds)
    finally:
        db.dispose()
        log.info("worker stopped")
