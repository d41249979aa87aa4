"""A worker's speed before its first run: a short trial of the real training process.

When a worker is idle and knows nothing of its speed on the default base model, it trains that model for a
few steps on made-up rows in a scratch folder (`python -m worker.probe MODEL ID OUT`: the same
`worker.train.train` a run uses, reporting to a sink that keeps what it hears), its answers scored before
the first step and after the last as a run's are. What the process measured becomes the calibration a
finished run gives (app.runs.duration.speed_of): seconds per unit of counted work, start-up seconds and
seconds per scored answer. The result is kept in `<data_dir>/models/.speed/<model>.json` and announced with
the worker's hardware, so New run can show a duration range before any run has finished on the server.

A queued job, or an order from the Workers page, stops the trial at once; it is tried again when the worker
is next idle. Workers sharing a data folder take turns (a lock), so none measures beside another. A trial
that fails is tried again after RETRY_SECONDS.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import random
import re
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from app.datasets.store import write_json
from worker.sink import Sink

log = logging.getLogger("tuneboard.probe")

STEPS = 4  # the first warms up; the others are measured
ANSWERS = 8  # scored at each of the trial's two evaluations: one batch, as a run's evaluations batch them
ROWS = 16
RETRY_SECONDS = 6 * 3600  # after a failed trial (the machine was busy, out of memory…)
WORDS = (
    "river stone lantern copper meadow harbour willow signal market orchard ladder basket thunder garden "
    "winter candle pocket silver shadow bridge marble feather cotton valley engine window velvet anchor "
    "island ribbon pepper timber saddle mirror cobalt forest kettle circle harvest compass beacon"
).split()


def made_up_rows(count: int = ROWS, seed: int = 0) -> list[dict]:
    """Alpaca rows of a few hundred tokens whose words mean nothing (no dataset of the user's is needed)."""
    rng = random.Random(seed)

    def text(words: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."

    return [
        {"instruction": text(rng.randint(8, 16)), "input": "", "output": text(rng.randint(150, 260))}
        for _ in range(count)
    ]


def speed_file(data_dir: Path, model_id: str) -> Path:
    """Where a worker keeps its measured speed on one base model."""
    return data_dir / "models" / ".speed" / f"{re.sub(r'[^A-Za-z0-9._-]', '_', model_id)}.json"


# --- the worker's side ---


def machine_key(settings, hardware: dict) -> dict:
    """What a measured speed holds for: the cores, the threads training may use, the GPUs."""
    gpus = [gpu.get("name") for gpu in hardware.get("gpus") or []]
    return {"cpus": hardware.get("cpus"), "threads": settings.torch_threads, "gpus": gpus}


def trials(data_dir: Path, machine: dict) -> dict[str, dict]:
    """The trials made on this machine, by base model id: {"speed"} or {"error", "failed_at"} (a trial made
    on other hardware, or with another number of threads, no longer counts)."""
    found = {}
    for path in sorted((data_dir / "models" / ".speed").glob("*.json")):
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        mine = isinstance(entry, dict) and entry.get("machine") == machine
        if mine and isinstance(entry.get("model"), str):
            found[entry["model"]] = entry
    return found


def known_speeds(settings, hardware: dict) -> dict[str, dict]:
    """The speeds measured here, by base model id (what the worker announces with its hardware)."""
    found = trials(settings.data_dir, machine_key(settings, hardware))
    return {model: entry["speed"] for model, entry in found.items() if "speed" in entry}


def due(entry: dict | None) -> bool:
    """Whether a model's trial should run: never made, or failed long enough ago."""
    return entry is None or ("speed" not in entry and time.time() - entry.get("failed_at", 0) > RETRY_SECONDS)


def measure_when_idle(
    settings, db, *, me: str, hardware: dict, models: list[str], stop, shared_disk: bool = True
) -> bool:
    """When this machine's speed on the default base model is unknown, measure it (a child process, the
    worker's heartbeat and orders kept); a job this worker could take (`shared_disk`: whether it shares the
    web server's disk) that arrives meanwhile ends the trial, to be tried again later. Returns whether one
    ran."""
    from app import jobs, workers
    from app.db import PASSING_FAULTS
    from app.model_registry import default_model, list_models
    from worker.child import beating, run_child
    from worker.supervise import training_env

    machine = machine_key(settings, hardware)
    with db.session() as session:
        model = default_model(list_models(settings, session=session))
    if model is None or not due(trials(settings.data_dir, machine).get(model.id)):
        return False
    out = speed_file(settings.data_dir, model.id)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / ".lock", "w") as lock:
        try:  # another worker on this data folder is measuring: measuring beside it would be slowed
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        ordered = threading.Event()  # the Workers page asked this worker to drain or stop

        def beat() -> None:
            try:
                with db.write_session() as session:
                    orders = workers.beat(session=session, worker_id=me, status=workers.MEASURING)
            except PASSING_FAULTS:
                return
            if orders.stop:
                stop.set()
            if orders.stop or orders.drain:
                ordered.set()

        def go_on() -> bool:
            if ordered.is_set():
                return False
            try:
                with db.session() as session:
                    gpus = len(hardware.get("gpus") or [])
                    return not jobs.waiting(
                        session=session, models=models, gpus=gpus, shared_disk=shared_disk
                    )
            except PASSING_FAULTS:
                return True

        log.info("measuring this machine's training speed on %s (a trial of a few steps)", model.id)
        beat()  # at once: New run polls while a worker says it is measuring
        command = [sys.executable, "-m", "worker.probe", str(model.folder), model.id, str(out)]
        with beating(beat, settings.heartbeat_seconds, name="worker-heartbeat"):
            ended = run_child(
                [*command, "--machine", json.dumps(machine)],
                stop=stop,
                env=training_env(settings),
                tick=go_on,
                every=1.0,
            )
    if ended.code is None:
        why = "the worker is stopping" if stop.is_set() or ordered.is_set() else "a job is waiting"
        log.info("speed trial stopped (%s); it is tried again when the worker is idle", why)
    elif ended.code != 0:
        reason = ended.reason()
        log.warning("speed trial on %s failed: %s", model.id, reason)
        entry = {"model": model.id, "machine": machine, "error": reason, "failed_at": time.time()}
        write_json(out, entry)
    return True


# --- the trial's own process ---


class Recording(Sink):
    """A training sink that keeps the step timings and answer times a run's sink would store."""

    def __init__(self) -> None:
        self.points: list[tuple[int, float, float]] = []  # (step, step_time, tokens_per_second)
        self.evaluations: list[tuple[float, int]] = []  # (seconds, answers)

    def metric(self, values: dict) -> None:
        super().metric(values)
        timed = values.get("step_time") and values.get("tokens_per_second")
        if values.get("kind", "train") == "train" and timed:
            self.points.append((values["step"], values["step_time"], values["tokens_per_second"]))

    def answers(self, *, step: int, split: str, answers: list[dict], seconds: float) -> None:
        if answers:
            self.evaluations.append((seconds, len(answers)))


def trial(model_dir: Path, model_id: str, started: float) -> dict:
    """Train `model_dir` for a few steps on made-up rows, its answers scored before the first step and
    after the last; the speed. `started`: when this process started (start-up counts from there)."""
    from app.datasets.formats import parse_dataset
    from app.peft_methods import DEFAULT_METHOD
    from app.runs.config import EvaluationParams, RunConfig, TrainingParams, resolve_training, validate_peft
    from app.runs.duration import speed_of
    from app.runs.shapes import Shapes
    from worker.data import encode_rows
    from worker.train import load_tokenizer, train, write_config

    shapes = Shapes.read(model_dir)
    if shapes is None:
        raise RuntimeError("the model's config.json does not give its layer shapes: work cannot be counted")
    rows = parse_dataset(json.dumps(made_up_rows()).encode()).rows  # as an upload stores them
    with tempfile.TemporaryDirectory(prefix="tuneboard-probe-") as scratch:
        folder = Path(scratch)
        # the trial's base answers are its own: none kept for a run, none reused from an earlier trial
        os.environ["TUNEBOARD_DATA_DIR"] = str(folder / "data")
        rows_file = folder / "rows.jsonl"
        rows_file.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        tokenizer = load_tokenizer(model_dir)
        params = TrainingParams(max_steps=STEPS, logging_steps=1, save_steps=10_000, eval_steps=10_000)
        lengths = encode_rows(rows, tokenizer, "chat", params.max_length).lengths
        training, steps = resolve_training(DEFAULT_METHOD, len(rows), params, lengths)
        config = RunConfig(
            name="speed trial", dataset_id=0, dataset_path=str(rows_file), base_model=model_id,
            model_path=str(model_dir), method=DEFAULT_METHOD, prompt_format="chat",
            peft=validate_peft(DEFAULT_METHOD, {}),
            training=training, evaluation=EvaluationParams(scored_held_out_rows=0, scored_train_rows=ANSWERS),
            train_rows=len(rows), validation_rows=[], total_steps=steps, output_dir=str(folder / "run"),
        )  # fmt: skip
        write_config(config, folder / "run.yaml")
        sink = Recording()
        train(config, sink)
        wall = time.monotonic() - started
    per_answer = None
    if sink.evaluations:  # the last: answered through the adapter, as every checkpoint's are (slower than
        seconds, count = sink.evaluations[-1]  # the base model's; a run has far more of them)
        per_answer = seconds / count
    answers = sum(count for _, count in sink.evaluations)
    speed = speed_of(config, lengths, shapes, sink.points, wall, answers, per_answer)
    if speed is None:
        raise RuntimeError("the trial logged too few steps to measure")
    return {"seconds_per_work": speed[0], "startup_seconds": speed[1], "seconds_per_answer": per_answer}


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    parser = argparse.ArgumentParser(prog="python -m worker.probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("model_id")
    parser.add_argument("out", type=Path, help="where the result goes (JSON)")
    parser.add_argument("--machine", type=json.loads, required=True, help="what the result is valid for")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from worker.child import stop_with_parent
    from worker.train import quiet_libraries

    # the worker ends a trial with SIGTERM: leave through `finally`, so its scratch folder goes too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    stop_with_parent("speed trial")
    quiet_libraries()
    speed = trial(args.model_dir, args.model_id, started)
    log.info("measured %s: %s", args.model_id, speed)
    write_json(args.out, {"model": args.model_id, "machine": args.machine, "speed": speed})
    return 0


if __name__ == "__main__":
    sys.exit(main())
