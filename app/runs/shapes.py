"""The shapes of a Llama/Qwen/Mistral-style decoder, read from its config.json without torch: what the
memory (app.runs.estimate) and duration (app.runs.duration) estimates count."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

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


def adapted_modules(shapes: Shapes, target_modules) -> dict[str, tuple[int, int]]:
    linear = shapes.linear()
    if target_modules in (None, "all-linear"):
        return linear
    return {name: dims for name, dims in linear.items() if name in set(target_modules)}
