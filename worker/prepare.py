"""Base-model preparation: convert GGUF files into safetensors folders, once.

transformers can read GGUF (through the `gguf` package) but slowly, de-quantising every tensor on each
load. The worker converts each GGUF model once into `<data_dir>/models/<id>/` and everything loads that
folder afterwards. Each conversion runs in a fresh interpreter (`python -m worker.prepare GGUF TARGET`)
so the worker stays small and can stop it at any time. The folder appears atomically (written aside,
then renamed); a failure leaves `<id>.error.txt` with the reason, shown on the Models page.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

from app.config import Settings
from app.db import Database
from app.model_registry import ModelEntry, error_file, list_models
from worker.child import run_child

log = logging.getLogger("tuneboard.prepare")

# Attributes the GGUF loader leaves on the model; save_pretrained refuses to write a "quantized" model.
GGUF_QUANTIZER_ATTRIBUTES = ("hf_quantizer", "is_quantized", "quantization_method")


def convert_gguf(gguf_path: Path, target: Path) -> None:
    """Load a GGUF file with transformers and save it as a safetensors model folder at `target`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    staging = target.with_name(f".{target.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        for attribute in GGUF_QUANTIZER_ATTRIBUTES:
            if hasattr(model, attribute):
                delattr(model, attribute)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("converted %s into %s in %.1f s", gguf_path.name, target, time.monotonic() - started)


def run_conversion(gguf_path: Path, target: Path, *, stop: threading.Event | None = None) -> str | None:
    """Convert in a child interpreter. Returns None on success (or when stopped: it starts over next
    time), else the reason it failed."""
    ended = run_child([sys.executable, "-m", "worker.prepare", str(gguf_path), str(target)], stop=stop)
    if ended.code in (0, None):
        return None
    return f"Could not convert {gguf_path.name} to a transformers model: {ended.reason()}"


def prepare_pending_models(settings: Settings, db: Database, *, stop: threading.Event | None = None) -> None:
    """Convert every GGUF-backed model that has no folder yet and has not failed before."""
    with db.session() as session:
        pending = [m for m in list_models(settings, session=session) if m.status == "preparing"]
    for entry in pending:
        if stop is not None and stop.is_set():
            return
        log.info("preparing %s from %s", entry.id, entry.gguf)
        reason = prepare_model(entry, stop=stop)
        if reason:
            log.error("%s", reason)


def prepare_model(entry: ModelEntry, *, stop: threading.Event | None = None) -> str | None:
    """Convert a GGUF-backed model into its folder; on failure the reason is also kept beside the folder
    (so the Models page shows it and the model is not retried). Returns the reason, or None."""
    if entry.gguf is None:
        return None
    reason = run_conversion(entry.gguf, entry.folder, stop=stop)
    if reason:
        error_file(entry.folder).write_text(reason, encoding="utf-8")
    return reason


if __name__ == "__main__":
    # A stopping worker sends SIGTERM: exit through `finally` so no partial folder stays behind.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    convert_gguf(Path(sys.argv[1]), Path(sys.argv[2]))
