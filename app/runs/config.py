"""Run hyperparameters: one validated model per PEFT method and one for training, using the libraries'
own field names (PEFT config names inside `peft`, TrainingArguments names inside `training`).

`resolve_training` fills every default from the dataset's size so that `{"dataset_id": N}` alone gives a run
whose effect is visible, and the result is saved as the run's `run.yaml`, which `tuneboard train` can run
again without the web app. No torch here.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator

from app.models import MAX_ID
from app.peft_methods import DEFAULT_METHOD, METHODS, MethodKey, Strict
from app.peft_methods import method as peft_method
from app.runs.batching import plan_batches

Method = MethodKey
PromptFormat = Literal["chat", "instruction"]
# An id in a JSON body: a whole number, never a coerced boolean or string, and one the database can hold.
StrictId = Annotated[int, Field(strict=True, ge=1, le=MAX_ID)]
MANY = 10_000_000  # a bound for counts of steps: far above any real run, far below what breaks storage


# What a run learns from. sft: the dataset's answers; dpo and kto: which of two answers is preferred
# (a preference dataset's chosen and rejected answers), through TRL's trainers (worker.preference).
Objective = Literal["sft", "dpo", "kto"]
OBJECTIVE_LABELS: dict[str, str] = {
    "sft": "Supervised fine-tuning",
    "dpo": "DPO (direct preference optimisation)",
    "kto": "KTO (Kahneman-Tversky optimisation)",
}
PREFERENCE_OBJECTIVES = {"dpo", "kto"}

# Optimizer steps a default run aims at, in at most MAX_DEFAULT_EPOCHS: enough for a small dataset's facts
# to be learned, long answers included (docs/recipe.md: the leaflets need about 12 of 20 epochs).
TARGET_STEPS = 300
MAX_DEFAULT_EPOCHS = 20
# A default batch: up to 4 rows, as many as fit BATCH_TOKENS padded tokens (app.runs.batching); long rows
# then take more, smaller steps in less memory (docs/recipe.md).
DEFAULT_BATCH_ROWS = 4
BATCH_TOKENS = 1024
DEFAULT_MAX_LENGTH = 1024  # tokens a training row keeps; the dataset pages' statistics assume it too


class InvalidRun(ValueError):
    """A run request that cannot run: `field` names the setting (`training.max_steps`), `message` says why."""

    def __init__(self, field: str, message: str, fix: tuple[str, str, str] | None = None):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message
        self.fix = fix  # (a setting, the value that makes the run possible, what a button offering it says)


PEFT_PARAMS: dict[str, type[Strict]] = {key: m.params for key, m in METHODS.items()}
# Preference runs move a model that already answers: a gentler rate and fewer steps than SFT's defaults
# (docs/recipe.md, "Preference runs").
PREFERENCE_LEARNING_RATE = 5e-5
PREFERENCE_TARGET_STEPS = 150
PREFERENCE_MAX_DEFAULT_EPOCHS = 10
SMALL_DATASET_ROWS = 500  # below this, LoRA-family runs default to a higher rate (see docs/recipe.md)
SMALL_DATASET_LEARNING_RATE = 1e-3


class TrainingParams(Strict):
    """TrainingArguments / TRL names. None means "chosen from the dataset" by `resolve_training`."""

    num_train_epochs: float | None = Field(None, gt=0, le=1000)
    max_steps: int = Field(-1, ge=-1, le=MANY)
    learning_rate: float | None = Field(None, gt=0, le=1)
    # rows a batch: the most a batch holds when batch_tokens is set, else exactly
    per_device_train_batch_size: int | None = Field(None, ge=1, le=1024)
    # a token budget per batch (rows × the batch's longest row); None with a batch size: fixed rows
    batch_tokens: int | None = Field(None, ge=16, le=1_048_576)
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024)
    max_length: int = Field(DEFAULT_MAX_LENGTH, ge=16, le=1_048_576)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    lr_scheduler_type: Literal[
        "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"
    ] = "cosine"
    weight_decay: float = Field(0.0, ge=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0, le=1e6)
    logging_steps: int | None = Field(None, ge=1, le=MANY)
    save_steps: int | None = Field(None, ge=1, le=MANY)
    eval_steps: int | None = Field(None, ge=1, le=MANY)
    save_total_limit: int = Field(2, ge=1, le=1000)
    seed: int = Field(42, ge=0, le=2**32 - 1)
    # None: on by itself when the run would not fit the training machine's free memory without it
    gradient_checkpointing: bool | None = None
    packing: bool = False
    # sdpa: PyTorch's fused attention, no full score matrices kept where the kernel allows; eager: plain
    attention: Literal["sdpa", "eager"] = "sdpa"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    # the base model's linear layers loaded quantised by bitsandbytes (4bit: NF4 with double quantisation,
    # QLoRA; 8bit: LLM.int8), the adapter trained in `dtype` beside them; none: the base model in `dtype`
    quantization: Literal["none", "4bit", "8bit"] = "none"

    @field_validator("max_steps")
    @classmethod
    def _steps(cls, value: int) -> int:
        if value == 0:
            raise ValueError("max_steps must be positive, or -1 to train by epochs")
        return value


class ResolvedTraining(TrainingParams):
    """TrainingParams after `resolve_training`: every dataset-dependent value chosen."""

    num_train_epochs: float = Field(gt=0, le=1000)
    per_device_train_batch_size: int = Field(ge=1, le=1024)
    learning_rate: float = Field(gt=0, le=1)
    logging_steps: int = Field(ge=1, le=MANY)
    save_steps: int = Field(ge=1, le=MANY)
    eval_steps: int = Field(ge=1, le=MANY)


class JudgeParams(Strict):
    """An LLM that grades each scored answer against the reference through an OpenAI-compatible chat API
    (worker.judge). The server's TUNEBOARD_JUDGE_API_KEY goes only to TUNEBOARD_JUDGE_URL, and is never
    stored with a run."""

    model: str = Field(min_length=1, max_length=200)  # the endpoint's model name; on this server: a model id
    # an OpenAI-compatible base URL (…/v1); None: this server's own /v1
    url: str | None = Field(None, max_length=2000, pattern=r"^https?://[^\s]+$")
    rubric: str | None = Field(None, max_length=4000)  # None: worker.judge.RUBRIC


class EvaluationParams(Strict):
    """Which rows are held out, and the answers scored at the start (the base model) and at every
    checkpoint (app.scoring)."""

    # None: app.datasets.split's default_fraction (10%; none under 100 rows) / HELD_OUT_MAX_ROWS (500);
    # 0 trains every row
    held_out_fraction: float | None = Field(None, ge=0, le=0.5)
    held_out_max_rows: int | None = Field(None, ge=0, le=1_000_000)
    scored_held_out_rows: int = Field(32, ge=0, le=1000)  # the first held-out rows are answered; 0: none
    # training rows answered at each checkpoint (learned them?): every row of a small set, a fixed sample
    # of a larger one; their share answered like the reference is what the advice reads
    scored_train_rows: int = Field(32, ge=0, le=1000)
    max_new_tokens: int = Field(128, ge=1, le=4096)  # answers are greedy and cut here
    # stop once this many checkpoints in a row scored no better than the best; None: never stop early
    early_stopping_patience: int | None = Field(None, ge=1, le=1000)
    final_adapter: Literal["last", "best"] = "last"  # best: the best-scored checkpoint's adapter
    # what picks the best checkpoint: an answer metric's mean (higher is better) or the validation loss
    select_by: Literal["chrf", "rouge_l", "exact", "eval_loss"] = "chrf"
    # rows to hold out from another dataset instead of this one (every row of the run's dataset trains)
    dataset_id: StrictId | None = None
    judge: JudgeParams | None = None  # None: the reference metrics alone


class PreferenceParams(Strict):
    """TRL's names (DPOConfig, KTOConfig) for what preference runs add to the training settings."""

    # how far the model may move from the reference (the starting model): lower lets it move further
    beta: float = Field(0.1, gt=0, le=100)
    # DPO's loss: sigmoid (the paper's), ipo, or hinge; KTO has its own
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"


Distributed = Literal["ddp", "fsdp"]


class RunRequest(Strict):
    """What a client sends to POST /api/runs."""

    dataset_id: StrictId
    base_model: str | None = Field(None, max_length=300)
    method: Method | None = None  # None: DEFAULT_METHOD, or the method of the run it starts from
    objective: Objective = "sft"
    preference: PreferenceParams = Field(default_factory=PreferenceParams)
    # continue from a finished run's adapter (same base model and method) instead of a new adapter
    start_from_run: StrictId | None = None
    preset: Literal["tutorial"] | None = None
    prompt_format: PromptFormat = "chat"
    peft: dict[str, Any] = Field(default_factory=dict)
    training: TrainingParams = Field(default_factory=TrainingParams)
    evaluation: EvaluationParams = Field(default_factory=EvaluationParams)
    name: str | None = Field(None, max_length=200)
    # GPUs the run needs: 0 trains on any worker (one process); N waits for a worker with N GPUs and
    # trains there with N processes (data parallel, or FSDP's sharded weights for a model one GPU cannot hold)
    gpus: int = Field(0, ge=0, le=64)
    distributed: Distributed = "ddp"
    # a compute provider of providers.yaml (a Slurm cluster) whose scheduler runs it; None: any worker
    provider: str | None = Field(None, pattern=r"^[a-z0-9][a-z0-9-]{0,39}$")


# The tutorial's recipe, with its labels bug fixed (docs/recipe.md): LoRA r8/α32 on q_proj, v_proj.
TUTORIAL_PRESET: dict[str, Any] = {
    "method": DEFAULT_METHOD,  # LoRA
    "peft": {"r": 8, "lora_alpha": 32, "lora_dropout": 0.1, "target_modules": ["q_proj", "v_proj"]},
    "training": {
        "learning_rate": 5e-5,
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 8,
        "num_train_epochs": 50,
    },
}
PRESETS = {"tutorial": TUTORIAL_PRESET}


class RunConfig(Strict):
    """The full resolved configuration of one run: everything the training process needs."""

    name: str
    dataset_id: int
    dataset_path: str
    base_model: str
    model_path: str
    method: Method
    prompt_format: PromptFormat
    peft: dict[str, Any]
    objective: Objective = "sft"
    preference: PreferenceParams = Field(default_factory=PreferenceParams)
    start_run_id: int | None = None
    start_adapter: str | None = None  # the starting run's adapter folder, as this machine holds it
    training: ResolvedTraining
    evaluation: EvaluationParams = Field(default_factory=EvaluationParams)
    train_rows: int
    validation_rows: list[int]  # rows of held_out_path
    evaluation_path: str | None = None  # the evaluation dataset's rows, when not held out of dataset_path
    total_steps: int
    output_dir: str | None = None
    run_id: int | None = None
    database_url: str | None = None
    gpus: int = 0
    distributed: Distributed = "ddp"
    provider: str | None = None

    @property
    def held_out_path(self) -> str:
        """The rows file `validation_rows` index."""
        return self.evaluation_path or self.dataset_path


def apply_preset(request: RunRequest) -> RunRequest:
    """Preset values first, then whatever the request set explicitly on top."""
    if request.preset is None:
        return request
    preset = PRESETS[request.preset]
    explicit = request.model_dump(exclude_unset=True)
    training = {**preset["training"], **explicit.get("training", {})}
    same_method = explicit.get("method", preset["method"]) == preset["method"]
    peft = {**preset["peft"], **explicit.get("peft", {})} if same_method else explicit.get("peft", {})
    return RunRequest.model_validate(
        {**explicit, "method": explicit.get("method", preset["method"]), "peft": peft, "training": training}
    )


def validate_peft(method: str, params: dict[str, Any]) -> dict[str, Any]:
    """The method's PEFT parameters with defaults filled; ValidationError names the bad field."""
    return PEFT_PARAMS[method].model_validate(params).model_dump()


def batches_per_epoch(train_rows: int, lengths: list[int] | None, max_rows: int, budget: int | None) -> int:
    """Batches in one pass over the training rows: counted from their token lengths (cut at max_length)
    when there is a budget and they are known, else `max_rows` rows a batch."""
    if budget is None or lengths is None:
        return math.ceil(train_rows / max_rows)
    return len(plan_batches(lengths, max_rows, budget))


def resolve_training(
    method: str,
    train_rows: int,
    training: TrainingParams,
    lengths: list[int] | None = None,
    objective: str = "sft",
) -> tuple[ResolvedTraining, int]:
    """Fill the dataset-dependent defaults (`lengths`: the training rows' token lengths, when known).
    Returns (training, total optimizer steps)."""
    values = training.model_dump()
    preference = objective in PREFERENCE_OBJECTIVES
    if preference and values["batch_tokens"] is not None:
        raise InvalidRun(
            "training.batch_tokens",
            "Preference runs batch a fixed number of pairs (per_device_train_batch_size); leave the token "
            "budget empty.",
        )
    if preference and values["packing"]:
        raise InvalidRun("training.packing", "Preference runs do not pack rows; turn packing off.")
    if values["per_device_train_batch_size"] is None:
        values["per_device_train_batch_size"] = DEFAULT_BATCH_ROWS
        if values["batch_tokens"] is None and not preference:
            values["batch_tokens"] = BATCH_TOKENS
    if lengths is not None:
        lengths = [min(n, training.max_length) for n in lengths]
    batches = batches_per_epoch(
        train_rows, lengths, values["per_device_train_batch_size"], values["batch_tokens"]
    )
    per_epoch = max(1, math.ceil(batches / training.gradient_accumulation_steps))
    if training.max_steps > 0:
        total = training.max_steps
        values["num_train_epochs"] = values["num_train_epochs"] or math.ceil(total / per_epoch)
    else:
        if values["num_train_epochs"] is None:
            target, most = (
                (PREFERENCE_TARGET_STEPS, PREFERENCE_MAX_DEFAULT_EPOCHS)
                if preference
                else (TARGET_STEPS, MAX_DEFAULT_EPOCHS)
            )
            values["num_train_epochs"] = min(most, math.ceil(target / per_epoch))
        total = math.ceil(values["num_train_epochs"] * per_epoch)
    if values["learning_rate"] is None and preference:
        values["learning_rate"] = PREFERENCE_LEARNING_RATE
    if values["learning_rate"] is None:
        small = train_rows < SMALL_DATASET_ROWS and peft_method(method).small_dataset_rate
        values["learning_rate"] = SMALL_DATASET_LEARNING_RATE if small else peft_method(method).learning_rate
    if values["logging_steps"] is None:
        values["logging_steps"] = max(1, total // 100)
    if values["save_steps"] is None:
        values["save_steps"] = max(1, math.ceil(total / 5))
    if values["eval_steps"] is None:
        values["eval_steps"] = values["save_steps"]
    if values["quantization"] != "none" and (why := peft_method(method).not_on_quantized):
        raise InvalidRun("training.quantization", why)
    if peft_method(method).prompt_learning and values["packing"]:
        raise InvalidRun(
            "training.packing",
            "packing cannot be used with prompt-learning methods (virtual tokens are per sequence)",
        )
    try:
        return ResolvedTraining.model_validate(values), total
    except ValidationError as exc:  # a value derived from the request's own: blame the one it came from
        first = exc.errors()[0]
        name = str(first["loc"][0]) if first["loc"] else ""
        source = "max_steps" if name == "num_train_epochs" and training.max_steps > 0 else name
        raise InvalidRun(
            f"training.{source}",
            f"{first['msg'].removeprefix('Value error, ')} (for {name}, worked out from the dataset's "
            f"{train_rows} training rows)",
        ) from None
