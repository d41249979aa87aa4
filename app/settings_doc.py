"""docs/settings.md, written from the settings' own declarations (app/config.py): `python -m app.settings_doc
> docs/settings.md` after changing a setting; a test checks that the file is what this writes."""

from __future__ import annotations

from app.config import RETIRED, Settings

HEADER = """# Settings

Every process setting, read from `TUNEBOARD_*` environment variables by one validated class
(`app/config.py`, pydantic-settings); this page is written from its declarations by `python -m
app.settings_doc`. A bad value stops the process at start with a sentence naming the variable.
`tuneboard web|worker|serve` also take `--host`, `--port` and `--data-dir`. Run hyperparameters are not
settings: they travel with each run (`run.yaml`, see the README).

| variable | default | what it sets |
|---|---|---|
"""


def _sentence(text: str) -> str:
    text = text.strip()
    text = text[0].upper() + text[1:]
    return text if text.endswith(".") else text + "."


def _default(name: str, field) -> str:
    extra = field.json_schema_extra or {}
    if isinstance(extra, dict) and "doc_default" in extra:
        return str(extra["doc_default"])
    if field.default is None:
        return "—"
    if field.default == "":
        return "(empty)"
    if isinstance(field.default, bool):
        return str(field.default).lower()
    return str(field.default)


def render() -> str:
    rows = [
        f"| `TUNEBOARD_{name.upper()}` | `{_default(name, field)}` | {_sentence(field.description or '')} |"
        for name, field in Settings.model_fields.items()
    ]
    retired = [f"- `{name}`: {why}" for name, why in RETIRED.items()]
    return (
        HEADER
        + "\n".join(rows)
        + "\n\nNo longer settings (a process that finds one in its environment says so at start):\n\n"
        + "\n".join(retired)
        + "\n"
    )


if __name__ == "__main__":
    print(render(), end="")
