"""Live-stream figures: how fast a committed metric row reaches an open browser page, and what 200 open
event streams cost a training run on the same machine."""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from app.config import PROJECT_ROOT, Settings, isolated_env
from app.db import Database
from app.runs import state
from bench.data import add_bench_dataset


def serve_web(data_dir: Path, port: int, env_extra: dict[str, str] | None = None) -> subprocess.Popen:
    """`tuneboard web` on `port`, started and healthy."""
    env = isolated_env(data_dir, **{"TUNEBOARD_PORT": str(port), **(env_extra or {})})
    process = subprocess.Popen([sys.executable, "-m", "app.cli", "web"], cwd=PROJECT_ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    for _ in range(300):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError("the web server did not start")


def running_run(settings: Settings) -> int:
    """A run in the running state, as a worker would leave it, to stream."""
    db = Database(settings.sqlalchemy_url)
    with db.write_session() as session:
        add_bench_dataset(session)
        state.enqueue(
            session=session, name="stream bench", dataset_id=1, base_model="x", method="lora", config={}
        )
    with db.write_session() as session:
        run = state.claim_next(session=session, worker_id="bench")
    db.dispose()
    return run.id


def page_latency(base: str, settings: Settings, run_id: int, rows: int = 40) -> dict:
    """Commit metric rows at irregular intervals; a Chromium page's EventSource notes when each arrives."""
    from playwright.sync_api import sync_playwright

    db = Database(settings.sqlalchemy_url)
    committed: dict[int, float] = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync"])  # fmt: skip
        page = browser.new_page()
        page.goto(f"{base}/healthz")
        page.evaluate(
            """(url) => { window.arrivals = {}; const source = new EventSource(url);
               source.addEventListener('metric', (e) => {
                 const step = JSON.parse(e.data).step;
                 window.arrivals[step] = performance.timeOrigin + performance.now(); }); }""",
            f"/api/runs/{run_id}/events",
        )
        time.sleep(1.0)
        rng = random.Random(0)
        for step in range(1, rows + 1):
            with db.write_session() as session:
                state.record_metric(
                    session=session, run_id=run_id, values={"kind": "train", "step": step, "loss": 1.0}
                )
            committed[step] = time.time() * 1000
            time.sleep(rng.uniform(0.1, 0.6))
        time.sleep(2.0)
        arrivals = page.evaluate("window.arrivals")
        browser.close()
    db.dispose()
    latencies = sorted(arrivals[str(s)] - committed[s] for s in committed if str(s) in arrivals)
    return {
        "rows": rows,
        "received": len(latencies),
        "p50_ms": statistics.median(latencies),
        "p95_ms": latencies[int(0.95 * (len(latencies) - 1))],
        "max_ms": latencies[-1],
    }


async def _hold_streams(url: str, count: int, stop: asyncio.Event, opened: list[int]) -> None:
    limits = httpx.Limits(max_connections=count + 10, max_keepalive_connections=count + 10)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:

        async def one():
            async with client.stream("GET", url) as response:
                opened.append(1)
                async for _ in response.aiter_lines():
                    if stop.is_set():
                        return

        tasks = [asyncio.create_task(one()) for _ in range(count)]
        while not stop.is_set():
            await asyncio.sleep(0.2)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def streams_during_training(
    base: str, server: subprocess.Popen, run_id: int, train, count: int = 200
) -> dict:
    """Training throughput alone and with `count` open streams (held by a client thread), interleaved; and
    the web server's own CPU time while it serves them."""
    speeds: dict[str, list[float]] = {"alone": [], "streams": []}
    server_share = []
    for _ in range(2):
        speeds["alone"].append(train())
        stop, opened = asyncio.Event(), []
        loop = asyncio.new_event_loop()
        url = f"{base}/api/runs/{run_id}/events"
        holder = threading.Thread(
            target=loop.run_until_complete, args=(_hold_streams(url, count, stop, opened),)
        )
        holder.start()
        while len(opened) < count:
            time.sleep(0.1)
        assert httpx.get(f"{base}/healthz").json()["open_streams"] >= count
        cpu_before, wall_before = cpu_seconds(server.pid), time.monotonic()
        speeds["streams"].append(train())
        server_share.append((cpu_seconds(server.pid) - cpu_before) / (time.monotonic() - wall_before))
        loop.call_soon_threadsafe(stop.set)
        holder.join()
        loop.close()
    alone, loaded = statistics.mean(speeds["alone"]), statistics.mean(speeds["streams"])
    return {"count": count, "alone": speeds["alone"], "streams": speeds["streams"],
            "slowdown": (alone - loaded) / alone, "server_cpu": statistics.mean(server_share)}  # fmt: skip
