"""Launching runs through the API: defaults from the dataset, presets, and clear 422s."""

from __future__ import annotations

import pytest

from tests.conftest import DEMO_DATASET, upload


@pytest.fixture
def dataset_id(client) -> int:
    return upload(client, "demo.json", DEMO_DATASET.read_bytes()).json()["id"]


def test_dataset_id_alone_launches_a_good_default_run(client, dataset_id):
    response = client.post("/api/runs", json={"dataset_id": dataset_id})
    assert response.status_code == 201, response.text
    run = response.json()
    assert run["status"] == "queued" and run["attempts"] == 0
    assert run["base_model"] == "smollm2-135m-instruct" and run["method"] == "lora"
    config = run["config"]
    # 40 rows, each a fact to learn: every row trains by default (100 rows and more keep a held-out split)
    assert config["train_rows"] == 40 and config["validation_rows"] == []
    assert config["peft"]["r"] == 16 and config["peft"]["target_modules"] == "all-linear"
    training = config["training"]
    # 40 rows at batch 4 are 10 steps an epoch: a small set gets enough epochs and a rate that shows.
    assert training["per_device_train_batch_size"] == 4
    assert training["num_train_epochs"] == 20 and config["total_steps"] == 200
    assert training["learning_rate"] == 1e-3
    assert training["logging_steps"] == 2 and training["save_steps"] == 40  # a point per 1%, 5 checkpoints
    assert config["prompt_format"] == "chat"
    assert client.get(f"/api/runs/{run['id']}").json()["config"] == config
    assert [r["id"] for r in client.get("/api/runs").json()] == [run["id"]]


def test_each_run_chooses_its_held_out_rows(client, dataset_id):
    """The held-out split is per run: none at all (every row trains), a larger share, or a row limit."""

    def held_out(**evaluation) -> list[int]:
        body = {"dataset_id": dataset_id, "evaluation": evaluation}
        response = client.post("/api/runs", json=body)
        assert response.status_code == 201, response.text
        config = response.json()["config"]
        assert config["train_rows"] + len(config["validation_rows"]) == 40
        return config["validation_rows"]

    assert held_out(held_out_fraction=0) == []
    assert len(held_out(held_out_fraction=0.25)) == 10
    assert len(held_out(held_out_fraction=0.25, held_out_max_rows=3)) == 3
    assert held_out() == held_out()  # the default split is stable
    response = client.post(
        "/api/runs", json={"dataset_id": dataset_id, "evaluation": {"held_out_fraction": 0.9}}
    )
    assert response.status_code == 422
    assert response.json()["detail"][0]["field"] == "evaluation.held_out_fraction"


def test_tutorial_preset_reproduces_the_recipe(client, dataset_id):
    run = client.post("/api/runs", json={"dataset_id": dataset_id, "preset": "tutorial"}).json()
    assert run["config"]["peft"] | {} == {
        "r": 8, "lora_alpha": 32.0, "lora_dropout": 0.1, "target_modules": ["q_proj", "v_proj"],
        "use_dora": False, "use_rslora": False, "bias": "none",
    }  # fmt: skip
    training = run["config"]["training"]
    assert (training["learning_rate"], training["per_device_train_batch_size"]) == (5e-5, 4)
    assert (training["gradient_accumulation_steps"], training["num_train_epochs"]) == (8, 50)
    custom = client.post(
        "/api/runs",
        json={"dataset_id": dataset_id, "preset": "tutorial", "training": {"learning_rate": 1e-4}},
    ).json()
    assert custom["config"]["training"]["learning_rate"] == 1e-4
    assert custom["config"]["peft"]["r"] == 8
    assert client.get("/api/runs/presets").json()["tutorial"]["peft"]["r"] == 8


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"training": {"learning_rate": -1}}, "training.learning_rate"),
        ({"training": {"per_device_train_batch_size": 0}}, "training.per_device_train_batch_size"),
        ({"training": {"max_steps": 0}}, "training.max_steps"),
        ({"training": {"lr_scheduler_type": "zigzag"}}, "training.lr_scheduler_type"),
        ({"training": {"bogus": 1}}, "training.bogus"),
        ({"method": "magic"}, "method"),
        ({"peft": {"r": 0}}, "peft.r"),
        ({"peft": {"rank": 4}}, "peft.rank"),
        ({"method": "adalora", "peft": {"init_r": 4, "target_r": 8}}, "peft"),
        ({"method": "prompt_tuning", "training": {"packing": True}}, "training.packing"),
        ({"method": "prompt_tuning", "peft": {"prompt_tuning_init": "TEXT"}}, "peft"),
        ({"base_model": "no/such-model"}, "base_model"),
        ({"prompt_format": "poem"}, "prompt_format"),
    ],
)
def test_invalid_values_are_422_naming_the_field(client, dataset_id, body, field):
    response = client.post("/api/runs", json={"dataset_id": dataset_id, **body})
    assert response.status_code == 422, response.text
    problems = response.json()["detail"]
    assert problems[0]["field"] == field, problems
    assert problems[0]["message"]
    assert client.get("/api/runs").json() == []


def test_unknown_dataset_is_422(client):
    response = client.post("/api/runs", json={"dataset_id": 77})
    assert response.status_code == 422
    assert response.json()["detail"][0] == {
        "row": None,
        "field": "dataset_id",
        "message": "There is no dataset 77.",
    }


def test_cancel_a_queued_run_and_what_cannot_be_done_twice(client, dataset_id):
    run = client.post("/api/runs", json={"dataset_id": dataset_id}).json()
    cancelled = client.post(f"/api/runs/{run['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    again = client.post(f"/api/runs/{run['id']}/cancel")
    assert again.status_code == 409 and "already cancelled" in again.json()["detail"][0]["message"]
    assert client.post("/api/runs/999/cancel").status_code == 404
    missing = client.get(f"/api/runs/{run['id']}/adapter")
    assert missing.status_code == 404 and "no adapter yet" in missing.json()["detail"][0]["message"]


def test_a_dataset_used_by_a_run_cannot_be_deleted(client, dataset_id):
    run = client.post("/api/runs", json={"dataset_id": dataset_id}).json()
    response = client.delete(f"/api/datasets/{dataset_id}")
    assert (
        response.status_code == 409 and f"used by run {run['id']}" in response.json()["detail"][0]["message"]
    )
