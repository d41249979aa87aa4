"""`tuneboard serve`: the web server and a worker start together and stop together."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from app.config import PROJECT_ROOT, isolated_env
from tests.servers import running


def group_members(pgid: int) -> list[str]:
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) == pgid:
                members.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except (ProcessLookupError, FileNotFoundError, PermissionError):
            continue
    return members


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
