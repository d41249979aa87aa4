"""One training run in one interpreter: `python -m worker.train RUN_YAML` (the worker starts it directly, or
through `accelerate launch` for a run of several processes; `tuneboard train run.yaml` runs it by hand).
Heavy imports live inside functions.

Writes into the run folder: `train.log` (the worker redirects output there), `checkpoints/checkpoint-N/`
(marked complete after each save), `adapter/` (PEFT's standard layout plus the tokenizer) and, if it fails,
`error.txt` with one sentence for the user.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml

from app.config import Settings
from app.peft_methods import method as peft_method
from app.runs.config import PREFERENCE_OBJECTIVES, RunConfig
from app.runs.estimate import memory_needed, refusal
from app.runs.folder import ADAPTER_CONFIG, CHECKPOINT_PREFIX, RunFolder
from worker.hardware import choose_dtype, free_memory, peak_memory_mb, shortfall
from worker.quantized import keep_trainable, loading_arguments, weights_in_memory

log = logging.getLogger("tuneboard.train")


class UserError(Exception):
    """A failure with a sentence the user can act on."""


def read_config(path: Path) -> RunConfig:
    config = RunConfig.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")))
    if config.output_dir is None:
        config = config.model_copy(update={"output_dir": str(path.parent)})
    return config


def run_folder(config: RunConfig) -> RunFolder:
    """The run's folder (`read_config` fills it in when the file leaves it out)."""
    if config.output_dir is None:
        raise UserError("The run configuration names no output folder.")
    return RunFolder(Path(config.output_dir))


def write_config(config: RunConfig, path: Path) -> None:
    path.write_text(
        yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True), encoding="utf-8"
    )


def world_size() -> int:
    """How many processes train this run (accelerate's launcher says; 1 when started alone)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_fits(model_path: Path, dtype, shards: int = 1, quantization: str = "none") -> None:
    """Refuse a model whose weights alone would not fit, before loading it takes the machine down (under
    FSDP each of the run's `shards` processes holds its part; a quantised base as app.runs.estimate counts
    it)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if problem := shortfall(weights_in_memory(model_path, dtype, quantization) // shards, device):
        raise UserError(
            f"The base model does not fit: {problem}. Choose a smaller model, or free memory and launch "
            "again."
        )


def choose_checkpointing(config: RunConfig, lengths: list[int], dtype) -> bool:
    """Gradient checkpointing as the run asks; when it leaves it to Tuneboard (None), on only if the largest
    batch would not fit the free memory without it (app.runs.estimate). Refuses a run that would not fit."""
    import torch

    cpu = not torch.cuda.is_available()
    free, _ = free_memory("cpu" if cpu else "cuda")
    weight_bytes = torch.finfo(dtype).bits // 8
    needed = memory_needed(config, lengths, free, weight_bytes, cpu)
    if needed is None:  # a model whose layout the estimate does not know
        return bool(config.training.gradient_checkpointing)
    if config.training.gradient_checkpointing is None:
        log.info(
            "gradient checkpointing %s: the largest batch is %d padded tokens, about %.1f GiB without it",
            "on" if needed["gradient_checkpointing"] else "off",
            needed["largest_batch_tokens"],
            needed["memory_without_checkpointing"] / 2**30,
        )
    if reason := refusal(config, lengths, free, weight_bytes, cpu):
        raise UserError(reason)
    return needed["gradient_checkpointing"]


def load_model(config: RunConfig, dtype, checkpointing: bool):
    """The base model with the run's adapter: a new one (the run's method, seeded), or the starting run's
    adapter to train on (`start_adapter`). Returns (PEFT model, trainable parameters, the base model's
    parameters)."""
    import torch
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, set_seed

    from worker.peft_methods import build_peft_config

    model_path = Path(config.model_path)
    quantization = config.training.quantization
    model: Any = AutoModelForCausalLM.from_pretrained(
        model_path, attn_implementation=config.training.attention, **loading_arguments(quantization, dtype)
    )
    model.config.use_cache = False  # required for correct packed-sequence masks, useless in training
    total = model.num_parameters()  # the base model's own, as New run's estimate counts them (one total)
    if quantization != "none":  # PEFT's k-bit preparation: the unquantised weights in float32, inputs that
        # carry gradients
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        keep_trainable(model)  # scoring answers between steps must not switch the layers to inference
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    set_seed(
        config.training.seed
    )  # the adapter's initial weights follow the run's seed: a rerun starts the same
    if config.start_adapter:
        start = Path(config.start_adapter)
        if not (start / ADAPTER_CONFIG).is_file():
            raise UserError(
                f"The adapter of run {config.start_run_id}, which this run starts from, is missing."
            )
        model = PeftModel.from_pretrained(model, start, is_trainable=True)
    else:
        peft_config = build_peft_config(
            config.method, config.peft, total_steps=config.total_steps, model_path=str(model_path)
        )
        try:
            model = get_peft_model(model, peft_config)
        except ValueError as exc:
            raise UserError(f"PEFT could not apply {config.method} to this model: {exc}") from exc
    trainable, _with_adapter = model.get_nb_trainable_parameters()
    log.info(
        "%s%s on %s in %s%s on %d CPU threads: %d of %d parameters trainable",
        config.method,
        f" (from run {config.start_run_id}'s adapter)" if config.start_adapter else "",
        config.base_model,
        dtype,
        f" (base model {quantization})" if quantization != "none" else "",
        torch.get_num_threads(),
        trainable,
        total,
    )
    return model, trainable, total


def prepared_model(config: RunConfig, lengths: list[int]):
    """The model to train, after the checks that it fits: (model, dtype, trainable, all parameters).
    `lengths`: the training sequences' token lengths, for the memory estimate."""
    dtype = choose_dtype(config.training.dtype)
    quantization = config.training.quantization
    if quantization != "none" and world_size() > 1:
        raise UserError(
            "A run with a quantised base model trains in one process here: ask for one GPU (or set "
            "quantization to none to train in several)."
        )
    check_fits(
        Path(config.model_path), dtype, world_size() if config.distributed == "fsdp" else 1, quantization
    )
    checkpointing = choose_checkpointing(config, lengths, dtype)
    model, trainable, total = load_model(config, dtype, checkpointing)
    return model, dtype, trainable, total


def training_arguments(config: RunConfig, dtype, has_eval: bool, args_class=None, **extra):
    """The Trainer's arguments from the run's settings (`args_class`: a TrainingArguments subclass, such as
    a TRL trainer's config, with its own `extra` settings)."""
    import torch
    from transformers import TrainingArguments

    training = config.training
    on_gpu = torch.cuda.is_available()
    return (args_class or TrainingArguments)(
        output_dir=str(run_folder(config).checkpoints_dir),
        num_train_epochs=training.num_train_epochs,
        # the launch counted the steps (token-budget batches from the dataset's cached lengths): keep them
        max_steps=config.total_steps,
        learning_rate=training.learning_rate,
        per_device_train_batch_size=training.per_device_train_batch_size,
        per_device_eval_batch_size=training.per_device_train_batch_size,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        warmup_steps=training.warmup_ratio,  # transformers 5: a float below 1 is a ratio of the steps
        lr_scheduler_type=training.lr_scheduler_type,
        weight_decay=training.weight_decay,
        max_grad_norm=training.max_grad_norm,
        logging_steps=training.logging_steps,
        save_strategy="steps",
        save_steps=training.save_steps,
        save_total_limit=training.save_total_limit,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=training.eval_steps if has_eval else None,
        seed=training.seed,
        bf16=on_gpu and dtype == torch.bfloat16,
        fp16=on_gpu and dtype == torch.float16,
        activation_checkpointing=False,  # load_model turns it on, when it is chosen
        include_num_input_tokens_seen="non_padding",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=on_gpu,
        remove_unused_columns=False,
        save_only_model=False,
        prediction_loss_only=True,
        **extra,
    )


BASE_ANSWERS = ".base-answers"  # under the models folder: base models' answers, kept for the next run


def training_callbacks(config: RunConfig, sink, sources, tokenizer, resumed_from, trainable, total):
    """Progress into the database, AdaLoRA's rank updates, and the scored answers at every checkpoint."""
    from transformers import TrainerCallback

    from worker.callbacks import AdaLoraCallback, ProgressCallback
    from worker.evaluate import EvaluationCallback, questions
    from worker.evaluate import scored as answers_scored
    from worker.judge import Judge

    progress = ProgressCallback(sink, resumed_from=resumed_from, trainable=trainable, total=total)
    callbacks: list[TrainerCallback] = [progress]
    if peft_method(config.method).reallocates_ranks:
        callbacks.append(AdaLoraCallback())
    # after ProgressCallback, which marks each checkpoint complete before it is evaluated
    scored = questions(config, sources, tokenizer)
    judge = None
    if config.evaluation.judge is not None and answers_scored(config, world_size()) and any(scored.values()):
        judge = Judge(config.evaluation.judge, Settings(), sink)
    callbacks.append(
        EvaluationCallback(
            config,
            sink,
            scored,
            resumed=resumed_from is not None,
            progress=progress,
            judge=judge,
            answers_dir=Settings().models_dir / BASE_ANSWERS,
        )
    )
    return callbacks


def load_tokenizer(model_path: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_trainer(config: RunConfig, sink, attempt: int | None):
    from transformers import PrinterCallback

    from worker.data import (
        ExampleDataset,
        encode_rows,
        held_out_rows,
        packing_collator,
        pad_collator,
        split_rows,
        training_rows,
    )
    from worker.trainer import TuneboardTrainer

    threads = os.environ.get("TUNEBOARD_TORCH_THREADS")
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    training = config.training
    model_path = Path(config.model_path)
    if not (model_path / "config.json").is_file():
        raise UserError(f"The base model '{config.base_model}' is not available at {model_path}.")
    folder = run_folder(config)
    folder.checkpoints_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(model_path)
    sources = split_rows(config)
    if config.objective in PREFERENCE_OBJECTIVES:
        from worker.preference import build_preference_trainer

        return build_preference_trainer(config, sink, tokenizer, sources)

    train_split = encode_rows(
        training_rows(config, sources), tokenizer, config.prompt_format, training.max_length
    )
    eval_split = encode_rows(
        held_out_rows(config, sources), tokenizer, config.prompt_format, training.max_length
    )
    if not train_split.examples:
        raise UserError(
            f"No training row has any answer token left within max_length={training.max_length}; "
            "raise max_length."
        )
    if train_split.dropped:
        log.warning(
            "%d rows had no answer left after truncation to %d tokens",
            train_split.dropped,
            training.max_length,
        )

    sink.phase("Loading the base model")
    model, dtype, trainable, total = prepared_model(config, train_split.lengths)
    sink.phase(None)
    has_eval = bool(eval_split.examples)
    packing = training.packing and not peft_method(config.method).prompt_learning
    resume = resume_point(folder)
    trainer = TuneboardTrainer(
        lengths=train_split.lengths,
        batch_tokens=training.batch_tokens,
        # Virtual tokens shift the positions of prompt-learning methods, and AdaLoRA adds its orthogonality
        # penalty inside the model's own loss: those keep the model's loss (the registry says which).
        answer_logits_only=peft_method(config.method).answer_logits_only,
        model=model,
        args=training_arguments(config, dtype, has_eval),
        train_dataset=ExampleDataset(train_split.examples),
        eval_dataset=ExampleDataset(eval_split.examples) if has_eval else None,
        data_collator=packing_collator() if packing else pad_collator(tokenizer),
        processing_class=tokenizer,
        callbacks=training_callbacks(config, sink, sources, tokenizer, resume[1], trainable, total),
    )
    trainer.remove_callback(PrinterCallback)  # ProgressCallback logs each point once, in our format
    return trainer, tokenizer, resume[0]


def resume_point(folder: RunFolder) -> tuple[str | None, int | None]:
    """The newest complete checkpoint; half-written ones (no marker) are removed first."""
    for checkpoint in folder.checkpoints():
        if not checkpoint.complete:
            log.warning("removing incomplete checkpoint %s", checkpoint.path.name)
            shutil.rmtree(checkpoint.path, ignore_errors=True)
    complete = folder.complete_checkpoints()
    if not complete:
        return None, None
    latest = complete[-1]
    log.info("resuming from %s", latest.path.name)
    return str(latest.path), latest.step


def train(config: RunConfig, sink, attempt: int | None = None) -> Path:
    """Train and save the adapter; returns its folder."""
    trainer, tokenizer, resume_from = build_trainer(config, sink, attempt)
    if trainer.is_world_process_zero() and trainer.args.world_size > 1:
        kind = trainer.accelerator.distributed_type.value  # MULTI_GPU, MULTI_CPU (gloo) or FSDP
        log.info("training with %d processes (%s)", trainer.args.world_size, kind)
    trainer.train(resume_from_checkpoint=resume_from)
    sink.phase("Saving the adapter")
    adapter = run_folder(config).adapter
    staging = adapter.with_name(".adapter.partial")
    shutil.rmtree(staging, ignore_errors=True)
    # under FSDP every process holds a shard: all of them take part in gathering the whole weights
    whole = trainer.accelerator.get_state_dict(trainer.model) if trainer.is_fsdp_enabled else None
    if trainer.is_world_process_zero():
        best = trainer.state.best_model_checkpoint  # named by worker.evaluate, kept by rotation
        step = trainer.state.global_step
        from_best = config.evaluation.final_adapter == "best" and best is not None and Path(best).is_dir()
        if from_best:
            staging.mkdir(parents=True)
            RunFolder.copy_adapter(Path(best), staging)
            step = int(Path(best).name.removeprefix(CHECKPOINT_PREFIX))
            log.info("the final adapter is the best-scored checkpoint, step %d", step)
        else:
            # only the trained adapter: a preference run's model also holds its frozen reference ("ref")
            trainer.model.save_pretrained(staging, state_dict=whole, selected_adapters=["default"])
        tokenizer.save_pretrained(staging)
        RunFolder.write_adapter_source(staging, step, "best" if from_best else "last")
        shutil.rmtree(adapter, ignore_errors=True)
        os.replace(staging, adapter)
        log.info("adapter saved to %s", adapter)
    # the whole run's, its evaluations and the save included (what New run's estimate is measured against)
    log.info("peak resident memory %.0f MiB", peak_memory_mb())
    return adapter


def explain(exc: BaseException) -> str:
    """One sentence for the user about why training failed."""
    import torch

    if isinstance(exc, UserError):
        return str(exc)
    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return (
            "Out of memory while training. Lower per_device_train_batch_size or max_length, "
            "or turn on gradient_checkpointing."
        )
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return "The disk is full: free space in the data directory, where checkpoints and the adapter go."
    if isinstance(exc, ValueError):
        return f"Training could not start with these settings: {exc}"
    return f"Training failed: {type(exc).__name__}: {exc}"


def quiet_libraries() -> None:
    """The log is for the user: no progress bars, no deprecation notices about library internals."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # TRL's dataset preparation
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*pin_memory.*")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tuneboard train", description="Run one fine-tuning from its run.yaml."
    )
    parser.add_argument("config", type=Path, help="a run.yaml (saved in every run folder)")
    parser.add_argument("--attempt", type=int, help="set by the worker: report to the run's database rows")
    parser.add_argument("--stale-after", type=float, default=30.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", force=True
    )
    quiet_libraries()
    log.info("training process %d", os.getpid())

    from worker.callbacks import ORPHANED_EXIT, Orphaned
    from worker.sink import DatabaseSink, Sink

    config = read_config(args.config)
    folder = run_folder(config)
    folder.error.unlink(missing_ok=True)
    sink = (
        DatabaseSink(config.database_url, config.run_id, args.attempt, args.stale_after)
        if args.attempt is not None and config.run_id is not None and config.database_url
        else Sink()
    )
    try:
        train(config, sink, args.attempt)
    except Orphaned as exc:
        log.warning("stopping: %s", exc.reason)
        return ORPHANED_EXIT
    except Exception as exc:
        message = explain(exc)
        log.exception("training failed: %s", message)
        if os.environ.get("RANK", "0") == "0":
            folder.error.write_text(message, encoding="utf-8")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
