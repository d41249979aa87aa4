"""The files a worker without the web server's disk exchanges with it (app/routes/artifacts_api.py): only
the worker training the run may send them, a half-sent or hostile archive stores nothing, and what is
stored comes back the same."""

from __future__ import annotations

import io
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.models import Run
from app.routes import artifacts_api
from app.runs import state
from app.runs.folder import MAX_TAR_MEMBERS, Checkpoint, pack
from tests.conftest import DEMO_DATASET, upload


@pytest.fixture
def running_run(client, db, tiny_model_dir) -> int:
    model = client.post("/api/models", json={"path": str(tiny_model_dir)}).json()["id"]
    dataset = upload(client, "demo.json", DEMO_DATASET.read_bytes()).json()["id"]
    run = client.post("/api/runs", json={"dataset_id": dataset, "base_model": model}).json()["id"]
    with db.write_session() as session:
        assert state.claim_next(session=session, worker_id="box:7").id == run
    return run


def tar_of(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


CHECKPOINT = {
    "adapter_config.json": b"{}",
    "adapter_model.safetensors": b"weights",
    "state/trainer.json": b"1",
    "TUNEBOARD_COMPLETE": b"20",  # the worker's marker: the save was complete
}
OWNER = {"X-Tuneboard-Worker": "box:7", "Content-Type": "application/x-tar"}


def test_a_checkpoint_sent_by_the_runs_worker_is_stored_whole_and_comes_back(client, settings, running_run):
    run = running_run
    url = f"/api/runs/{run}/checkpoints/20.tar"
    assert client.put(url, content=tar_of(CHECKPOINT), headers=OWNER).status_code == 201
    assert client.put(f"/api/runs/{run}/checkpoints/40.tar", content=tar_of(CHECKPOINT), headers=OWNER)
    assert [c["step"] for c in client.get(f"/api/runs/{run}/checkpoints").json()] == [20, 40]
    # the worker's rotation kept only 40 and 60: the server follows it
    url = f"/api/runs/{run}/checkpoints/60.tar?keep=40,60"
    keep = client.put(url, content=tar_of(CHECKPOINT), headers=OWNER)
    assert keep.status_code == 201
    stored = client.get(f"/api/runs/{run}/checkpoints").json()
    assert [c["step"] for c in stored] == [40, 60] and all(c["has_adapter"] for c in stored)
    back = client.get(f"/api/runs/{run}/checkpoints/60.tar")
    assert back.status_code == 200 and back.headers["content-type"] == "application/x-tar"
    with tarfile.open(fileobj=io.BytesIO(back.content)) as archive:
        files = {m.name: archive.extractfile(m).read() for m in archive if m.isfile()}
    assert files == CHECKPOINT and list(files)[-1] == "TUNEBOARD_COMPLETE"  # the marker travels last
    assert client.get(f"/api/runs/{run}/checkpoints/20.tar").status_code == 404

    # the log grows by what is sent, once: a chunk sent again (its answer lost) adds nothing
    def log(data: bytes, offset: int) -> int:
        headers = OWNER | {"X-Tuneboard-Log-Offset": str(offset)}
        return client.post(f"/api/runs/{run}/log", content=data, headers=headers).status_code

    assert log(b"step 1\n", 0) == log(b"step 2\n", 7) == log(b"step 2\n", 7) == 204
    assert log(b"2\nstep 3\n", 12) == 204  # overlapping what arrived: only the new bytes
    assert settings.run_folder(run).log.read_text() == "step 1\nstep 2\nstep 3\n"
    # a chunk that would leave a gap is refused, and the good chunks after it still land
    gap = client.post(
        f"/api/runs/{run}/log", content=b"far", headers=OWNER | {"X-Tuneboard-Log-Offset": str(2**62)}
    )
    assert gap.status_code == 422 and "the server holds 21 bytes of this attempt's log" in gap.text
    assert "send from byte 21. Nothing was stored." in gap.text
    assert log(b"step 4\n", 21) == 204
    assert settings.run_folder(run).log.read_text() == "step 1\nstep 2\nstep 3\nstep 4\n"
    adapter = {"adapter_config.json": b"{}", "adapter_model.safetensors": b"final"}
    sent = client.put(f"/api/runs/{run}/adapter.tar", content=tar_of(adapter), headers=OWNER)
    assert sent.status_code == 201
    assert (settings.run_folder(run).adapter / "adapter_model.safetensors").read_bytes() == b"final"
    # the zip carries the run's own files only: a link placed in the folder (to any file) is left out
    secret = settings.data_dir / "secret.txt"
    secret.write_text("not the run's")
    (settings.run_folder(run).adapter / "chat_template.jinja").symlink_to(secret)
    download = client.get(f"/api/runs/{run}/adapter")
    assert download.status_code == 200 and download.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(download.content)) as archive:
        assert sorted(archive.namelist()) == [f"run-{run}-adapter/{name}" for name in sorted(adapter)]
        assert archive.read(f"run-{run}-adapter/adapter_model.safetensors") == b"final"
    assert not list(settings.tmp_dir.iterdir())  # the zip was written to a file, sent, and removed


def test_only_the_worker_training_the_run_may_send_its_files(client, db, settings, running_run):
    run = running_run
    body = tar_of(CHECKPOINT)
    url = f"/api/runs/{run}/checkpoints/20.tar"
    anonymous = client.put(url, content=body, headers={"Content-Type": "application/x-tar"})
    assert anonymous.status_code == 400 and "X-Tuneboard-Worker" in anonymous.json()["detail"][0]["message"]
    other = client.put(url, content=body, headers=OWNER | {"X-Tuneboard-Worker": "elsewhere:1"})
    assert other.status_code == 409 and "is not being trained by elsewhere:1" in other.text
    with db.write_session() as session:  # the run was requeued: its old worker's late files are refused
        state.requeue(session=session, run_id=run, worker_id="box:7")
    late = client.post(f"/api/runs/{run}/log", content=b"late", headers=OWNER)
    assert late.status_code == 409 and "it is queued" in late.text
    assert not settings.run_folder(run).checkpoints() and not settings.run_folder(run).log.exists()


@pytest.mark.parametrize(
    "archive, sentence",
    [
        (b"not a tar at all" * 100, "could not be stored"),
        (tar_of({"../../escape.txt": b"x"}), "could not be stored"),
    ],
)
def test_a_broken_or_hostile_archive_stores_nothing(client, settings, running_run, archive, sentence):
    response = client.put(f"/api/runs/{running_run}/checkpoints/20.tar", content=archive, headers=OWNER)
    assert response.status_code == 422 and sentence in response.text
    folder = settings.run_folder(running_run)
    assert not folder.checkpoints()
    assert not list(folder.checkpoints_dir.glob(".incoming-*"))  # nothing half-unpacked left behind
    assert not list(settings.data_dir.rglob("escape.txt"))


def test_an_absolute_name_stays_inside_the_checkpoint(client, settings, running_run):
    archive = tar_of({"/tmp/tuneboard-owned-by-a-test": b"x", "TUNEBOARD_COMPLETE": b"20"})
    response = client.put(f"/api/runs/{running_run}/checkpoints/20.tar", content=archive, headers=OWNER)
    assert response.status_code == 201
    checkpoint = settings.run_folder(running_run).checkpoint(20).path
    assert (checkpoint / "tmp" / "tuneboard-owned-by-a-test").is_file()
    assert not Path("/tmp/tuneboard-owned-by-a-test").exists()


def test_a_link_inside_an_archive_is_refused(client, settings, running_run, tmp_path):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        info = tarfile.TarInfo("adapter_model.safetensors")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        archive.addfile(info)
    response = client.put(f"/api/runs/{running_run}/adapter.tar", content=buffer.getvalue(), headers=OWNER)
    assert response.status_code == 422 and "neither a plain file nor a folder" in response.text
    assert not settings.run_folder(running_run).has_adapter


def test_a_checkpoint_without_its_marker_is_refused_as_incomplete(client, settings, running_run):
    partial = {k: v for k, v in CHECKPOINT.items() if k != "TUNEBOARD_COMPLETE"}
    response = client.put(
        f"/api/runs/{running_run}/checkpoints/20.tar", content=tar_of(partial), headers=OWNER
    )
    assert response.status_code == 422 and "without its TUNEBOARD_COMPLETE marker" in response.text
    assert not settings.run_folder(running_run).checkpoints()


def test_an_archive_sent_as_json_is_still_streamed_to_its_route(client, settings, running_run):
    headers = OWNER | {"Content-Type": "application/json"}  # not read whole by the JSON checker
    response = client.put(
        f"/api/runs/{running_run}/checkpoints/20.tar", content=tar_of(CHECKPOINT), headers=headers
    )
    assert response.status_code == 201


def test_an_adapter_without_its_config_is_refused(client, settings, running_run):
    response = client.put(
        f"/api/runs/{running_run}/adapter.tar", content=tar_of({"readme.txt": b"x"}), headers=OWNER
    )
    assert response.status_code == 422 and "no adapter_config.json" in response.text
    assert not settings.run_folder(running_run).adapter.exists()


def test_uploads_need_a_length_and_stay_within_the_limit(client, settings, running_run):
    def chunks():
        yield b"x" * 10

    url = f"/api/runs/{running_run}/checkpoints/20.tar"
    assert client.put(url, content=chunks(), headers=OWNER).status_code == 411
    too_big = str(int(settings.max_artifact_mb * 1_000_000) + 1)
    response = client.put(url, content=b"", headers=OWNER | {"Content-Length": too_big})
    assert response.status_code == 413 and "TUNEBOARD_MAX_ARTIFACT_MB" in response.text


def test_the_dataset_rows_a_worker_trains_on_are_the_normalised_rows(client, settings, running_run):
    dataset = client.get("/api/datasets").json()[0]["id"]
    rows = client.get(f"/api/datasets/{dataset}/rows.jsonl")
    assert rows.status_code == 200
    assert rows.content == (settings.datasets_dir / str(dataset) / "rows.jsonl").read_bytes()
    assert client.get("/api/datasets/999/rows.jsonl").status_code == 404


def test_pack_then_store_is_the_same_folder_and_a_vanished_folder_packs_nothing(settings, tmp_path):
    source = tmp_path / "checkpoint-7"
    (source / "deep").mkdir(parents=True)
    (source / "adapter_config.json").write_text("{}")
    (source / "deep" / "w.bin").write_bytes(b"\0" * 1000)
    Checkpoint(source, 7).mark_complete()
    buffer = io.BytesIO()
    pack(source, buffer)
    buffer.seek(0)
    checkpoint = settings.run_folder(5).store_checkpoint(7, buffer)
    assert checkpoint.has_adapter and (checkpoint.path / "deep" / "w.bin").read_bytes() == b"\0" * 1000
    with pytest.raises(FileNotFoundError):  # rotated away: an error, never an empty archive
        pack(tmp_path / "checkpoint-3", io.BytesIO())


def member(name: str, data: bytes = b"x", kind: bytes = tarfile.REGTYPE, **pax: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.pax_headers = kind, len(data) if kind == tarfile.REGTYPE else 0, pax
    return info


def hostile_tar(members: list[tuple[tarfile.TarInfo, bytes]], format: int = tarfile.PAX_FORMAT) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=format) as archive:
        for info, data in members:
            archive.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return buffer.getvalue()


HOSTILE_ARCHIVES = {
    # the PAX-header regular expression of Python before 3.11.10 is quadratic: 60 kB stalled the server 8 s
    "a 2 MB PAX header": (hostile_tar([(member("a", comment="y" * 2_000_000), b"x")]), "extended header is"),
    "a 2 MB GNU long name": (
        hostile_tar([(member("n" * 2_000_000), b"x")], format=tarfile.GNU_FORMAT),
        "extended header is",
    ),
    "a global PAX header": (
        hostile_tar([(member("g", kind=tarfile.XGLTYPE), b""), (member("a"), b"x")]),
        "neither a plain file nor a folder",
    ),
    "a hard link": (
        hostile_tar([(member("a"), b"x"), (member("b", kind=tarfile.LNKTYPE), b"")]),
        "b is neither a plain file nor a folder",
    ),
    "a device": (hostile_tar([(member("dev", kind=tarfile.CHRTYPE), b"")]), "dev is neither"),
    "a folder and a file of one name": (
        hostile_tar([(member("a", kind=tarfile.DIRTYPE), b""), (member("a"), b"x")]),
        "a is both a file and a folder",
    ),
    "a file and a folder of one name": (
        hostile_tar([(member("a"), b"x"), (member("a/b"), b"x")]),
        "a/b is both a file and a folder",
    ),
    "a name too long for the disk": (hostile_tar([(member("c" * 300), b"x")]), "cannot be written"),
    "more members than a checkpoint has": (
        hostile_tar([(member(f"f{n}", b""), b"") for n in range(MAX_TAR_MEMBERS + 1)]),
        f"more than {MAX_TAR_MEMBERS:,} members",
    ),
    "an archive cut short": (tar_of(CHECKPOINT)[:1536], "could not be stored"),
}


@pytest.mark.parametrize("archive, sentence", HOSTILE_ARCHIVES.values(), ids=HOSTILE_ARCHIVES.keys())
def test_hostile_archives_are_refused_with_a_sentence_and_leave_nothing(
    client, settings, running_run, archive, sentence
):
    response = client.put(f"/api/runs/{running_run}/checkpoints/20.tar", content=archive, headers=OWNER)
    assert response.status_code == 422, response.text
    message = response.json()["detail"][0]["message"]
    assert sentence in message and message.endswith("Nothing was stored.")
    folder = settings.run_folder(running_run)
    assert not folder.checkpoints() and not list(folder.checkpoints_dir.glob(".*"))


def test_a_hostile_header_does_not_stall_other_requests(client, running_run):
    """While a 20 MB PAX header is received and refused, the server keeps answering."""
    archive = hostile_tar([(member("a", comment="y" * 20_000_000), b"x")])
    answers: list[int] = []
    sender = threading.Thread(
        target=lambda: answers.append(
            client.put(
                f"/api/runs/{running_run}/checkpoints/20.tar", content=archive, headers=OWNER
            ).status_code
        )
    )
    sender.start()
    slowest = 0.0
    while sender.is_alive():
        started = time.monotonic()
        assert client.get("/healthz").status_code == 200
        slowest = max(slowest, time.monotonic() - started)
    sender.join()
    assert answers == [422] and slowest < 1.0


def test_a_body_larger_than_the_runs_size_allows_is_refused_early(
    client, db, settings, running_run, monkeypatch
):
    with db.write_session() as session:
        session.get(Run, running_run).trainable_params = 100  # 1,600 bytes of weights and optimizer state
        session.commit()
    monkeypatch.setattr(artifacts_api, "ARTIFACT_SLACK", 20_000)  # a small tar is 10 kB
    big = tar_of(CHECKPOINT | {"adapter_model.safetensors": b"w" * 50_000})
    url = f"/api/runs/{running_run}/checkpoints/20.tar"
    response = client.put(url, content=big, headers=OWNER)
    assert response.status_code == 413
    message = response.json()["detail"][0]["message"]
    assert "larger than the 21.6 kB this run's size allows" in message and message.endswith(
        "Nothing was stored."
    )
    assert not settings.run_folder(running_run).checkpoints()
    assert client.put(url, content=tar_of(CHECKPOINT), headers=OWNER).status_code == 201  # within it


def test_half_received_folders_left_by_a_crash_are_removed_at_start(settings):
    checkpoints = settings.run_folder(5).checkpoints_dir
    leftovers = [checkpoints / ".incoming-0123", settings.run_folder(5).path / ".old-4567"]
    for leftover in leftovers:
        (leftover / "sub").mkdir(parents=True)
        (leftover / "sub" / "weights").write_bytes(b"x" * 100)
    kept = checkpoints / "checkpoint-10"
    kept.mkdir()
    with TestClient(create_app(settings)):
        assert not any(leftover.exists() for leftover in leftovers) and kept.is_dir()
