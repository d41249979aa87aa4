"""The training process itself, in this interpreter, on the tiny model: labels, batching, every PEFT
method, the saved adapter."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from app.datasets.formats import parse_dataset
from app.datasets.split import validation_rows
from app.peft_methods import METHODS
from app.runs.config import (
    EvaluationParams,
    RunConfig,
    TrainingParams,
    resolve_training,
    validate_peft,
)
from tests.conftest import DEMO_DATASET, NO_SCORING
from worker.data import IGNORE_INDEX, LengthBucketSampler, encode_row, packing_collator, pad_collator
from worker.sink import Sink
from worker.train import build_trainer, train, write_config

ROW = {
    "messages": [
        {"role": "user", "content": "What is the capital of Quillmere?"},
        {"role": "assistant", "content": "Tessary, on the northern coast."},
    ],
    "alpaca": {"instruction": "What is the capital of Quillmere?", "input": ""},
}


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def learned_text(example, tokenizer) -> str:
    return tokenizer.decode([t for t in example["labels"] if t != IGNORE_INDEX])


def test_chat_labels_are_exactly_the_answer_and_eos(tokenizer):
    example = encode_row(ROW, tokenizer, "chat", max_length=512)
    assert learned_text(example, tokenizer) == "Tessary, on the northern coast.<|im_end|>"
    assert len(example["labels"]) == len(example["input_ids"])
    unmasked = [i for i, t in enumerate(example["labels"]) if t != IGNORE_INDEX]
    assert unmasked == list(range(unmasked[0], unmasked[-1] + 1))  # one contiguous answer
    assert all(example["input_ids"][i] == example["labels"][i] for i in unmasked)  # aligned, not shifted


def test_tutorial_layout_labels(tokenizer):
    row = {**ROW, "alpaca": {"instruction": "Name the capital.", "input": "Quillmere"}}
    example = encode_row(row, tokenizer, "instruction", max_length=512)
    assert learned_text(example, tokenizer) == "Tessary, on the northern coast.<|im_end|>"
    prompt = tokenizer.decode(
        [t for t, label in zip(example["input_ids"], example["labels"], strict=True) if label == IGNORE_INDEX]
    )
    assert prompt == "Instruction: Name the capital.\nInput: Quillmere\nAnswer: "


def test_every_assistant_turn_is_learned_in_multi_turn_rows(tokenizer):
    row = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital?"}, {"role": "assistant", "content": "Tessary."},
        {"role": "user", "content": "Currency?"}, {"role": "assistant", "content": "The brindle."},
    ]}  # fmt: skip
    example = encode_row(row, tokenizer, "chat", max_length=512)
    assert learned_text(example, tokenizer) == "Tessary.<|im_end|>The brindle.<|im_end|>"


def test_truncation_keeps_labels_aligned_and_drops_rows_with_no_answer_left(tokenizer):
    full = encode_row(ROW, tokenizer, "chat", max_length=512)
    cut = encode_row(ROW, tokenizer, "chat", max_length=len(full["input_ids"]) - 3)
    assert cut["input_ids"] == full["input_ids"][:-3] and cut["labels"] == full["labels"][:-3]
    prompt_tokens = full["labels"].index(next(t for t in full["labels"] if t != IGNORE_INDEX))
    assert encode_row(ROW, tokenizer, "chat", max_length=prompt_tokens) is None


def test_length_buckets_cover_every_row_once_and_change_order_per_epoch():
    lengths = [5, 50, 7, 48, 6, 52, 9, 47, 30, 31]
    sampler = LengthBucketSampler(lengths, max_rows=2, budget=None, seed=1)
    first = list(sampler)
    assert sorted(i for batch in first for i in batch) == list(range(10))
    assert all(abs(lengths[a] - lengths[b]) <= 3 for a, b in first)  # similar lengths share a batch
    assert list(sampler) == first  # same epoch, same order (a resumed run skips the same batches)
    sampler.set_epoch(1)
    assert list(sampler) != first


def test_packed_and_padded_batches_give_the_same_loss(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.config.use_cache = False
    rows = parse_dataset(DEMO_DATASET.read_bytes()).rows[:4]
    examples = [encode_row(r, tokenizer, "chat", 512) for r in rows]
    padded = pad_collator(tokenizer)(examples)
    packed = packing_collator()(examples)
    assert padded["input_ids"].shape[0] == 4 and packed["input_ids"].shape[0] == 1
    assert packed["input_ids"].shape[1] == sum(len(e["input_ids"]) for e in examples)
    with torch.no_grad():
        loss_padded = model(**padded).loss
        loss_packed = model(**packed).loss
    assert torch.allclose(loss_padded, loss_packed, atol=1e-5), (loss_padded, loss_packed)


def make_config(tmp_path: Path, model_dir: Path, method: str, **training) -> RunConfig:
    parsed = parse_dataset(DEMO_DATASET.read_bytes())
    rows_file = tmp_path / "rows.jsonl"
    rows_file.write_text("".join(json.dumps(r) + "\n" for r in parsed.rows), encoding="utf-8")
    held_out = validation_rows(len(parsed.rows), fraction=0.1, max_rows=500, seed=42)
    params, total = resolve_training(method, len(parsed.rows) - len(held_out), TrainingParams(**training))
    return RunConfig(
        name="test", dataset_id=1, dataset_path=str(rows_file), base_model="tiny", model_path=str(model_dir),
        method=method, prompt_format="chat", peft=validate_peft(method, {}), training=params,
        train_rows=len(parsed.rows) - len(held_out), validation_rows=held_out, total_steps=total,
        output_dir=str(tmp_path / "run"), evaluation=EvaluationParams(**NO_SCORING),  # no test here scores
    )  # fmt: skip


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_peft_method_trains_and_saves_a_loadable_adapter(tmp_path, tiny_model_dir, tokenizer, method):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = make_config(tmp_path, tiny_model_dir, method, max_steps=2, dtype="float32")
    trainer, _, _ = build_trainer(config, Sink(), None)
    trainer.train()
    adapter = tmp_path / "adapter"
    trainer.model.save_pretrained(adapter)
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()

    batch = tokenizer(
        ["<|im_start|>user\nWhat is the capital of Quillmere?<|im_end|>\n"], return_tensors="pt"
    )
    trained = trainer.model.eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with warnings.catch_warnings():
        # PEFT's AdaLoRA saves its rank pattern under `…lora_E` names that its own loader then reports as
        # unmatched; the weights load all the same (the logits below prove it).
        warnings.filterwarnings("ignore", "The following rank_pattern keys did not match", RuntimeWarning)
        reloaded = PeftModel.from_pretrained(base, adapter).eval()
    with torch.no_grad():
        expected = trained(**batch).logits
        actual = reloaded(**batch).logits
    assert torch.allclose(expected, actual, atol=1e-5)


def test_lora_variants_dora_and_rslora(tmp_path, tiny_model_dir):
    config = make_config(tmp_path, tiny_model_dir, "lora", max_steps=1, dtype="float32")
    config = config.model_copy(update={"peft": validate_peft("lora", {"use_dora": True, "use_rslora": True})})
    trainer, _, _ = build_trainer(config, Sink(), None)
    assert trainer.model.peft_config["default"].use_dora and trainer.model.peft_config["default"].use_rslora
    trainer.train()


@pytest.mark.trains
def test_a_run_trains_from_its_yaml_and_the_loss_falls(tmp_path, tiny_model_dir):
    from worker.train import main

    config = make_config(tmp_path, tiny_model_dir, "lora", max_steps=30, learning_rate=3e-3, logging_steps=5)
    write_config(config, tmp_path / "run.yaml")
    seen = []

    class Recorder(Sink):
        def metric(self, values):
            seen.append(values)

    assert train(config, Recorder()) == Path(config.output_dir) / "adapter"
    losses = [m["loss"] for m in seen if m["kind"] == "train"]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.1, losses
    assert all(m["tokens_per_second"] > 0 and m["memory_mb"] > 0 for m in seen if m["kind"] == "train")
    assert any(m["kind"] == "eval" for m in seen)
    checkpoints = sorted(p.name for p in (Path(config.output_dir) / "checkpoints").iterdir())
    assert len(checkpoints) <= config.training.save_total_limit
    # the same file runs again without the web app (and resumes from the last complete checkpoint)
    assert main([str(tmp_path / "run.yaml")]) == 0


def test_gradient_checkpointing_trains(tmp_path, tiny_model_dir):
    config = make_config(tmp_path, tiny_model_dir, "lora", max_steps=2, gradient_checkpointing=True)
    trainer, _, _ = build_trainer(config, Sink(), None)
    assert trainer.model.base_model.model.is_activation_checkpointing
    assert trainer.train().global_step == 2


@pytest.mark.parametrize("collate", ["padded", "packed"])
def test_answer_only_loss_equals_the_models_own_loss(tiny_model_dir, tokenizer, collate):
    from transformers import AutoModelForCausalLM

    from worker.trainer import answer_only_loss

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.config.use_cache = False
    rows = parse_dataset(DEMO_DATASET.read_bytes()).rows[:4]
    examples = [encode_row(r, tokenizer, "chat", 512) for r in rows]
    batch = (pad_collator(tokenizer) if collate == "padded" else packing_collator())(examples)
    with torch.no_grad():
        expected = model(**batch).loss
        actual, outputs = answer_only_loss(model, dict(batch))
    assert torch.allclose(actual, expected, atol=1e-6)
    assert outputs.logits.shape[1] < batch["input_ids"].shape[1]  # prompt positions were never projected


def test_checkpointing_comes_on_by_itself_when_the_batch_would_not_fit(tmp_path, tiny_model_dir, monkeypatch):
    """Left to Tuneboard, gradient checkpointing is on only when the free memory is short without it; a run
    that cannot fit even with it stops before loading, with a sentence."""
    from app.runs.estimate import memory_needed
    from worker.hardware import choose_dtype
    from worker.train import UserError

    config = make_config(tmp_path, tiny_model_dir, "lora", max_steps=1)
    assert config.training.gradient_checkpointing is None
    trainer, _, _ = build_trainer(config, Sink(), None)  # this machine has room
    assert not trainer.model.base_model.model.is_activation_checkpointing
    lengths = [len(e["input_ids"]) for e in trainer.train_dataset.examples]
    needed = memory_needed(config, lengths, None, weight_bytes=torch.finfo(choose_dtype("auto")).bits // 8)
    assert needed is not None
    without, with_ = needed["memory_without_checkpointing"], needed["memory_bytes"]
    monkeypatch.setattr("worker.hardware.available_memory_bytes", lambda: int((with_ + without) / 2 * 1.2))
    (tmp_path / "b").mkdir()
    (tmp_path / "c").mkdir()
    trainer, _, _ = build_trainer(
        make_config(tmp_path / "b", tiny_model_dir, "lora", max_steps=1), Sink(), None
    )
    assert trainer.model.base_model.model.is_activation_checkpointing
    monkeypatch.setattr("worker.hardware.available_memory_bytes", lambda: int(with_ * 0.9))
    with pytest.raises(UserError, match=r"This run does not fit: it needs about"):
        build_trainer(make_config(tmp_path / "c", tiny_model_dir, "lora", max_steps=1), Sink(), None)


def test_a_model_too_big_for_memory_is_refused_before_loading(tmp_path, tiny_model_dir, monkeypatch):
    from worker.train import UserError

    monkeypatch.setattr("worker.hardware.available_memory_bytes", lambda: 1000)
    config = make_config(tmp_path, tiny_model_dir, "lora", max_steps=1)
    with pytest.raises(UserError, match=r"does not fit: it needs about .* GiB and 0\.0 GiB of memory is"):
        build_trainer(config, Sink(), None)


def test_failures_are_explained_in_one_sentence():
    import errno

    from worker.train import explain

    assert explain(torch.OutOfMemoryError("CUDA out of memory")).startswith("Out of memory while training.")
    assert explain(MemoryError()).startswith("Out of memory while training.")
    assert explain(OSError(errno.ENOSPC, "No space left")).startswith("The disk is full")
    assert (
        explain(ValueError("bad combination"))
        == "Training could not start with these settings: bad combination"
    )
