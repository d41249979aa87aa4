"""The container files: both compose files are valid Compose (the official JSON schema) and wire the services
as the README promises: migrations once before web and worker, healthchecks, a GPU for the worker, and a
worker that talks to the web server over HTTP with its own data, on this machine or another."""

from __future__ import annotations

import copy
import importlib.resources
import json
import re
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
WORKER_COMPOSE = ROOT / "docker-compose.worker.yml"
DOCKERFILE = ROOT / "Dockerfile"
LONG_RUNNING = ("postgres", "web", "worker")
GPU = {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}


@pytest.fixture(scope="module")
def validator():
    """The Compose Specification's schema as vendored by check-jsonschema (no network)."""
    text = (
        importlib.resources.files("check_jsonschema")
        .joinpath("builtin_schemas", "vendor", "compose-spec.json")
        .read_text(encoding="utf-8")
    )
    schema = json.loads(text)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def load(path: Path) -> dict:
    with path.open(encoding="utf-8") as file:
        return yaml.safe_load(file)


@pytest.fixture(scope="module")
def compose() -> dict:
    return load(COMPOSE)


@pytest.fixture(scope="module")
def worker_compose() -> dict:
    return load(WORKER_COMPOSE)


def schema_errors(validator, document: dict) -> list[str]:
    return [
        f"{'/'.join(map(str, error.absolute_path)) or '(top)'}: {error.message}"
        for error in validator.iter_errors(document)
    ]


def env(service: dict) -> dict[str, str]:
    """A service's environment as a dict (Compose allows a list of NAME=value too)."""
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        return dict(item.split("=", 1) for item in environment)
    return {name: str(value) for name, value in environment.items()}


def url_host(url: str) -> str | None:
    """The host part of a URL that may carry ${...} interpolations (e.g. in the password)."""
    found = re.search(r"://(?:.*@)?([^:/@]+)(?::\d+)?(?:/|$)", url)
    return found.group(1) if found else None


def volume_sources(service: dict) -> set[str]:
    sources = set()
    for volume in service.get("volumes") or []:
        sources.add(volume.split(":", 1)[0] if isinstance(volume, str) else volume.get("source"))
    return sources


def depends(service: dict) -> dict[str, str]:
    """Each dependency's condition (the short list form means service_started)."""
    needs = service.get("depends_on") or {}
    if isinstance(needs, list):
        return dict.fromkeys(needs, "service_started")
    return {name: spec.get("condition", "service_started") for name, spec in needs.items()}


@pytest.mark.parametrize("path", [COMPOSE, WORKER_COMPOSE], ids=lambda p: p.name)
def test_compose_file_is_valid_compose(validator, path):
    errors = schema_errors(validator, load(path))
    assert errors == [], f"{path.name} does not follow the Compose Specification:\n" + "\n".join(errors)


def test_the_schema_check_can_fail(validator, compose):
    """A deliberately broken copy is rejected, so the check above is not vacuous."""
    broken = copy.deepcopy(compose)
    broken["services"]["web"]["depends_on"]["migrate"]["condition"] = "service_done"
    errors = schema_errors(validator, broken)
    assert any("service_done" in error for error in errors), f"the schema accepted a bad condition: {errors}"
    broken = copy.deepcopy(compose)
    broken["services"]["worker"]["healthchek"] = broken["services"]["worker"].pop("healthcheck")
    assert schema_errors(validator, broken), "the schema accepted a misspelt key (healthchek)"


def test_one_machine_has_the_services(compose):
    services = compose["services"]
    assert set(services) == {"postgres", "migrate", "web", "worker"}, f"unexpected services: {set(services)}"


def test_migrations_run_once_before_web_and_worker(compose):
    services = compose["services"]
    migrate = services["migrate"]
    assert migrate["command"] == ["tuneboard", "migrate"], "the migrate service must run `tuneboard migrate`"
    assert "restart" not in migrate or migrate["restart"] == "no", "migrate runs once: it must not restart"
    assert depends(migrate).get("postgres") == "service_healthy", "migrate must wait for a healthy postgres"
    for name in ("web", "worker"):
        condition = depends(services[name]).get("migrate")
        assert condition == "service_completed_successfully", (
            f"{name} must start after migrate completed successfully (its depends_on condition: {condition})"
        )


def test_long_running_services_have_healthchecks(compose, worker_compose):
    services = {**compose["services"], "second machine's worker": worker_compose["services"]["worker"]}
    for name in (*LONG_RUNNING, "second machine's worker"):
        check = services[name].get("healthcheck") or {}
        assert check.get("test") and not check.get("disable"), f"{name} needs a healthcheck"
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"], "postgres: check with pg_isready"
    web_check = " ".join(services["web"]["healthcheck"]["test"])
    assert "127.0.0.1:8000/healthz" in web_check, f"web: check GET /healthz, not {web_check}"
    worker_check = " ".join(services["worker"]["healthcheck"]["test"])
    port = urlsplit(env(services["worker"]).get("TUNEBOARD_GENERATION_URL", "http://127.0.0.1:8001")).port
    assert f"127.0.0.1:{port}/healthz" in worker_check, (
        f"worker: check its generation host, not {worker_check}"
    )
    assert env(services["worker"]).get("TUNEBOARD_GENERATION", "true").lower() not in ("false", "0", "no"), (
        "the worker's healthcheck asks its generation host, which must be on"
    )


def test_workers_reserve_an_nvidia_gpu(compose, worker_compose):
    for where, document in (("docker-compose.yml", compose), ("docker-compose.worker.yml", worker_compose)):
        devices = document["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
        assert GPU in devices, f"{where}: the worker must reserve {GPU}, has {devices}"


def test_worker_image_gets_a_cuda_torch(compose, worker_compose):
    for where, document in (("docker-compose.yml", compose), ("docker-compose.worker.yml", worker_compose)):
        build = document["services"]["worker"]["build"]
        index = (build.get("args") or {}).get("TORCH_INDEX", "") if isinstance(build, dict) else ""
        assert re.search(r"download\.pytorch\.org/whl/cu\d+", index), (
            f"{where}: the worker's build must pass a CUDA torch index as TORCH_INDEX, not {index!r}"
        )
    dockerfile = DOCKERFILE.read_text(encoding="utf-8")
    assert re.search(r"^ARG TORCH_INDEX=", dockerfile, re.M), "the Dockerfile must declare ARG TORCH_INDEX"
    install = next(line for line in dockerfile.splitlines() if re.match(r"RUN .*make install", line))
    assert "$TORCH_INDEX" in install, f"the Dockerfile's `make install` step must use TORCH_INDEX: {install}"


def test_dockerfile_installs_with_make_install():
    runs = [line for line in DOCKERFILE.read_text(encoding="utf-8").splitlines() if line.startswith("RUN ")]
    installs = [line for line in runs if re.search(r"\bmake install\b(?!-)", line)]
    assert len(installs) == 1, (
        f"the image must install with `make install` (what make install-test builds on): {runs}"
    )
    assert not any("pip install" in line for line in runs), "install through the Makefile, not pip directly"


def test_web_and_worker_use_the_postgres_service(compose):
    services = compose["services"]
    for name in ("migrate", "web", "worker"):
        url = env(services[name]).get("TUNEBOARD_DATABASE_URL", "")
        assert url.startswith("postgresql+psycopg://"), (
            f"{name}: TUNEBOARD_DATABASE_URL must be psycopg 3: {url}"
        )
        assert url_host(url) == "postgres", (
            f"{name}: TUNEBOARD_DATABASE_URL must name the postgres service: {url}"
        )


def test_worker_talks_to_the_web_server_and_keeps_its_own_data(compose):
    services = compose["services"]
    worker, web = services["worker"], services["web"]
    server = env(worker).get("TUNEBOARD_SERVER_URL", "")
    assert url_host(server) == "web", (
        f"the worker's TUNEBOARD_SERVER_URL must point at the web service: {server!r}"
    )
    assert "web" in env(web).get("TUNEBOARD_ALLOWED_HOSTS", "").split(","), (
        "the web server must accept the name `web` the worker reaches it by (TUNEBOARD_ALLOWED_HOSTS)"
    )
    web_data = {s for s in volume_sources(web) if s in (compose.get("volumes") or {})}
    shared = web_data & volume_sources(worker)
    assert not shared, f"the worker must not mount the web server's data volume: {shared}"
    assert env(worker).get("TUNEBOARD_DATA_DIR") in {
        v.split(":")[1] for v in worker["volumes"] if isinstance(v, str)
    }, "the worker's TUNEBOARD_DATA_DIR must be on its own volume"
    assert url_host(env(web).get("TUNEBOARD_GENERATION_URL", "")) == "worker", (
        "the web server must find the generation host at the worker service (TUNEBOARD_GENERATION_URL)"
    )
    assert url_host(env(worker).get("TUNEBOARD_GENERATION_URL", "")) == "0.0.0.0", (
        "the generation host must listen beyond the container (TUNEBOARD_GENERATION_URL)"
    )
    assert env(worker).get("TUNEBOARD_TOKEN"), "listening beyond loopback needs TUNEBOARD_TOKEN"


def test_second_machine_runs_only_a_worker(worker_compose):
    services = worker_compose["services"]
    assert list(services) == ["worker"], (
        f"docker-compose.worker.yml must hold only a worker: {list(services)}"
    )
    worker = services["worker"]
    settings = env(worker)
    for name in ("TUNEBOARD_SERVER_URL", "TUNEBOARD_TOKEN", "TUNEBOARD_DATABASE_URL"):
        assert settings.get(name), f"the second machine's worker needs {name}"
    assert "depends_on" not in worker, "the second machine's worker has nothing to depend on there"
    own = set(worker_compose.get("volumes") or {})
    assert own & volume_sources(worker), "the second machine's worker needs its own data volume"
