"""Does a default run learn? A new user's path through `tuneboard serve`: upload a made-up dataset, launch a
run with no training setting changed on the bundled model, wait, and read its scored answers: the base
model's, then each checkpoint's, on held-out and training rows.

Three datasets: the demo catalogue (short facts about an island no model has seen), the leaflets (16
made-up remedies, answers of 640-710 tokens naming the product in the first sentence) and the service notes
(16 made-up appliance repairs, 610-635 tokens naming the part to fit first; written after the defaults were
chosen, never used to tune them). For the long answers the figure that matters is key-fact recall: the share
of training rows whose answer names the right product or part. Each run also compares what New run showed
before launch (duration range, memory) with what the run took: a fresh server has no finished run, so the
duration comes from the worker's speed trial (worker.probe), as a newcomer's first run would.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from pathlib import Path

import httpx

from app.config import PROJECT_ROOT
from bench.api import serving, wait_for

EXAMPLES = PROJECT_ROOT / "data" / "examples"
DEMO = EXAMPLES / "demo_alpaca.json"
LEAFLETS = EXAMPLES / "leaflets.json"
SERVICE_NOTES = EXAMPLES / "service_notes.json"
# a long answer's key fact: what its first sentence names
KEY_FACTS = {
    LEAFLETS.name: re.compile(r"For these symptoms, (.+?) is suitable\."),
    SERVICE_NOTES.name: re.compile(r"For this fault, fit the (.+?) \(part"),
}


def key_fact(dataset: Path, reference: str) -> str | None:
    found = KEY_FACTS[dataset.name].match(reference) if dataset.name in KEY_FACTS else None
    return found.group(1) if found else None


def estimate_before_launch(base: str, request: dict, wait: float = 900) -> dict:
    """New run's estimate for `request`, once it has a duration (the worker's speed trial runs when it
    is first idle: a newcomer waits for it the same way, on the page)."""
    deadline = time.time() + wait
    while True:
        estimate = httpx.post(f"{base}/api/runs/estimate", json=request, timeout=60).json()
        if "seconds" in estimate or time.time() > deadline:
            return estimate
        time.sleep(5)


def peak_memory(data: Path, run_id: int) -> float | None:
    """The training process's peak resident memory (MiB) over the whole run, as it logged it at its end."""
    log = (data / "runs" / str(run_id) / "train.log").read_text(encoding="utf-8", errors="replace")
    found = re.findall(r"peak resident memory (\d+) MiB", log)
    return float(found[-1]) if found else None


def learning_benchmark(
    model_dir: Path,
    threads: int,
    dataset: Path = DEMO,
    evaluation: dict | None = None,
    training: dict | None = None,
    peft: dict | None = None,
) -> dict:
    with serving(model_dir, threads) as (base, data):
        files = {"file": (dataset.name, dataset.read_bytes())}
        dataset_id = httpx.post(f"{base}/api/datasets", files=files).json()["id"]
        request: dict = {"dataset_id": dataset_id}
        if evaluation:
            request["evaluation"] = evaluation
        if training:  # a diagnostic: the benchmark's own figures use the defaults
            request["training"] = training
        if peft:  # likewise: what the defaults trade (docs/benchmarks.md)
            request["peft"] = peft
        waited = time.time()
        estimate = estimate_before_launch(base, request)
        waited = time.time() - waited
        run = httpx.post(f"{base}/api/runs", json=request).json()
        started = time.time()
        status = wait_for(base, run["id"])
        report = httpx.get(f"{base}/api/runs/{run['id']}/evaluation").json()
        return {
            "estimate": {
                k: estimate.get(k) for k in ("seconds", "seconds_range", "memory_bytes", "calibrated_by")
            },
            "waited_for_estimate": waited,
            "peak_memory_mb": peak_memory(data, run["id"]),
            "dataset": dataset.name,
            "recall": key_fact_recall(data, dataset, run["id"]),
            "training": run["config"]["training"],
            "peft": run["config"]["peft"],
            "status": status["status"],
            "error": status["error"],
            "wall_seconds": time.time() - started,
            "total_steps": run["config"]["total_steps"],
            "report": report,
        }


def key_fact_recall(data: Path, dataset: Path, run_id: int) -> list[dict]:
    """Per step and split: how many answered rows name the reference's key fact (long answers only)."""
    if dataset.name not in KEY_FACTS:
        return []
    rows = json.loads(dataset.read_text(encoding="utf-8"))
    with sqlite3.connect(data / "tuneboard.db") as db:
        answers = db.execute(
            "SELECT step, split, row, answer FROM run_answers WHERE run_id = ? ORDER BY step", (run_id,)
        ).fetchall()
    counts: dict[tuple[int, str], list[int]] = {}
    for step, split, row, answer in answers:
        named = key_fact(dataset, rows[row]["output"]) or ""
        entry = counts.setdefault((step, split), [0, 0])
        entry[0] += named.lower() in answer.lower()
        entry[1] += 1
    return [{"step": s, "split": sp, "named": n, "rows": t} for (s, sp), (n, t) in sorted(counts.items())]


def lora(peft: dict) -> str:
    targets = peft["target_modules"]
    on = "all linear layers" if targets == "all-linear" else ", ".join(targets)
    return f"LoRA r{peft['r']} on {on}, dropout {peft['lora_dropout']:g}"


def report_learning(result: dict) -> str:
    report = result["report"]
    training = result["training"]
    recall = {(r["step"], r["split"]): f"{r['named']}/{r['rows']}" for r in result["recall"]}
    evaluated = sum(entry["seconds"] for entry in report["steps"])
    training_alone = max(1.0, result["wall_seconds"] - evaluated)
    lines = [
        f"\nLearning: a default run on {result['dataset']} with the bundled model through `tuneboard serve` "
        f"({lora(result['peft'])}, {result['total_steps']} steps, {training['num_train_epochs']:g} epochs, "
        f"lr {training['learning_rate']:g}, "
        f"batch {training['per_device_train_batch_size']}, max length {training['max_length']}): "
        f"{result['status']} in {result['wall_seconds']:.0f} s (evaluation included), best checkpoint step "
        f"{report['best_step']}",
        "",
        f"Evaluation cost: {evaluated:.0f} s of the run's {result['wall_seconds']:.0f} s went to answering "
        f"and scoring (training waits meanwhile): the run took {evaluated / training_alone:.0%} longer than "
        f"its training alone would have.",
        "",
        "| step | held-out chrF | training-row chrF | training rows exactly right "
        "| training rows like the reference | training rows beginning like it | "
        + ("training rows naming the key fact | " if recall else "")
        + "evaluation seconds |",
        "|---|---|---|---|---|---|" + ("---|" if recall else "") + "---|",
    ]
    for entry in report["steps"]:
        held, train = entry.get("validation"), entry.get("train")
        label = "base model" if entry["step"] == 0 else str(entry["step"])
        named = f"{recall.get((entry['step'], 'train'), '—')} | " if recall else ""
        lines.append(
            f"| {label} | {held['chrf'] if held else '—'} | {train['chrf'] if train else '—'} "
            f"| {train['exact'] if train else '—'}% | {train['matched'] if train else '—'}% "
            f"| {train.get('opened', '—') if train else '—'}% "
            f"| {named}{entry['seconds']} |"
        )
    estimate, wall = result.get("estimate") or {}, result["wall_seconds"]
    if estimate.get("seconds"):
        low, high = estimate["seconds_range"]
        source = (
            f"run {estimate['calibrated_by']}" if estimate["calibrated_by"] else "the worker's speed trial"
        )
        lines += [
            "",
            f"Duration shown on New run before launch (from {source}, after waiting "
            f"{result['waited_for_estimate']:.0f} s for it): {low:.0f}-{high:.0f} s, about "
            f"{estimate['seconds']:.0f} s; the run took {wall:.0f} s ({estimate['seconds'] / wall - 1:+.0%}; "
            f"{'inside' if low <= wall <= high else 'outside'} the range).",
        ]
    if estimate.get("memory_bytes") and result.get("peak_memory_mb"):
        shown, peak = estimate["memory_bytes"] / 2**30, result["peak_memory_mb"] / 1024
        lines.append(
            f"Memory shown before launch: {shown:.2f} GiB; the training process's peak over the whole run "
            f"(evaluations and the last save included): {peak:.2f} GiB ({shown / peak - 1:+.0%})."
        )
    if report.get("advice"):
        lines.append(f"Advice: {report['advice'].get('sentence')}")
    return "\n".join(lines)
