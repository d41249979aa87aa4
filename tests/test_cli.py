"""`tuneboard serve`: the web server and a worker start together and stop together."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from app.config import PROJECT_ROOT, isolated_env
from tests.servers import running


def group_pids(pgid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and os.getpgid(int(entry.name)) == pgid:
                pids.append(int(entry.name))
        except (ProcessLookupError, PermissionError):
            continue
    return pids


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except (FileNotFoundError, ProcessLookupError):
        return ""


def group_members(pgid: int) -> list[str]:
    return [c for c in map(cmdline, group_pids(pgid)) if c]


def test_serve_starts_web_and_worker_and_stops_both(tmp_path):
    data = tmp_path / "data"
    with running("serve", data, log=tmp_path / "serve.log") as (base, process):
        assert httpx.get(f"{base}/api/datasets").json() == []
        assert (data / "tuneboard.db").is_file()
        # The worker notices the bundled model needs converting and starts a conversion process.
        deadline = time.monotonic() + 30
        while not any("worker.prepare" in c for c in group_members(process.pid)):
            assert time.monotonic() < deadline, group_members(process.pid)
            time.sleep(0.2)
        assert any("-m worker" in c for c in group_members(process.pid))
        models = {m["id"]: m["status"] for m in httpx.get(f"{base}/api/models").json()}
        assert models["smollm2-135m-instruct"] == "preparing"
    deadline = time.monotonic() + 20
    while group_members(process.pid):
        assert time.monotonic() < deadline, group_members(process.pid)
        time.sleep(0.2)
    assert not list((data / "models").glob(".*partial*"))


def test_serve_refuses_a_server_url_its_worker_would_misuse(tmp_path):
    """`tuneboard serve`'s worker shares the web server's data folder: files must not travel to itself."""
    env = isolated_env(tmp_path / "data", TUNEBOARD_SERVER_URL="http://127.0.0.1:9")
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", "serve"], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert done.returncode != 0 and "TUNEBOARD_SERVER_URL is for a worker on another machine" in done.stderr


def test_the_judge_of_serve_on_another_port_reaches_that_server_and_nothing_else(tmp_path, monkeypatch):
    """`tuneboard serve --port X` tells its worker where the server listens: a run's judge with no URL
    calls X's own /v1 with the token, and a listener on the default port (8000) receives nothing."""
    from app.config import Settings
    from app.runs.config import JudgeParams
    from tests.servers import FAST_WORKER
    from worker.judge import Judge
    from worker.sink import Sink

    default = socket.socket()
    try:
        default.bind(("127.0.0.1", Settings.model_fields["port"].default))
    except OSError:
        pytest.skip("the default port is taken on this machine: the test needs to listen there")
    default.listen()
    default.setblocking(False)
    token = "s" * 32
    env = FAST_WORKER | {"TUNEBOARD_TOKEN": token}
    with (
        default,
        running("serve", tmp_path / "data", log=tmp_path / "serve.log", env_extra=env, port_flag=True) as (
            base,
            process,
        ),
    ):
        deadline = time.monotonic() + 30
        while not (workers := [p for p in group_pids(process.pid) if "-m worker" in cmdline(p)]):
            assert time.monotonic() < deadline, group_members(process.pid)
            time.sleep(0.2)
        worker_env = dict(
            item.split("=", 1) for item in Path(f"/proc/{workers[0]}/environ").read_text().split("\0") if item
        )
        for name, value in worker_env.items():  # the worker's settings, as its training processes see them
            if name.startswith("TUNEBOARD_"):
                monkeypatch.setenv(name, value)
        judge = Judge(JudgeParams(model="no-such-model"), Settings(), Sink())
        assert judge.url == f"{base}/v1"
        verdict = judge.grade("question", "reference", "answer")
        judge.close()
        # the dashboard answered with its own refusal (the token was accepted: not 401)
        assert verdict.score is None and "answered HTTP 404" in verdict.reason, verdict.reason
        with pytest.raises(BlockingIOError):
            default.accept()
