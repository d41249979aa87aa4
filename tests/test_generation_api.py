"""The playground stream and the OpenAI-compatible API, against a real `tuneboard serve` whose worker runs
the generation host, with the tiny model and two finished runs whose adapters are random LoRA weights."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from app.config import Settings
from app.db import Database
from app.models import Run
from app.processes import free_port
from tests.conftest import DEMO_DATASET
from tests.servers import running
from tests.sse import parse
from tests.test_engine import make_adapter, reference
from worker.engine import PaneRequest

QUESTIONS = ["What is the capital of Quillmere?", "Name a colour.", "Say hello.", "Count to three."]


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("generation")
    data = folder / "data"
    env = {
        "TUNEBOARD_GENERATION": "true",
        "TUNEBOARD_GENERATION_URL": f"http://127.0.0.1:{free_port()}",
        "TUNEBOARD_GENERATION_DTYPE": "float32",
        "TUNEBOARD_GENERATION_THREADS": "1",
        "TUNEBOARD_GENERATION_QUEUE": "16",  # the concurrency test asks 12 at once
        "TUNEBOARD_PREPARE_MODELS": "false",
    }
    with running("serve", data, log=folder / "serve.log", env_extra=env) as (base, _):
        model = httpx.post(f"{base}/api/models", json={"path": str(tiny_model_dir), "name": "Tiny"}).json()[
            "id"
        ]
        files = {"file": ("demo_alpaca.json", DEMO_DATASET.read_bytes())}
        dataset = httpx.post(f"{base}/api/datasets", files=files).json()["id"]
        settings = Settings(data_dir=data)
        db = Database(settings.sqlalchemy_url)
        adapters = {}
        with db.write_session() as session:
            for seed, status in ((1, "succeeded"), (2, "succeeded"), (3, "running")):
                run = Run(
                    name=f"run {seed}",
                    dataset_id=dataset,
                    base_model=model,
                    method="lora",
                    status=status,
                    config={"prompt_format": "chat", "validation_rows": [0, 1, 2]},
                )
                session.add(run)
                session.flush()
                if status == "succeeded":
                    adapters[f"run-{run.id}"] = make_adapter(
                        tiny_model_dir, data / "runs" / str(run.id) / "adapter", seed
                    )
            session.commit()
        db.dispose()
        wait_for_host(base)
        yield {
            "base": base,
            "model": model,
            "adapters": adapters,
            "model_dir": tiny_model_dir,
            "folder": folder,
            "host": env["TUNEBOARD_GENERATION_URL"],
        }
    # Stopping `tuneboard serve` stops the worker, and the worker its generation host.
    host = f"{env['TUNEBOARD_GENERATION_URL']}/healthz"
    for _ in range(100):
        try:
            httpx.get(host, timeout=0.5)
        except httpx.ConnectError:
            return
        threading.Event().wait(0.1)
    raise AssertionError("the generation host outlived `tuneboard serve`")


def wait_for_host(base: str) -> None:
    for _ in range(300):
        if httpx.get(f"{base}/api/playground/status").status_code == 200:
            return
        threading.Event().wait(0.2)
    raise AssertionError("the generation host never came up")


def expected(app, target: str, question: str, max_new_tokens: int) -> str:
    adapter = app["adapters"].get(target)
    request = PaneRequest(
        model_key="tiny",
        model_path=app["model_dir"],
        adapter=None,
        messages=[{"role": "user", "content": question}],
    )
    return reference(app["model_dir"], adapter, request, max_new_tokens)


@pytest.fixture
def api(app):
    with openai.OpenAI(base_url=f"{app['base']}/v1", api_key="unused", max_retries=0) as client:
        yield client


def test_models_lists_base_models_and_finished_runs(app, api):
    ids = [m.id for m in api.models.list().data]
    assert app["model"] in ids
    assert sorted(i for i in ids if i.startswith("run-")) == sorted(app["adapters"])  # not the running run


def test_openai_client_round_trip_plain_and_streaming(app, api):
    run = sorted(app["adapters"])[0]
    want = expected(app, run, QUESTIONS[0], 20)
    messages = [{"role": "user", "content": QUESTIONS[0]}]
    answer = api.chat.completions.create(model=run, messages=messages, max_tokens=20, temperature=0)
    assert answer.choices[0].message.content == want
    assert answer.usage.completion_tokens > 0 and answer.choices[0].finish_reason in ("stop", "length")

    stream = api.chat.completions.create(
        model=run, messages=messages, max_tokens=20, temperature=0, stream=True
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")

    base = api.chat.completions.create(model=app["model"], messages=messages, max_tokens=20, temperature=0)
    assert base.choices[0].message.content == expected(app, app["model"], QUESTIONS[0], 20)
    assert base.choices[0].message.content != want


def test_unknown_or_unfinished_models_get_a_clear_error(app, api):
    with pytest.raises(openai.NotFoundError, match="GET /v1/models lists them"):
        api.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.NotFoundError, match="no adapter to chat with yet"):
        api.chat.completions.create(model="run-3", messages=[{"role": "user", "content": "hi"}])


LONG = "Tessary harbour island capital " * 150  # ~600 tokens of the tiny model's 512


@pytest.mark.parametrize("stream", [False, True])
def test_a_prompt_longer_than_the_context_is_refused_with_the_hosts_sentence(app, api, stream):
    messages = [{"role": "user", "content": LONG}]
    with pytest.raises(openai.BadRequestError) as caught:
        api.chat.completions.create(model=app["model"], messages=messages, max_tokens=5, stream=stream)
    error = caught.value.body
    assert "the model reads at most 512" in error["message"] and error["param"] == "messages"
    assert error["type"] == "invalid_request_error"


def test_max_tokens_beyond_what_the_context_leaves_is_refused(app, api):
    with pytest.raises(openai.BadRequestError) as caught:
        api.chat.completions.create(
            model=app["model"], messages=[{"role": "user", "content": "hi"}], max_tokens=600
        )
    assert "Ask for at most" in caught.value.body["message"] and caught.value.body["param"] == "max_tokens"
    assert api.chat.completions.create(
        model=app["model"], messages=[{"role": "user", "content": "hi"}], max_tokens=3
    )


def test_v1_validation_errors_are_in_openais_shape(app):
    response = httpx.post(f"{app['base']}/v1/chat/completions", json={"model": app["model"]})
    assert response.status_code == 422
    assert (
        response.json()["error"]["param"] == "messages"
        and "Field required" in response.json()["error"]["message"]
    )


def test_the_generation_host_checks_host_body_size_and_context(app):
    body = {"panes": [{"target": app["model"], "messages": [{"role": "user", "content": "hi"}]}]}
    wrong_host = httpx.post(f"{app['host']}/generate", json=body, headers={"host": "evil.example"})
    assert wrong_host.status_code == 400 and "TUNEBOARD_ALLOWED_HOSTS" in wrong_host.text
    huge = {"panes": [{"target": app["model"], "messages": [{"role": "user", "content": "x" * 1_100_000}]}]}
    too_big = httpx.post(f"{app['host']}/generate", json=huge)
    assert too_big.status_code == 413 and "1024 KB limit" in too_big.text
    long = {"panes": [{"target": app["model"], "messages": [{"role": "user", "content": LONG}]}]}
    refused = httpx.post(f"{app['host']}/generate", json=long)
    assert refused.status_code == 400 and refused.json()["field"] == "panes.0.messages"


def test_concurrent_requests_never_mix(app, api):
    targets = [app["model"], *sorted(app["adapters"])]
    jobs = [(targets[i % 3], QUESTIONS[i % 4]) for i in range(12)]
    solo = {job: expected(app, *job, 12) for job in set(jobs)}
    assert len({solo[job] for job in solo}) > len(QUESTIONS), "targets should answer differently"

    def ask(job):
        target, question = job
        messages = [{"role": "user", "content": question}]
        answer = api.chat.completions.create(model=target, messages=messages, max_tokens=12, temperature=0)
        return answer.choices[0].message.content

    with ThreadPoolExecutor(max_workers=12) as pool:
        answers = list(pool.map(ask, jobs))
    assert answers == [solo[job] for job in jobs]


def chat(app, body: dict) -> list:
    with httpx.stream("POST", f"{app['base']}/api/playground/chat", json=body, timeout=60) as response:
        assert response.status_code == 200, response.read()
        return parse(response.iter_lines())


def test_playground_streams_every_pane_side_by_side(app):
    run = sorted(app["adapters"])[0]
    messages = [{"role": "user", "content": QUESTIONS[0]}]
    events = chat(
        app,
        {
            "panes": [{"target": app["model"], "messages": messages}, {"target": run, "messages": messages}],
            "sampling": {"max_new_tokens": 16},
        },
    )
    kinds = [e.event for e in events]
    assert kinds[-1] == "end" and "error" not in kinds
    results = events[-1].json["results"]
    for pane, target in enumerate((app["model"], run)):
        streamed = "".join(e.json["text"] for e in events if e.event == "token" and e.json["pane"] == pane)
        assert streamed == results[pane]["text"] == expected(app, target, QUESTIONS[0], 16)
    # Both panes stream together: tokens of the two panes interleave rather than one after the other.
    order = [e.json["pane"] for e in events if e.event == "token"]
    assert order.index(1) < len(order) - order[::-1].index(0) - 1


def test_playground_errors_are_sentences(app):
    response = httpx.post(
        f"{app['base']}/api/playground/chat",
        json={"panes": [{"target": "run-3", "messages": [{"role": "user", "content": "hi"}]}]},
    )
    assert response.status_code == 404 and "no adapter to chat with yet" in response.text
    response = httpx.post(
        f"{app['base']}/api/playground/chat",
        json={"panes": [{"target": app["model"], "messages": [{"role": "assistant", "content": "x"}]}]},
    )
    assert response.status_code == 422 and "must end with the user's question" in response.text
    five = [{"target": app["model"], "messages": [{"role": "user", "content": "hi"}]}] * 5
    assert httpx.post(f"{app['base']}/api/playground/chat", json={"panes": five}).status_code == 422


def host_health(app) -> dict:
    return httpx.get(f"{app['base']}/api/playground/status").json()


def cancelled_once_idle(app) -> int:
    """The host's count of cancelled answers, once nothing waits any more (at most 30 s)."""
    for _ in range(300):
        health = host_health(app)
        if health["waiting"] == 0:
            return health["cancelled"]
        threading.Event().wait(0.1)
    raise AssertionError(f"the generation host still has questions waiting: {health}")


def test_leaving_mid_answer_stops_the_generation(app):
    body = {
        "panes": [{"target": app["model"], "messages": [{"role": "user", "content": "Go on and on."}]}],
        "sampling": {"max_new_tokens": 450, "repetition_penalty": 1.0},  # the tiny model reads 512
    }
    before = host_health(app)["cancelled"]
    with httpx.stream("POST", f"{app['base']}/api/playground/chat", json=body, timeout=60) as response:
        lines = response.iter_lines()
        for line in lines:
            if line.startswith("event: token"):
                break
    assert cancelled_once_idle(app) == before + 1


def test_a_plain_v1_answer_stops_when_its_client_leaves(app):
    """A non-streaming answer is generated while its client waits; once it leaves, generation stops (within
    the half-second the server takes to notice), so nobody else queues behind an answer no one reads."""
    before = host_health(app)["cancelled"]
    body = {"model": app["model"], "messages": [{"role": "user", "content": "Go on and on."}]}
    body |= {"max_tokens": 450, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{app['base']}/v1/chat/completions", json=body, timeout=httpx.Timeout(10, read=0.3))
    assert cancelled_once_idle(app) == before + 1


@pytest.mark.parametrize(
    ("messages", "sentence"),
    [
        ([{"role": "user", "content": "   "}], "the conversation must end with the user's question"),
        ([{"role": "user", "content": "hi"}] * 201, "at most 200 items"),
    ],
)
def test_v1_passes_the_hosts_own_refusals_with_their_field(app, messages, sentence):
    response = httpx.post(
        f"{app['base']}/v1/chat/completions", json={"model": app["model"], "messages": messages}
    )
    error = response.json()["error"]
    assert response.status_code == 422 and error["param"] == "messages", error
    assert sentence in error["message"] and "answered 422" not in error["message"]


def test_validation_rows_can_be_asked_with_their_reference(app):
    page = httpx.get(f"{app['base']}/playground/validation", params={"run": 1})
    assert page.status_code == 200
    assert page.text.count('class="ask-row"') == 3
    row = json.loads(page.text.split('data-row="', 1)[1].split('"', 1)[0].replace("&#34;", '"'))
    demo = json.loads(Path(DEMO_DATASET).read_text())
    assert row["reference"] == demo[0]["output"] and row["alpaca"]["instruction"] == demo[0]["instruction"]


def test_the_playground_page_offers_the_runs_and_says_nothing_is_wrong(app):
    page = httpx.get(f"{app['base']}/playground", params={"run": 2})
    assert page.status_code == 200 and 'id="host-down"' not in page.text
    assert '<option value="run-2" data-run="2" selected>' in page.text  # the run asked for, on the right
    assert 'value="run-3"' not in page.text  # still running: nothing to chat with yet
