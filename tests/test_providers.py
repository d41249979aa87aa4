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
from app.providers.dispatch import worker_environment
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
    text = slurm.script(provider, 7, tmp_path / "logs")
    lines = text.splitlines()
    assert lines[0] == "#!/bin/bash"
    for option in (
        "--job-name=tuneboard-run-7",
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
