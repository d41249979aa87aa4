"""Answers, scored, inside the training process: the base model once before the first step, then the
adapter at every checkpoint saved. The rows and their number come from the run's configuration
(app.runs.evaluation.evaluation_rows); answers are greedy and bounded, generated in left-padded batches
with the model training already holds (nothing is loaded twice), and scored with app.scoring against the
reference (cut to the same length when it is longer than an answer may be).

Training waits while it evaluates: the cost is the evaluation's seconds, logged and stored with the
answers (make bench reports it per checkpoint).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from app.peft_methods import method as peft_method
from app.runs.config import RunConfig
from app.runs.evaluation import best_of, evaluation_rows, question_of
from app.runs.folder import CHECKPOINT_PREFIX
from app.scoring import Scores, mean, score
from worker.callbacks import ProgressCallback
from worker.engine import messages_prompt_ids, whole_characters
from worker.judge import Judge
from worker.sink import Sink

log = logging.getLogger("tuneboard.train")


def scored(config: RunConfig, processes: int = 1) -> bool:
    """Whether this run's answers are scored: not for a method the registry marks unscored (prefix tuning:
    its prefix lives in the attention cache, which generation in this transformers version replaces, so its
    answers would be the base model's; the page says so), nor for a run whose weights FSDP shards across
    its `processes` (one process cannot generate with them alone)."""
    return peft_method(config.method).scored and not (config.distributed == "fsdp" and processes > 1)


BATCH = 8
SPLIT_NAMES = {"validation": "held-out rows", "train": "training rows"}
JUDGE_WAIT_SECONDS = 900  # at the end of training, for the judge's verdicts on the last checkpoint


@dataclass
class Question:
    row: int
    prompt: list[int]
    question: str  # the text the answer replies to (for the judge)
    reference: str  # scored_reference: the row's answer, cut to max_new_tokens
    budget: int  # new tokens allowed (answer_budget)


def questions(
    config: RunConfig, sources: dict[str, list[dict[str, Any]]], tokenizer
) -> dict[str, list[Question]]:
    """Each split's rows as prompts (the conversation up to its last answer, as training encodes it) and
    reference answers (that last answer). A prompt longer than the run's max length keeps its end."""
    keep = max(1, config.training.max_length - config.evaluation.max_new_tokens)
    result: dict[str, list[Question]] = {}
    for split, indices in evaluation_rows(config).items():
        result[split] = []
        rows = sources[split]
        for index in indices:
            messages = [dict(m) for m in rows[index]["messages"]]
            if not messages or messages[-1]["role"] != "assistant":
                continue
            question = question_of(messages)
            reference = scored_reference(
                tokenizer, messages.pop()["content"], config.evaluation.max_new_tokens
            )
            if rows[index].get("alpaca") and messages:
                messages[-1]["alpaca"] = rows[index]["alpaca"]
            prompt = messages_prompt_ids(tokenizer, messages, config.prompt_format)[-keep:]
            budget = answer_budget(tokenizer, reference, config.evaluation.max_new_tokens)
            result[split].append(Question(index, prompt, question, reference, budget))
        result[split].sort(key=lambda q: q.budget)  # batches of similar length: none waits for a long one
    return result


def scored_reference(tokenizer, reference: str, limit: int) -> str:
    """The reference an answer is scored against: the whole of it, or, when it is longer than the `limit`
    new tokens an answer may have, its first `limit` tokens (a cut answer is compared with a reference
    cut the same way, so that a right beginning can score full marks)."""
    ids = tokenizer(reference, add_special_tokens=False)["input_ids"]
    if len(ids) <= limit:
        return reference
    return whole_characters(tokenizer.decode(ids[:limit], skip_special_tokens=True))


def answer_budget(tokenizer, reference: str, limit: int) -> int:
    """New tokens an answer may take: twice the reference's length plus a little (a longer answer cannot
    score better against it), at most `limit`."""
    return min(limit, 2 * len(tokenizer(reference, add_special_tokens=False)["input_ids"]) + 16)


@torch.no_grad()
def answer(
    model, tokenizer, prompts: list[list[int]], budgets: list[int], done: Callable[[int], None] | None = None
) -> list[str]:
    """Greedy answers to token-id prompts, in left-padded batches; a batch generates at most the largest of
    its prompts' budgets of new tokens. `done` hears how many are answered before each batch."""
    device = next(model.parameters()).device
    texts: list[str] = []
    for start in range(0, len(prompts), BATCH):
        if done is not None:
            done(start)
        batch = prompts[start : start + BATCH]
        max_new_tokens = max(budgets[start : start + BATCH])
        width = max(len(p) for p in batch)
        pad = tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        with warnings.catch_warnings():  # prompt-learning models place their virtual tokens themselves
            warnings.filterwarnings(
                "ignore", message="Position ids are not supported for parameter efficient"
            )
            output = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                use_cache=True,
                pad_token_id=pad,
            )
        texts += tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
    return [whole_characters(t).strip() for t in texts]


class EvaluationCallback(TrainerCallback):
    """Scores the base model's answers when training starts (not again on a resumed attempt) and the
    adapter's at every checkpoint."""

    def __init__(
        self,
        config: RunConfig,
        sink: Sink,
        questions: dict[str, list[Question]],
        *,
        resumed: bool,
        progress: ProgressCallback | None = None,
        judge: Judge | None = None,
        answers_dir: Path | None = None,
    ):
        self.config, self.sink, self.questions, self.resumed = config, sink, questions, resumed
        self.answers_dir = answers_dir  # where the base model's answers are kept for the next run to reuse
        self.judge = judge  # grades each split's answers in the background
        self.progress = progress  # told how long evaluating took, so that it is not counted as training
        self.scores: dict[int, float] = {}  # this attempt's checkpoints: step -> the score that selects

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        if not self.resumed and state.is_world_process_zero and model is not None:
            self.evaluate_base(model, processing_class)

    def on_train_end(self, args, state, control, **kwargs):
        if self.judge is not None:
            log.info("waiting for the judge's last verdicts (at most %d s)", JUDGE_WAIT_SECONDS)
            self.judge.close(timeout=JUDGE_WAIT_SECONDS)

    def on_save(self, args, state, control, model=None, processing_class=None, **kwargs):
        if state.is_world_process_zero and model is not None:
            means = self.evaluate(model, processing_class, state.global_step)
            selected = self.selection(state, means)
            if selected is not None:
                self.scores[state.global_step] = selected
                best = best_of(self.scores)
                # The Trainer's checkpoint rotation (save_total_limit) always keeps this one.
                state.best_model_checkpoint = str(Path(args.output_dir) / f"{CHECKPOINT_PREFIX}{best}")
                patience = self.config.evaluation.early_stopping_patience
                since = sum(1 for step in self.scores if step > best)
                if patience and since >= patience:
                    log.info(
                        "stopping early: %d checkpoints in a row scored no better than step %d", since, best
                    )
                    control.should_training_stop = True

    def selection(self, state, means: dict[str, Scores]) -> float | None:
        """The score that picks the best checkpoint (higher is better): the chosen answer metric's mean on
        held-out rows (training rows when none are held out), or the validation loss just computed for
        this step, negated."""
        chosen = self.config.evaluation.select_by
        if chosen == "eval_loss":
            losses = [
                e["eval_loss"]
                for e in state.log_history
                if "eval_loss" in e and e.get("step") == state.global_step
            ]
            return -losses[-1] if losses else None
        split = means.get("validation", means.get("train"))
        return None if split is None else split[chosen]

    def evaluate_base(self, model, tokenizer) -> None:
        """The base model's answers (step 0), from the PEFT model with its adapter out of the way; for a run
        that continues another run's adapter, that adapter's answers (where this run starts)."""
        if self.config.start_adapter:
            self.evaluate(model, tokenizer, 0)
            return
        base = model.get_base_model() if peft_method(self.config.method).prompt_learning else model
        kept = base_answers_file(self.answers_dir, self.config, base, self.questions)
        known = read_answers(kept)
        if known is not None:
            log.info("the base model's answers to these rows and settings are reused from an earlier run")
            self.evaluate(base, tokenizer, 0, known=known)
            return
        texts: dict[str, list[str]] = {}
        with model.disable_adapter() if base is model else nullcontext():
            self.evaluate(base, tokenizer, 0, answered=texts)
        write_answers(kept, texts)

    def reporting(self, step: int, split: str, total: int) -> Callable[[int], None]:
        """What the run page says while answers are generated: whose, to which rows, how far along."""
        whose = "the base model's" if step == 0 else f"step {step}'s"

        def done(count: int) -> None:
            self.sink.phase(f"Scoring {whose} answers to {SPLIT_NAMES[split]}: {count} of {total}")

        return done

    def evaluate(
        self,
        model,
        tokenizer,
        step: int,
        *,
        known: dict[str, list[str]] | None = None,
        answered: dict[str, list[str]] | None = None,
    ) -> dict[str, Scores]:
        """Answer and score every split at `step` (with `known`, the answers given instead of generated);
        returns each answered split's mean scores, and fills `answered` with the answers by split."""
        result: dict[str, Scores] = {}
        processes = int(os.environ.get("WORLD_SIZE", "1"))
        if not any(self.questions.values()) or not scored(self.config, processes):
            return result
        training = model.training
        side = tokenizer.padding_side
        model.eval()
        tokenizer.padding_side = "left"
        try:
            for split, items in self.questions.items():
                if not items:
                    continue
                started = time.perf_counter()
                if known is not None and len(known.get(split, [])) == len(items):
                    texts = known[split]
                else:
                    texts = answer(
                        model,
                        tokenizer,
                        [q.prompt for q in items],
                        [q.budget for q in items],
                        self.reporting(step, split, len(items)),
                    )
                seconds = time.perf_counter() - started
                if answered is not None:
                    answered[split] = texts
                scores = [score(text, q.reference) for q, text in zip(items, texts, strict=True)]
                answers = [
                    {"row": q.row, "answer": text, **scored}
                    for q, text, scored in zip(items, texts, scores, strict=True)
                ]
                self.sink.answers(step=step, split=split, answers=answers, seconds=seconds)
                if self.judge is not None:
                    graded = [(q.row, q.question, q.reference, t) for q, t in zip(items, texts, strict=True)]
                    self.judge.submit(step=step, split=split, items=graded)
                if self.progress is not None:
                    self.progress.exclude(time.perf_counter() - started, step)
                means = mean(scores)
                log.info("evaluation at step %d, %s rows: %s in %.1f s", step, split, means, seconds)
                if means is not None:
                    result[split] = means
        finally:
            tokenizer.padding_side = side
            model.train(training)
            self.sink.phase(None)  # back to training
        return result


def base_answers_file(folder: Path | None, config: RunConfig, model, questions) -> Path | None:
    """Where the base model's greedy answers to exactly these prompts, budgets, weights, dtype and device
    are kept: a relaunch (advice's one click, a new learning rate) asks the same questions of the same base
    model, and its answers cannot differ. None when no folder is given."""
    if folder is None:
        return None
    weights = sorted(Path(config.model_path).glob("*.safetensors"))
    key = {
        "model": config.model_path,
        "weights": [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in weights],
        "dtype": str(model.dtype),
        "device": str(model.device),
        "questions": {s: [(q.row, q.prompt, q.budget) for q in items] for s, items in questions.items()},
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return folder / f"{digest}.json"


def read_answers(path: Path | None) -> dict[str, list[str]] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path is not None else None
    except (OSError, ValueError):
        return None


def write_answers(path: Path | None, texts: dict[str, list[str]]) -> None:
    if path is None or not texts:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    staging.write_text(json.dumps(texts), encoding="utf-8")
    os.replace(staging, path)


def evaluate_run(settings, run_id: int, step: int | None, *, base: bool = False) -> dict[str, Any]:
    """`tuneboard eval`: the same evaluation for a run's final adapter (step None, stored under the run's
    last step) or one complete checkpoint, and optionally for the base model (step 0), from the command
    line. Returns the run's evaluation summary afterwards."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from app.db import Database
    from app.models import Run
    from app.runs.evaluation import summary
    from worker.data import split_rows
    from worker.hardware import choose_dtype
    from worker.sink import DatabaseSink

    db = Database(settings.sqlalchemy_url)
    with db.session() as session:
        run = session.get(Run, run_id)
        if run is None:
            raise SystemExit(f"There is no run {run_id}.")
        config = RunConfig.model_validate(run.config)
        stored_step = step if step is not None else run.current_step
    folder = settings.run_folder(run_id)
    adapter = folder.adapter_at(step)
    if step is None and not folder.has_adapter:
        raise SystemExit(f"Run {run_id} has no final adapter yet; name a checkpoint with --checkpoint STEP.")
    if step is not None and not folder.checkpoint(step).complete:
        steps = ", ".join(str(c.step) for c in folder.checkpoints() if c.complete) or "none"
        raise SystemExit(f"Run {run_id} has no complete checkpoint at step {step} (complete: {steps}).")
    tokenizer = AutoTokenizer.from_pretrained(config.model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    base_model = AutoModelForCausalLM.from_pretrained(
        config.model_path, dtype=choose_dtype(config.training.dtype)
    )
    model = PeftModel.from_pretrained(base_model, str(adapter))
    sink = DatabaseSink(settings.sqlalchemy_url, run_id, run.attempts, settings.stale_after_seconds)
    judge = Judge(config.evaluation.judge, settings, sink) if config.evaluation.judge else None
    scoring = EvaluationCallback(
        config, sink, questions(config, split_rows(config), tokenizer), resumed=True, judge=judge
    )
    if base:
        scoring.evaluate_base(model, tokenizer)
    scoring.evaluate(model, tokenizer, stored_step)
    if judge is not None:
        judge.close()
    with db.session() as session:
        run = session.get(Run, run_id)
        assert run is not None  # checked above; runs are not deleted while a process uses them
        result = summary(session=session, run=run)
    db.dispose()
    return result
