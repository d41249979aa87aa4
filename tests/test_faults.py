"""Fault tests with real processes: nothing a user does, and no passing fault, stops Tuneboard training.

- a worker started before the web server (empty data directory) waits for the schema, then trains;
- a worker killed under `tuneboard serve` is restarted, and its run resumes from the last checkpoint;
- a database locked for longer than the busy timeout is a passing fault the worker logs and survives;
- 20 concurrent uploads, a training run and 50 event-stream clients: no 500 and no "database is locked";
- a 1,000,000-row upload while a run trains: the run succeeds, the worker never exits, /healthz answers.
"""

from __future__ import annotations

import io
import json
import os
import signal
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import DEMO_DATASET, NO_SCORING
from tests.servers import FAST_WORKER, running, running_worker
from tests.waiting import wait_until

pytestmark = pytest.mark.faults

FAST = FAST_WORKER | {"TUNEBOARD_STALE_AFTER_SECONDS": "5"}


def prepare(base: str, tiny_model_dir: Path) -> tuple[str, int]:
    model = httpx.post(f"{base}/api/models", json={"path": str(tiny_model_dir)}).json()["id"]
    files = {"file": ("demo.json", DEMO_DATASET.read_bytes())}
    dataset = httpx.post(f"{base}/api/datasets", files=files).json()["id"]
    return model, dataset


def launch(base: str, model: str, dataset: int, **training) -> int:
    """Queue a run of the tiny model that scores no answers (no test here is about them)."""
    body = {
        "dataset_id": dataset,
        "base_model": model,
        "training": {"dtype": "float32", **training},
        "evaluation": NO_SCORING,
    }
    response = httpx.post(f"{base}/api/runs", json=body)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def finished(base: str, run: int) -> dict | None:
    body = httpx.get(f"{base}/api/runs/{run}").json()
    return body if body["status"] in ("succeeded", "failed", "cancelled") else None


def test_a_worker_started_before_the_web_server_waits_then_trains(tmp_path, tiny_model_dir):
    data = tmp_path / "data"
    with running_worker(data, FAST, log=tmp_path / "worker.log") as worker:
        wait_until(
            lambda: "waiting for the database schema" in (tmp_path / "worker.log").read_text(), 30, "the wait"
        )
        time.sleep(1.5)
        assert worker.poll() is None, (tmp_path / "worker.log").read_text()
        with running("web", data, log=tmp_path / "web.log") as (base, _):
            model, dataset = prepare(base, tiny_model_dir)
            run = launch(base, model, dataset, max_steps=3)
            done = wait_until(lambda: finished(base, run), what="the first run")
            assert done["status"] == "succeeded", done["error"]
            assert worker.poll() is None
    assert (tmp_path / "worker.log").read_text().count("waiting for the database schema") == 1


def test_serve_restarts_a_killed_worker_and_the_run_resumes(tmp_path, tiny_model_dir):
    data = tmp_path / "data"
    with running("serve", data, log=tmp_path / "serve.log", env_extra=FAST) as (base, serve):
        model, dataset = prepare(base, tiny_model_dir)
        run = launch(base, model, dataset, max_steps=80, logging_steps=5, save_steps=20)
        checkpoints = data / "runs" / str(run) / "checkpoints"
        wait_until(lambda: list(checkpoints.glob("checkpoint-*/TUNEBOARD_COMPLETE")), what="a checkpoint")
        workers = [int(m.split()[0]) for m in worker_processes(serve.pid)]
        assert len(workers) == 1
        os.kill(workers[0], signal.SIGKILL)
        wait_until(
            lambda: [p for p in worker_processes(serve.pid) if int(p.split()[0]) != workers[0]],
            30,
            "a new worker",
        )
        done = wait_until(lambda: finished(base, run), timeout=240, what="the resumed run")
        assert done["status"] == "succeeded", done["error"]
        assert done["attempts"] == 2 and done["resumed_from_step"] >= 20
        steps = [
            p["step"] for p in httpx.get(f"{base}/api/runs/{run}/metrics").json() if p["kind"] == "train"
        ]
        assert steps == list(range(5, 81, 5))
        page = httpx.get(f"{base}/workers").text
        assert "not responding" in page or "stopped" in page  # the killed one, beside the new one
    assert "the worker exited (killed by SIGKILL); starting it again" in (tmp_path / "serve.log").read_text()


def worker_processes(pgid: int) -> list[str]:
    """'pid cmdline' of each `python -m worker` in the process group."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                if os.getpgid(int(entry.name)) == pgid and cmdline.rstrip().endswith("-m worker"):
                    found.append(f"{entry.name} {cmdline}")
            except (ProcessLookupError, FileNotFoundError, PermissionError):
                continue
    return found


def test_a_locked_database_is_a_passing_fault(tmp_path, tiny_model_dir):
    data = tmp_path / "data"
    with running("web", data, log=tmp_path / "web.log") as (base, _):
        model, dataset = prepare(base, tiny_model_dir)
        with running_worker(data, FAST, log=tmp_path / "worker.log") as worker:
            wait_until(
                lambda: (
                    "Workers" in httpx.get(f"{base}/workers").text
                    and "idle" in httpx.get(f"{base}/workers").text
                ),
                30,
                "the worker",
            )
            blocker = sqlite3.connect(data / "tuneboard.db", timeout=1)
            blocker.execute("BEGIN EXCLUSIVE")  # longer than the 10 s busy timeout
            wait_until(
                lambda: "passing fault" in (tmp_path / "worker.log").read_text(),
                40,
                "the fault to be noticed",
            )
            blocker.rollback()
            blocker.close()
            run = launch(base, model, dataset, max_steps=3)
            done = wait_until(lambda: finished(base, run), what="a run after the fault")
            assert done["status"] == "succeeded" and worker.poll() is None
            assert (
                "database is locked" in httpx.get(f"{base}/workers").text
            )  # shown as the last passing fault


def test_many_writers_at_once_no_500_and_no_lock_errors(tmp_path, tiny_model_dir):
    data = tmp_path / "data"
    with running("serve", data, log=tmp_path / "serve.log", env_extra=FAST) as (base, _):
        model, dataset = prepare(base, tiny_model_dir)
        run = launch(base, model, dataset, max_steps=60, logging_steps=1)
        rows = [{"instruction": f"question {i} " * 20, "output": f"answer {i} " * 40} for i in range(8000)]
        content = "\n".join(json.dumps(r) for r in rows).encode()  # about 2.7 MB
        stop = threading.Event()
        events: list[int] = []

        def stream(_):
            with httpx.Client(timeout=30) as client:
                with client.stream("GET", f"{base}/api/runs/{run}/events") as response:
                    events.append(response.status_code)
                    for _line in response.iter_lines():
                        if stop.is_set():
                            return

        def upload(i):
            files = {"file": (f"many-{i}.jsonl", io.BytesIO(content))}
            return httpx.post(f"{base}/api/datasets", files=files, timeout=120).status_code

        with ThreadPoolExecutor(max_workers=72) as pool:
            streams = [pool.submit(stream, i) for i in range(50)]
            codes = list(pool.map(upload, range(20)))
            done = wait_until(lambda: finished(base, run), what="the run")
            stop.set()
            for future in streams:
                future.result(timeout=60)
        assert codes == [201] * 20
        assert events == [200] * 50
        assert done["status"] == "succeeded", done["error"]
        assert len(httpx.get(f"{base}/api/datasets").json()) == 21
    log = (tmp_path / "serve.log").read_text()
    assert "database is locked" not in log and " 500 " not in log


def test_a_million_row_upload_while_a_run_trains(tmp_path, tiny_model_dir):
    data = tmp_path / "data"
    with running("serve", data, log=tmp_path / "serve.log", env_extra=FAST) as (base, serve):
        model, dataset = prepare(base, tiny_model_dir)
        run = launch(base, model, dataset, max_steps=80, logging_steps=1)
        line = b'{"instruction": "What is row %d about?", "output": "Row %d is about Quillmere."}\n'
        content = b"".join(line % (i, i) for i in range(1_000_000))  # about 39 MB
        slowest = []
        result = {}

        def upload():
            files = {"file": ("million.jsonl", io.BytesIO(content))}
            result["upload"] = httpx.post(f"{base}/api/datasets", files=files, timeout=600)

        thread = threading.Thread(target=upload)
        thread.start()
        while thread.is_alive():
            started = time.monotonic()
            assert httpx.get(f"{base}/healthz", timeout=10).status_code == 200
            slowest.append(time.monotonic() - started)
            time.sleep(0.2)
        thread.join()
        assert result["upload"].status_code == 201, result["upload"].text
        assert result["upload"].json()["rows"] == 1_000_000
        done = wait_until(lambda: finished(base, run), timeout=300, what="the run")
        assert done["status"] == "succeeded", done["error"]
        assert len(worker_processes(serve.pid)) == 1
        assert max(slowest) < 5, sorted(slowest)[-5:]
    assert "starting it again" not in (tmp_path / "serve.log").read_text()  # the worker never died
