"""Detect a dataset's format, validate every row, and normalise it to one conversation form.

Accepted:
- Alpaca rows (`instruction`, optional `input`, `output`, optional `system`) as a JSON array or JSONL;
- OpenAI-style chat rows (`{"messages": [{"role", "content"}, ...]}`) as JSONL or a JSON array;
- ShareGPT rows (`{"conversations": [{"from", "value"}, ...]}`) as a JSON array or JSONL.

The normalised row is `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`;
Alpaca rows also keep `"alpaca": {"instruction", "input"}` so that the tutorial's
"Instruction/Input/Answer" layout can be rebuilt exactly. Rows are numbered from 1: the element's
position in a JSON array, the line number in JSONL.
"""

from __future__ import annotations

import codecs
import io
import itertools
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from app import jsontext
from app.jsontext import JsonUnreadable

MAX_LISTED_ERRORS = 50
NON_SPACE = re.compile(rb"[^ \t\r\n]")

FORMAT_LABELS = {
    ("alpaca", "json"): "Alpaca (JSON array)",
    ("alpaca", "jsonl"): "Alpaca (JSON Lines)",
    ("openai", "json"): "OpenAI chat messages (JSON array)",
    ("openai", "jsonl"): "OpenAI chat messages (JSON Lines)",
    ("sharegpt", "json"): "ShareGPT conversations (JSON array)",
    ("sharegpt", "jsonl"): "ShareGPT conversations (JSON Lines)",
    ("preference", "json"): "Preferences: prompt, chosen, rejected (JSON array)",
    ("preference", "jsonl"): "Preferences: prompt, chosen, rejected (JSON Lines)",
}

OPENAI_ROLES = {"system", "user", "assistant"}
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}


@dataclass(frozen=True)
class RowError:
    row: int | None
    field: str | None
    message: str

    def as_dict(self) -> dict[str, Any]:
        return {"row": self.row, "field": self.field, "message": self.message}


class DatasetInvalid(Exception):
    """The file cannot be used; `errors` holds the first problems and `total` counts all of them."""

    def __init__(self, errors: list[RowError], total: int | None = None):
        self.errors = errors[:MAX_LISTED_ERRORS]
        self.total = total if total is not None else len(errors)
        super().__init__(self.summary)

    @property
    def summary(self) -> str:
        if self.total == 1:
            return "The file has 1 problem."
        listed = len(self.errors)
        more = f"; the first {listed} are listed" if listed < self.total else ""
        return f"The file has {self.total} problems{more}."


@dataclass
class ParsedDataset:
    format: str
    layout: str
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def label(self) -> str:
        return FORMAT_LABELS[(self.format, self.layout)]


def parse_dataset(raw: bytes) -> ParsedDataset:
    """Parse and validate a whole file in memory. Raises DatasetInvalid listing every problem found."""
    rows: list[dict[str, Any]] = []
    fmt, layout = read_dataset(raw, rows.append)
    return ParsedDataset(format=fmt, layout=layout, rows=rows)


def read_dataset(raw: bytes, write: Callable[[dict[str, Any]], None], *, max_rows: int | None = None):
    """Validate a file row by row, handing each normalised row to `write` as soon as it is read, so a
    JSON Lines file of any length is checked in bounded memory (a JSON array is parsed whole). Returns
    (format, layout); raises DatasetInvalid listing the problems (then `write`'s output must be dropped)."""
    body = raw.removeprefix(codecs.BOM_UTF8)
    first_byte = NON_SPACE.search(body)
    if first_byte is None:
        _decode(raw)  # a file of odd bytes is "not UTF-8" rather than "empty"
        raise DatasetInvalid([RowError(None, None, "The file is empty: there are no rows to train on.")])
    if first_byte.group() == b"[":
        if len(raw) > MAX_JSON_ARRAY_BYTES:
            raise DatasetInvalid([_array_too_large(len(raw))])
        layout, records = "json", iter(_json_array(_decode(raw)))
    elif first_byte.group() == b"{":
        layout, records = "jsonl", _json_lines(body)
    else:
        raise DatasetInvalid([_wrong_top_level(_decode(raw).lstrip())])

    first = next(records, None)
    if first is None:
        raise DatasetInvalid([RowError(None, None, "The file holds no rows: the list is empty.")])
    fmt = _detect_format(first)
    normalise = {
        "alpaca": _alpaca_row,
        "openai": _openai_row,
        "sharegpt": _sharegpt_row,
        "preference": _preference_row,
    }[fmt]
    errors: list[RowError] = []
    total_errors = count = 0
    for number, record in itertools.chain([first], records):
        count += 1
        if max_rows is not None and count > max_rows:
            raise DatasetInvalid(
                [
                    RowError(
                        None,
                        None,
                        f"The file has more than {max_rows:,} rows, the most Tuneboard accepts "
                        "(TUNEBOARD_MAX_ROWS). Split it, or raise the limit.",
                    )
                ]
            )
        if isinstance(record, RowError):
            row_errors = [record]
        else:
            row_errors = []
            row = normalise(number, record, row_errors)
        if row_errors:
            total_errors += len(row_errors)
            if len(errors) < MAX_LISTED_ERRORS:
                errors.extend(row_errors)
        elif not total_errors:
            write(row)
    if total_errors:
        raise DatasetInvalid(errors, total=total_errors)
    return fmt, layout


# A JSON array is parsed whole (its Python objects take some ten times the file's size); JSON Lines are read
# a row at a time at any size. Larger arrays are refused with the way to convert them.
MAX_JSON_ARRAY_BYTES = 32_000_000


def _array_too_large(size: int) -> RowError:
    return RowError(
        None,
        None,
        f"This JSON array is {size / 1e6:,.0f} MB; Tuneboard reads a JSON array whole, up to "
        f"{MAX_JSON_ARRAY_BYTES / 1e6:,.0f} MB. Save it as JSON Lines (one row per line, read row by row at "
        "any size), e.g. with `jq -c '.[]' data.json > data.jsonl`, and upload that.",
    )


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _not_utf8(raw[exc.start], raw[: exc.start].count(b"\n") + 1, exc.start) from None


def _not_utf8(byte: int, line: int, offset: int) -> DatasetInvalid:
    return DatasetInvalid(
        [
            RowError(
                None,
                None,
                f"The file is not UTF-8 text: byte 0x{byte:02x} at line {line} (offset {offset}) cannot be "
                "decoded. Save the file as UTF-8 and upload it again.",
            )
        ]
    )


def _wrong_top_level(stripped: str) -> RowError:
    try:
        value = jsontext.loads(stripped)
    except JsonUnreadable:
        return RowError(
            None, None, "The file is not JSON: expected a JSON array of rows or one JSON object per line."
        )
    return RowError(
        None,
        None,
        f"Expected a JSON array of rows or one JSON object per line, but the file holds a single "
        f"{_type_name(value)}.",
    )


def _json_array(text: str) -> list[tuple[int, Any]]:
    try:
        value = jsontext.loads(text)
    except JsonUnreadable as exc:
        row = exc.path[0] + 1 if exc.path and isinstance(exc.path[0], int) else None
        field = jsontext.dotted(exc.path[1:]) or None
        where = f"Row {row}" if row else "The file"
        raise DatasetInvalid([RowError(row, field, f"{where} {exc.message}.")]) from None
    return list(enumerate(value, start=1))


def _json_lines(body: bytes) -> Iterator[tuple[int, Any]]:
    """(line number, value) for each non-blank line; a line that is not JSON yields a RowError instead.
    Reads the bytes line by line (no whole-file decode or split: a large file never holds the
    interpreter for long, and memory stays at one line)."""
    offset = 0
    seen = 0
    for number, line in enumerate(io.BytesIO(body), start=1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _not_utf8(line[exc.start], number, offset + exc.start) from None
        offset += len(line)
        if not text.strip():
            continue
        seen += 1
        try:
            yield number, jsontext.loads(text)
        except JsonUnreadable as exc:
            if seen == 1:
                _refuse_single_object(body)
            yield number, RowError(number, jsontext.dotted(exc.path) or None, f"This line {exc.message}.")


def _refuse_single_object(body: bytes) -> None:
    """A single pretty-printed object spread over several lines is one JSON value, not JSON Lines."""
    try:
        whole = jsontext.loads(body.decode("utf-8"))
    except (JsonUnreadable, UnicodeDecodeError):
        return
    if isinstance(whole, dict):
        raise DatasetInvalid(
            [
                RowError(
                    None,
                    None,
                    "Expected a JSON array of rows or one JSON object per line, but the file holds a "
                    f"single JSON object (with keys {', '.join(list(whole)[:5])}).",
                )
            ]
        )


def _detect_format(first: tuple[int, Any]) -> str:
    """The format, from the first row (it must be an object with a recognisable key)."""
    number, record = first
    if isinstance(record, RowError):
        raise DatasetInvalid([record])
    if not isinstance(record, dict):
        raise DatasetInvalid(
            [RowError(number, None, f"Each row must be a JSON object, not a {_type_name(record)}.")]
        )
    if "chosen" in record or "rejected" in record:
        return "preference"
    if "messages" in record:
        return "openai"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record or "output" in record:
        return "alpaca"
    keys = ", ".join(sorted(record)[:8]) or "none"
    raise DatasetInvalid(
        [
            RowError(
                number,
                None,
                f"Cannot tell the format from this row's keys ({keys}). Expected Alpaca "
                "(instruction, input, output), OpenAI chat (messages), ShareGPT (conversations) or "
                "preferences (prompt, chosen, rejected).",
            )
        ]
    )


def _type_name(value: Any) -> str:
    return {
        dict: "JSON object",
        list: "JSON array",
        str: "string",
        bool: "boolean",
        int: "number",
        float: "number",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def _require_object(number: int, record: Any, errors: list[RowError]) -> bool:
    if isinstance(record, dict):
        return True
    errors.append(RowError(number, None, f"Each row must be a JSON object, not a {_type_name(record)}."))
    return False


def _string_field(
    number: int, record: dict, name: str, errors: list[RowError], *, required: bool, non_empty: bool = False
) -> str:
    if name not in record or record[name] is None:
        if required:
            errors.append(RowError(number, name, f"The field '{name}' is missing."))
        return ""
    value = record[name]
    if not isinstance(value, str):
        errors.append(RowError(number, name, f"'{name}' must be a string, not a {_type_name(value)}."))
        return ""
    if non_empty and not value.strip():
        errors.append(RowError(number, name, f"'{name}' is empty."))
    return value


def _alpaca_row(number: int, record: Any, errors: list[RowError]) -> dict[str, Any]:
    if not _require_object(number, record, errors):
        return {}
    instruction = _string_field(number, record, "instruction", errors, required=True, non_empty=True)
    input_text = _string_field(number, record, "input", errors, required=False)
    output = _string_field(number, record, "output", errors, required=True, non_empty=True)
    system = _string_field(number, record, "system", errors, required=False)
    user = instruction if not input_text.strip() else f"{instruction}\n\n{input_text}"
    messages = [{"role": "system", "content": system}] if system.strip() else []
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return {"messages": messages, "alpaca": {"instruction": instruction, "input": input_text}}


def _turns(
    number: int,
    record: Any,
    errors: list[RowError],
    *,
    key: str,
    role_key: str,
    text_key: str,
    roles: dict[str, str],
) -> dict[str, Any]:
    if not _require_object(number, record, errors):
        return {}
    turns = record.get(key)
    if not isinstance(turns, list):
        what = "missing" if turns is None else f"a {_type_name(turns)}"
        errors.append(RowError(number, key, f"'{key}' must be a list of messages, but it is {what}."))
        return {}
    if not turns:
        errors.append(RowError(number, key, f"'{key}' is an empty list."))
        return {}
    messages = []
    for index, turn in enumerate(turns):
        where = f"{key}[{index}]"
        if not isinstance(turn, dict):
            errors.append(
                RowError(number, where, f"Each message must be a JSON object, not a {_type_name(turn)}.")
            )
            continue
        role = turn.get(role_key)
        if not isinstance(role, str):
            errors.append(
                RowError(number, f"{where}.{role_key}", f"'{role_key}' must be a string naming the speaker.")
            )
            continue
        if role not in roles:
            expected = ", ".join(sorted(roles))
            errors.append(
                RowError(
                    number, f"{where}.{role_key}", f"Unknown role '{role}' (expected one of: {expected})."
                )
            )
            continue
        content = turn.get(text_key)
        if not isinstance(content, str):
            what = "missing" if content is None else f"a {_type_name(content)}"
            errors.append(
                RowError(number, f"{where}.{text_key}", f"'{text_key}' must be a string, but it is {what}.")
            )
            continue
        if roles[role] == "assistant" and not content.strip():
            errors.append(RowError(number, f"{where}.{text_key}", "The assistant's answer is empty."))
            continue
        messages.append({"role": roles[role], "content": content})
    if not errors and not any(m["role"] == "assistant" for m in messages):
        errors.append(RowError(number, key, "The conversation has no assistant answer to learn from."))
    return {"messages": messages}


def _openai_row(number: int, record: Any, errors: list[RowError]) -> dict[str, Any]:
    return _turns(
        number,
        record,
        errors,
        key="messages",
        role_key="role",
        text_key="content",
        roles={r: r for r in OPENAI_ROLES},
    )


def _sharegpt_row(number: int, record: Any, errors: list[RowError]) -> dict[str, Any]:
    return _turns(
        number, record, errors, key="conversations", role_key="from", text_key="value", roles=SHAREGPT_ROLES
    )


def _preference_row(number: int, record: Any, errors: list[RowError]) -> dict[str, Any]:
    """A preference in TRL's layout: `prompt` (text, or chat messages) with a `chosen` and a `rejected`
    answer (text, or assistant messages); or, with the prompt implicit, `chosen` and `rejected` as whole
    conversations that share everything but their last answer. Normalised to the prompt and chosen answer
    as `messages` (what statistics, previews and supervised training read) and the rejected answer beside
    them."""
    if not _require_object(number, record, errors):
        return {}
    before = len(errors)
    chosen, rejected = (_answer(number, record, key, errors) for key in ("chosen", "rejected"))
    if "prompt" in record:
        prompt = _prompt(number, record["prompt"], errors)
    elif isinstance(chosen, list) and isinstance(rejected, list) and chosen and rejected:
        prompt = _shared_prompt(number, chosen, rejected, errors)
    else:
        errors.append(
            RowError(
                number,
                "prompt",
                "The field 'prompt' is missing (it may be left out only when 'chosen' and 'rejected' are "
                "whole conversations).",
            )
        )
    if len(errors) > before:
        return {}
    skip = 0 if "prompt" in record else len(prompt)
    chosen_text, rejected_text = (
        _last_answer(number, key, answer if isinstance(answer, str) else answer[skip:], errors)
        for key, answer in (("chosen", chosen), ("rejected", rejected))
    )
    if len(errors) > before:
        return {}
    if chosen_text.strip() == rejected_text.strip():
        errors.append(
            RowError(
                number, "rejected", "'chosen' and 'rejected' are the same answer; a preference needs two."
            )
        )
        return {}
    return {"messages": [*prompt, {"role": "assistant", "content": chosen_text}], "rejected": rejected_text}


def _answer(number: int, record: dict, key: str, errors: list[RowError]) -> list[dict[str, str]] | str:
    value = record.get(key)
    if isinstance(value, str):
        if not value.strip():
            errors.append(RowError(number, key, f"'{key}' is empty."))
        return value
    if isinstance(value, list):
        return _chat(number, key, value, errors)
    what = "missing" if value is None else f"a {_type_name(value)}"
    errors.append(
        RowError(number, key, f"'{key}' must be an answer (text or chat messages), but it is {what}.")
    )
    return ""


def _chat(number: int, key: str, value: list, errors: list[RowError]) -> list[dict[str, str]]:
    """Chat messages under `key`, each checked as OpenAI chat messages are."""
    found: list[RowError] = []
    turns = _turns(
        number,
        {key: value},
        found,
        key=key,
        role_key="role",
        text_key="content",
        roles={r: r for r in OPENAI_ROLES},
    ).get("messages", [])
    errors.extend(found)
    return turns


def _prompt(number: int, value: Any, errors: list[RowError]) -> list[dict[str, str]]:
    if isinstance(value, str):
        if not value.strip():
            errors.append(RowError(number, "prompt", "'prompt' is empty."))
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value:
        found: list[RowError] = []
        for index, turn in enumerate(value):
            if (
                not isinstance(turn, dict)
                or turn.get("role") not in OPENAI_ROLES
                or not isinstance(turn.get("content"), str)
            ):
                found.append(
                    RowError(
                        number,
                        f"prompt[{index}]",
                        "Each prompt message needs a role (system, user or assistant) and text content.",
                    )
                )
        if not found and value[-1]["role"] != "user":
            found.append(RowError(number, "prompt", "The prompt must end with the user's message."))
        errors.extend(found)
        return [{"role": t["role"], "content": t["content"]} for t in value] if not found else []
    what = "an empty list" if value == [] else f"a {_type_name(value)}"
    errors.append(RowError(number, "prompt", f"'prompt' must be text or chat messages, but it is {what}."))
    return []


def _shared_prompt(number: int, chosen: Any, rejected: Any, errors: list[RowError]) -> list[dict[str, str]]:
    """The messages two whole conversations share before their answers differ."""
    shared: list[dict[str, str]] = []
    for a, b in zip(chosen, rejected, strict=False):
        if a != b:
            break
        shared.append(a)
    while shared and shared[-1]["role"] == "assistant":  # the answers start where the assistant speaks
        shared.pop()
    if not shared or shared[-1]["role"] != "user":
        errors.append(
            RowError(
                number,
                "chosen",
                "'chosen' and 'rejected' must share their conversation up to the last question.",
            )
        )
    return shared


def _last_answer(number: int, key: str, answer: Any, errors: list[RowError]) -> str:
    """The answer's text: given as text, or as the assistant's message(s) after the prompt."""
    if isinstance(answer, str):
        return answer
    if not answer or any(m["role"] != "assistant" for m in answer):
        errors.append(RowError(number, key, f"'{key}' must hold the assistant's answer after the prompt."))
        return ""
    return "\n\n".join(m["content"] for m in answer)


def preference_record(row: dict[str, Any]) -> dict[str, Any]:
    """A normalised preference row in TRL's conversational layout: the prompt's messages, and the chosen
    and rejected answers as one assistant message each."""
    *prompt, chosen = row["messages"]
    rejected = {"role": "assistant", "content": row["rejected"]}
    return {"prompt": prompt, "chosen": [chosen], "rejected": [rejected]}
