"""Exports: every format loaded back gives the merged model's answers (GGUF through transformers' loader and
through llama.cpp), exports are worker jobs with sizes, progress, caching and clear refusals, and a GGUF
export becomes a base model again."""

from __future__ import annotations

import json
import shutil
import threading
import zipfile
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch

from app import exports, jobs
from app.model_registry import find_model
from app.models import Export, utcnow
from app.runs import state
from tests.conftest import DEMO_DATASET, build_tiny_tokenizer, tiny_config, upload
from tests.test_engine import make_adapter
from worker import gguf_export
from worker.export import run_export
from worker.main import work_once
from worker.prepare import prepare_model

PROMPT = "What is the capital of Quillmere?"
# Q8_0 keeps 32 weights in 8 bits each with one scale: on these random-weight models the logits move by
# at most this much (seen: 0.011 Llama, 0.022 Qwen2)
Q8_0_LOGIT_TOLERANCE = 0.05


def greedy(model, ids: torch.Tensor, tokens: int = 20) -> list[int]:
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=tokens, do_sample=False)[0, ids.shape[1] :].tolist()


def tiny_merged(folder: Path, arch: str) -> Path:
    """A tiny random Llama (tied embeddings) or Qwen2 (biases, untied), with a random LoRA merged in."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    build_tiny_tokenizer(folder)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(folder, arch, tie_word_embeddings=arch == "llama"))
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    get_peft_model(model, lora).merge_and_unload().save_pretrained(folder)
    return folder


def write_gguf(out: Path, config: dict, tokenizer_dir: Path, state_dict, kind: str = "f16", **extra) -> Path:
    gguf_export.write_model(
        out,
        config=config,
        tokenizer_dir=tokenizer_dir,
        shapes={name: tuple(t.shape) for name, t in state_dict.items()},
        tensor=lambda name: state_dict[name].float().numpy(),
        kind=kind,
        name="tiny",
        **extra,
    )
    return out


def rounded_to_bf16(model):
    import copy

    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for param in rounded.parameters():
            if param.dim() >= 2:
                param.copy_(param.to(torch.bfloat16).float())
    return rounded


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_files_answer_like_the_merged_model(tmp_path, arch):
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tiny_merged(tmp_path, arch)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    expected = greedy(model, ids)
    state_dict = model.state_dict()
    config = gguf_export.read_config(folder)
    for kind in gguf_export.FORMATS:
        out = tmp_path / f"{kind}.gguf"
        seen: list[float] = []
        write_gguf(out, config, folder, state_dict, kind, progress=seen.append)
        assert seen[-1] == 1.0 and seen == sorted(seen)
        back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name).eval()
        with torch.no_grad():
            moved = (back(ids).logits - model(ids).logits).abs().max().item()
        if kind == "f16":
            assert greedy(back, ids) == expected and moved < 0.01, (arch, moved)
        elif kind == "bf16":  # exactly the model with its matrices rounded to BF16 (vectors stay F32)
            assert greedy(back, ids) == greedy(rounded_to_bf16(model), ids) and moved < 0.02, (arch, moved)
        else:
            assert moved < Q8_0_LOGIT_TOLERANCE, (arch, moved)
        # the tokenizer and chat template travel in the metadata: the file's own tokenizer encodes the same
        from_file = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
        assert from_file(PROMPT).input_ids == tokenizer(PROMPT).input_ids
        template = gguf.GGUFReader(out).get_field(gguf.Keys.Tokenizer.CHAT_TEMPLATE).contents()
        assert template == tokenizer.chat_template


def lora_folder(model_dir: Path, folder: Path) -> Path:
    return make_adapter(model_dir, folder, seed=5)


def test_a_lora_file_holds_the_adapter_in_llama_cpp_order(tmp_path, tiny_model_dir):
    """Reading the file back and applying it to the base weights gives the merged weights, in llama.cpp's
    layout (queries' and keys' rows reordered for its rotary embedding)."""
    import gguf
    from peft import PeftModel
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    adapter = lora_folder(tiny_model_dir, tmp_path / "adapter")
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    config = gguf_export.read_config(tiny_model_dir)
    out = tmp_path / "lora.gguf"
    gguf_export.write_lora(
        out,
        config=config,
        adapter_config=adapter_config,
        shapes={n: tuple(w.shape) for n, w in weights.items()},
        tensor=lambda n: weights[n],
        name="tiny lora",
    )
    reader = gguf.GGUFReader(out)
    assert reader.get_field(gguf.Keys.General.TYPE).contents() == "adapter"
    assert reader.get_field(gguf.Keys.Adapter.TYPE).contents() == "lora"
    alpha = reader.get_field(gguf.Keys.Adapter.LORA_ALPHA).contents()
    assert alpha == adapter_config["lora_alpha"]
    stored = {
        t.name: np.array(t.data, dtype=np.float32).reshape(tuple(reversed(t.shape.tolist())))
        for t in reader.tensors
    }
    assert len(stored) == len(weights)

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    base_weights = {k: v.numpy().copy() for k, v in base.state_dict().items()}
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload().state_dict()
    shape = gguf_export.Shape.from_config(config)
    checked = 0
    for hf_name, gguf_name in gguf_export.model_tensor_plan(shape, base_weights):
        if f"{gguf_name}.lora_a" not in stored:
            continue
        a, b = stored[f"{gguf_name}.lora_a"], stored[f"{gguf_name}.lora_b"]
        rank = a.shape[0]
        applied = shape.reorder(hf_name, base_weights[hf_name]) + alpha / rank * (b @ a)
        np.testing.assert_allclose(applied, shape.reorder(hf_name, merged[hf_name].numpy()), atol=2e-3)
        checked += 1
    assert checked == 2 * 7  # q, k, v, o, gate, up, down in both layers


def test_llama_cpp_answers_like_transformers(tmp_path, tiny_model_dir):
    """llama.cpp itself (llama-cpp-python) loads the F16 file, and the base model's F16 file with the LoRA
    file applied, and both answer greedily as the merged model does in transformers."""
    from llama_cpp import Llama
    from peft import PeftModel
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = lora_folder(tiny_model_dir, tmp_path / "adapter")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload().eval()
    expected = greedy(merged, ids, 12)
    config = gguf_export.read_config(tiny_model_dir)

    merged_file = write_gguf(tmp_path / "merged.gguf", config, tiny_model_dir, merged.state_dict())
    base_file = write_gguf(tmp_path / "base.gguf", config, tiny_model_dir, base_state)
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    lora_file = tmp_path / "lora.gguf"
    gguf_export.write_lora(
        lora_file,
        config=config,
        adapter_config=json.loads((adapter / "adapter_config.json").read_text()),
        shapes={n: tuple(w.shape) for n, w in weights.items()},
        tensor=lambda n: weights[n],
        name="tiny lora",
    )

    def llama_cpp_greedy(**load) -> list[int]:
        llm = Llama(n_ctx=128, n_threads=1, verbose=True, **load)  # quiet mode leaks /dev/null handles
        try:
            out = []
            for token in llm.generate(ids[0].tolist(), temp=0.0, top_k=1, reset=True):
                out.append(token)
                if len(out) == 12:
                    return out
            return out
        finally:
            llm.close()

    assert llama_cpp_greedy(model_path=str(merged_file)) == expected
    assert llama_cpp_greedy(model_path=str(base_file), lora_path=str(lora_file)) == expected


# --- exports as jobs ----------------------------------------------------------------------------------


@pytest.fixture
def finished_run(client, settings, db, tiny_model_dir):
    return build_finished_run(client, settings, db, tiny_model_dir)


def build_finished_run(client, settings, db, tiny_model_dir) -> int:
    """A run of the tiny model that finished with a random (untrained, non-zero) LoRA adapter."""
    model = client.post("/api/models", json={"path": str(tiny_model_dir)}).json()["id"]
    dataset = upload(client, "demo.json", DEMO_DATASET.read_bytes()).json()["id"]
    run_id = client.post("/api/runs", json={"dataset_id": dataset, "base_model": model}).json()["id"]
    with db.write_session() as session:
        assert state.claim_next(session=session, worker_id="box:7").id == run_id
    lora_folder(tiny_model_dir, settings.run_folder(run_id).adapter)
    with db.write_session() as session:
        state.finish(session=session, run_id=run_id, worker_id="box:7", status="succeeded")
    return run_id


def exporting(settings):
    """The worker's settings without base-model preparation (it would convert the bundled model first)."""
    return settings.model_copy(update={"prepare_models": False})


def make_queued_exports(settings, db) -> None:
    """The worker loop's passes until no export waits (each makes one, in a child process)."""
    stop = threading.Event()
    for _ in range(10):
        with db.session() as session:
            if not session.query(Export).filter(Export.status == "queued").count():
                return
        work_once(exporting(settings), db, me="exporter:1", stop=stop)
    raise AssertionError("exports still queued after ten passes")


@pytest.mark.trains
def test_a_run_exports_as_a_merged_model_and_a_q8_0_gguf(client, settings, db, finished_run, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sizes = {}
    for format in ("merged", "gguf-q8_0"):
        estimate = client.get(f"/api/runs/{finished_run}/exports/estimate", params={"format": format})
        assert estimate.status_code == 200, estimate.text
        sizes[format] = estimate.json()["estimated_bytes"]
        queued = client.post(f"/api/runs/{finished_run}/exports", json={"format": format})
        assert queued.status_code == 201, queued.text
        assert queued.json()["status"] == "queued" and queued.json()["estimated_bytes"] == sizes[format]
    make_queued_exports(settings, db)
    listed = {e["format"]: e for e in client.get(f"/api/runs/{finished_run}/exports").json()}
    assert {e["status"] for e in listed.values()} == {"succeeded"}, listed
    for format, export in listed.items():
        # the estimate shown before starting is within 10% of the file made
        assert abs(export["size_bytes"] - sizes[format]) <= 0.1 * export["size_bytes"], (
            format,
            export,
            sizes,
        )
        assert export["progress"] == 1.0
    # asking again gives the file already made
    again = client.post(f"/api/runs/{finished_run}/exports", json={"format": "merged"})
    assert again.status_code == 200 and again.json()["id"] == listed["merged"]["id"]

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tuned = PeftModel.from_pretrained(base, settings.run_folder(finished_run).adapter).eval()
    expected = greedy(tuned, ids)

    download = client.get(listed["merged"]["download_url"])
    assert download.status_code == 200
    archive = settings.data_dir / "merged.zip"
    archive.write_bytes(download.content)
    with zipfile.ZipFile(archive) as zipped:
        zipped.extractall(settings.data_dir / "unzipped")
    folder = settings.data_dir / "unzipped" / f"run-{finished_run}-merged"
    merged = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert greedy(merged, ids) == expected
    assert AutoTokenizer.from_pretrained(folder).chat_template == tokenizer.chat_template

    gguf_file = settings.data_dir / "model.gguf"
    gguf_file.write_bytes(client.get(listed["gguf-q8_0"]["download_url"]).content)
    back = AutoModelForCausalLM.from_pretrained(settings.data_dir, gguf_file=gguf_file.name).eval()
    with torch.no_grad():
        assert (back(ids).logits - tuned(ids).logits).abs().max().item() < Q8_0_LOGIT_TOLERANCE
    modelfile = client.get(listed["gguf-q8_0"]["modelfile_url"]).text
    assert f"FROM ./run-{finished_run}-q8_0.gguf" in modelfile
    assert "<|im_start|>{{ .Role }}" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile

    # the GGUF becomes a base model of its own; deleting the export removes its files
    registered = client.post(f"/api/exports/{listed['gguf-q8_0']['id']}/register")
    assert registered.status_code == 201, registered.text
    assert registered.json()["source"] == "gguf" and registered.json()["status"] == "preparing"
    with db.session() as session:  # what the worker does next: convert it, as any GGUF model
        entry = find_model(settings, registered.json()["id"], session=session)
    assert prepare_model(entry) is None
    models = {m["id"]: m for m in client.get("/api/models").json()}
    assert models[registered.json()["id"]]["status"] == "ready", models[registered.json()["id"]]
    estimate = client.post(
        "/api/runs/estimate", json={"dataset_id": 1, "base_model": registered.json()["id"]}
    )  # a tuned model can be tuned again
    assert estimate.status_code == 200, estimate.text
    kept = client.delete(f"/api/exports/{listed['gguf-q8_0']['id']}")  # the model's file stays
    assert kept.status_code == 409 and "remove the model there first" in kept.text
    folder_of_merged = exports.export_dir(settings, _export(db, listed["merged"]["id"]))
    assert client.delete(f"/api/exports/{listed['merged']['id']}").status_code == 204
    assert not folder_of_merged.exists()
    assert client.get(f"/api/exports/{listed['merged']['id']}").status_code == 404


def _export(db, export_id: int) -> Export:
    with db.session() as session:
        export = session.get(Export, export_id)
        session.expunge(export)
        return export


def test_refusals_are_sentences(client, settings, db, finished_run):
    def refusal(**params) -> str:
        response = client.get(f"/api/runs/{finished_run}/exports/estimate", params=params)
        assert response.status_code == 422, response.text
        return response.json()["detail"][0]["message"]

    assert "There is no export format 'onnx'" in refusal(format="onnx")
    assert "no complete checkpoint at step 7" in refusal(format="merged", step=7)
    with db.write_session() as session:
        run = session.get(state.Run, finished_run)
        run.method = "prompt_tuning"
        session.commit()
    assert "nothing to merge" in refusal(format="gguf-f16")
    assert "Only LoRA adapters" in refusal(format="lora-gguf")
    queued = client.post(f"/api/runs/{finished_run}/exports", json={"format": "merged"})
    assert queued.status_code == 422 and "nothing to merge" in queued.text


def test_a_model_gguf_cannot_hold_is_refused_before_it_is_queued(client, settings, db, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2"
    build_tiny_tokenizer(folder)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=600)).save_pretrained(folder)
    model = client.post("/api/models", json={"path": str(folder)}).json()["id"]
    dataset = upload(client, "demo.json", DEMO_DATASET.read_bytes()).json()["id"]
    run_id = client.post("/api/runs", json={"dataset_id": dataset, "base_model": model}).json()["id"]
    with db.write_session() as session:
        state.claim_next(session=session, worker_id="box:7")
    settings.run_folder(run_id).adapter.mkdir(parents=True)
    (settings.run_folder(run_id).adapter / "adapter_config.json").write_text("{}")
    with db.write_session() as session:
        state.finish(session=session, run_id=run_id, worker_id="box:7", status="succeeded")
    response = client.post(f"/api/runs/{run_id}/exports", json={"format": "gguf-q8_0"})
    assert response.status_code == 422
    assert "GGUF export supports Llama and Qwen2 models" in response.text and "'gpt2'" in response.text


def test_an_export_that_fails_says_why_and_can_be_tried_again(client, settings, db, finished_run):
    queued = client.post(f"/api/runs/{finished_run}/exports", json={"format": "lora-gguf"}).json()
    (settings.run_folder(finished_run).adapter / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "use_dora": True})
    )
    make_queued_exports(settings, db)
    failed = client.get(f"/api/exports/{queued['id']}").json()
    assert failed["status"] == "failed", failed
    assert failed["error"] == "llama.cpp cannot apply DoRA adapters. Export the merged model instead."
    assert failed["download_url"] is None
    assert client.get(f"/api/exports/{queued['id']}/file").status_code == 404
    # no half-written folder stays behind
    assert not list(settings.run_folder(finished_run).exports_dir.glob(".*partial*"))
    retried = client.post(f"/api/runs/{finished_run}/exports", json={"format": "lora-gguf"})
    assert retried.status_code == 201 and retried.json()["id"] == queued["id"]
    assert retried.json()["status"] == "queued" and retried.json()["error"] is None
    with db.write_session() as session:  # its earlier try is forgotten: the retry is its first
        assert jobs.claim(session=session, kind=jobs.EXPORT, worker_id="w").attempts == 1
        assert len(jobs.attempts_of(session=session, kind=jobs.EXPORT, job_id=queued["id"])) == 1


@pytest.mark.databases
def test_a_silent_workers_export_goes_back_to_the_queue_and_a_running_one_is_not_deleted(
    client, settings, db, finished_run
):
    queued = client.post(f"/api/runs/{finished_run}/exports", json={"format": "merged"}).json()

    def go_silent() -> None:
        with db.write_session() as session:
            session.get(Export, queued["id"]).heartbeat_at = utcnow() - timedelta(minutes=5)
            session.commit()

    with db.write_session() as session:
        claimed = jobs.claim(session=session, kind=jobs.EXPORT, worker_id="gone:1")
        assert claimed is not None and claimed.id == queued["id"]
        assert jobs.claim(session=session, kind=jobs.EXPORT, worker_id="other:2") is None
    assert client.delete(f"/api/exports/{queued['id']}").status_code == 409
    with db.write_session() as session:
        assert exports.report(session=session, export_id=queued["id"], worker_id="gone:1", progress=0.4)
        assert not exports.report(session=session, export_id=queued["id"], worker_id="other:2", progress=0.9)
        assert jobs.requeue_stale(session=session, stale_after=timedelta(seconds=60)) == {}
    go_silent()
    with db.write_session() as session:
        assert jobs.requeue_stale(session=session, stale_after=timedelta(seconds=60)) == {
            "export": [queued["id"]]
        }
    back = client.get(f"/api/exports/{queued['id']}").json()
    assert back["status"] == "queued" and back["progress"] == 0.0
    with db.write_session() as session:  # the silent worker's late report and finish no longer count
        assert not exports.report(session=session, export_id=queued["id"], worker_id="gone:1", progress=0.5)
        assert not exports.finish(session=session, export_id=queued["id"], worker_id="gone:1", size_bytes=1)
    # a worker that goes silent on it every time: after the third try it fails with a sentence
    for attempt in (2, 3):
        with db.write_session() as session:
            assert (
                jobs.claim(session=session, kind=jobs.EXPORT, worker_id=f"gone:{attempt}").id == queued["id"]
            )
        go_silent()
        with db.write_session() as session:
            jobs.requeue_stale(session=session, stale_after=timedelta(seconds=60))
    failed = client.get(f"/api/exports/{queued['id']}").json()
    assert failed["status"] == "failed" and "stopped responding 3 times" in failed["error"]


def test_a_stopping_worker_hands_its_export_back(settings, db, finished_run, client):
    queued = client.post(f"/api/runs/{finished_run}/exports", json={"format": "merged"}).json()
    with db.write_session() as session:
        export = jobs.claim(session=session, kind=jobs.EXPORT, worker_id="box:9")
    stop = threading.Event()
    threading.Timer(1.0, stop.set).start()  # the worker is told to stop while the child loads the model
    run_export(settings, db, export, me="box:9", stop=stop)
    back = client.get(f"/api/exports/{queued['id']}").json()
    assert back["status"] == "queued" and back["progress"] == 0.0
    assert not list(settings.run_folder(finished_run).exports_dir.glob("*"))  # nothing half-made stays
    with db.session() as session:
        # a stop on purpose uses up no try: the attempt ended as handed back, not lost
        tries = jobs.attempts_of(session=session, kind=jobs.EXPORT, job_id=queued["id"])
        assert [(a.worker_id, a.outcome) for a in tries] == [("box:9", "requeued")]
        assert jobs.lost_attempts(session, jobs.EXPORT, queued["id"]) == 0


@pytest.mark.trains
def test_a_checkpoint_exports_and_one_rotated_away_fails_with_a_sentence(client, settings, db, finished_run):
    folder = settings.run_folder(finished_run)
    checkpoint = folder.checkpoint(3)
    shutil.copytree(folder.adapter, checkpoint.path)
    checkpoint.mark_complete()
    for format in ("lora-gguf", "gguf-f16"):
        assert (
            client.post(f"/api/runs/{finished_run}/exports", json={"format": format, "step": 3}).status_code
            == 201
        )
    stop = threading.Event()
    work_once(exporting(settings), db, me="exporter:1", stop=stop)  # the LoRA file, from the checkpoint
    shutil.rmtree(checkpoint.path)  # rotation removes the checkpoint before the second export starts
    work_once(exporting(settings), db, me="exporter:1", stop=stop)
    made = {e["format"]: e for e in client.get(f"/api/runs/{finished_run}/exports").json()}
    assert made["lora-gguf"]["status"] == "succeeded" and made["lora-gguf"]["step"] == 3
    lora = client.get(made["lora-gguf"]["download_url"])
    assert lora.content[:4] == b"GGUF"
    assert f"run-{finished_run}-step-3-lora-f16.gguf" in lora.headers["content-disposition"]
    assert "ADAPTER ./run-" in client.get(made["lora-gguf"]["modelfile_url"]).text
    assert made["gguf-f16"]["status"] == "failed"
    assert made["gguf-f16"]["error"] == f"Run {finished_run} has no complete checkpoint at step 3."
    # the file already made stays available although its checkpoint is gone
    again = client.post(f"/api/runs/{finished_run}/exports", json={"format": "lora-gguf", "step": 3})
    assert again.status_code == 200 and again.json()["id"] == made["lora-gguf"]["id"]


def test_a_refusal_on_the_page_keeps_the_list(client, settings, finished_run):
    csrf = client.get(f"/runs/{finished_run}").text.split('"X-CSRF-Token": "')[1].split('"')[0]
    headers = {"HX-Request": "true", "X-CSRF-Token": csrf}
    refused = client.post(
        f"/runs/{finished_run}/exports", data={"step": "9", "format": "merged"}, headers=headers
    )
    assert refused.status_code == 422
    assert refused.text.lstrip().startswith('<div id="export-list">')
    assert "has no complete checkpoint at step 9" in refused.text


def test_pre_tokenizers_are_named_for_llama_cpp_or_refused():
    from app.exports import pre_tokenizer

    def split(regex: str) -> dict:
        return {
            "type": "Sequence",
            "pretokenizers": [{"type": "Split", "pattern": {"Regex": regex}}, {"type": "ByteLevel"}],
        }

    llama3 = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+"
    qwen2 = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+"
    assert pre_tokenizer(split(llama3), "llama") == "llama-bpe"
    assert pre_tokenizer(split(qwen2), "qwen2") == "qwen2"
    assert pre_tokenizer(split("\\s+"), "llama") is None  # unknown rules: refused, never guessed
    smollm = {
        "type": "Sequence",
        "pretokenizers": [{"type": "Digits", "individual_digits": True}, {"type": "ByteLevel"}],
    }
    assert pre_tokenizer(smollm, "llama") == "smollm"
    assert pre_tokenizer({"type": "ByteLevel", "use_regex": True}, "llama") == "gpt-2"


def test_not_enough_disk_is_a_sentence(tmp_path):
    from worker.export import check_disk

    with pytest.raises(
        gguf_export.ExportError, match=r"Not enough disk space for this export: it needs about"
    ):
        check_disk(tmp_path, 10**18)


def test_the_modelfile_follows_the_runs_prompt_layout():
    chat = exports.modelfile(
        model_file="m.gguf",
        prompt_format="chat",
        chat_template="{{ '<|im_start|>' }}",
        eos_token="<|im_end|>",
    )
    assert 'PARAMETER stop "<|im_start|>"' in chat and chat.count('PARAMETER stop "<|im_end|>"') == 1
    tutorial = exports.modelfile(
        model_file="m.gguf", prompt_format="instruction", chat_template=None, eos_token="</s>"
    )
    assert 'TEMPLATE """Instruction: {{ .Prompt }}\n' in tutorial and 'PARAMETER stop "</s>"' in tutorial
    adapter = exports.modelfile(
        model_file="a.gguf",
        prompt_format="chat",
        chat_template="<|start_header_id|>",
        eos_token="<|eot_id|>",
        adapter=True,
        base_gguf=Path("/models/base.gguf"),
    )
    assert (
        "FROM /models/base.gguf\nADAPTER ./a.gguf" in adapter and "<|start_header_id|>{{ .Role }}" in adapter
    )
    unknown = exports.modelfile(
        model_file="m.gguf", prompt_format="chat", chat_template="[INST]", eos_token=None
    )
    assert "TEMPLATE" not in unknown.replace("add a TEMPLATE line", "")


def test_the_export_card_waits_for_an_adapter_then_sizes_each_choice(client, settings, db, finished_run):
    dataset = client.get(f"/api/runs/{finished_run}").json()["dataset_id"]
    model = client.get(f"/api/runs/{finished_run}").json()["base_model"]
    queued = client.post("/api/runs", json={"dataset_id": dataset, "base_model": model}).json()["id"]
    waiting = client.get(f"/runs/{queued}/export-card", headers={"HX-Request": "true"}).text
    assert f'hx-get="/runs/{queued}/export-card"' in waiting and "export-form" not in waiting

    card = client.get(f"/runs/{finished_run}/export-card", headers={"HX-Request": "true"}).text
    assert 'id="export-form"' in card and "export-card" not in card.split('id="export-form"')[0]
    assert "Final adapter" in card and "About <strong>" in card
    csrf = client.get(f"/runs/{finished_run}").text.split('"X-CSRF-Token": "')[1].split('"')[0]
    headers = {"HX-Request": "true", "X-CSRF-Token": csrf}
    sized = client.post(
        f"/runs/{finished_run}/exports/estimate", data={"step": "0", "format": "lora-gguf"}, headers=headers
    )
    assert sized.status_code == 200 and "About <strong>" in sized.text and "--lora" in sized.text
    with db.write_session() as session:
        session.get(state.Run, finished_run).method = "ia3"
        session.commit()
    refused = client.post(
        f"/runs/{finished_run}/exports/estimate", data={"step": "0", "format": "lora-gguf"}, headers=headers
    )
    assert "Only LoRA adapters can be exported as a llama.cpp adapter file" in refused.text
    bad_step = client.post(
        f"/runs/{finished_run}/exports", data={"step": "x", "format": "merged"}, headers=headers
    )
    assert bad_step.status_code == 422 and "Choose the final adapter" in bad_step.text
