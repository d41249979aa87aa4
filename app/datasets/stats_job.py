"""`python -m app.datasets.stats_job SPEC`: compute one dataset statistic in a child process (started by
`app.datasets.jobs`), streaming the rows so that memory stays bounded whatever the dataset's size.

SPEC is JSON: {"kind": "summary" | "lengths", "rows": rows.jsonl, "cache": the file to write, "key": the
cache key, and for "summary" the split settings, for "lengths" the model folder and prompt format}.
Progress goes to `<cache>.progress`; a failure's sentence to `<cache>.error`; the lock is removed last.
"""

from __future__ import annotations

import array
import json
import sys
from pathlib import Path
from typing import Any

from app.datasets import stats
from app.datasets.jobs import STATS_MEMORY_BYTES, side_file
from app.datasets.store import iter_rows, write_json

BATCH = 2_000


def summary(spec: dict[str, Any], report) -> dict[str, Any]:
    duplicates = stats.DuplicateFinder()
    for number, row in enumerate(iter_rows(Path(spec["rows"])), start=1):
        duplicates.add(row)
        if number % BATCH == 0:
            report(number)
    split = stats.split_summary(
        duplicates.rows, fraction=spec["fraction"], max_rows=spec["max_rows"], seed=spec["seed"]
    )
    return {"key": spec["key"], "summary": {"duplicates": duplicates.result(), "split": split}}


def lengths(spec: dict[str, Any], report) -> dict[str, Any]:
    info = stats.read_tokenizer_info(Path(spec["folder"]))
    result = array.array("I")
    batch: list[dict[str, Any]] = []
    for row in iter_rows(Path(spec["rows"])):
        batch.append(row)
        if len(batch) == BATCH:
            result.extend(stats.token_lengths(batch, info, spec["prompt_format"]))
            batch.clear()
            report(len(result))
    if batch:
        result.extend(stats.token_lengths(batch, info, spec["prompt_format"]))
    return {"key": spec["key"], "lengths": result.tolist()}


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    cache = Path(spec["cache"])

    def report(done: int) -> None:
        write_json(side_file(cache, ".progress"), {"done": done})

    try:
        value = {"summary": summary, "lengths": lengths}[spec["kind"]](spec, report)
        write_json(cache, value)
        return 0
    except MemoryError:
        side_file(cache, ".error").write_text(
            f"The statistics could not be computed: they needed more than the {STATS_MEMORY_BYTES >> 30} GiB "
            "of memory a statistics job may use.",
            encoding="utf-8",
        )
        return 1
    except Exception as exc:  # noqa: BLE001 - the page shows this sentence instead of statistics
        side_file(cache, ".error").write_text(
            f"The statistics could not be computed: {type(exc).__name__}: {exc}", encoding="utf-8"
        )
        return 1
    finally:
        side_file(cache, ".progress").unlink(missing_ok=True)
        side_file(cache, ".lock").unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
