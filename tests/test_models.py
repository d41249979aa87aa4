"""The model list: bundled model, Hugging Face cache, registered folders and GGUF files."""

from __future__ import annotations

import json
import shutil

import pytest

from app.model_registry import BUNDLED_ID, error_file, hf_cache_entries


def test_bundled_model_is_listed_as_preparing_until_converted(client, settings):
    models = {m["id"]: m for m in client.get("/api/models").json()}
    bundled = models[BUNDLED_ID]
    assert bundled["source"] == "bundled"
    assert bundled["status"] == "preparing"
    assert bundled["gguf"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert bundled["path"] == str(settings.models_dir / BUNDLED_ID)


def test_register_a_model_folder(client, tiny_model_dir):
    response = client.post("/api/models", json={"path": str(tiny_model_dir)})
    assert response.status_code == 201
    model = response.json()
    assert model["status"] == "ready" and model["source"] == "folder" and model["name"] == tiny_model_dir.name
    again = client.post("/api/models", json={"path": str(tiny_model_dir)})
    assert again.status_code == 422 and "registered already" in again.json()["detail"][0]["message"]
    assert client.delete(f"/api/models/{model['id']}").status_code == 204
    assert model["id"] not in [m["id"] for m in client.get("/api/models").json()]
    assert tiny_model_dir.exists()  # the user's files stay


@pytest.mark.parametrize(
    ("path", "fragment"),
    [("", "Give the path"), ("relative/dir", "not an absolute path"), ("/no/such/place", "does not exist")],
)
def test_bad_registrations_are_refused_with_a_reason(client, path, fragment):
    response = client.post("/api/models", json={"path": path})
    assert response.status_code == 422
    assert fragment in response.json()["detail"][0]["message"]


def test_a_folder_without_weights_or_a_non_gguf_file_is_refused(client, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    response = client.post("/api/models", json={"path": str(tmp_path)})
    assert "missing tokenizer.json, *.safetensors weights" in response.json()["detail"][0]["message"]
    response = client.post("/api/models", json={"path": str(tmp_path / "config.json")})
    assert "not a .gguf file" in response.json()["detail"][0]["message"]


def test_registered_gguf_waits_for_conversion_and_shows_failures(client, settings, tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    model = client.post("/api/models", json={"path": str(gguf), "name": "Mine"}).json()
    assert model["status"] == "preparing" and model["source"] == "gguf"
    folder = settings.models_dir / model["id"]
    error_file(folder).write_text("Could not convert model.gguf: bad magic")
    listed = {m["id"]: m for m in client.get("/api/models").json()}[model["id"]]
    assert listed["status"] == "failed" and "bad magic" in listed["error"]
    assert client.delete(f"/api/models/{model['id']}").status_code == 204
    assert not error_file(folder).exists()


def as_cached(source, repo):
    """`source`'s files laid out as the Hugging Face cache does: each snapshot file a link into blobs/."""
    snapshot = repo / "snapshots" / "0123456789abcdef"
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for number, path in enumerate(sorted(source.iterdir())):
        blob = repo / "blobs" / f"blob{number}"
        shutil.copyfile(path, blob)
        (snapshot / path.name).symlink_to(f"../../blobs/{blob.name}")
    return snapshot


def test_a_model_folder_whose_files_link_out_of_it_is_refused(client, settings, tmp_path, tiny_model_dir):
    """A model folder's tokenizer and chat template are copied into every adapter and export: a link to
    another file of the machine (here a secret) would carry that file into a download."""
    secret = tmp_path / "secret.txt"
    secret.write_text("do not copy me")
    folder = tmp_path / "linked"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    (folder / "chat_template.jinja").symlink_to(secret)
    refused = client.post("/api/models", json={"path": str(folder)})
    message = refused.json()["detail"][0]["message"]
    assert (
        refused.status_code == 422
        and "holds links that lead out of the folder (chat_template.jinja)" in message
    )
    assert client.get("/api/models").json()[1:] == []  # nothing was registered
    # a registered folder that gains such a link later cannot be used
    (folder / "chat_template.jinja").unlink()
    shutil.copyfile(tiny_model_dir / "chat_template.jinja", folder / "chat_template.jinja")
    model = client.post("/api/models", json={"path": str(folder)}).json()
    assert model["status"] == "ready"
    (folder / "tokenizer").mkdir()
    (folder / "tokenizer" / "extra.json").symlink_to(secret)
    listed = {m["id"]: m for m in client.get("/api/models").json()}[model["id"]]
    assert listed["status"] == "failed" and "(tokenizer/extra.json)" in listed["error"]
    launch = client.post("/api/runs", json={"dataset_id": 1, "base_model": model["id"]})
    assert launch.status_code == 422
    # a link that stays inside the folder is an ordinary file to read
    (folder / "tokenizer" / "extra.json").unlink()
    (folder / "tokenizer" / "extra.json").symlink_to(folder / "config.json")
    assert {m["id"]: m for m in client.get("/api/models").json()}[model["id"]]["status"] == "ready"


def test_models_in_the_hugging_face_cache_are_found_without_network(tmp_path, tiny_model_dir):
    cache = tmp_path / "hub"
    snapshot = as_cached(tiny_model_dir, cache / "models--acme--tiny-chat")
    # a cached repository whose chat template links out of it (to this machine's secret) is not offered
    leaky = as_cached(tiny_model_dir, cache / "models--acme--leaky")
    (tmp_path / "secret.txt").write_text("do not copy me")
    (leaky / "chat_template.jinja").unlink(missing_ok=True)
    (leaky / "chat_template.jinja").symlink_to(tmp_path / "secret.txt")
    (cache / "models--acme--tiny-chat" / "refs").mkdir()
    (cache / "models--acme--tiny-chat" / "refs" / "main").write_text("0123456789abcdef")
    not_causal = cache / "models--acme--encoder" / "snapshots" / "fedcba9876543210"
    shutil.copytree(tiny_model_dir, not_causal)
    config = json.loads((not_causal / "config.json").read_text())
    (not_causal / "config.json").write_text(json.dumps({**config, "architectures": ["BertModel"]}))
    entries = hf_cache_entries(cache)
    assert [(e.id, e.status, e.folder) for e in entries] == [("acme/tiny-chat", "ready", snapshot)]
