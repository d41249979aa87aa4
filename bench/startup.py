"""A run's start-up: the training process as the worker starts it for a run of one process (forked warm
from a server that imported the libraries once, worker.warm), against the trainer's own fresh interpreter
(as runs of one process started before) and the same run through `accelerate launch` (the launcher's
interpreter, then the trainer's), as every run started before that. Each trains the bundled model for one
step with no scoring; the ways are timed in turn, so that all see the same machine. The first warm start
of a worker also starts its server: it is timed apart."""

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
from worker import warm
from worker.supervise import launch_command, trainer_args, training_env
from worker.train import write_config

REPEATS = 3


def _seconds(command: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(done.stdout[-2000:] + done.stderr[-2000:])
    return time.perf_counter() - started


def _warm_seconds(argv: list[str], env: dict[str, str], run: Path) -> float:
    started = time.perf_counter()
    child = warm.start(argv, env, run / "train.log")
    if child is None or child.wait() != 0:
        raise RuntimeError("the warm start failed: " + (run / "train.log").read_text()[-2000:])
    return time.perf_counter() - started


def startup_benchmark(model_dir: Path, threads: int) -> dict:
    settings = Settings(torch_threads=threads)
    env = training_env(settings)
    seconds: dict[str, list[float]] = {"warm": [], "direct": [], "accelerate": []}
    first_warm = None
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
                if way == "warm":
                    args = trainer_args(settings, run / "run.yaml", 1)
                    if first_warm is None:  # the server's own start: once per worker, timed apart
                        first_warm = _warm_seconds(args, env, run)
                    seconds[way].append(_warm_seconds(args, env, run))
                else:
                    seconds[way].append(_seconds(command, env))
    medians = {way: statistics.median(values) for way, values in seconds.items()}
    return medians | {"first_warm": first_warm, "all": seconds}


def report_startup(result: dict) -> str:
    saved = result["direct"] - result["warm"]
    return (
        "\n## A run's start-up: one training step of the bundled model, process start to exit (median of "
        f"{REPEATS})\n"
        "| started as | seconds |\n|---|---|\n"
        f"| `accelerate launch … -m worker.train` (before) | {result['accelerate']:.1f} |\n"
        f"| `python -m worker.train` (a fresh interpreter) | {result['direct']:.1f} |\n"
        f"| forked warm (a run of one process now) | {result['warm']:.1f} |\n"
        f"| forked warm, the worker's first run (its server starts) | {result['first_warm']:.1f} |\n"
        f"\nA warm start saves {saved:.1f} s a run ({saved / result['direct']:.0%}) after a worker's first."
    )
