"""A worker on another machine (TUNEBOARD_SERVER_URL set): it shares the database with the web server but
no disk. Before an attempt it fetches the run's dataset rows and the checkpoints the server holds (so a
run lost on one machine resumes on another from the last checkpoint the server received); while the
training process works, `ArtifactSync` sends the log and each complete checkpoint as it appears; at the
end it sends the adapter before the run is marked finished. The generation host fetches the adapters
it is asked to answer with. Files travel as uncompressed tar streams (`app.runs.folder.pack`)."""

from __future__ import annotations

import logging
import shutil
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import httpx

from app.config import Settings
from app.datasets.store import ROWS_FILE, dataset_dir
from app.db import Database, PassingFault
from app.models import Run
from app.playground import TARGET_ID, has_adapter
from app.processes import Backoff
from app.runs import evaluation
from app.runs.folder import RunFolder, pack
from app.workers import LOG_OFFSET_HEADER, WORKER_HEADER

log = logging.getLogger("tuneboard.worker")
LOG_CHUNK = 1 << 20


class ServerError(PassingFault):
    """The web server could not be reached, or refused; the text says which and why. `lasting`: asking
    again will not help (it refused the request, or what it sent cannot be read)."""

    def __init__(self, message: str, *, lasting: bool = False):
        super().__init__(message)
        self.lasting = lasting


class LostRun(ServerError):
    """The server says this worker no longer trains the run (409): it was requeued elsewhere."""


class Server:
    """The web server, as a worker talks to it: the token and this worker's name on every request."""

    def __init__(self, settings: Settings, worker_id: str):
        if not settings.server_url:
            raise ValueError("no TUNEBOARD_SERVER_URL")
        headers = {WORKER_HEADER: worker_id}
        if settings.token:
            headers["Authorization"] = f"Bearer {settings.token.get_secret_value()}"
        self.settings = settings
        self.url = settings.server_url.rstrip("/")
        self.client = httpx.Client(
            base_url=self.url, headers=headers, timeout=httpx.Timeout(30.0, read=600.0, write=600.0)
        )

    def close(self) -> None:
        self.client.close()

    def _request(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            response = self.client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ServerError(f"The web server at {self.url} could not be reached ({exc}).") from exc
        self._check(response, method, path)
        return response

    def _check(self, response: httpx.Response, method: str, path: str) -> None:
        if response.status_code == 409:
            raise LostRun(_detail(response))
        if response.status_code >= 400:
            raise ServerError(
                f"The web server answered {response.status_code} to {method} {path}: {_detail(response)}",
                lasting=response.status_code < 500 and response.status_code not in (408, 429),
            )

    def _download(self, path: str, into) -> None:
        try:
            with self.client.stream("GET", path) as response:
                if response.status_code >= 400:
                    response.read()
                    self._check(response, "GET", path)
                for chunk in response.iter_bytes(LOG_CHUNK):
                    into.write(chunk)
        except httpx.HTTPError as exc:
            raise ServerError(f"The web server at {self.url} could not be reached ({exc}).") from exc
        into.seek(0)

    # ---- before an attempt ------------------------------------------------------------------------------
    def dataset_rows(self, dataset_id: int) -> Path:
        """The dataset's normalised rows in this worker's data folder, fetched once (a dataset's rows never
        change, and its id is never reused)."""
        path = dataset_dir(self.settings, dataset_id) / ROWS_FILE
        if path.is_file():
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, delete=False, suffix=".part") as part:
            try:
                self._download(f"/api/datasets/{dataset_id}/rows.jsonl", part)
            except BaseException:
                Path(part.name).unlink(missing_ok=True)
                raise
        Path(part.name).rename(path)
        return path

    def fetch_checkpoints(self, run_id: int, folder: RunFolder) -> list[int]:
        """Replace this machine's checkpoints of the run by those the server holds (the server's are what
        the last attempt, on whichever machine, got to send). Returns their steps."""
        shutil.rmtree(folder.checkpoints_dir, ignore_errors=True)
        steps = [c["step"] for c in self._request("GET", f"/api/runs/{run_id}/checkpoints").json()]
        for step in steps:
            self._fetch_into(f"/api/runs/{run_id}/checkpoints/{step}.tar", folder, step)
        return steps

    def _fetch_into(self, path: str, folder: RunFolder, step: int | None) -> None:
        with tempfile.TemporaryFile(dir=self.settings.tmp_dir) as body:
            self._download(path, body)
            try:
                if step is None:
                    folder.store_adapter(body)
                else:
                    folder.store_checkpoint(step, body)
            except (tarfile.TarError, ValueError) as exc:
                message = f"What the web server sent for {path} cannot be read ({exc})."
                raise ServerError(message, lasting=True) from exc

    # ---- during and after an attempt -------------------------------------------------------------------
    def push_log(self, run_id: int, data: bytes, offset: int) -> None:
        headers = {LOG_OFFSET_HEADER: str(offset)}
        self._request("POST", f"/api/runs/{run_id}/log", content=data, headers=headers)

    def push_checkpoint(self, run_id: int, folder: RunFolder, step: int, keep: list[int]) -> None:
        query = ",".join(str(s) for s in keep)
        self._push(f"/api/runs/{run_id}/checkpoints/{step}.tar?keep={query}", folder.checkpoint(step).path)

    def push_adapter(self, run_id: int, folder: RunFolder) -> None:
        self._push(f"/api/runs/{run_id}/adapter.tar", folder.adapter)

    def push_export(self, export_id: int, folder: Path) -> None:
        """A finished export's folder, to be stored on the web server (where it is downloaded)."""
        self._push(f"/api/exports/{export_id}/files.tar", folder)

    def fetch_adapter(self, run_id: int, step: int) -> None:
        """The run's final adapter (step 0) or that checkpoint, into this machine's run folder, unless it
        is here already (neither changes once made). ServerError when it cannot be fetched."""
        if has_adapter(self.settings, run_id, step or None):
            return
        what = "adapter.tar" if step == 0 else f"checkpoints/{step}.tar"
        self._fetch_into(f"/api/runs/{run_id}/{what}", self.settings.run_folder(run_id), step or None)

    def _push(self, path: str, source: Path) -> None:
        with tempfile.TemporaryFile(dir=self.settings.tmp_dir) as body:
            pack(source, body)
            body.seek(0)
            self._request("PUT", path, content=body, headers={"Content-Type": "application/x-tar"})

    # ---- the generation host ---------------------------------------------------------------------------
    def fetch_adapters(self, db: Database, target_ids: list[str]) -> None:
        """Fetch each run adapter named in `target_ids` (run-3, run-3-step-40, run-3-best) that this
        machine does not hold yet. A finished run's adapter and its complete checkpoints never change.
        A fetch that fails is logged; resolving the target then says it cannot answer."""
        wanted = []
        with db.session() as session:  # closed before any download
            for target_id in target_ids:
                match = TARGET_ID.match(target_id)
                if match is None:
                    continue
                run_id = int(match.group(1))
                step = int(match.group(2)) if match.group(2) else None
                if match.group(3):
                    run = session.get(Run, run_id)
                    step = evaluation.best_step(session=session, run=run) if run is not None else None
                    if step is None:
                        continue  # resolving says why
                wanted.append((target_id, run_id, step))
        for target_id, run_id, step in wanted:
            if has_adapter(self.settings, run_id, step):
                continue
            what = "adapter.tar" if step is None else f"checkpoints/{step}.tar"
            try:
                self._fetch_into(f"/api/runs/{run_id}/{what}", self.settings.run_folder(run_id), step)
            except (ServerError, OSError) as exc:
                log.warning("could not fetch %s from the web server: %s", target_id, exc)


def _detail(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail")
    except ValueError:
        return response.text[:300]
    if isinstance(detail, list):
        return "; ".join(str(p.get("message", p)) if isinstance(p, dict) else str(p) for p in detail)
    return str(detail)


class ArtifactSync:
    """Beside a running attempt: sends the log's new bytes and each new complete checkpoint to the web
    server every `interval` seconds, in its own thread (an upload never delays a heartbeat). `close` makes
    a last pass and, when asked, sends the final adapter; it raises if that cannot be done."""

    def __init__(self, server: Server, run_id: int, folder: RunFolder, interval: float = 2.0):
        self.server, self.run_id, self.folder, self.interval = server, run_id, folder, interval
        self.log_sent = 0
        self.sent = {c.step for c in folder.complete_checkpoints()}  # fetched from the server just now
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"sync-run-{run_id}", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._pass(quiet=True)
            except Exception:  # a surprise must not end the sending: the next pass tries again
                log.exception("run %d: sending files failed", self.run_id)

    def _pass(self, *, quiet: bool) -> None:
        if self.lost:
            return
        try:
            self._send_log()
            complete = [c.step for c in self.folder.complete_checkpoints()]
            for step in complete:
                if step not in self.sent:
                    self.server.push_checkpoint(self.run_id, self.folder, step, keep=complete)
                    self.sent.add(step)
                    log.info("run %d: checkpoint %d sent to the web server", self.run_id, step)
        except LostRun as exc:
            self.lost = True
            log.warning("run %d: %s", self.run_id, exc)
        except (ServerError, OSError) as exc:  # a checkpoint rotated away mid-send, the server unreachable
            if not quiet:
                raise
            log.warning("run %d: sending files failed, trying again shortly (%s)", self.run_id, exc)

    def _send_log(self) -> None:
        try:
            size = self.folder.log.stat().st_size
        except FileNotFoundError:
            return
        with open(self.folder.log, "rb") as f:
            while self.log_sent < size:
                f.seek(self.log_sent)
                data = f.read(min(LOG_CHUNK, size - self.log_sent))
                self.server.push_log(self.run_id, data, self.log_sent)
                self.log_sent += len(data)

    def stop(self) -> None:
        """Stop the sending thread (idempotent)."""
        self._stop.set()
        self._thread.join()

    def close(self, *, adapter: bool, tries: int = 5) -> None:
        """Stop the thread, send what is left, then the adapter (`adapter`), trying `tries` times with
        backoff. Raises ServerError when the server cannot take them."""
        self.stop()
        backoff = Backoff()
        for attempt in range(tries):
            if self.lost:
                return
            try:
                self._pass(quiet=False)
                if adapter and self.folder.has_adapter:
                    self.server.push_adapter(self.run_id, self.folder)
                return
            except (ServerError, OSError) as exc:
                if attempt == tries - 1:
                    raise ServerError(str(exc)) from exc
                delay = backoff.next()
                log.warning("run %d: sending files failed (%s); again in %.0f s", self.run_id, exc, delay)
                time.sleep(delay)
