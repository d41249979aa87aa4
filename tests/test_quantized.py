"""QLoRA: a run whose base model is loaded 4-bit (NF4, double quantisation) or 8-bit by bitsandbytes, with
PEFT's k-bit preparation, trains its adapter like any run (bitsandbytes quantises and trains on the CPU
too); methods whose layers cannot wrap quantised layers are refused with a sentence; the memory estimate
counts the quantised weights."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from app.config import Settings
from app.playground import resolve
from app.runs.estimate import QUANTIZED_BYTES, weights_bytes
from app.runs.shapes import Shapes
from tests.conftest import DEMO_DATASET, NO_SCORING, fast_settings, upload
from tests.test_engine import GREEDY, QUESTION, collect, reference
from worker.engine import AdapterRef, Engine, PaneRequest
from worker.main import work_once


@pytest.fixture
def settings(tmp_path: Path, database: str | None) -> Settings:
    return fast_settings(tmp_path, database)


@pytest.fixture
def queue(client, tiny_model_dir):
    model = client.post("/api/models", json={"path": str(tiny_model_dir)}).json()["id"]
    dataset = upload(client, "demo.json", DEMO_DATASET.read_bytes()).json()["id"]

    def queue(method: str = "lora", quantization: str = "4bit", gpus: int = 0, **training):
        body = {
            "dataset_id": dataset,
            "base_model": model,
            "method": method,
            "gpus": gpus,
            "training": {"dtype": "float32", "quantization": quantization, **training},
            "evaluation": NO_SCORING,
        }
        return client.post("/api/runs", json=body)

    return queue


@pytest.mark.trains
def test_a_4bit_base_model_trains_a_lora_adapter(client, settings, db, queue):
    run = queue(max_steps=6, logging_steps=2, save_steps=3)
    assert run.status_code == 201, run.text
    assert work_once(settings, db, me="w1", stop=threading.Event())
    done = client.get(f"/api/runs/{run.json()['id']}").json()
    assert done["status"] == "succeeded", done["error"]
    folder = settings.runs_dir / str(done["id"])
    log = (folder / "train.log").read_text()
    assert "(base model 4bit)" in log
    losses = [p["loss"] for p in client.get(f"/api/runs/{done['id']}/metrics").json() if p["kind"] == "train"]
    assert len(losses) == 3 and all(loss > 0 for loss in losses)
    adapter = load_file(folder / "adapter" / "adapter_model.safetensors")
    trained = [name for name, tensor in adapter.items() if "lora_B" in name and tensor.abs().sum() > 0]
    assert trained, "the adapter did not train"  # lora_B starts at zero: only training moves it
    assert len(trained) == 2 * 7  # every linear layer of both decoder layers

    # The playground and /v1 answer with it on the base loaded 4-bit, as it trained; the base model's own
    # pane beside it stays in full precision.
    with db.session() as session:
        target = resolve(settings, f"run-{done['id']}", session=session)
    assert target.quantization == "4bit"
    engine = Engine(device="cpu", dtype=torch.float32)
    tuned = PaneRequest(
        model_key=target.base_model,
        model_path=target.model_path,
        adapter=AdapterRef(target.id, target.adapter_path),
        messages=QUESTION,
        quantization=target.quantization,
    )
    base = PaneRequest(
        model_key=target.base_model, model_path=target.model_path, adapter=None, messages=QUESTION
    )
    results, _ = collect(engine, [base, tuned], GREEDY)
    assert results[1].text == reference(target.model_path, target.adapter_path, tuned, GREEDY.max_new_tokens)
    assert results[0].text == reference(target.model_path, None, base, GREEDY.max_new_tokens)
    slots = {slot.key: slot for slot in engine.slots.values()}
    assert set(slots) == {target.base_model, f"{target.base_model} (4bit)"}
    assert slots[f"{target.base_model} (4bit)"].adapters.keys() == {target.id}
    layers = {type(m).__name__ for m in slots[f"{target.base_model} (4bit)"].model.modules()}
    assert "Linear4bit" in layers
    assert "Linear4bit" not in {type(m).__name__ for m in slots[target.base_model].model.modules()}


def test_methods_that_cannot_wrap_quantised_layers_are_refused(queue):
    refused = queue(method="loha")
    assert refused.status_code == 422
    problem = refused.json()["detail"][0]
    assert (
        problem["field"] == "training.quantization" and "cannot wrap a 4-bit or 8-bit" in problem["message"]
    )
    assert queue(method="ia3", quantization="8bit").status_code == 201
    several = queue(gpus=2)
    assert several.status_code == 422 and "trains on one GPU here" in several.json()["detail"][0]["message"]


def test_the_estimate_counts_quantised_weights(tiny_model_dir, tmp_path):
    shapes = Shapes.read(tiny_model_dir)
    assert shapes is not None
    assert weights_bytes(shapes, "none", 2) == shapes.total() * 2
    # the decoder layers' linear weights quantised; the rest in float32 (PEFT's k-bit preparation)
    linear = shapes.layers * sum(a * b for a, b in shapes.linear().values())
    for quantization in ("4bit", "8bit"):
        expected = int(linear * QUANTIZED_BYTES[quantization] + (shapes.total() - linear) * 4)
        assert weights_bytes(shapes, quantization, 2) == expected
    # a 7B-shaped model: 4-bit weights a third of bf16's (embeddings and output layer in float32), under 5 GiB
    seven = Shapes.read(seven_b_shaped(tmp_path, tiny_model_dir))
    assert seven is not None and seven.hidden == 4096 and seven.layers == 32
    assert weights_bytes(seven, "4bit", 2) < weights_bytes(seven, "none", 2) / 3
    assert weights_bytes(seven, "4bit", 2) < 5 * 2**30


def seven_b_shaped(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """A model folder shaped like a 7B Llama (its configuration; the weights file is only checked, never
    loaded), with the tiny model's tokenizer."""
    big = tmp_path / "seven-b"
    big.mkdir(exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, big / name)
    config = json.loads((tiny_model_dir / "config.json").read_text())
    config |= {
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "tie_word_embeddings": False,
    }
    config |= {"num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 128, "vocab_size": 32000}
    (big / "config.json").write_text(json.dumps(config))
    save_file({"model.norm.weight": torch.ones(4096)}, str(big / "model.safetensors"))
    return big


def test_a_run_too_large_for_the_machine_is_offered_4bit(client, tiny_model_dir, tmp_path, monkeypatch):
    """A 7B-shaped model (its configuration; the fit check reads no weights) on a machine of 32 GiB: in
    bf16 it cannot train here, 4-bit it can, and the refusal says so, with the page's one-click fix."""
    from app.runs import launch

    big = seven_b_shaped(tmp_path, tiny_model_dir)
    monkeypatch.setattr(launch, "meminfo_bytes", lambda name: 32 * 2**30)
    model = client.post("/api/models", json={"path": str(big)}).json()["id"]
    dataset = upload(client, "demo.json", DEMO_DATASET.read_bytes()).json()["id"]
    body = {"dataset_id": dataset, "base_model": model, "evaluation": NO_SCORING}
    refused = client.post("/api/runs", json=body)
    assert refused.status_code == 422
    said = refused.json()["detail"][0]["message"]
    assert "does not fit" in said and "With the base model loaded 4-bit (QLoRA) it needs about" in said
    page = client.post("/runs/estimate", data={"dataset_id": str(dataset), "base_model": model}).text
    assert 'data-set-field="training.quantization" data-value="4bit"' in page
    body["training"] = {"quantization": "4bit"}
    assert client.post("/api/runs", json=body).status_code == 201


def lora_gradients(model_dir: Path, *, kept: bool, scored_first: bool) -> dict[str, torch.Tensor]:
    """The LoRA weights' gradients of one training step of the tiny model loaded 4-bit, taken (with
    `scored_first`) after an eval-mode forward without gradients, as scoring answers runs one."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    from worker.quantized import keep_trainable, loading_arguments

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, **loading_arguments("4bit", torch.float32))
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if kept:
        keep_trainable(model)
    config = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)  # B non-zero: A learns too
    model = get_peft_model(model, config)
    ids = torch.tensor([[5, 9, 23, 42, 7, 11, 3, 19]])
    if scored_first:
        model.eval()
        with torch.no_grad():
            model(input_ids=ids)
        model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_scoring_answers_between_steps_leaves_a_4bit_model_learning(tiny_model_dir):
    """bitsandbytes repacks 4-bit layers for its CPU inference kernel on an eval-mode forward without
    gradients (AVX512-BF16 CPUs), and that kernel passes no gradient back: the bundled model's QLoRA run
    stopped learning after scoring the base model's answers. Training keeps the trainable layout."""
    from bitsandbytes.functional import has_avx512bf16

    before = lora_gradients(tiny_model_dir, kept=True, scored_first=False)
    after = lora_gradients(tiny_model_dir, kept=True, scored_first=True)
    assert before.keys() == after.keys() and len(before) == 2 * 7 * 2  # A and B of every linear layer
    for name, gradient in before.items():
        assert torch.allclose(gradient, after[name], atol=1e-6), name
    if has_avx512bf16():  # on such a CPU, without it the gradients go wrong: the check above has teeth here
        with pytest.warns(UserWarning, match="gemv_4bit: an autograd kernel was not registered"):
            broken = lora_gradients(tiny_model_dir, kept=False, scored_first=True)
        assert any(not torch.allclose(g, broken[n], atol=1e-6) for n, g in before.items())
