"""Does a default run learn? A new user's path through `tuneboard serve`: upload the demo catalogue (made-up
facts about an island no model has seen), launch a run with no settings changed on the bundled model, wait,
and read its scored answers: the base model's, then each checkpoint's, on held-out and training rows.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from app.config import PROJECT_ROOT, isolated_env
from app.model_registry import BUNDLED_ID
from bench.generation import free_port

DEMO = PROJECT_ROOT / "data" / "examples" / "demo_alpaca.json"


def learning_benchmark(model_dir: Path, threads: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="tuneboard-learning-") as folder:
        data = Path(folder) / "data"
        (data / "models").mkdir(parents=True)
        (data / "models" / BUNDLED_ID).symlink_to(model_dir, target_is_directory=True)  # converted once
        port = free_port()
        env = isolated_env(
            data, TUNEBOARD_PORT=str(port), TUNEBOARD_GENERATION="false", TUNEBOARD_TORCH_THREADS=str(threads)
        )
        server = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve"],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            for _ in range(240):
                try:
                    if httpx.get(f"{base}/healthz").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
            files = {"file": (DEMO.name, DEMO.read_bytes())}
            dataset = httpx.post(f"{base}/api/datasets", files=files).json()["id"]
            run = httpx.post(f"{base}/api/runs", json={"dataset_id": dataset}).json()
            started = time.time()
            while (status := httpx.get(f"{base}/api/runs/{run['id']}").json())["status"] not in (
                "succeeded",
                "failed",
                "cancelled",
            ):
                time.sleep(2)
            report = httpx.get(f"{base}/api/runs/{run['id']}/evaluation").json()
            return {
                "status": status["status"],
                "error": status["error"],
                "wall_seconds": time.time() - started,
                "total_steps": run["config"]["total_steps"],
                "report": report,
            }
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)


def report_learning(result: dict) -> str:
    report = result["report"]
    lines = [
        f"\nLearning: a default run ({result['total_steps']} steps) on the demo catalogue with the bundled "
        f"model through `tuneboard serve`: {result['status']} in {result['wall_seconds']:.0f} s "
        f"(evaluation included), best checkpoint step {report['best_step']}",
        "",
        "| step | held-out chrF | training-row chrF | training rows exactly right | evaluation seconds |",
        "|---|---|---|---|---|",
    ]
    for entry in report["steps"]:
        held, train = entry.get("validation"), entry.get("train")
        label = "base model" if entry["step"] == 0 else str(entry["step"])
        lines.append(
            f"| {label} | {held['chrf'] if held else '—'} | {train['chrf'] if train else '—'} "
            f"| {train['exact'] if train else '—'}% | {entry['seconds']} |"
        )
    return "\n".join(lines)
