"""Does an exported model still know what the run taught it? A default run of the bundled model on the demo
catalogue through `tuneboard serve`, exported in every format by the worker (time, size against the
estimate shown before starting), then each of the demo's 40 questions asked greedily of: the base model,
the run (transformers + PEFT), the Q8_0 GGUF read back by transformers, and the Q8_0 GGUF in llama.cpp.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx

from app.scoring import score
from bench.api import serving, wait_for
from bench.learning import DEMO

FORMATS = ("gguf-q8_0", "gguf-f16", "merged", "lora-gguf")
MAX_NEW_TOKENS = 48


def export_benchmark(model_dir: Path, threads: int) -> dict:
    with serving(model_dir, threads) as (base, data):
        files = {"file": (DEMO.name, DEMO.read_bytes())}
        dataset_id = httpx.post(f"{base}/api/datasets", files=files).json()["id"]
        run = httpx.post(f"{base}/api/runs", json={"dataset_id": dataset_id}).json()
        started = time.time()
        status = wait_for(base, run["id"])
        trained = time.time() - started
        if status["status"] != "succeeded":
            raise SystemExit(f"the demo run did not succeed: {status['error']}")
        exports = {}
        for format in FORMATS:
            url = f"{base}/api/runs/{run['id']}/exports"
            estimate = httpx.get(f"{url}/estimate", params={"format": format}).json()["estimated_bytes"]
            began = time.time()
            export = httpx.post(url, json={"format": format}).json()
            while export["status"] in ("queued", "running"):
                time.sleep(0.25)
                export = httpx.get(f"{base}/api/exports/{export['id']}").json()
            if export["status"] != "succeeded":
                raise SystemExit(f"the {format} export failed: {export['error']}")
            exports[format] = {
                "seconds": time.time() - began,
                "estimated_bytes": estimate,
                "size_bytes": export["size_bytes"],
            }
        folder = data / "runs" / str(run["id"])
        q8 = next((folder / "exports" / "gguf-q8_0-final").glob("*.gguf"))
        answers = ask_everyone(model_dir, folder / "adapter", q8, threads)
        held_out = set(run["config"]["validation_rows"])
    return {
        "run_seconds": trained,
        "steps": run["config"]["total_steps"],
        "exports": exports,
        "answers": answers,
        "held_out": sorted(held_out),
    }


def ask_everyone(model_dir: Path, adapter: Path, q8: Path, threads: int) -> dict[str, list[dict]]:
    """Each demo question, greedily, of each model: the answer and its scores against the reference."""
    import torch
    from llama_cpp import Llama
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    rows = json.loads(DEMO.read_text(encoding="utf-8"))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": row["instruction"]}], add_generation_prompt=True, tokenize=True
        )
        for row in rows
    ]
    prompts = [p["input_ids"] if isinstance(p, dict) or hasattr(p, "keys") else p for p in prompts]

    def transformers_answers(model) -> list[str]:
        out = []
        with torch.no_grad():
            for ids in prompts:
                tensor = torch.tensor([ids])
                new = model.generate(tensor, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)[0, len(ids) :]
                out.append(tokenizer.decode(new, skip_special_tokens=True))
        return out

    def llama_cpp_answers() -> list[str]:
        llm = Llama(model_path=str(q8), n_ctx=512, n_threads=threads, verbose=False)
        out = []
        try:
            for ids in prompts:
                new = []
                for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
                    if token == llm.token_eos() or len(new) == MAX_NEW_TOKENS:
                        break
                    new.append(token)
                out.append(tokenizer.decode(new, skip_special_tokens=True))
        finally:
            llm.close()
        return out

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    results = {"base model": transformers_answers(base)}
    results["the run (transformers + PEFT)"] = transformers_answers(
        PeftModel.from_pretrained(base, adapter).eval()
    )
    from_gguf = AutoModelForCausalLM.from_pretrained(q8.parent, gguf_file=q8.name, dtype=torch.float32).eval()
    results["Q8_0 GGUF in transformers"] = transformers_answers(from_gguf)
    results["Q8_0 GGUF in llama.cpp"] = llama_cpp_answers()
    return {
        label: [
            {"answer": a, **score(a.strip(), row["output"])} for a, row in zip(answers, rows, strict=True)
        ]
        for label, answers in results.items()
    }


def report_export(result: dict) -> str:
    held_out = set(result["held_out"])
    lines = [
        f"Export: the demo catalogue's default run ({result['steps']} steps, {result['run_seconds']:.0f} s), "
        "exported by the worker, then its 40 questions asked greedily of each model:",
        "",
        "| format | export time | estimated before | file | estimate error |",
        "|---|---|---|---|---|",
    ]
    for format, entry in result["exports"].items():
        size, estimate = entry["size_bytes"], entry["estimated_bytes"]
        lines.append(
            f"| {format} | {entry['seconds']:.1f} s | {estimate / 1e6:.1f} MB | {size / 1e6:.1f} MB "
            f"| {estimate / size - 1:+.1%} |"
        )
    lines += [
        "",
        f"| model | training rows word for word (of {40 - len(held_out)}) | training-row chrF "
        f"| held-out chrF ({len(held_out)} rows) | same answer as the run |",
        "|---|---|---|---|---|",
    ]
    run_answers = [a["answer"] for a in result["answers"]["the run (transformers + PEFT)"]]
    for label, answers in result["answers"].items():
        train = [a for i, a in enumerate(answers) if i not in held_out]
        held = [a for i, a in enumerate(answers) if i in held_out]
        exact = sum(a["exact"] == 100.0 for a in train)
        same = sum(a["answer"] == r for a, r in zip(answers, run_answers, strict=True))
        lines.append(
            f"| {label} | {exact} | {sum(a['chrf'] for a in train) / len(train):.1f} "
            f"| {sum(a['chrf'] for a in held) / max(1, len(held)):.1f} | {same}/40 |"
        )
    return "\n".join(lines)
