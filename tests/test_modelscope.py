"""Base models fetched by name from ModelScope: its official client (`modelscope_hub`) against the
stand-in's ModelScope origin (tests/hub_standin.py), through MODELSCOPE_ENDPOINT. Looked up before anything
is downloaded; downloaded by a worker into ModelScope's cache (only the files training needs) with its
progress on the row, and listed as a base model; a token kept for ModelScope sent there only; a cancelled
transfer resumed from its partial file; every bad input a sentence."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest

from app import modelscope
from app.processes import free_port
from tests.conftest import fast_settings
from tests.hub_standin import Repo, running_hub
from tests.waiting import wait_until
from worker.main import work_once

SHA = "b" * 40
TOKEN = "ms-standin-0123456789abcdef"


@pytest.fixture
def settings(tmp_path, database):
    return fast_settings(tmp_path, database)


@pytest.fixture
def ms_cache(tmp_path, monkeypatch) -> Path:
    """A ModelScope cache of the test's own, for this process and the worker's children."""
    cache = tmp_path / "modelscope"
    monkeypatch.setenv("MODELSCOPE_CACHE", str(cache))
    monkeypatch.delenv("MODELSCOPE_API_TOKEN", raising=False)
    return cache


@pytest.fixture
def repo_folder(tmp_path, tiny_model_dir) -> Path:
    """The tiny model as a repository keeps it, with a PyTorch copy of its weights and a README that
    Tuneboard leaves behind."""
    folder = tmp_path / "repo"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "pytorch_model.bin").write_bytes(b"\0" * 4096)
    (folder / "README.md").write_text("# tiny\n", encoding="utf-8")
    return folder


def lookup(client, repo_id: str, **extra) -> tuple[int, dict]:
    answer = client.post("/api/models/lookup", json={"repo_id": repo_id, "source": "modelscope", **extra})
    return answer.status_code, answer.json()


def refused(client, repo_id: str, **extra) -> str:
    status, body = lookup(client, repo_id, **extra)
    if status == 200:
        return body["refusal"]
    assert status == 422, body
    return body["detail"][0]["message"]


def test_a_model_is_looked_up_on_modelscope_before_anything_is_downloaded(
    client, repo_folder, ms_cache, monkeypatch, tmp_path
):
    # the client's own token (its login, MODELSCOPE_API_TOKEN) is never sent: only one saved here is
    monkeypatch.setenv("MODELSCOPE_API_TOKEN", "ms-fromtheenvironment")
    with running_hub({"tiny/llama": Repo(folder=repo_folder, sha=SHA)}) as standin:
        monkeypatch.setenv("MODELSCOPE_ENDPOINT", standin.modelscope_url)
        status, info = lookup(client, "tiny/llama")
        assert status == 200, info
        wanted = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
        assert wanted <= set(info["files"]) and not any(n.endswith((".bin", ".md")) for n in info["files"])
        assert info["size_bytes"] == sum((repo_folder / n).stat().st_size for n in info["files"])
        assert (info["source"], info["revision"], info["commit"], info["endpoint"]) == (
            "modelscope",
            "master",
            "master",
            standin.modelscope_url,
        )
        assert (info["license"], info["architecture"], info["refusal"]) == (
            "apache-2.0",
            "LlamaForCausalLM",
            None,
        )
        assert refused(client, "nobody/nothing").startswith(
            "There is no model nobody/nothing on the ModelScope"
        )
        assert "has no revision 'v9'" in refused(client, "tiny/llama", revision="v9")
        assert "names every model owner/name" in refused(client, "llama")
        # nothing was asked of the Hugging Face origin, no token went anywhere, and nothing reached the cache
        assert all(path.startswith(("/openapi/", "/api/v1/")) for _, path, _ in standin.requests)
        assert all(credentials is None for _, _, credentials in standin.requests)
        assert not ms_cache.exists() or not list(ms_cache.rglob("*.safetensors"))
        page = client.post("/models/lookup", data={"repo_id": "tiny/llama", "source": "modelscope"})
        assert 'id="download-button"' in page.text and "on the ModelScope site at" in page.text
        assert 'name="source" value="modelscope"' in page.text  # the download asks the same site
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    said = refused(client, "tiny/llama")
    assert said.startswith("The ModelScope site at") and "cannot be reached from this server" in said
    assert "ModelScope cache" in said and "register a local folder" in said
    bad = client.post("/api/models/lookup", json={"repo_id": "tiny/llama", "source": "elsewhere"})
    assert bad.status_code == 422


def download(client, settings, db, repo_id: str) -> dict:
    queued = client.post("/api/models/downloads", json={"repo_id": repo_id, "source": "modelscope"})
    assert queued.status_code == 201, queued.text
    assert queued.json()["source"] == "modelscope"
    assert work_once(settings, db, me="w1", stop=threading.Event())
    return client.get(f"/api/models/downloads/{queued.json()['id']}").json()


@pytest.mark.trains
def test_a_model_from_modelscope_with_a_token_becomes_a_base_model(
    client, settings, db, repo_folder, ms_cache, monkeypatch
):
    """A model that needs an account: refused without a token, fetched with one, which goes to ModelScope
    only (not to the storage its weights are redirected to, nor to the Hugging Face origin); then listed as
    a base model from ModelScope's cache."""
    gated = {"tiny/gated": Repo(folder=repo_folder, sha=SHA, gated=True, token=TOKEN)}
    with running_hub(gated) as standin:
        monkeypatch.setenv("MODELSCOPE_ENDPOINT", standin.modelscope_url)
        assert "lets only some accounts fetch tiny/gated" in refused(client, "tiny/gated")
        wrong = client.put(
            "/api/models/hub-token", json={"token": "ms-wrongwrongwrong", "source": "modelscope"}
        )
        assert wrong.status_code == 422 and "refused that token" in wrong.json()["detail"][0]["message"]
        saved = client.put("/api/models/hub-token", json={"token": TOKEN, "source": "modelscope"})
        assert saved.status_code == 204
        page = client.get("/models").text
        assert TOKEN not in page and "A token is kept for the ModelScope site at" in page
        status, info = lookup(client, "tiny/gated")
        assert status == 200 and info["gated"] is True and info["refusal"] is None, info
        done = download(client, settings, db, "tiny/gated")
        assert done["status"] == "succeeded", done["error"]
        assert done["bytes_done"] == done["bytes_total"] > 0
        cdn = [auth for _, path, auth in standin.requests if path.startswith("/repos/")]
        assert cdn and all(auth is None for auth in cdn)  # the weights came from the storage, without it
        carried = {auth for _, _, auth in standin.requests if auth}  # as a header, or the session cookie
        assert f"Bearer {TOKEN}" in carried
        assert all(TOKEN in auth or "ms-wrongwrongwrong" in auth for auth in carried), carried
    snapshot = ms_cache / "models" / "tiny--gated" / "snapshots" / "master"
    fetched = sorted(p.name for p in snapshot.iterdir())
    assert (
        "model.safetensors" in fetched and "pytorch_model.bin" not in fetched and "README.md" not in fetched
    )
    assert (snapshot / "model.safetensors").read_bytes() == (repo_folder / "model.safetensors").read_bytes()
    models = {m["id"]: m for m in client.get("/api/models").json()}
    entry = models["modelscope:tiny/gated"]
    assert (entry["status"], entry["source"], entry["name"]) == (
        "ready",
        "modelscope-cache",
        "tiny/gated (ModelScope)",
    )
    assert "ModelScope cache" in client.get("/models").text
    forgot = client.request("DELETE", "/api/models/hub-token", params={"source": "modelscope"})
    assert forgot.status_code == 204 and "A token is kept" not in client.get("/models").text


@pytest.mark.trains
def test_a_cancelled_modelscope_download_resumes_from_its_partial_file(
    client, settings, db, large_repo, ms_cache, monkeypatch
):
    slow = Repo(folder=large_repo, sha=SHA, bytes_per_second=250_000)
    with running_hub({"tiny/large": slow}) as standin:
        monkeypatch.setenv("MODELSCOPE_ENDPOINT", standin.modelscope_url)
        queued = client.post("/api/models/downloads", json={"repo_id": "tiny/large", "source": "modelscope"})
        download_id = queued.json()["id"]
        worker = threading.Thread(
            target=work_once, args=(settings, db), kwargs={"me": "w1", "stop": threading.Event()}
        )
        worker.start()
        try:
            wait_until(
                lambda: client.get(f"/api/models/downloads/{download_id}").json()["bytes_done"] > 500_000,
                timeout=60,
                what="half a megabyte to arrive",
            )
            assert "modelscope:tiny/large" not in {m["id"] for m in client.get("/api/models").json()}
            assert client.post(f"/api/models/downloads/{download_id}/cancel").status_code == 200
        finally:
            worker.join(timeout=60)
        cancelled = client.get(f"/api/models/downloads/{download_id}").json()
        assert cancelled["status"] == "cancelled" and 0 < cancelled["bytes_done"] < cancelled["bytes_total"]
        snapshot = modelscope.snapshot_folder("tiny/large", "master")
        partial = snapshot / "model.safetensors.incomplete"
        assert partial.is_file() and partial.stat().st_size > 0  # kept, to resume from
        assert "modelscope:tiny/large" not in {m["id"] for m in client.get("/api/models").json()}
        # again: the client asks only for the bytes that did not arrive
        slow.bytes_per_second = None
        assert client.post(f"/api/models/downloads/{download_id}/retry").status_code == 200
        assert work_once(settings, db, me="w1", stop=threading.Event())
        done = client.get(f"/api/models/downloads/{download_id}").json()
        assert done["status"] == "succeeded", done["error"]
        resumed = [ranged for path, ranged in standin.ranges if path.startswith("/repos/")]
        assert resumed and resumed[-1].startswith("bytes=") and resumed[-1] != "bytes=0-", standin.ranges
    assert (snapshot / "model.safetensors").read_bytes() == (large_repo / "model.safetensors").read_bytes()
    assert not partial.exists()
    assert "modelscope:tiny/large" in {m["id"] for m in client.get("/api/models").json()}


@pytest.mark.trains
def test_a_worker_elsewhere_fetches_a_modelscope_model_for_its_run(
    client, settings, db, repo_folder, tmp_path, monkeypatch
):
    """A run of a model the web server fetched from ModelScope, taken by a worker on another machine that
    lacks it: the worker fetches the same revision from the ModelScope site it reaches into its own cache,
    saying how far it got on the run."""
    from app.models import Run
    from tests.conftest import DEMO_DATASET, upload
    from worker.download import fetch_for_run

    web_cache, worker_cache = tmp_path / "web-modelscope", tmp_path / "worker-modelscope"
    monkeypatch.setenv("MODELSCOPE_CACHE", str(web_cache))
    phases: list[str] = []
    with running_hub({"tiny/llama": Repo(folder=repo_folder, sha=SHA, bytes_per_second=400_000)}) as standin:
        monkeypatch.setenv("MODELSCOPE_ENDPOINT", standin.modelscope_url)
        modelscope.api(standin.modelscope_url, None).download_repo(
            "tiny/llama", "model", allow_patterns=["*.json", "*.safetensors"]
        )  # the web server's copy, fetched by name earlier
        dataset = upload(client, "demo.json", DEMO_DATASET.read_bytes()).json()["id"]
        run = client.post("/api/runs", json={"dataset_id": dataset, "base_model": "modelscope:tiny/llama"})
        assert run.status_code == 201, run.text
        model_path = run.json()["config"]["model_path"]
        assert model_path == str(web_cache / "models" / "tiny--llama" / "snapshots" / "master")

        monkeypatch.setenv("MODELSCOPE_CACHE", str(worker_cache))  # the other machine's
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                with db.session() as session:
                    phase = session.get(Run, run.json()["id"]).phase
                if phase and phase not in phases:
                    phases.append(phase)
                stop.wait(0.05)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            why, folder = fetch_for_run(
                settings,
                db,
                run.json()["id"],
                "modelscope:tiny/llama",
                model_path,
                me="w2",
                stop=threading.Event(),
            )
        finally:
            stop.set()
            watcher.join()
    assert why is None and folder == worker_cache / "models" / "tiny--llama" / "snapshots" / "master"
    assert (folder / "model.safetensors").read_bytes() == (repo_folder / "model.safetensors").read_bytes()
    assert any(
        p.startswith("Fetching tiny/llama from the ModelScope site at") and " of " in p for p in phases
    )


def test_a_model_in_an_older_clients_cache_layout_is_listed(client, ms_cache, tiny_model_dir):
    """ModelScope's older clients kept models under hub/models/<owner>/<name, . as ___>; the client still
    downloads into such a folder when it holds the model, so Tuneboard lists it too."""
    shutil.copytree(tiny_model_dir, ms_cache / "hub" / "models" / "tiny" / "llama___v2")
    models = {m["id"]: m for m in client.get("/api/models").json()}
    entry = models["modelscope:tiny/llama.v2"]
    assert (entry["status"], entry["source"]) == ("ready", "modelscope-cache")
    assert (
        modelscope.snapshot_folder("tiny/llama.v2", "master")
        == ms_cache / "hub" / "models" / "tiny" / "llama___v2"
    )
