"""Trainer callbacks: progress into the database, polite cancellation, complete-checkpoint markers."""

from __future__ import annotations

import os
import time
from pathlib import Path

from transformers import TrainerCallback

from app.runs.folder import RunFolder
from worker.hardware import peak_memory_mb
from worker.sink import Sink


def process_memory_mb() -> float:
    """Resident memory of this process now (Linux), else its peak."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return peak_memory_mb()


def gpu_memory_mb() -> float | None:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return None


ORPHANED_EXIT = 75  # EX_TEMPFAIL: the run goes on elsewhere; not a failure of this attempt


class Orphaned(SystemExit):
    """This run was handed to another worker (or its worker died): stop without saving anything."""

    def __init__(self, reason: str):
        super().__init__(ORPHANED_EXIT)
        self.reason = reason


# TRL's preference trainers log these (evaluation: with "eval_" before them); stored under the names runs
# have always stored them by
RENAMED = {
    "rewards/chosen": "rewards_chosen",
    "rewards/rejected": "rewards_rejected",
    "rewards/margins": "reward_margin",
    "rewards/accuracies": "reward_accuracy",
}


def logged_values(logs: dict, *, evaluation: bool = False) -> dict:
    """Every value a trainer (or any callback before this one) logged, under Tuneboard's name where it has
    one: metrics are data, and a new one needs no change here. An evaluation's keys lose their "eval_"
    (the point's kind says it), except eval_loss, the name the pages and the API know it by."""
    values = {}
    for key, value in logs.items():
        name = key.removeprefix("eval_") if evaluation and key != "eval_loss" else key
        values[RENAMED.get(name, name)] = value
    return values


class ProgressCallback(TrainerCallback):
    """Appends one metrics row per log event, checks for cancellation, and marks complete checkpoints."""

    def __init__(
        self, sink: Sink, *, resumed_from: int | None, trainable: int, total: int, check_every: float = 2.0
    ):
        self.sink, self.resumed_from = sink, resumed_from
        self.trainable, self.total, self.check_every = trainable, total, check_every
        self._last_check = 0.0
        self._last_time: float | None = None
        self._last_step: int | None = None
        self._last_tokens: int | None = None
        self._evaluation_seconds = 0.0  # the latest scored evaluation's, all splits together
        self._evaluated_step: int | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.sink.start(
                total_steps=state.max_steps,
                trainable=self.trainable,
                total=self.total,
                resumed_from=self.resumed_from,
            )
        self._mark(state)

    def _mark(self, state) -> None:
        self._last_time, self._last_step, self._last_tokens = (
            time.perf_counter(),
            state.global_step,
            state.num_input_tokens_seen,
        )

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if "eval_loss" in logs:
            values = {"epoch": state.epoch, **logged_values(logs, evaluation=True)}
            self.sink.metric({**values, "kind": "eval", "step": state.global_step})
            return
        if "loss" not in logs:
            return  # the end-of-training summary
        now = time.perf_counter()
        steps = max(1, state.global_step - self._last_step)
        elapsed = now - self._last_time
        tokens = state.num_input_tokens_seen - self._last_tokens
        self.sink.metric(
            {
                "epoch": state.epoch,
                **logged_values(logs),
                "kind": "train",
                "step": state.global_step,
                "tokens_per_second": tokens / elapsed if elapsed > 0 else None,
                "step_time": elapsed / steps,
                "eta_seconds": self.eta(args, state, elapsed / steps),
                "memory_mb": process_memory_mb(),
                "gpu_memory_mb": gpu_memory_mb(),
            }
        )
        self._mark(state)

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.sink.reached(state.global_step)

    def exclude(self, seconds: float, step: int | None = None) -> None:
        """Time spent on something else (answering evaluation questions at `step`) does not count as
        training; it says how long each evaluation still to come will take."""
        if self._last_time is not None:
            self._last_time += seconds
        if step is not None:
            same = step == self._evaluated_step
            self._evaluation_seconds = (self._evaluation_seconds if same else 0.0) + seconds
            self._evaluated_step = step

    def eta(self, args, state, step_time: float) -> float:
        """Seconds left: the steps to go at this step time, and every evaluation still to come (one each
        save_steps from this step on, one at the end) at the latest one's time."""
        step, last = state.global_step, state.max_steps
        every = max(1, int(args.save_steps or last))
        evaluations = last // every - (step - 1) // every + (1 if last % every else 0)
        return max(0, last - step) * step_time + evaluations * self._evaluation_seconds

    def on_step_end(self, args, state, control, **kwargs):
        now = time.monotonic()
        if now - self._last_check < self.check_every:
            return
        self._last_check = now
        cancel, orphaned = self.sink.check()
        if orphaned:
            raise Orphaned(orphaned)
        if cancel:
            control.should_training_stop = True

    def on_save(self, args, state, control, **kwargs):
        """Trainer calls this after a checkpoint is fully written: only then does it count for resuming."""
        if state.is_world_process_zero:
            # output_dir is the run folder's checkpoints/ (see worker.train)
            checkpoint = RunFolder(Path(args.output_dir).parent).checkpoint(state.global_step)
            if checkpoint.path.is_dir():
                checkpoint.mark_complete()


class AdaLoraCallback(TrainerCallback):
    """AdaLoRA reallocates ranks after each optimizer step, while the gradients are still there."""

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        model.base_model.update_and_allocate(state.global_step)
