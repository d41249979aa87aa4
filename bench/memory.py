"""The New run estimate against the training process it describes: peak resident memory (and the time a
step takes) of `python -m worker.train` on short, long and mixed rows, for the bundled model and a larger
Llama-shaped one with random weights, with gradient checkpointing off and on.

Each case trains one run folder in its own process, the way the worker launches it, for enough steps that
the C allocator reaches the steady state a whole run lives in (glibc keeps what tensors of changing sizes
freed: a process's peak grows over its first ten to twenty steps, then holds), with answers scored before
the first step and after the last as a run's are, and reads the peak the process logs at its end.
"""

from __future__ import annotations

import random
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from app.config import PROJECT_ROOT, isolated_env
from app.datasets.formats import parse_dataset
from app.runs.batching import padded_tokens
from app.runs.config import EvaluationParams, ResolvedTraining, RunConfig, validate_peft
from app.runs.estimate import training_memory
from app.runs.shapes import Shapes
from bench.data import sentence

LARGE = {  # a Llama-shaped body about 1.7× the bundled model's per token (random weights, no download)
    "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 16,
    "num_attention_heads": 16, "num_key_value_heads": 4, "tie_word_embeddings": True,
}  # fmt: skip
TUTORIAL_TARGETS = ["q_proj", "v_proj"]


@dataclass(frozen=True)
class Case:
    model: str  # bundled | large
    rows: str  # short | long | mixed
    checkpointing: bool
    targets: str | list[str] = "all-linear"
    steps: int = 20


CASES = [
    Case("bundled", "short", False),
    Case("bundled", "long", False),
    Case("bundled", "long", True),
    Case("bundled", "mixed", False),
    Case("bundled", "long", False, TUTORIAL_TARGETS),
    Case("large", "short", False, steps=16),
    Case("large", "long", False, steps=16),
    Case("large", "long", True, steps=16),
    Case("large", "mixed", False, steps=16),
]


def rows_of(kind: str, count: int = 16, seed: int = 0) -> list[dict]:
    """Alpaca rows of about 120 tokens (short), 700-1,000 (long, the leaflets' size) or both (mixed)."""
    rng = random.Random(seed)
    rows = []
    for n in range(count):
        long = kind == "long" or (kind == "mixed" and n % 4 == 0)
        words = rng.randint(680, 960) if long else rng.randint(60, 160)
        rows.append({"instruction": sentence(rng, 12), "input": "", "output": sentence(rng, words)})
    return rows


def build_large(tokenizer_dir: Path, folder: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), **LARGE)).to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def config_for(case: Case, model_dir: Path, rows_file: Path, folder: Path) -> RunConfig:
    training = ResolvedTraining(
        num_train_epochs=1,
        max_steps=case.steps,
        learning_rate=1e-3,
        per_device_train_batch_size=4,
        batch_tokens=1024,
        logging_steps=1,
        save_steps=case.steps,  # one scored evaluation at the end, beside the base model's
        eval_steps=10_000,
        gradient_checkpointing=case.checkpointing,
    )
    return RunConfig(
        name="memory",
        dataset_id=0,
        dataset_path=str(rows_file),
        base_model=case.model,
        model_path=str(model_dir),
        method="lora",
        prompt_format="chat",
        peft=validate_peft("lora", {"target_modules": case.targets}),
        training=training,
        evaluation=EvaluationParams(scored_held_out_rows=0, scored_train_rows=8),
        train_rows=16,
        validation_rows=[],
        total_steps=case.steps,
        output_dir=str(folder),
    )


def measure(case: Case, model_dir: Path, folder: Path, threads: int) -> dict:
    import json

    from transformers import AutoTokenizer

    from worker.data import encode_rows
    from worker.train import write_config

    folder.mkdir(parents=True)
    rows = parse_dataset(json.dumps(rows_of(case.rows)).encode()).rows
    rows_file = folder / "rows.jsonl"
    rows_file.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    config = config_for(case, model_dir, rows_file, folder)
    write_config(config, folder / "run.yaml")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    lengths = encode_rows(rows, tokenizer, "chat", config.training.max_length).lengths
    padded = padded_tokens(lengths, 4, 1024)
    env = isolated_env(folder / "data", TUNEBOARD_TORCH_THREADS=str(threads))
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "worker.train", str(folder / "run.yaml")],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.monotonic() - started
    log = done.stdout + done.stderr
    peak = re.search(r"peak resident memory (\d+) MiB", log)
    if done.returncode or not peak:
        raise RuntimeError(f"training failed for {case}:\n{log[-3000:]}")
    shapes = Shapes.read(model_dir)
    assert shapes is not None
    estimate = training_memory(
        shapes, config, padded, max(lengths), checkpointing=case.checkpointing, weight_bytes=2
    )
    return {
        "case": case.__dict__,
        "padded": padded,
        "tokens": sum(lengths),
        "measured_mb": int(peak.group(1)),
        "estimated_mb": estimate.total / 2**20,
        "parts_mb": {k: v / 2**20 for k, v in estimate.__dict__.items()},
        "wall_seconds": wall,
    }


def memory_benchmark(model_dir: Path, threads: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="tuneboard-memory-") as tmp:
        large = build_large(model_dir, Path(tmp) / "large")
        results = []
        for n, case in enumerate(CASES):
            folder = Path(tmp) / f"case-{n}"
            result = measure(case, model_dir if case.model == "bundled" else large, folder, threads)
            print(f"  … {case.model} {case.rows} rows: {result['measured_mb']} MiB", flush=True)
            results.append(result)
    return {"cases": results}


def report_memory(result: dict) -> str:
    lines = [
        "\nMemory: the New run estimate against the training process's measured peak (batches of up to 4 "
        "rows within 1,024 tokens, LoRA r16, bf16; 20 steps, 16 on the larger model; 8 answers scored "
        "before the first step and after the last)",
        "",
        "| model | rows | LoRA on | gradient checkpointing | largest batch (tokens) | measured peak "
        "| estimate | error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["cases"]:
        case = r["case"]
        targets = "all linear" if case["targets"] == "all-linear" else ", ".join(case["targets"])
        error = r["estimated_mb"] / r["measured_mb"] - 1
        lines.append(
            f"| {case['model']} | {case['rows']} | {targets} | {'on' if case['checkpointing'] else 'off'} "
            f"| {r['padded']} | {r['measured_mb'] / 1024:.2f} GiB | {r['estimated_mb'] / 1024:.2f} GiB "
            f"| {error:+.0%} |"
        )
    worst = max(abs(r["estimated_mb"] / r["measured_mb"] - 1) for r in result["cases"])
    lines.append(f"\nLargest error: {worst:.0%} (target: within 25%)")
    return "\n".join(lines)
