"""Process settings: one validated class, read from TUNEBOARD_* environment variables."""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent
MIN_TOKEN_LENGTH = 16  # a shorter token is refused at start: it could be guessed
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
# Settings that were merged into another or became fixed, and what to do instead
RETIRED = {
    "TUNEBOARD_GENERATION_HOST": "set the host in TUNEBOARD_GENERATION_URL (e.g. http://0.0.0.0:8001).",
    "TUNEBOARD_GENERATION_PORT": "set the port in TUNEBOARD_GENERATION_URL (e.g. http://127.0.0.1:8002).",
    "TUNEBOARD_VALIDATION_FRACTION": "a run's share of held-out rows is its evaluation.held_out_fraction "
    "(10% when unset).",
    "TUNEBOARD_VALIDATION_MAX_ROWS": "a run's most held-out rows are its evaluation.held_out_max_rows "
    "(500 when unset).",
    "TUNEBOARD_SPLIT_SEED": "a run's held-out rows follow its own seed (training.seed).",
    "TUNEBOARD_PREVIEW_ROWS": "a dataset's page shows its first 10 rows.",
    "TUNEBOARD_DEFAULT_MAX_LENGTH": "the dataset pages' statistics assume a run's default max length (1,024 "
    "tokens) and offer others.",
    "TUNEBOARD_WORKER_POLL_SECONDS": "an idle worker looks for work every TUNEBOARD_HEARTBEAT_SECONDS.",
    "TUNEBOARD_CANCEL_GRACE_SECONDS": "a run asked to stop gets 30 s to stop by itself before SIGTERM.",
    "TUNEBOARD_GENERATION_MAX_BODY_KB": "the generation host reads conversations of up to 1,024 KB.",
}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TUNEBOARD_", extra="ignore")

    host: str = Field("127.0.0.1", description="address the web server listens on")
    port: int = Field(8000, ge=1, le=65535, description="port the web server listens on")
    data_dir: Path = Field(
        PROJECT_ROOT / "data",
        description="database, datasets, models and runs",
        json_schema_extra={"doc_default": "data/ (in the project folder)"},
    )
    database_url: str | None = Field(
        None, description="SQLAlchemy URL; defaults to SQLite at <data_dir>/tuneboard.db"
    )
    token: SecretStr | None = Field(
        None,
        description="When set, every API call needs 'Authorization: Bearer <token>' and browsers sign in. "
        f"At least {MIN_TOKEN_LENGTH} characters; empty means unset.",
    )
    judge_url: str | None = Field(
        None,
        description="OpenAI-compatible endpoints (…/v1) a run's judge may name, comma-separated; the key "
        "below goes only to the first. A run naming no URL is judged by this server's own /v1; a run "
        "naming any URL not listed here is refused",
    )
    judge_api_key: SecretStr | None = Field(
        None,
        description="API key sent to `TUNEBOARD_JUDGE_URL` when a run's judge uses that endpoint (a run "
        "naming any other URL gets no key; the key never travels with a run)",
    )
    allowed_hosts: str = Field(
        "",
        description="Comma-separated extra names this server may be reached by (the Host header); loopback "
        "names, IP addresses and the configured host are always allowed. '*' turns the check off.",
    )
    session_hours: float = Field(
        168, gt=0, le=24 * 365, description="how long a browser sign-in lasts (hours; sign-out ends it)"
    )
    login_attempts_per_minute: int = Field(
        5, ge=1, description="failed sign-ins allowed per client address per minute; more get 429"
    )
    max_upload_mb: float = Field(200, gt=0, description="Largest dataset file accepted, in MB.")
    max_artifact_mb: float = Field(
        50_000,
        gt=0,
        description="largest checkpoint or adapter a worker on another machine may send the web server, "
        "in MB",
    )
    max_rows: int = Field(2_000_000, ge=1, description="most rows a dataset may have; more get a 422")
    stats_inline_rows: int = Field(
        20_000,
        ge=0,
        description="datasets up to this many rows get statistics at once; larger in the background",
    )
    prepare_models: bool = Field(
        True,
        description=(
            "while the worker is idle: convert GGUF base models, and measure its training speed once"
        ),
    )
    heartbeat_seconds: float = Field(
        3.0, gt=0, description="how often a worker marks its run alive and, when idle, looks for work"
    )
    stale_after_seconds: float = Field(30.0, gt=0, description="silence after which a run is requeued")
    server_url: str | None = Field(
        None,
        description="A worker on another machine: the web server's URL (with `TUNEBOARD_TOKEN`). It fetches "
        "datasets and checkpoints from it and sends back logs, checkpoints and adapters, keeping its own "
        "copies under its `TUNEBOARD_DATA_DIR`. Unset: the worker shares the web server's data folder.",
        pattern=r"^https?://[^\s]+$",
    )
    num_processes: int = Field(
        1,
        ge=1,
        description="training processes per run for runs that ask for no GPUs, via accelerate (several on a "
        "machine without GPUs: data parallel on the CPU). A run asking for N GPUs gets N processes",
    )
    torch_threads: int | None = Field(
        None,
        ge=1,
        description="CPU threads per training process; default: the cores the worker may use, shared "
        "among the run's processes (set explicitly for each)",
    )
    generation: bool = Field(True, description="the worker starts the generation host (playground, /v1 API)")
    generation_url: str = Field(
        "http://127.0.0.1:8001",
        description="the generation host's address: it listens on this URL's host and port, and the web "
        "server sends it questions there. A generation host other machines reach listens on "
        "http://0.0.0.0:8001 (with `TUNEBOARD_TOKEN`), and their dashboards name it, e.g. http://gpu-box:8001",
        pattern=r"^http://(\[[0-9a-fA-F:.]+\]|[^\s/:\[\]]+):\d{1,5}/?$",
    )
    generation_threads: int | None = Field(
        None,
        ge=1,
        description="CPU threads for generation; default half the cores, so training keeps the rest",
    )
    generation_memory_mb: float | None = Field(
        None, gt=0, description="memory for loaded models and adapters; default half of what is free at start"
    )
    generation_queue: int = Field(8, ge=1, description="requests that may wait for the generation host")
    generation_dtype: str = Field(
        "auto", pattern="^(auto|float32|bfloat16|float16)$", description="weights' dtype for answering"
    )

    @field_validator("token", mode="before")
    @classmethod
    def _blank_is_unset(cls, value):
        """An empty or whitespace-only secret is no secret: treat it as unset, everywhere."""
        raw = value.get_secret_value() if isinstance(value, SecretStr) else value
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            return None
        if isinstance(raw, str) and len(raw.strip()) < MIN_TOKEN_LENGTH:
            raise ValueError(
                f"too short ({len(raw.strip())} characters): use at least {MIN_TOKEN_LENGTH}, e.g. the "
                "output of `python -c 'import secrets; print(secrets.token_urlsafe())'`"
            )
        return raw.strip() if isinstance(raw, str) else raw

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @property
    def sqlalchemy_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'tuneboard.db'}"

    @property
    def generation_base_url(self) -> str:
        return self.generation_url.rstrip("/")

    @property
    def generation_listen(self) -> tuple[str, int]:
        """The host and port the generation host listens on (TUNEBOARD_GENERATION_URL's)."""
        address = urlsplit(self.generation_url)
        return address.hostname or "127.0.0.1", address.port or 8001

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1_000_000)

    @property
    def datasets_dir(self) -> Path:
        return self.data_dir / "datasets"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def runs_dir(self) -> Path:
        return self.data_dir / "runs"

    def run_dir(self, run_id: int) -> Path:
        return self.runs_dir / str(run_id)

    def run_folder(self, run_id: int):
        """The run's folder and its layout (`app.runs.folder.RunFolder`)."""
        from app.runs.folder import RunFolder

        return RunFolder(self.run_dir(run_id))

    @property
    def tmp_dir(self) -> Path:
        return self.data_dir / "tmp"

    def child_env(self, **extra: str) -> dict[str, str]:
        """The environment that gives a child process (worker, generation host) these same settings,
        including the address this server really listens on (given on the command line or not)."""
        return dict(
            os.environ,
            TUNEBOARD_DATA_DIR=str(self.data_dir),
            TUNEBOARD_HOST=self.host,
            TUNEBOARD_PORT=str(self.port),
            **self.database_env(),
            **extra,
        )

    @property
    def judge_urls(self) -> list[str]:
        """The judge endpoints runs may name (`judge_url`, no trailing slashes); the first gets the key."""
        return [u.strip().rstrip("/") for u in (self.judge_url or "").split(",") if u.strip()]

    def database_env(self) -> dict[str, str]:
        """What a child process needs to use this database (nothing for SQLite in the data folder)."""
        return {"TUNEBOARD_DATABASE_URL": self.database_url} if self.database_url else {}

    def ensure_dirs(self) -> None:
        for folder in (self.data_dir, self.datasets_dir, self.models_dir, self.runs_dir, self.tmp_dir):
            folder.mkdir(parents=True, exist_ok=True)

    def check_exposure(self, host: str | None = None, what: str = "Tuneboard") -> None:
        """Refuse to listen beyond this machine without a token."""
        host = self.host if host is None else host
        if self.token is None and not is_loopback(host):
            raise SystemExit(
                f"Refusing to start {what} on {host} without a token: anyone who can reach this address "
                "could upload data, start jobs and use the models. Set TUNEBOARD_TOKEN to a long random "
                "secret, or listen on 127.0.0.1."
            )

    def host_names(self, listen_host: str | None = None) -> frozenset[str] | None:
        """The names a request's Host header may carry (lower case, no port); None when the check is off.

        Loopback names and the configured listening host always; IP addresses are allowed separately (a
        page cannot rebind a name to a bare IP). Listening on every address adds this machine's names."""
        extra = {n.strip().lower().strip("[]") for n in self.allowed_hosts.split(",") if n.strip()}
        if "*" in extra:
            return None
        host = (self.host if listen_host is None else listen_host).lower().strip("[]")
        names = {*LOOPBACK_NAMES, *extra}
        if host in WILDCARD_HOSTS:
            names |= {socket.gethostname().lower(), socket.getfqdn().lower()}
        else:
            names.add(host)
        return frozenset(names)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_settings(**overrides) -> Settings:
    """The process settings, or an exit with one sentence per bad setting (never a traceback). A retired
    setting still in the environment is named, with what to do instead (it is not read)."""
    for name in sorted(RETIRED.keys() & os.environ.keys()):
        logging.getLogger("tuneboard").warning(
            "%s is no longer a setting and is ignored: %s", name, RETIRED[name]
        )
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        lines = [
            f"TUNEBOARD_{'_'.join(map(str, e['loc'])).upper()}: {e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors()
        ]
        raise SystemExit("Tuneboard cannot start:\n" + "\n".join(lines)) from None


@lru_cache
def get_settings() -> Settings:
    return load_settings()


def isolated_env(data_dir: Path, **settings: str) -> dict[str, str]:
    """This process's environment without any inherited TUNEBOARD_ setting, plus a data folder and exactly
    the `settings` given: a child configured only by its caller (the tests' and benchmarks' servers)."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("TUNEBOARD_")}
    return env | {"TUNEBOARD_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1"} | settings
