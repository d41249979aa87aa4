"""Exports: a run's adapter (or one checkpoint's) made into files other tools load, by a worker.

The one owner of the export formats, of what each needs and weighs before it is made, of the files each
leaves, and of every change to the `exports` table (queued → running → succeeded | failed). An export is a
job of the queue (app.jobs, kind `export`): workers claim it, beat on it and hand it back by the queue's
rules. No torch here: the web tier checks and sizes an export
from the files' headers; `worker/export.py` makes it.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from math import prod
from pathlib import Path

from sqlalchemy import delete as sa_delete
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app import jobs
from app.config import Settings
from app.model_registry import ModelEntry, find_model, register_model, tensor_shapes
from app.models import WITH_ADAPTER, Export, ExportStatus, RegisteredModel, Run, utcnow
from app.peft_methods import method as peft_method
from app.runs.folder import ADAPTER_WEIGHTS


@dataclass(frozen=True)
class Format:
    key: str
    label: str
    hint: str
    gguf_type: str | None = None  # f16 | bf16 | q8_0 for a whole-model GGUF
    adapter_only: bool = False


FORMATS = {
    f.key: f
    for f in (
        Format(
            "merged",
            "Merged model (safetensors)",
            "The base model with the adapter merged in, with its tokenizer and chat template: loads with "
            "transformers' from_pretrained and in vLLM.",
        ),
        Format(
            "gguf-q8_0",
            "GGUF Q8_0",
            "One file for llama.cpp, Ollama and LM Studio, weights in 8 bits: about half of F16's size, "
            "answers nearly the same.",
            gguf_type="q8_0",
        ),
        Format(
            "gguf-f16",
            "GGUF F16",
            "One file for llama.cpp, Ollama and LM Studio, weights in 16 bits: the same answers as the "
            "merged model.",
            gguf_type="f16",
        ),
        Format(
            "gguf-bf16",
            "GGUF BF16",
            "Like F16 with the range of the training weights; for machines that compute in BF16.",
            gguf_type="bf16",
        ),
        Format(
            "lora-gguf",
            "LoRA GGUF (adapter only)",
            "The adapter alone, for llama.cpp's --lora or Ollama's ADAPTER over the base model's GGUF: "
            "megabytes instead of a whole model.",
            adapter_only=True,
        ),
    )
}
GGUF_ARCHITECTURES = ("llama", "qwen2")
MODELFILE = "Modelfile"
DORA_REFUSED = "llama.cpp cannot apply DoRA adapters. Export the merged model instead."
# bytes per value in a GGUF file: vectors stay F32; Q8_0 keeps 32 values in 34 bytes
GGUF_VALUE_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32}
SAFETENSORS_VALUE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1}
DISK_MARGIN = 1.1  # the worker wants this much more free space than the estimate


class ExportRefused(ValueError):
    """An export that cannot be made from this run; the text says why and what to do instead."""


@dataclass(frozen=True)
class Plan:
    """What an export needs: the base model's folder, the adapter's folder, and the estimated size."""

    format: Format
    run: Run
    step: int
    model: ModelEntry
    adapter: Path
    estimated_bytes: int


def source_label(step: int) -> str:
    return "final adapter" if step == 0 else f"checkpoint at step {step}"


def file_name(export: Export) -> str:
    """The export's main file: what the Download button gives."""
    source = "" if export.step == 0 else f"-step-{export.step}"
    stem = f"run-{export.run_id}{source}"
    if export.format == "merged":
        return f"{stem}-merged.zip"
    if export.format == "lora-gguf":
        return f"{stem}-lora-f16.gguf"
    return f"{stem}-{FORMATS[export.format].gguf_type}.gguf"


def export_dir(settings: Settings, export: Export) -> Path:
    return settings.run_folder(export.run_id).export_dir(export.format, export.step)


def export_file(settings: Settings, export: Export) -> Path:
    return export_dir(settings, export) / file_name(export)


def has_modelfile(export: Export) -> bool:
    """GGUF exports (whole model or adapter) come with an Ollama Modelfile."""
    return bool(FORMATS[export.format].gguf_type or FORMATS[export.format].adapter_only)


def modelfile_path(settings: Settings, export: Export) -> Path:
    return export_dir(settings, export) / MODELFILE


# --- checks and sizes, before anything is queued --------------------------------------------------------


def plan(settings: Settings, *, session: Session, run: Run, step: int, format: str) -> Plan:
    """Check that this run's adapter (step 0) or checkpoint can be exported in `format` here, and size it.
    Raises ExportRefused with a sentence."""
    chosen = FORMATS.get(format)
    if chosen is None:
        raise ExportRefused(f"There is no export format '{format}'; choose one of {', '.join(FORMATS)}.")
    folder = settings.run_folder(run.id)
    if step == 0:
        if run.status not in WITH_ADAPTER or not folder.has_adapter:
            raise ExportRefused(f"Run {run.id} has no adapter to export yet (it is {run.status}).")
        adapter = folder.adapter
    else:
        checkpoint = folder.checkpoint(step)
        if not checkpoint.has_adapter:
            raise ExportRefused(f"Run {run.id} has no complete checkpoint at step {step}.")
        adapter = checkpoint.path
    method = peft_method(run.method)
    if chosen.adapter_only and not method.llama_cpp_adapter:
        raise ExportRefused(
            "Only LoRA adapters can be exported as a llama.cpp adapter file; this run trained "
            f"{method.label}. Export a merged GGUF instead."
        )
    if chosen.adapter_only and (run.config.get("peft") or {}).get("use_dora"):
        raise ExportRefused(DORA_REFUSED)
    if not chosen.adapter_only and not method.mergeable:
        raise ExportRefused(
            f"A {method.label} run learns virtual tokens, not weights: there is nothing to merge into the "
            "model. Download its adapter instead."
        )
    model = find_model(settings, run.base_model, session=session)
    if model is None or not model.ready:
        raise ExportRefused(
            f"The run's base model {run.base_model} is not available on this server, and an export needs it."
        )
    config = json.loads((model.folder / "config.json").read_text(encoding="utf-8"))
    if chosen.gguf_type or chosen.adapter_only:
        gguf_check(config, model.folder)
    return Plan(chosen, run, step, model, adapter, estimate(chosen, model.folder, adapter, config))


# --- what a GGUF file can hold ---------------------------------------------------------------------------


def gguf_check(config: dict, folder: Path, original_pre: str | None = None) -> str:
    """Check that a model can be written as GGUF here (the architecture, its rotary embedding, its
    tokenizer) and return llama.cpp's name for its pre-tokenizer. Raises ExportRefused with a sentence."""
    model_type = config.get("model_type", "of an unknown kind")
    if model_type not in GGUF_ARCHITECTURES:
        raise ExportRefused(
            f"GGUF export supports Llama and Qwen2 models; this run's base model is {model_type!r}. "
            "Export the merged model instead."
        )
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type != "default":
        raise ExportRefused(
            f"GGUF export supports the plain rotary embedding; this model scales it ({rope_type!r}). "
            "Export the merged model instead."
        )
    tokenizer = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    pre = tokenizer.get("pre_tokenizer") or {}
    if (tokenizer.get("model") or {}).get("type") != "BPE" or "ByteLevel" not in json.dumps(pre):
        raise ExportRefused(
            "GGUF export supports byte-level BPE tokenizers (those of Llama 3, Qwen2 and SmolLM2); this "
            "model's tokenizer is another kind. Export the merged model instead."
        )
    name = original_pre or pre_tokenizer(pre, model_type)
    if name is None:
        raise ExportRefused(
            "This model's tokenizer splits text in a way Tuneboard cannot name for llama.cpp, which would "
            "then split it differently. Export the merged model instead."
        )
    return name


QWEN2_DIGITS = "\\p{N}|"  # Qwen2's split rule takes digits one by one; Llama 3's up to three
LLAMA3_DIGITS = "\\p{N}{1,3}"


def pre_tokenizer(pre: dict, model_type: str) -> str | None:
    """llama.cpp's name for a tokenizer.json pre-tokenizer it knows (it picks its splitting rules by
    it), or None."""
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    types = [p.get("type") for p in parts]
    if types == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    if types == ["Split", "ByteLevel"]:
        pattern = json.dumps(parts[0].get("pattern"))
        if LLAMA3_DIGITS in pattern:
            return "llama-bpe"
        if QWEN2_DIGITS in pattern and model_type == "qwen2":
            return "qwen2"
        return None
    if types == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    return None


def gguf_tensor_kind(kind: str, shape: tuple[int, ...]) -> str:
    """A tensor's type in a GGUF file of `kind`: vectors (norms, biases) stay f32 as llama.cpp expects;
    matrices take the file's type, except rows Q8_0's 32-value blocks cannot divide, which stay f16."""
    if len(shape) < 2:
        return "f32"
    if kind == "q8_0" and shape[-1] % 32:
        return "f16"
    return kind


def estimate(chosen: Format, model_folder: Path, adapter: Path, config: dict) -> int:
    """The export's size in bytes, from the safetensors headers of the base model and the adapter."""
    if chosen.adapter_only:
        return sum(prod(shape) * 2 for shape, _ in tensor_shapes(adapter, ADAPTER_WEIGHTS[0]).values())
    tokenizer = sum(p.stat().st_size for p in model_folder.glob("tokenizer*") if p.is_file())
    shapes = tensor_shapes(model_folder)
    if chosen.gguf_type is None:
        values = sum(prod(shape) * SAFETENSORS_VALUE_BYTES.get(dtype, 4) for shape, dtype in shapes.values())
        return int(values + tokenizer)
    total = sum(
        prod(shape) * GGUF_VALUE_BYTES[gguf_tensor_kind(chosen.gguf_type, shape)]
        for name, (shape, _) in shapes.items()
        if not (name == "lm_head.weight" and config.get("tie_word_embeddings"))
    )
    return int(total + tokenizer)


# --- the table -------------------------------------------------------------------------------------------


def _find(session: Session, run_id: int, step: int, format: str) -> Export | None:
    return session.scalar(
        select(Export).where(Export.run_id == run_id, Export.step == step, Export.format == format)
    )


def request(settings: Settings, *, session: Session, run: Run, step: int, format: str) -> tuple[Export, bool]:
    """Queue an export, or give the one already made or under way (exports are cached per run, source and
    format, even once the checkpoint they came from is gone). A failed one, or one whose files were
    removed, is queued again. Returns (export, queued now)."""
    export = _find(session, run.id, step, format)
    if export is not None and (
        export.status in (ExportStatus.QUEUED, ExportStatus.RUNNING)
        or (export.status == ExportStatus.SUCCEEDED and export_file(settings, export).is_file())
    ):
        return export, False
    chosen = plan(settings, session=session, run=run, step=step, format=format)
    if export is None:
        export = Export(run_id=run.id, step=step, format=format)
        session.add(export)
    else:  # made again from the start: the earlier tries do not count against it
        jobs.forget(session=session, kind=jobs.EXPORT, job_id=export.id)
    export.status, export.progress, export.stage = ExportStatus.QUEUED, 0.0, None
    export.error, export.size_bytes, export.worker_id, export.attempts = None, None, None, 0
    export.estimated_bytes, export.created_at = chosen.estimated_bytes, utcnow()
    export.started_at, export.finished_at = None, None
    try:
        session.commit()
    except IntegrityError:  # the same export asked for twice at once: the other request queued it
        session.rollback()
        again = _find(session, run.id, step, format)
        if again is None:
            raise
        return again, False
    return export, True


def list_for_run(*, session: Session, run_id: int) -> list[Export]:
    return list(session.scalars(select(Export).where(Export.run_id == run_id).order_by(Export.id.desc())))


def report(
    *,
    session: Session,
    export_id: int,
    worker_id: str,
    progress: float | None = None,
    stage: str | None = None,
) -> bool:
    """The worker's heartbeat on an export, with how far it got. False: the export is no longer its own
    (handed back after the worker went silent, or gone) and the worker should stop making it."""
    values: dict = {}
    if progress is not None:
        values["progress"] = max(0.0, min(1.0, progress))
    if stage is not None:
        values["stage"] = stage[:200]
    ours, _ = jobs.beat(session=session, kind=jobs.EXPORT, job_id=export_id, worker_id=worker_id, **values)
    return ours


def finish(*, session: Session, export_id: int, worker_id: str, size_bytes: int) -> bool:
    """Mark the export made. False: it was no longer this worker's (its files are the next attempt's)."""
    return jobs.end(
        session=session,
        kind=jobs.EXPORT,
        job_id=export_id,
        worker_id=worker_id,
        status=ExportStatus.SUCCEEDED,
        progress=1.0,
        stage=None,
        size_bytes=size_bytes,
    )


def fail(*, session: Session, export_id: int, worker_id: str, error: str) -> None:
    jobs.end(
        session=session,
        kind=jobs.EXPORT,
        job_id=export_id,
        worker_id=worker_id,
        status=ExportStatus.FAILED,
        stage=None,
        error=error[:4000],
    )


class ExportBusy(RuntimeError):
    pass


def delete(settings: Settings, *, session: Session, export: Export) -> None:
    """Remove an export's row and files (with any half-written folder). Refused (ExportBusy) while a worker
    makes it, and while its file is a registered base model."""
    path = export_file(settings, export)
    if session.scalar(select(RegisteredModel.id).where(RegisteredModel.path == str(path))) is not None:
        raise ExportBusy(
            "This GGUF file is a base model on the Models page; remove the model there first, then the "
            "export."
        )
    folder = export_dir(settings, export)
    gone = session.execute(
        sa_delete(Export)
        .where(Export.id == export.id, Export.status != ExportStatus.RUNNING)
        .returning(Export.id)
    ).scalar_one_or_none()
    if gone is not None:
        jobs.forget(session=session, kind=jobs.EXPORT, job_id=export.id)
    session.commit()
    if gone is None:
        raise ExportBusy("This export is being made; delete it once it has finished.")
    shutil.rmtree(folder, ignore_errors=True)
    for partial in folder.parent.glob(f".{folder.name}.partial-*"):
        shutil.rmtree(partial, ignore_errors=True)


def register(settings: Settings, *, session: Session, export: Export, run: Run) -> RegisteredModel:
    """Make a finished GGUF export a base model of its own (tune a tuned model again)."""
    gguf_type = FORMATS[export.format].gguf_type
    if not gguf_type or export.status != ExportStatus.SUCCEEDED:
        raise ExportRefused("Only a finished GGUF export of a whole model can become a base model.")
    source = "" if export.step == 0 else f", step {export.step}"
    return register_model(
        settings,
        str(export_file(settings, export)),
        f"#{run.id} {run.name} ({gguf_type.upper()}{source})",
        session=session,
    )


# --- Ollama's Modelfile ----------------------------------------------------------------------------------

CHATML = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
    "{{ end }}<|im_start|>assistant\n"
)
LLAMA3 = (
    "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
    "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
)
# the tutorial layout (app.prompts.instruction_prompt), with a system prompt folded into the Input line
INSTRUCTION = "Instruction: {{ .Prompt }}\n{{ if .System }}Input: system: {{ .System }}\n{{ end }}Answer: "


def modelfile(
    *,
    model_file: str,
    prompt_format: str,
    chat_template: str | None,
    eos_token: str | None,
    adapter: bool = False,
    base_gguf: Path | None = None,
    rendered: str | None = None,
) -> str:
    """An Ollama Modelfile for the export: the file (or the base model's GGUF and the adapter), the prompt
    layout the run was trained with as a Go template, and the tokens that end an answer. `rendered` is the
    chat template applied to one question alone: a system prompt it adds by itself (SmolLM2's does) becomes
    the Modelfile's SYSTEM, so that Ollama asks the way the run was trained."""
    template, stops, system = None, [eos_token] if eos_token else [], None
    if prompt_format == "instruction":
        template = INSTRUCTION
    elif chat_template and "<|im_start|>" in chat_template:
        template, stops = CHATML, ["<|im_start|>", "<|im_end|>"]
        system = re.match(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", rendered or "", re.S)
    elif chat_template and "<|start_header_id|>" in chat_template:
        template, stops = LLAMA3, ["<|start_header_id|>", "<|eot_id|>"]
        system = re.search(
            r"<\|start_header_id\|>system<\|end_header_id\|>\n\n(.*?)<\|eot_id\|>", rendered or "", re.S
        )
    lines = ["# Ollama: ollama create NAME -f Modelfile, then ollama run NAME"]
    if not adapter:
        lines.append(f"FROM ./{model_file}")
    else:
        lines += [
            "# The adapter applies over the base model it was trained from, as a GGUF file:",
            f"FROM {base_gguf or './base-model.gguf'}",
            f"ADAPTER ./{model_file}",
        ]
    if template is None:
        lines.append("# This model's chat template has no Go translation here: add a TEMPLATE line for it.")
    else:
        lines.append(f'TEMPLATE """{template}"""')
    lines += [f'PARAMETER stop "{stop}"' for stop in dict.fromkeys(stops)]
    if system and system.group(1).strip():
        lines.append(f'SYSTEM """{system.group(1)}"""')
    return "\n".join(lines) + "\n"
