"""`python -m bench` (what `make bench` runs): measure and print Tuneboard's figures on this machine.

The bundled SmolLM2-135M-Instruct is converted once into <data_dir>/models (as the worker does) if needed.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

from app.config import Settings
from app.model_registry import bundled_entry
from app.processes import free_port, stop_process
from worker.prepare import run_conversion


def bundled_model(settings: Settings):
    entry = bundled_entry(settings)
    if not entry.ready:
        print(f"converting the bundled model into {entry.folder} (once) …", flush=True)
        reason = run_conversion(entry.gguf, entry.folder)
        if reason:
            sys.exit(reason)
    return entry.folder


def report_training(result: dict) -> str:
    peak = result["peak_gflops"]
    params = result["params"]
    recipe, ours, packed, overhead = (
        result["recipe"],
        result["tuneboard"],
        result["tuneboard_packed"],
        result["overhead"],
    )

    def speed(r):
        return r["tokens"] / r["seconds"]

    def useful(r, dtype):
        flops = 4 * params * speed(r) / 1e9
        return f"{flops:.0f} GFLOP/s = {flops / peak[dtype]:.0%} of the {dtype} matmul peak"

    dtype = "bfloat16" if "bfloat16" in ours["dtype"] else "float32"

    def row(label: str, r: dict, r_dtype: str) -> str:
        ratio = speed(r) / speed(recipe)
        return (
            f"| {label} | {speed(r):.0f} | {ratio:.1f} | {r['loss']:.3f} | {r['eval_loss']:.3f} "
            f"| {useful(r, r_dtype)} |"
        )

    def joined(values) -> str:
        return ", ".join(f"{v:.0f}" for v in values)

    lengths = result["lengths"]
    lines = [
        f"Training: {result['rows']} rows (token lengths {lengths['min']}–{lengths['max']}, "
        f"median {lengths['median']}), one epoch, LoRA r8/α32 on q_proj,v_proj, batch 4, "
        f"{result['threads']} threads, {params / 1e6:.0f}M parameters",
        f"matmul peak: {peak['float32']:.0f} GFLOP/s float32, {peak['bfloat16']:.0f} GFLOP/s bfloat16",
        "",
        "| path | real tokens/s | × recipe | train loss | held-out loss | useful FLOP/s |",
        "|---|---|---|---|---|---|",
        row("tutorial recipe (pad to 512, gradient checkpointing, fp32)", recipe, "float32"),
        row(f"diagnostic: Tuneboard's loop in-process (length buckets, {dtype} base weights)", ours, dtype),
        row("diagnostic: the same with packing", packed, dtype),
        "",
        "Dashboard overhead (a metrics row every step, cancel checks every 2 s, a heartbeat every 3 s):",
        f"- time in the dashboard's database work: {overhead['direct']:.2%} of the training wall time",
        f"- A/B, logging only vs dashboard, interleaved: bare {joined(overhead['runs']['bare'])} tokens/s, "
        f"dashboard {joined(overhead['runs']['dashboard'])} tokens/s ({overhead['overhead']:+.1%})",
        "",
        "What users get: runs launched through POST /api/runs and trained by the worker (`tuneboard serve`), "
        "one epoch, nothing held out, answer scoring off; the whole run is POST to succeeded (queue, launch, "
        "model load, warm-up, saves):",
        "",
        "| run | steps | steady tokens/s | × recipe | whole run | whole-run tokens/s | peak memory |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, run in result["through_api"].items():
        steady = run["steady_tokens_per_second"] or 0
        lines.append(
            f"| {label} | {run['steps']} | {steady:.0f} | {steady / speed(recipe):.1f} "
            f"| {run['wall_seconds']:.0f} s | {run['whole_run_tokens_per_second']:.0f} "
            f"| {(run['peak_memory_mb'] or 0) / 1024:.1f} GiB |"
        )
    lines += [
        "",
        "The New run estimate of each (POST /api/runs/estimate just before its launch; its speed from the "
        "run before it) against what the run measured: duration from start to end, peak resident memory:",
        "",
        "| run | estimated duration | measured | error | estimated memory | measured peak | error |",
        "|---|---|---|---|---|---|---|",
    ]

    def error(estimated, measured) -> str:
        return f"{estimated / measured - 1:+.0%}" if estimated and measured else "—"

    for label, run in result["through_api"].items():
        seconds, memory = run["estimated_seconds"], run["estimated_memory_mb"]
        lines.append(
            f"| {label} | {f'{seconds:.0f} s' if seconds else 'none'} | {run['run_seconds']:.0f} s "
            f"| {error(seconds, run['run_seconds'])} | {f'{memory / 1024:.2f} GiB' if memory else 'none'} "
            f"| {(run['peak_memory_mb'] or 0) / 1024:.2f} GiB | {error(memory, run['peak_memory_mb'])} |"
        )
    return "\n".join(lines)


def report_defaults(result: dict) -> str:
    variants = list(result["variants"].items())
    base = statistics.median(variants[0][1]["speeds"])
    lines = [
        f"The default LoRA's choices: {result['rows']} rows, one epoch, lr 2e-4 constant, "
        f"{result['threads']} threads, in-process, interleaved",
        "",
        "| LoRA | real tokens/s (each round) | × defaults | held-out loss |",
        "|---|---|---|---|",
    ]
    for label, entry in variants:
        speed = statistics.median(entry["speeds"])
        rounds = ", ".join(f"{v:.0f}" for v in entry["speeds"])
        lines.append(f"| {label} | {speed:.0f} ({rounds}) | {speed / base:.2f} | {entry['eval_loss']:.3f} |")
    return "\n".join(lines)


def stream_benchmark(model_dir, threads: int) -> dict:
    import json
    import tempfile
    from pathlib import Path

    import torch

    from app.migrate import upgrade
    from bench import streams
    from bench.data import alpaca_rows
    from bench.training import _quiet_sink, run_tuneboard, tuneboard_config, write_rows

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        settings = Settings(data_dir=folder / "data")
        upgrade(settings)
        port = free_port()
        server = streams.serve_web(settings.data_dir, port)
        base = f"http://127.0.0.1:{port}"
        try:
            run_id = streams.running_run(settings)
            latency = streams.page_latency(base, settings, run_id)
            print(f"  … latency p95 {latency['p95_ms']:.0f} ms", flush=True)
            rows_file = write_rows(folder, alpaca_rows(32, seed=2))
            runs = iter(range(100))

            def train() -> float:
                config = tuneboard_config(folder / f"t{next(runs)}", model_dir, rows_file, 32, [])
                result = run_tuneboard(config, _quiet_sink())
                return result["tokens"] / result["seconds"]

            train()  # warm-up
            load = streams.streams_during_training(base, server, streams.running_run(settings), train)
        finally:
            stop_process(server, 30)
    return {"latency": latency, "load": json.loads(json.dumps(load))}


def report_streams(result: dict) -> str:
    latency, load = result["latency"], result["load"]

    def joined(values) -> str:
        return ", ".join(f"{v:.0f}" for v in values)

    return "\n".join([
        f"Live stream: {latency['received']}/{latency['rows']} metric rows reached a Chromium page; "
        f"commit → page latency p50 {latency['p50_ms']:.0f} ms, p95 {latency['p95_ms']:.0f} ms, "
        f"max {latency['max_ms']:.0f} ms",
        f"{load['count']} open event streams during training: alone {joined(load['alone'])} tokens/s, "
        f"with streams {joined(load['streams'])} tokens/s ({load['slowdown']:+.1%}); the web server used "
        f"{load['server_cpu']:.1%} of one core while serving them",
    ])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--rows", type=int, default=64, help="training rows per path (default 64)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--json", help="also write the raw figures to this file")
    parser.add_argument(
        "--peft",
        type=json.loads,
        help="learning and leaflets only: LoRA parameters to change from the defaults, as JSON",
    )
    parser.add_argument(
        "--training",
        type=json.loads,
        help='learning and leaflets only: training settings to set, as JSON (\'{"quantization": "4bit"}\')',
    )
    parser.add_argument(
        "--only",
        choices=[
            "training",
            "defaults",
            "streams",
            "generation",
            "reliability",
            "evaluation",
            "learning",
            "leaflets",
            "memory",
            "fleet",
            "export",
            "startup",
        ],
        help="run one part only",
    )
    args = parser.parse_args()

    from bench.training import training_benchmark

    settings = Settings()
    settings.ensure_dirs()
    model_dir = bundled_model(settings)
    started = time.time()
    print(
        f"{time.strftime('%Y-%m-%d %H:%M')} · {platform.processor() or platform.machine()} · python -m bench "
        f"--rows {args.rows} --threads {args.threads}",
        flush=True,
    )
    result = {}
    if args.only in (None, "training"):
        result["training"] = training_benchmark(model_dir, args.rows, args.threads)
        print(report_training(result["training"]))
    if args.only in (None, "defaults"):
        from bench.training import defaults_trade

        result["defaults"] = defaults_trade(model_dir, args.rows, args.threads)
        print(report_defaults(result["defaults"]))
    if args.only in (None, "streams"):
        result["streams"] = stream_benchmark(model_dir, args.threads)
        print(report_streams(result["streams"]))
    if args.only in (None, "generation"):
        from bench.generation import generation_benchmark, report_generation

        result["generation"] = generation_benchmark(model_dir, args.threads)
        print(report_generation(result["generation"]))
    if args.only in (None, "reliability"):
        from bench.reliability import reliability_benchmark, report_reliability

        result["reliability"] = reliability_benchmark(model_dir)
        print(report_reliability(result["reliability"]))
    if args.only in (None, "evaluation"):
        from bench.evaluation import evaluation_benchmark, report_evaluation

        result["evaluation"] = evaluation_benchmark(model_dir, args.threads)
        print(report_evaluation(result["evaluation"]))
    if args.only in (None, "learning"):
        from bench.learning import learning_benchmark, report_learning

        result["learning"] = learning_benchmark(
            model_dir, args.threads, training=args.training, peft=args.peft
        )
        print(report_learning(result["learning"]))
    if args.only in (None, "leaflets"):
        from bench.learning import LEAFLETS, SERVICE_NOTES, learning_benchmark, report_learning

        # with every default: a small set's training rows are all scored, so recall is over the whole set;
        # each set on a fresh server, so New run's duration comes from the worker's speed trial
        result["leaflets"] = []
        for dataset in (LEAFLETS, SERVICE_NOTES):
            result["leaflets"].append(
                learning_benchmark(model_dir, args.threads, dataset, training=args.training, peft=args.peft)
            )
            print(report_learning(result["leaflets"][-1]), flush=True)
    if args.only in (None, "memory"):
        from bench.memory import memory_benchmark, report_memory

        result["memory"] = memory_benchmark(model_dir, args.threads)
        print(report_memory(result["memory"]))
    if args.only in (None, "fleet"):
        from bench.fleet import fleet_benchmark, report_fleet

        result["fleet"] = fleet_benchmark()
        print(report_fleet(result["fleet"]))
    if args.only in (None, "export"):
        from bench.export import export_benchmark, report_export

        result["export"] = export_benchmark(model_dir, args.threads)
        print(report_export(result["export"]))
    if args.only in (None, "startup"):
        from bench.startup import report_startup, startup_benchmark

        result["startup"] = startup_benchmark(model_dir, args.threads)
        print(report_startup(result["startup"]))
    print(f"\n(benchmark took {time.time() - started:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=str)


if __name__ == "__main__":
    main()
