"""Hostile and careless input: every request below gets a 4xx with a sentence that names the bad field, and
nothing is stored. One corpus per class: nesting, numbers, Unicode, paths, ids, hosts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from sqlalchemy import func, select

from app.models import MAX_ID, Dataset, Export, RegisteredModel, Run, Vote
from tests.conftest import DEMO_DATASET, upload

JSON = {"content-type": "application/json"}


def stored(client) -> dict[str, int]:
    """What a refused request must not change: rows in every table a request can write, and files."""
    with client.app.state.db.session() as session:
        counts = {
            m.__name__: session.scalar(select(func.count()).select_from(m))
            for m in (Dataset, Run, RegisteredModel, Export, Vote)
        }
    data = client.app.state.settings.data_dir
    counts["files"] = sum(1 for p in data.rglob("*") if p.is_file() and not p.name.startswith("tuneboard.db"))
    return counts


def first_problem(response) -> dict:
    if response.headers["content-type"].startswith("text/html"):
        return {"message": response.text.split("<p>")[-1].split("</p>")[0]}
    body = response.json()
    return body["error"] if "error" in body else body["detail"][0]


def refused(client, method: str, url: str, *, status: int = 422, field: str | None = None, **kwargs) -> dict:
    before = stored(client)
    response = client.request(method, url, **kwargs)
    assert response.status_code == status, response.text
    problem = first_problem(response)
    assert problem["message"].endswith((".", ")")) and len(problem["message"]) > 10
    if field is not None:
        assert (problem.get("field") or problem.get("param")) == field, problem
    assert stored(client) == before
    return problem


@pytest.fixture
def dataset(client) -> int:
    return upload(client, "demo.json", DEMO_DATASET.read_bytes()).json()["id"]


# ---- nesting -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("depth", [65, 5_000, 200_000])
@pytest.mark.parametrize("url", ["/api/runs", "/api/models", "/v1/chat/completions", "/api/playground/chat"])
def test_deep_nesting_in_a_body(client, url, depth):
    body = '{"dataset_id": ' + "[" * depth + "]" * depth + "}"
    problem = refused(client, "POST", url, content=body, headers=JSON)
    assert "nested too deeply" in problem["message"]


@pytest.mark.parametrize("depth", [65, 200_000])
def test_deep_nesting_in_a_dataset_file(client, depth):
    content = '[{"instruction": "q", "output": "a", "extra": ' + "[" * depth + "]" * depth + "}]"
    problem = refused(client, "POST", "/api/datasets", files={"file": ("deep.json", content)})
    assert "nested too deeply" in problem["message"]


# ---- numbers -----------------------------------------------------------------------------------------
HUGE = "9" * 5_000


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ('{"dataset_id": ' + HUGE + "}", None),
        ('{"dataset_id": 1, "training": {"learning_rate": NaN}}', "training.learning_rate"),
        ('{"dataset_id": 1, "training": {"max_grad_norm": Infinity}}', "training.max_grad_norm"),
        ('{"dataset_id": 1, "training": {"seed": -1}}', "training.seed"),
        ('{"dataset_id": 1, "training": {"seed": 4294967296}}', "training.seed"),
        ('{"dataset_id": 1, "training": {"max_steps": 99999999999999999999}}', "training.max_steps"),
        ('{"dataset_id": 1, "training": {"save_steps": 1e400}}', "training.save_steps"),
        ('{"dataset_id": 1, "peft": {"r": 1e308}}', "peft.r"),
        ('{"dataset_id": 1, "peft": {"lora_alpha": -Infinity}}', "peft.lora_alpha"),
    ],
)
def test_numbers_out_of_range_or_unreadable(client, dataset, body, field):
    refused(client, "POST", "/api/runs", content=body, headers=JSON, field=field)


def test_a_huge_number_in_a_dataset_file(client):
    content = '[{"instruction": "q", "output": "a", "n": ' + HUGE + "}]"
    problem = refused(client, "POST", "/api/datasets", files={"file": ("n.json", content)})
    assert "number too long" in problem["message"]


def test_infinity_in_a_form_field(client, dataset):
    client.get("/runs/new")
    form = {"dataset_id": str(dataset), "training.max_grad_norm": "inf", "method": "lora"}
    headers = {"Origin": "http://testserver", "X-CSRF-Token": client.cookies["tb_csrf"], "HX-Request": "true"}
    before = stored(client)
    response = client.post("/runs", data=form, headers=headers)
    assert "max_grad_norm" in response.text and "finite" in response.text
    assert stored(client) == before


# ---- Unicode -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("url", "body", "field"),
    [
        ("/api/runs", '{"dataset_id": 1, "name": "a\\ud800b"}', "name"),
        (
            "/api/runs",
            '{"dataset_id": 1, "peft": {"target_modules": ["q_proj\\udfff"]}}',
            "peft.target_modules.0",
        ),
        ("/api/models", '{"path": "/tmp/\\udc80"}', "path"),
        ("/api/models", '{"path": "/tmp/x", "name\\ud800": 1}', None),
        (
            "/v1/chat/completions",
            '{"model": "x", "messages": [{"role": "user", "content": "\\ud83d"}]}',
            "messages.0.content",
        ),
    ],
)
def test_unpaired_surrogates(client, dataset, url, body, field):
    problem = refused(client, "POST", url, content=body, headers=JSON, field=field)
    assert "unpaired surrogate" in problem["message"]


def test_unpaired_surrogate_in_a_dataset_row_names_row_and_field(client):
    response = upload(
        client, "s.jsonl", '{"instruction": "q", "output": "a"}\n{"instruction": "\\ud800", "output": "a"}\n'
    )
    assert response.status_code == 422
    assert response.json()["detail"][0] == {
        "row": 2,
        "field": "instruction",
        "message": "This line holds an unpaired surrogate escape (\\ud800), which is not text.",
    }


def test_paired_surrogates_and_other_scripts_are_text(client):
    response = upload(
        client, "ok.json", '[{"instruction": "\\ud83d\\ude00 肛门疼痛", "output": "地榆槐角丸"}]'
    )
    assert response.status_code == 201


# ---- paths -------------------------------------------------------------------------------------------
@pytest.fixture
def loop(tmp_path) -> Path:
    a, b = tmp_path / "loop-a", tmp_path / "loop-b"
    os.symlink(b, a)
    os.symlink(a, b)
    return a


@pytest.mark.parametrize(
    ("path", "words"),
    [
        ("/tmp/a\x00b", "NUL byte"),
        ("/tmp/" + "a" * 300, "cannot be read"),
        ("/" + "a/" * 3000, "too long"),
        ("relative/model", "not an absolute path"),
        ("/no/such/model", "does not exist"),
        ("", "Give the path"),
    ],
)
def test_bad_model_paths(client, path, words):
    problem = refused(client, "POST", "/api/models", json={"path": path}, field="path")
    assert words in problem["message"]


def test_a_symlink_loop_is_a_sentence(client, loop):
    problem = refused(client, "POST", "/api/models", json={"path": str(loop)}, field="path")
    assert "loops back on itself" in problem["message"]


# ---- ids ---------------------------------------------------------------------------------------------
BIG = str(MAX_ID + 1)


@pytest.mark.parametrize(
    ("method", "url"),
    [
        ("GET", f"/api/runs/{BIG}"),
        ("GET", f"/api/runs/{BIG}/metrics"),
        ("GET", f"/api/runs/1/metrics?after={BIG}"),
        ("POST", f"/api/runs/{BIG}/cancel"),
        ("GET", f"/api/runs/{BIG}/adapter"),
        ("GET", f"/api/datasets/{BIG}"),
        ("GET", f"/api/datasets/{BIG}/rows"),
        ("DELETE", f"/api/datasets/{BIG}"),
        ("GET", f"/runs/{BIG}"),
        ("GET", f"/datasets/{BIG}"),
        ("GET", f"/runs/new?dataset={BIG}"),
        ("GET", f"/playground?run={BIG}"),
        ("GET", f"/playground/validation?run={BIG}"),
        ("GET", "/api/runs/-1"),
        ("GET", "/api/runs/1e3"),
    ],
)
def test_ids_out_of_range(client, method, url):
    problem = refused(client, method, url, headers={"accept": "application/json"})
    assert problem["field"] in ("run_id", "dataset_id", "after", "dataset", "run")


@pytest.mark.parametrize(
    ("url", "body", "status"),
    [
        ("/api/runs", {"dataset_id": True}, 422),
        ("/api/runs", {"dataset_id": "1"}, 422),
        ("/api/runs", {"dataset_id": 1.0}, 422),
        ("/api/runs", {"dataset_id": 0}, 422),
        ("/api/runs", {"dataset_id": int(BIG)}, 422),
        (
            "/v1/chat/completions",
            {"model": f"run-{BIG}", "messages": [{"role": "user", "content": "hi"}]},
            404,
        ),
        (
            "/v1/chat/completions",
            {"model": f"run-1-step-{BIG}", "messages": [{"role": "user", "content": "hi"}]},
            404,
        ),
    ],
)
def test_ids_are_not_coerced(client, dataset, url, body, status):
    refused(client, "POST", url, json=body, status=status)


def test_model_ids_out_of_range(client):
    refused(client, "DELETE", f"/api/models/local-{BIG}", status=404)
    refused(client, "GET", f"/api/datasets/1/stats?model=local-{BIG}", status=404)


def test_last_event_id_out_of_range_starts_from_the_beginning(client, dataset):
    run = client.post("/api/runs", json={"dataset_id": dataset, "training": {"max_steps": 1}}).json()["id"]
    with client.stream("GET", f"/api/runs/{run}/events", headers={"Last-Event-ID": BIG}) as response:
        assert response.status_code == 200


# ---- run settings checked against the model ----------------------------------------------------------
@pytest.fixture
def tiny(client, tiny_model_dir) -> str:
    return client.post("/api/models", json={"path": str(tiny_model_dir)}).json()["id"]


@pytest.mark.parametrize(
    ("peft", "field", "words"),
    [
        ({"target_modules": []}, "peft.target_modules", "at least 1"),
        ({"target_modules": [""]}, "peft.target_modules.0", "at least 1"),
        ({"target_modules": ["c_attn"]}, "peft.target_modules", "no module called 'c_attn'"),
        ({"target_modules": ["q_proj", "query_key_value"]}, "peft.target_modules", "q_proj"),
    ],
)
def test_target_modules_must_exist_in_the_model(client, dataset, tiny, peft, field, words):
    problem = refused(
        client,
        "POST",
        "/api/runs",
        json={"dataset_id": dataset, "base_model": tiny, "peft": peft},
        field=field,
    )
    assert words in problem["message"]


def test_real_module_names_are_accepted(client, dataset, tiny):
    for modules in (["q_proj", "v_proj"], ["self_attn.o_proj", "mlp.down_proj"], ["lm_head"], "all-linear"):
        body = {"dataset_id": dataset, "base_model": tiny, "peft": {"target_modules": modules}}
        assert client.post("/api/runs", json=body).status_code == 201, modules


def test_ia3_modules_are_checked_too(client, dataset, tiny):
    peft = {"target_modules": ["k_proj", "fc2"], "feedforward_modules": ["fc2"]}
    body = {"dataset_id": dataset, "base_model": tiny, "method": "ia3", "peft": peft}
    problem = refused(client, "POST", "/api/runs", json=body, field="peft.target_modules")
    assert "'fc2'" in problem["message"]


def test_max_steps_problems_are_blamed_on_max_steps(client, dataset):
    body = {"dataset_id": dataset, "training": {"max_steps": 9_000_000, "per_device_train_batch_size": 1000}}
    problem = refused(client, "POST", "/api/runs", json=body, field="training.max_steps")
    assert "num_train_epochs" in problem["message"]


# ---- hosts -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "host", ["evil.example", "evil.example:8000", "localhost.evil.example", "127.0.0.1.nip.io", "", "a" * 300]
)
@pytest.mark.parametrize(
    ("method", "url"), [("GET", "/api/datasets"), ("GET", "/"), ("POST", "/api/runs"), ("GET", "/v1/models")]
)
def test_unknown_host_names_get_400_before_any_route(client, host, method, url):
    problem = refused(
        client,
        method,
        url,
        status=400,
        headers={"host": host, "origin": f"http://{host}"},
        json={"dataset_id": 1},
    )
    assert "TUNEBOARD_ALLOWED_HOSTS" in problem["message"]


@pytest.mark.parametrize(
    "host", ["localhost:8000", "127.0.0.1:8000", "[::1]:8000", "192.168.1.20", "LOCALHOST"]
)
def test_loopback_names_and_addresses_are_allowed(client, host):
    assert client.get("/api/datasets", headers={"host": host}).status_code == 200


def test_allowed_hosts_adds_names(tmp_path):
    from fastapi.testclient import TestClient

    from app.config import Settings
    from app.main import create_app
    from app.migrate import upgrade

    settings = Settings(data_dir=tmp_path / "data", allowed_hosts="testserver, tuneboard.lan")
    upgrade(settings)
    with TestClient(create_app(settings)) as client:
        assert client.get("/healthz", headers={"host": "tuneboard.lan:8000"}).status_code == 200
        assert client.get("/healthz", headers={"host": "other.lan"}).status_code == 400
    assert Settings(allowed_hosts="*").host_names() is None
    assert "box.example" in Settings(host="box.example").host_names()
