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
import tempfile
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
    from bench.generation import make_adapters, measure_engine
    from worker.engine import Engine

    adapters = make_adapters(model_dir, folder, device=DEVICE, dtype=torch.bfloat16)
    engine = Engine(device=DEVICE, dtype=torch.bfloat16)
    return measure_engine(
        engine, model_dir, adapters, length, repeats, lambda: allocated() or engine.loaded_bytes, sync
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__)
    parser.add_argument("--tokenizer", type=Path, required=True, help="a folder with a tokenizer")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-1.5b")
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=128, help="tokens per answer in the generation timing")
    parser.add_argument("--repeats", type=int, default=5, help="timed answers per pane layout")
    parser.add_argument("--only", choices=["training", "generation"], help="run one part only")
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
        figures: dict = {"peak_gflops": peak}
        if args.only in (None, "training"):
            figures["training"] = train = training_figures(model_dir, folder, args.rows, args.batch)
            speed = train["tokens"] / train["seconds"]
            useful = 4 * train["params"] * speed / 1e9
            print(
                f"training: {train['tokens']} real tokens in {train['seconds']:.1f} s = {speed:.0f} tok/s, "
                f"{train['params'] / 1e9:.2f}B parameters ({train['trainable'] / 1e6:.1f}M trainable), "
                f"{useful / 1000:.0f} TFLOP/s useful = {useful / peak:.0%} of the matmul peak, peak memory "
                f"{train['peak_bytes'] / 2**30:.1f} GiB, loss {train['loss']:.3f}, {train['dtype']}",
                flush=True,
            )
            shutil.rmtree(folder / "run", ignore_errors=True)
        if args.only in (None, "generation"):
            figures["generation"] = gen = generation_figures(model_dir, folder, args.length, args.repeats)
            report_generation(gen)
        print(f"(took {time.time() - started:.0f} s)")
        if args.json:
            args.json.write_text(json.dumps(figures, default=str))


def report_generation(gen: dict) -> None:
    s = gen["seconds"]
    print(
        f"generation: GPU memory base {gen['base_usage'] / 2**30:.2f} GiB, with three adapters "
        f"{gen['three_usage'] / 2**30:.2f} GiB = {gen['three_usage'] / gen['base_usage']:.3f}x; "
        f"{gen['length']}-token answers: single {s['single']:.2f} s, base {s['base only']:.2f} s, "
        f"side by side {s['side by side']:.2f} s = {s['side by side'] / s['single']:.2f}x, four panes "
        f"{s['four panes']:.2f} s = {s['four panes'] / s['single']:.2f}x; first token (side by side) "
        f"{gen['first_token']['side by side'] * 1000:.0f} ms",
        flush=True,
    )


if __name__ == "__main__":
    main()
