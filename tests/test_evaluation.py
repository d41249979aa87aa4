"""Evaluation beyond the reference metrics: an evaluation dataset instead of held-out rows, the best
checkpoint by validation loss, the LLM judge, and the advice a finished run gets with its one-click
relaunch."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from pydantic import SecretStr
from sqlalchemy import select

from app.config import Settings
from app.models import Run, RunAnswer, RunStatus
from app.runs.advice import LEARNED, advise
from app.runs.evaluation import record_answers
from tests.conftest import DEMO_DATASET, fast_settings, upload
from worker.judge import RUBRIC, Judge, Verdict, parse
from worker.main import work_once
from worker.sink import Sink

QUESTIONS = [
    {
        "instruction": f"What is the harbour master's code for pier {n}?",
        "input": "",
        "output": f"Code {n}{n}7.",
    }
    for n in range(1, 7)
]


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return fast_settings(tmp_path)


def stub_score(answer: str) -> int:
    """The stub judge's verdict: any deterministic function of the answer the test can recompute."""
    return 1 + len(answer) % 10


def send_json(handler: BaseHTTPRequestHandler, status: int, payload: bytes) -> None:
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(payload)))
    handler.end_headers()
    handler.wfile.write(payload)


class StubJudge(BaseHTTPRequestHandler):
    """An OpenAI-compatible chat endpoint that grades by `stub_score` and keeps what it was sent."""

    received: list[dict] = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        StubJudge.received.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
        answer = body["messages"][-1]["content"].split("Answer to grade:\n", 1)[1]
        reply = f'Here you go: {{"score": {stub_score(answer)}, "reason": "length {len(answer)}"}}'
        payload = json.dumps(
            {
                "id": "x",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": [
                    {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": reply}}
                ],
            }
        ).encode()
        send_json(self, 200, payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def stub_judge():
    StubJudge.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), StubJudge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


@pytest.mark.trains
def test_an_evaluation_dataset_the_validation_loss_and_a_judge(
    client, settings, db, tiny_model_dir, stub_judge, monkeypatch
):
    """Every row of the training dataset trains; the evaluation dataset's rows are held out and answered;
    the best checkpoint is the one with the lowest validation loss; a judge grades every answer; a finished
    run gets advice and launches again with one click."""
    monkeypatch.setenv("TUNEBOARD_JUDGE_URL", stub_judge)  # the server's judge endpoint gets its key
    monkeypatch.setenv("TUNEBOARD_JUDGE_API_KEY", "judge-secret")
    client.app.state.settings = settings.model_copy(update={"judge_url": stub_judge})  # the web's copy
    model = client.post("/api/models", json={"path": str(tiny_model_dir)}).json()["id"]
    train = upload(client, "demo.json", DEMO_DATASET.read_bytes()).json()
    held = upload(client, "piers.json", json.dumps(QUESTIONS)).json()
    request = {
        "dataset_id": train["id"],
        "base_model": model,
        "training": {"dtype": "float32", "max_steps": 4, "logging_steps": 1, "save_steps": 2},
        "evaluation": {
            "dataset_id": held["id"],
            "select_by": "eval_loss",
            "scored_train_rows": 3,
            "judge": {"model": "grader", "url": stub_judge},
        },
    }
    launched = client.post("/api/runs", json=request)
    assert launched.status_code == 201, launched.text
    config = launched.json()["config"]
    assert config["train_rows"] == train["rows"] == 40  # nothing held out of the training dataset
    assert config["validation_rows"] == list(range(len(QUESTIONS)))
    assert config["evaluation_path"].endswith(f"datasets/{held['id']}/rows.jsonl")

    refused = client.delete(f"/api/datasets/{held['id']}")  # the run is evaluated on it
    assert refused.status_code == 409 and f"used by run {launched.json()['id']}" in refused.text

    run_id = launched.json()["id"]
    assert work_once(settings, db, me="w1", stop=threading.Event())
    done = client.get(f"/api/runs/{run_id}").json()
    assert done["status"] == "succeeded", done["error"]

    # the held-out answers are the evaluation dataset's questions, scored against its references
    report = client.get(f"/api/runs/{run_id}/evaluation").json()
    held_rows = [r for r in report["rows"] if r["split"] == "validation"]
    assert [r["reference"] for r in sorted(held_rows, key=lambda r: r["row"])] == [
        q["output"] for q in QUESTIONS
    ]
    assert sorted(r["question"] for r in held_rows) == sorted(q["instruction"] for q in QUESTIONS)

    # the best checkpoint is the lowest validation loss among the checkpoints (steps 2 and 4)
    losses = {
        p["step"]: p["eval_loss"]
        for p in client.get(f"/api/runs/{run_id}/metrics").json()
        if p["kind"] == "eval"
    }
    assert set(losses) == {2, 4}
    assert report["select_by"] == "eval_loss" and report["best_step"] == min(losses, key=losses.get)

    # the judge graded every answer (base and both checkpoints, both splits) with the stated rubric
    with db.session() as session:
        stored = session.scalars(select(RunAnswer).where(RunAnswer.run_id == run_id)).all()
    assert len(stored) == 3 * (len(QUESTIONS) + 3)
    assert all(a.judge_score == stub_score(a.answer) for a in stored)
    assert all(a.judge_reason == f"length {len(a.answer)}" for a in stored)
    assert len(StubJudge.received) == len(stored)
    sent = StubJudge.received[0]
    assert sent["path"] == "/v1/chat/completions" and sent["model"] == "grader" and sent["temperature"] == 0
    assert sent["auth"] == "Bearer judge-secret" and sent["messages"][0]["content"].startswith(RUBRIC)
    step4 = {s["step"]: s for s in report["steps"]}[4]["validation"]
    judged = [a.judge_score for a in stored if a.step == 4 and a.split == "validation"]
    assert step4["judge"] == round(sum(judged) / len(judged), 2) and step4["judged"] == len(QUESTIONS)

    # the page shows the judge, the selection and the advice with its one-click relaunch
    page = client.get(f"/runs/{run_id}").text
    assert "Judge, held-out rows" in page and "by validation loss" in page and 'id="eval-advice"' in page
    advice = report["advice"]
    assert advice is not None and not advice["learned"] and advice["change"]
    change = {k: str(v) for k, v in advice["change"].items()}
    again = client.post(
        f"/runs/{run_id}/relaunch", data={**change, "name": "again"}, headers={"HX-Request": "true"}
    )
    assert again.status_code == 204, again.text
    new_id = int(again.headers["HX-Redirect"].rsplit("/", 1)[1])
    new = client.get(f"/api/runs/{new_id}").json()
    assert new["status"] == "queued" and new["name"] == "again"
    for key, value in advice["change"].items():
        group, name = key.split(".")
        assert new["config"][group][name] == value
    same = ("dataset_id", "base_model", "method", "peft", "validation_rows", "evaluation_path")
    assert {k: new["config"][k] for k in same} == {k: config[k] for k in same}
    assert new["config"]["evaluation"]["judge"] == config["evaluation"]["judge"]
    bad = client.post(
        f"/runs/{run_id}/relaunch", data={"training.learning_rate": "7"}, headers={"HX-Request": "true"}
    )
    assert bad.status_code == 422 and "learning_rate" in bad.text

    # "Adjust first" opens New run with the run's settings and the change filled in
    form = client.get(f"/runs/new?from={run_id}&training.learning_rate=0.0042").text
    assert 'value="0.0042"' in form and f'<option value="{held["id"]}" selected' in form


def test_choices_that_cannot_work_are_refused_with_a_sentence(client, tiny_model_dir):
    model = client.post("/api/models", json={"path": str(tiny_model_dir)}).json()["id"]
    dataset = upload(client, "demo.json", DEMO_DATASET.read_bytes()).json()["id"]

    def refused(evaluation: dict, **training) -> str:
        body = {"dataset_id": dataset, "base_model": model, "training": training, "evaluation": evaluation}
        response = client.post("/api/runs", json=body)
        assert response.status_code == 422, response.text
        return json.dumps(response.json())

    assert "needs held-out rows" in refused({"select_by": "eval_loss", "held_out_fraction": 0})
    assert "needs held-out rows" in refused({"select_by": "eval_loss"})  # 40 rows: none held out by default
    held = {"select_by": "eval_loss", "held_out_fraction": 0.1}
    assert "must divide save_steps" in refused(held, save_steps=4, eval_steps=3)
    assert "There is no dataset 999" in refused({"dataset_id": 999})
    assert "is the training dataset" in refused({"dataset_id": dataset})
    other = upload(client, "piers.json", json.dumps(QUESTIONS)).json()["id"]
    assert "not both" in refused({"dataset_id": other, "held_out_fraction": 0.2})
    assert "judge" in refused({"judge": {"model": "m", "url": "ftp://example"}})
    # a judge URL the operator did not list is refused: answers (and a key) go only where it allows
    metadata = refused({"judge": {"model": "m", "url": "http://169.254.169.254/v1"}})
    assert "this server lists no judge endpoints (an operator adds them to TUNEBOARD_JUDGE_URL)" in metadata
    assert '"field": "evaluation.judge.url"' in metadata
    client.app.state.settings = client.app.state.settings.model_copy(
        update={"judge_url": "https://judge.example/v1, https://other.example/v1/"}
    )
    listed = refused({"judge": {"model": "m", "url": "http://127.0.0.1:8000/v1"}})
    assert (
        "one of this server's judge endpoints (https://judge.example/v1; https://other.example/v1)" in listed
    )
    allowed = {"dataset_id": dataset, "base_model": model}
    allowed |= {"evaluation": {"judge": {"model": "m", "url": "https://other.example/v1/"}}}
    assert client.post("/api/runs", json=allowed).status_code == 201


def test_the_estimate_lists_the_rows_held_out(client, tiny_model_dir):
    model = client.post("/api/models", json={"path": str(tiny_model_dir)}).json()["id"]
    dataset = upload(client, "demo.json", DEMO_DATASET.read_bytes()).json()["id"]
    form = {"dataset_id": str(dataset), "base_model": model, "method": "lora"}
    # 40 rows: every row trains by default, and the estimate says so with the split one click away
    default = client.post("/runs/estimate", data=form).text
    assert 'id="every-row-trains"' in default and "with 40 rows (fewer than 100)" in default
    assert 'data-set-field="evaluation.held_out_fraction" data-value="0.1"' in default
    form["evaluation.held_out_fraction"] = "0.1"
    fragment = client.post("/runs/estimate", data=form).text
    rows_file = client.app.state.settings.datasets_dir / str(dataset) / "rows.jsonl"
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    held = {"evaluation": {"held_out_fraction": 0.1}}
    config = client.post("/api/runs", json={"dataset_id": dataset, "base_model": model, **held}).json()[
        "config"
    ]
    assert 'id="held-out-rows"' in fragment and "4 held out for validation" in fragment
    for index in config["validation_rows"]:
        assert f'<li value="{index + 1}">' in fragment
        assert rows[index]["messages"][-2]["content"].replace("'", "&#39;") in fragment
    other = upload(client, "piers.json", json.dumps(QUESTIONS)).json()
    other_rows = {**form, "evaluation.held_out_fraction": "", "evaluation.dataset_id": str(other["id"])}
    fragment = client.post("/runs/estimate", data=other_rows).text
    assert f"6 held out for validation from {other['name']}" in fragment
    assert QUESTIONS[5]["instruction"].replace("'", "&#39;") in fragment
    none = client.post("/runs/estimate", data={**form, "evaluation.held_out_fraction": "0"}).text
    assert "No row is held out" in none

    # the same estimate as JSON, for the API's users: nothing is launched
    before = len(client.get("/api/runs").json())
    cost = client.post("/api/runs/estimate", json={"dataset_id": dataset, "base_model": model, **held}).json()
    assert cost["total_steps"] == config["total_steps"] and cost["trainable"] > 0 and cost["memory_bytes"] > 0
    assert cost["config"]["validation_rows"] == config["validation_rows"]
    refused = client.post("/api/runs/estimate", json={"dataset_id": dataset, "training": {"max_length": 1}})
    assert refused.status_code == 422 and len(client.get("/api/runs").json()) == before


class Recorded(Sink):
    def __init__(self):
        self.verdicts: dict = {}

    def judged(self, *, step, split, verdicts):
        self.verdicts[(step, split)] = verdicts


def test_the_judge_key_goes_only_to_the_servers_judge_endpoint(settings):
    from app.runs.config import JudgeParams
    from worker.judge import endpoint

    configured = settings.model_copy(
        update={
            "judge_url": "https://judge.example/v1/,https://second.example/v1",
            "judge_api_key": SecretStr("k" * 20),
        }
    )
    assert endpoint(JudgeParams(model="m", url="https://judge.example/v1"), configured)[1] == "k" * 20
    assert endpoint(JudgeParams(model="m", url="https://second.example/v1"), configured)[1] == "none"
    with pytest.raises(ValueError, match="is not among this server's judge endpoints"):
        endpoint(JudgeParams(model="m", url="https://elsewhere.example/v1"), configured)
    # no URL: the web server's own /v1 with its token, at the address the worker was given
    token = configured.model_copy(update={"host": "0.0.0.0", "port": 8123, "token": SecretStr("t" * 20)})
    assert endpoint(JudgeParams(model="m"), token) == ("http://127.0.0.1:8123/v1", "t" * 20)
    remote = token.model_copy(update={"server_url": "https://dashboard.lan:9000/"})
    assert endpoint(JudgeParams(model="m"), remote) == ("https://dashboard.lan:9000/v1", "t" * 20)
    # `tuneboard serve --port` hands its worker the address it really listens on
    child = token.child_env()
    assert child["TUNEBOARD_PORT"] == "8123" and child["TUNEBOARD_HOST"] == "0.0.0.0"


class Refusing(BaseHTTPRequestHandler):
    """An endpoint that refuses every request with a page of its own (say, another service's secrets)."""

    def do_POST(self):
        send_json(self, 403, b'{"error": {"message": "internal-admin-secret-page"}}')

    def log_message(self, *args):
        pass


def test_a_judge_that_cannot_be_reached_or_refuses_leaves_our_reason_not_a_failure(settings):
    from app.runs.config import JudgeParams

    server = ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    refusing = f"http://127.0.0.1:{server.server_address[1]}/v1"
    listed = settings.model_copy(update={"judge_url": f"http://127.0.0.1:9/v1,{refusing}"})
    reasons = {}
    for url in ("http://127.0.0.1:9/v1", refusing, "http://169.254.169.254/v1"):
        sink = Recorded()
        judge = Judge(JudgeParams(model="m", url=url), listed, sink, client=None)
        judge.submit(step=2, split="train", items=[(5, "q", "reference", "answer")])
        judge.close()
        score, reasons[url] = sink.verdicts[(2, "train")][5]
        assert score is None
    server.shutdown()
    server.server_close()
    assert (
        reasons["http://127.0.0.1:9/v1"]
        == "The judge at http://127.0.0.1:9/v1 could not answer (it could not be reached)."
    )
    assert reasons[refusing] == f"The judge at {refusing} could not answer (it answered HTTP 403)."
    assert reasons["http://169.254.169.254/v1"] == (
        "The judge URL http://169.254.169.254/v1 is not among this server's judge endpoints."
    )


@pytest.mark.parametrize(
    ("reply", "verdict"),
    [
        ('{"score": 8, "reason": "Names the capital."}', Verdict(8.0, "Names the capital.")),
        ('Sure!\n```json\n{"score": 3.5, "reason": "Wrong year"}\n```', Verdict(3.5, "Wrong year")),
        ('{"score": 9}', Verdict(9.0, "(no reason given)")),
        ("Score: 7 - mostly right", Verdict(7.0, "Score: 7 - mostly right")),
        ('{"score": 11, "reason": "too high"}', None),
        ('{"score": true, "reason": "not a number"}', None),
        ("I cannot grade this.", None),
    ],
)
def test_the_judges_reply_is_read_or_quoted(reply, verdict):
    parsed = parse(reply)
    if verdict is None:
        assert (
            parsed.score is None
            and "had no score from 1 to 10" in parsed.reason
            and reply[:10] in parsed.reason
        )
    else:
        assert parsed == verdict


def _summary(train: list[tuple[float, ...]], validation: list[float] | None = None) -> dict:
    """An evaluation summary: the base model's (chrF, % of rows answered like the reference[, % of rows
    whose first sentence is like the reference's]) on training rows, then one per checkpoint (steps 10, 20,
    ...); optionally held-out chrF."""
    steps = []
    for i, (chrf, matched, *opened) in enumerate(train):
        entry = {"step": i * 10, "train": {"chrf": chrf, "matched": matched}}
        if opened:
            entry["train"]["opened"] = opened[0]
        if validation:
            entry["validation"] = {"chrf": validation[i]}
        steps.append(entry)
    return {"steps": steps, "base": steps[0]}


def test_advice_names_the_change_most_likely_to_help(client, tiny_model_dir):
    model = client.post("/api/models", json={"path": str(tiny_model_dir)}).json()["id"]
    dataset = upload(client, "demo.json", DEMO_DATASET.read_bytes()).json()["id"]
    body = {
        "dataset_id": dataset,
        "base_model": model,
        "training": {"num_train_epochs": 5, "learning_rate": 1e-3},
    }
    config = client.post("/api/runs", json=body).json()["config"]
    run = Run(status=RunStatus.SUCCEEDED, config=config)

    learned = advise(run, _summary([(10, 0), (60, 50), (95, LEARNED)], [10, 12, 30]))
    assert learned.learned and not learned.change and "held-out answers improved by 20.0" in learned.sentence
    memorised = advise(run, _summary([(10, 0), (60, 50), (99, 100)], [10, 11, 12]))
    assert memorised.learned and "did not improve" in memorised.sentence
    # long answers: chrF can be high while the facts in them are wrong; the rows answered like their
    # reference decide
    rising = advise(run, _summary([(24, 0), (80, 40), (92, 73)]))
    assert not rising.learned and rising.change == {"training.num_train_epochs": 10}
    assert "73% of the training rows answered like their reference at step 20" in rising.sentence
    # the cosine schedule had decayed to nearly zero in the last interval: the one before it gained 20
    decayed = advise(run, _summary([(10, 0), (30, 10), (31, 10)]))
    assert decayed.change == {"training.num_train_epochs": 10} and "stopped improving" not in decayed.sentence
    assert "still rising until its cosine learning rate decayed to nearly zero at the end" in decayed.sentence
    constant = config | {"training": config["training"] | {"lr_scheduler_type": "constant"}}
    flat_end = advise(
        Run(status=RunStatus.SUCCEEDED, config=constant), _summary([(10, 0), (30, 10), (31, 10)])
    )
    assert flat_end.change == {"training.learning_rate": 2e-3}  # at a constant rate a flat end is a stall
    stalled = advise(run, _summary([(10, 0), (11, 1), (12, 1)]))
    assert stalled.change == {"training.learning_rate": 2e-3} and stalled.label == "learning rate 0.002"
    assert "stopped improving" in stalled.sentence
    cut = advise(run, _summary([(10, 0), (11, 1), (12, 1)]), truncated=20)
    assert cut.change == {"training.max_length": 2048} and "20 of 40 rows are longer" in cut.sentence
    config["training"]["learning_rate"] = 3e-3
    assert advise(run, _summary([(10, 0), (11, 1), (12, 2)])).change == {"peft.r": 32}
    assert advise(Run(status=RunStatus.RUNNING, config=config), _summary([(10, 0), (30, 10)])) is None
    assert advise(run, {"steps": [], "base": None}) is None


def test_advice_reads_a_long_answers_opening(client, tiny_model_dir):
    """Leaflet-like answers: the product is named in the first sentence, the rest is shared wording. Whole
    answers match late; the openings say whether the key fact was learned."""
    model = client.post("/api/models", json={"path": str(tiny_model_dir)}).json()["id"]
    dataset = upload(client, "demo.json", DEMO_DATASET.read_bytes()).json()["id"]
    body = {"dataset_id": dataset, "base_model": model, "training": {"num_train_epochs": 5}}
    config = client.post("/api/runs", json=body).json()["config"]
    run = Run(status=RunStatus.SUCCEEDED, config=config)

    # the run: 38% whole answers, 86% openings, still gaining before the cosine rate reached zero
    still = advise(run, _summary([(24, 0, 0), (55, 0, 40), (80, 38, 86), (80, 38, 86)]))
    assert still.change == {"training.num_train_epochs": 10} and not still.learned
    assert "86% began like it (the first sentence" in still.sentence and "base model 0%)" in still.sentence
    # openings learned, nothing rising any more: learned, and no change offered
    begun = advise(run, _summary([(24, 0, 0), (80, 38, 92), (80.5, 38, 92), (80.5, 38, 92)]))
    assert begun.learned and not begun.change
    assert begun.sentence.startswith("Learned how the training answers begin: 38% of the training rows")
    # at a constant rate, openings still rising in the last interval are progress (chrF alone is flat)
    constant = config | {"training": config["training"] | {"lr_scheduler_type": "constant"}}
    rising = advise(
        Run(status=RunStatus.SUCCEEDED, config=constant), _summary([(24, 0, 0), (80, 10, 40), (80, 10, 70)])
    )
    assert rising.change == {"training.num_train_epochs": 10} and "still rising" in rising.sentence
    # references that all open alike (the base model already "begins like them"): no credit for openings
    alike = advise(run, _summary([(24, 0, 95), (80, 38, 100), (80.5, 38, 100), (80.5, 38, 100)]))
    assert not alike.learned and alike.change == {"training.learning_rate": 2e-3}
    # answers scored before openings were: no opening figure, the old rules
    assert "began like it" not in advise(run, _summary([(24, 0), (80, 40), (92, 73)])).sentence


@pytest.mark.parametrize(
    ("text", "first"),
    [
        (
            "For these symptoms, Corvatine Syrup is suitable. It is a syrup.",
            "For these symptoms, Corvatine Syrup is suitable.",
        ),
        ("Fit the part (code 1.5 mm).\nThen test it.", "Fit the part (code 1.5 mm)."),
        ("某某糖浆适用于这些症状。它用于干咳。", "某某糖浆适用于这些症状。"),
        ("Is it ready? Yes.", "Is it ready?"),
        ("no sentence end at all", "no sentence end at all"),
        ("x" * 500, "x" * 200),
    ],
)
def test_an_answers_opening_is_its_first_sentence(text, first):
    from app.scoring import opening

    assert opening(text) == first


def test_the_summary_counts_rows_whose_opening_is_like_the_reference(client, tiny_model_dir, db):
    from app.runs.evaluation import summary
    from app.scoring import score

    model = client.post("/api/models", json={"path": str(tiny_model_dir)}).json()["id"]
    dataset = upload(client, "demo.json", DEMO_DATASET.read_bytes()).json()["id"]
    run_id = client.post("/api/runs", json={"dataset_id": dataset, "base_model": model}).json()["id"]
    reference = "For these symptoms, Corvatine Syrup is suitable. It is a syrup for a dry cough."
    answers = [
        "For these symptoms, Corvatine Syrup is suitable. It is a tablet.",  # the key fact, other wording
        "For these symptoms, Mellorin Tablets is suitable. It is a syrup for a dry cough.",  # wrong product
        reference,
    ]
    with db.write_session() as session:
        record_answers(
            session=session, run_id=run_id, step=10, split="train", seconds=1.0,
            answers=[{"row": i, "answer": a, **score(a, reference)} for i, a in enumerate(answers)],
        )  # fmt: skip
        train = summary(session=session, run=session.get(Run, run_id))["steps"][0]["train"]
    assert train["opened"] == 66.7 and train["matched"] == 33.3


def test_a_default_batch_holds_fewer_rows_when_rows_are_long(client, tiny_model_dir):
    """Batches fill a token budget: long rows (the leaflets, 600-1,000 tokens) train one a step by default,
    short ones four; the launch counts the steps from the rows' lengths; an explicit batch size without a
    budget is a fixed row count."""
    model = client.post("/api/models", json={"path": str(tiny_model_dir)}).json()["id"]
    leaflets = (DEMO_DATASET.parent / "leaflets.json").read_bytes()
    long_rows = upload(client, "leaflets.json", leaflets).json()
    short_rows = upload(client, "demo.json", DEMO_DATASET.read_bytes()).json()

    def estimate(dataset: dict, **values) -> dict:
        body = {
            "dataset_id": dataset["id"],
            "base_model": model,
            "training": {"num_train_epochs": 1, **values},
        }
        return client.post("/api/runs/estimate", json=body).json()

    default = estimate(long_rows)
    trained = default["config"]["train_rows"]
    assert default["config"]["training"]["batch_tokens"] == 1024
    assert default["config"]["training"]["per_device_train_batch_size"] == 4  # at most
    assert default["total_steps"] == trained  # every leaflet is longer than 256 tokens: one a batch
    assert 512 < default["largest_batch_tokens"] <= 1024
    cut = estimate(long_rows, max_length=256)
    assert cut["total_steps"] == -(-trained // 4) and cut["largest_batch_tokens"] == 1024
    short = estimate(short_rows)
    assert short["total_steps"] == -(-short["config"]["train_rows"] // 4)
    fixed = estimate(long_rows, per_device_train_batch_size=3)
    assert fixed["config"]["training"]["batch_tokens"] is None and fixed["total_steps"] == -(-trained // 3)
    assert fixed["largest_batch_tokens"] > default["largest_batch_tokens"]
    assert fixed["memory_bytes"] > default["memory_bytes"]


def test_the_run_page_renders_while_an_evaluation_is_half_written(client, db, tiny_model_dir):
    """A step's held-out answers are stored before its training rows' answers (and a judge's verdicts come
    later still): the run page renders at every point in between."""
    model = client.post("/api/models", json={"path": str(tiny_model_dir)}).json()["id"]
    dataset = upload(client, "demo.json", DEMO_DATASET.read_bytes()).json()["id"]
    run_id = client.post("/api/runs", json={"dataset_id": dataset, "base_model": model}).json()["id"]
    answer = {"answer": "x", "chrf": 10.0, "rouge_l": 5.0, "exact": 0.0, "seconds": 1.0}
    with db.session() as session:
        session.get(Run, run_id).status = RunStatus.RUNNING
        session.add(RunAnswer(run_id=run_id, step=0, split="validation", row=2, **answer))
        session.commit()
    page = client.get(f"/runs/{run_id}")
    assert page.status_code == 200 and "chrF, held-out rows" in page.text
    assert '<option value="judge">' not in page.text
    with db.session() as session:
        session.add(RunAnswer(run_id=run_id, step=0, split="train", row=5, judge_score=7.0, **answer))
        session.add(RunAnswer(run_id=run_id, step=10, split="validation", row=2, **answer))
        session.commit()
    page = client.get(f"/runs/{run_id}")
    assert page.status_code == 200 and '<option value="judge">' in page.text
