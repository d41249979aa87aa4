"""What a run will cost, before it starts and without torch: trainable parameters from the model's
config.json, optimizer steps, memory, and a duration from throughput measured on this machine."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import Run, RunMetric, RunStatus
from app.runs.config import RunConfig

LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Shapes:
    """The linear layers of a Llama/Qwen/Mistral-style decoder, read from config.json."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @classmethod
    def read(cls, folder: Path) -> Shapes | None:
        try:
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
            hidden, heads = config["hidden_size"], config["num_attention_heads"]
            return cls(
                hidden=hidden,
                intermediate=config["intermediate_size"],
                layers=config["num_hidden_layers"],
                heads=heads,
                kv_heads=config.get("num_key_value_heads") or heads,
                head_dim=config.get("head_dim") or hidden // heads,
                vocab=config["vocab_size"],
                tied=bool(config.get("tie_word_embeddings", False)),
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def linear(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear module in one layer."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        h, i = self.hidden, self.intermediate
        return {
            "q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
        }  # fmt: skip

    def total(self) -> int:
        per_layer = sum(a * b for a, b in self.linear().values()) + 2 * self.hidden
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return embeddings + self.layers * per_layer + self.hidden


def _targets(shapes: Shapes, target_modules) -> dict[str, tuple[int, int]]:
    linear = shapes.linear()
    if target_modules in (None, "all-linear"):
        return linear
    return {name: dims for name, dims in linear.items() if name in set(target_modules)}


def trainable_parameters(shapes: Shapes, method: str, peft: dict) -> int:
    layers = shapes.layers
    if method in ("lora", "adalora"):
        r = peft["r"] if method == "lora" else peft["init_r"]
        targets = _targets(shapes, peft.get("target_modules"))
        per_layer = sum(r * (a + b) for a, b in targets.values())
        if method == "adalora":
            per_layer += r * len(targets)  # the singular values
        if peft.get("use_dora"):
            per_layer += sum(b for _, b in targets.values())  # the magnitude vectors
        return layers * per_layer
    if method == "loha":
        return layers * sum(
            2 * peft["r"] * (a + b) for a, b in _targets(shapes, peft.get("target_modules")).values()
        )
    if method == "lokr":
        # Kronecker factors are far smaller than LoRA's; this counts the low-rank factor, the larger one.
        return layers * sum(
            peft["r"] * (a + b) // 2 for a, b in _targets(shapes, peft.get("target_modules")).values()
        )
    if method == "ia3":
        linear = shapes.linear()
        modules = peft.get("target_modules") or ["k_proj", "v_proj", "down_proj"]
        feedforward = set(peft.get("feedforward_modules") or ["down_proj"])
        return layers * sum(
            linear[t][0] if t in feedforward else linear[t][1] for t in modules if t in linear
        )
    tokens = peft["num_virtual_tokens"]
    if method == "prompt_tuning":
        return tokens * shapes.hidden
    if method == "prefix_tuning":
        return tokens * layers * 2 * shapes.kv_heads * shapes.head_dim
    if method == "p_tuning":
        e = peft["encoder_hidden_size"]
        return tokens * shapes.hidden + shapes.hidden * e + e * e + e * shapes.hidden + 2 * e + shapes.hidden
    return 0


def measured_tokens_per_second(base_model: str, *, session: Session) -> float | None:
    """The median throughput of the latest finished run on this base model, if any."""
    latest = session.scalar(
        select(Run.id)
        .where(Run.base_model == base_model, Run.status == RunStatus.SUCCEEDED)
        .order_by(Run.id.desc())
        .limit(1)
    )
    if latest is None:
        return None
    speeds = session.scalars(
        select(RunMetric.tokens_per_second).where(RunMetric.run_id == latest, RunMetric.kind == "train")
    ).all()
    measured = [speed for speed in speeds if speed is not None]
    return statistics.median(measured) if measured else None


def length_stats(
    settings, session: Session, *, dataset_id: int, base_model: str, max_length: int, prompt_format: str
) -> dict | None:
    """The dataset's token-length statistics under a model and prompt format (computed once, then cached:
    app.datasets.store.token_stats); None while they are being computed or when they cannot be."""
    from app.datasets import store
    from app.datasets.jobs import StatsPending
    from app.model_registry import find_model
    from app.models import Dataset

    dataset = session.get(Dataset, dataset_id)
    model = find_model(settings, base_model, session=session)
    if dataset is None or model is None or not model.ready:
        return None
    try:
        return store.token_stats(settings, dataset, model, max_length=max_length, prompt_format=prompt_format)
    except (ValueError, StatsPending):
        return None


def dataset_tokens(settings, session: Session, config: RunConfig) -> int | None:
    """Total tokens of the run's dataset; None when unknown (the estimate then counts rows)."""
    stats = length_stats(
        settings,
        session,
        dataset_id=config.dataset_id,
        base_model=config.base_model,
        max_length=config.training.max_length,
        prompt_format=config.prompt_format,
    )
    return None if stats is None else stats["tokens"]


def estimate(config: RunConfig, *, dataset_tokens: int | None, session: Session) -> dict:
    """Cost figures for the New run page. None where the model's layout is unknown."""
    shapes = Shapes.read(Path(config.model_path))
    training = config.training
    result: dict = {"total_steps": config.total_steps, "epochs": training.num_train_epochs}
    if shapes is not None:
        total = shapes.total()
        trainable = trainable_parameters(shapes, config.method, config.peft)
        weight_bytes = 2 if training.dtype in ("auto", "bfloat16", "float16") else 4
        tokens_per_batch = training.per_device_train_batch_size * min(training.max_length, 512)
        activations = (
            tokens_per_batch
            * shapes.layers
            * shapes.hidden
            * 20
            * (0.25 if training.gradient_checkpointing else 1)
        )
        logits = tokens_per_batch * shapes.vocab * 4 * 2
        memory = total * weight_bytes + trainable * 16 + activations + logits
        result |= {
            "trainable": trainable,
            "total": total,
            "fraction": trainable / total,
            "memory_bytes": memory,
        }
    speed = measured_tokens_per_second(config.base_model, session=session)
    if speed and dataset_tokens:
        held_out = 0 if config.evaluation_path else len(config.validation_rows)  # else all rows train
        epoch_tokens = dataset_tokens * config.train_rows / max(1, config.train_rows + held_out)
        result |= {"tokens_per_second": speed, "seconds": epoch_tokens * training.num_train_epochs / speed}
    return result
