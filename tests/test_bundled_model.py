"""The real bundled SmolLM2 GGUF converts once into a safetensors folder that loads to the same model."""

from __future__ import annotations

import json

import pytest

from app.datasets.stats import read_tokenizer_info, token_lengths
from app.model_registry import bundled_gguf, is_model_folder
from worker.prepare import run_conversion


@pytest.mark.slow
def test_bundled_gguf_converts_to_an_equivalent_safetensors_folder(bundled_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = bundled_gguf()
    target = bundled_model_dir
    assert is_model_folder(target)
    assert "quantization_config" not in json.loads((target / "config.json").read_text())
    assert not list(target.parent.glob(".*partial-*"))

    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(target)
    converted = AutoModelForCausalLM.from_pretrained(target)
    original = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        a = converted(**ids).logits
        b = original(**ids).logits
    assert torch.allclose(a, b, atol=1e-5)

    # The web process's torch-free statistics count exactly what the real tokenizer produces.
    row = {"messages": messages + [{"role": "assistant", "content": "Paris."}]}
    expected = len(tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=False))
    assert token_lengths([row], read_tokenizer_info(target), "chat") == [expected]


def test_a_broken_gguf_fails_with_a_reason(tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"this is not a gguf file")
    reason = run_conversion(broken, tmp_path / "out")
    assert reason is not None and reason.startswith("Could not convert broken.gguf to a transformers model:")
    assert not (tmp_path / "out").exists()
