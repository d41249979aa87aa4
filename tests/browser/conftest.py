"""The browser tests of runs against one real `tuneboard serve` per module (the tiny model, its worker and
generation host): each module's tests share its server, and the test processes (pytest-xdist) run the
modules side by side. Each test launches the runs it needs."""

from __future__ import annotations

import httpx
import pytest

from app.processes import free_port
from tests.conftest import DEMO_DATASET, HELD_OUT, NO_SCORING
from tests.servers import FAST_WORKER, running
from tests.waiting import wait_until

WORKER = FAST_WORKER | {
    "TUNEBOARD_GENERATION": "true",
    "TUNEBOARD_GENERATION_DTYPE": "float32",
    "TUNEBOARD_GENERATION_THREADS": "1",
}


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_model_dir):
    folder = tmp_path_factory.mktemp("browser-runs")
    env = WORKER | {"TUNEBOARD_GENERATION_URL": f"http://127.0.0.1:{free_port()}"}
    with running("serve", folder / "data", log=folder / "serve.log", env_extra=env) as (base, _):
        model = httpx.post(f"{base}/api/models", json={"path": str(tiny_model_dir), "name": "Tiny"}).json()[
            "id"
        ]
        files = {"file": ("demo_alpaca.json", DEMO_DATASET.read_bytes())}
        dataset = httpx.post(f"{base}/api/datasets", files=files).json()["id"]
        yield {"base": base, "model": model, "dataset": dataset, "folder": folder}


@pytest.fixture(autouse=True)
def nothing_left_training(app):
    """Each test starts with an idle worker: a run a failed test left behind would queue the next test's
    runs behind it and fail that one too."""
    yield
    for run in httpx.get(f"{app['base']}/api/runs").json():
        if run["status"] in ("queued", "running"):
            httpx.post(f"{app['base']}/api/runs/{run['id']}/cancel")
    wait_until(
        lambda: all(
            r["status"] not in ("queued", "running") for r in httpx.get(f"{app['base']}/api/runs").json()
        ),
        60,
        "every run this test launched to stop",
    )


@pytest.fixture
def context(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    context.errors = []
    context.on("weberror", lambda error: context.errors.append(str(error.error)))
    yield context
    context.close()


def points(page) -> int:
    return int(page.get_attribute("#chart-loss", "data-points") or 0)


def api_run(app, run_id: int) -> dict:
    return httpx.get(f"{app['base']}/api/runs/{run_id}").json()


def launch(app, epochs: int, *, scored: bool = False, **training) -> int:
    """Queue a run of the tiny model, holding 4 of the 40 demo rows out (the pages show a validation set);
    it scores answers (48 tokens each) only when `scored`."""
    body = {
        "dataset_id": app["dataset"],
        "base_model": app["model"],
        "training": {"num_train_epochs": epochs, **training},
        "evaluation": HELD_OUT | ({"max_new_tokens": 48} if scored else NO_SCORING),
    }
    return httpx.post(f"{app['base']}/api/runs", json=body).json()["id"]


def finished_runs(app, *epochs: int, scored: bool = False) -> list[int]:
    """Runs this test launches itself, once they have finished (no test relies on another's runs)."""
    runs = [launch(app, e, scored=scored) for e in epochs]
    for run in runs:
        wait_until(lambda run=run: api_run(app, run)["status"] == "succeeded", 180, f"run {run} to finish")
    return runs


def shoot(page, folder, name: str) -> None:
    """Full-page screenshots at desktop (1280 px) and phone (390 px) width, into `folder`."""
    for width in (1280, 390):
        page.set_viewport_size({"width": width, "height": 900})
        page.screenshot(path=str(folder / f"{name}-{width}.png"), full_page=True)
    page.set_viewport_size({"width": 1280, "height": 900})
