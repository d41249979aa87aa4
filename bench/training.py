"""Training throughput: the tutorial's recipe against Tuneboard's path, same model, data and machine."""

from __future__ import annotations

import json
import math
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from app.datasets.formats import parse_dataset
from app.runs.config import EvaluationParams, ResolvedTraining, RunConfig, validate_peft
from bench.data import alpaca_rows

RECIPE_LORA = {"r": 8, "lora_alpha": 32, "lora_dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}


def matmul_peak(dtype: torch.dtype, size: int = 2048, seconds: float = 3.0) -> float:
    """Achievable GFLOP/s of one square matmul in this process (the ceiling for useful training work)."""
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    for _ in range(3):
        a @ b
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        runs += 1
    return 2 * size**3 * runs / (time.perf_counter() - start) / 1e9


def write_rows(folder: Path, rows: list[dict]) -> Path:
    parsed = parse_dataset(json.dumps(rows).encode())
    path = folder / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in parsed.rows), encoding="utf-8")
    return path


def tuneboard_config(
    folder: Path,
    model_dir: Path,
    rows_file: Path,
    train_rows: int,
    eval_rows: list[int],
    peft: dict | None = None,
    **training,
):
    params = ResolvedTraining(
        num_train_epochs=1,
        learning_rate=2e-4,
        per_device_train_batch_size=4,
        logging_steps=1,
        save_steps=10_000,
        eval_steps=10_000,
        max_length=512,
        warmup_ratio=0.0,
        lr_scheduler_type="constant",
        **training,
    )
    return RunConfig(
        name="bench",
        dataset_id=0,
        dataset_path=str(rows_file),
        base_model="smollm2",
        model_path=str(model_dir),
        method="lora",
        prompt_format="chat",
        peft=validate_peft("lora", RECIPE_LORA if peft is None else peft),
        training=params,
        train_rows=train_rows,
        validation_rows=eval_rows,
        # the training loop alone: no answers scored at the start or at checkpoints
        evaluation=EvaluationParams(scored_held_out_rows=0, scored_train_rows=0),
        total_steps=-(-train_rows // 4),
        output_dir=str(folder),
    )


def run_tuneboard(config: RunConfig, sink) -> dict:
    from worker.train import build_trainer

    trainer, _, _ = build_trainer(config, sink, None)
    tokens = sum(len(e["input_ids"]) for e in trainer.train_dataset.examples)
    output = trainer.train()
    return {
        "tokens": tokens,
        "seconds": output.metrics["train_runtime"],
        "model": trainer.model,
        "loss": output.training_loss,
        "dtype": str(trainer.model.dtype),
    }


def run_recipe(model_dir: Path, rows: list[dict], tokenizer, folder: Path) -> dict:
    """The tutorial's compute path: every example padded to 512 tokens, gradient checkpointing, fp32, HF
    Trainer with random batches. (Its label bug is not reproduced: one sequence, answer-only labels.)"""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM, PrinterCallback, Trainer, TrainingArguments

    from worker.data import ExampleDataset, encode_row

    examples = [encode_row(r, tokenizer, "chat", 512) for r in rows]
    real = sum(len(e["input_ids"]) for e in examples)
    padded = []
    for e in examples:
        pad = 512 - len(e["input_ids"])
        padded.append(
            {
                "input_ids": e["input_ids"] + [tokenizer.pad_token_id] * pad,
                "attention_mask": [1] * len(e["input_ids"]) + [0] * pad,
                "labels": e["labels"] + [-100] * pad,
            }
        )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.activation_checkpointing_enable()  # the tutorial's gradient_checkpointing_enable(), renamed
    model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(task_type=TaskType.CAUSAL_LM, **RECIPE_LORA))
    args = TrainingArguments(
        output_dir=str(folder / "recipe"),
        num_train_epochs=1,
        per_device_train_batch_size=4,
        learning_rate=2e-4,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_pin_memory=False,
        seed=42,
    )

    def collate(batch):
        return {k: torch.tensor([b[k] for b in batch]) for k in batch[0]}

    trainer = Trainer(model=model, args=args, train_dataset=ExampleDataset(padded), data_collator=collate)
    trainer.remove_callback(PrinterCallback)
    output = trainer.train()
    return {
        "tokens": real,
        "seconds": output.metrics["train_runtime"],
        "model": model,
        "loss": output.training_loss,
        "padded_tokens": 512 * len(padded),
    }


def eval_loss(model, tokenizer, rows: list[dict]) -> float:
    """Mean answer-token loss in fp32 on held-out rows, the same way for every trained adapter."""
    from worker.data import encode_row, pad_collator

    model = model.float().eval()
    collate = pad_collator(tokenizer)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows), 4):
            batch = collate([encode_row(r, tokenizer, "chat", 512) for r in rows[i : i + 4]])
            tokens = int((batch["labels"][:, 1:] != -100).sum())
            total += float(model(**batch).loss) * tokens
            count += tokens
    return total / count


class HeartbeatThread(threading.Thread):
    """What the worker does beside a run: a heartbeat row update every few seconds."""

    def __init__(self, db, run_id: int, every: float):
        super().__init__(daemon=True)
        self.db, self.run_id, self.every, self.stopped = db, run_id, every, threading.Event()
        self.busy = 0.0

    def run(self):
        from app.runs import state

        while not self.stopped.wait(self.every):
            started = time.perf_counter()
            with self.db.write_session() as session:
                state.heartbeat(session=session, run_id=self.run_id, worker_id="bench")
            self.busy += time.perf_counter() - started


def timed_sink(sink):
    """Wraps a sink's calls to add up the seconds the training loop spends in them."""

    class Timed(type(sink)):
        busy = 0.0

        def _time(self, method, *args, **kwargs):
            started = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                Timed.busy += time.perf_counter() - started

        def start(self, **kwargs):
            return self._time(super().start, **kwargs)

        def metric(self, values):
            return self._time(super().metric, values)

        def check(self):
            return self._time(super().check)

    sink.__class__ = Timed
    return sink


def dashboard_overhead(
    model_dir: Path, rows_file: Path, train_rows: int, folder: Path, repeats: int = 2
) -> dict:
    """The same training, bare (log only) and with the dashboard's database writes, interleaved."""
    from app.config import Settings
    from app.db import Database
    from app.migrate import upgrade
    from app.runs import state
    from bench.data import add_bench_dataset
    from worker.sink import DatabaseSink, Sink

    settings = Settings(data_dir=folder / "data")
    upgrade(settings)
    db = Database(settings.sqlalchemy_url)
    with db.write_session() as session:
        add_bench_dataset(session, train_rows)

    def running_run():
        with db.write_session() as session:
            state.enqueue(
                session=session, name="bench", dataset_id=1, base_model="smollm2", method="lora", config={}
            )
        with db.write_session() as session:
            return state.claim_next(session=session, worker_id="bench")

    speeds: dict[str, list[float]] = {"bare": [], "dashboard": []}
    direct: list[float] = []
    for attempt in range(repeats):
        for kind in ("bare", "dashboard"):
            out = folder / f"overhead-{kind}-{attempt}"
            config = tuneboard_config(out, model_dir, rows_file, train_rows, [])
            heartbeat = None
            if kind == "dashboard":
                run = running_run()
                sink = timed_sink(DatabaseSink(settings.sqlalchemy_url, run.id, attempt=1, stale_after=3600))
                heartbeat = HeartbeatThread(db, run.id, every=3.0)
                heartbeat.start()
            else:
                sink = Sink()
            result = run_tuneboard(config, sink)
            if heartbeat:
                heartbeat.stopped.set()
                heartbeat.join()
                direct.append((type(sink).busy + heartbeat.busy) / result["seconds"])
            speeds[kind].append(result["tokens"] / result["seconds"])
            progress(f"overhead run {attempt + 1} {kind}: {speeds[kind][-1]:.0f} tokens/s")
    db.dispose()
    bare, dash = statistics.mean(speeds["bare"]), statistics.mean(speeds["dashboard"])
    return {
        "bare": bare,
        "dashboard": dash,
        "overhead": (bare - dash) / bare,
        "runs": speeds,
        "direct": statistics.mean(direct),
    }


def training_benchmark(model_dir: Path, rows: int, threads: int) -> dict:
    from transformers import AutoTokenizer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    data = alpaca_rows(rows + 16, seed=1)
    train, held_out = data[:rows], data[rows:]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rows_file = write_rows(folder, train)
        held_out_rows = parse_dataset(json.dumps(held_out).encode()).rows
        train_rows = parse_dataset(json.dumps(train).encode()).rows
        peak32, peak16 = matmul_peak(torch.float32), matmul_peak(torch.bfloat16)

        progress(f"matmul peak: {peak32:.0f} GFLOP/s float32, {peak16:.0f} GFLOP/s bfloat16")
        # Warm-up (allocator, kernels, file cache) so that the first measured path is not penalised.
        run_tuneboard(
            tuneboard_config(folder / "warmup", model_dir, rows_file, rows, [], max_steps=3), _quiet_sink()
        )
        recipe = run_recipe(model_dir, train_rows, tokenizer, folder)
        recipe["eval_loss"] = eval_loss(recipe.pop("model"), tokenizer, held_out_rows)
        progress(f"recipe: {recipe['tokens'] / recipe['seconds']:.0f} real tokens/s")
        ours = run_tuneboard(tuneboard_config(folder / "tb", model_dir, rows_file, rows, []), _quiet_sink())
        ours["eval_loss"] = eval_loss(ours.pop("model"), tokenizer, held_out_rows)
        progress(f"tuneboard: {ours['tokens'] / ours['seconds']:.0f} real tokens/s")
        packed = run_tuneboard(
            tuneboard_config(folder / "tb-packed", model_dir, rows_file, rows, [], packing=True),
            _quiet_sink(),
        )
        packed["eval_loss"] = eval_loss(packed.pop("model"), tokenizer, held_out_rows)
        progress(f"tuneboard packed: {packed['tokens'] / packed['seconds']:.0f} real tokens/s")
        overhead = dashboard_overhead(model_dir, rows_file, rows, folder)
    from bench.api import training_through_the_api
    from bench.learning import LEAFLETS
    from bench.memory import build_large

    with tempfile.TemporaryDirectory() as tmp:
        large = build_large(model_dir, Path(tmp) / "large")
        through_api = training_through_the_api(model_dir, threads, train, LEAFLETS.read_bytes(), large)
    for label, run in through_api.items():
        progress(f"through the API, {label}: {run['steady_tokens_per_second'] or 0:.0f} tokens/s steady")

    params = _parameter_count(model_dir)
    lengths = sorted(
        len(tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=False))
        for r in train_rows
    )
    return {
        "rows": rows,
        "through_api": through_api,
        "threads": threads,
        "params": params,
        "lengths": {"min": lengths[0], "median": lengths[len(lengths) // 2], "max": lengths[-1]},
        "peak_gflops": {"float32": peak32, "bfloat16": peak16},
        "recipe": recipe,
        "tuneboard": ours,
        "tuneboard_packed": packed,
        "overhead": overhead,
    }


def _parameter_count(model_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    for file in model_dir.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not iterable
                total += math.prod(f.get_slice(key).get_shape())
    return total


def progress(message: str) -> None:
    print(f"  … {message}", flush=True)


def _quiet_sink():
    from worker.sink import Sink

    class Quiet(Sink):
        def metric(self, values):
            pass

    return Quiet()


DEFAULTS_TRADE = {  # label: LoRA parameters; the first is Tuneboard's default (app.runs.config.LoraParams)
    "defaults: r16/α32 on all linear layers, dropout {dropout:g}": {},
    "dropout 0.05 (the previous default)": {"lora_dropout": 0.05},
    "rank 8 (α16)": {"r": 8, "lora_alpha": 16},
    "q_proj, v_proj only": {"target_modules": ["q_proj", "v_proj"]},
}


def defaults_trade(model_dir: Path, rows: int, threads: int, rounds: int = 2) -> dict:
    """What each choice in the default LoRA costs and buys: real tokens/s and held-out loss after one epoch
    of the in-process loop (lr 2e-4 constant), each variant against the defaults, interleaved."""
    from transformers import AutoTokenizer

    torch.set_num_threads(threads)
    data = alpaca_rows(rows + 16, seed=1)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    held_out = parse_dataset(json.dumps(data[rows:]).encode()).rows
    defaults = validate_peft("lora", {})
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rows_file = write_rows(folder, data[:rows])
        run_tuneboard(
            tuneboard_config(folder / "warmup", model_dir, rows_file, rows, [], defaults, max_steps=3),
            _quiet_sink(),
        )
        for round_ in range(rounds):
            for index, (label, change) in enumerate(DEFAULTS_TRADE.items()):
                label = label.format(dropout=defaults["lora_dropout"])
                peft = validate_peft("lora", {**defaults, **change})
                config = tuneboard_config(folder / f"{round_}-{index}", model_dir, rows_file, rows, [], peft)
                run = run_tuneboard(config, _quiet_sink())
                entry = results.setdefault(label, {"speeds": [], "peft": peft})
                entry["speeds"].append(run["tokens"] / run["seconds"])
                if "eval_loss" not in entry:  # seeded: every round trains the same adapter
                    entry["eval_loss"] = eval_loss(run.pop("model"), tokenizer, held_out)
                progress(
                    f"{label}: {entry['speeds'][-1]:.0f} tokens/s, held-out loss {entry['eval_loss']:.3f}"
                )
    return {"rows": rows, "threads": threads, "variants": results}
