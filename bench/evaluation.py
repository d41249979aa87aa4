"""What scoring answers costs a run: the bundled model with the default LoRA (as the training process holds
it) answers 32 held-out and 8 training rows of the demo dataset, greedy, the way worker.evaluate does at
each checkpoint (an answer at most twice as long as its reference, batches of similar length). Training
waits meanwhile, so these seconds are what each checkpoint (and the base model's evaluation, once) adds to
a run's wall time.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from app.config import PROJECT_ROOT
from app.runs.config import EvaluationParams
from app.scoring import mean, score

DEMO = PROJECT_ROOT / "data" / "examples" / "demo_alpaca.json"


def evaluation_benchmark(model_dir: Path, threads: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from worker.engine import messages_prompt_ids
    from worker.evaluate import answer, answer_budget
    from worker.hardware import choose_dtype

    torch.set_num_threads(threads)
    # 8 training rows, as measured in docs/benchmarks.md (a run's default is now up to 32: the leaflets
    # benchmark measures evaluations at that size)
    params = EvaluationParams(scored_train_rows=8)
    dtype = choose_dtype("auto")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")).eval()
    rows = json.loads(DEMO.read_text(encoding="utf-8"))
    result: dict = {"dtype": str(dtype), "threads": threads, "max_new_tokens": params.max_new_tokens}
    for split, count in (("validation", params.scored_held_out_rows), ("train", params.scored_train_rows)):
        chosen = rows[:count]
        prompts = [
            messages_prompt_ids(tokenizer, [{"role": "user", "content": r["instruction"]}], "chat")
            for r in chosen
        ]
        budgets = [answer_budget(tokenizer, r["output"], params.max_new_tokens) for r in chosen]
        started = time.perf_counter()
        texts = answer(model, tokenizer, prompts, budgets)
        seconds = time.perf_counter() - started
        tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
        scores = mean([score(t, r["output"]) for t, r in zip(texts, chosen, strict=True)])
        result[split] = {"rows": len(chosen), "seconds": seconds, "tokens": tokens, "scores": scores}
    return result


def report_evaluation(result: dict) -> str:
    held, train = result["validation"], result["train"]
    per_checkpoint = held["seconds"] + train["seconds"]
    return "\n".join(
        [
            f"\nEvaluation: the bundled model with a LoRA adapter answers the demo dataset's rows, greedy, "
            f"at most {result['max_new_tokens']} new tokens, batches of 8, {result['threads']} threads, "
            f"{result['dtype']}",
            "",
            "| rows | seconds | answer tokens/s | mean chrF |",
            "|---|---|---|---|",
            *(
                f"| {r['rows']} {name} | {r['seconds']:.1f} | {r['tokens'] / r['seconds']:.0f} "
                f"| {r['scores']['chrf']:.1f} |"
                for name, r in (("held-out", held), ("training", train))
            ),
            "",
            f"Each checkpoint (and the base model once) adds {per_checkpoint:.1f} s to a run's wall time: "
            f"training waits while it answers; a run saving 5 checkpoints pays {6 * per_checkpoint:.0f} s.",
        ]
    )
