"""The duration estimate: a run's work counted from its batches, turned into seconds by the latest run that
finished on this server (app.runs.duration)."""

from __future__ import annotations

import json
import shutil
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from app.models import Run, RunAnswer, RunMetric, RunStatus
from app.runs.config import RunConfig, TrainingParams, resolve_training, validate_peft
from app.runs.duration import epoch_work, evaluations, token_work
from app.runs.estimate import training_lengths
from app.runs.shapes import Shapes
from tests.conftest import DEMO_DATASET, upload

SMOLLM2_135M = {  # the bundled model's shapes: only config.json is read
    "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
    "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True,
}  # fmt: skip


def default_config(model_path: Path) -> RunConfig:
    training, steps = resolve_training("lora", 16, TrainingParams(), [150] * 16)
    return RunConfig(
        name="r", dataset_id=1, dataset_path="rows.jsonl", base_model="m", model_path=str(model_path),
        method="lora", prompt_format="chat", peft=validate_peft("lora", {}), training=training,
        train_rows=16, validation_rows=[], total_steps=steps,
    )  # fmt: skip


def test_work_follows_what_a_step_computes(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(SMOLLM2_135M))
    shapes = Shapes.read(tmp_path)
    config = default_config(tmp_path)
    short, long = [150] * 16, [900] * 16

    def per_token(cfg, lengths, checkpointing=False):
        return epoch_work(cfg, lengths, shapes, checkpointing)[0] / sum(lengths)

    # attention grows with the row: a long row's token costs more than a short row's
    assert per_token(config, long) > 1.1 * per_token(config, short)
    # adapters on every linear layer cost more than on q_proj and v_proj alone
    qv = config.model_copy(update={"peft": {**config.peft, "target_modules": ["q_proj", "v_proj"]}})
    assert per_token(config, short) > 1.3 * per_token(qv, short)
    # dropout draws a random mask over every adapted module's input
    dropped = config.model_copy(update={"peft": {**config.peft, "lora_dropout": 0.1}})
    assert per_token(dropped, short) > 1.1 * per_token(config, short)
    # gradient checkpointing runs the forward pass again
    assert per_token(config, short, checkpointing=True) > 1.2 * per_token(config, short)
    # padding counts: rows of mixed lengths in one batch cost more than their tokens alone
    unpadded = token_work(config, shapes, False)
    assert epoch_work(config, [100, 400], shapes, False)[0] > unpadded[0] * 500


def test_the_estimate_scales_the_latest_finished_run_to_the_new_one(
    client, tiny_model_dir, db, settings, tmp_path
):
    model = client.post("/api/models", json={"path": str(tiny_model_dir)}).json()["id"]
    dataset = upload(client, "demo.json", DEMO_DATASET.read_bytes()).json()["id"]
    request = {"dataset_id": dataset, "base_model": model, "training": {"num_train_epochs": 2}}

    # nothing has finished on this server: no duration, and the page says when there will be one
    first = client.post("/api/runs/estimate", json=request).json()
    assert "seconds" not in first
    page = client.post("/runs/estimate", data={"dataset_id": str(dataset), "base_model": model}).text
    assert "estimated once this machine's speed is known" in page

    # a finished run: steps of 2 s (the first, warming up, 6 s), scored evaluations of 5 s (the first, warming
    # up, 15 s), 20 s of start-up
    launched = client.post("/api/runs", json=request).json()
    config = RunConfig.model_validate(launched["config"])
    count, answers = evaluations(config)
    steps = config.total_steps
    with db.session() as session:
        tokens = sum(training_lengths(settings, session, config)) * config.training.num_train_epochs
    speed = tokens / steps / 2.0  # each step's tokens in its 2 s
    started = datetime(2026, 12, 1, 12, tzinfo=UTC)
    wall = 2.0 * steps + 4 + count * 5.0 + 10 + 20
    with db.write_session() as session:
        run = session.get(Run, launched["id"])
        run.status, run.attempts = RunStatus.SUCCEEDED.value, 1
        run.started_at, run.finished_at = started, started + timedelta(seconds=wall)
        session.add_all(
            RunMetric(
                run_id=run.id,
                kind="train",
                step=s,
                values={
                    "step_time": 6.0 if s == 1 else 2.0,
                    "tokens_per_second": speed / 3 if s == 1 else speed,
                },
            )
            for s in range(1, steps + 1)
        )
        session.add_all(
            RunAnswer(run_id=run.id, step=step, split="validation", row=i, answer="", chrf=0, rouge_l=0,
                      exact=0, seconds=15.0 if step == 0 else 5.0)
            for step in range(count) for i in range(answers)
        )  # fmt: skip

    same = client.post("/api/runs/estimate", json=request).json()
    parts = same["duration_parts"]
    assert same["calibrated_by"] == launched["id"]
    # the run it was measured on comes back as it was: its own wall time, its answering time per answer
    assert abs(same["seconds"] - wall) < 1e-6
    assert abs(parts["evaluation"] - count * 5.0) < 1e-6
    # the first step's and the first evaluation's warm-ups count with start-up: training is every step at
    # the steady speed, answering every evaluation at the typical one
    assert abs(parts["startup"] - 34) < 1e-6 and abs(parts["training"] - 2.0 * steps) < 1e-6

    # twice the epochs: twice the training, the same start-up; answers scale with the evaluations
    longer = client.post("/api/runs/estimate", json={**request, "training": {"num_train_epochs": 4}}).json()
    assert abs(longer["duration_parts"]["training"] - 2 * parts["training"]) < 1e-6 * parts["training"]
    assert longer["duration_parts"]["startup"] == parts["startup"]
    # no answers scored: no answering time
    quiet = client.post(
        "/api/runs/estimate",
        json={**request, "evaluation": {"scored_held_out_rows": 0, "scored_train_rows": 0}},
    ).json()
    assert quiet["duration_parts"]["evaluation"] == 0 and quiet["seconds"] < same["seconds"]

    page = client.post("/runs/estimate", data={"dataset_id": str(dataset), "base_model": model}).text
    assert f'href="/runs/{launched["id"]}"' in page and "s speed on this server" in page

    # a later run on another model: that model's estimates follow it, this one's still its own model's run
    shutil.copytree(tiny_model_dir, tmp_path / "other")
    other = client.post("/api/models", json={"path": str(tmp_path / "other")}).json()["id"]
    elsewhere = client.post("/api/runs", json={**request, "base_model": other}).json()
    with db.write_session() as session:
        run = session.get(Run, elsewhere["id"])
        run.status, run.attempts = RunStatus.SUCCEEDED.value, 1
        run.started_at, run.finished_at = started + timedelta(hours=1), started + timedelta(hours=2)
        session.add_all(
            RunMetric(
                run_id=run.id, kind="train", step=s, values={"step_time": 1.0, "tokens_per_second": speed * 2}
            )
            for s in range(1, steps + 1)
        )
    assert client.post("/api/runs/estimate", json=request).json()["calibrated_by"] == launched["id"]
    theirs = client.post("/api/runs/estimate", json={**request, "base_model": other}).json()
    assert theirs["calibrated_by"] == elsewhere["id"]


@pytest.mark.trains  # the trial is the real training process
def test_before_any_run_the_workers_speed_trial_gives_a_range(client, tiny_model_dir, db, settings):
    from app import workers
    from worker.main import capabilities
    from worker.probe import due, known_speeds, measure_when_idle, speed_file

    model = client.post("/api/models", json={"path": str(tiny_model_dir)}).json()["id"]
    dataset = upload(client, "demo.json", DEMO_DATASET.read_bytes()).json()["id"]
    request = {"dataset_id": dataset, "base_model": model}
    form = {"dataset_id": str(dataset), "base_model": model}
    page = client.post("/runs/estimate", data=form).text
    assert "an idle worker measures it" in page and "hx-trigger" not in page.split('id="estimate"')[1][:200]

    idle = settings.model_copy(update={"prepare_models": True})
    has = capabilities(idle, db)
    assert has.hardware["speed"] == {}  # nothing measured yet
    trial = {"db": db, "me": "box:1", "hardware": has.hardware, "models": has.models}

    # a run waiting for a worker ends the trial at once; nothing is kept, so it is tried again later
    queued = client.post("/api/runs", json=request).json()
    assert measure_when_idle(idle, stop=threading.Event(), **trial)
    assert not speed_file(settings.data_dir, model).exists()
    client.post(f"/api/runs/{queued['id']}/cancel")

    # while a worker measures, the page says so and asks again
    with db.write_session() as session:
        workers.beat(session=session, worker_id="box:1", status=workers.MEASURING)
    page = client.post("/runs/estimate", data=form).text
    assert "Measuring this machine's speed" in page and 'hx-trigger="load delay:5s"' in page

    # the trial: a few steps of the real training process on made-up rows, one evaluation's answers
    assert measure_when_idle(idle, stop=threading.Event(), **trial)
    assert not measure_when_idle(idle, stop=threading.Event(), **trial)  # once per machine and model
    has = capabilities(idle, db)
    speed = has.hardware["speed"][model]
    assert speed["seconds_per_work"] > 0 and speed["startup_seconds"] > 0 and speed["seconds_per_answer"] > 0
    with db.write_session() as session:
        workers.beat(session=session, worker_id="box:1", status="idle", capabilities=has)
    estimate = client.post("/api/runs/estimate", json=request).json()
    low, high = estimate["seconds_range"]
    assert estimate["calibrated_by"] is None and low < estimate["seconds"] < high
    parts = estimate["duration_parts"]
    assert parts["startup"] == speed["startup_seconds"] and parts["training"] > 0 and parts["evaluation"] > 0
    page = client.post("/runs/estimate", data=form).text
    assert "from a worker's short speed trial" in page and "Measuring" not in page

    # another machine (other cores or threads) does not count this trial
    elsewhere = {**has.hardware, "cpus": has.hardware["cpus"] + 1}
    assert known_speeds(idle, elsewhere) == {} and known_speeds(idle, has.hardware)[model] == speed
    # a failed trial is tried again, but not at once
    assert due(None) and not due({"speed": speed})
    assert not due({"error": "out of memory", "failed_at": time.time()})
    assert due({"error": "out of memory", "failed_at": time.time() - 7 * 3600})
    # a silent worker's trial is not used
    with db.write_session() as session:
        session.get(workers.Worker, "box:1").heartbeat_at = datetime(2026, 1, 1, tzinfo=UTC)
    assert "seconds" not in client.post("/api/runs/estimate", json=request).json()
