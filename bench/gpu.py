"""`python -m bench.gpu --tokenizer DIR`: Tuneboard's training and generation paths on a CUDA GPU, with a
random-weight model of a real model's shape (no download: the weights are made from the config, the
tokenizer is any local one, e.g. the bundled model's folder).

Training: Tuneboard's own trainer (worker.train.build_trainer), default LoRA (r16, all linear layers),
bf16, on synthetic Alpaca rows; useful FLOP/s = 4 × parameters × real tokens/s against a bf16 matmul timed
in the same process. Generation: the playground engine, base + LoRA adapters in one mixed batch.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def allocated() -> int:
    return torch.cuda.memory_allocated() if DEVICE == "cuda" else 0


SHAPES = {  # the published configs' body sizes ("tiny" only checks this script on a CPU)
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2},
    "qwen2.5-0.5b": {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                     "num_attention_heads": 14, "num_key_value_heads": 2},
    "qwen2.5-1.5b": {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                     "num_attention_heads": 12, "num_key_value_heads": 2},
    "qwen2.5-7b": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                   "num_attention_heads": 28, "num_key_value_heads": 4},
}  # fmt: skip


def cuda_matmul_peak(size: int = 8192, runs: int = 20) -> float:
    a = torch.randn(size, size, dtype=torch.bfloat16, device=DEVICE)
    b = torch.randn(size, size, dtype=torch.bfloat16, device=DEVICE)
    for _ in range(3):
        a @ b
    sync()
    start = time.perf_counter()
    for _ in range(runs):
        a @ b
    sync()
    return 2 * size**3 * runs / (time.perf_counter() - start) / 1e9


def build_model(shape: str, tokenizer_dir: Path, folder: Path) -> Path:
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = Qwen2Config(
        vocab_size=len(tokenizer), max_position_embeddings=4096, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **SHAPES[shape],
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    return folder


def training_figures(model_dir: Path, folder: Path, rows: int, batch: int) -> dict:
    from app.runs.config import validate_peft
    from bench.data import alpaca_rows
    from bench.training import _quiet_sink, run_tuneboard, tuneboard_config, write_rows

    rows_file = write_rows(folder, alpaca_rows(rows, seed=1))
    config = tuneboard_config(folder / "run", model_dir, rows_file, rows, [])
    training = config.training.model_copy(update={"per_device_train_batch_size": batch})
    update = {"peft": validate_peft("lora", {}), "training": training, "total_steps": -(-rows // batch)}
    config = config.model_copy(update=update)
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result = run_tuneboard(config, _quiet_sink())
    params = sum(p.numel() for p in result["model"].parameters())
    trainable = sum(p.numel() for p in result["model"].parameters() if p.requires_grad)
    del result["model"]
    peak = torch.cuda.max_memory_allocated() if DEVICE == "cuda" else 0
    return {**result, "params": params, "trainable": trainable, "peak_bytes": peak}


def generation_figures(model_dir: Path, folder: Path, length: int, repeats: int) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from worker.engine import AdapterRef, Engine, PaneRequest, Sampling

    adapters = []
    for seed in range(3):
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device_map=DEVICE)
        config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
        get_peft_model(base, config).save_pretrained(folder / f"adapter-{seed}")
        adapters.append(folder / f"adapter-{seed}")
        del base

    engine = Engine(device=DEVICE, dtype=torch.bfloat16)
    stop = threading.Event()
    question = [{"role": "user", "content": "Give me three tips for sleeping well."}]

    def pane(i):
        ref = AdapterRef(f"run-{i}", adapters[i]) if i is not None else None
        return PaneRequest(model_key="m", model_path=model_dir, adapter=ref, messages=question)

    def answer(panes, sampling):
        return engine.generate(panes, sampling, lambda event: None, stop)

    short = Sampling(max_new_tokens=16)
    answer([pane(None)], short)
    base_bytes = allocated() or engine.loaded_bytes
    answer([pane(None), pane(0), pane(1), pane(2)], short)
    three_bytes = allocated() or engine.loaded_bytes
    fixed = Sampling(max_new_tokens=length, min_new_tokens=length)
    layouts = {"single": [pane(0)], "base only": [pane(None)], "side by side": [pane(None), pane(0)],
               "four panes": [pane(None), pane(0), pane(1), pane(2)]}  # fmt: skip
    times = {name: [] for name in layouts}
    first = {name: [] for name in layouts}
    for _ in range(repeats):
        for name, panes in layouts.items():
            sync()
            started = time.perf_counter()
            results = answer(panes, fixed)
            sync()
            times[name].append(time.perf_counter() - started)
            first[name].append(max(r.first_token_seconds for r in results))
    return {
        "base_bytes": base_bytes,
        "three_bytes": three_bytes,
        "seconds": {k: statistics.median(v) for k, v in times.items()},
        "first_token": {k: statistics.median(v) for k, v in first.items()},
        "length": length,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__)
    parser.add_argument("--tokenizer", type=Path, required=True, help="a folder with a tokenizer")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-1.5b")
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=128, help="tokens per answer in the generation timing")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if DEVICE != "cuda" and args.shape != "tiny":
        parser.error("this benchmark needs a CUDA GPU (on a CPU, --shape tiny only checks that it runs)")

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        started = time.time()
        peak = cuda_matmul_peak() if DEVICE == "cuda" else cuda_matmul_peak(size=512, runs=3)
        model_dir = build_model(args.shape, args.tokenizer, folder / "model")
        name = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU"
        print(
            f"{name} · {args.shape} · bf16 matmul {peak / 1000:.0f} TFLOP/s",
            flush=True,
        )
        train = training_figures(model_dir, folder, args.rows, args.batch)
        speed = train["tokens"] / train["seconds"]
        useful = 4 * train["params"] * speed / 1e9
        print(
            f"training: {train['tokens']} real tokens in {train['seconds']:.1f} s = {speed:.0f} tokens/s, "
            f"{train['params'] / 1e9:.2f}B parameters ({train['trainable'] / 1e6:.1f}M trainable), "
            f"{useful / 1000:.0f} TFLOP/s useful = {useful / peak:.0%} of the matmul peak, "
            f"peak memory {train['peak_bytes'] / 2**30:.1f} GiB, loss {train['loss']:.3f}, {train['dtype']}",
            flush=True,
        )
        shutil.rmtree(folder / "run", ignore_errors=True)
        gen = generation_figures(model_dir, folder, args.length, repeats=5)
        s = gen["seconds"]
        print(
            f"generation: GPU memory base {gen['base_bytes'] / 2**30:.2f} GiB, with three adapters "
            f"{gen['three_bytes'] / 2**30:.2f} GiB = {gen['three_bytes'] / gen['base_bytes']:.3f}x; "
            f"{gen['length']}-token answers: single {s['single']:.2f} s, base {s['base only']:.2f} s, "
            f"side by side {s['side by side']:.2f} s = {s['side by side'] / s['single']:.2f}x, four panes "
            f"{s['four panes']:.2f} s = {s['four panes'] / s['single']:.2f}x; first token (side by side) "
            f"{gen['first_token']['side by side'] * 1000:.0f} ms",
            flush=True,
        )
        print(f"(took {time.time() - started:.0f} s)")
        if args.json:
            train.pop("model", None)
            args.json.write_text(
                json.dumps({"peak_gflops": peak, "training": train, "generation": gen}, default=str)
            )


if __name__ == "__main__":
    main()
