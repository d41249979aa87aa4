"""Reliability figures: how the web server answers while a 40 MB dataset is uploaded and checked, what
the background statistics of 1,000,000 rows cost (time, and peak memory of the child that computes them),
and what one 100 MB row costs the web process (peak memory, and the time to open its page).
"""

from __future__ import annotations

import io
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from app.config import PROJECT_ROOT, Settings
from app.datasets.store import dataset_dir
from app.migrate import upgrade
from app.processes import free_port, stop_process
from bench.streams import serve_web

ROWS = 1_000_000
LINE = b'{"instruction":"%07d?","output":"%07d."}\n'  # 40 bytes: a 40 MB file

# The child reports its own peak memory (VmHWM: ru_maxrss would include its parent's at fork); "idle" is
# the same interpreter after its imports.
MEASURED_JOB = """
import json, sys
from app.datasets import stats_job
def hwm():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
idle = hwm()
code = stats_job.main([sys.argv[1]])
print(json.dumps({"code": code, "idle_kb": idle, "peak_kb": hwm()}))
"""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def upload_while_polling(base: str, content: bytes) -> dict:
    """Upload `content` and poll /healthz every 50 ms until the upload is answered."""
    result: dict = {}

    def upload() -> None:
        started = time.monotonic()
        files = {"file": ("million.jsonl", io.BytesIO(content))}
        response = httpx.post(f"{base}/api/datasets", files=files, timeout=600)
        result.update(status=response.status_code, seconds=time.monotonic() - started, body=response.json())

    thread = threading.Thread(target=upload)
    thread.start()
    latencies = []
    with httpx.Client(timeout=30) as client:
        while thread.is_alive():
            started = time.monotonic()
            client.get(f"{base}/healthz")
            latencies.append((time.monotonic() - started) * 1000)
            time.sleep(0.05)
    thread.join()
    return {
        **result,
        "healthz": {
            "count": len(latencies),
            "p50_ms": percentile(latencies, 50),
            "p99_ms": percentile(latencies, 99),
            "max_ms": max(latencies),
        },
    }


def run_job(spec: dict) -> dict:
    started = time.monotonic()
    output = subprocess.run(
        [sys.executable, "-c", MEASURED_JOB, json.dumps(spec)],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    measured = json.loads(output.strip().splitlines()[-1])
    assert measured["code"] == 0, output
    return {
        "seconds": time.monotonic() - started,
        "peak_mb": measured["peak_kb"] / 1024,
        "above_idle_mb": (measured["peak_kb"] - measured["idle_kb"]) / 1024,
    }


HUGE_ROW = 100_000_000  # characters in the one huge row's answer


def _memory_kb(pid: int, field: str) -> int:
    return next(int(line.split()[1]) for line in open(f"/proc/{pid}/status") if line.startswith(field))


def huge_row(model_dir: Path) -> dict:
    """A dataset with one 100 MB row: the web process's peak memory above idle while it is uploaded and
    while its page is opened (statistics included, until they are done), and how long the page took."""
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(data_dir=Path(tmp) / "data")
        upgrade(settings)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        server = serve_web(settings.data_dir, port, {"TUNEBOARD_MAX_UPLOAD_MB": "150"})
        try:
            rows = [{"instruction": "Recite the ledger.", "output": "l" * HUGE_ROW}]
            rows += [{"instruction": f"Question {i}?", "output": f"Answer {i}."} for i in range(20)]
            content = "\n".join(json.dumps(r) for r in rows).encode()
            idle = _memory_kb(server.pid, "VmRSS")
            started = time.monotonic()
            response = httpx.post(
                f"{base}/api/datasets", files={"file": ("huge.jsonl", content)}, timeout=600
            )
            upload_seconds = time.monotonic() - started
            assert response.status_code == 201, response.text
            dataset = response.json()["id"]
            model = httpx.post(f"{base}/api/models", json={"path": str(model_dir)}).json()["id"]
            upload_peak = _memory_kb(server.pid, "VmHWM")
            Path(f"/proc/{server.pid}/clear_refs").write_text("5")  # the peak starts again from here
            started = time.monotonic()
            page = httpx.get(f"{base}/datasets/{dataset}", params={"model": model}, timeout=600)
            page_seconds = time.monotonic() - started
            assert page.status_code == 200
            stats_url = f"{base}/api/datasets/{dataset}/stats"
            while (stats := httpx.get(stats_url, params={"model": model}, timeout=600)).status_code == 202:
                time.sleep(0.5)
            assert stats.status_code == 200, stats.text
            stats_seconds = time.monotonic() - started
            page_peak = _memory_kb(server.pid, "VmHWM")
        finally:
            stop_process(server, 30)
    return {
        "megabytes": len(content) / 1e6,
        "upload_seconds": upload_seconds,
        "upload_above_idle_mb": (upload_peak - idle) / 1024,
        "page_seconds": page_seconds,
        "page_kb": len(page.content) / 1024,
        "stats_seconds": stats_seconds,
        "page_above_idle_mb": (page_peak - idle) / 1024,
    }


def reliability_benchmark(model_dir: Path) -> dict:
    from app.datasets import stats

    content = b"".join(LINE % (i, i) for i in range(ROWS))
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(data_dir=Path(tmp) / "data")
        upgrade(settings)
        port = free_port()
        server = serve_web(settings.data_dir, port)
        try:
            upload = upload_while_polling(f"http://127.0.0.1:{port}", content)
        finally:
            stop_process(server, 30)
        assert upload["status"] == 201, upload
        rows = dataset_dir(settings, upload["body"]["id"]) / "rows.jsonl"
        lengths = run_job(
            {
                "kind": "lengths",
                "rows": str(rows),
                "key": [],
                "folder": str(model_dir),
                "prompt_format": "chat",
                "cache": str(rows.with_name("lengths.json")),
            }
        )
        summary = run_job(
            {
                "kind": "summary",
                "rows": str(rows),
                "key": [],
                "fraction": 0.1,
                "max_rows": 500,
                "seed": 42,
                "cache": str(rows.with_name("summary.json")),
            }
        )
        counted = json.loads(rows.with_name("lengths.json").read_text())["lengths"]
        assert len(counted) == ROWS and stats.length_stats(counted, max_length=1024)["rows"] == ROWS
    return {
        "upload": {k: v for k, v in upload.items() if k != "body"},
        "megabytes": len(content) / 1e6,
        "lengths": lengths,
        "summary": summary,
        "median_tokens": statistics.median(counted),
        "huge_row": huge_row(model_dir),
    }


def report_reliability(result: dict) -> str:
    upload, health = result["upload"], result["upload"]["healthz"]
    lengths, summary, huge = result["lengths"], result["summary"], result["huge_row"]
    return "\n".join([
        f"Upload of {ROWS:,} rows ({result['megabytes']:.0f} MB JSON Lines): answered 201 in "
        f"{upload['seconds']:.1f} s; /healthz polled {health['count']} times meanwhile: p50 "
        f"{health['p50_ms']:.0f} ms, p99 {health['p99_ms']:.0f} ms, max {health['max_ms']:.0f} ms",
        f"Background statistics of {ROWS:,} rows: token lengths under the bundled model's chat "
        f"template {lengths['seconds']:.0f} s, peak {lengths['peak_mb']:.0f} MB "
        f"({lengths['above_idle_mb']:.0f} MB above the idle process); duplicates and split "
        f"{summary['seconds']:.0f} s, peak {summary['peak_mb']:.0f} MB ({summary['above_idle_mb']:.0f} MB "
        "above idle)",
        f"One 100 MB row ({huge['megabytes']:.0f} MB file): uploaded in {huge['upload_seconds']:.1f} s, web "
        f"process {huge['upload_above_idle_mb']:.0f} MB above idle; its page in {huge['page_seconds']:.2f} s "
        f"({huge['page_kb']:.0f} KB), statistics done {huge['stats_seconds']:.1f} s after, web process "
        f"{huge['page_above_idle_mb']:.0f} MB above idle meanwhile",
    ])  # fmt: skip
