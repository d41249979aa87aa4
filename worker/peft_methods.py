"""PEFT configurations for every method Tuneboard offers, from validated parameters (app.runs.config)."""

from __future__ import annotations

from typing import Any


def build_peft_config(method: str, params: dict[str, Any], *, total_steps: int, model_path: str):
    import peft

    task = peft.TaskType.CAUSAL_LM
    params = {k: v for k, v in params.items() if v is not None}
    if method == "lora":
        return peft.LoraConfig(task_type=task, **params)
    if method == "loha":
        return peft.LoHaConfig(task_type=task, **params)
    if method == "lokr":
        return peft.LoKrConfig(task_type=task, **params)
    if method == "adalora":
        # AdaLoRA's rank budget schedule needs the run's length.
        return peft.AdaLoraConfig(task_type=task, total_step=max(total_steps, 1), **params)
    if method == "ia3":
        return peft.IA3Config(task_type=task, **params)
    if method == "prompt_tuning":
        if params.get("prompt_tuning_init") == "TEXT":
            params["tokenizer_name_or_path"] = model_path
        return peft.PromptTuningConfig(task_type=task, **params)
    if method == "prefix_tuning":
        return peft.PrefixTuningConfig(task_type=task, **params)
    if method == "p_tuning":
        return peft.PromptEncoderConfig(task_type=task, **params)
    raise ValueError(f"unknown method {method!r}")
