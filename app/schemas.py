"""JSON shapes of the API."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

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


# Where a model is fetched from by name (app.hub.SOURCES).
Source = Literal["huggingface", "modelscope"]


class HubModelAsk(BaseModel):
    """A model to look up or download by name: an id as its hub spells it, a revision (default main, or
    master on ModelScope) and the hub (default the Hugging Face Hub, or the mirror HF_ENDPOINT names)."""

    repo_id: str = Field(max_length=300)
    revision: str | None = Field(default=None, max_length=200)
    source: Source = "huggingface"


class HubModelOut(BaseModel):
    repo_id: str
    revision: str
    commit: str
    endpoint: str
    source: Source
    files: dict[str, int]
    size_bytes: int
    license: str | None
    gated: bool
    architecture: str | None
    refusal: str | None
    disk_free_bytes: int | None
    files_left_out: int


class DownloadOut(BaseModel):
    id: int
    repo_id: str
    revision: str
    endpoint: str
    source: Source
    status: str
    bytes_done: int
    bytes_total: int
    speed_bytes_per_second: float | None
    attempts: int
    error: str | None
    created_at: datetime
    finished_at: datetime | None


class HubToken(BaseModel):
    token: str = Field(max_length=300)
    source: Source = "huggingface"
