"""Several training processes per run through `accelerate launch`: on this machine's CPU (gloo), two
data-parallel processes, stopped after a checkpoint and resumed from it, train the adapter one process
trains uninterrupted at the same global batch; the commands a GPU worker runs for DDP and FSDP."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from app.config import PROJECT_ROOT
from app.runs.config import RunConfig
from tests.conftest import DEMO_DATASET, upload
from worker.evaluate import scored
from worker.hardware import usable_cores
from worker.supervise import launch_command, training_env
from worker.train import write_config

TOLERANCE = 1e-4  # float32 sums in another order: the adapters agree to about 1e-6


def train(settings, config: RunConfig, folder: Path, processes: int, **changes) -> tuple[dict, str]:
    """Train `config` (with `changes` to its training settings) in `folder` with `processes` processes;
    the adapter's tensors and the processes' output."""
    folder.mkdir(exist_ok=True)
    run_yaml = folder / "run.yaml"
    training = config.training.model_copy(update=changes)
    write_config(config.model_copy(update={"output_dir": str(folder), "training": training}), run_yaml)
    settings = settings.model_copy(update={"num_processes": processes, "torch_threads": 1})
    command = launch_command(settings, run_yaml, 1, distributed=config.distributed)
    done = subprocess.run(
        command, cwd=PROJECT_ROOT, env=training_env(settings, processes), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return load_file(folder / "adapter" / "adapter_model.safetensors"), done.stdout + done.stderr


def assert_same(one: dict, other: dict) -> None:
    assert one.keys() == other.keys() and one
    for name in one:
        assert (one[name] - other[name]).abs().max() < TOLERANCE, name


@pytest.mark.fleet
def test_two_processes_train_and_resume_the_adapter_one_process_trains(
    client, settings, tiny_model_dir, tmp_path
):
    model = client.post("/api/models", json={"path": str(tiny_model_dir)}).json()["id"]
    dataset = upload(client, "demo.json", DEMO_DATASET.read_bytes()).json()["id"]
    # a constant rate, so that a run resumed with more steps follows the same schedule
    training = {"dtype": "float32", "max_steps": 6, "per_device_train_batch_size": 2, "logging_steps": 1}
    training |= {"lr_scheduler_type": "constant", "warmup_ratio": 0.0, "save_steps": 3}
    body = {"dataset_id": dataset, "base_model": model, "training": training}
    body["evaluation"] = {"scored_held_out_rows": 0, "scored_train_rows": 0}
    run = client.post("/api/runs", json=body)
    assert run.status_code == 201, run.text
    config = RunConfig.model_validate(run.json()["config"])

    # one process accumulating two batches per step, uninterrupted, against two processes taking one batch
    # each, stopped after their checkpoint at step 3, then resumed to step 6
    one, _ = train(settings, config, tmp_path / "one", 1, gradient_accumulation_steps=2)
    two = tmp_path / "two"
    _, output = train(settings, config.model_copy(update={"total_steps": 3}), two, 2)
    assert "training with 2 processes (MULTI_CPU)" in output
    assert (two / "checkpoints" / "checkpoint-3" / "TUNEBOARD_COMPLETE").is_file()
    resumed, output = train(settings, config, two, 2)
    assert "resuming from checkpoint-3" in output and "training with 2 processes (MULTI_CPU)" in output
    assert all(resumed[n].abs().sum() for n in resumed if "lora_B" in n), "the adapter did not train"
    assert_same(one, resumed)


def test_a_run_asking_for_gpus_gets_a_process_per_gpu_data_parallel_or_sharded(settings):
    """The commands a GPU worker runs (FSDP needs GPUs: on a CPU, accelerate trains data parallel). One
    process starts the trainer directly: one interpreter, no launcher."""
    one = launch_command(settings, Path("run.yaml"), 1)
    assert one[:3] == [sys.executable, "-m", "worker.train"] and "accelerate.commands.launch" not in one
    assert one.count("run.yaml") == 1 and one[one.index("--attempt") + 1] == "1"
    two = launch_command(settings.model_copy(update={"num_processes": 2}), Path("run.yaml"), 1)
    assert two[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert two[two.index("--num_processes") + 1] == "2" and "--multi_gpu" in two
    ddp = launch_command(settings, Path("run.yaml"), 1, gpus=4)
    assert ddp[ddp.index("--num_processes") + 1] == "4" and "--multi_gpu" in ddp
    fsdp = launch_command(settings, Path("run.yaml"), 2, gpus=2, distributed="fsdp")
    assert "--use_fsdp" in fsdp and "--multi_gpu" not in fsdp  # accelerate takes one or the other
    assert fsdp[fsdp.index("--fsdp_version") + 1] == "2"
    assert fsdp[fsdp.index("--fsdp_state_dict_type") + 1] == "FULL_STATE_DICT"  # PEFT's usual files
    assert training_env(settings, 2)["ACCELERATE_USE_CPU"] == "1"  # several processes on a CPU: gloo
    assert "ACCELERATE_USE_CPU" not in training_env(settings, 2, gpus=True)
    assert training_env(settings.model_copy(update={"torch_threads": None}), 2)["OMP_NUM_THREADS"] == str(
        max(1, usable_cores() // 2)
    )


def test_answers_are_not_scored_when_fsdp_shards_the_model(settings):
    fsdp = RunConfig.model_construct(method="lora", distributed="fsdp", gpus=0)
    assert not scored(fsdp, processes=2) and scored(fsdp, processes=1)  # FSDP on one process shards nothing
    assert scored(RunConfig.model_construct(method="lora", distributed="ddp"), processes=2)
    assert not scored(RunConfig.model_construct(method="prefix_tuning", distributed="ddp"), processes=1)
