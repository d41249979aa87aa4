"""Tuneboard's Trainer: HF `Trainer` with length-bucketed batches within a token budget, and a loss that
projects onto the vocabulary only where a token is learned."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from transformers import Trainer

from worker.data import IGNORE_INDEX, LengthBucketSampler


def answer_only_loss(model, inputs: dict, num_items_in_batch=None) -> tuple[torch.Tensor, object]:
    """Causal-LM loss computed from the positions that predict a learned token only.

    The language-model head (hidden × vocabulary, the largest single matmul of a small model) and the
    softmax over the vocabulary are skipped for prompt and padding positions, whose labels are -100 anyway.
    Equal to the model's own loss (`tests/test_training.py` checks it)."""
    labels = inputs.pop("labels")
    targets = labels[:, 1:]
    keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(-1)  # positions whose next token is learned
    outputs = model(**inputs, logits_to_keep=keep)
    logits = outputs.logits.float()
    kept = targets[:, keep]
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), kept.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    count = num_items_in_batch if num_items_in_batch is not None else (kept != IGNORE_INDEX).sum()
    return loss / count, outputs


class TuneboardTrainer(Trainer):
    def __init__(
        self, *args, lengths: list[int], batch_tokens: int | None, answer_logits_only: bool, **kwargs
    ):
        super().__init__(*args, **kwargs)
        self.lengths, self.batch_tokens, self.answer_logits_only = lengths, batch_tokens, answer_logits_only

    def get_train_dataloader(self) -> DataLoader:
        """Batches from LengthBucketSampler, whose sizes vary within the token budget."""
        sampler = LengthBucketSampler(
            self.lengths, self.args.per_device_train_batch_size, self.batch_tokens, self.args.seed
        )
        assert isinstance(self.train_dataset, Dataset)
        loader = DataLoader(
            self.train_dataset,
            batch_sampler=sampler,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
        )
        return self.accelerator.prepare(loader)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.answer_logits_only or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, outputs = answer_only_loss(model, dict(inputs), num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # as Trainer does: the count spans every device
        return (loss, outputs) if return_outputs else loss
