"""Base models fetched by name: the real `huggingface_hub` client against a local stand-in for the Hub's
HTTP API (tests/hub_standin.py), serving the tests' tiny model with the extra files real repositories
carry. Looked up before anything is downloaded; downloaded by a worker into the Hugging Face cache (only
the files training needs) with its progress on the row; gated models with a token sent nowhere else;
cancelled and interrupted transfers resumed; every bad input a sentence."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
from huggingface_hub import constants

from app import hub, jobs
from app.processes import free_port
from tests.conftest import fast_settings
from tests.hub_standin import Repo, running_hub
from tests.waiting import wait_until
from worker.main import work_once

SHA = "a" * 40
TOKEN = "hf_standin0123456789abcdef"


@pytest.fixture
def settings(tmp_path, database):
    """A worker that downloads at once (no model to convert first)."""
    return fast_settings(tmp_path, database)


@pytest.fixture
def repo_folder(tmp_path, tiny_model_dir) -> Path:
    """The tiny model as a Hub repository keeps it: with a PyTorch copy of its weights, an ONNX export in a
    subfolder and a README, none of which Tuneboard fetches."""
    folder = tmp_path / "repo"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "pytorch_model.bin").write_bytes(b"\0" * 4096)
    (folder / "onnx").mkdir()
    (folder / "onnx" / "model.onnx").write_bytes(b"\0" * 2048)
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n", encoding="utf-8")
    return folder


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """A Hugging Face cache of the test's own, for this process and the worker's children."""
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def pointing_at(monkeypatch, url: str) -> None:
    """The server's hub: what HF_ENDPOINT sets when the client is imported."""
    monkeypatch.setattr(constants, "ENDPOINT", url)


def repos(folder: Path, **gated_folder) -> dict[str, Repo]:
    every = {"tiny/llama": Repo(folder=folder, sha=SHA)}
    if "gated" in gated_folder:
        every["tiny/gated"] = Repo(folder=gated_folder["gated"], sha=SHA, gated=True, token=TOKEN)
    return every


def test_a_model_is_looked_up_before_anything_is_downloaded(
    client, repo_folder, hub_cache, monkeypatch, tmp_path
):
    bert = tmp_path / "bert"
    shutil.copytree(repo_folder, bert)
    config = json.loads((bert / "config.json").read_text())
    (bert / "config.json").write_text(json.dumps(config | {"architectures": ["BertForMaskedLM"]}))
    every = repos(repo_folder) | {"tiny/bert": Repo(folder=bert, sha=SHA)}
    with running_hub(every) as standin:
        pointing_at(monkeypatch, standin.url)
        found = client.post("/api/models/lookup", json={"repo_id": "tiny/llama"})
        assert found.status_code == 200, found.text
        info = found.json()
        wanted = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
        assert wanted <= set(info["files"]) and not any(
            n.endswith((".bin", ".onnx", ".md")) for n in info["files"]
        )
        assert info["size_bytes"] == sum((repo_folder / n).stat().st_size for n in info["files"])
        assert info["files_left_out"] == 3
        assert (info["license"], info["gated"], info["architecture"]) == (
            "apache-2.0",
            False,
            "LlamaForCausalLM",
        )
        assert info["refusal"] is None and info["commit"] == SHA and info["disk_free_bytes"] > 0

        def refused(body: dict) -> str:
            answer = client.post("/api/models/lookup", json=body)
            if answer.status_code == 200:
                return answer.json()["refusal"]
            assert answer.status_code == 422, answer.text
            return answer.json()["detail"][0]["message"]

        assert "not a causal language model" in refused({"repo_id": "tiny/bert"})
        assert refused({"repo_id": "nobody/nothing"}).startswith("There is no model nobody/nothing on")
        assert "has no revision 'v9'" in refused({"repo_id": "tiny/llama", "revision": "v9"})
        assert "is not a model id" in refused({"repo_id": "../etc/passwd"})
        monkeypatch.setattr(hub, "disk_free", lambda folder: 1000)
        assert "needs" in refused({"repo_id": "tiny/llama"}) and "free" in refused({"repo_id": "tiny/llama"})
        # the page shows the same, with the download button only for a model it can train
        monkeypatch.undo()
        pointing_at(monkeypatch, standin.url)
        page = client.post("/models/lookup", data={"repo_id": "tiny/llama"})
        assert 'id="download-button"' in page.text and "apache-2.0" in page.text
        page = client.post("/models/lookup", data={"repo_id": "tiny/bert"})
        assert 'id="download-button"' not in page.text and "not a causal language model" in page.text
    # a hub that does not answer: one sentence, and the way that works offline
    pointing_at(monkeypatch, f"http://127.0.0.1:{free_port()}")
    said = refused({"repo_id": "tiny/llama"})
    assert "cannot be reached from this server" in said and "register a local folder" in said


def download(client, settings, db, repo_id: str, **extra) -> dict:
    """Queue a download through the API and let the worker loop take it."""
    queued = client.post("/api/models/downloads", json={"repo_id": repo_id, **extra})
    assert queued.status_code == 201, queued.text
    assert work_once(settings, db, me="w1", stop=threading.Event())
    return client.get(f"/api/models/downloads/{queued.json()['id']}").json()


@pytest.mark.trains
def test_a_model_downloaded_by_name_becomes_a_base_model(
    client, settings, db, repo_folder, hub_cache, monkeypatch
):
    with running_hub(repos(repo_folder)) as standin:
        pointing_at(monkeypatch, standin.url)
        done = download(client, settings, db, "tiny/llama")
        assert done["status"] == "succeeded", done["error"]
        assert done["bytes_done"] == done["bytes_total"] > 0
    snapshot = hub_cache / "models--tiny--llama" / "snapshots" / SHA
    fetched = sorted(p.name for p in snapshot.iterdir())
    assert "model.safetensors" in fetched and "pytorch_model.bin" not in fetched and "onnx" not in fetched
    assert (snapshot / "model.safetensors").read_bytes() == (repo_folder / "model.safetensors").read_bytes()
    models = {m["id"]: m for m in client.get("/api/models").json()}
    assert models["tiny/llama"]["status"] == "ready" and models["tiny/llama"]["source"] == "hf-cache"
    # no token was saved, so none was sent, even though the client could have found one of its own
    assert all(auth is None for _, _, auth in standin.requests)
    assert (hub_cache / "models--tiny--llama" / "refs" / "main").read_text() == SHA  # as other tools expect
    # downloading it again (it is here whole) leaves it listed meanwhile
    with running_hub(repos(repo_folder)) as standin:
        pointing_at(monkeypatch, standin.url)
        assert client.post("/api/models/downloads", json={"repo_id": "tiny/llama"}).status_code == 201
    assert "tiny/llama" in {m["id"] for m in client.get("/api/models").json()}


def test_only_a_worker_with_the_web_servers_disk_takes_a_download(
    client, db, repo_folder, hub_cache, monkeypatch
):
    """A worker elsewhere (a fleet's) would put the model in its own cache, where the web server never
    lists it: the download waits for one on the web server's machine."""
    with running_hub(repos(repo_folder)) as standin:
        pointing_at(monkeypatch, standin.url)
        assert client.post("/api/models/downloads", json={"repo_id": "tiny/llama"}).status_code == 201
    with db.write_session() as session:
        assert jobs.claim_next(session=session, worker_id="elsewhere", shared_disk=False) is None
        kind, row = jobs.claim_next(session=session, worker_id="here")
    assert kind is jobs.DOWNLOAD and row.repo_id == "tiny/llama"


@pytest.mark.trains
def test_a_gated_model_needs_a_token_that_is_sent_to_its_hub_only(
    client, settings, db, repo_folder, hub_cache, monkeypatch
):
    monkeypatch.setenv("HF_TOKEN", "hf_fromtheenvironment0000")  # the client's own lookup must not send it
    with running_hub(repos(repo_folder, gated=repo_folder)) as standin:
        pointing_at(monkeypatch, standin.url)
        gated = client.post("/api/models/lookup", json={"repo_id": "tiny/gated"}).json()
        assert gated["gated"] is True and "is gated" in gated["refusal"]  # described, but not fetched
        refused = client.post("/api/models/downloads", json={"repo_id": "tiny/gated"})
        assert refused.status_code == 422 and "is gated" in refused.json()["detail"][0]["message"]
        wrong = client.put("/api/models/hub-token", json={"token": "hf_wrongwrongwrong0000"})
        assert wrong.status_code == 422 and "refused that token" in wrong.json()["detail"][0]["message"]
        assert client.put("/api/models/hub-token", json={"token": TOKEN}).status_code == 204
        assert TOKEN not in client.get("/models").text  # never shown
        info = client.post("/api/models/lookup", json={"repo_id": "tiny/gated"}).json()
        assert info["gated"] is True and info["refusal"] is None
        done = download(client, settings, db, "tiny/gated")
        assert done["status"] == "succeeded", done["error"]
        sent = {auth for _, _, auth in standin.requests if auth}
        assert sent == {f"Bearer {TOKEN}", "Bearer hf_wrongwrongwrong0000"}  # never the environment's
    with running_hub(repos(repo_folder)) as other:  # another hub (a mirror) never gets that token
        pointing_at(monkeypatch, other.url)
        assert client.post("/api/models/lookup", json={"repo_id": "tiny/llama"}).status_code == 200
        assert all(auth is None for _, _, auth in other.requests)
    stored = settings.data_dir / "secrets" / "hub-tokens.json"
    assert stored.stat().st_mode & 0o077 == 0  # readable by the server's user only


@pytest.mark.trains
def test_an_interrupted_transfer_resumes_where_it_broke_off(
    client, settings, db, large_repo, hub_cache, monkeypatch
):
    size = (large_repo / "model.safetensors").stat().st_size
    interrupted = {"tiny/large": Repo(folder=large_repo, sha=SHA, interrupt_after=size * 3 // 4)}
    with running_hub(interrupted) as standin:
        pointing_at(monkeypatch, standin.url)
        done = download(client, settings, db, "tiny/large")
        assert done["status"] == "succeeded", done["error"]
        resumed = [
            ranged for path, ranged in standin.ranges if path.endswith(".safetensors") or "/repos/" in path
        ]
        assert resumed and resumed[0].startswith("bytes=") and resumed[0] != "bytes=0-", standin.ranges
    snapshot = hub_cache / "models--tiny--large" / "snapshots" / SHA
    assert (snapshot / "model.safetensors").read_bytes() == (large_repo / "model.safetensors").read_bytes()


@pytest.mark.trains
def test_a_cancelled_download_stops_mid_file_and_downloads_again(
    client, settings, db, large_repo, hub_cache, monkeypatch
):
    slow = Repo(folder=large_repo, sha=SHA, bytes_per_second=200_000)
    with running_hub({"tiny/large": slow}) as standin:
        pointing_at(monkeypatch, standin.url)
        queued = client.post("/api/models/downloads", json={"repo_id": "tiny/large"}).json()
        worker = threading.Thread(
            target=work_once, args=(settings, db), kwargs={"me": "w1", "stop": threading.Event()}
        )
        worker.start()
        try:
            going = wait_until(
                lambda: (
                    (d := client.get(f"/api/models/downloads/{queued['id']}").json())["bytes_done"] > 0 and d
                ),
                timeout=60,
                what="the first bytes to arrive",
            )
            assert going["status"] == "running" and going["bytes_done"] < going["bytes_total"]
            page = client.get("/models").text
            assert f'id="download-{queued["id"]}"' in page and "<progress" in page
            assert "tiny/large" not in {
                m["id"] for m in client.get("/api/models").json()
            }  # half here: not a model
            assert client.post(f"/api/models/downloads/{queued['id']}/cancel").status_code == 200
        finally:
            worker.join(timeout=60)
        cancelled = client.get(f"/api/models/downloads/{queued['id']}").json()
        assert cancelled["status"] == "cancelled" and cancelled["bytes_done"] < cancelled["bytes_total"]
        assert not list(hub_cache.glob("models--tiny--large/blobs/*.incomplete"))
        assert "tiny/large" not in {m["id"] for m in client.get("/api/models").json()}

        slow.bytes_per_second = None  # the next try at full speed
        again = client.post(f"/api/models/downloads/{queued['id']}/retry").json()
        assert again["status"] == "queued"
        assert work_once(settings, db, me="w1", stop=threading.Event())
        done = client.get(f"/api/models/downloads/{queued['id']}").json()
        assert done["status"] == "succeeded", done["error"]
    assert "tiny/large" in {m["id"] for m in client.get("/api/models").json()}


def test_one_download_of_a_model_is_under_way_at_a_time(db):
    """However many requests ask at once: the database keeps one queued or running download per model,
    revision and hub (downloads.request answers the later ones with it)."""
    from sqlalchemy.exc import IntegrityError

    from app.models import ModelDownload

    def row(status: str) -> ModelDownload:
        return ModelDownload(
            repo_id="org/m",
            revision="main",
            commit=SHA,
            endpoint="http://hub",
            files={},
            bytes_total=1,
            status=status,
        )

    with db.write_session() as session:
        session.add_all([row("succeeded"), row("failed"), row("queued")])
        session.commit()
        session.add(row("running"))
        with pytest.raises(IntegrityError):
            session.commit()
        session.rollback()


def test_a_sharded_model_is_fetched_by_its_index_not_with_a_consolidated_copy(
    client, tiny_model_dir, hub_cache, monkeypatch, tmp_path
):
    """A repository that keeps its weights in shards named by model.safetensors.index.json and also a
    consolidated copy of the same weights: only the index's shards are fetched."""
    from safetensors import safe_open

    folder = tmp_path / "sharded"
    shutil.copytree(tiny_model_dir, folder)
    shard = "model-00001-of-00001.safetensors"
    (folder / "model.safetensors").rename(folder / shard)
    shutil.copy(folder / shard, folder / "consolidated.safetensors")
    with safe_open(str(folder / shard), "pt") as weights:
        names = list(weights.keys())
    index = {
        "metadata": {"total_size": (folder / shard).stat().st_size},
        "weight_map": dict.fromkeys(names, shard),
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with running_hub({"tiny/sharded": Repo(folder=folder, sha=SHA)}) as standin:
        pointing_at(monkeypatch, standin.url)
        found = client.post("/api/models/lookup", json={"repo_id": "tiny/sharded"})
        assert found.status_code == 200, found.text
        files = found.json()["files"]
    assert (
        shard in files and "model.safetensors.index.json" in files and "consolidated.safetensors" not in files
    )
    assert found.json()["size_bytes"] == sum((folder / name).stat().st_size for name in files)
    # an index that names a file the repository lacks: every safetensors file, as before
    assert set(hub.needed_files({shard: 1, "consolidated.safetensors": 1}, {"model-00009.safetensors"})) == {
        shard,
        "consolidated.safetensors",
    }


def test_a_token_is_sent_to_its_hub_and_to_no_other_origin(tiny_model_dir):
    """The guard drops the Authorization header on every request of the client to an origin other than the
    hub the token is for: a redirect from a mirror to the Hub's own hosts (where the client itself would keep
    it) included."""
    from huggingface_hub import get_session

    with running_hub(repos(tiny_model_dir)) as standin, running_hub({}) as elsewhere:
        hub.guard_tokens(standin.url)
        try:
            for url in (standin.url, elsewhere.url):
                get_session().get(f"{url}/api/whoami-v2", headers={"authorization": f"Bearer {TOKEN}"})
        finally:
            hub.guard_tokens(None)
        assert standin.requests[-1] == ("GET", "/api/whoami-v2", f"Bearer {TOKEN}")
        assert elsewhere.requests[-1] == ("GET", "/api/whoami-v2", None)
