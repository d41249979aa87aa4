"""Publishing: a run's adapter and a finished GGUF export pushed by a worker to a repository on a hub, through
the real `huggingface_hub` client against the local stand-in (tests/hub_standin.py), with a generated model
card (dataset, settings, the evaluation against the base model, how to load it); private unless asked
otherwise; the write token sent to that hub only and shown nowhere; every bad request a sentence."""

from __future__ import annotations

import io
import json
import threading

import pytest

from app import exports, hub
from app.models import Export, ExportStatus, Run
from app.processes import free_port
from app.runs import evaluation
from tests.conftest import fast_settings
from tests.hub_standin import Repo, running_hub
from tests.test_exports import build_finished_run
from tests.test_hub import SHA, TOKEN, pointing_at
from worker.main import work_once

WRITE = "hf_standinwrite0123456789"


@pytest.fixture
def settings(tmp_path, database):
    """A worker that pushes at once (no model to convert first, no speed trial)."""
    return fast_settings(tmp_path, database)


@pytest.fixture
def finished_run(client, settings, db, tiny_model_dir) -> int:
    """A finished run of the tiny model, built from files."""
    return build_finished_run(client, settings, db, tiny_model_dir)


def scored(db, run_id: int) -> None:
    """Answers scored before training (step 0) and at step 6, as the training process records them."""
    with db.write_session() as session:
        for step, chrf, exact in ((0, 21.5, 0.0), (6, 88.25, 50.0)):
            for split in ("validation", "train"):
                answers = [
                    {"row": row, "answer": "…", "chrf": chrf, "rouge_l": 0.5, "exact": exact, "opening": 50.0}
                    for row in range(2)
                ]
                evaluation.record_answers(
                    session=session, run_id=run_id, step=step, split=split, answers=answers, seconds=1.0
                )


def gguf_export(settings, db, run_id: int) -> int:
    """A finished Q8_0 export of the run, built from files (its making is tests/test_exports.py's)."""
    with db.write_session() as session:
        export = Export(run_id=run_id, step=0, format="gguf-q8_0", estimated_bytes=4096, status="queued")
        session.add(export)
        session.commit()
        folder = exports.export_dir(settings, export)
        folder.mkdir(parents=True)
        exports.export_file(settings, export).write_bytes(b"GGUF" + bytes(range(256)) * 16)
        exports.modelfile_path(settings, export).write_text("FROM ./model.gguf\n", encoding="utf-8")
        export.status, export.size_bytes, export.progress = ExportStatus.SUCCEEDED, 4100, 1.0
        session.commit()
        return export.id


def push_all(settings, db) -> None:
    """The worker loop's passes until no publication waits (each pushes one, in a child process)."""
    for _ in range(5):
        if not work_once(settings, db, me="pusher:1", stop=threading.Event()):
            return


@pytest.mark.trains
def test_an_adapter_and_a_gguf_export_are_published_with_their_model_card(
    client,
    settings,
    db,
    finished_run,
    monkeypatch,
):
    scored(db, finished_run)
    export_id = gguf_export(settings, db, finished_run)
    with db.write_session() as session:  # as if its base model had been fetched by name from the Hub
        session.get(Run, finished_run).base_model = "tiny/llama"
        session.commit()
    with running_hub({}, write_tokens={WRITE}) as standin:
        pointing_at(monkeypatch, standin.url)
        assert client.put("/api/models/hub-token", json={"token": WRITE}).status_code == 204
        adapter = client.post(
            f"/api/runs/{finished_run}/publications", json={"repo_id": "standin-user/tiny-lora"}
        )
        assert adapter.status_code == 202, adapter.text
        queued = adapter.json()
        assert (queued["status"], queued["private"], queued["what"]) == ("queued", True, "adapter")
        gguf = client.post(
            f"/api/runs/{finished_run}/publications",
            json={"repo_id": "standin-user/tiny-gguf", "export_id": export_id, "private": False},
        )
        assert gguf.status_code == 202, gguf.text
        push_all(settings, db)

        done = {p["repo_id"]: p for p in client.get(f"/api/runs/{finished_run}/publications").json()}
        for publication in done.values():
            assert publication["status"] == "succeeded", publication["error"]
            assert publication["bytes_total"] > 0
            assert publication["url"].startswith(f"{standin.url}/{publication['repo_id']}/commit/")
        assert standin.created == {"standin-user/tiny-lora": True, "standin-user/tiny-gguf": False}

        # the adapter's files as they are on disk, and the card in place of PEFT's template
        adapter_dir = settings.run_folder(finished_run).adapter
        pushed = standin.pushed["standin-user/tiny-lora"]
        assert set(pushed) == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
        assert pushed["adapter_model.safetensors"] == (adapter_dir / "adapter_model.safetensors").read_bytes()
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] != "tiny/llama"  # this server's path to it
        assert json.loads(pushed["adapter_config.json"]) == config | {"base_model_name_or_path": "tiny/llama"}
        card = pushed["README.md"].decode()
        assert card == done["standin-user/tiny-lora"]["card"]
        assert card.startswith("---\nbase_model: tiny/llama\n") and "library_name: peft" in card
        assert "- tuneboard" in card and f"from [tiny/llama]({standin.url}/tiny/llama)" in card
        assert "on the dataset *demo* (40 rows, alpaca format)" in card
        assert "| r | 16 |" in card and "| learning rate | 0.001 |" in card
        assert "| quantization | none |" in card
        assert "## Evaluation against the base model" in card
        assert (
            "| 0 (base model) | 21.5 | 0% | 21.5 | 0% |" in card and "| 6 | 88.2 | 50% | 88.2 | 50% |" in card
        )
        assert 'AutoPeftModelForCausalLM.from_pretrained("standin-user/tiny-lora")' in card

        # the GGUF export with its Modelfile
        pushed = standin.pushed["standin-user/tiny-gguf"]
        with db.session() as session:
            export = session.get(Export, export_id)
            assert pushed[exports.file_name(export)] == exports.export_file(settings, export).read_bytes()
        assert pushed["Modelfile"] == b"FROM ./model.gguf\n"
        gguf_card = pushed["README.md"].decode()
        assert "- gguf" in gguf_card and "ollama create tiny-gguf -f Modelfile" in gguf_card

        # the run page shows both, with links to their commits
        page = client.get(f"/runs/{finished_run}").text
        assert page.count('class="publication"') == 2 and "the commit on" in page

        # the write token went to this hub only, in every push request, and is shown nowhere
        pushes = [r for r in standin.requests if r[0] == "POST"]
        assert pushes and all(auth == f"Bearer {WRITE}" for _, _, auth in pushes)
        shown = [page, json.dumps(done), client.get(f"/api/publications/{queued['id']}").text]
        shown += [(settings.run_folder(finished_run).path / "train.log").read_text(errors="replace")
                  if (settings.run_folder(finished_run).path / "train.log").exists() else ""]  # fmt: skip
        assert not any(WRITE in text for text in shown)


@pytest.mark.trains
def test_bad_pushes_get_a_sentence(client, settings, db, finished_run, monkeypatch, tiny_model_dir):
    def refused(body: dict, status: int = 422) -> str:
        answer = client.post(f"/api/runs/{finished_run}/publications", json=body)
        assert answer.status_code == status, answer.text
        return answer.json()["detail"][0]["message"]

    readable = {"tiny/llama": Repo(folder=tiny_model_dir, sha=SHA, token=TOKEN)}
    with running_hub(readable, write_tokens={WRITE}) as standin:
        pointing_at(monkeypatch, standin.url)
        assert "needs a Hugging Face token with write access" in refused({"repo_id": "me/x"})
        assert client.put("/api/models/hub-token", json={"token": TOKEN}).status_code == 204
        assert "names no owner" in refused({"repo_id": "just-a-name"})
        assert "is not a repository id" in refused({"repo_id": "me/../../etc"})
        assert "Name the repository" in refused({"repo_id": "  "})
        assert f"Run {finished_run} has no export 999" in refused({"repo_id": "me/x", "export_id": 999})
        # the page says the same where the form is
        page = client.post(
            f"/runs/{finished_run}/publications", data={"repo_id": "just-a-name", "private": "on"}
        )
        assert 'id="publish-error"' in page.text and "names no owner" in page.text

        # a token that may read but not write: the push fails with its sentence
        queued = client.post(f"/api/runs/{finished_run}/publications", json={"repo_id": "me/read-only"})
        assert queued.status_code == 202
        push_all(settings, db)
        failed = client.get(f"/api/publications/{queued.json()['id']}").json()
        assert failed["status"] == "failed" and "refused to let the saved token write" in failed["error"]
        assert "write access" in failed["error"]

        # a repository that exists already is not pushed into (nothing overwritten, nothing made public)
        hub._write_tokens(settings, {hub.endpoint(): WRITE})
        first = client.post(f"/api/runs/{finished_run}/publications", json={"repo_id": "me/twice"})
        again = client.post(f"/api/runs/{finished_run}/publications", json={"repo_id": "me/twice"})
        push_all(settings, db)
        assert client.get(f"/api/publications/{first.json()['id']}").json()["status"] == "succeeded"
        refused = client.get(f"/api/publications/{again.json()['id']}").json()
        assert refused["status"] == "failed" and "exists already" in refused["error"], refused

    # a hub that does not answer
    pointing_at(monkeypatch, f"http://127.0.0.1:{free_port()}")
    hub._write_tokens(settings, {hub.endpoint(): WRITE})  # saved while it answered
    queued = client.post(f"/api/runs/{finished_run}/publications", json={"repo_id": "me/offline"})
    assert queued.status_code == 202, queued.text
    push_all(settings, db)
    failed = client.get(f"/api/publications/{queued.json()['id']}").json()
    assert failed["status"] == "failed" and "cannot be reached from this server" in failed["error"]


@pytest.fixture
def unfinished_run(client, tiny_model_dir):
    from tests.conftest import DEMO_DATASET, upload

    model = client.post("/api/models", json={"path": str(tiny_model_dir)}).json()["id"]
    dataset = upload(client, "demo.json", DEMO_DATASET.read_bytes()).json()["id"]
    return client.post("/api/runs", json={"dataset_id": dataset, "base_model": model}).json()["id"]


def test_a_run_without_its_adapter_has_nothing_to_publish(client, unfinished_run):
    answer = client.post(f"/api/runs/{unfinished_run}/publications", json={"repo_id": "me/x"})
    assert answer.status_code == 409, answer.text
    assert "has no adapter to publish yet" in answer.json()["detail"][0]["message"]
    assert "Once this run has its adapter, publish it" in client.get(f"/runs/{unfinished_run}").text


def test_the_bytes_sent_count_each_file_once(tmp_path):
    """Hashing reads a file before counting starts; a second read of the card and a rewound retry do not
    count again; the count never passes the total."""
    from worker.publish import Counted, Sent

    reported: list[int] = []
    sent = Sent(reported.append, total=150)  # type: ignore[arg-type]  # any callable of the count
    files = [Counted(io.BytesIO(b"a" * 100), sent), Counted(io.BytesIO(b"b" * 50), sent)]
    files[0].read()  # the client hashes the file before it sends anything
    files[0].seek(0)
    assert reported == []
    sent.counting = True
    assert files[0].read(60) == b"a" * 60 and reported == [60]
    files[0].seek(0)  # a failed try, sent again from the start
    files[0].read(60)
    assert reported == [60]
    files[0].read()
    files[1].read()
    files[1].seek(0)
    files[1].read()  # read twice (the card: its metadata checked, then sent)
    assert reported == [60, 100, 150]


def test_a_cancel_stops_a_running_push_before_anything_is_committed(
    client, settings, db, finished_run, monkeypatch
):
    from app import jobs, publishing
    from app.models import Publication
    from worker.child import CANCELLED
    from worker.publish import main

    with running_hub({}, write_tokens={WRITE}) as standin:
        pointing_at(monkeypatch, standin.url)
        hub._write_tokens(settings, {hub.endpoint(): WRITE})
        queued = client.post(f"/api/runs/{finished_run}/publications", json={"repo_id": "me/stopped"}).json()
        with db.write_session() as session:  # a worker took it; then the user pressed Cancel
            assert jobs.claim(session=session, kind=jobs.PUBLISH, worker_id="w1").id == queued["id"]
            publishing.cancel(session=session, publication=session.get(Publication, queued["id"]))
        monkeypatch.setenv("TUNEBOARD_DATA_DIR", str(settings.data_dir))
        if settings.database_url:
            monkeypatch.setenv("TUNEBOARD_DATABASE_URL", settings.database_url)
        try:
            assert main([str(queued["id"]), "--worker", "w1"]) == CANCELLED
        finally:
            hub.guard_tokens(None)  # the child's guard names its hub: this process's tests go on with theirs
        assert standin.pushed == {} and not any(r[1].endswith("/commit/main") for r in standin.requests)


@pytest.mark.trains
def test_an_adapter_of_a_local_base_model_names_no_path_of_this_server(
    client, settings, db, finished_run, monkeypatch
):
    with running_hub({}, write_tokens={WRITE}) as standin:
        pointing_at(monkeypatch, standin.url)
        hub._write_tokens(settings, {hub.endpoint(): WRITE})
        client.post(f"/api/runs/{finished_run}/publications", json={"repo_id": "me/local"})
        push_all(settings, db)
        pushed = standin.pushed["me/local"]
    assert json.loads(pushed["adapter_config.json"])["base_model_name_or_path"] is None
    card = pushed["README.md"].decode()
    assert "base_model:" not in card and "is not on the Hub: load it from where it is" in card
    assert str(settings.data_dir) not in card
