"""Exports, made by the worker: `run_export` (in the worker loop) starts `python -m worker.export ID` in a
fresh interpreter, keeps the export's heartbeat, stops it when the worker stops or the export is deleted,
and records how it ended. The child merges the adapter into the base model (PEFT's merge) and writes the
format asked for into a hidden folder beside the export's own, renamed into place when whole.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

from app import exports, jobs, workers
from app.config import Settings
from app.db import PASSING_FAULTS, Database
from app.exports import ExportRefused, Plan
from app.models import Export, Run
from app.prompts import INSTRUCTION_CHAT_TEMPLATE
from app.runs.folder import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from app.units import filesize
from worker.child import beating, run_child, stop_with_parent
from worker.gguf_export import ExportError
from worker.remote import Server, ServerError
from worker.supervise import training_env, write_with_retry

log = logging.getLogger("tuneboard.export")
SAID = "tuneboard-export-error:"  # the child's own sentence on a failure it can explain
WORKER_ENV = "TUNEBOARD_EXPORT_WORKER"


# --- in the worker loop -----------------------------------------------------------------------------------


def run_export(
    settings: Settings,
    db: Database,
    export: Export,
    *,
    me: str,
    stop: threading.Event,
    server: Server | None = None,
) -> None:
    """Make one claimed export in a child process and record how it ended. A worker on another machine
    (`server`) first fetches the adapter or checkpoint from the web server and afterwards sends the files
    there, where they are downloaded."""
    log.info(
        "export %d: run %d, %s, %s",
        export.id,
        export.run_id,
        export.format,
        exports.source_label(export.step),
    )
    last = [0.0]

    def tick() -> bool:
        """Beat every 2 s; False once the export is no longer ours (handed back after a silence), and the
        Workers page's stop order stops the export too (it goes back to the queue)."""
        if time.monotonic() - last[0] < 2:
            return True
        last[0] = time.monotonic()
        try:
            with db.write_session() as session:
                orders = workers.beat(session=session, worker_id=me, status="exporting", run_id=export.run_id)
                ours = exports.report(session=session, export_id=export.id, worker_id=me)
        except PASSING_FAULTS as exc:  # a busy database: the next beat tries again
            log.warning("export %d: heartbeat skipped (%s)", export.id, exc)
            return True
        if orders.stop:
            log.info("stopping: asked to from the Workers page")
            stop.set()
        return ours

    def hand_back() -> None:
        write_with_retry(
            db, lambda s: jobs.hand_back(session=s, kind=jobs.EXPORT, job_id=export.id, worker_id=me)
        )

    tick()
    try:
        if server is not None:
            with beating(tick, every=1.0, name="export-heartbeat"):
                server.fetch_adapter(export.run_id, export.step)
        env = training_env(settings) | settings.child_env(**{WORKER_ENV: me})
        ended = run_child(
            [sys.executable, "-m", "worker.export", str(export.id)], stop=stop, env=env, tick=tick
        )
        if ended.code is None:
            if stop.is_set():
                hand_back()
                log.info("export %d handed back: the worker is stopping", export.id)
            return
        if ended.code != 0:
            reason = ended.reason(SAID)
            log.error("export %d failed: %s", export.id, reason)
            write_with_retry(
                db, lambda s: exports.fail(session=s, export_id=export.id, worker_id=me, error=reason)
            )
            return
        made = exports.export_dir(settings, export)
        size = (made / exports.file_name(export)).stat().st_size
        if server is not None:
            with beating(tick, every=1.0, name="export-heartbeat"):
                server.push_export(export.id, made)
            shutil.rmtree(made, ignore_errors=True)  # the web server keeps it; this machine needs no copy
    except ServerError as exc:
        if exc.lasting:
            message = str(exc)
            write_with_retry(
                db, lambda s: exports.fail(session=s, export_id=export.id, worker_id=me, error=message)
            )
            return
        hand_back()  # the web server could not be reached: another pass (or worker) makes it again
        raise
    done: list[bool] = []
    write_with_retry(
        db,
        lambda s: done.append(exports.finish(session=s, export_id=export.id, worker_id=me, size_bytes=size)),
    )
    if done and done[-1]:
        log.info("export %d done (%d bytes)", export.id, size)
    else:
        log.warning("export %d was made, but it is no longer this worker's to finish", export.id)


# --- in the child -----------------------------------------------------------------------------------------


class Reporter:
    """Progress to the export's row, at most twice a second; SystemExit once the export is no longer ours."""

    def __init__(self, db: Database, export_id: int, worker_id: str):
        self.db, self.export_id, self.worker_id, self.last = db, export_id, worker_id, 0.0

    def __call__(self, fraction: float, stage: str | None = None, *, force: bool = False) -> None:
        if not force and stage is None and time.monotonic() - self.last < 0.5:
            return
        self.last = time.monotonic()
        try:
            with self.db.write_session() as session:
                ours = exports.report(
                    session=session,
                    export_id=self.export_id,
                    worker_id=self.worker_id,
                    progress=fraction,
                    stage=stage,
                )
        except PASSING_FAULTS:  # a busy database: this report is skipped, the next one tries again
            return
        if not ours:
            raise SystemExit("the export was deleted or handed to another worker")

    def part(self, start: float, end: float) -> Callable[[float], None]:
        """A progress callback for one stage, mapped onto [start, end] of the whole."""
        return lambda fraction: self(start + (end - start) * fraction)


def make(settings: Settings, db: Database, export_id: int, worker_id: str) -> None:
    """Make the export: check it again, check the disk, merge, write, rename into place."""
    with db.session() as session:
        export = session.get(Export, export_id)
        run = session.get(Run, export.run_id) if export is not None else None
        if export is None or run is None:
            raise ExportRefused("The export was deleted before it was made.")
        plan = exports.plan(settings, session=session, run=run, step=export.step, format=export.format)
        session.expunge_all()
    report = Reporter(db, export_id, worker_id)
    target = exports.export_dir(settings, export)
    staging = target.with_name(f".{target.name}.partial-{os.getpid()}")
    check_disk(staging.parent, plan.estimated_bytes * (2 if plan.format.key == "merged" else 1))
    for left in staging.parent.glob(f".{target.name}.partial-*"):  # of a child killed before its cleanup
        shutil.rmtree(left, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        out = staging / exports.file_name(export)
        if plan.format.adapter_only:
            write_lora_file(plan, out, report)
            tokenizer = base_tokenizer(plan)
        else:
            report(0.02, "Loading the base model and the adapter")
            model, tokenizer = merged_model(plan)
            if plan.format.gguf_type:
                write_gguf_file(plan, model, tokenizer, out, staging, report)
            else:
                write_merged_zip(plan, model, tokenizer, out, staging, report)
        if exports.has_modelfile(export):
            text = modelfile_text(plan, tokenizer, out.name)
            (staging / exports.MODELFILE).write_text(text, encoding="utf-8")
        report(1.0, "Finishing", force=True)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def check_disk(folder: Path, needed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < needed * exports.DISK_MARGIN:
        raise ExportError(
            f"Not enough disk space for this export: it needs about {filesize(needed)} and "
            f"{filesize(free)} is free in {folder}. Delete old exports or free some space, then export again."
        )


def merged_model(plan: Plan):
    """The base model with the adapter merged into its weights (PEFT's merge_and_unload), and the tokenizer
    with the chat template the run was trained with."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(int(os.environ.get("TUNEBOARD_TORCH_THREADS") or torch.get_num_threads()))
    model = AutoModelForCausalLM.from_pretrained(plan.model.folder, dtype="auto")
    model = PeftModel.from_pretrained(model, plan.adapter).merge_and_unload()
    model.eval()
    return model, base_tokenizer(plan)


def base_tokenizer(plan: Plan):
    """The base model's tokenizer, with the tutorial layout as its chat template when the run was trained
    on that layout."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(plan.model.folder)
    if plan.run.config.get("prompt_format") == "instruction":
        tokenizer.chat_template = INSTRUCTION_CHAT_TEMPLATE
    return tokenizer


def write_merged_zip(plan: Plan, model, tokenizer, out: Path, staging: Path, report: Reporter) -> None:
    folder = staging / out.stem
    report(0.3, "Writing the merged weights")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in files) or 1
    done = 0
    report(0.6, "Packing the files")
    # safetensors hardly compress: stored, not deflated, so packing costs a copy and no more
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for path in files:
            archive.write(path, f"{out.stem}/{path.relative_to(folder)}")
            done += path.stat().st_size
            report(0.6 + 0.4 * done / total)
    shutil.rmtree(folder)


def write_gguf_file(plan: Plan, model, tokenizer, out: Path, staging: Path, report: Reporter) -> None:
    from worker import gguf_export

    tokenizer_dir = staging / "tokenizer"
    tokenizer.save_pretrained(tokenizer_dir)
    state = model.state_dict()
    report(0.3, f"Writing the GGUF file ({plan.format.gguf_type.upper()})")  # type: ignore[union-attr]
    gguf_export.write_model(
        out,
        config=model.config.to_dict(),
        tokenizer_dir=tokenizer_dir,
        shapes={name: tuple(t.shape) for name, t in state.items()},
        tensor=lambda name: state[name].float().numpy(),
        kind=plan.format.gguf_type,  # type: ignore[arg-type]
        name=f"{plan.run.name} (Tuneboard run {plan.run.id})",
        original_pre=original_pre_tokenizer(plan.model.gguf),
        progress=report.part(0.3, 0.98),
    )
    shutil.rmtree(tokenizer_dir)


def write_lora_file(plan: Plan, out: Path, report: Reporter) -> None:
    from safetensors.numpy import load_file

    from worker import gguf_export

    report(0.1, "Writing the adapter as a llama.cpp LoRA file")
    weights = load_file(str(plan.adapter / ADAPTER_WEIGHTS[0]))
    gguf_export.write_lora(
        out,
        config=gguf_export.read_config(plan.model.folder),
        adapter_config=json.loads((plan.adapter / ADAPTER_CONFIG).read_text(encoding="utf-8")),
        shapes={name: tuple(w.shape) for name, w in weights.items()},
        tensor=lambda name: weights[name],
        name=f"{plan.run.name} (Tuneboard run {plan.run.id}, LoRA)",
        progress=report.part(0.1, 0.98),
    )


def original_pre_tokenizer(gguf_file: Path | None) -> str | None:
    """The pre-tokenizer name a GGUF base model was made with (llama.cpp's converter recognised it)."""
    if gguf_file is None or not gguf_file.is_file():
        return None
    import gguf

    field = gguf.GGUFReader(gguf_file).get_field(gguf.Keys.Tokenizer.PRE)
    return field.contents() if field is not None else None


def modelfile_text(plan: Plan, tokenizer, file_name: str) -> str:
    rendered = None
    if tokenizer.chat_template:  # what the template puts before a question that comes without a system prompt
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": "?"}], tokenize=False)
    return exports.modelfile(
        model_file=file_name,
        prompt_format=plan.run.config.get("prompt_format", "chat"),
        chat_template=tokenizer.chat_template,
        eos_token=tokenizer.eos_token,
        adapter=plan.format.adapter_only,
        base_gguf=plan.model.gguf,
        rendered=rendered if isinstance(rendered, str) else None,
    )


def main(export_id: int) -> int:
    settings = Settings()
    db = Database(settings.sqlalchemy_url)
    try:
        make(settings, db, export_id, os.environ[WORKER_ENV])
    except (ExportError, ExportRefused) as exc:
        print(f"{SAID} {exc}", file=sys.stderr, flush=True)
        return 2
    except MemoryError:
        print(f"{SAID} The worker ran out of memory while making this export.", file=sys.stderr, flush=True)
        return 2
    except OSError as exc:
        if exc.errno == 28:  # ENOSPC
            print(f"{SAID} The disk filled up while writing the export.", file=sys.stderr, flush=True)
            return 2
        raise
    finally:
        db.dispose()
    return 0


if __name__ == "__main__":
    # The worker stops an export with SIGTERM: leave through `finally`, so no partial folder stays behind.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    stop_with_parent("export")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    sys.exit(main(int(sys.argv[1])))
