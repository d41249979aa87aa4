"""Request-scoped dependencies: settings and database sessions, as annotated types for route signatures."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, TypeVar

from fastapi import Depends, HTTPException, Path, Query, Request
from sqlalchemy.orm import Session

from app.config import Settings
from app.models import MAX_ID, Dataset, Run

T = TypeVar("T")


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    with request.app.state.db.session() as session:
        yield session


def get_write_session(request: Request) -> Iterator[Session]:
    """A session whose transaction takes the write lock at BEGIN; routes commit explicitly."""
    with request.app.state.db.write_session() as session:
        yield session


async def get_form(request: Request) -> dict[str, str]:
    """A page form's text fields, read before the route runs: routes that take it stay plain functions, run
    in the server's thread pool, so that their database and tokenizer work never holds up other requests."""
    return {key: value for key, value in (await request.form()).items() if isinstance(value, str)}


SettingsDep = Annotated[Settings, Depends(get_settings)]
FormDep = Annotated[dict[str, str], Depends(get_form)]
SessionDep = Annotated[Session, Depends(get_session)]
WriteSessionDep = Annotated[Session, Depends(get_write_session)]

# Ids in URLs: bounded, so that no number reaches the database that it cannot hold (a 422 instead of a 500).
RunId = Annotated[int, Path(ge=1, le=MAX_ID, description="a run's id")]
DatasetId = Annotated[int, Path(ge=1, le=MAX_ID, description="a dataset's id")]
IdQuery = Query(ge=1, le=MAX_ID, description="an id")
AfterId = Annotated[int, Query(ge=0, le=MAX_ID, description="only rows after this id")]


def get_or_404(session: Session, table: type[T], row_id: int, what: str) -> T:
    """The row, or a 404 that says "There is no <what> <id>."."""
    row = session.get(table, row_id)
    if row is None:
        raise HTTPException(404, f"There is no {what} {row_id}.")
    return row


def get_run_or_404(session: Session, run_id: int) -> Run:
    return get_or_404(session, Run, run_id, "run")


def get_dataset_or_404(session: Session, dataset_id: int) -> Dataset:
    dataset = session.get(Dataset, dataset_id)
    if dataset is None:
        raise HTTPException(404, f"There is no dataset {dataset_id}.")
    return dataset
