"""The New run form, generated from the same pydantic models the API validates with, and read back
into a RunRequest. Field names are `training.<TrainingArguments name>` and `peft.<PEFT name>`."""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel

from app.peft_methods import DEFAULT_METHOD
from app.peft_methods import method as peft_method
from app.runs.config import (
    PEFT_PARAMS,
    EvaluationParams,
    JudgeParams,
    PreferenceParams,
    RunConfig,
    TrainingParams,
)

# Shown in simple mode (a method's own: the registry's simple_fields); everything else sits under "Advanced".
SIMPLE_TRAINING = ("num_train_epochs", "learning_rate", "per_device_train_batch_size", "max_length")

HELP = {
    "num_train_epochs": "passes over the training rows; empty = chosen from the dataset size",
    "learning_rate": "empty = chosen from the method and dataset size",
    "max_steps": "-1 = train by epochs",
    "max_length": "longer rows are cut",
    "per_device_train_batch_size": "rows a step, at most; empty = 4, fewer when rows are long",
    "logging_steps": "a loss point every N steps; empty = about 100 points",
    "save_steps": "a checkpoint every N steps; empty = 5 per run",
    "eval_steps": "validation loss every N steps; empty = with each checkpoint",
    "packing": "pack rows into one sequence (not for prompt-learning methods)",
    "batch_tokens": "a batch holds at most this many tokens (rows × its longest row); empty = 1,024 with the "
    "default batch size, else fixed rows",
    "gradient_checkpointing": "recompute activations in the backward pass: far less memory, a little slower; "
    "auto = on when the run would not fit otherwise",
    "attention": "sdpa = PyTorch's fused attention; eager = plain attention (more memory on long rows)",
    "dtype": "auto = bf16 where the hardware is fast at it",
    "quantization": "4bit = QLoRA: the base model in NF4, about a quarter of its memory; 8bit: LLM.int8",
    "target_modules": "all-linear, or names separated by commas (q_proj, v_proj)",
    "r": "adapter rank",
    "held_out_fraction": "share of rows kept out of training to measure generalisation; 0 = train every row; "
    "empty = the server's default (10%)",
    "held_out_max_rows": "at most this many held-out rows; empty = the server's default",
    "scored_held_out_rows": "held-out rows answered and scored at every checkpoint; 0 = none",
    "scored_train_rows": "training rows answered and scored at each checkpoint (learned them?); 0 = none",
    "max_new_tokens": "longest answer generated for scoring",
    "early_stopping_patience": "stop after N checkpoints in a row with no better score; empty = never",
    "final_adapter": "best = the run's adapter is its best-scored checkpoint's",
    "model": "a model id of this server (Models page), or the model name at the URL below; empty = no judge",
    "url": "an OpenAI-compatible API ending in /v1; empty = this server's /v1",
    "rubric": "how the judge scores 1-10; empty = the built-in rubric (facts right, style ignored)",
    "select_by": "what picks the best checkpoint: an answer score on held-out rows, or the validation loss",
}

# What each objective does, on the New run page.
OBJECTIVE_HELP = {
    "sft": "The model learns to write each row's answer (of a preference dataset: the chosen answer).",
    "dpo": "For each prompt the model learns to make the chosen answer more likely than the rejected one, "
    "measured against the model it starts from. The run page charts the rewards of the chosen and rejected "
    "answers, their margin, and how often the chosen one wins.",
    "kto": "Each answer is judged on its own: chosen ones as desirable, rejected ones as undesirable, "
    "against the model it starts from. Suits sets with unequal numbers of good and bad answers.",
}
HELP |= {
    "beta": "how far the model may move from where it starts; lower moves further (0.1 is usual)",
    "loss_type": "DPO's loss: sigmoid (the paper's), ipo or hinge",
}

# What leaving a field empty means, where "auto" would mislead.
EMPTY = {"url": "this server's /v1", "rubric": "the built-in rubric"}


@dataclass(frozen=True)
class Field:
    name: str  # the form name, e.g. training.learning_rate
    label: str
    kind: str  # number | checkbox | select | text
    default: Any
    choices: tuple[str, ...] = ()
    step: str = "any"
    help: str = ""
    empty: str = "auto"  # the placeholder of a field with no default: what leaving it empty means

    @property
    def short(self) -> str:
        return self.name.split(".", 1)[1]


def _kind(annotation) -> tuple[str, tuple[str, ...], str]:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return "select", tuple(str(a) for a in typing.get_args(annotation)), "any"
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if args == [bool]:  # on, off, or empty: Tuneboard decides
            return "select", ("", "True", "False"), "any"
        if len(args) == 1:
            return _kind(args[0])
        return "text", (), "any"
    if annotation is bool:
        return "checkbox", (), "any"
    if annotation is int:
        return "number", (), "1"
    if annotation is float:
        return "number", (), "any"
    return "text", (), "any"


def fields_of(model: type[BaseModel], prefix: str, empty: str = "auto") -> list[Field]:
    result = []
    for name, info in model.model_fields.items():
        kind, choices, step = _kind(info.annotation)
        default = None if info.is_required() else info.default  # a required field starts empty
        if isinstance(default, list):
            default = ", ".join(default)
        result.append(
            Field(
                f"{prefix}.{name}",
                name.replace("_", " "),
                kind,
                default,
                choices,
                step,
                HELP.get(name, ""),
                EMPTY.get(name, empty),
            )
        )
    return result


def training_fields() -> tuple[list[Field], list[Field]]:
    fields = fields_of(TrainingParams, "training")
    return [f for f in fields if f.short in SIMPLE_TRAINING], [
        f for f in fields if f.short not in SIMPLE_TRAINING
    ]


def evaluation_fields() -> list[Field]:
    """The evaluation settings but the evaluation dataset (the page lists the datasets) and the judge (its
    own fields, `judge_fields`)."""
    return [f for f in fields_of(EvaluationParams, "evaluation") if f.short not in ("dataset_id", "judge")]


def judge_fields() -> list[Field]:
    return fields_of(JudgeParams, "evaluation.judge", empty="none")


def preference_fields() -> list[Field]:
    return fields_of(PreferenceParams, "preference")


def peft_fields(method: str) -> tuple[list[Field], list[Field]]:
    """The method's settings: those New run shows at once (the registry's simple fields), and the rest."""
    simple = peft_method(method).simple_fields
    fields = fields_of(PEFT_PARAMS[method], "peft")
    return [f for f in fields if f.short in simple], [f for f in fields if f.short not in simple]


def request_from_form(form: dict[str, str]) -> dict[str, Any]:
    """Form values into the JSON shape of POST /api/runs. Empty fields stay unset (defaults apply)."""
    body: dict[str, Any] = {"training": {}, "peft": {}}
    objective = form.get("objective") or "sft"
    if form.get("start_from_run"):  # the starting run's adapter brings its base model, method and settings
        form = {
            k: v for k, v in form.items() if k not in ("base_model", "method") and not k.startswith("peft.")
        }
        body["start_from_run"] = _id(form["start_from_run"])
    if objective == "sft":
        form = {k: v for k, v in form.items() if not k.startswith("preference.")}
    method = form.get("method") or DEFAULT_METHOD
    if method not in PEFT_PARAMS:
        return {**body, "method": method}
    adapter = [] if "start_from_run" in body else fields_of(PEFT_PARAMS[method], "peft")
    boxes = fields_of(TrainingParams, "training") + adapter
    checkboxes = {f.name for f in boxes if f.kind == "checkbox"}
    list_fields = set(peft_method(method).list_fields)
    for key, value in form.items():
        value = value.strip()
        if value == "":
            continue
        if "." in key:
            group, name = key.split(".", 1)
            if group == "peft" and name not in PEFT_PARAMS[method].model_fields:
                continue  # a field of another method's fieldset
            listed = name in list_fields and value != "all-linear"
            body.setdefault(group, {})[name] = (
                [v.strip() for v in value.split(",") if v.strip()] if listed else value
            )
        elif key == "dataset_id":  # ids are strict in the API: a form sends text, so convert it here
            body[key] = _id(value)
        elif key in ("base_model", "method", "prompt_format", "name", "preset", "objective"):
            body[key] = value
        elif key == "gpus":
            body[key] = int(value) if value.isdigit() and len(value) < 4 else value
        elif key == "distributed":
            body[key] = value
        elif key == "provider" and value:  # empty: any worker
            body[key] = value
    evaluation = body.get("evaluation", {})
    if "dataset_id" in evaluation:
        evaluation["dataset_id"] = _id(evaluation["dataset_id"])
    judge = {k.split(".", 1)[1]: evaluation.pop(k) for k in list(evaluation) if k.startswith("judge.")}
    if judge.get("model"):  # the judge is on when it names a model
        evaluation["judge"] = judge
    for key in checkboxes:  # an unchecked box sends nothing: record it as false
        group, name = key.split(".", 1)
        body[group].setdefault(name, "false")
    return body


DERIVED = ("logging_steps", "save_steps", "eval_steps")  # worked out again from a new step count


def form_values(config: RunConfig) -> dict[str, Any]:
    """A run's settings as New run form values (the form's names), to launch it again with changes; the
    values worked out from its step count are left empty so that a new run works them out again."""
    values: dict[str, Any] = {
        "dataset_id": config.dataset_id,
        "base_model": config.base_model,
        "method": config.method,
        "prompt_format": config.prompt_format,
        "name": config.name,
        "gpus": config.gpus,
        "distributed": config.distributed,
        "objective": config.objective,
    }
    if config.provider is not None:
        values["provider"] = config.provider
    if config.start_run_id is not None:
        values["start_from_run"] = config.start_run_id
    groups = {
        "training": config.training.model_dump(exclude=set(DERIVED)),
        "peft": config.peft,
        "evaluation": config.evaluation.model_dump(exclude={"judge"}),
        "preference": config.preference.model_dump(),
    }
    if config.evaluation.judge is not None:
        groups["evaluation"] |= {f"judge.{k}": v for k, v in config.evaluation.judge.model_dump().items()}
    for group, settings in groups.items():
        for name, value in settings.items():
            if value is not None:
                values[f"{group}.{name}"] = ", ".join(value) if isinstance(value, list) else value
    return values


def _id(value: str) -> int | str:
    """A form's id as the API's strict integer (text that is not one stays text, for the API's error)."""
    return int(value) if value.isdigit() and len(value) < 19 else value
