"""A fleet: one web server and two workers that share the database but no disk (separate data folders and
working folders, as on two machines). Both train; every adapter comes back to the web server and answers
in the playground; a worker killed mid-run has its run resumed by the other from the last checkpoint the
server received, with no metric step logged twice. On PostgreSQL and on SQLite (one machine). A worker
elsewhere that lacks a model fetched by name fetches it from the hub itself."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import zipfile
from contextlib import ExitStack

import httpx
import pytest

from app.processes import free_port
from app.runs import state
from tests.conftest import DEMO_DATASET
from tests.servers import running, running_worker
from tests.waiting import wait_until

TOKEN = "fleet-test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# each run long enough to be caught mid-way, with a checkpoint every 20 steps and small scored evaluations
RUN = {
    "training": {"dtype": "float32", "max_steps": 80, "logging_steps": 10, "save_steps": 20},
    "evaluation": {
        "held_out_fraction": 0.1,
        "scored_held_out_rows": 2,
        "scored_train_rows": 1,
        "max_new_tokens": 4,
    },
}
WORKER = {
    "TUNEBOARD_HEARTBEAT_SECONDS": "0.5",
    "TUNEBOARD_STALE_AFTER_SECONDS": "6",
    "TUNEBOARD_PREPARE_MODELS": "false",
    "TUNEBOARD_TORCH_THREADS": "1",
}


def sqlite_or(database: str | None, web_data) -> str:
    return database or f"sqlite:///{web_data / 'tuneboard.db'}"


# On PostgreSQL, the database of a fleet (claims under several workers run on both, in test_state)
@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
@pytest.mark.fleet
def test_two_workers_without_shared_disk_train_serve_and_resume(tmp_path, database, tiny_model_dir):
    web_data, generation_port = tmp_path / "web" / "data", free_port()
    shared = {"TUNEBOARD_TOKEN": TOKEN, "TUNEBOARD_DATABASE_URL": sqlite_or(database, web_data)}
    web_env = shared | {"TUNEBOARD_GENERATION_URL": f"http://127.0.0.1:{generation_port}"}
    with ExitStack() as stack:
        base, _ = stack.enter_context(running("web", web_data, log=tmp_path / "web.log", env_extra=web_env))
        api = stack.enter_context(httpx.Client(base_url=base, headers=AUTH, timeout=60))
        model = api.post("/api/models", json={"path": str(tiny_model_dir)}).json()["id"]
        files = {"file": ("demo.json", DEMO_DATASET.read_bytes())}
        dataset = api.post("/api/datasets", files=files).json()["id"]

        machines = {}
        for name, generation in (("a", "true"), ("b", "false")):
            home = tmp_path / name
            (home / "work").mkdir(parents=True)
            env = WORKER | shared | {"TUNEBOARD_SERVER_URL": base, "TUNEBOARD_GENERATION": generation}
            env |= {"TUNEBOARD_GENERATION_URL": f"http://127.0.0.1:{generation_port}"}
            machines[name] = stack.enter_context(
                running_worker(home / "data", env, log=tmp_path / f"worker-{name}.log", cwd=home / "work")
            )
        runs = [
            api.post("/api/runs", json={"dataset_id": dataset, "base_model": model, **RUN}).json()["id"]
            for _ in range(4)
        ]

        def attempts(run_id: int) -> list[dict]:
            return api.get(f"/api/runs/{run_id}").json()["history"]

        # both machines train at once
        busy = wait_until(
            lambda: len({a[-1]["worker_id"] for r in runs if (a := attempts(r))}) == 2 and True,
            timeout=120,
            what="both workers to train",
        )
        assert busy
        # machine b is lost mid-run, after the server received one of that run's checkpoints
        lost_pid = machines["b"].pid
        victim = wait_until(
            lambda: next(
                (
                    r
                    for r in runs
                    if (a := attempts(r))
                    and a[-1]["worker_id"].endswith(f":{lost_pid}")
                    and a[-1]["ended_at"] is None
                    and api.get(f"/api/runs/{r}/checkpoints").json()
                ),
                None,
            ),
            timeout=120,
            what="machine b to send a checkpoint",
        )
        os.killpg(lost_pid, signal.SIGKILL)  # the worker and its training process, as a lost machine
        received = max(c["step"] for c in api.get(f"/api/runs/{victim}/checkpoints").json())

        def all_finished() -> list[dict] | None:
            found = [api.get(f"/api/runs/{i}").json() for i in runs]
            return found if all(r["status"] in state.FINISHED for r in found) else None

        finished = wait_until(
            all_finished,
            timeout=600,
            what="every run to finish",
        )
        for run in finished:
            assert run["status"] == "succeeded", (run["id"], run["error"])
        trained_by = {a["worker_id"] for run in finished for a in run["history"]}
        assert len(trained_by) == 2
        resumed = next(run for run in finished if run["id"] == victim)
        assert [a["outcome"] for a in resumed["history"]] == ["lost", "succeeded"]
        assert resumed["history"][0]["worker_id"] != resumed["history"][1]["worker_id"]
        assert resumed["resumed_from_step"] >= received > 0
        steps = [p["step"] for p in api.get(f"/api/runs/{victim}/metrics").json() if p["kind"] == "train"]
        assert steps == list(range(10, 81, 10))  # none lost, none repeated

        # machine a trained most runs itself: take its copies away, as if its generation host were on a
        # third machine; it fetches what it is asked to answer with from the web server
        for run in finished:
            shutil.rmtree(tmp_path / "a" / "data" / "runs" / str(run["id"]), ignore_errors=True)
        step = api.get(f"/api/runs/{victim}/checkpoints").json()[0]["step"]
        assert chat(api, f"run-{victim}-step-{step}")["results"][0]["tokens"] > 0
        fetched = tmp_path / "a" / "data" / "runs" / str(victim) / "checkpoints" / f"checkpoint-{step}"
        assert (fetched / "adapter_config.json").is_file()
        for run in finished:
            adapter = api.get(f"/api/runs/{run['id']}/adapter")
            assert adapter.status_code == 200
            names = zipfile.ZipFile(io.BytesIO(adapter.content)).namelist()
            assert f"run-{run['id']}-adapter/adapter_model.safetensors" in names
            answer = chat(api, f"run-{run['id']}")
            assert answer["results"][0]["tokens"] > 0
            fetched = tmp_path / "a" / "data" / "runs" / str(run["id"]) / "adapter" / "adapter_config.json"
            assert fetched.is_file()

        # an export is made by a worker without the server's disk: it fetches the adapter, makes the file
        # and sends it back, where it is downloaded
        export = api.post(f"/api/runs/{victim}/exports", json={"format": "lora-gguf"}).json()
        made = wait_until(
            lambda: (
                (e := api.get(f"/api/exports/{export['id']}").json())["status"] in ("succeeded", "failed")
                and e
            ),
            timeout=120,
            what="the export to be made",
        )
        assert made["status"] == "succeeded", made["error"]
        exported = api.get(made["download_url"])
        assert exported.content[:4] == b"GGUF" and len(exported.content) == made["size_bytes"]
        assert "ADAPTER ./" in api.get(made["modelfile_url"]).text


def chat(api: httpx.Client, target: str) -> dict:
    """Ask the playground one question; the `end` event's payload (fails on an `error` event)."""
    body = {"panes": [{"target": target, "messages": [{"role": "user", "content": "What is Tuneboard?"}]}]}
    body["sampling"] = {"max_new_tokens": 8}
    with api.stream("POST", "/api/playground/chat", json=body, timeout=120) as response:
        assert response.status_code == 200, response.read()
        event = None
        for line in response.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and event in ("end", "error"):
                payload = json.loads(line.split(":", 1)[1])
                assert event == "end", payload
                return payload
    raise AssertionError("the answer's stream ended without an end event")


@pytest.mark.fleet
def test_a_worker_elsewhere_fetches_the_model_a_run_needs_by_itself(tmp_path, tiny_model_dir):
    """The web server's model came from the hub by name; a worker on another machine, which lacks it, fetches
    the same commit from the hub it reaches into its own cache (the Workers page says it is downloading, the
    run's page how far it got), trains the run, and sends the adapter back."""
    from huggingface_hub import snapshot_download

    from tests.hub_standin import Repo, running_hub

    sha = "c" * 40
    web_data, remote_cache, web_cache = (
        tmp_path / "web" / "data",
        tmp_path / "b" / "hf",
        tmp_path / "web" / "hf",
    )
    repos = {"tiny/llama": Repo(folder=tiny_model_dir, sha=sha, bytes_per_second=150_000)}
    with ExitStack() as stack:
        standin = stack.enter_context(running_hub(repos))
        # the web server's machine fetched it by name earlier
        snapshot_download("tiny/llama", revision=sha, endpoint=standin.url, cache_dir=web_cache, token=False)
        shared = {"TUNEBOARD_TOKEN": TOKEN, "TUNEBOARD_DATABASE_URL": sqlite_or(None, web_data)}
        web_env = shared | {"HF_HUB_CACHE": str(web_cache), "HF_ENDPOINT": standin.url}
        base, _ = stack.enter_context(running("web", web_data, log=tmp_path / "web.log", env_extra=web_env))
        api = stack.enter_context(httpx.Client(base_url=base, headers=AUTH, timeout=60))
        files = {"file": ("demo.json", DEMO_DATASET.read_bytes())}
        dataset = api.post("/api/datasets", files=files).json()["id"]
        body = {
            "dataset_id": dataset,
            "base_model": "tiny/llama",
            "training": {"dtype": "float32", "max_steps": 8},
        }
        body["evaluation"] = {"scored_held_out_rows": 0, "scored_train_rows": 0}
        run = api.post("/api/runs", json=body)
        assert run.status_code == 201, run.text

        (tmp_path / "b" / "work").mkdir(parents=True)
        env = WORKER | shared | {"TUNEBOARD_SERVER_URL": base, "TUNEBOARD_GENERATION": "false"}
        env |= {"HF_HUB_CACHE": str(remote_cache), "HF_ENDPOINT": standin.url}
        log = tmp_path / "worker-b.log"
        stack.enter_context(
            running_worker(tmp_path / "b" / "data", env, log=log, cwd=tmp_path / "b" / "work")
        )
        seen: set[str] = set()

        def finished() -> bool:
            for worker in api.get("/api/workers").json():
                seen.add(worker["status"])
            current = api.get(f"/api/runs/{run.json()['id']}").json()
            if (current.get("phase") or "").startswith("Fetching tiny/llama"):
                seen.add(current["phase"])
            return current["status"] in state.FINISHED

        wait_until(finished, 120, "the run to finish on the worker that fetched its model", every=0.2)
        done = api.get(f"/api/runs/{run.json()['id']}").json()
        assert done["status"] == "succeeded", (done["error"], log.read_text()[-3000:])
        assert "downloading" in seen and any(s.startswith("Fetching tiny/llama from") for s in seen), seen
        snapshot = remote_cache / "models--tiny--llama" / "snapshots" / sha
        assert (snapshot / "model.safetensors").read_bytes() == (
            tiny_model_dir / "model.safetensors"
        ).read_bytes()
        assert (
            done["history"][-1]["worker_id"].split(":")[0]
            and api.get(f"/api/runs/{done['id']}/adapter.tar").status_code == 200
        )
