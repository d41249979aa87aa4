"""The worker: atomic claims, success, failure, cancel, and a killed worker whose run resumes."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest
from sqlalchemy import select

from app.config import Settings, isolated_env
from app.db import Database
from app.models import RunAnswer, RunMetric
from app.runs import state
from app.scoring import METRICS, score
from tests.conftest import DEMO_DATASET, FAST_TRAINING, HELD_OUT, NO_SCORING, fast_settings, upload
from tests.servers import running_worker
from tests.waiting import wait_until
from worker.main import work_once
from worker.supervise import KILLED, OUT_OF_MEMORY, explain_kill, oom_kills


@pytest.fixture
def settings(tmp_path: Path, database: str | None) -> Settings:
    return fast_settings(tmp_path, database)


@pytest.fixture
def launch(client, tiny_model_dir):
    model = client.post("/api/models", json={"path": str(tiny_model_dir)}).json()["id"]
    dataset = upload(client, "demo.json", DEMO_DATASET.read_bytes()).json()["id"]

    def launch(evaluation: dict | None = None, **training) -> dict:
        """Queue a run of the tiny model; it scores no answers unless `evaluation` says how."""
        body = {
            "dataset_id": dataset,
            "base_model": model,
            "training": {"dtype": "float32", **training},
            "evaluation": NO_SCORING if evaluation is None else HELD_OUT | evaluation,
        }
        response = client.post("/api/runs", json=body)
        assert response.status_code == 201, response.text
        return response.json()

    return launch


@pytest.fixture
def background_worker(settings, db):
    """`work_once` in a thread; stopping it on teardown stops any training process it started."""
    stop = threading.Event()
    threads = []

    def start() -> threading.Thread:
        thread = threading.Thread(
            target=work_once, args=(settings, db), kwargs={"me": "test-worker", "stop": stop}
        )
        thread.start()
        threads.append(thread)
        return thread

    yield start
    stop.set()
    for thread in threads:
        thread.join(timeout=60)


def metrics(client, run_id: int) -> list[dict]:
    return client.get(f"/api/runs/{run_id}/metrics").json()


@pytest.mark.trains
@pytest.mark.databases
def test_a_run_succeeds_with_metrics_and_a_downloadable_adapter(client, settings, db, launch, database):
    run = launch(max_steps=8, logging_steps=3, save_steps=4, evaluation={"max_new_tokens": 32})
    assert work_once(settings, db, me="w1", stop=threading.Event())
    done = client.get(f"/api/runs/{run['id']}").json()
    assert done["status"] == "succeeded", done["error"]
    # the last step is reached, though the last logged point is step 6
    assert (done["attempts"], done["exit_code"], done["total_steps"], done["current_step"]) == (1, 0, 8, 8)
    assert 0 < done["trainable_params"] < done["total_params"]
    # one parameter total: the base model's, on New run's estimate and the run alike
    estimate = client.post(
        "/api/runs/estimate", json={"dataset_id": done["dataset_id"], "base_model": done["base_model"]}
    ).json()
    assert estimate["total"] == done["total_params"]
    points = metrics(client, run["id"])
    assert [p["step"] for p in points if p["kind"] == "train"] == [3, 6]
    assert [p["step"] for p in points if p["kind"] == "eval"] == [4, 8]
    assert [p["id"] for p in points] == sorted(p["id"] for p in points)
    folder = settings.runs_dir / str(run["id"])
    log = (folder / "train.log").read_text()
    assert (folder / "run.yaml").is_file() and "adapter saved" in log
    assert "in torch.float32 on 1 CPU threads:" in log  # the settings' torch_threads, set explicitly
    download = client.get(f"/api/runs/{run['id']}/adapter")
    assert download.status_code == 200 and download.headers["content-type"] == "application/zip"
    names = zipfile.ZipFile(io.BytesIO(download.content)).namelist()
    assert f"run-{run['id']}-adapter/adapter_config.json" in names
    assert f"run-{run['id']}-adapter/adapter_model.safetensors" in names
    assert not work_once(settings, db, me="w1", stop=threading.Event())  # queue empty

    # Answers were scored for the base model (step 0) and at both checkpoints, on the same rows each time,
    # and every stored score is what app.scoring computes from the stored answer and the row's reference.
    report = client.get(f"/api/runs/{run['id']}/evaluation").json()
    assert [s["step"] for s in report["steps"]] == [0, 4, 8]
    config = client.get(f"/api/runs/{run['id']}").json()["config"]
    assert all(s["validation"]["rows"] == len(config["validation_rows"]) for s in report["steps"])
    assert all(s["train"]["rows"] == 8 for s in report["steps"])
    assert report["best_step"] in (4, 8) and report["base"]["step"] == 0
    rows = [json.loads(line) for line in Path(config["dataset_path"]).read_text().splitlines()]
    for entry in report["rows"]:
        reference = rows[entry["row"] - 1]["messages"][-1]["content"]  # rows are numbered from 1
        assert entry["reference"] == reference
        for answer in (entry["base"], entry["best"]):
            assert {k: answer[k] for k in (*METRICS, "opening")} == score(answer["text"], reference)
    with db.session() as session:
        stored = session.scalars(select(RunAnswer).where(RunAnswer.run_id == run["id"])).all()
    assert len(stored) == 3 * (len(config["validation_rows"]) + 8)
    assert all(score(a.answer, rows[a.row]["messages"][-1]["content"])["chrf"] == a.chrf for a in stored)

    # `tuneboard eval` scores a checkpoint again from the command line: greedy answers, the same scores
    # (what it writes is the same rows as above: once, on SQLite, is enough).
    if database is not None:
        return
    before = {s["step"]: s for s in report["steps"]}[4]
    env = isolated_env(settings.data_dir, TUNEBOARD_TORCH_THREADS="1", **settings.database_env())
    command = [sys.executable, "-m", "app.cli", "eval", str(run["id"]), "--checkpoint", "4"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "base model" in done.stdout and "step 4" in done.stdout and "chrF" in done.stdout
    after = {s["step"]: s for s in client.get(f"/api/runs/{run['id']}/evaluation").json()["steps"]}[4]
    assert {**after, "seconds": 0} == {**before, "seconds": 0}
    missing = [*command[:-1], "5"]
    refused = subprocess.run(missing, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert refused.returncode != 0 and "no complete checkpoint at step 5 (complete: 4, 8)" in refused.stderr


@pytest.mark.trains
def test_a_relaunch_reuses_the_base_models_answers(client, settings, db, launch):
    """The same base model asked the same rows with the same settings answers the same: a relaunch (a new
    learning rate, as advice's one click makes) reuses the answers instead of generating them again; other
    prompts, budgets or dtypes ask afresh."""

    def base_answers(run_id: int) -> dict:
        with db.session() as session:
            rows = session.scalars(select(RunAnswer).where(RunAnswer.run_id == run_id, RunAnswer.step == 0))
            return {(a.split, a.row): a.answer for a in rows}

    def trained(**values) -> tuple[dict, str]:
        run = launch(max_steps=1, save_steps=1, **values)
        assert work_once(settings, db, me="w1", stop=threading.Event())
        assert client.get(f"/api/runs/{run['id']}").json()["status"] == "succeeded"
        return base_answers(run["id"]), (settings.runs_dir / str(run["id"]) / "train.log").read_text()

    few = {"scored_held_out_rows": 2, "scored_train_rows": 2}
    first, first_log = trained(evaluation={"max_new_tokens": 8, **few})
    again, again_log = trained(learning_rate=2e-3, evaluation={"max_new_tokens": 8, **few})
    reused = "the base model's answers to these rows and settings are reused from an earlier run"
    assert reused not in first_log and reused in again_log
    # what decides the answers names the file they are kept in: another budget, prompt or dtype asks afresh
    from types import SimpleNamespace

    from app.runs.config import RunConfig
    from worker.evaluate import Question, base_answers_file

    config = RunConfig.model_validate(client.get("/api/runs/1").json()["config"])
    model = SimpleNamespace(dtype="torch.float32", device="cpu")
    asked = {"train": [Question(3, [1, 2, 3], "q", "r", 8)]}
    kept = base_answers_file(settings.models_dir, config, model, asked)
    assert kept == base_answers_file(settings.models_dir, config, model, asked)
    longer = {"train": [Question(3, [1, 2, 3], "q", "r", 12)]}
    other = {"train": [Question(3, [1, 2, 4], "q", "r", 8)]}
    half = SimpleNamespace(dtype="torch.bfloat16", device="cpu")
    assert kept not in {
        base_answers_file(settings.models_dir, config, model, longer),
        base_answers_file(settings.models_dir, config, model, other),
        base_answers_file(settings.models_dir, config, half, asked),
    }
    # the phases the run page shows, as the training process said them
    for phase in ("Loading the base model", "Scoring the base model's answers to held-out rows: 0 of 2",
                  "Scoring step 1's answers to training rows: 0 of 2", "Saving the adapter"):  # fmt: skip
        assert phase in first_log, phase
    assert len(first) == 2 + 2 and again == first


@pytest.mark.trains
def test_the_best_checkpoint_survives_rotation_and_answers_by_name(client, settings, db, launch):
    """Six checkpoints with save_total_limit 2: the best-scored one is kept beside the newest, and the
    playground and /v1 reach it as run-N-best."""
    run = launch(max_steps=6, logging_steps=3, save_steps=1, evaluation={"max_new_tokens": 32})
    assert work_once(settings, db, me="w1", stop=threading.Event())
    report = client.get(f"/api/runs/{run['id']}/evaluation").json()
    assert [s["step"] for s in report["steps"]] == [0, 1, 2, 3, 4, 5, 6]
    best = report["best_step"]
    folder = settings.run_folder(run["id"])
    kept = sorted(c.step for c in folder.checkpoints())
    assert kept == sorted({best, 6}), (best, kept)
    assert folder.adapter_source() == {"step": 6, "chosen": "last"}
    models = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert f"run-{run['id']}-best" in models
    page = client.get(f"/playground?run={run['id']}").text
    assert f'value="run-{run["id"]}-best"' in page and f"best checkpoint (step {best})" in page


@pytest.mark.trains
def test_early_stopping_and_the_best_checkpoint_as_the_final_adapter(client, settings, db, launch):
    """Patience 1 with a checkpoint every step: training stops at the first checkpoint that scores no
    better than the best so far, and the final adapter is the best checkpoint's, said so on the page."""
    body = launch(max_steps=6)  # for the ids of the dataset and model the fixture registered
    config = body["config"]
    request = {
        "dataset_id": config["dataset_id"],
        "base_model": config["base_model"],
        "training": {"dtype": "float32", "max_steps": 40, "logging_steps": 1, "save_steps": 1},
        "evaluation": HELD_OUT
        | {"early_stopping_patience": 1, "final_adapter": "best", "scored_train_rows": 4},
    }
    client.post(f"/api/runs/{body['id']}/cancel")
    run = client.post("/api/runs", json=request).json()
    while work_once(settings, db, me="w1", stop=threading.Event()):
        pass
    done = client.get(f"/api/runs/{run['id']}").json()
    assert done["status"] == "succeeded", done["error"]
    report = client.get(f"/api/runs/{run['id']}/evaluation").json()
    scored = {s["step"]: s["validation"]["chrf"] for s in report["steps"] if s["step"] > 0}
    last, best = max(scored), report["best_step"]
    assert scored[last] <= scored[best] and all(scored[s] < scored[best] for s in scored if s < best)
    assert last == best + 1 or last == 40  # stopped at the first checkpoint after the best that was no better
    folder = settings.run_folder(run["id"])
    assert folder.adapter_source() == {"step": best, "chosen": "best"}
    weights = "adapter_model.safetensors"
    assert (folder.adapter / weights).read_bytes() == (folder.checkpoint(best).path / weights).read_bytes()
    page = client.get(f"/runs/{run['id']}").text
    assert f"step {best}" in page and "best-scored checkpoint" in page


@pytest.mark.trains
@pytest.mark.databases
def test_metrics_arrive_while_it_trains(client, launch, background_worker):
    run = launch(max_steps=120, logging_steps=5, save_steps=60)
    worker = background_worker()
    seen = wait_until(lambda: metrics(client, run["id"]), what="first metrics")
    assert client.get(f"/api/runs/{run['id']}").json()["status"] == "running"
    assert seen[0]["step"] == 5 and seen[0]["loss"] > 0 and seen[0]["tokens_per_second"] > 0
    worker.join(timeout=120)
    assert client.get(f"/api/runs/{run['id']}").json()["status"] == "succeeded"


@pytest.mark.trains
def test_a_failing_run_ends_with_a_sentence(client, settings, db, launch):
    run = launch(max_length=16)  # the chat template's prompt alone is longer: nothing left to learn
    work_once(settings, db, me="w1", stop=threading.Event())
    failed = client.get(f"/api/runs/{run['id']}").json()
    assert failed["status"] == "failed" and failed["exit_code"] != 0
    assert (
        failed["error"] == "No training row has any answer token left within max_length=16; raise max_length."
    )


@pytest.mark.trains
def test_a_training_process_killed_from_outside_is_reported_as_such(
    client, settings, launch, background_worker
):
    run = launch(max_steps=5000, logging_steps=5, save_steps=1000)
    background_worker()
    wait_until(lambda: metrics(client, run["id"]), what="training to start")
    pid = wait_until(lambda: training_pid(settings, run["id"]), what="the training process")
    os.kill(pid, signal.SIGKILL)
    failed = wait_until(
        lambda: (r := client.get(f"/api/runs/{run['id']}").json())["status"] == "failed" and r, what="failure"
    )
    assert failed["error"] == KILLED  # the out-of-memory killer's signal; no OOM was counted this time


def test_a_kill_is_called_out_of_memory_when_the_kernel_counted_one():
    tail = "subprocess.CalledProcessError: Command '[...]' died with <Signals.SIGKILL: 9>."
    assert explain_kill(1, tail, oom_before=3, oom_after=4) == OUT_OF_MEMORY
    assert explain_kill(-9, "", oom_before=3, oom_after=3) == KILLED
    assert explain_kill(-9, "", oom_before=None, oom_after=None) == KILLED
    assert explain_kill(1, "ValueError: bad", oom_before=3, oom_after=4) is None  # failed by itself
    assert explain_kill(0, tail, oom_before=3, oom_after=4) is None
    assert oom_kills() is None or oom_kills() >= 0


@pytest.mark.trains
def test_cancel_stops_training_and_keeps_the_adapter(client, settings, launch, background_worker):
    run = launch(max_steps=5000, logging_steps=5, save_steps=1000)
    worker = background_worker()
    wait_until(lambda: metrics(client, run["id"]), what="training to start")
    assert client.post(f"/api/runs/{run['id']}/cancel").json()["cancel_requested"] is True
    worker.join(timeout=60)
    cancelled = client.get(f"/api/runs/{run['id']}").json()
    assert cancelled["status"] == "cancelled" and cancelled["current_step"] < 5000
    assert (settings.runs_dir / str(run["id"]) / "adapter" / "adapter_model.safetensors").is_file()


def training_pid(settings, run_id: int) -> int | None:
    """The training process of a run's latest attempt while it lives: the process the run's log names
    (forked warm, its command line is the fork server's)."""
    log = settings.run_folder(run_id).log
    started = re.findall(r"training process (\d+)$", log.read_text(), re.M) if log.is_file() else []
    if not started:
        return None
    try:
        state = Path(f"/proc/{started[-1]}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None
    return None if state == "Z" else int(started[-1])  # a zombie has ended, unreaped


@pytest.mark.trains
def test_killing_the_worker_resumes_the_run_from_its_checkpoint(tmp_path, settings, client, launch):
    """On SQLite: the database's part of resuming is tested on both (test_state), and a lost worker's run
    resuming on PostgreSQL in the fleet test."""
    run = launch(max_steps=120, logging_steps=5, save_steps=20)
    env = {f"TUNEBOARD_{k.upper()}": str(v) for k, v in FAST_TRAINING.items()} | settings.database_env()
    with running_worker(settings.data_dir, env, log=tmp_path / "worker1.log") as first:
        checkpoints = settings.runs_dir / str(run["id"]) / "checkpoints"
        wait_until(
            lambda: list(checkpoints.glob("checkpoint-*/TUNEBOARD_COMPLETE")), what="a complete checkpoint"
        )
        wait_until(lambda: client.get(f"/api/runs/{run['id']}").json()["current_step"] >= 40, what="step 40")
        orphan = training_pid(settings, run["id"])
        os.kill(first.pid, signal.SIGKILL)
    # Without heartbeats the orphaned training process stops by itself.
    wait_until(
        lambda: training_pid(settings, run["id"]) is None, timeout=30, what="the orphaned trainer to exit"
    )
    assert orphan is not None
    with running_worker(settings.data_dir, env, log=tmp_path / "worker2.log"):
        done = wait_until(
            lambda: (r := client.get(f"/api/runs/{run['id']}").json())["status"] in state.FINISHED and r,
            timeout=180,
            what="the resumed run to finish",
        )
    assert done["status"] == "succeeded", done["error"]
    assert done["attempts"] == 2 and done["resumed_from_step"] >= 20
    log = (settings.runs_dir / str(run["id"]) / "train.log").read_text()
    assert f"resuming from checkpoint-{done['resumed_from_step']}" in log
    steps = [p["step"] for p in metrics(client, run["id"]) if p["kind"] == "train"]
    assert steps == list(range(5, 121, 5))  # every logged step once: none lost, none repeated
    database = Database(settings.sqlalchemy_url)
    with database.session() as session:
        assert session.query(RunMetric).filter_by(run_id=run["id"], kind="train").count() == 24
    database.dispose()


def test_a_run_whose_model_was_removed_fails_with_a_sentence(client, settings, db, launch):
    run = launch(max_steps=2)
    assert client.delete(f"/api/models/{run['base_model']}").status_code == 204
    work_once(settings, db, me="w1", stop=threading.Event())
    failed = client.get(f"/api/runs/{run['id']}").json()
    assert failed["status"] == "failed"
    assert failed["error"] == (
        f"The base model '{run['base_model']}' is no longer available (it was removed from the model list)."
    )


def test_a_training_process_gets_every_usable_core_unless_told(settings):
    """`accelerate launch` alone leaves a CPU training process one thread: the supervisor sets them."""
    from worker.hardware import usable_cores
    from worker.supervise import training_env

    default = training_env(settings.model_copy(update={"torch_threads": None}))
    assert default["TUNEBOARD_TORCH_THREADS"] == default["OMP_NUM_THREADS"] == str(usable_cores())
    told = training_env(settings.model_copy(update={"torch_threads": 3}))
    assert told["TUNEBOARD_TORCH_THREADS"] == told["OMP_NUM_THREADS"] == "3"
