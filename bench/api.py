"""Runs launched the way users launch them: `tuneboard serve` (web server and worker) in a throwaway data
folder with the converted bundled model linked in, datasets uploaded and runs started through the JSON API.

`training_through_the_api` times whole runs: the steady training speed the run's metrics report, and the
run's wall time from POST /api/runs to "succeeded" (queue, launch, model load, warm-up, saves)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import httpx

from app.config import PROJECT_ROOT, isolated_env
from app.model_registry import BUNDLED_ID
from app.processes import free_port, stop_process


@contextmanager
def serving(model_dir: Path, threads: int) -> Iterator[tuple[str, Path]]:
    """(base URL, data folder) of a `tuneboard serve` with `threads` training threads; stopped on exit."""
    with tempfile.TemporaryDirectory(prefix="tuneboard-bench-") as folder:
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
            yield base, data
        finally:
            stop_process(server, 60, group=True)


def upload(base: str, name: str, content: bytes) -> int:
    return httpx.post(f"{base}/api/datasets", files={"file": (name, content)}).json()["id"]


def wait_for(base: str, run_id: int) -> dict:
    while (run := httpx.get(f"{base}/api/runs/{run_id}").json())["status"] not in (
        "succeeded",
        "failed",
        "cancelled",
    ):
        time.sleep(1)
    return run


def real_tokens(model_dir: Path, content: bytes, max_length: int = 1024) -> int:
    """The tokens one epoch trains on (every row, prompt and answer, cut at max_length), as the worker
    encodes them."""
    from transformers import AutoTokenizer

    from app.datasets.formats import parse_dataset
    from worker.data import encode_rows

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return encode_rows(parse_dataset(content).rows, tokenizer, "chat", max_length).tokens


def timed_run(base: str, request: dict, tokens: int) -> dict:
    """Ask for the estimate, launch the run, wait for it, and read what it cost (`tokens`: what one epoch
    trains on)."""
    estimate = httpx.post(f"{base}/api/runs/estimate", json=request).json()
    started = time.monotonic()
    launched = httpx.post(f"{base}/api/runs", json=request)
    launched.raise_for_status()
    run = wait_for(base, launched.json()["id"])
    wall = time.monotonic() - started
    metrics = [m for m in httpx.get(f"{base}/api/runs/{run['id']}/metrics").json() if m["kind"] == "train"]
    speeds = [m["tokens_per_second"] for m in metrics[1:] if m["tokens_per_second"]]  # the first warms up
    ran = datetime.fromisoformat(run["finished_at"]) - datetime.fromisoformat(run["started_at"])
    return {
        "status": run["status"],
        "error": run["error"],
        "steps": run["total_steps"],
        "steady_tokens_per_second": statistics.median(speeds) if speeds else None,
        "tokens": tokens,
        "wall_seconds": wall,
        "run_seconds": ran.total_seconds(),  # start to end, as the estimate counts it (no queue wait)
        "whole_run_tokens_per_second": tokens / wall,
        "peak_memory_mb": max((m["memory_mb"] or 0) for m in metrics) if metrics else None,
        "estimated_seconds": estimate.get("seconds"),
        "estimated_memory_mb": estimate["memory_bytes"] / 2**20 if "memory_bytes" in estimate else None,
        "config": launched.json()["config"]["training"],
    }


TUTORIAL_LORA = {"r": 8, "lora_alpha": 32, "lora_dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}


def training_through_the_api(
    model_dir: Path, threads: int, rows: list[dict], long_rows: bytes, large_model: Path
) -> dict:
    """The tutorial's LoRA and Tuneboard's defaults on the same rows (one epoch, batch 4, nothing held out,
    answer scoring off), then the defaults on long rows (the leaflets), on short and long rows mixed, and on
    a larger Llama-shaped model. Each run's duration and memory are estimated just before it launches, from
    the run before it."""
    from bench.memory import rows_of

    off = {"held_out_fraction": 0, "scored_held_out_rows": 0, "scored_train_rows": 0}
    content, mixed_rows = json.dumps(rows).encode(), json.dumps(rows_of("mixed", 32, seed=3)).encode()
    with serving(model_dir, threads) as (base, _):
        short = upload(base, "alpaca.json", content)
        long = upload(base, "leaflets.json", long_rows)
        mixed = upload(base, "mixed.json", mixed_rows)
        large = httpx.post(f"{base}/api/models", json={"path": str(large_model)}).json()["id"]
        one_epoch = {
            "training": {"num_train_epochs": 1, "per_device_train_batch_size": 4, "learning_rate": 2e-4}
        }
        by_default = {"training": {"num_train_epochs": 1}}
        larger = {"base_model": large}
        cases = [  # label, dataset, its rows, request
            ("tutorial LoRA (r8 on q_proj, v_proj)", short, content, {"peft": TUTORIAL_LORA, **one_epoch}),
            ("Tuneboard's defaults (r16 on all linear layers)", short, content, one_epoch),
            (
                "Tuneboard's defaults on long rows (the leaflets, 640-700-token answers)",
                long,
                long_rows,
                by_default,
            ),
            (
                "Tuneboard's defaults on mixed rows (one in four 700-1,000 tokens)",
                mixed,
                mixed_rows,
                by_default,
            ),
            ("larger Llama-shaped model (230M), short rows", short, content, {**larger, **one_epoch}),
            ("larger Llama-shaped model (230M), long rows", long, long_rows, {**larger, **by_default}),
        ]
        # also the first estimate's measure of this machine: a few steady steps after the first
        warm_up = {"dataset_id": short, "training": {"max_steps": 6}, "evaluation": off}
        timed_run(base, warm_up, 0)
        tokens = {dataset: real_tokens(model_dir, data) for _, dataset, data, _ in cases}  # once a dataset
        return {
            label: timed_run(base, {**request, "dataset_id": dataset, "evaluation": off}, tokens[dataset])
            for label, dataset, _, request in cases
        }
