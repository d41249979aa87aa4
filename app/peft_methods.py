"""The PEFT methods Tuneboard trains, each declared once: its settings (PEFT's own names, validated, with
Tuneboard's defaults), its PEFT config class, how it learns and what it can then do (merge into the model,
export, answer during evaluation, share a base model in a mixed batch, start a preference run). Every other
module asks this registry; none names a method (a test keeps it so). Plain data: the web tier reads it
without torch or peft, and the worker maps `peft_config` to PEFT's class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# The methods' keys, in the order pages offer them (a run's `method`; at most 20 characters, as stored).
MethodKey = Literal["lora", "loha", "lokr", "adalora", "ia3", "prompt_tuning", "prefix_tuning", "p_tuning"]
ModuleNames = Annotated[list[Annotated[str, Field(min_length=1, max_length=200)]], Field(min_length=1)]
TargetModules = ModuleNames | Literal["all-linear"]


class Strict(BaseModel):
    # No NaN or infinity: they cannot be stored as JSON and no hyperparameter means them.
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)


class LoraParams(Strict):
    r: int = Field(16, ge=1, le=1024)
    lora_alpha: float = Field(32, gt=0)
    # none by default: dropout took 28% of a default run's time on CPU and changed neither what it learned nor
    # its held-out loss (docs/benchmarks.md, "The default LoRA's choices")
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: TargetModules = "all-linear"
    use_dora: bool = False
    use_rslora: bool = False
    bias: Literal["none", "all", "lora_only"] = "none"


class LohaParams(Strict):
    r: int = Field(16, ge=1, le=1024)
    alpha: float = Field(32, gt=0)
    rank_dropout: float = Field(0.0, ge=0, lt=1)
    module_dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: TargetModules = "all-linear"


class LokrParams(LohaParams):
    decompose_both: bool = False


class AdaLoraParams(Strict):
    init_r: int = Field(12, ge=1, le=1024)
    target_r: int = Field(8, ge=1, le=1024)
    lora_alpha: float = Field(32, gt=0)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: TargetModules = "all-linear"

    @model_validator(mode="after")
    def _ranks(self) -> AdaLoraParams:
        if self.target_r > self.init_r:
            raise ValueError("target_r must not exceed init_r: AdaLoRA only prunes ranks away")
        return self


class Ia3Params(Strict):
    target_modules: ModuleNames | None = None  # PEFT's per-architecture default when unset
    feedforward_modules: ModuleNames | None = None

    @model_validator(mode="after")
    def _subset(self) -> Ia3Params:
        if self.feedforward_modules and not self.target_modules:
            raise ValueError("feedforward_modules needs target_modules too (it must be a subset of them)")
        if self.feedforward_modules and not set(self.feedforward_modules) <= set(self.target_modules or []):
            raise ValueError("feedforward_modules must be a subset of target_modules")
        return self


class PromptTuningParams(Strict):
    num_virtual_tokens: int = Field(20, ge=1, le=512)
    prompt_tuning_init: Literal["RANDOM", "TEXT"] = "RANDOM"
    prompt_tuning_init_text: str | None = None

    @model_validator(mode="after")
    def _text(self) -> PromptTuningParams:
        if self.prompt_tuning_init == "TEXT" and not (self.prompt_tuning_init_text or "").strip():
            raise ValueError("prompt_tuning_init TEXT needs prompt_tuning_init_text")
        return self


class PrefixTuningParams(Strict):
    num_virtual_tokens: int = Field(20, ge=1, le=512)
    prefix_projection: bool = False
    encoder_hidden_size: int | None = Field(None, ge=1, le=65536)


class PTuningParams(Strict):
    num_virtual_tokens: int = Field(20, ge=1, le=512)
    encoder_hidden_size: int = Field(128, ge=1, le=65536)
    encoder_reparameterization_type: Literal["MLP", "LSTM"] = "MLP"


# How a method's trainable parameters grow with the model (app.runs.estimate counts them per shape).
ParameterShape = Literal[
    "low_rank", "adaptive_rank", "hadamard", "kronecker", "scaling", "prompt", "prefix", "prompt_encoder"
]


@dataclass(frozen=True)
class PeftMethod:
    key: str
    label: str  # its name on pages
    params: type[Strict]  # its settings, PEFT's names, with Tuneboard's defaults
    peft_config: str  # PEFT's config class (peft.<name>)
    peft_type: str  # what PEFT writes as `peft_type` in adapter_config.json
    learning_rate: float  # the default rate of an SFT run
    parameters: ParameterShape
    simple_fields: tuple[str, ...] = ()  # the settings New run shows outside "Advanced"
    list_fields: tuple[str, ...] = ()  # settings a form sends as names separated by commas
    prompt_learning: bool = False  # learns virtual tokens (no packing; the base model answers without them)
    wraps_linear: bool = False  # wraps linear modules (the memory and duration estimates count their inputs)
    small_dataset_rate: bool = False  # a small dataset gets the higher SMALL_DATASET_LEARNING_RATE
    dropout_field: str | None = None  # the setting that drops the wrapped modules' inputs
    total_steps_field: str | None = None  # a PEFT setting that must know the run's length
    reallocates_ranks: bool = False  # ranks move after each optimizer step (a callback calls PEFT)
    answer_logits_only: bool = True  # the loss computes logits for answer tokens only
    unscored: str | None = None  # why its answers are not scored during training, when they are not
    mergeable: bool = False  # PEFT merges it into the model's weights: merged and whole-model GGUF exports
    llama_cpp_adapter: bool = False  # exportable as a llama.cpp adapter file (DoRA excepted)
    mixed_batch: bool = False  # answers in one batch with other adapters on a shared base model
    preference: bool = False  # may train a DPO or KTO run (its weights start as a no-op)
    not_continuable: str | None = None  # why a later run cannot start from its adapter, when it cannot
    not_on_quantized: str | None = None  # why it cannot train on a 4-bit or 8-bit base model, when it cannot
    choice: str = ""  # what New run's method list adds to its name

    @property
    def scored(self) -> bool:
        return self.unscored is None


_LORA_FAMILY: dict[str, Any] = {
    "wraps_linear": True, "small_dataset_rate": True, "mergeable": True, "list_fields": ("target_modules",)
}  # fmt: skip
_PROMPT_LEARNING: dict[str, Any] = {
    "prompt_learning": True, "answer_logits_only": False, "simple_fields": ("num_virtual_tokens",)
}  # fmt: skip

_NOT_QUANTIZED = (
    "PEFT's {} layers cannot wrap a 4-bit or 8-bit base model's layers: choose LoRA (QLoRA), AdaLoRA or "
    "IA³, or set quantization to none."
)

METHODS: dict[str, PeftMethod] = {
    method.key: method
    for method in (
        PeftMethod(
            "lora", "LoRA", LoraParams, "LoraConfig", "LORA", 2e-4, "low_rank",
            choice="optionally DoRA / rsLoRA", simple_fields=("r", "lora_alpha"),
            dropout_field="lora_dropout", llama_cpp_adapter=True, mixed_batch=True, preference=True,
            **_LORA_FAMILY,
        ),
        PeftMethod(
            "loha", "LoHa", LohaParams, "LoHaConfig", "LOHA", 2e-4, "hadamard",
            simple_fields=("r", "alpha"), preference=True, **_LORA_FAMILY,
            not_on_quantized=_NOT_QUANTIZED.format("LoHa"),
        ),
        PeftMethod(
            "lokr", "LoKr", LokrParams, "LoKrConfig", "LOKR", 2e-4, "kronecker",
            simple_fields=("r", "alpha"), preference=True, **_LORA_FAMILY,
            not_on_quantized=_NOT_QUANTIZED.format("LoKr"),
        ),
        PeftMethod(
            "adalora", "AdaLoRA", AdaLoraParams, "AdaLoraConfig", "ADALORA", 2e-4, "adaptive_rank",
            simple_fields=("init_r", "target_r", "lora_alpha"), dropout_field="lora_dropout",
            total_steps_field="total_step", reallocates_ranks=True, answer_logits_only=False,
            not_continuable="its rank schedule ended with it",
            **_LORA_FAMILY,
        ),
        PeftMethod(
            "ia3", "IA³", Ia3Params, "IA3Config", "IA3", 3e-3, "scaling",
            list_fields=("target_modules", "feedforward_modules"), mergeable=True, preference=True,
        ),
        PeftMethod(
            "prompt_tuning", "Prompt tuning", PromptTuningParams, "PromptTuningConfig", "PROMPT_TUNING", 3e-2,
            "prompt", **_PROMPT_LEARNING,
        ),
        PeftMethod(
            "prefix_tuning", "Prefix tuning", PrefixTuningParams, "PrefixTuningConfig", "PREFIX_TUNING", 1e-2,
            "prefix", unscored="generation in this version of transformers drops the learned prefix, so "
            "they would be the base model's", **_PROMPT_LEARNING,
        ),
        PeftMethod(
            "p_tuning", "P-tuning", PTuningParams, "PromptEncoderConfig", "P_TUNING", 1e-2, "prompt_encoder",
            **_PROMPT_LEARNING,
        ),
    )
}  # fmt: skip
DEFAULT_METHOD = "lora"
LABELS: dict[str, str] = {key: method.label for key, method in METHODS.items()}
# New run's method list: each name, with what the choice includes
CHOICES: dict[str, str] = {
    key: f"{m.label} ({m.choice})" if m.choice else m.label for key, m in METHODS.items()
}


def method(key: str) -> PeftMethod:
    """The registry's entry for a run's method (KeyError for a key it does not know)."""
    return METHODS[key]


def by_peft_type(peft_type: str | None) -> PeftMethod | None:
    """The method an adapter folder holds, from its adapter_config.json's `peft_type`."""
    return next((m for m in METHODS.values() if m.peft_type == peft_type), None)


def drops_inputs(key: str, peft: dict) -> bool:
    """Whether a run's adapter drops its wrapped modules' inputs (its dropout setting is above 0)."""
    field = METHODS[key].dropout_field
    return bool(field and peft.get(field))


def keys_where(**properties) -> list[str]:
    """The methods whose properties have these values, in the registry's order."""
    return [k for k, m in METHODS.items() if all(getattr(m, p) == v for p, v in properties.items())]
