"""One registry of PEFT methods (app/peft_methods.py): each method declared once, every other module asking
it. The worker's PEFT configs, the estimates and the exports follow what it declares."""

from __future__ import annotations

import re
from typing import get_args

import pytest

from app.config import PROJECT_ROOT
from app.peft_methods import DEFAULT_METHOD, METHODS, MethodKey, by_peft_type, keys_where
from app.runs.estimate import PARAMETERS

KEYS = "|".join(get_args(MethodKey))
PEFT_TYPES = "|".join(m.peft_type for m in METHODS.values())
# a method's key or PEFT type as a string in code or a template: naming a method outside the registry
NAMED = re.compile(rf"""["']({KEYS})["']|["']({PEFT_TYPES})["']""")
# GGUF's own name for an adapter file's kind (llama.cpp's format), not a Tuneboard method
ALLOWED = {("worker/gguf_export.py", 'writer.add_string(gguf.Keys.Adapter.TYPE, "lora")')}


def test_no_module_names_a_method_outside_the_registry():
    named = []
    for folder, pattern in (("app", "*.py"), ("worker", "*.py"), ("templates", "*.html"), ("static", "*.js")):
        for path in sorted((PROJECT_ROOT / folder).rglob(pattern)):
            relative = str(path.relative_to(PROJECT_ROOT))
            if relative == "app/peft_methods.py" or "/vendor/" in relative:
                continue
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if NAMED.search(line) and (relative, line.strip()) not in ALLOWED:
                    named.append(f"{relative}:{number}: {line.strip()}")
    assert named == [], "ask app.peft_methods instead:\n" + "\n".join(named)


def test_every_method_is_declared_whole():
    assert list(METHODS) == list(get_args(MethodKey)) and DEFAULT_METHOD in METHODS
    assert all(len(key) <= 20 for key in METHODS)  # runs.method holds 20 characters
    for key, method in METHODS.items():
        assert method.key == key and by_peft_type(method.peft_type) is method
        assert method.parameters in PARAMETERS
        assert set(method.simple_fields) <= set(method.params.model_fields), key
        assert set(method.list_fields) <= set(method.params.model_fields), key
        for field in (method.dropout_field,):
            assert field is None or field in method.params.model_fields, key
        if method.prompt_learning:  # virtual tokens: nothing to merge, and the model's own loss
            assert not method.mergeable and not method.answer_logits_only and not method.wraps_linear
    assert keys_where(llama_cpp_adapter=True) == keys_where(mixed_batch=True) == [DEFAULT_METHOD]


@pytest.mark.parametrize("key", sorted(METHODS))
def test_the_worker_builds_each_methods_peft_config_from_the_registry(key, tmp_path):
    import peft

    from worker.peft_methods import build_peft_config

    method = METHODS[key]
    settings = method.params().model_dump()
    config = build_peft_config(key, settings, total_steps=40, model_path=str(tmp_path))
    assert type(config) is getattr(peft, method.peft_config)
    assert str(config.peft_type.value) == method.peft_type and config.task_type == peft.TaskType.CAUSAL_LM
    if method.total_steps_field:
        assert getattr(config, method.total_steps_field) == 40


def test_the_new_run_form_shows_each_methods_simple_fields(client):
    for key, method in METHODS.items():
        page = client.get(f"/runs/new?method={key}").text
        for name in method.simple_fields:
            assert f'name="peft.{name}"' in page, (key, name)


def test_methods_the_registry_cannot_export_are_refused_before_queueing(client, settings, db, tiny_model_dir):
    """A DoRA run's llama.cpp adapter file is refused when asked for (the worker would refuse it later)."""
    from app.runs import state
    from tests.conftest import DEMO_DATASET, upload

    model = client.post("/api/models", json={"path": str(tiny_model_dir)}).json()["id"]
    dataset = upload(client, "demo.json", DEMO_DATASET.read_bytes()).json()["id"]
    body = {"dataset_id": dataset, "base_model": model, "peft": {"use_dora": True}}
    run_id = client.post("/api/runs", json=body).json()["id"]
    with db.write_session() as session:
        state.claim_next(session=session, worker_id="box:7")
    adapter = settings.run_folder(run_id).adapter
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "use_dora": true}')
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    with db.write_session() as session:
        state.finish(session=session, run_id=run_id, worker_id="box:7", status="succeeded")
    refused = client.post(f"/api/runs/{run_id}/exports", json={"format": "lora-gguf"})
    assert refused.status_code == 422 and "llama.cpp cannot apply DoRA adapters" in refused.text
    assert client.get(f"/api/runs/{run_id}/exports").json() == []
