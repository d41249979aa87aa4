"""JSON shapes of the API."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict

from app.datasets.formats import FORMAT_LABELS


class DatasetOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    filename: str
    format: str
    layout: str
    format_label: str
    rows: int
    size_bytes: int
    sha256: str
    created_at: datetime

    @classmethod
    def of(cls, dataset) -> DatasetOut:
        return cls.model_validate(
            {
                **{k: getattr(dataset, k) for k in cls.model_fields if k != "format_label"},
                "format_label": FORMAT_LABELS[(dataset.format, dataset.layout)],
            }
        )


class ModelOut(BaseModel):
    id: str
    name: str
    source: str
    status: str
    path: str | None
    gguf: str | None
    error: str | None


class ModelRegistration(BaseModel):
    path: str
    name: str | None = None
