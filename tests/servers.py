"""Start real Tuneboard processes for tests, and always stop them."""

from __future__ import annotations

import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

from app.config import PROJECT_ROOT, isolated_env
from app.processes import free_port, stop_process

# A worker that notices things in well under a second, on one thread, without converting the bundled GGUF:
# what tests that train through real processes give it.
FAST_WORKER = {
    "TUNEBOARD_HEARTBEAT_SECONDS": "0.5",
    "TUNEBOARD_PREPARE_MODELS": "false",
    "TUNEBOARD_TORCH_THREADS": "1",
}


@contextmanager
def running(
    command: str,
    data_dir: Path,
    *,
    log: Path,
    timeout: float = 60.0,
    env_extra: dict | None = None,
    port_flag: bool = False,
):
    """Run `tuneboard <command>` on a free port (given as TUNEBOARD_PORT, or as `--port` with `port_flag`);
    yields (base_url, process)."""
    port = free_port()
    # tests that chat turn the generation host on
    env = isolated_env(data_dir, **{"TUNEBOARD_GENERATION": "false", **(env_extra or {})})
    if not port_flag:
        env["TUNEBOARD_PORT"] = str(port)
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "app.cli", command, *(["--port", str(port)] if port_flag else [])],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"tuneboard {command} exited early:\n{log.read_text()}")
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"tuneboard {command} did not become healthy:\n{log.read_text()}")
            time.sleep(0.2)
        yield base, process
    finally:
        stop(process)


@contextmanager
def running_worker(data_dir: Path, env_extra: dict[str, str], *, log: Path, cwd: Path = PROJECT_ROOT):
    """Run `tuneboard worker` in its own process group (in `cwd`); yields the process."""
    env = isolated_env(data_dir, **{"TUNEBOARD_GENERATION": "false", **env_extra})
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "worker"],
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield process
    finally:
        stop(process)


def stop(process: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM to the process, then SIGKILL for its whole process group if it does not end in time."""
    stop_process(process, grace, group=True)
