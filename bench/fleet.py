"""Fleet figures, on SQLite and on PostgreSQL (a throwaway cluster, started as the tests start one):
- claims: ten worker processes race for 300 queued runs; how long each claim takes;
- metric writes: ten worker processes each log metric rows as fast as they can for 10 s; rows per second;
- the web server's CPU while four workers send a run's metrics every 0.1 s and its log every 2 s over HTTP,
  with one browser-like event stream open per run and one on the list."""

from __future__ import annotations

import asyncio
import multiprocessing
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx

from app.config import Settings
from app.db import Database
from app.migrate import upgrade
from app.processes import free_port, stop_process
from app.runs import state
from bench.data import add_bench_dataset
from bench.streams import cpu_seconds, serve_web
from tests.postgres import PostgresServer

WRITERS = 10
TOKEN = "fleet-bench-token-0123456789abcdef"


def _claimer(url: str, name: str, results) -> None:
    db = Database(url)
    latencies = []
    while True:
        began = time.perf_counter()
        with db.write_session() as session:
            run = state.claim_next(session=session, worker_id=name)
        if run is None:
            break
        latencies.append(time.perf_counter() - began)
    db.dispose()
    results.put(latencies)


def _writer(url: str, run_id: int, seconds: float, results) -> None:
    db = Database(url)
    latencies, step, end = [], 0, time.monotonic() + seconds
    while time.monotonic() < end:
        step += 1
        began = time.perf_counter()
        with db.write_session() as session:
            values = {"kind": "train", "step": step, "loss": 1.0}
            state.record_metric(session=session, run_id=run_id, values=values)
        latencies.append(time.perf_counter() - began)
    db.dispose()
    results.put(latencies)


def _queue(url: str, runs: int) -> list[int]:
    db = Database(url)
    with db.write_session() as session:
        add_bench_dataset(session)
    ids = []
    with db.write_session() as session:
        for n in range(runs):
            run = state.enqueue(
                session=session, name=f"fleet {n}", dataset_id=1, base_model="x", method="lora", config={}
            )
            ids.append(run.id)
    db.dispose()
    return ids


def _spread(values: list[float]) -> dict:
    values = sorted(values)
    return {
        "count": len(values),
        "p50_ms": 1000 * statistics.median(values),
        "p95_ms": 1000 * values[int(0.95 * (len(values) - 1))],
        "max_ms": 1000 * values[-1],
    }


def _in_processes(target, argument_lists: list[tuple]) -> list[float]:
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=target, args=(*args, results)) for args in argument_lists]
    for p in processes:
        p.start()
    gathered = [value for _ in processes for value in results.get()]
    for p in processes:
        p.join()
    return gathered


def database_figures(url: str, seconds: float = 10.0) -> dict:
    _queue(url, 300)
    claims = _in_processes(_claimer, [(url, f"bench-{n}") for n in range(WRITERS)])
    # every run is now running; each writer logs to its own
    writes = _in_processes(_writer, [(url, run_id, seconds) for run_id in range(1, WRITERS + 1)])
    return {
        "claims": _spread(claims),
        "writes": _spread(writes) | {"rows_per_second": len(writes) / seconds},
    }


async def _watch(base: str, paths: list[str], stop: asyncio.Event) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(base_url=base, timeout=None, headers=headers) as client:

        async def one(path: str):
            async with client.stream("GET", path) as response:
                async for _ in response.aiter_lines():
                    if stop.is_set():
                        return

        tasks = [asyncio.create_task(one(p)) for p in paths]
        while not stop.is_set():
            await asyncio.sleep(0.2)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _remote_worker(base: str, url: str, run_id: int, worker: str, seconds: float) -> int:
    """A worker's traffic for one run: a metric row every 0.1 s, its log over HTTP every 2 s."""
    db = Database(url)
    headers = {"Authorization": f"Bearer {TOKEN}", "X-Tuneboard-Worker": worker}
    step, next_log, end = 0, time.monotonic(), time.monotonic() + seconds
    with httpx.Client(base_url=base, headers=headers) as client:
        while time.monotonic() < end:
            step += 1
            with db.write_session() as session:
                values = {"kind": "train", "step": step, "loss": 1.0}
                state.record_metric(session=session, run_id=run_id, values=values)
            if time.monotonic() >= next_log:
                client.post(f"/api/runs/{run_id}/log", content=b"{'loss': 1.0}\n" * 20).raise_for_status()
                next_log += 2.0
            time.sleep(0.1)
    db.dispose()
    return step


def web_cpu(url: str, data_dir: Path, seconds: float = 20.0, workers: int = 4) -> dict:
    ids = _queue(url, workers)
    db = Database(url)
    for n in range(workers):
        with db.write_session() as session:
            state.claim_next(session=session, worker_id=f"box-{n}:1")
    db.dispose()
    port = free_port()
    server = serve_web(data_dir, port, {"TUNEBOARD_DATABASE_URL": url, "TUNEBOARD_TOKEN": TOKEN})
    base = f"http://127.0.0.1:{port}"
    try:
        stop_streams, loop = asyncio.Event(), asyncio.new_event_loop()
        paths = [f"/api/runs/{i}/events" for i in ids] + ["/api/runs/events"]
        holder = threading.Thread(target=loop.run_until_complete, args=(_watch(base, paths, stop_streams),))
        holder.start()
        time.sleep(1.0)
        counts: list[int] = []

        def work(run_id: int, n: int) -> None:
            counts.append(_remote_worker(base, url, run_id, f"box-{n}:1", seconds))

        threads = [threading.Thread(target=work, args=(i, n)) for n, i in enumerate(ids)]
        cpu_before, wall_before = cpu_seconds(server.pid), time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        share = (cpu_seconds(server.pid) - cpu_before) / (time.monotonic() - wall_before)
        loop.call_soon_threadsafe(stop_streams.set)
        holder.join()
    finally:
        stop_process(server, 30)
    return {"workers": workers, "metric_rows": sum(counts), "seconds": seconds, "web_cpu_share": share}


def fleet_benchmark() -> dict:
    result = {}
    with tempfile.TemporaryDirectory() as folder:
        settings = Settings(data_dir=Path(folder) / "sqlite")
        settings.ensure_dirs()
        upgrade(settings)
        result["sqlite"] = database_figures(settings.sqlalchemy_url)
        web = Settings(data_dir=Path(folder) / "sqlite-web")
        web.ensure_dirs()
        upgrade(web)
        result["sqlite"]["web"] = web_cpu(web.sqlalchemy_url, web.data_dir)
        server = PostgresServer().start()
        try:
            for name in ("postgresql", "postgresql-web"):
                url = server.new_database()
                upgrade(Settings(data_dir=Path(folder) / name, database_url=url))
                if name == "postgresql":
                    result[name] = database_figures(url)
                else:
                    result["postgresql"]["web"] = web_cpu(url, Path(folder) / name)
        finally:
            server.stop()
    return result


def report_fleet(result: dict) -> str:
    lines = [
        f"Fleet: {WRITERS} worker processes racing for 300 queued runs (claims), then each logging metric "
        "rows as fast as it can for 10 s (writes); the web server's CPU while 4 workers each send a metric "
        "row every 0.1 s and their log every 2 s over HTTP, an event stream open per run and on the list.",
        "",
        "| database | claim p50 / p95 / max (ms) | metric rows/s (10 writers) | write p50 / p95 (ms) "
        "| web CPU, 4 workers |",
        "|---|---|---|---|---|",
    ]
    for name in ("sqlite", "postgresql"):
        r = result[name]
        c, w, web = r["claims"], r["writes"], r["web"]
        lines.append(
            f"| {name} | {c['p50_ms']:.1f} / {c['p95_ms']:.1f} / {c['max_ms']:.0f} "
            f"| {w['rows_per_second']:.0f} | {w['p50_ms']:.1f} / {w['p95_ms']:.1f} "
            f"| {web['web_cpu_share']:.1%} of a core "
            f"({web['metric_rows']} rows in {web['seconds']:.0f} s) |"
        )
    return "\n".join(lines)
