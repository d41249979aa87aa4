"""Exports: a run's adapter (or one checkpoint's) made into files other tools load, by a worker.

The one owner of the export formats, of what each needs and weighs before it is made, of the files each
leaves, and of every change to the `exports` table (queued → running → succeeded | failed; a worker that
goes silent hands its export back to the queue). No torch here: the web tier checks and sizes an export
from the files' headers; `worker/export.py` makes it.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.config import Settings
from app.model_registry import ModelEntry, find_model, register_model, tensor_shapes
from app.models import WITH_ADAPTER, Export, ExportStatus, RegisteredModel, Run, utcnow


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
MERGEABLE = ("lora", "loha", "lokr", "adalora", "ia3")  # PEFT merges their weights into the model's
MODELFILE = "Modelfile"
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


def modelfile_path(settings: Settings, export: Export) -> Path | None:
    path = export_dir(settings, export) / MODELFILE
    return path if FORMATS[export.format].gguf_type or export.format == "lora-gguf" else None


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
    if chosen.adapter_only and run.method != "lora":
        raise ExportRefused(
            f"Only LoRA adapters can be exported as a llama.cpp adapter file; this run trained {run.method}. "
            "Export a merged GGUF instead."
        )
    if not chosen.adapter_only and run.method not in MERGEABLE:
        raise ExportRefused(
            f"A {run.method} run learns virtual tokens, not weights: there is nothing to merge into the "
            "model. Download its adapter instead."
        )
    model = find_model(settings, run.base_model, session=session)
    if model is None or not model.ready:
        raise ExportRefused(
            f"The run's base model {run.base_model} is not available on this server, and an export needs it."
        )
    config = json.loads((model.folder / "config.json").read_text(encoding="utf-8"))
    if (chosen.gguf_type or chosen.adapter_only) and config.get("model_type") not in GGUF_ARCHITECTURES:
        raise ExportRefused(
            f"GGUF export supports Llama and Qwen2 models; this run's base model is "
            f"{config.get('model_type', 'of an unknown architecture')!r}. Export the merged model instead."
        )
    return Plan(chosen, run, step, model, adapter, estimate(chosen, model.folder, adapter, config))


def estimate(chosen: Format, model_folder: Path, adapter: Path, config: dict) -> int:
    """The export's size in bytes, from the safetensors headers of the base model and the adapter."""
    if chosen.adapter_only:
        return sum(
            _count(shape) * 2 for shape, _ in tensor_shapes(adapter, "adapter_model.safetensors").values()
        )
    tokenizer = sum(p.stat().st_size for p in model_folder.glob("tokenizer*") if p.is_file())
    shapes = tensor_shapes(model_folder)
    if chosen.gguf_type is None:
        values = sum(
            _count(shape) * SAFETENSORS_VALUE_BYTES.get(dtype, 4) for shape, dtype in shapes.values()
        )
        return int(values + tokenizer)
    total = 0.0
    for name, (shape, _) in shapes.items():
        if name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue
        kind = chosen.gguf_type
        if len(shape) < 2:
            kind = "f32"
        elif kind == "q8_0" and shape[-1] % 32:
            kind = "f16"
        total += _count(shape) * GGUF_VALUE_BYTES[kind]
    return int(total + tokenizer)


def _count(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


# --- the table -------------------------------------------------------------------------------------------


def request(settings: Settings, *, session: Session, run: Run, step: int, format: str) -> tuple[Export, bool]:
    """Queue an export, or give the one already made or under way (exports are cached per run, source and
    format). A failed one, or one whose files were removed, is queued again. Returns (export, queued now)."""
    chosen = plan(settings, session=session, run=run, step=step, format=format)
    export = session.scalar(
        select(Export).where(Export.run_id == run.id, Export.step == step, Export.format == format)
    )
    if export is not None and (
        export.status in (ExportStatus.QUEUED, ExportStatus.RUNNING)
        or (export.status == ExportStatus.SUCCEEDED and export_file(settings, export).is_file())
    ):
        return export, False
    if export is None:
        export = Export(run_id=run.id, step=step, format=format)
        session.add(export)
    export.status, export.progress, export.stage = ExportStatus.QUEUED, 0.0, None
    export.error, export.size_bytes, export.worker_id = None, None, None
    export.estimated_bytes, export.created_at, export.finished_at = chosen.estimated_bytes, utcnow(), None
    session.commit()
    return export, True


def list_for_run(*, session: Session, run_id: int) -> list[Export]:
    return list(session.scalars(select(Export).where(Export.run_id == run_id).order_by(Export.id.desc())))


def claim_next(*, session: Session, worker_id: str, models: list[str] | None = None) -> Export | None:
    """Atomically take the oldest queued export whose run's base model this worker can load (as
    `state.claim_next` takes runs: SQLite through BEGIN IMMEDIATE, PostgreSQL through SKIP LOCKED)."""
    now = utcnow()
    servable = [Export.status == ExportStatus.QUEUED]
    if models is not None:
        servable.append(Export.run_id.in_(select(Run.id).where(Run.base_model.in_(models))))
    oldest = (
        select(Export.id).where(*servable).order_by(Export.id).limit(1).with_for_update(skip_locked=True)
    ).scalar_subquery()
    claimed = session.execute(
        update(Export)
        .where(Export.id == oldest, Export.status == ExportStatus.QUEUED)
        .values(status=ExportStatus.RUNNING, worker_id=worker_id, heartbeat_at=now, started_at=now)
        .returning(Export.id)
    ).scalar_one_or_none()
    if claimed is None:
        session.rollback()
        return None
    session.commit()
    return session.get(Export, claimed, populate_existing=True)


def _owned(session: Session, export_id: int, worker_id: str):
    return update(Export).where(
        Export.id == export_id, Export.worker_id == worker_id, Export.status == ExportStatus.RUNNING
    )


def report(
    *,
    session: Session,
    export_id: int,
    worker_id: str,
    progress: float | None = None,
    stage: str | None = None,
) -> bool:
    """The worker's heartbeat on an export, with how far it got. False: the export is no longer its own
    (deleted, or handed back after the worker went silent) and the worker should stop making it."""
    values: dict = {"heartbeat_at": utcnow()}
    if progress is not None:
        values["progress"] = max(0.0, min(1.0, progress))
    if stage is not None:
        values["stage"] = stage[:200]
    changed = session.execute(_owned(session, export_id, worker_id).values(**values)).rowcount  # type: ignore[attr-defined]
    session.commit()
    return bool(changed)


def finish(*, session: Session, export_id: int, worker_id: str, size_bytes: int) -> None:
    session.execute(
        _owned(session, export_id, worker_id).values(
            status=ExportStatus.SUCCEEDED,
            progress=1.0,
            stage=None,
            size_bytes=size_bytes,
            finished_at=utcnow(),
        )
    )
    session.commit()


def fail(*, session: Session, export_id: int, worker_id: str, error: str) -> None:
    session.execute(
        _owned(session, export_id, worker_id).values(
            status=ExportStatus.FAILED, stage=None, error=error[:4000], finished_at=utcnow()
        )
    )
    session.commit()


def hand_back(*, session: Session, export_id: int, worker_id: str) -> None:
    """The worker stops before the export is made: it goes back to the queue, from the start."""
    session.execute(
        _owned(session, export_id, worker_id).values(
            status=ExportStatus.QUEUED, progress=0.0, stage=None, worker_id=None, started_at=None
        )
    )
    session.commit()


def requeue_stale(*, session: Session, stale_after: timedelta) -> list[int]:
    """Exports whose worker stopped beating go back to the queue."""
    cutoff = utcnow() - stale_after
    ids = list(
        session.scalars(
            update(Export)
            .where(Export.status == ExportStatus.RUNNING, Export.heartbeat_at < cutoff)
            .values(status=ExportStatus.QUEUED, progress=0.0, stage=None, worker_id=None, started_at=None)
            .returning(Export.id)
        )
    )
    session.commit()
    return ids


class ExportBusy(RuntimeError):
    pass


def delete(settings: Settings, *, session: Session, export: Export) -> None:
    """Remove an export's files and its row. One being made is refused (ExportBusy)."""
    if export.status == ExportStatus.RUNNING:
        raise ExportBusy("This export is being made; delete it once it has finished.")
    folder = export_dir(settings, export)
    session.delete(export)
    session.commit()
    shutil.rmtree(folder, ignore_errors=True)


def register(settings: Settings, *, session: Session, export: Export, run: Run) -> RegisteredModel:
    """Make a finished GGUF export a base model of its own (tune a tuned model again)."""
    if not FORMATS[export.format].gguf_type or export.status != ExportStatus.SUCCEEDED:
        raise ExportRefused("Only a finished GGUF export of a whole model can become a base model.")
    label = FORMATS[export.format].gguf_type.upper()  # type: ignore[union-attr]
    source = "" if export.step == 0 else f", step {export.step}"
    return register_model(
        settings,
        str(export_file(settings, export)),
        f"#{run.id} {run.name} ({label}{source})",
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
