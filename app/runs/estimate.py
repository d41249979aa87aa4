"""What a run will cost, before it starts and without torch: trainable parameters from the model's
config.json, optimizer steps, memory, and a duration (app.runs.duration) from this machine's latest run."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import Session

from app.machine import HEADROOM, meminfo_bytes
from app.peft_methods import drops_inputs
from app.peft_methods import method as peft_method
from app.runs.batching import padded_tokens
from app.runs.config import PREFERENCE_OBJECTIVES, RunConfig
from app.runs.duration import Calibration, duration, latest_calibration, trial_calibration
from app.runs.shapes import Shapes, adapted_modules


def _low_rank(shapes: Shapes, peft: dict, rank: int) -> int:
    targets = adapted_modules(shapes, peft.get("target_modules"))
    per_layer = sum(rank * (a + b) for a, b in targets.values())
    if peft.get("use_dora"):
        per_layer += sum(b for _, b in targets.values())  # the magnitude vectors
    return shapes.layers * per_layer


def _adaptive_rank(shapes: Shapes, peft: dict) -> int:
    targets = adapted_modules(shapes, peft.get("target_modules"))
    return _low_rank(shapes, peft, peft["init_r"]) + shapes.layers * peft["init_r"] * len(targets)


def _per_module(shapes: Shapes, peft: dict, size) -> int:
    return shapes.layers * sum(
        size(a, b) for a, b in adapted_modules(shapes, peft.get("target_modules")).values()
    )


def _scaling(shapes: Shapes, peft: dict) -> int:
    linear = shapes.linear()
    modules = peft.get("target_modules") or ["k_proj", "v_proj", "down_proj"]  # PEFT's default for Llama
    feedforward = set(peft.get("feedforward_modules") or ["down_proj"])
    return shapes.layers * sum(
        linear[t][0] if t in feedforward else linear[t][1] for t in modules if t in linear
    )


def _prompt_encoder(shapes: Shapes, peft: dict) -> int:
    e, hidden = peft["encoder_hidden_size"], shapes.hidden
    return peft["num_virtual_tokens"] * hidden + hidden * e + e * e + e * hidden + 2 * e + hidden


# Trainable parameters by the shape the registry gives a method (app.peft_methods.ParameterShape).
PARAMETERS: dict[str, Callable[[Shapes, dict], int]] = {
    "low_rank": lambda shapes, peft: _low_rank(shapes, peft, peft["r"]),
    "adaptive_rank": _adaptive_rank,  # LoRA's factors at the initial rank, and a singular value per rank
    "hadamard": lambda shapes, peft: _per_module(shapes, peft, lambda a, b: 2 * peft["r"] * (a + b)),
    # Kronecker factors are far smaller than LoRA's; this counts the low-rank factor, the larger one
    "kronecker": lambda shapes, peft: _per_module(shapes, peft, lambda a, b: peft["r"] * (a + b) // 2),
    "scaling": _scaling,
    "prompt": lambda shapes, peft: peft["num_virtual_tokens"] * shapes.hidden,
    "prefix": lambda shapes, peft: (
        peft["num_virtual_tokens"] * shapes.layers * 2 * shapes.kv_heads * shapes.head_dim
    ),
    "prompt_encoder": _prompt_encoder,
}


def trainable_parameters(shapes: Shapes, method: str, peft: dict) -> int:
    return PARAMETERS[peft_method(method).parameters](shapes, peft)


# The memory model's constants, measured on the bundled model and a larger Llama-shaped one through the
# real training process over 16-20 steps with answers scored (`python -m bench --only memory`,
# docs/benchmarks.md).
RUNTIME_BYTES = 900 * 2**20  # python, torch, transformers, the tokenizer, the rows and the Trainer
# values kept for the backward pass per token and layer: × hidden, × intermediate, and × the input
# features of each module an adapter wraps (its float32 copy of the input; with dropout, also the mask and
# the dropped copy)
HIDDEN_VALUES, INTERMEDIATE_VALUES, ADAPTED_VALUES, DROPOUT_VALUES = 2, 1, 2, 2
ATTENTION_BYTES = 1.5  # per attention score kept (row length² × heads, each layer): CPU attention keeps some
CHECKPOINTED_VALUES = 1  # with gradient checkpointing: each layer keeps its input only (× hidden)
LOGIT_BYTES = 10  # per learned position and vocabulary entry: the logits, their float copy, the softmax
# Over a whole run (hundreds of steps, answers generated at every checkpoint) the process holds about this
# many times its weights' size beside them: pages the C allocator keeps after tensors of changing sizes are
# freed, and generation's. Steady after ten to twenty steps; the first three steps show almost none of it.
RETAINED_PER_WEIGHT = 2.5


# bytes a quantised linear layer's weight takes per parameter: NF4's 4 bits and its block constants (one
# 8-bit absmax per 64 weights, itself quantised, plus a float32 per 256 blocks); int8's byte and its rows'
# scales
QUANTIZED_BYTES = {"4bit": 0.5 + 1 / 64 + 4 / (64 * 256), "8bit": 1.0}


def weights_bytes(shapes: Shapes, quantization: str, weight_bytes: int) -> int:
    """The base model's weights in memory: every parameter in the loaded dtype, or, quantised, the decoder
    layers' linear weights at QUANTIZED_BYTES and the rest (embeddings, norms, the output layer) in float32,
    where PEFT's k-bit preparation puts them."""
    total = shapes.total()
    if quantization == "none":
        return total * weight_bytes
    linear = shapes.layers * sum(inputs * outputs for inputs, outputs in shapes.linear().values())
    return int(linear * QUANTIZED_BYTES[quantization] + (total - linear) * 4)


def adapted_values(config: RunConfig) -> int:
    return ADAPTED_VALUES + (DROPOUT_VALUES if drops_inputs(config.method, config.peft) else 0)


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak resident memory of a training process, in bytes, by what takes it."""

    runtime: int
    weights: int
    retained: int  # RETAINED_PER_WEIGHT × weights: what a long run keeps beside them
    adapter: int  # trainable parameters, their gradients and two AdamW moments, all float32
    activations: int
    logits: int

    @property
    def total(self) -> int:
        return self.runtime + self.weights + self.retained + self.adapter + self.activations + self.logits


def training_memory(
    shapes: Shapes,
    config: RunConfig,
    padded: int,
    longest: int,
    *,
    checkpointing: bool,
    weight_bytes: int,
    cpu: bool = True,
) -> MemoryEstimate:
    """What training `config` takes at its largest batch of `padded` tokens (rows × longest row), its rows
    at most `longest` tokens long, in a CPU's memory (`cpu`, where the C allocator retains) or a GPU's."""
    wraps = peft_method(config.method).wraps_linear
    targets = adapted_modules(shapes, config.peft.get("target_modules")) if wraps else {}
    layer = (
        HIDDEN_VALUES * shapes.hidden
        + INTERMEDIATE_VALUES * shapes.intermediate
        + adapted_values(config) * sum(inputs for inputs, _ in targets.values())
    )
    scores = padded * longest * shapes.heads * ATTENTION_BYTES  # one layer's
    if checkpointing:  # every layer's input, and one layer's activations while it is recomputed
        kept = padded * (shapes.layers * CHECKPOINTED_VALUES * shapes.hidden + layer) * weight_bytes + scores
    else:
        kept = shapes.layers * (padded * layer * weight_bytes + scores)
    weights = weights_bytes(shapes, config.training.quantization, weight_bytes)
    return MemoryEstimate(
        runtime=RUNTIME_BYTES,
        weights=weights,
        retained=int(RETAINED_PER_WEIGHT * weights) if cpu else 0,
        adapter=trainable_parameters(shapes, config.method, config.peft) * 16,
        activations=int(kept),
        logits=padded * shapes.vocab * LOGIT_BYTES,
    )


def row_lengths(
    settings, session: Session, *, dataset_id: int, base_model: str, prompt_format: str
) -> list[int] | None:
    """Every row's token length under a model and prompt format (computed once, then cached:
    app.datasets.store.token_lengths); None while they are being computed or when they cannot be."""
    from app.datasets import store
    from app.datasets.jobs import StatsPending
    from app.model_registry import find_model
    from app.models import Dataset

    dataset = session.get(Dataset, dataset_id)
    model = find_model(settings, base_model, session=session)
    if dataset is None or model is None or not model.ready:
        return None
    try:
        return store.token_lengths(settings, dataset, model, prompt_format=prompt_format)
    except (ValueError, StatsPending):
        return None


def length_stats(
    settings, session: Session, *, dataset_id: int, base_model: str, max_length: int, prompt_format: str
) -> dict | None:
    """The dataset's token-length statistics under a model and prompt format (`row_lengths`, cut at
    max_length); None when the lengths are not known."""
    from app.datasets.stats import length_stats as stats_of

    lengths = row_lengths(
        settings, session, dataset_id=dataset_id, base_model=base_model, prompt_format=prompt_format
    )
    return None if lengths is None else stats_of(lengths, max_length=max_length)


def dataset_lengths(settings, session: Session, config: RunConfig) -> list[int] | None:
    """Every row's token length in a run's dataset, under its model and prompt format; None when unknown."""
    return row_lengths(
        settings,
        session,
        dataset_id=config.dataset_id,
        base_model=config.base_model,
        prompt_format=config.prompt_format,
    )


def training_lengths(settings, session: Session, config: RunConfig) -> list[int] | None:
    """The token lengths of the rows a run trains on, cut at its max_length; None when unknown."""
    lengths = dataset_lengths(settings, session, config)
    return None if lengths is None else trained_lengths(config, lengths)


def trained_lengths(config: RunConfig, lengths: list[int]) -> list[int]:
    """Of every row's token length (`dataset_lengths`), those of the rows the run trains on, cut at its
    max_length."""
    cut = config.training.max_length
    return [min(n, cut) for n in trained(lengths, [] if config.evaluation_path else config.validation_rows)]


def trained(lengths: list[int], held_out: list[int]) -> list[int]:
    """The lengths of the rows that train: all but the held-out ones."""
    held = set(held_out)
    return [n for i, n in enumerate(lengths) if i not in held]


def largest_batch(config: RunConfig, lengths: list[int] | None) -> tuple[int, int]:
    """(padded tokens of the run's largest batch, its longest row); without lengths, rows of max_length.
    A preference run's batch holds each pair's chosen and rejected answer: twice the rows (the lengths are
    of prompt and chosen answer; a rejected answer is taken to be as long)."""
    training = config.training
    rows, budget, cut = training.per_device_train_batch_size, training.batch_tokens, training.max_length
    pairs = 2 if config.objective in PREFERENCE_OBJECTIVES else 1
    if lengths:
        return pairs * padded_tokens(lengths, rows, budget), min(max(lengths), cut)
    return pairs * max(cut, min(rows * cut, budget or rows * cut)), cut


def memory_needed(
    config: RunConfig,
    lengths: list[int] | None,
    memory_limit: int | None,
    weight_bytes: int | None = None,
    cpu: bool | None = None,
) -> dict | None:
    """Peak memory of the run's training process and whether gradient checkpointing will be on (the run's
    choice, or on by itself when the run would not otherwise fit `memory_limit` bytes, as the training
    process decides); None where the model's layout is unknown. `weight_bytes`: the loaded dtype's size, when
    known (else 2 for auto, as on machines with fast bf16); `cpu`: whether it trains on the CPU (else on a
    GPU; None: as the run asks, a CPU when it asks for no GPU)."""
    shapes = Shapes.read(Path(config.model_path))
    if shapes is None:
        return None
    training = config.training
    if weight_bytes is None:
        weight_bytes = 2 if training.dtype in ("auto", "bfloat16", "float16") else 4
    padded, longest = largest_batch(config, lengths)
    on_cpu = not config.gpus if cpu is None else cpu
    without, with_ = (
        training_memory(
            shapes, config, padded, longest, checkpointing=on, weight_bytes=weight_bytes, cpu=on_cpu
        )
        for on in (False, True)
    )
    checkpointing = training.gradient_checkpointing
    if checkpointing is None:
        checkpointing = memory_limit is not None and without.total * HEADROOM > memory_limit
    chosen = with_ if checkpointing else without
    return {
        "memory_bytes": chosen.total,
        "memory_parts": dict(chosen.__dict__),
        "gradient_checkpointing": checkpointing,
        "memory_without_checkpointing": without.total,
        "largest_batch_tokens": padded,
        "weights_bytes": chosen.weights,
    }


def refusal(
    config: RunConfig,
    lengths: list[int] | None,
    memory_limit: int | None,
    weight_bytes: int | None = None,
    cpu: bool | None = None,
) -> str | None:
    """A sentence when the run cannot fit `memory_limit` bytes as it is batched (checkpointing on by itself
    where the run leaves it to Tuneboard)."""
    needed = memory_needed(config, lengths, memory_limit, weight_bytes, cpu)
    if needed is None or memory_limit is None or needed["memory_bytes"] * HEADROOM <= memory_limit:
        return None
    needs, has = needed["memory_bytes"] / 2**30, memory_limit / 2**30
    gib = f"about {needs:.1f} GiB, and {has:.1f} GiB is available"
    quantized = quantized_fit(config, lengths, memory_limit, cpu)
    offer = (
        f" With the base model loaded 4-bit (QLoRA) it needs about {quantized / 2**30:.1f} GiB."
        if quantized is not None
        else ""
    )
    if needed["weights_bytes"] * HEADROOM > memory_limit:
        smaller = offer or " Choose a smaller model."
        return f"The base model alone does not fit: training it needs {gib}.{smaller}"
    hint = "" if needed["gradient_checkpointing"] else ", or turn on gradient checkpointing"
    lower = "Lower batch tokens, the batch size or max length"
    return f"This run does not fit: it needs {gib}. {lower}{hint}.{offer}"


def quantized_fit(
    config: RunConfig, lengths: list[int] | None, memory_limit: int | None, cpu: bool | None = None
) -> int | None:
    """For a run too large for `memory_limit` in full precision: the bytes it needs with its base model
    loaded 4-bit (QLoRA), when that fits and its method can train on a quantised base; else None."""
    if config.training.quantization != "none" or peft_method(config.method).not_on_quantized:
        return None
    training = config.training.model_copy(update={"quantization": "4bit"})
    quantized = config.model_copy(update={"training": training})
    needed = memory_needed(quantized, lengths, memory_limit, cpu=cpu)
    if needed is None or memory_limit is None or needed["memory_bytes"] * HEADROOM > memory_limit:
        return None
    return int(needed["memory_bytes"])


def estimate(
    config: RunConfig,
    *,
    lengths: list[int] | None,
    memory_limit: int | None,
    calibration: Calibration | None = None,
) -> dict:
    """Cost figures for the New run page (`lengths`: the training rows' token lengths, when known;
    `calibration`: this machine's speed, from its latest finished run)."""
    shapes = Shapes.read(Path(config.model_path))
    training = config.training
    result: dict = {"total_steps": config.total_steps, "epochs": training.num_train_epochs}
    if shapes is None:
        return result
    total = shapes.total()
    trainable = trainable_parameters(shapes, config.method, config.peft)
    result |= {"trainable": trainable, "total": total, "fraction": trainable / total}
    needed = memory_needed(config, lengths, memory_limit)
    result |= needed or {}
    if calibration is not None and lengths:
        checkpointing = bool(needed and needed["gradient_checkpointing"])
        result |= duration(config, lengths, calibration, shapes, checkpointing=checkpointing)
    return result


def run_estimate(settings, session: Session, config: RunConfig) -> dict:
    """`estimate` for a resolved run on this server: its training rows' lengths, this machine's memory and
    speed."""
    from app.datasets.stats import rows_over

    calibration = latest_calibration(
        session, config.base_model, lambda run_config: training_lengths(settings, session, run_config)
    ) or trial_calibration(session, config.base_model, settings.stale_after_seconds)
    every = dataset_lengths(settings, session, config)
    result = estimate(
        config,
        lengths=None if every is None else trained_lengths(config, every),
        memory_limit=meminfo_bytes("MemAvailable"),
        calibration=calibration,
    )
    if every is not None:  # the dataset page's warning, under this run's max length
        over = rows_over(every, config.training.max_length)
        result |= {"rows_cut": len(over), "rows_cut_numbers": over[:20]}
    return result
