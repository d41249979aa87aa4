"""Metrics are data: any numeric key a training process logs is stored, served and streamed as it is, with no
schema change, and the run page's charts come from one declarative spec (app/charts.py)."""

from __future__ import annotations

import json
import re

import pytest
from alembic import command
from sqlalchemy import inspect, text

from app.charts import RUN_CHARTS, charts_for
from app.db import make_engine
from app.migrate import alembic_config
from app.runs import state
from app.runs.config import RunConfig
from tests.conftest import DEMO_DATASET, NO_SCORING, upload
from tests.sse import parse


@pytest.fixture
def queued(client, tiny_model_dir) -> dict:
    model = client.post("/api/models", json={"path": str(tiny_model_dir)}).json()["id"]
    dataset = upload(client, "demo.json", DEMO_DATASET.read_bytes()).json()["id"]
    body = {
        "dataset_id": dataset,
        "base_model": model,
        "training": {"dtype": "float32", "max_steps": 2, "logging_steps": 1, "save_steps": 2},
        "evaluation": NO_SCORING,
    }
    response = client.post("/api/runs", json=body)
    assert response.status_code == 201, response.text
    return response.json()


@pytest.mark.databases
def test_a_made_up_metric_from_a_callback_reaches_the_api_and_the_page_stream(
    client, settings, db, queued, tmp_path
):
    """A callback that adds a value to the trainer's logs: no column, no migration, no list of names."""
    from transformers import TrainerCallback

    from worker.sink import DatabaseSink
    from worker.train import build_trainer

    class Curiosity(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs is not None and "loss" in logs:
                logs["curiosity"] = state.global_step / 10

    with db.write_session() as session:
        assert state.claim_next(session=session, worker_id="w").id == queued["id"]
    config = RunConfig.model_validate(queued["config"]).model_copy(
        update={"output_dir": str(tmp_path / "run")}
    )
    sink = DatabaseSink(settings.sqlalchemy_url, queued["id"], attempt=1, stale_after=60)
    trainer, _, _ = build_trainer(config, sink, 1)
    trainer.callback_handler.callbacks.insert(0, Curiosity())  # before Tuneboard's, which records the logs
    trainer.train()
    sink.db.dispose()
    with db.write_session() as session:
        state.finish(session=session, run_id=queued["id"], worker_id="w", status="succeeded", exit_code=0)

    train = [p for p in client.get(f"/api/runs/{queued['id']}/metrics").json() if p["kind"] == "train"]
    assert [(p["step"], p["curiosity"]) for p in train] == [(1, 0.1), (2, 0.2)]
    assert all(p["loss"] > 0 and p["learning_rate"] >= 0 for p in train)  # the trainer's own values too
    with client.stream("GET", f"/runs/{queued['id']}/stream") as response:
        events = parse(response.iter_lines())
    streamed = [e.json for e in events if e.event == "metric" and e.json["kind"] == "train"]
    assert [p["curiosity"] for p in streamed] == [0.1, 0.2]
    engine = make_engine(settings.sqlalchemy_url)
    assert "curiosity" not in {c["name"] for c in inspect(engine).get_columns("run_metrics")}
    engine.dispose()


def test_only_numbers_are_metrics_and_nan_is_kept_as_none():
    logged = {"loss": 1.5, "steps": 3, "nan": float("nan"), "inf": float("inf"), "flag": True, "name": "x"}
    values = state.metric_values({**logged, "none": None})
    assert values == {"loss": 1.5, "steps": 3.0, "nan": None, "inf": None}


def test_the_run_page_draws_the_charts_its_spec_names(client, queued):
    """The page's charts are the spec's, for the run's objective: an SFT run has no reward charts."""
    page = client.get(f"/runs/{queued['id']}").text
    spec = json.loads(re.search(r"data-charts='([^']*)'", page).group(1).replace("&#39;", "'"))
    assert [c["id"] for c in spec] == [c.id for c in charts_for("sft")] == ["loss", "lr", "grad", "speed"]
    for chart in spec:
        assert f'id="chart-{chart["id"]}"' in page and chart["title"] in page
    assert {c.id for c in charts_for("dpo")} == {c.id for c in RUN_CHARTS}
    assert "accuracy" not in {c.id for c in charts_for("kto")}
    keys = {(s.kind, s.key) for c in RUN_CHARTS for s in c.series}
    assert ("eval", "eval_loss") in keys and ("eval", "reward_margin") in keys  # as the callback stores them


@pytest.mark.databases
def test_metrics_of_earlier_runs_move_into_the_values_and_back(settings, client, queued):
    """Revision 0011 turns each per-metric column into a key of the point's values, losslessly, and its
    downgrade puts them back."""
    config = alembic_config(settings)
    command.downgrade(config, "0010")
    engine = make_engine(settings.sqlalchemy_url)
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO run_metrics (run_id, kind, step, epoch, loss, learning_rate, tokens_per_second, "
                "reward_margin, created_at) VALUES (:run, 'train', 3, 0.5, 1.25, 0.0002, 812.5, 0.75, :now)"
            ),
            {"run": queued["id"], "now": "2026-12-01 10:00:00"},
        )
        connection.execute(
            text(
                "INSERT INTO run_metrics (run_id, kind, step, eval_loss, created_at) "
                "VALUES (:run, 'eval', 3, 1.5, :now)"
            ),
            {"run": queued["id"], "now": "2026-12-01 10:00:01"},
        )
    command.upgrade(config, "head")
    points = client.get(f"/api/runs/{queued['id']}/metrics").json()
    assert [{k: v for k, v in p.items() if k != "id"} for p in points] == [
        {"kind": "train", "step": 3, "epoch": 0.5, "loss": 1.25, "learning_rate": 0.0002,
         "tokens_per_second": 812.5, "reward_margin": 0.75},
        {"kind": "eval", "step": 3, "eval_loss": 1.5},
    ]  # fmt: skip
    command.downgrade(config, "0010")
    with engine.connect() as connection:
        rows = connection.execute(
            text("SELECT kind, loss, eval_loss, reward_margin, grad_norm FROM run_metrics ORDER BY id")
        ).all()
    assert [tuple(r) for r in rows] == [("train", 1.25, None, 0.75, None), ("eval", None, 1.5, None, None)]
    command.upgrade(config, "head")
    engine.dispose()
