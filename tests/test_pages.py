"""Server-rendered pages and their htmx fragments."""

from __future__ import annotations

import json

from app.security import CSRF_COOKIE
from tests.conftest import DEMO_DATASET, upload


def browser_headers(client, **extra) -> dict[str, str]:
    if CSRF_COOKIE not in client.cookies:
        client.get("/datasets")
    return {
        "Origin": "http://testserver",
        "X-CSRF-Token": client.cookies[CSRF_COOKIE],
        "HX-Request": "true",
        **extra,
    }


def test_home_is_the_runs_page(client):
    home = client.get("/")
    assert (
        home.status_code == 200
        and "No runs yet" in home.text
        and 'sse-connect="/runs/stream?count=0"' in home.text
    )
    page = client.get("/datasets")
    assert "No datasets yet" in page.text and page.headers["vary"] == "HX-Request"
    assert 'src="/static/vendor/htmx-2.0.11.min.js"' in page.text


def test_page_upload_redirects_to_the_preview(client):
    response = client.post(
        "/datasets/upload",
        files={"file": ("demo.json", DEMO_DATASET.read_bytes())},
        headers=browser_headers(client),
    )
    assert response.status_code == 204
    assert response.headers["hx-redirect"] == "/datasets/1"
    page = client.get("/datasets/1")
    assert "Alpaca (JSON array)" in page.text
    assert "What is the capital of Quillmere?" in page.text
    assert 'id="split-validation">0<' in page.text and "Every row trains by default" in page.text
    assert 'href="/runs/new?dataset=1">Train on this dataset' in page.text


def test_page_upload_shows_the_problem_list(client, settings):
    bad = json.dumps(
        [{"instruction": "ok", "output": "fine"}, {"instruction": "q", "output": ""}, {"output": "x"}]
    )
    response = client.post(
        "/datasets/upload", files={"file": ("broken.json", bad.encode())}, headers=browser_headers(client)
    )
    assert response.status_code == 422
    assert "<html" not in response.text  # just the fragment
    assert "The file has 2 problems." in response.text
    assert "<td>2</td><td><code>output</code></td><td>&#39;output&#39; is empty.</td>" in response.text
    assert "<td>3</td><td><code>instruction</code></td>" in response.text
    assert list(settings.datasets_dir.iterdir()) == []


def test_dataset_text_is_escaped_everywhere(client):
    evil = '<script>alert("x")</script><img src=x onerror=alert(1)>'
    dataset_id = upload(
        client, f"{evil}.json", json.dumps([{"instruction": evil, "output": evil}]), name=evil
    ).json()["id"]
    for path in ("/datasets", f"/datasets/{dataset_id}"):
        html = client.get(path).text
        assert "<script>alert" not in html and "<img src=x" not in html
        assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in html


def test_statistics_fragment_for_a_ready_model(client, tiny_model_dir):
    model_id = client.post("/api/models", json={"path": str(tiny_model_dir), "name": "Tiny"}).json()["id"]
    dataset_id = upload(client, "demo.json", DEMO_DATASET.read_bytes()).json()["id"]
    full = client.get(f"/datasets/{dataset_id}")
    assert 'id="stat-p50"' in full.text  # the only ready model is chosen by default
    fragment = client.get(
        f"/datasets/{dataset_id}?model={model_id}&max_length=20&prompt_format=instruction",
        headers={"HX-Request": "true", "HX-Target": "stats"},
    )
    assert "<html" not in fragment.text and "Token statistics" not in fragment.text
    assert 'id="stat-truncated" class="warn">40 rows' in fragment.text
    assert "would be cut short" in fragment.text


def test_statistics_wait_for_a_model_being_prepared(client):
    dataset_id = upload(client, "d.json", '[{"instruction": "q", "output": "a"}]').json()["id"]
    page = client.get(f"/datasets/{dataset_id}")
    assert "being prepared by the worker" in page.text
    assert 'hx-trigger="every 3s"' in page.text


def test_missing_pages_render_a_readable_404(client):
    response = client.get("/datasets/41", headers={"Accept": "text/html"})
    assert response.status_code == 404
    assert "There is no dataset 41." in response.text and "<html" in response.text


def test_delete_from_the_page(client, settings):
    dataset_id = upload(client, "d.json", '[{"instruction": "q", "output": "a"}]').json()["id"]
    response = client.delete(f"/datasets/{dataset_id}", headers=browser_headers(client))
    assert response.headers["hx-redirect"] == "/datasets"
    assert client.get("/api/datasets").json() == []


def test_register_model_from_the_page(client, tiny_model_dir):
    bad = client.post("/models", data={"path": "/nowhere"}, headers=browser_headers(client))
    assert bad.status_code == 422 and "/nowhere does not exist on this machine." in bad.text
    good = client.post(
        "/models", data={"path": str(tiny_model_dir), "name": "Tiny <b>"}, headers=browser_headers(client)
    )
    assert good.status_code == 200 and "Tiny &lt;b&gt;" in good.text and "badge-ready" in good.text


def test_upload_from_the_new_run_page_returns_there_with_the_dataset_chosen(client):
    response = client.post(
        "/datasets/upload?then=new-run",
        files={"file": ("demo.json", DEMO_DATASET.read_bytes())},
        headers=browser_headers(client),
    )
    assert response.headers["hx-redirect"] == "/runs/new?dataset=1"
    page = client.get("/runs/new?dataset=1")
    assert '<option value="1" selected>demo (40 rows)</option>' in page.text


def test_playground_says_when_the_generation_host_is_down(tmp_path, tiny_model_dir):
    from fastapi.testclient import TestClient

    from app.config import Settings
    from app.main import create_app
    from app.migrate import upgrade
    from app.processes import free_port

    settings = Settings(data_dir=tmp_path / "data", generation_url=f"http://127.0.0.1:{free_port()}")
    upgrade(settings)
    with TestClient(create_app(settings)) as client:
        client.post("/api/models", json={"path": str(tiny_model_dir), "name": "Tiny"})
        page = client.get("/playground", params={"run": 7})
        assert 'id="host-down"' in page.text and "make run" in page.text
        assert "There is no run 7." in page.text
        assert client.get("/api/playground/status").status_code == 503
        body = {"panes": [{"target": "local-1", "messages": [{"role": "user", "content": "hi"}]}]}
        with client.stream("POST", "/api/playground/chat", json=body) as response:
            text = "".join(response.iter_text())
        assert "event: error" in text and "The generation host is not running" in text


def test_errors_answer_each_caller_in_its_own_shape(client):
    """One rule (app.errors.error_kind) for route errors: a page for a browser, an alert fragment for htmx
    (app.js shows its sentence), JSON for the API and for clients asking for JSON, OpenAI's shape on /v1."""
    page = client.get("/runs/999", headers={"Accept": "text/html,application/xhtml+xml"})
    assert page.status_code == 404 and "<!doctype html>" in page.text and "There is no run 999." in page.text
    fragment = client.get("/runs/999", headers={"HX-Request": "true"})
    assert fragment.status_code == 404 and fragment.text.startswith('<div class="alert alert-error"')
    assert "There is no run 999." in fragment.text
    asked = client.get("/runs/999", headers={"Accept": "application/json"})
    assert asked.json()["detail"][0]["message"] == "There is no run 999."
    api = client.get("/api/runs/999", headers={"Accept": "text/html"})
    assert api.json()["detail"][0]["message"] == "There is no run 999."
    invalid = client.get("/api/runs/abc")
    assert invalid.status_code == 422 and invalid.json()["detail"][0]["field"] == "run_id"
    invalid_page = client.get("/runs/abc", headers={"HX-Request": "true"})
    assert invalid_page.status_code == 422 and "run_id:" in invalid_page.text
    openai = client.post("/v1/chat/completions", json={"messages": []})
    assert openai.status_code == 422 and openai.json()["error"]["param"] == "model"


def test_the_new_run_form_sets_the_held_out_split(client):
    """The form's evaluation fields reach the run: 0 held out trains every row, 25% holds out ten of 40."""
    dataset = upload(client, "demo.json", DEMO_DATASET.read_bytes()).json()["id"]
    page = client.get("/runs/new").text
    assert 'name="evaluation.held_out_fraction"' in page and 'name="evaluation.scored_train_rows"' in page
    for fraction, held_out in (("0", 0), ("0.25", 10)):
        form = {"dataset_id": str(dataset), "method": "lora", "evaluation.held_out_fraction": fraction}
        response = client.post("/runs", data=form, headers=browser_headers(client))
        assert response.status_code == 204, response.text
        run_id = int(response.headers["HX-Redirect"].rsplit("/", 1)[1])
        config = client.get(f"/api/runs/{run_id}").json()["config"]
        assert len(config["validation_rows"]) == held_out and config["train_rows"] == 40 - held_out


def test_the_new_run_page_picks_the_objective_from_the_datasets_layout(client, settings):
    """One answer per row: supervised fine-tuning, and why not DPO; pairs of answers: DPO by default, KTO or
    SFT on the chosen answers, from a new adapter or a finished run's; the form reaches the run's config."""
    sft = upload(client, "demo.json", DEMO_DATASET.read_bytes()).json()["id"]
    pairs = upload(
        client, "pairs.jsonl", json.dumps({"prompt": "Hi?", "chosen": "Hello. — Q", "rejected": "Hello."})
    ).json()["id"]
    headers = {"HX-Request": "true", "HX-Target": "objective-fields"}
    single = client.get(f"/runs/new?dataset_id={sft}", headers=headers).text
    assert single.strip().startswith('<fieldset id="objective-fields" data-objective="sft">')
    assert "has one answer per row" in single and 'value="dpo"' not in single
    assert 'name="start_from_run"' not in single
    offered = client.get(f"/runs/new?dataset_id={pairs}", headers=headers).text
    assert 'data-objective="dpo"' in offered and "holds pairs of answers" in offered
    assert 'value="kto"' in offered and "on the chosen answers" in offered
    assert 'name="preference.beta"' in offered and 'name="preference.loss_type"' in offered
    kto = client.get(f"/runs/new?dataset_id={pairs}&objective=kto", headers=headers).text
    assert 'data-objective="kto"' in kto and 'name="preference.loss_type"' not in kto  # DPO's alone

    # A finished run to start from (its folder holds an adapter, as a worker leaves it).
    first = client.post(
        "/runs", data={"dataset_id": str(sft), "method": "ia3"}, headers=browser_headers(client)
    )
    run_id = int(first.headers["HX-Redirect"].rsplit("/", 1)[1])
    adapter = settings.run_folder(run_id).adapter
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    from app.db import Database
    from app.runs import state

    db = Database(settings.sqlalchemy_url)
    with db.write_session() as session:
        assert state.claim_next(session=session, worker_id="w1") is not None
        state.finish(session=session, run_id=run_id, worker_id="w1", status="succeeded", error=None)
    db.dispose()
    assert f'<option value="{run_id}"' in client.get(f"/runs/new?dataset_id={pairs}", headers=headers).text
    chosen = client.get(f"/runs/new?dataset_id={pairs}&start_from_run={run_id}", headers=headers).text
    assert f"keeps training run #{run_id}'s IA³ adapter" in chosen and "do not apply" in chosen
    fresh = client.get(f"/runs/new?dataset_id={pairs}&start_from_run=", headers=headers)
    assert fresh.status_code == 200 and 'id="start-note"' not in fresh.text
    form = {
        "dataset_id": str(pairs),
        "objective": "dpo",
        "start_from_run": str(run_id),
        "method": "lora",  # the form's own fields: the starting run's adapter decides these
        "peft.r": "16",
        "peft.use_dora": "on",
        "preference.beta": "0.2",
        "preference.loss_type": "ipo",
    }
    response = client.post("/runs", data=form, headers=browser_headers(client))
    assert response.status_code == 204, response.text
    config = client.get(f"/api/runs/{int(response.headers['HX-Redirect'].rsplit('/', 1)[1])}").json()[
        "config"
    ]
    assert (config["objective"], config["method"], config["start_run_id"]) == ("dpo", "ia3", run_id)
    assert config["preference"] == {"beta": 0.2, "loss_type": "ipo"}
    # SFT ignores the preference fields a page may still hold.
    response = client.post(
        "/runs", data={**form, "objective": "sft", "start_from_run": ""}, headers=browser_headers(client)
    )
    assert response.status_code == 204, response.text
