"""`python -m bench.compile`: does torch.compile pay for itself on this machine's training steps?

Times one LoRA training step of the bundled SmolLM2 (bf16 base, batch 4 of ~160 tokens, 2 threads) eagerly
and under `torch.compile(dynamic=True)`: the first step (which includes compiling) and the mean of six
steady steps of varied lengths.
"""

from __future__ import annotations

import time

import torch

from app.config import Settings
from bench.__main__ import bundled_model

LENGTHS = (150, 170, 160, 180, 140, 165)


def main() -> None:
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(bundled_model(Settings()), dtype=torch.bfloat16)
    model.config.use_cache = False
    config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(model, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(forward, length: int) -> float:
        started = time.perf_counter()
        ids = torch.randint(0, 40_000, (4, length))
        forward(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return time.perf_counter() - started

    for name, forward in (("eager", model), ("torch.compile", torch.compile(model, dynamic=True))):
        first = step(forward, 160)
        steady = sum(step(forward, n) for n in LENGTHS) / len(LENGTHS)
        print(f"{name}: first step {first:.1f} s, then {steady:.2f} s per step", flush=True)


if __name__ == "__main__":
    main()
