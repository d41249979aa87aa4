"""Reading JSON from strangers: every way a document can break the standard parser, or what runs after it,
becomes one `JsonUnreadable` with a sentence, never a RecursionError, a ValueError or a 500.

Python's `json` accepts things Tuneboard cannot store or use: nesting deep enough to exhaust the stack,
integers of thousands of digits (which it refuses only at conversion, with a ValueError), and `\\ud800`-style
escapes that decode to unpaired surrogates (not text: SQLite, file names and UTF-8 all reject them later).
Used for request bodies (`JsonBodyMiddleware`) and dataset files alike.
"""

from __future__ import annotations

import json
import math
from typing import Any

MAX_DEPTH = 64  # Tuneboard's own documents nest 5 levels at most
TOO_DEEP = f"is nested too deeply (Tuneboard reads at most {MAX_DEPTH} levels)"


class JsonUnreadable(ValueError):
    """The text is not JSON that Tuneboard can read. `message` is a predicate ("is not valid JSON: …",
    "holds …") that follows the name of what was read; `path` locates the bad value when known."""

    def __init__(self, message: str, path: tuple[str | int, ...] = ()):
        super().__init__(message)
        self.message, self.path = message, path


def loads(text: str | bytes) -> Any:
    """`json.loads`, then the checks the standard parser leaves out. Raises JsonUnreadable."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise JsonUnreadable(
            f"is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"
        ) from None
    except RecursionError:
        raise JsonUnreadable(f"is nested too deeply (Tuneboard reads at most {MAX_DEPTH} levels)") from None
    except UnicodeDecodeError:
        raise JsonUnreadable("is not UTF-8 text") from None
    except ValueError:  # "Exceeds the limit (4300 digits) for integer string conversion"
        raise JsonUnreadable("holds a number too long to read (more than 4,300 digits)") from None
    check(value)
    return value


def check(value: Any) -> None:
    """Depth and text checks on an already parsed value, without recursion."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(value, ())]
    while stack:
        item, path = stack.pop()
        if len(path) > MAX_DEPTH:
            raise JsonUnreadable(
                f"is nested too deeply (Tuneboard reads at most {MAX_DEPTH} levels)", path[:3]
            )
        if isinstance(item, str):
            _check_text(item, path)
        elif isinstance(item, dict):
            for key, child in item.items():
                _check_text(key, path)
                stack.append((child, (*path, key)))
        elif isinstance(item, list):
            stack.extend((child, (*path, index)) for index, child in enumerate(item))
        elif isinstance(item, float) and not math.isfinite(item):
            raise JsonUnreadable("holds NaN or Infinity, which are not JSON numbers", path)


def _check_text(text: str, path: tuple[str | int, ...]) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(text[exc.start])
        raise JsonUnreadable(
            f"holds an unpaired surrogate escape (\\u{code:04x}), which is not text", path
        ) from None


def dotted(path: tuple[str | int, ...]) -> str:
    """A value's location as `training.seed` / `messages.0.content`."""
    return ".".join(str(p) for p in path)
