"""PEFT configurations for every method Tuneboard offers, from validated parameters (app.runs.config): the
registry (app.peft_methods) names each method's PEFT config class and what it needs besides its settings."""

from __future__ import annotations

from typing import Any

from app.peft_methods import method as peft_method


def build_peft_config(method: str, params: dict[str, Any], *, total_steps: int, model_path: str):
    import peft

    declared = peft_method(method)
    params = {k: v for k, v in params.items() if v is not None}
    if declared.total_steps_field:  # e.g. AdaLoRA's rank budget schedule needs the run's length
        params[declared.total_steps_field] = max(total_steps, 1)
    if params.get("prompt_tuning_init") == "TEXT":  # the initial prompt's text is tokenised by PEFT
        params["tokenizer_name_or_path"] = model_path
    config_class = getattr(peft, declared.peft_config)
    return config_class(task_type=peft.TaskType.CAUSAL_LM, **params)
