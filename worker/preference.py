"""Preference runs (DPO, KTO): TRL's trainers on the same run folder, callbacks, checkpoints and resume as
SFT runs (worker.train), with pairs of answers instead of one.

Each pair is rendered as text the way an SFT row and the chat render it (worker.data.segments: the chat
template or the tutorial's layout), so the prompt the model learns to prefer answers to is exactly the one
it is asked later; TRL tokenises the prompt and each answer and computes the loss. The reference model is
the run's model with its adapter as it started: a new adapter is a no-op (the base model), and a run that
starts from another run's adapter keeps a frozen copy of it (TRL's "ref" adapter).
"""

from __future__ import annotations

import logging
import random
from typing import Any

from app.runs.config import RunConfig
from worker.data import held_out_rows, segments, training_rows

log = logging.getLogger("tuneboard.train")


def answer_turn(row: dict[str, Any], answer: str) -> dict[str, Any]:
    """The row with its last answer replaced (a preference row's messages end with the chosen one)."""
    return {**row, "messages": [*row["messages"][:-1], {"role": "assistant", "content": answer}]}


def rendered(row: dict[str, Any], tokenizer, prompt_format: str) -> tuple[str, str]:
    """(prompt, answer) as text: everything before the row's last answer, and that answer with its end
    token."""
    pieces = segments(row, tokenizer, prompt_format)
    last = max(i for i, (_, learned) in enumerate(pieces) if learned)
    return "".join(text for text, _ in pieces[:last]), pieces[last][0]


def pair_texts(row: dict[str, Any], tokenizer, prompt_format: str) -> dict[str, str]:
    """TRL's standard preference layout for one row: prompt, chosen and rejected as text."""
    prompt, chosen = rendered(row, tokenizer, prompt_format)
    again, rejected = rendered(answer_turn(row, row["rejected"]), tokenizer, prompt_format)
    if again != prompt:
        raise ValueError("the chosen and rejected answers render different prompts")
    # TRL's tokenizer call adds the tokenizer's own start token; a chat template has written it already
    bos = tokenizer.bos_token
    if bos and prompt.startswith(bos) and tokenizer("")["input_ids"][:1] == [tokenizer.bos_token_id]:
        prompt = prompt[len(bos) :]
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def pairs(rows: list[dict[str, Any]], tokenizer, prompt_format: str, seed: int):
    """The rows as a `datasets.Dataset` of pairs, in a seeded order (KTO reads them in order)."""
    from datasets import Dataset

    texts = [pair_texts(row, tokenizer, prompt_format) for row in rows if row.get("rejected") is not None]
    random.Random(seed).shuffle(texts)
    return Dataset.from_list(texts) if texts else None


def build_preference_trainer(config: RunConfig, sink, tokenizer, sources):
    """(trainer, tokenizer, checkpoint to resume from) for a DPO or KTO run."""
    from transformers import PrinterCallback
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

    from worker.train import (
        UserError,
        prepared_model,
        resume_point,
        run_folder,
        training_arguments,
        training_callbacks,
    )

    training = config.training
    train_pairs = pairs(training_rows(config, sources), tokenizer, config.prompt_format, training.seed)
    eval_pairs = pairs(held_out_rows(config, sources), tokenizer, config.prompt_format, training.seed)
    if train_pairs is None:
        raise UserError(
            "The dataset has no pair of answers to learn from: every row needs a rejected answer."
        )
    lengths = [len(tokenizer(p["prompt"] + p["chosen"])["input_ids"]) for p in train_pairs]
    model, dtype, trainable, total = prepared_model(config, lengths)
    preference = config.preference
    trainer_class: type[DPOTrainer | KTOTrainer]
    args_class: type[DPOConfig | KTOConfig]
    extra: dict = {}
    if config.objective == "dpo":
        trainer_class, args_class, extra = DPOTrainer, DPOConfig, {"loss_type": [preference.loss_type]}
    else:
        trainer_class, args_class = KTOTrainer, KTOConfig
    has_eval = eval_pairs is not None
    args = training_arguments(
        config,
        dtype,
        has_eval,
        args_class,
        beta=preference.beta,
        max_length=training.max_length,
        **extra,
    )
    resume = resume_point(run_folder(config))
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=train_pairs,
        eval_dataset=eval_pairs,
        processing_class=tokenizer,
        callbacks=training_callbacks(config, sink, sources, tokenizer, resume[1], trainable, total),
    )
    trainer.remove_callback(PrinterCallback)
    log.info("%s with beta %s on %d pairs", config.objective.upper(), preference.beta, len(train_pairs))
    return trainer, tokenizer, resume[0]
