"""A minimal reader of text/event-stream bodies for tests."""

from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass
class Event:
    event: str
    data: str
    id: str | None

    @property
    def json(self):
        return json.loads(self.data)


def parse(lines) -> list[Event]:
    """Events from an iterable of lines (the stream ends when the iterable does)."""
    events, fields = [], {}
    for line in lines:
        line = line.rstrip("\r\n")
        if not line:
            if "data" in fields or "event" in fields:
                events.append(
                    Event(fields.get("event", "message"), "\n".join(fields.get("data", [])), fields.get("id"))
                )
            fields = {}
            continue
        if line.startswith(":"):
            continue  # a comment: the keep-alive ping
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            fields.setdefault("data", []).append(value)
        else:
            fields[name] = value
    return events
