"""The database schema (SQLAlchemy 2.0 models). Alembic migrations create it; tests keep them equal."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy import false as sa_false
from sqlalchemy import text as sa_text
from sqlalchemy.orm import DeclarativeBase, Mapped, foreign, mapped_column, relationship


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on every backend (SQLite stores no zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given; use datetime.now(UTC)")
        return value

    def process_result_value(self, value, dialect):
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


MAX_ID = 2**63 - 1  # the largest integer SQLite and PostgreSQL's BIGINT hold; ids are checked against it


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class Leased:
    """The columns of a job that workers take from the queue (a run to train, an export to make): whether it
    waits or runs, which worker holds it, when that worker last beat, how many times it was claimed.
    app.jobs is the one owner of the lease's rules."""

    status: Mapped[str] = mapped_column(String(12), default="queued")
    worker_id: Mapped[str | None] = mapped_column(String(200))
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # claims so far
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class JobAttempt(Base):
    """One attempt at a job: which worker held it, when, and how the attempt ended (a finished status,
    `requeued` when its worker stopped on purpose, `lost` when it stopped responding)."""

    __tablename__ = "job_attempts"
    __table_args__ = (UniqueConstraint("kind", "job_id", "attempt", name="uq_job_attempts_kind_job_attempt"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(12))  # a key of app.jobs.KINDS
    job_id: Mapped[int] = mapped_column(Integer)  # the run's or export's id
    attempt: Mapped[int] = mapped_column(Integer)
    worker_id: Mapped[str] = mapped_column(String(200))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    outcome: Mapped[str | None] = mapped_column(String(12))


class Dataset(Base):
    """An uploaded, validated instruction dataset. Its files live in <data_dir>/datasets/<id>/."""

    __tablename__ = "datasets"
    __table_args__ = {"sqlite_autoincrement": True}  # never reuse the id (and URL) of a deleted dataset

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    filename: Mapped[str] = mapped_column(String(255))
    format: Mapped[str] = mapped_column(String(20))  # alpaca | openai | sharegpt
    layout: Mapped[str] = mapped_column(String(10))  # json | jsonl
    rows: Mapped[int] = mapped_column(Integer)
    size_bytes: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class RegisteredModel(Base):
    """A base model the user pointed Tuneboard at: a local folder or a GGUF file."""

    __tablename__ = "registered_models"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    path: Mapped[str] = mapped_column(Text, unique=True)
    kind: Mapped[str] = mapped_column(String(10))  # folder | gguf
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class RunStatus(StrEnum):
    """A run's status. Only `app.runs.state` changes it; equal to its string, so templates and the JSON
    API see plain strings."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


ACTIVE = frozenset({RunStatus.QUEUED, RunStatus.RUNNING})
FINISHED = frozenset({RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED})
WITH_ADAPTER = frozenset({RunStatus.SUCCEEDED, RunStatus.CANCELLED})  # both save the adapter trained so far


class Run(Leased, Base):
    """One fine-tuning run. Every status change goes through app.runs.state."""

    __tablename__ = "runs"
    __table_args__ = (
        Index("ix_runs_status_id", "status", "id"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="RESTRICT"))
    base_model: Mapped[str] = mapped_column(String(300))
    method: Mapped[str] = mapped_column(String(20))
    config: Mapped[dict] = mapped_column(JSON)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    error: Mapped[str | None] = mapped_column(Text)
    exit_code: Mapped[int | None] = mapped_column(Integer)
    total_steps: Mapped[int | None] = mapped_column(Integer)
    current_step: Mapped[int] = mapped_column(Integer, default=0)
    # what a running run is doing now, in words ("Scoring the base model's answers: 16 of 40"); the pages
    # show it only while the run runs
    phase: Mapped[str | None] = mapped_column(String(200))
    trainable_params: Mapped[int | None] = mapped_column(BigInteger)
    total_params: Mapped[int | None] = mapped_column(BigInteger)
    resumed_from_step: Mapped[int | None] = mapped_column(Integer)
    # GPUs the run needs; 0: any worker
    gpus: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # the compute provider (providers.yaml) whose scheduler runs it, one job at a time; None: any worker
    provider: Mapped[str | None] = mapped_column(String(40))
    # every attempt, oldest first: which worker trained it and how it ended (loaded when asked for, so that
    # the feeds' polls of every run do not read the attempts too)
    history: Mapped[list[JobAttempt]] = relationship(
        primaryjoin=lambda: (foreign(JobAttempt.job_id) == Run.id) & (JobAttempt.kind == "train"),
        order_by=lambda: JobAttempt.attempt,
        viewonly=True,
    )
    # the scheduler jobs of a run sent to a provider, oldest first
    cluster_jobs: Mapped[list[ClusterJob]] = relationship(order_by=lambda: ClusterJob.id, viewonly=True)


class ClusterJob(Base):
    """One scheduler job of a run sent to a compute provider (app.providers.dispatch owns every change):
    its id in the scheduler, what the scheduler last said of it, when it was submitted, started and ended,
    and where its log is."""

    __tablename__ = "cluster_jobs"
    __table_args__ = (Index("ix_cluster_jobs_run_id", "run_id"), {"sqlite_autoincrement": True})

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    provider: Mapped[str] = mapped_column(String(40))
    kind: Mapped[str] = mapped_column(String(20), default="slurm")  # the provider's: slurm | kubernetes
    job_id: Mapped[str] = mapped_column(String(100))
    state: Mapped[str] = mapped_column(String(30))  # the scheduler's: PENDING, RUNNING, PREEMPTED…
    reason: Mapped[str | None] = mapped_column(String(300))  # why it waits or ended, in its words
    node: Mapped[str | None] = mapped_column(String(300))
    log: Mapped[str | None] = mapped_column(String(1000))
    submitted_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class RunMetric(Base):
    """One logged point of a run: its kind and step, and whatever numeric values the training process
    logged there (`values`: loss, learning_rate, rewards_chosen… any key, no schema change for a new one;
    app.charts says which the pages draw). Append-only; the id orders the live stream."""

    __tablename__ = "run_metrics"
    __table_args__ = (
        UniqueConstraint("run_id", "kind", "step", name="uq_run_metrics_run_kind_step"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(8))  # train | eval
    step: Mapped[int] = mapped_column(Integer)
    values: Mapped[dict[str, float | None]] = mapped_column(JSON)  # None: logged as NaN or infinity
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    def get(self, key: str) -> float | None:
        """One logged value, or None when this point does not carry it."""
        return self.values.get(key)


class RunAnswer(Base):
    """One scored answer of an evaluation: a dataset row answered by the base model (step 0) or by the run's
    checkpoint at `step`, against the row's reference answer (app.scoring)."""

    __tablename__ = "run_answers"
    __table_args__ = (
        UniqueConstraint("run_id", "step", "split", "row", name="uq_run_answers_step_split_row"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(Integer)  # 0: the base model
    split: Mapped[str] = mapped_column(String(12))  # validation | train
    row: Mapped[int] = mapped_column(Integer)  # the dataset row's index
    answer: Mapped[str] = mapped_column(Text)
    chrf: Mapped[float] = mapped_column(Float)
    rouge_l: Mapped[float] = mapped_column(Float)
    exact: Mapped[float] = mapped_column(Float)
    opening: Mapped[float | None] = mapped_column(Float)  # app.scoring: the first sentence's chrF
    seconds: Mapped[float] = mapped_column(Float)  # generation time of the batch, shared by its rows
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # the optional judge's verdict (worker.judge): 1-10, and why; null until judged or without a judge
    judge_score: Mapped[float | None] = mapped_column(Float)
    judge_reason: Mapped[str | None] = mapped_column(Text)


class BrowserSession(Base):
    """One browser sign-in. The cookie holds a random value; only its SHA-256 is stored, so a copy of the
    database signs nobody in. Sign-out deletes the row; expired rows are refused and swept."""

    __tablename__ = "browser_sessions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # sha256 hex of the cookie's value
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)


class Worker(Base):
    """A worker process, as it last reported itself: the pages show which are alive and what they do."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)  # host:pid
    host: Mapped[str] = mapped_column(String(200))
    pid: Mapped[int] = mapped_column(Integer)
    # idle | training | exporting | preparing | measuring | stopped (at most 12 characters)
    status: Mapped[str] = mapped_column(String(12))
    current_run_id: Mapped[int | None] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    last_error: Mapped[str | None] = mapped_column(Text)
    # what the worker announced: {"cpus", "memory_mb", "gpus": [{"name", "memory_mb"}]}, the base model ids
    # it can load, and its GPU count (claims compare runs' needs with these)
    hardware: Mapped[dict | None] = mapped_column(JSON)
    models: Mapped[list | None] = mapped_column(JSON)
    gpus: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # set from the Workers page: take no new runs / stop now (its run goes back to the queue)
    draining: Mapped[bool] = mapped_column(Boolean, default=False, server_default=sa_false())
    stop_requested: Mapped[bool] = mapped_column(Boolean, default=False, server_default=sa_false())


class ExportStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class Export(Leased, Base):
    """A run's adapter (or one checkpoint's) made into something other tools load: a merged model, a GGUF
    file, a llama.cpp LoRA file. Made by a worker (app.exports owns every change); its files live in the
    run's folder (`RunFolder.export_dir`)."""

    __tablename__ = "exports"
    __table_args__ = (
        UniqueConstraint("run_id", "step", "format", name="uq_exports_run_step_format"),
        Index("ix_exports_status_id", "status", "id"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(Integer)  # 0: the run's final adapter, else that checkpoint's
    format: Mapped[str] = mapped_column(String(20))  # a key of app.exports.FORMATS
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    stage: Mapped[str | None] = mapped_column(String(200))
    estimated_bytes: Mapped[int] = mapped_column(BigInteger)
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    error: Mapped[str | None] = mapped_column(Text)


class ModelDownload(Leased, Base):
    """A base model fetched by name, by a worker, from a hub into the Hugging Face cache or from ModelScope
    into its cache (app.downloads owns every change). `files` are the files it fetches, with their sizes;
    `bytes_done` counts what has arrived
    so far, including what an interrupted attempt left (the client resumes it)."""

    __tablename__ = "model_downloads"
    __table_args__ = (
        Index("ix_model_downloads_status_id", "status", "id"),
        Index(
            "uq_model_downloads_active",
            "repo_id",
            "revision",
            "endpoint",
            unique=True,
            sqlite_where=sa_text("status IN ('queued', 'running')"),
            postgresql_where=sa_text("status IN ('queued', 'running')"),
        ),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    repo_id: Mapped[str] = mapped_column(String(200))
    revision: Mapped[str] = mapped_column(String(100))
    commit: Mapped[str] = mapped_column(String(100))  # the commit the revision named when it was looked up
    endpoint: Mapped[str] = mapped_column(String(300))  # the hub it comes from
    source: Mapped[str] = mapped_column(String(20), default="huggingface", server_default="huggingface")
    files: Mapped[dict] = mapped_column(JSON)  # {name: bytes}
    bytes_total: Mapped[int] = mapped_column(BigInteger)
    bytes_done: Mapped[int] = mapped_column(BigInteger, default=0)
    speed: Mapped[float | None] = mapped_column(Float)  # bytes per second, lately
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    error: Mapped[str | None] = mapped_column(Text)


class Publication(Leased, Base):
    """A run's adapter, or one of its finished exports, pushed to a repository on a hub with a generated model
    card, by a worker (app.publishing owns every change). `card` is the README written when it was asked
    for; `bytes_done` counts what has been sent of `bytes_total`; `url`: the commit's address once pushed."""

    __tablename__ = "publications"
    __table_args__ = (
        Index("ix_publications_status_id", "status", "id"),
        Index("ix_publications_run_id", "run_id"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    export_id: Mapped[int | None] = mapped_column(ForeignKey("exports.id", ondelete="SET NULL"))
    what: Mapped[str] = mapped_column(String(20))  # "adapter", or the export's format
    repo_id: Mapped[str] = mapped_column(String(200))
    private: Mapped[bool] = mapped_column(Boolean, default=True)
    endpoint: Mapped[str] = mapped_column(String(300))  # the hub it goes to
    card: Mapped[str] = mapped_column(Text)
    bytes_total: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_done: Mapped[int] = mapped_column(BigInteger, default=0)
    speed: Mapped[float | None] = mapped_column(Float)  # bytes per second, lately
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    url: Mapped[str | None] = mapped_column(String(500))
    error: Mapped[str | None] = mapped_column(Text)


class Vote(Base):
    """One blind comparison in the playground: the conversation asked, the answers in the order they were
    shown with the target that wrote each, the verdict, the chosen answer (possibly edited by the voter),
    the sampling settings and the time. app.votes owns them."""

    __tablename__ = "votes"
    __table_args__ = (Index("ix_votes_conversation", "conversation_id"), {"sqlite_autoincrement": True})

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    conversation_id: Mapped[str] = mapped_column(String(64))  # the playground conversation the vote is in
    messages: Mapped[list] = mapped_column(JSON)  # the conversation up to the question, as chat messages
    answers: Mapped[list] = mapped_column(JSON)  # [{"target", "text"}], in the order shown
    verdict: Mapped[str] = mapped_column(String(12))  # better | tie | both_bad
    best: Mapped[int | None] = mapped_column(Integer)  # the better answer's index when the verdict is better
    chosen: Mapped[str | None] = mapped_column(Text)  # the text saved as chosen (edited or not); None: none
    sampling: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
