"""The generation host's queue, with an engine that answers only when the test lets it: a waiting question
is told how many are ahead, and one more than the queue holds is refused with a sentence."""

from __future__ import annotations

import json
import threading

import httpx
import pytest
import uvicorn

from app.config import Settings
from app.model_registry import BUNDLED_ID
from app.processes import free_port
from worker.engine import PaneResult


class HeldEngine:
    """Answers "ok" once `release` is set; records the questions it saw."""

    device = "cpu"

    def __init__(self):
        self.release = threading.Event()
        self.started = threading.Event()

    def describe(self) -> dict:
        return {"models": []}

    def check_prompts(self, panes, max_new_tokens) -> None:
        pass  # the conversations here are short

    def generate(self, panes, sampling, emit, stop):
        self.started.set()
        self.release.wait(30)
        emit({"type": "token", "pane": 0, "text": "ok"})
        return [PaneResult(text="ok", tokens=1, finish_reason="stop") for _ in panes]


@pytest.fixture
def host(settings: Settings):
    import torch

    from worker.gen_server import create_host

    threads = torch.get_num_threads()  # create_host sets the process's torch threads; give them back after
    folder = settings.models_dir / BUNDLED_ID  # a model folder in name only: the held engine loads nothing
    folder.mkdir(parents=True)
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        (folder / name).write_text("{}")
    settings = settings.model_copy(update={"generation_queue": 2, "generation_threads": 1})
    engine = HeldEngine()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_host(settings, engine), port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            httpx.get(f"{base}/healthz", timeout=1)
            break
        except httpx.HTTPError:
            threading.Event().wait(0.05)
    yield base, engine
    engine.release.set()
    server.should_exit = True
    thread.join(10)
    torch.set_num_threads(threads)


QUESTION = {"panes": [{"target": BUNDLED_ID, "messages": [{"role": "user", "content": "hi"}]}]}


def test_a_waiting_question_is_told_why_and_one_too_many_is_refused(host):
    base, engine = host
    first_events: list[dict] = []
    second_events: list[dict] = []

    def ask(into: list[dict]) -> None:
        with httpx.stream("POST", f"{base}/generate", json=QUESTION, timeout=30) as response:
            into.extend(json.loads(line) for line in response.iter_lines() if line)

    first = threading.Thread(target=ask, args=(first_events,))
    first.start()
    assert engine.started.wait(10)
    second = threading.Thread(target=ask, args=(second_events,))
    second.start()
    for _ in range(100):  # the second question is queued behind the first
        if httpx.get(f"{base}/healthz").json()["waiting"] == 2:
            break
        threading.Event().wait(0.05)
    refused = httpx.post(f"{base}/generate", json=QUESTION)
    assert refused.status_code == 503
    assert refused.json()["message"].startswith("The generation host is busy: 2 questions are waiting.")

    engine.release.set()
    first.join(10)
    second.join(10)
    assert second_events[0] == {
        "type": "queued", "ahead": 1, "message": "Waiting for 1 earlier question to be answered…",
    }  # fmt: skip
    for events in (first_events, second_events):
        assert events[-1]["type"] == "end" and events[-1]["results"][0]["text"] == "ok"
    assert httpx.get(f"{base}/healthz").json()["waiting"] == 0


def test_unknown_targets_are_refused_before_queueing(host):
    base, _ = host
    body = {"panes": [{"target": "run-99", "messages": [{"role": "user", "content": "hi"}]}]}
    response = httpx.post(f"{base}/generate", json=body)
    assert response.status_code == 404 and response.json()["message"] == "There is no run 99."
