"""The model card (README.md) pushed with a published adapter or export: metadata the Hub reads (base model,
library, tags) through `huggingface_hub`'s ModelCard, and a page for people: what it is, the dataset, the
method and its settings, the evaluation against the base model at every checkpoint, and how to load it.
Rendered from `templates/hub/model_card.md` with the run's stored settings and scored answers."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from app.config import PROJECT_ROOT
from app.exports import FORMATS, MODELFILE
from app.model_registry import hub_id
from app.models import Dataset, Run
from app.runs import evaluation

TEMPLATE = PROJECT_ROOT / "templates" / "hub" / "model_card.md"
SPLITS = (("validation", "held-out"), ("train", "training-row"))


def _settings(run: Run) -> list[tuple[str, str]]:
    config, training = run.config, run.config.get("training", {})
    peft = config.get("peft") or {}
    rows = [("method", run.method)]
    rows += [(key, _value(value)) for key, value in sorted(peft.items()) if value is not None]
    for key in (
        "num_train_epochs",
        "learning_rate",
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "max_length",
        "lr_scheduler_type",
        "quantization",
        "seed",
    ):
        if key in training:
            rows.append((key.replace("_", " "), _value(training[key])))
    rows.append(("steps", str(run.total_steps or config.get("total_steps") or "—")))
    if config.get("start_run_id"):
        rows.append(("started from", f"run {config['start_run_id']}'s adapter"))
    return rows


def _value(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def _evaluation(session: Session, run: Run) -> dict[str, Any] | None:
    scored = evaluation.summary(session=session, run=run)
    splits = [(key, label) for key, label in SPLITS if any(key in step for step in scored["steps"])]
    if not splits:
        return None
    table = []
    for step in scored["steps"]:
        cells = []
        for key, _ in splits:
            scores = step.get(key)
            cells += [f"{scores['chrf']:.1f}", f"{scores['exact']:.0f}%"] if scores else ["—", "—"]
        label = "0 (base model)" if step["step"] == 0 else str(step["step"])
        table.append({"step": label, "cells": cells})
    counts = [
        f"{step[key]['rows']} {label} rows" for key, label in splits if (step := scored["steps"][-1]).get(key)
    ]
    return {
        "splits": [{"label": label} for _, label in splits],
        "table": table,
        "best_step": scored["best_step"],
        "rows": " and ".join(counts) or "sampled rows",
    }


def _loading(run: Run, what: str, repo_id: str, base: str, hub: bool, file_name: str | None) -> str:
    quantized = run.config.get("training", {}).get("quantization", "none")
    if what == "adapter":
        if hub:
            text = (
                "With PEFT and transformers (the base model is downloaded with it):\n\n```python\n"
                "from peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer\n\n"
                f'model = AutoPeftModelForCausalLM.from_pretrained("{repo_id}")\n'
                f'tokenizer = AutoTokenizer.from_pretrained("{base}")\n```'
            )
        else:
            text = (
                f"The base model, {base}, is not on the Hub: load it from where it is, then the adapter.\n\n"
                "```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM, "
                'AutoTokenizer\n\nbase = AutoModelForCausalLM.from_pretrained("path/to/the/base/model")\n'
                f'model = PeftModel.from_pretrained(base, "{repo_id}")\n'
                'tokenizer = AutoTokenizer.from_pretrained("path/to/the/base/model")\n```'
            )
        if quantized != "none":
            text += (
                f"\n\nIt was trained on the base model loaded {quantized}"
                + (" (QLoRA)" if quantized == "4bit" else "")
                + ": it answers as it was "
                "measured with the base loaded the same way, `quantization_config=BitsAndBytesConfig("
                + (
                    'load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)`.'
                    if quantized == "4bit"
                    else "load_in_8bit=True)`."
                )
            )
        return text
    if what == "merged":
        return (
            "The adapter is merged into the base model's weights: it loads like any model.\n\n```python\n"
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")\n```'
        )
    fetch = f"hf download {repo_id} --local-dir {repo_id.split('/')[-1]}"
    if FORMATS[what].adapter_only:
        return (
            f"A LoRA adapter in GGUF for llama.cpp, over the base model's own GGUF file:\n\n```sh\n{fetch}\n"
            f"llama-cli -m BASE-MODEL.gguf --lora {file_name}\n```\n\nWith Ollama: the `{MODELFILE}` "
            "names the base model and this adapter (`ollama create NAME -f Modelfile`)."
        )
    return (
        f"One GGUF file for llama.cpp, Ollama and LM Studio, with its Ollama `{MODELFILE}` (chat template "
        f"and stop tokens):\n\n```sh\n{fetch}\ncd {repo_id.split('/')[-1]}\n"
        f"ollama create {repo_id.split('/')[-1].lower()} -f {MODELFILE}\n"
        f"llama-cli -m {file_name} -cnv\n```"
    )


def model_card(
    session: Session, run: Run, *, what: str, repo_id: str, endpoint: str, file_name: str | None = None
) -> str:
    """The README.md for `repo_id` on the hub at `endpoint`: `what` is "adapter" or an export format
    (app.exports.FORMATS)."""
    from huggingface_hub import ModelCard, ModelCardData

    dataset = session.get(Dataset, run.dataset_id)
    base = hub_id(run.base_model)
    is_gguf = what != "adapter" and what != "merged"
    tags = ["tuneboard", run.method] + (["gguf"] if is_gguf else []) + (["peft"] if what == "adapter" else [])
    data = ModelCardData(
        base_model=base,
        library_name="peft" if what == "adapter" else ("transformers" if what == "merged" else None),
        pipeline_tag="text-generation",
        tags=tags,
    )
    if what == "adapter":
        summary = f"A {run.method} adapter (run #{run.id}, *{run.name}*)."
    else:
        summary = f"{FORMATS[what].label} of run #{run.id}, *{run.name}*: {FORMATS[what].hint}"
    card = ModelCard.from_template(
        data,
        template_str=TEMPLATE.read_text(encoding="utf-8"),
        name=repo_id.split("/")[-1],
        summary=summary,
        base_model=base or run.base_model,
        base_link=f"{endpoint}/{base}" if base else None,
        dataset={
            "name": dataset.name if dataset else f"dataset {run.dataset_id}",
            "rows": dataset.rows if dataset else "?",
            "format": dataset.format if dataset else "?",
        },
        settings=_settings(run),
        evaluation=_evaluation(session, run),
        loading=_loading(run, what, repo_id, base or run.base_model, base is not None, file_name),
    )
    return str(card)
