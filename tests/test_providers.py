"""Compute providers without a cluster: the operator's providers.yaml is checked (nothing a value holds can
become more than its one #SBATCH line or setup line), the batch script carries the settings and no secret,
and a run sent to a provider is for its scheduler job's worker alone (tests/test_slurm.py runs the jobs)."""

from __future__ import annotations

import json

import pytest
from pydantic import SecretStr

from app import jobs
from app.providers import slurm
from app.providers.config import ProviderProblem, load
from app.providers.dispatch import job_name, tick, worker_environment
from tests.conftest import DEMO_DATASET, upload

SECRET = "a-secret-token-0123456789"
LAB = {"name": "lab", "kind": "slurm", "partition": "gpu", "time_limit": "04:00:00", "gpus": 1}


def write(settings, *providers: dict) -> None:
    (settings.data_dir / "providers.yaml").write_text(json.dumps({"providers": list(providers)}))


@pytest.mark.parametrize(
    ("bad", "said"),
    [
        ({"sbatch_options": ["--wrap=rm -rf /"]}, "sbatch option is written --name or --name=value"),
        ({"sbatch_options": ["--comment=x;reboot"]}, "sbatch option"),
        ({"setup": ["module load cuda\n#SBATCH --partition=all"]}, "must be one line"),
        ({"partition": "gpu --qos=high"}, "partition"),
        ({"time_limit": "forever"}, "a time limit is minutes"),
        ({"memory": "lots"}, "a memory size"),
        ({"name": "Lab Cluster"}, "name"),
        ({"shell": "/bin/zsh"}, "shell"),  # a setting Tuneboard does not have
        ({"environment": {"bad name": "x"}}, "environment"),
    ],
)
def test_a_provider_file_is_checked_before_anything_is_submitted(settings, bad, said):
    write(settings, LAB | bad)
    with pytest.raises(ProviderProblem) as refused:
        load(settings)
    assert said in str(refused.value) and "providers.yaml" in str(refused.value)


def test_two_providers_of_one_name_and_no_file(settings):
    assert load(settings) == {}
    write(settings, LAB, LAB | {"partition": "cpu"})
    with pytest.raises(ProviderProblem, match="names a provider twice"):
        load(settings)


def test_the_batch_script_carries_the_settings_and_no_secret(settings, tmp_path):
    settings = settings.model_copy(update={"token": SecretStr(SECRET)})
    write(
        settings,
        LAB
        | {
            "sbatch_options": ["--constraint=a100", "--exclusive"],
            "setup": ["module load cuda/12.4"],
            "python": "/shared/venv/bin/python",
            "environment": {"HF_HOME": "/shared/hf"},
        },
    )
    provider = load(settings)["lab"]
    text = slurm.script(provider, 7, tmp_path / "logs", job_name(settings, 7))
    lines = text.splitlines()
    assert lines[0] == "#!/bin/bash"
    assert job_name(settings, 7).startswith("tuneboard-") and job_name(settings, 7, 2).endswith("-run-7-2")
    assert "umask 077" in lines  # the worker's files (its settings hold the database's address) are its own
    for option in (
        f"--job-name={job_name(settings, 7)}",
        "--partition=gpu",
        "--time=04:00:00",
        "--gpus=1",
        "--constraint=a100",
        "--exclusive",
        "--signal=B:TERM@120",
        "--no-requeue",
        f"--output={tmp_path / 'logs'}/run-7-%j.out",
    ):
        assert f"#SBATCH {option}" in lines
    assert "module load cuda/12.4" in lines
    assert lines[-1] == "exec /shared/venv/bin/python -m app.cli worker --run 7"
    env = slurm.job_environment(provider, worker_environment(settings, provider))
    assert env["HF_HOME"] == "/shared/hf" and env["TUNEBOARD_GENERATION"] == "false"
    assert env["TUNEBOARD_SERVER_URL"] == f"http://{settings.host}:{settings.port}"
    assert env["TUNEBOARD_TOKEN"] == SECRET and SECRET not in text  # through the environment only


def test_a_run_for_a_provider_is_its_jobs_worker_alone(client, settings, db):
    write(settings, LAB)
    dataset = upload(client, "demo.json", DEMO_DATASET.read_bytes()).json()["id"]
    unknown = client.post("/api/runs", json={"dataset_id": dataset, "provider": "elsewhere"})
    assert unknown.status_code == 422
    assert "no compute provider 'elsewhere'" in unknown.json()["detail"][0]["message"]
    run = client.post("/api/runs", json={"dataset_id": dataset, "provider": "lab"})
    assert run.status_code == 201, run.text
    body = run.json()
    assert (body["provider"], body["cluster_jobs"], body["status"]) == ("lab", [], "queued")
    assert "Being submitted to lab (Slurm, partition gpu)" in client.get(f"/runs/{body['id']}").text
    with db.write_session() as session:
        assert jobs.claim_next(session=session, worker_id="any-worker") is None  # not an ordinary worker's
        claimed = jobs.claim(session=session, kind=jobs.TRAIN, worker_id="job-7", only=body["id"])
        assert claimed is not None and claimed.worker_id == "job-7"
    page = client.get("/runs/new").text
    assert 'id="provider"' in page and "lab (Slurm, partition gpu)" in page


def test_a_provider_caps_the_gpus_a_run_may_ask_for(client, settings):
    write(settings, LAB)
    dataset = upload(client, "demo.json", DEMO_DATASET.read_bytes()).json()["id"]
    refused = client.post("/api/runs", json={"dataset_id": dataset, "provider": "lab", "gpus": 2})
    assert refused.status_code == 422
    assert "a job on lab gets 1" in refused.json()["detail"][0]["message"]


class FakeSlurm:
    """Slurm's three calls, as the dispatcher makes them, answered from a table the test sets."""

    def __init__(self, monkeypatch) -> None:
        self.states: dict[str, str] = {}
        self.cancelled: list[str] = []
        monkeypatch.setattr(slurm, "find", lambda name, env=None: None)
        monkeypatch.setattr(slurm, "submit", self.submit)
        monkeypatch.setattr(slurm, "poll", self.poll)
        monkeypatch.setattr(slurm, "cancel", lambda job_id, env=None: self.cancelled.append(job_id))

    def submit(self, text, folder, env, chdir) -> str:
        job_id = str(100 + len(self.states))
        self.states[job_id] = "PENDING"
        return job_id

    def poll(self, job_ids, env=None) -> dict:
        return {i: slurm.JobState(self.states.get(i, "GONE"), None, "node1") for i in job_ids}


def test_the_dispatcher_resubmits_interruptions_and_gives_up_on_failures(client, settings, db, monkeypatch):
    """A job that ends while its worker trains sends the run to a new job; a job that ends before a worker
    of its own took the run counts as failed, and the third such failure fails the run with its log; a
    provider missing from the file leaves its jobs watched and its runs queued, never failed."""
    from app.models import ClusterJob, Run, RunStatus

    write(settings, LAB)
    fake = FakeSlurm(monkeypatch)
    dataset = upload(client, "demo.json", DEMO_DATASET.read_bytes()).json()["id"]
    run_id = client.post("/api/runs", json={"dataset_id": dataset, "provider": "lab"}).json()["id"]
    providers = load(settings)

    def jobs_of() -> list[ClusterJob]:
        with db.session() as session:
            return list(session.get(Run, run_id).cluster_jobs)

    # a controller that does not answer: the run waits, with a sentence, and nothing is submitted twice
    def unreachable(*args, **kwargs):
        raise slurm.SlurmError("Unable to contact slurm controller (connect failure)", unreachable=True)

    monkeypatch.setattr(slurm, "submit", unreachable)
    tick(settings, db, providers)
    with db.session() as session:
        waiting = session.get(Run, run_id)
        assert waiting.status == RunStatus.QUEUED and not waiting.cluster_jobs
        assert "Slurm did not answer (Unable to contact slurm controller" in (waiting.phase or "")
    monkeypatch.setattr(slurm, "submit", fake.submit)
    tick(settings, db, providers)
    assert [(j.job_id, j.state) for j in jobs_of()] == [("100", "PENDING")]
    # its worker (named after the job) takes the run; the job is preempted: the run waits for a new job
    with db.write_session() as session:
        jobs.claim(session=session, kind=jobs.TRAIN, worker_id="node1:job-100:42", only=run_id)
    fake.states["100"] = "RUNNING"
    tick(settings, db, providers)
    fake.states["100"] = "PREEMPTED"
    tick(settings, db, providers)  # the run back to the queue (its worker is gone), and a new job
    assert [(j.job_id, j.state) for j in jobs_of()] == [("100", "PREEMPTED"), ("101", "PENDING")]
    # a provider that left the file: its job is still followed, the run is not given up
    tick(settings, db, {})
    with db.session() as session:
        assert session.get(Run, run_id).status == RunStatus.QUEUED
    # jobs whose worker never takes the run (it cannot reach this server): the third fails it
    for job_id in ("101", "102", "103"):
        fake.states[job_id] = "COMPLETED"
        tick(settings, db, providers)
    with db.session() as session:
        run = session.get(Run, run_id)
        assert (
            run.status == RunStatus.FAILED and "3 jobs on lab failed without finishing this run" in run.error
        )
    assert [j.job_id for j in jobs_of()] == ["100", "101", "102", "103"]
    assert fake.cancelled == []
