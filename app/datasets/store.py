"""Dataset files on disk and their database rows, kept consistent.

A dataset folder `<data_dir>/datasets/<id>/` holds the file as uploaded (`original.json[l]`) and the
normalised rows (`rows.jsonl`). Uploads are written to a staging folder under `<data_dir>/tmp/` and
renamed into place inside the transaction that inserts the row, so a failure leaves neither.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.config import Settings
from app.datasets import jobs
from app.datasets import stats as dataset_stats
from app.datasets.formats import DatasetInvalid, RowError, read_dataset
from app.datasets.split import HELD_OUT_MAX_ROWS, PREVIEW_SEED, default_fraction
from app.db import Database
from app.model_registry import ModelEntry
from app.models import Dataset, Run
from app.units import filesize

ROWS_FILE = "rows.jsonl"
PREVIEW_ROWS = 10  # the first rows a dataset's page shows


def dataset_dir(settings: Settings, dataset_id: int) -> Path:
    return settings.datasets_dir / str(dataset_id)


def clean_name(name: str | None, filename: str) -> str:
    chosen = (name or "").strip() or Path(filename).stem or "dataset"
    return " ".join(chosen.split())[:200]


# Checking a file is CPU-bound Python: run at most this many at once. More would not finish sooner on a
# small machine, and a thread that holds the database's write lock would wait for the GIL behind them.
_CHECKING = anyio.CapacityLimiter(max(1, min(4, (os.cpu_count() or 2))))


async def save_upload(settings: Settings, db: Database, file, *, name: str | None = None) -> Dataset:
    """An uploaded file (Starlette's UploadFile, spooled to disk as it arrived) checked and stored off
    the event loop, so the server keeps answering while a large file is validated."""
    if file is None or not file.filename:
        raise DatasetInvalid(
            [RowError(None, "file", "Attach the dataset file in the multipart field 'file'.")]
        )
    raw = await file.read()
    return await anyio.to_thread.run_sync(
        functools.partial(create_dataset, settings, db, raw=raw, filename=file.filename, name=name),
        limiter=_CHECKING,
    )


def too_large(settings: Settings, size: int) -> str:
    return (
        f"The dataset would be larger than the {settings.max_upload_mb:g} MB upload limit "
        f"(TUNEBOARD_MAX_UPLOAD_MB): {filesize(size)} or more. Nothing was stored."
    )


def create_dataset(
    settings: Settings, db: Database, *, raw: bytes, filename: str, name: str | None = None
) -> Dataset:
    """Validate and store an uploaded file. Raises DatasetInvalid (nothing stored) on bad input.

    Blocking and CPU-heavy: call it from a worker thread. Every row is checked and written to a staging
    folder outside any transaction; only then is the row inserted and the folder renamed into place, in
    one transaction of a few milliseconds (so an upload never holds the database's write lock while it
    parses)."""
    if len(raw) > settings.max_upload_bytes:  # every way of making a dataset: uploads, votes, the API
        raise DatasetInvalid([RowError(None, None, too_large(settings, len(raw)))])
    settings.ensure_dirs()
    staging = Path(tempfile.mkdtemp(prefix="upload-", dir=settings.tmp_dir))
    final: Path | None = None
    try:
        count = 0
        with open(staging / ROWS_FILE, "w", encoding="utf-8") as out:

            def write(row: dict) -> None:
                nonlocal count
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
                count += 1

            fmt, layout = read_dataset(raw, write, max_rows=settings.max_rows)
        (staging / f"original.{layout}").write_bytes(raw)
        dataset = Dataset(
            name=clean_name(name, filename),
            filename=Path(filename).name[:255] or "upload",
            format=fmt,
            layout=layout,
            rows=count,
            size_bytes=len(raw),
            sha256=hashlib.sha256(raw).hexdigest(),
        )
        with db.write_session() as session:
            session.add(dataset)
            session.flush()
            final = dataset_dir(settings, dataset.id)
            if final.exists():  # left behind by a crash: no row owns this id any more
                shutil.rmtree(final)
            os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if final is not None:
            shutil.rmtree(final, ignore_errors=True)
        raise
    return dataset


class DatasetInUse(Exception):
    pass


def delete_dataset(settings: Settings, dataset: Dataset, *, session: Session) -> None:
    runs = [
        run_id
        for run_id, trained, config in session.execute(
            select(Run.id, Run.dataset_id, Run.config).order_by(Run.id)
        )
        if trained == dataset.id or (config.get("evaluation") or {}).get("dataset_id") == dataset.id
    ]  # the runs that train on it or are evaluated on it
    if runs:
        listed = ", ".join(str(r) for r in runs[:10])
        raise DatasetInUse(
            f"Dataset {dataset.id} is used by run{'s' if len(runs) > 1 else ''} {listed}; delete those first."
        )
    folder = dataset_dir(settings, dataset.id)
    session.delete(dataset)
    session.flush()
    # Move the folder aside first so that a failure to delete it can't leave a half-deleted dataset.
    trash = settings.tmp_dir / f"deleted-{dataset.id}-{os.getpid()}"
    if folder.exists():
        os.replace(folder, trash)
    session.commit()
    shutil.rmtree(trash, ignore_errors=True)


def list_datasets(*, session: Session) -> list[Dataset]:
    return list(session.scalars(select(Dataset).order_by(Dataset.id.desc())))


def iter_rows(path: Path) -> Iterator[dict[str, Any]]:
    """A dataset's normalised rows, one at a time."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


PREVIEW_LINE_BYTES = 1 << 20  # a stored row longer than this is not read for a preview
PREVIEW_CHARS = 1_000  # a previewed text is cut here, its true length shown


def preview_rows(settings: Settings, dataset_id: int, limit: int = PREVIEW_ROWS) -> list[dict[str, Any]]:
    """The first rows as a page or the API shows them, in bounded memory whatever their size: each text
    longer than PREVIEW_CHARS cut with its length said; a row whose stored line exceeds PREVIEW_LINE_BYTES
    is not parsed at all but given as {"too_long": True, "bytes": its size}. (The rows whole: rows.jsonl.)"""
    rows: list[dict[str, Any]] = []
    with open(dataset_dir(settings, dataset_id) / ROWS_FILE, "rb") as f:
        while len(rows) < limit:
            line = f.readline(PREVIEW_LINE_BYTES + 1)
            if not line:
                break
            if len(line) <= PREVIEW_LINE_BYTES:
                rows.append(dataset_stats.map_texts(json.loads(line), _cut))
                continue
            size = len(line)
            while not line.endswith(b"\n") and line:  # the rest of the row, read and dropped in 1 MB pieces
                line = f.readline(PREVIEW_LINE_BYTES)
                size += len(line)
            rows.append({"too_long": True, "bytes": size})
    return rows


def _cut(text: str) -> str:
    if len(text) <= PREVIEW_CHARS:
        return text
    return f"{text[:PREVIEW_CHARS]}… (cut here for the preview: {len(text):,} characters in all)"


def load_rows(settings: Settings, dataset_id: int, limit: int | None = None) -> list[dict[str, Any]]:
    rows = iter_rows(dataset_dir(settings, dataset_id) / ROWS_FILE)
    return list(rows if limit is None else itertools.islice(rows, limit))


def _cached(cache: Path, key: list, field: str) -> Any:
    """The cached value if the cache was written for this key, else None."""
    try:
        stat = cache.stat()
    except OSError:
        return None
    cached = _read_cache(str(cache), stat.st_mtime_ns, stat.st_size)
    return cached[field] if cached is not None and cached.get("key") == key else None


@functools.lru_cache(maxsize=64)
def _read_cache(path: str, mtime_ns: int, size: int) -> dict | None:
    """A cache file's contents, read once per version of the file (pages and launches ask often; caches
    are replaced whole by `write_json`, so a new version has a new mtime). Callers must not mutate it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


INLINE_STATS_BYTES = 8_000_000  # a larger rows file gets its statistics in the background, whatever its rows


def in_background(settings: Settings, dataset: Dataset) -> bool:
    """Whether the dataset's statistics are computed by a child process (with a memory cap) rather than by
    the request: many rows, or a large file (a few huge rows would otherwise cost the web process
    gigabytes)."""
    if dataset.rows > settings.stats_inline_rows:
        return True
    try:
        return (dataset_dir(settings, dataset.id) / ROWS_FILE).stat().st_size > INLINE_STATS_BYTES
    except OSError:
        return False


def dataset_summary(settings: Settings, dataset: Dataset) -> dict[str, Any]:
    """Statistics that need no tokenizer: duplicates and the validation split (cached on disk). Raises
    StatsPending while a large dataset's are computed in the background."""
    cache = dataset_dir(settings, dataset.id) / "summary.json"
    fraction = default_fraction(dataset.rows)
    key = [fraction, HELD_OUT_MAX_ROWS, PREVIEW_SEED]
    if (summary := _cached(cache, key, "summary")) is not None:
        return summary
    if in_background(settings, dataset):
        split = {"fraction": fraction, "max_rows": HELD_OUT_MAX_ROWS}
        spec = {"kind": "summary", "rows": str(cache.with_name(ROWS_FILE)), "key": key, **split}
        raise jobs.start_or_poll(cache, {**spec, "seed": PREVIEW_SEED}, dataset.rows)
    rows = load_rows(settings, dataset.id)
    summary = {
        "duplicates": dataset_stats.duplicate_rows(rows),
        "split": dataset_stats.split_summary(
            len(rows),
            fraction=fraction,
            max_rows=HELD_OUT_MAX_ROWS,
            seed=PREVIEW_SEED,
        ),
    }
    write_json(cache, {"key": key, "summary": summary})
    return summary


def token_stats(
    settings: Settings, dataset: Dataset, model: ModelEntry, *, max_length: int, prompt_format: str
) -> dict[str, Any]:
    """Token-length statistics of the whole dataset under a ready model's prompt format (cached). Raises
    StatsPending while a large dataset's lengths are computed in the background, ValueError when they
    cannot be (no chat template, a failed job)."""
    lengths = token_lengths(settings, dataset, model, prompt_format=prompt_format)
    return dataset_stats.length_stats(lengths, max_length=max_length)


def token_lengths(
    settings: Settings, dataset: Dataset, model: ModelEntry, *, prompt_format: str
) -> list[int]:
    """Every row's token length under a ready model's prompt format, uncut (cached; raises as
    `token_stats` does)."""
    tokenizer_file = model.tokenizer_file
    if tokenizer_file is None:
        raise ValueError(f"{model.name} is not ready yet.")
    key = [model.id, str(model.folder), tokenizer_file.stat().st_mtime, prompt_format]
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]
    cache = dataset_dir(settings, dataset.id) / f"lengths-{digest}.json"
    lengths = _cached(cache, key, "lengths")
    if lengths is None and in_background(settings, dataset):
        info = dataset_stats.read_tokenizer_info(model.folder)
        if prompt_format == "chat" and not info.chat_template:
            dataset_stats.render_texts([], info, prompt_format)  # the same sentence as inline
        spec = {"kind": "lengths", "rows": str(cache.with_name(ROWS_FILE)), "key": key}
        spec |= {"folder": str(model.folder), "prompt_format": prompt_format}
        raise jobs.start_or_poll(cache, spec, dataset.rows)
    if lengths is None:
        info = dataset_stats.read_tokenizer_info(model.folder)
        lengths = dataset_stats.token_lengths(load_rows(settings, dataset.id), info, prompt_format)
        write_json(cache, {"key": key, "lengths": lengths})
    return lengths


def write_json(path: Path, value: Any) -> None:
    """Write atomically: readers see the old file or the whole new one."""
    staging = path.with_name(path.name + f".{os.getpid()}.tmp")
    staging.write_text(json.dumps(value), encoding="utf-8")
    os.replace(staging, path)
