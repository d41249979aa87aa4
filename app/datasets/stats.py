"""Dataset statistics that need no model weights: token lengths under a base model's prompt format
(its `tokenizer.json` read by the `tokenizers` library, its chat template rendered by Jinja), rows that
would be truncated, duplicates, and the train/validation split.
"""

from __future__ import annotations

import hashlib
import json
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, cast

from app.datasets.split import validation_rows
from app.prompts import instruction_prompt


@dataclass(frozen=True)
class TokenizerInfo:
    """What the statistics need from a model folder, without importing torch."""

    folder: Path
    chat_template: str | None
    special_tokens: dict[str, str]

    @property
    def eos_token(self) -> str:
        return self.special_tokens.get("eos_token", "")


def _token_text(value: Any) -> str:
    if isinstance(value, dict):
        return value.get("content", "")
    return value or ""


@lru_cache(maxsize=8)
def _tokenizer(path: str, mtime: float):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(path)


def read_tokenizer_info(folder: Path) -> TokenizerInfo:
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    template = None
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    elif (folder / "chat_template.json").is_file():
        template = json.loads((folder / "chat_template.json").read_text(encoding="utf-8")).get(
            "chat_template"
        )
    else:
        template = config.get("chat_template")
    if isinstance(template, list):  # named templates: use the default one
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default") or next(iter(named.values()), None)
    specials = {
        key: _token_text(config.get(key))
        for key in ("bos_token", "eos_token", "pad_token", "unk_token")
        if config.get(key)
    }
    return TokenizerInfo(folder=folder, chat_template=template, special_tokens=specials)


def render_texts(rows: list[dict[str, Any]], info: TokenizerInfo, prompt_format: str) -> list[str]:
    """Each row as the full training text (prompt and answer) in the given prompt format."""
    if prompt_format == "instruction":
        texts = []
        for row in rows:
            prompt, answer = instruction_prompt(row)
            texts.append(prompt + answer + info.eos_token)
        return texts
    if not info.chat_template:
        raise ValueError(
            "This model has no chat template; choose the tutorial's Instruction/Input/Answer layout instead."
        )
    # transformers' own renderer (sandboxed Jinja, the same code apply_chat_template uses); it does not
    # import torch.
    from transformers.utils.chat_template_utils import render_jinja_template

    # Annotated as returning str, it returns (one text per conversation, generation indices).
    render = cast(Callable[..., tuple[list[str], object]], render_jinja_template)
    rendered, _ = render(
        conversations=[row["messages"] for row in rows],
        chat_template=info.chat_template,
        **info.special_tokens,
    )
    return rendered


MEASURED_CHARS = 1_000_000  # a longer text is measured on its first million characters (a lower bound)


def map_texts(value: Any, change: Callable[[str], str]) -> Any:
    """A row (or any JSON value) with `change` applied to every string in it."""
    if isinstance(value, str):
        return change(value)
    if isinstance(value, list):
        return [map_texts(v, change) for v in value]
    if isinstance(value, dict):
        return {k: map_texts(v, change) for k, v in value.items()}
    return value


def _measured(text: str) -> str:
    return text[:MEASURED_CHARS]


def token_lengths(rows: list[dict[str, Any]], info: TokenizerInfo, prompt_format: str) -> list[int]:
    """Each row's length in tokens under the prompt format. A text longer than MEASURED_CHARS counts its
    first MEASURED_CHARS characters only (some 250,000 tokens, past any max length), so that one huge row
    costs megabytes, not gigabytes."""
    tokenizer_path = info.folder / "tokenizer.json"
    tokenizer = _tokenizer(str(tokenizer_path), tokenizer_path.stat().st_mtime)
    texts = render_texts([map_texts(row, _measured) for row in rows], info, prompt_format)
    encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
    return [len(e.ids) for e in encodings]


def percentile(sorted_values: list[int], q: float) -> int:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return 0
    rank = max(1, -(-len(sorted_values) * q // 100))
    return sorted_values[int(rank) - 1]


def histogram(values: list[int], bins: int = 20) -> dict[str, list[int]]:
    low, high = min(values), max(values)
    width = max(1, -(-(high - low + 1) // bins))
    edges = [low + i * width for i in range(bins + 1)]
    counts = [0] * bins
    for v in values:
        counts[min((v - low) // width, bins - 1)] += 1
    while len(counts) > 1 and counts[-1] == 0:
        counts.pop()
        edges.pop()
    return {"edges": edges, "counts": counts}


def rows_over(lengths: list[int], max_length: int) -> list[int]:
    """The rows (numbered from 1, as every page numbers them) that max_length would cut."""
    return [i + 1 for i, n in enumerate(lengths) if n > max_length]


def length_stats(lengths: list[int], *, max_length: int) -> dict[str, Any]:
    ordered = sorted(lengths)
    over = rows_over(lengths, max_length)
    return {
        "rows": len(lengths),
        "tokens": sum(lengths),
        "min": ordered[0],
        "p50": percentile(ordered, 50),
        "p95": percentile(ordered, 95),
        "max": ordered[-1],
        "mean": round(statistics.fmean(ordered), 1),
        "max_length": max_length,
        "truncated": len(over),
        "truncated_rows": over[:20],
        "histogram": histogram(lengths),
    }


class DuplicateFinder:
    """Rows whose whole conversation repeats an earlier row, found one row at a time in bounded memory:
    an 8-byte hash per distinct row (row numbers are 1-based)."""

    def __init__(self, examples: int = 10):
        self.first_seen: dict[bytes, int] = {}
        self.rows = self.count = 0
        self.examples: list[dict[str, int]] = []
        self.limit = examples

    def add(self, row: dict[str, Any]) -> None:
        self.rows += 1
        text = json.dumps(row["messages"], sort_keys=True, ensure_ascii=False)
        key = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
        first = self.first_seen.setdefault(key, self.rows)
        if first != self.rows:
            self.count += 1
            if len(self.examples) < self.limit:
                self.examples.append({"row": self.rows, "same_as": first})

    def result(self) -> dict[str, Any]:
        return {"count": self.count, "examples": self.examples}


def duplicate_rows(rows: Iterable[dict[str, Any]]) -> dict[str, Any]:
    finder = DuplicateFinder()
    for row in rows:
        finder.add(row)
    return finder.result()


def split_summary(n_rows: int, *, fraction: float, max_rows: int, seed: int) -> dict[str, Any]:
    held_out = validation_rows(n_rows, fraction=fraction, max_rows=max_rows, seed=seed)
    return {
        "train": n_rows - len(held_out),
        "validation": len(held_out),
        "seed": seed,
        "fraction": fraction,
        "validation_rows": [i + 1 for i in held_out[:20]],
    }
