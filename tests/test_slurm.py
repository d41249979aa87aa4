"""Runs sent to a Slurm cluster: a real single-node cluster (tests/slurm.py) and a web server whose
providers.yaml names it. Each run becomes one `sbatch` job whose one-shot worker trains exactly that run
and sends its files over HTTP; the run's page shows the job's id, state and reason; a cancel from
Tuneboard `scancel`s a waiting job; a job cancelled mid-run (its worker warned, as before a time limit or a
preemption) and one whose worker is killed outright are each followed by a new job that resumes from the
last checkpoint the server received, with no step logged twice; a submission Slurm refuses is a sentence."""

from __future__ import annotations

import json
from contextlib import ExitStack

import httpx
import pytest

from app.runs import state
from tests.conftest import DEMO_DATASET
from tests.servers import running
from tests.slurm import PARTITION, SlurmCluster
from tests.waiting import wait_until

TOKEN = "slurm-test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
RUN = {
    "training": {"dtype": "float32", "max_steps": 40, "logging_steps": 10, "save_steps": 10},
    "evaluation": {"scored_held_out_rows": 0, "scored_train_rows": 0},
}
# a job's worker: quick heartbeats, one torch thread (the node has two CPUs, one a job)
JOB_WORKER = {
    "TUNEBOARD_HEARTBEAT_SECONDS": "0.5",
    "TUNEBOARD_STALE_AFTER_SECONDS": "6",
    "TUNEBOARD_PREPARE_MODELS": "false",
    "TUNEBOARD_TORCH_THREADS": "1",
}


@pytest.fixture(scope="module")
def cluster():
    started = SlurmCluster().start()
    try:
        yield started
    finally:
        started.stop()


def providers_yaml(node_tmp) -> str:
    lab = {
        "name": "lab",
        "kind": "slurm",
        "partition": PARTITION,
        "cpus_per_task": 1,
        "time_limit": "30:00",
        "environment": JOB_WORKER | {"TMPDIR": str(node_tmp)},
    }
    nowhere = {"name": "nowhere", "kind": "slurm", "partition": "missing"}
    return json.dumps({"providers": [lab, nowhere]})  # JSON is YAML


@pytest.mark.fleet
def test_runs_sent_to_a_slurm_cluster(tmp_path, cluster, tiny_model_dir):
    web_data, node_tmp = tmp_path / "web" / "data", tmp_path / "node-tmp"
    web_data.mkdir(parents=True)
    node_tmp.mkdir()
    (web_data / "providers.yaml").write_text(providers_yaml(node_tmp), encoding="utf-8")
    env = cluster.env() | {"TUNEBOARD_TOKEN": TOKEN, "TUNEBOARD_HEARTBEAT_SECONDS": "0.5"}
    with ExitStack() as stack:
        base, _ = stack.enter_context(running("web", web_data, log=tmp_path / "web.log", env_extra=env))
        api = stack.enter_context(httpx.Client(base_url=base, headers=AUTH, timeout=60))
        model = api.post("/api/models", json={"path": str(tiny_model_dir)}).json()["id"]
        files = {"file": ("demo.json", DEMO_DATASET.read_bytes())}
        dataset = api.post("/api/datasets", files=files).json()["id"]

        def launch(provider: str) -> int:
            body = {"dataset_id": dataset, "base_model": model, "provider": provider, **RUN}
            answer = api.post("/api/runs", json=body)
            assert answer.status_code == 201, answer.text
            return answer.json()["id"]

        def run(run_id: int) -> dict:
            return api.get(f"/api/runs/{run_id}").json()

        # a partition the cluster lacks: Slurm's refusal, in a sentence, and nothing else happens
        refused = launch("nowhere")
        failed = wait_until(
            lambda: (r := run(refused))["status"] == "failed" and r, timeout=60, what="refusal"
        )
        assert "The Slurm cluster nowhere refused the job" in failed["error"]
        assert "Invalid partition" in failed["error"]
        unknown = api.post(
            "/api/runs", json={"dataset_id": dataset, "base_model": model, "provider": "elsewhere"}
        )
        assert unknown.status_code == 422 and "elsewhere" in unknown.text

        # three runs: two train at once (a CPU each), the third waits for resources
        runs = [launch("lab") for _ in range(3)]

        def jobs(run_id: int) -> list[dict]:
            return run(run_id)["cluster_jobs"]

        wait_until(
            lambda: sum(1 for r in runs[:2] if (j := jobs(r)) and j[-1]["state"] == "RUNNING") == 2,
            timeout=120,
            what="two jobs to run",
        )
        waiting = wait_until(
            lambda: (j := jobs(runs[2])) and j[-1]["state"] == "PENDING" and j[-1]["reason"] and j[-1],
            timeout=60,
            what="the third job to wait",
        )
        page = api.get(f"/runs/{runs[2]}").text
        assert f"job {waiting['job_id']}" in page and "PENDING" in page and waiting["reason"] in page
        # cancelled from Tuneboard: Slurm cancels the job
        assert api.post(f"/api/runs/{runs[2]}/cancel").status_code == 200
        gone = wait_until(
            lambda: (j := jobs(runs[2])[-1])["state"] == "CANCELLED" and j, timeout=60, what="scancel"
        )
        assert gone["ended_at"] is not None and run(runs[2])["status"] == "cancelled"
        squeue = cluster.run(
            "squeue", "--noheader", "--states=all", "--format=%i %T", f"--jobs={gone['job_id']}"
        )
        assert squeue.stdout.split() == [gone["job_id"], "CANCELLED"]

        # both running jobs end mid-run, after the server received a checkpoint: the first is cancelled
        # (Slurm warns its worker, which hands the run back), the second's worker is killed outright (as on a
        # lost node: the job fails and the dispatcher takes the run back)
        for victim in runs[:2]:
            wait_until(
                lambda v=victim: api.get(f"/api/runs/{v}/checkpoints").json(),
                timeout=120,
                what="a checkpoint",
            )
        first, second = (jobs(r)[-1] for r in runs[:2])
        cluster.run("scancel", "--full", "--signal=KILL", first["job_id"])
        cluster.run("scancel", "--batch", "--signal=KILL", second["job_id"])
        received = {r: max(c["step"] for c in api.get(f"/api/runs/{r}/checkpoints").json()) for r in runs[:2]}

        def finished() -> list[dict] | None:
            found = [run(r) for r in runs[:2]]
            return found if all(r["status"] in state.FINISHED for r in found) else None

        for done, ended, how in zip(
            wait_until(finished, timeout=300, what="both runs to finish"),
            (first, second),
            ("requeued", "lost"),
            strict=True,
        ):
            assert done["status"] == "succeeded", (done["id"], done["error"])
            adapter = api.get(f"/api/runs/{done['id']}/adapter")
            assert adapter.status_code == 200 and adapter.content[:2] == b"PK"
            assert [j["job_id"] for j in done["cluster_jobs"]][0] == ended["job_id"]
            assert len(done["cluster_jobs"]) == 2 and done["cluster_jobs"][0]["ended_at"] is not None
            assert [a["outcome"] for a in done["history"]] == [how, "succeeded"], done["cluster_jobs"]
            assert done["resumed_from_step"] >= received[done["id"]] > 0
            steps = [
                p["step"] for p in api.get(f"/api/runs/{done['id']}/metrics").json() if p["kind"] == "train"
            ]
            assert steps == list(range(10, 41, 10))  # none lost, none repeated
        page = api.get(f"/runs/{runs[1]}").text
        assert second["job_id"] in page and 'id="cluster-jobs"' in page
