"""A run's start-up: the training process as the worker starts it for a run of one process (the trainer's
interpreter, directly) against the same run through `accelerate launch` (the launcher's interpreter, then
the trainer's), as every run started before. Each trains the bundled model for one step with no scoring;
the two are timed in turn, so that both see the same machine."""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from app.config import PROJECT_ROOT, Settings
from bench.data import alpaca_rows
from bench.training import tuneboard_config, write_rows
from worker.supervise import launch_command, training_env
from worker.train import write_config

REPEATS = 3


def _seconds(command: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(done.stdout[-2000:] + done.stderr[-2000:])
    return time.perf_counter() - started


def startup_benchmark(model_dir: Path, threads: int) -> dict:
    settings = Settings(torch_threads=threads)
    env = training_env(settings)
    seconds: dict[str, list[float]] = {"direct": [], "accelerate": []}
    with tempfile.TemporaryDirectory(prefix="tuneboard-startup-") as tmp:
        folder = Path(tmp)
        rows = write_rows(folder, alpaca_rows(8))
        for repeat in range(REPEATS):
            for way in seconds:
                run = folder / f"{way}-{repeat}"
                run.mkdir()
                config = tuneboard_config(run, model_dir, rows, 8, [], max_steps=1)  # scores no answers
                write_config(config, run / "run.yaml")
                command = launch_command(settings, run / "run.yaml", 1)
                if way == "accelerate":  # how a run of one process started before: the launcher first
                    command = [
                        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1",
                        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                        *command[1:],
                    ]  # fmt: skip
                seconds[way].append(_seconds(command, env))
    return {way: statistics.median(values) for way, values in seconds.items()} | {"all": seconds}


def report_startup(result: dict) -> str:
    saved = result["accelerate"] - result["direct"]
    return (
        "\n## A run's start-up: one training step of the bundled model, process start to exit (median of "
        f"{REPEATS})\n"
        "| started as | seconds |\n|---|---|\n"
        f"| `accelerate launch … -m worker.train` (before) | {result['accelerate']:.1f} |\n"
        f"| `python -m worker.train` (a run of one process now) | {result['direct']:.1f} |\n"
        f"\nDirect launch saves {saved:.1f} s a run ({saved / result['accelerate']:.0%})."
    )
