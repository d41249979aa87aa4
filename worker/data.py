"""Training examples: one sequence per row (prompt + answer + EOS), labels masked to the answer, and
batches of similar length within a token budget, so that almost no compute goes to padding.

The tutorial this product grew from tokenised prompt and answer separately and used the answer's ids as
labels for the prompt's positions; here a row is one sequence and its labels are its own input ids with
every prompt and padding position set to -100.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch.utils.data import Dataset, Sampler

from app.prompts import instruction_prompt
from app.runs.batching import plan_batches

if TYPE_CHECKING:
    from app.runs.config import RunConfig

IGNORE_INDEX = -100


class TemplateError(ValueError):
    """The chat template renders a conversation's prefix differently from the whole conversation."""


def load_rows(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def split_rows(config: RunConfig) -> dict[str, list[dict[str, Any]]]:
    """The rows each split's indices point into: "train" the run's dataset, "validation" the same or the
    evaluation dataset (config.held_out_path)."""
    rows = load_rows(config.dataset_path)
    held = load_rows(config.evaluation_path) if config.evaluation_path else rows
    return {"train": rows, "validation": held}


def training_rows(config: RunConfig, sources: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Every row of the run's dataset that is not held out."""
    held_out = set() if config.evaluation_path else set(config.validation_rows)
    return [row for i, row in enumerate(sources["train"]) if i not in held_out]


def held_out_rows(config: RunConfig, sources: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    rows = sources["validation"]
    return [rows[i] for i in config.validation_rows if i < len(rows)]


def segments(row: dict[str, Any], tokenizer, prompt_format: str) -> list[tuple[str, bool]]:
    """The training text cut into (text, learned) pieces: the answers (each with its end token) are
    learned, everything before and between them is context."""
    if prompt_format == "instruction":
        prompt, answer = instruction_prompt(row)
        return [(prompt, False), (answer + (tokenizer.eos_token or ""), True)]

    messages = row["messages"]
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    pieces, cursor = [], 0
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = (
            tokenizer.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True)
            if index
            else ""
        )
        through = tokenizer.apply_chat_template(messages[: index + 1], tokenize=False)
        if not (full.startswith(through) and through.startswith(prefix) and len(prefix) >= cursor):
            raise TemplateError(
                "The model's chat template renders earlier turns differently once later turns follow, so the "
                "answers cannot be located; use the Instruction/Input/Answer prompt format for this model."
            )
        end = len(through.rstrip())  # the answer ends with the end-of-turn token; whitespace after is context
        pieces += [(full[cursor : len(prefix)], False), (full[len(prefix) : end], True)]
        cursor = end
    pieces.append((full[cursor:], False))
    return [(text, learned) for text, learned in pieces if text]


def encode_row(
    row: dict[str, Any], tokenizer, prompt_format: str, max_length: int
) -> dict[str, list[int]] | None:
    """input_ids and labels for one row, truncated to max_length; None if nothing is left to learn.

    Each piece is tokenised on its own, so the prompt's tokens are exactly those the model sees when it is
    asked the same question later, and the answer's first token is learned whole (no token straddles the
    boundary)."""
    ids: list[int] = []
    labels: list[int] = []
    for number, (text, learned) in enumerate(segments(row, tokenizer, prompt_format)):
        # The tutorial layout lets the tokenizer add its BOS; a chat template writes its own special tokens.
        special = prompt_format == "instruction" and number == 0
        piece = tokenizer(text, add_special_tokens=special)["input_ids"]
        ids += piece
        labels += piece if learned else [IGNORE_INDEX] * len(piece)
    ids, labels = ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return {"input_ids": ids, "labels": labels}


@dataclass
class EncodedSplit:
    examples: list[dict[str, list[int]]]
    dropped: int  # rows with no answer token left after truncation

    @property
    def lengths(self) -> list[int]:
        return [len(e["input_ids"]) for e in self.examples]

    @property
    def tokens(self) -> int:
        return sum(self.lengths)


def encode_rows(rows: list[dict[str, Any]], tokenizer, prompt_format: str, max_length: int) -> EncodedSplit:
    examples, dropped = [], 0
    for row in rows:
        encoded = encode_row(row, tokenizer, prompt_format, max_length)
        if encoded is None:
            dropped += 1
        else:
            examples.append(encoded)
    return EncodedSplit(examples, dropped)


class ExampleDataset(Dataset):
    def __init__(self, examples: list[dict[str, list[int]]]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.examples[index]


class LengthBucketSampler(Sampler[list[int]]):
    """Batches of rows of similar length (app.runs.batching: at most `max_rows` rows, within `budget` padded
    tokens when there is one), visited in a random order that changes every epoch (and is the same again
    when a run resumes). A batch sampler: batches vary in size."""

    def __init__(self, lengths: list[int], max_rows: int, budget: int | None, seed: int):
        self.lengths, self.max_rows, self.budget, self.seed, self.epoch = lengths, max_rows, budget, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(plan_batches(self.lengths, self.max_rows, self.budget))

    def __iter__(self):
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        tie_break = [rng.random() for _ in self.lengths]
        batches = plan_batches(self.lengths, self.max_rows, self.budget, tie_break)
        rng.shuffle(batches)
        yield from batches


def pad_collator(tokenizer):
    """Pads each batch to its own longest row (labels with -100)."""
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(
        tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX, return_tensors="pt"
    )


def packing_collator():
    """Padding-free: a batch becomes one sequence with position_ids restarting at every row."""
    from transformers import DataCollatorWithFlattening

    return DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)
