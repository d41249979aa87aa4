"""Token-budget batches (app.runs.batching), the sampler that draws them each epoch, and the memory that
decides gradient checkpointing and refuses a run that cannot fit."""

from __future__ import annotations

import pytest

from app.runs.batching import padded_tokens, plan_batches
from tests.conftest import DEMO_DATASET, upload
from worker.data import LengthBucketSampler

MIXED = [900, 120, 80, 1000, 100, 60, 700, 90, 110, 95]


def test_batches_fill_the_budget_and_long_rows_train_alone():
    batches = plan_batches(MIXED, max_rows=4, budget=1024)
    assert sorted(i for b in batches for i in b) == list(range(len(MIXED)))  # every row, once
    for batch in batches:
        assert len(batch) <= 4
        assert len(batch) == 1 or len(batch) * max(MIXED[i] for i in batch) <= 1024
    assert [len(b) for b in batches] == [4, 3, 1, 1, 1]  # seven short rows share two steps; long ones alone
    assert padded_tokens(MIXED, 4, 1024) == 1000
    # without a budget: a fixed row count, whatever the lengths (the largest batch pads to its longest)
    assert [len(b) for b in plan_batches(MIXED, max_rows=4, budget=None)] == [4, 4, 2]
    assert padded_tokens(MIXED, 4, None) == 2800  # 4 × 700


def test_the_sampler_draws_the_same_batch_sizes_in_a_new_order_each_epoch():
    lengths = [50, 50, 50, 50, 50, 50, 300, 300, 800]
    sampler = LengthBucketSampler(lengths, max_rows=4, budget=1024, seed=3)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    assert len(first) == len(second) == len(sampler) == 4
    assert first != second  # another order (and other rows together where lengths tie)
    assert (
        sorted(len(b) for b in first) == sorted(len(b) for b in second) == [1, 1, 3, 4]
    )  # 4 × 50 | 50, 50, 300 | 300 | 800
    sampler.set_epoch(0)
    assert list(sampler) == first  # a resumed run sees the same epoch again


@pytest.fixture
def small_machine(monkeypatch):
    """A machine with `gib` GiB: what the launch and the estimate read from /proc/meminfo."""

    def set_memory(gib: float) -> None:
        monkeypatch.setattr("app.runs.launch.meminfo_bytes", lambda field: int(gib * 2**30))
        monkeypatch.setattr("app.runs.estimate.meminfo_bytes", lambda field: int(gib * 2**30))

    return set_memory


def test_checkpointing_comes_on_when_needed_and_a_run_that_cannot_fit_is_refused(
    client, tiny_model_dir, small_machine
):
    model = client.post("/api/models", json={"path": str(tiny_model_dir)}).json()["id"]
    dataset = upload(client, "demo.json", DEMO_DATASET.read_bytes()).json()["id"]
    body = {
        "dataset_id": dataset,
        "base_model": model,
        "training": {"per_device_train_batch_size": 64, "batch_tokens": 65536},
    }

    small_machine(64)
    roomy = client.post("/api/runs/estimate", json=body).json()
    assert roomy["gradient_checkpointing"] is False
    without, needed = roomy["memory_without_checkpointing"], roomy["memory_bytes"]
    assert needed == without

    # a machine where the run fits only with checkpointing: on by itself, and the page says why
    gib = (without * 1.2 - 1) / 2**30  # the launch keeps a fifth spare
    small_machine(gib)
    tight = client.post("/api/runs/estimate", json=body).json()
    assert tight["gradient_checkpointing"] is True and tight["memory_bytes"] < without
    page = client.post("/runs/estimate", data={"dataset_id": str(dataset), "base_model": model})
    assert page.status_code == 200

    # a machine it cannot fit at all: refused before launch, with what to change
    small_machine(tight["memory_bytes"] / 2**30 / 2)
    refused = client.post("/api/runs", json=body)
    assert refused.status_code == 422
    problem = refused.json()["detail"][0]
    assert problem["field"] == "training.batch_tokens"
    assert "does not fit" in problem["message"] and "Lower batch tokens" in problem["message"]
    small_machine(tight["memory_parts"]["weights"] / 2**30 / 2)
    assert "base model alone does not fit" in client.post("/api/runs", json=body).text
