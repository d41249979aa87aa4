"""Preference runs (DPO, KTO) on the tiny model: what a launch accepts and refuses, and runs that train
through TRL's trainers from a new adapter or from an SFT run's adapter, with their rewards logged."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from app.config import Settings
from tests.conftest import DEMO_DATASET, HELD_OUT, NO_SCORING, fast_settings, upload
from worker.main import work_once

SIGN_OFF = " — Quillmere Gazette"


pytestmark = pytest.mark.trains  # each test trains runs through the worker


@pytest.fixture
def settings(tmp_path: Path, database: str | None) -> Settings:
    return fast_settings(tmp_path, database)


def preference_rows() -> str:
    """The demo questions with two answers: the chosen one signs off, the rejected one does not."""
    rows = json.loads(DEMO_DATASET.read_text(encoding="utf-8"))
    return "\n".join(
        json.dumps({"prompt": r["instruction"], "chosen": r["output"] + SIGN_OFF, "rejected": r["output"]})
        for r in rows
    )


@pytest.fixture
def ids(client, tiny_model_dir) -> dict[str, int]:
    model = client.post("/api/models", json={"path": str(tiny_model_dir)}).json()["id"]
    sft = upload(client, "demo.json", DEMO_DATASET.read_bytes()).json()["id"]
    pairs = upload(client, "signed.jsonl", preference_rows()).json()
    assert pairs["format"] == "preference", pairs
    return {"model": model, "sft": sft, "pairs": pairs["id"]}


def launch(client, dataset: int, model: int, **body) -> dict:
    """POST a run of the tiny model; it scores no answers unless the body's `evaluation` says how."""
    training = {"dtype": "float32", **body.pop("training", {})}
    body["evaluation"] = HELD_OUT | body.get("evaluation", NO_SCORING)
    return client.post(
        "/api/runs", json={"dataset_id": dataset, "base_model": model, "training": training, **body}
    )


def refusal(response) -> tuple[str, str]:
    assert response.status_code == 422, response.text
    problem = response.json()["detail"][0]
    return problem["field"], problem["message"]


def test_a_preference_run_needs_pairs_and_an_adapter_that_starts_as_a_no_op(client, ids):
    field, message = refusal(launch(client, ids["sft"], ids["model"], objective="dpo"))
    assert field == "objective" and "has one answer per row" in message and "preference dataset" in message
    field, message = refusal(launch(client, ids["pairs"], ids["model"], objective="kto", method="adalora"))
    assert field == "method" and "KTO runs train one of these adapters" in message
    field, message = refusal(
        launch(client, ids["pairs"], ids["model"], objective="dpo", training={"batch_tokens": 512})
    )
    assert field == "training.batch_tokens" and "fixed number of pairs" in message
    field, message = refusal(launch(client, ids["pairs"], ids["model"], objective="dpo", start_from_run=99))
    assert field == "start_from_run" and message == "There is no run 99."

    # Defaults for preference runs: a fixed number of pairs a batch, a gentler rate, DPO's own beta and loss.
    made = launch(client, ids["pairs"], ids["model"], objective="dpo")
    assert made.status_code == 201, made.text
    config = made.json()["config"]
    assert config["objective"] == "dpo" and config["method"] == "lora"
    assert config["preference"] == {"beta": 0.1, "loss_type": "sigmoid"}
    assert config["training"]["batch_tokens"] is None and config["training"]["learning_rate"] == 5e-5
    assert made.json()["name"].endswith("· dpo")
    # SFT on a preference dataset learns its chosen answers.
    assert launch(client, ids["pairs"], ids["model"]).status_code == 201


def test_a_run_starts_only_from_a_finished_adapter_of_the_same_model_and_method(
    client, settings, ids, tiny_model_dir, tmp_path
):
    queued = launch(client, ids["sft"], ids["model"], training={"max_steps": 2}).json()
    field, message = refusal(launch(client, ids["pairs"], None, objective="dpo", start_from_run=queued["id"]))
    assert field == "start_from_run" and f"Run {queued['id']} has no finished adapter" in message
    assert "it is queued" in message
    client.post(f"/api/runs/{queued['id']}/cancel")
    ia3 = launch(client, ids["sft"], ids["model"], method="ia3", training={"max_steps": 2}).json()
    train_all(settings)
    field, message = refusal(
        launch(client, ids["pairs"], ids["model"], objective="dpo", start_from_run=ia3["id"], method="lora")
    )
    assert field == "method" and "adapter is IA³" in message
    field, message = refusal(
        launch(client, ids["pairs"], ids["model"], objective="dpo", start_from_run=ia3["id"], peft={"r": 4})
    )
    assert field == "peft" and "keeps its adapter's settings" in message
    copy = shutil.copytree(tiny_model_dir, tmp_path / "tiny-copy")
    other = client.post("/api/models", json={"path": str(copy), "name": "Elsewhere"}).json()["id"]
    field, message = refusal(launch(client, ids["pairs"], other, objective="dpo", start_from_run=ia3["id"]))
    assert field == "base_model" and "a run that starts from it trains the same base model" in message
    started = launch(client, ids["pairs"], None, objective="dpo", start_from_run=ia3["id"])
    assert started.status_code == 201, started.text
    config = started.json()["config"]
    assert (config["method"], config["base_model"], config["start_run_id"]) == (
        "ia3",
        ids["model"],
        ia3["id"],
    )
    assert config["peft"] == ia3["config"]["peft"]
    # an SFT run may continue an adapter too (trained by the same load_model as the DPO run below)
    more = launch(client, ids["sft"], None, start_from_run=ia3["id"]).json()["config"]
    assert (more["objective"], more["method"], more["start_run_id"]) == ("sft", "ia3", ia3["id"])


def train_all(settings: Settings) -> None:
    from app.db import Database

    quick = settings.model_copy(update={"prepare_models": False})
    db = Database(quick.sqlalchemy_url)
    try:
        while work_once(quick, db, me="w1", stop=threading.Event()):
            pass
    finally:
        db.dispose()


def test_dpo_from_an_sft_runs_adapter_logs_rewards_and_saves_one_adapter(client, settings, ids):
    sft = launch(client, ids["pairs"], ids["model"], training={"max_steps": 6, "logging_steps": 3}).json()
    train_all(settings)
    assert client.get(f"/api/runs/{sft['id']}").json()["status"] == "succeeded"

    dpo = launch(
        client,
        ids["pairs"],
        ids["model"],
        objective="dpo",
        start_from_run=sft["id"],
        training={"max_steps": 6, "logging_steps": 2, "save_steps": 3, "learning_rate": 1e-3},
        evaluation={"max_new_tokens": 32},  # scored: step 0 is the starting adapter's answers
    ).json()
    train_all(settings)
    done = client.get(f"/api/runs/{dpo['id']}").json()
    assert done["status"] == "succeeded", done["error"]
    points = client.get(f"/api/runs/{dpo['id']}/metrics").json()
    train = [p for p in points if p["kind"] == "train"]
    assert [p["step"] for p in train] == [2, 4, 6]
    for point in train:
        assert {"rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy"} <= point.keys()
        assert point["reward_margin"] == pytest.approx(point["rewards_chosen"] - point["rewards_rejected"])
        assert 0 <= point["reward_accuracy"] <= 1
    evals = [p for p in points if p["kind"] == "eval"]
    assert [p["step"] for p in evals] == [3, 6] and all("reward_margin" in p for p in evals)
    # The chosen answers pull ahead of the rejected ones as it trains.
    assert train[-1]["reward_margin"] > 0

    folder = settings.runs_dir / str(dpo["id"])
    log = (folder / "train.log").read_text()
    assert f"(from run {sft['id']}'s adapter)" in log and "DPO with beta 0.1" in log
    adapter = folder / "adapter"
    assert not (adapter / "ref").exists()  # the frozen reference stays out of the adapter
    start = load_file(settings.runs_dir / str(sft["id"]) / "adapter" / "adapter_model.safetensors")
    trained = load_file(adapter / "adapter_model.safetensors")
    assert start.keys() == trained.keys()
    assert any(not (start[k] == trained[k]).all() for k in start)  # it moved on from the SFT adapter
    # Step 0 of its scored answers is where it started: the SFT run's adapter, not the bare base model.
    evaluation = client.get(f"/api/runs/{dpo['id']}/evaluation").json()
    assert [s["step"] for s in evaluation["steps"]][0] == 0

    # Chat-able like any run: the playground offers it.
    assert f'value="run-{dpo["id"]}"' in client.get("/playground").text


def test_kto_from_a_new_adapter_trains_on_the_pairs_unpaired(client, settings, ids):
    kto = launch(
        client,
        ids["pairs"],
        ids["model"],
        objective="kto",
        training={"max_steps": 4, "logging_steps": 2, "save_steps": 4},
        evaluation={"held_out_fraction": 0, "scored_train_rows": 0},
    ).json()
    train_all(settings)
    done = client.get(f"/api/runs/{kto['id']}").json()
    assert done["status"] == "succeeded", done["error"]
    train = [p for p in client.get(f"/api/runs/{kto['id']}/metrics").json() if p["kind"] == "train"]
    assert [p["step"] for p in train] == [2, 4]
    # TRL's KTO values, as logged: its KL term and the chosen answers' reward (a margin only where the logged
    # steps also held rejected answers, which these did not)
    assert all("rewards_chosen" in p and "kl" in p for p in train)
    assert "KTO with beta 0.1" in (settings.runs_dir / str(kto["id"]) / "train.log").read_text()


def test_a_dpo_run_resumes_from_its_last_complete_checkpoint(client, settings, ids, caplog):
    """As after a crash: the adapter and the newest checkpoint gone, the training process resumes from the
    checkpoint before and ends at the same step, with the rewards logged again from there."""
    from worker.sink import Sink
    from worker.train import read_config, train

    run = launch(
        client,
        ids["pairs"],
        ids["model"],
        objective="dpo",
        training={"max_steps": 4, "logging_steps": 1, "save_steps": 2},
        evaluation={"scored_held_out_rows": 0, "scored_train_rows": 0},
    ).json()
    train_all(settings)
    assert client.get(f"/api/runs/{run['id']}").json()["status"] == "succeeded"
    folder = settings.run_folder(run["id"])
    shutil.rmtree(folder.adapter)
    shutil.rmtree(folder.checkpoint(4).path)

    class Recording(Sink):
        def __init__(self):
            self.points: list[dict] = []

        def metric(self, values: dict) -> None:
            self.points.append(values)

    sink = Recording()
    config = read_config(folder.config).model_copy(update={"run_id": None, "database_url": None})
    with caplog.at_level("INFO", logger="tuneboard.train"):
        train(config, sink)
    assert "resuming from checkpoint-2" in caplog.text
    assert [p["step"] for p in sink.points if p["kind"] == "train"] == [3, 4], sink.points
    assert all("reward_margin" in p for p in sink.points if p["kind"] == "train")
    assert folder.has_adapter and folder.adapter_source() == {"step": 4, "chosen": "last"}


def test_a_worker_without_the_servers_disk_fetches_the_adapter_a_run_starts_from(settings, tmp_path):
    """prepare_run_folder asks the web server for the starting run's adapter and points the run's
    configuration at this machine's copy of it."""
    from app.models import Run
    from app.runs.config import RunConfig
    from worker.supervise import prepare_run_folder

    class Server:
        asked: list = []

        def fetch_adapter(self, run_id: int, step: int) -> None:
            self.asked.append(("adapter", run_id, step))

        def dataset_rows(self, dataset_id: int) -> Path:
            return tmp_path / f"rows-{dataset_id}.jsonl"

        def fetch_checkpoints(self, run_id: int, folder) -> list[int]:
            return []

    config = {
        "name": "dpo",
        "dataset_id": 2,
        "dataset_path": "/elsewhere/rows.jsonl",
        "base_model": "local-1",
        "model_path": "/elsewhere/model",
        "method": "lora",
        "prompt_format": "chat",
        "peft": {},
        "objective": "dpo",
        "start_run_id": 7,
        "start_adapter": "/elsewhere/runs/7/adapter",
        "training": {
            "num_train_epochs": 1,
            "per_device_train_batch_size": 4,
            "learning_rate": 5e-5,
            "logging_steps": 1,
            "save_steps": 1,
            "eval_steps": 1,
        },
        "train_rows": 4,
        "validation_rows": [],
        "total_steps": 1,
    }
    folder = prepare_run_folder(settings, Run(id=9, config=config), server=Server())  # type: ignore[arg-type]
    assert Server.asked == [("adapter", 7, 0)]
    written = RunConfig.model_validate(yaml.safe_load(folder.config.read_text()))
    assert written.start_adapter == str(settings.run_folder(7).adapter)
    assert written.dataset_path == str(tmp_path / "rows-2.jsonl")


def test_an_adalora_adapter_is_not_a_starting_point(client, settings, ids):
    adalora = launch(client, ids["sft"], ids["model"], method="adalora", training={"max_steps": 2}).json()
    from app.db import Database
    from app.runs import state

    db = Database(settings.sqlalchemy_url)
    with db.write_session() as session:
        assert state.claim_next(session=session, worker_id="w1") is not None
        state.finish(session=session, run_id=adalora["id"], worker_id="w1", status="succeeded")
    db.dispose()
    adapter = settings.run_folder(adalora["id"]).adapter
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    field, message = refusal(
        launch(client, ids["pairs"], None, objective="dpo", start_from_run=adalora["id"])
    )
    assert field == "start_from_run" and "rank schedule ended" in message
