"""Property-based fuzzing of the JSON API with hypothesis: bodies shaped like the real request models but
filled with hostile values (huge and negative numbers, NaN-free floats, booleans where ids go, empty and
NUL strings, unpaired surrogates, wrong types, deep-ish nesting). No request may get a 5xx (except the
documented 503 when the generation host is down), and a refused request stores nothing.

The budget is fixed and the examples derandomized, so CI runs the same cases every time, in well under
two minutes; TUNEBOARD_FUZZ_EXAMPLES raises the count for a longer hunt."""

from __future__ import annotations

import json
import os

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.config import Settings
from app.generation_client import NOT_RUNNING
from app.main import create_app
from app.migrate import upgrade
from app.models import MAX_ID
from app.processes import free_port
from app.runs.config import PEFT_PARAMS, TrainingParams
from tests.conftest import DEMO_DATASET
from tests.test_hostile_input import stored

EXAMPLES = int(os.environ.get("TUNEBOARD_FUZZ_EXAMPLES", "120"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

SPECIAL_TEXT = [
    "",
    " ",
    "\x00",
    "\ud800",
    "all-linear",
    "q_proj",
    "run-1",
    "run-1-step-0",
    "../../etc",
    "/tmp",
]
# Text that includes unpaired surrogates, NUL and every other code point.
# (Hypothesis leaves surrogates out of a mixed alphabet, so they are spliced in.)
surrogates = st.text(
    alphabet=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=2
)
texts = st.one_of(
    st.text(max_size=30), st.tuples(st.text(max_size=10), surrogates, st.text(max_size=10)).map("".join)
)
numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, MAX_ID, MAX_ID + 1, 2**32]),
    st.floats(allow_nan=False, allow_infinity=False),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, texts, st.sampled_from(SPECIAL_TEXT))
values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=10,
)


def shaped(fields: list[str]) -> st.SearchStrategy[dict]:
    """A dict with any subset of the real field names, each holding a plausible number or text (so that
    requests get past the first check and reach the code behind it), or any value at all."""
    return st.dictionaries(
        st.sampled_from(fields), st.one_of(numbers, texts, st.lists(texts, max_size=3), values)
    )


peft_fields = sorted({name for model in PEFT_PARAMS.values() for name in model.model_fields})
run_bodies = st.fixed_dictionaries(
    {},
    optional={
        "dataset_id": st.one_of(st.just(1), values),
        "base_model": st.one_of(st.sampled_from(["smollm2-135m-instruct", "local-1"]), texts, values),
        "method": st.one_of(st.sampled_from(list(PEFT_PARAMS)), values),
        "preset": st.one_of(st.just("tutorial"), values),
        "prompt_format": values,
        "peft": st.one_of(shaped(peft_fields), values),
        "training": st.one_of(shaped(list(TrainingParams.model_fields)), values),
        "name": st.one_of(texts, values),
    },
)
message = st.fixed_dictionaries(
    {},
    optional={"role": st.one_of(st.sampled_from(["user", "assistant", "system"]), values), "content": values},
)
chat_bodies = st.fixed_dictionaries(
    {},
    optional={
        "model": st.one_of(st.sampled_from(["smollm2-135m-instruct", "run-1", "nope"]), values),
        "messages": st.one_of(st.lists(message, min_size=1, max_size=3), values),
        "max_tokens": values,
        "temperature": values,
        "top_p": values,
        "seed": values,
        "n": values,
    },
)
playground_bodies = st.fixed_dictionaries(
    {},
    optional={
        "panes": st.one_of(
            st.lists(
                st.fixed_dictionaries(
                    {},
                    optional={"target": values, "messages": st.lists(message, max_size=2), "system": values},
                ),
                max_size=5,
            ),
            values,
        ),
        "sampling": st.one_of(
            shaped(["max_new_tokens", "temperature", "top_p", "repetition_penalty", "seed"]), values
        ),
    },
)
answer = st.fixed_dictionaries({}, optional={"target": values, "text": values})
vote_bodies = st.fixed_dictionaries(
    {},
    optional={
        "conversation_id": st.one_of(texts, values),
        "messages": st.one_of(st.lists(message, max_size=3), values),
        "answers": st.one_of(st.lists(answer, max_size=5), values),
        "verdict": st.one_of(st.sampled_from(["better", "tie", "both_bad"]), values),
        "best": st.one_of(numbers, values),
        "chosen": st.one_of(texts, values),
        "sampling": values,
    },
)
export_bodies = st.fixed_dictionaries(
    {},
    optional={
        "format": st.one_of(st.sampled_from(["merged", "gguf-q8_0", "lora-gguf"]), values),
        "step": values,
    },
)
paths = st.one_of(texts, texts.map(lambda t: "/tmp/" + t), st.sampled_from(["/", "/tmp", "/proc/self/root"]))
model_bodies = st.fixed_dictionaries(
    {}, optional={"path": st.one_of(paths, values), "name": st.one_of(texts, values)}
)


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    # Nothing listens on this port: a well-formed chat gets the documented 503 "host is not running".
    config = Settings(data_dir=folder / "data", generation_url=f"http://127.0.0.1:{free_port()}")
    upgrade(config)
    with TestClient(create_app(config)) as client:
        response = client.post("/api/datasets", files={"file": ("demo.json", DEMO_DATASET.read_bytes())})
        assert response.status_code == 201
        yield client


def check(client: TestClient, method: str, url: str, body=None) -> None:
    before = stored(client)
    content = None if body is None else json.dumps(body)  # ensure_ascii: surrogates travel as \ud800
    response = client.request(method, url, content=content, headers={"content-type": "application/json"})
    if response.status_code == 503:
        assert NOT_RUNNING in response.text, response.text
    else:
        assert response.status_code < 500, (url, body, response.text)
    if response.status_code >= 400:
        assert stored(client) == before, (url, body, response.text)
        assert response.text.strip(), "an error without a sentence"


@FUZZ
@given(body=run_bodies)
def test_fuzz_launch_run(api, body):
    check(api, "POST", "/api/runs", body)


@FUZZ
@given(body=chat_bodies)
def test_fuzz_chat_completions(api, body):
    check(api, "POST", "/v1/chat/completions", body)


@FUZZ
@given(body=playground_bodies)
def test_fuzz_playground_chat(api, body):
    check(api, "POST", "/api/playground/chat", body)


@FUZZ
@given(body=model_bodies)
def test_fuzz_register_model(api, body):
    check(api, "POST", "/api/models", body)


@FUZZ
@given(body=vote_bodies)
def test_fuzz_record_vote(api, body):
    check(api, "POST", "/api/votes", body)


@FUZZ
@given(body=export_bodies)
def test_fuzz_request_export(api, body):
    check(api, "POST", "/api/runs/1/exports", body)


ids = st.one_of(st.integers(min_value=-(2**70), max_value=2**70).map(str), st.text(max_size=12))


@FUZZ
@given(
    template=st.sampled_from(
        [
            "/api/runs/{}",
            "/api/runs/{}/metrics",
            "/api/runs/1/metrics?after={}",
            "/api/runs/{}/adapter",
            "/api/exports/{}",
            "/api/exports/{}/file",
            "/api/runs/{}/exports",
            "/api/runs/1/exports/estimate?format={}",
            "/api/votes?since={}",
            "/api/datasets/{}/preferences.jsonl",
            "/api/datasets/{}",
            "/api/datasets/{}/rows?limit={}",
            "/api/datasets/1/stats?max_length={}",
            "/api/datasets/1/stats?model={}",
            "/runs/{}",
            "/datasets/{}",
            "/playground?run={}",
        ]
    ),
    value=ids,
)
def test_fuzz_read_urls(api, template, value):
    from urllib.parse import quote

    url = template.replace("{}", quote(value, safe=""))
    response = api.get(url)
    assert response.status_code < 500, (url, response.text)
