"""Playground figures with the bundled model: the memory three loaded adapters add, the cost of a
side-by-side answer against a single one, and the first token as a browser sees it.

The engine figures come from a fresh child process (`python -m bench.generation MODEL ADAPTERS THREADS`),
so that its resident memory holds nothing but the engine; the first-token figures from a real web server
and generation host, over HTTP, the way the playground page asks.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from app.config import PROJECT_ROOT, Settings, isolated_env
from app.processes import free_port, stop_process

QUESTION = [{"role": "user", "content": "Give me three tips for sleeping well."}]
LENGTH = 64  # tokens per answer in the timing comparison
REPEATS = 5


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def make_adapters(
    model_dir: Path, folder: Path, count: int = 3, device: str = "cpu", dtype=None
) -> list[Path]:
    """Adapters shaped like a default run's (LoRA r16/α32, all linear layers), with random weights."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = []
    for seed in range(count):
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=dtype or torch.float32, device_map=device
        )
        config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
        get_peft_model(base, config).save_pretrained(folder / f"adapter-{seed}")
        paths.append(folder / f"adapter-{seed}")
        del base
    return paths


def measure_engine(
    engine, model_dir: Path, adapters: list[Path], length: int, repeats: int, usage, sync=None
):
    """Memory (by `usage()`) with the base model answering, then with three adapters attached and answering;
    then the median time of `length`-token answers for each pane layout, layouts interleaved so that drift
    in the machine's speed hits them alike."""
    from worker.engine import AdapterRef, PaneRequest, Sampling

    stop = threading.Event()
    sync = sync or (lambda: None)

    def pane(i: int | None) -> PaneRequest:
        ref = AdapterRef(f"run-{i}", adapters[i]) if i is not None else None
        return PaneRequest(model_key="bench", model_path=model_dir, adapter=ref, messages=QUESTION)

    def answer(panes: list[PaneRequest], sampling: Sampling) -> list:
        return engine.generate(panes, sampling, lambda event: None, stop)

    short = Sampling(max_new_tokens=32)
    answer([pane(None)], short)
    base_usage, base_weights = usage(), engine.loaded_bytes
    answer([pane(None), pane(0), pane(1), pane(2)], short)
    three_usage, three_weights = usage(), engine.loaded_bytes

    fixed = Sampling(max_new_tokens=length, min_new_tokens=length)
    layouts = {
        "single": [pane(0)],
        "base only": [pane(None)],
        "side by side": [pane(None), pane(0)],
        "four panes": [pane(None), pane(0), pane(1), pane(2)],
    }
    times: dict[str, list[float]] = {name: [] for name in layouts}
    first: dict[str, list[float]] = {name: [] for name in layouts}
    for _ in range(repeats):
        for name, panes in layouts.items():
            sync()
            started = time.perf_counter()
            results = answer(panes, fixed)
            sync()
            times[name].append(time.perf_counter() - started)
            first[name].append(max(r.first_token_seconds for r in results))
            assert all(r.tokens == length for r in results), [r.tokens for r in results]
    return {
        "dtype": str(engine.dtype),
        "base_usage": base_usage,
        "three_usage": three_usage,
        "base_weights": base_weights,
        "three_weights": three_weights,
        "length": length,
        "seconds": {name: statistics.median(v) for name, v in times.items()},
        "all_seconds": times,
        "first_token": {name: statistics.median(v) for name, v in first.items()},
    }


def engine_figures(model_dir: Path, adapters: list[Path], threads: int) -> dict:
    """Runs in the child process; memory is its resident set."""
    import torch

    from worker.engine import Engine

    torch.set_num_threads(threads)
    runtime = rss_bytes()
    figures = measure_engine(Engine(device="cpu"), model_dir, adapters, LENGTH, REPEATS, rss_bytes)
    return {**figures, "threads": threads, "runtime_rss": runtime}


def first_token_over_http(model_dir: Path, adapter: Path, threads: int) -> dict:
    """Time from POST /api/playground/chat to the first token event, through the web server and the host."""
    from app.db import Database
    from app.migrate import upgrade
    from app.models import Run
    from bench.data import add_bench_dataset
    from bench.streams import serve_web

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        settings = Settings(data_dir=data)
        upgrade(settings)
        settings.ensure_dirs()
        (settings.models_dir / "smollm2-135m-instruct").symlink_to(model_dir)
        db = Database(settings.sqlalchemy_url)
        with db.write_session() as session:
            add_bench_dataset(session)
            session.add(
                Run(
                    id=1,
                    name="bench",
                    dataset_id=1,
                    base_model="smollm2-135m-instruct",
                    method="lora",
                    status="succeeded",
                    config={"prompt_format": "chat"},
                )
            )
            session.commit()
        db.dispose()
        (settings.runs_dir / "1").mkdir(parents=True)
        settings.run_folder(1).adapter.symlink_to(adapter)
        web_port, host_port = free_port(), free_port()
        extra = {
            "TUNEBOARD_GENERATION_URL": f"http://127.0.0.1:{host_port}",
            "TUNEBOARD_GENERATION_THREADS": str(threads),
        }
        env = isolated_env(data, **extra)
        host = subprocess.Popen(
            [sys.executable, "-m", "worker.gen_server"],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        processes = [host, serve_web(data, web_port, extra)]
        base = f"http://127.0.0.1:{web_port}"
        try:
            for _ in range(600):  # the web server is up; wait for the generation host behind it
                if httpx.get(f"{base}/api/playground/status", timeout=2).status_code == 200:
                    break
                time.sleep(0.1)
            else:
                raise RuntimeError("the generation host did not start")

            def ask(targets: list[str]) -> float:
                body = {
                    "panes": [
                        {"target": t, "messages": [{"role": "user", "content": "Hi!"}]} for t in targets
                    ],
                    "sampling": {"max_new_tokens": 8},
                }
                started = time.perf_counter()
                seen: set[int] = set()
                first = None
                with httpx.stream("POST", f"{base}/api/playground/chat", json=body, timeout=120) as response:
                    for line in response.iter_lines():
                        if line.startswith("data:") and '"type": "token"' in line:
                            seen.add(json.loads(line[5:])["pane"])
                            if len(seen) == len(targets) and first is None:
                                first = time.perf_counter() - started
                return first if first is not None else float("nan")

            cold = ask(["smollm2-135m-instruct", "run-1"])  # loads the model and attaches the adapter
            one = [ask(["smollm2-135m-instruct"]) for _ in range(REPEATS)]
            two = [ask(["smollm2-135m-instruct", "run-1"]) for _ in range(REPEATS)]
        finally:
            for process in processes:
                stop_process(process, 30)
    return {"cold": cold, "one_pane": one, "two_panes": two}


def generation_benchmark(model_dir: Path, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(model_dir, Path(tmp))
        child = subprocess.run(
            [
                sys.executable,
                "-m",
                "bench.generation",
                str(model_dir),
                json.dumps([str(a) for a in adapters]),
                str(threads),
            ],
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        engine = json.loads(child.stdout.strip().splitlines()[-1])
        http = first_token_over_http(model_dir, adapters[0], threads)
    return {"engine": engine, "http": http}


def report_generation(result: dict) -> str:
    e, h = result["engine"], result["http"]
    mib = 2**20
    secs = e["seconds"]
    runtime = e["runtime_rss"]

    def ms(values) -> str:
        return f"median {statistics.median(values) * 1000:.0f} ms, max {max(values) * 1000:.0f} ms"

    base, three = e["base_usage"], e["three_usage"]
    memory = (
        f"- resident memory: base model answering {base / mib:.0f} MiB; three adapters attached and "
        f"answering {three / mib:.0f} MiB = {three / base:.3f}x (weights alone "
        f"{e['base_weights'] / mib:.0f} → {e['three_weights'] / mib:.0f} MiB = "
        f"{e['three_weights'] / e['base_weights']:.3f}x; Python and torch alone: {runtime / mib:.0f} MiB)"
    )
    speed = (
        f"- {LENGTH}-token answers, median of {REPEATS}: one adapter pane {secs['single']:.2f} s, base alone "
        f"{secs['base only']:.2f} s, base + adapter side by side {secs['side by side']:.2f} s = "
        f"{secs['side by side'] / secs['single']:.2f}x the single answer; four panes "
        f"{secs['four panes']:.2f} s = {secs['four panes'] / secs['single']:.2f}x"
    )
    first = (
        f"- first token through the web server (short prompt, model loaded): one pane {ms(h['one_pane'])}; "
        f"base + adapter, both panes started: {ms(h['two_panes'])}; first question after start, loading "
        f"the model and the adapter: {h['cold']:.1f} s"
    )
    title = f"Generation ({e['dtype']}, {e['threads']} threads, bundled model, LoRA r16 all-linear adapters):"
    return "\n".join([title, memory, speed, first])


if __name__ == "__main__":
    model, adapter_list, thread_count = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    figures = engine_figures(Path(model), [Path(a) for a in adapter_list], thread_count)
    print(json.dumps(figures))
