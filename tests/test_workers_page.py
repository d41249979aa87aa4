"""The Workers page: what each worker announced, and drain / take runs / stop from the page, which the
worker obeys at its next beat; a queued run's page says why it waits."""

from __future__ import annotations

import threading

from app import workers
from tests.conftest import DEMO_DATASET, upload
from tests.test_pages import browser_headers
from worker.main import work_once

GPU_BOX = workers.Capabilities(
    hardware={
        "cpus": 32,
        "memory_mb": 257_000,
        "free_memory_mb": 200_000,
        "gpus": [{"name": "NVIDIA H100 80GB HBM3", "memory_mb": 81_559}] * 2,
    },  # fmt: skip
    models=["smollm2-135m-instruct", "Qwen/Qwen2.5-1.5B-Instruct"],
)


def beat(db, worker_id: str, capabilities=GPU_BOX) -> workers.Orders:
    with db.write_session() as session:
        orders = workers.beat(session=session, worker_id=worker_id, status="idle", capabilities=capabilities)
        session.commit()
    return orders


def test_the_page_lists_each_workers_hardware_and_models(client, db):
    beat(db, "gpu-box:4242")
    page = client.get("/workers").text
    assert "gpu-box" in page and "process 4242" in page and "32 CPU cores" in page
    assert page.count("NVIDIA H100 80GB HBM3, 80 GiB") == 2
    assert "smollm2-135m-instruct, Qwen/Qwen2.5-1.5B-Instruct" in page
    assert '"what": "drain"' in page and '"what": "stop"' in page


def test_drain_then_take_runs_then_stop_from_the_page(client, db):
    beat(db, "gpu-box:4242")

    def order(what: str):
        body = {"worker_id": "gpu-box:4242", "what": what}
        return client.post("/workers/orders", data=body, headers=browser_headers(client))

    drained = order("drain")
    assert (
        drained.status_code == 200
        and "gpu-box finishes its current run and takes no new ones." in drained.text
    )
    assert "draining: takes no new runs" in drained.text and '"what": "undrain"' in drained.text
    assert beat(db, "gpu-box:4242") == workers.Orders(drain=True, stop=False)
    assert "gpu-box takes runs again." in order("undrain").text
    assert beat(db, "gpu-box:4242") == workers.Orders(drain=False, stop=False)
    stopped = order("stop")
    assert (
        "stops at its next report" in stopped.text
        and "stopping: its run goes back to the queue" in stopped.text
    )
    assert beat(db, "gpu-box:4242").stop
    unknown = client.post(
        "/workers/orders", data={"worker_id": "nobody:1", "what": "drain"}, headers=browser_headers(client)
    )
    assert unknown.status_code == 404 and "There is no worker nobody:1." in unknown.text
    bad = client.post(
        "/workers/orders",
        data={"worker_id": "gpu-box:4242", "what": "explode"},
        headers=browser_headers(client),
    )
    assert bad.status_code == 422


def test_a_drained_worker_takes_nothing_and_a_stopped_one_stops(client, settings, db, tiny_model_dir):
    model = client.post("/api/models", json={"path": str(tiny_model_dir)}).json()["id"]
    dataset = upload(client, "demo.json", DEMO_DATASET.read_bytes()).json()["id"]
    run = client.post("/api/runs", json={"dataset_id": dataset, "base_model": model}).json()["id"]
    stop = threading.Event()
    settings = settings.model_copy(update={"prepare_models": False})
    beat(db, "w1", capabilities=None)
    with db.write_session() as session:
        workers.order(session=session, worker_id="w1", what="drain")
        session.commit()
    assert work_once(settings, db, me="w1", stop=stop) is False
    assert client.get(f"/api/runs/{run}").json()["status"] == "queued"
    page = client.get(f"/runs/{run}").text
    assert "Every worker that is running is draining: this run waits until one takes runs again." in page
    with db.write_session() as session:
        workers.order(session=session, worker_id="w1", what="stop")
        session.commit()
    assert work_once(settings, db, me="w1", stop=stop) is False and stop.is_set()
    assert client.get(f"/api/runs/{run}").json()["status"] == "queued"


def test_a_run_no_alive_worker_can_serve_says_why_it_waits(client, db, tiny_model_dir):
    model = client.post("/api/models", json={"path": str(tiny_model_dir)}).json()["id"]
    dataset = upload(client, "demo.json", DEMO_DATASET.read_bytes()).json()["id"]
    run = client.post("/api/runs", json={"dataset_id": dataset, "base_model": model}).json()["id"]
    assert "run-waiting" not in client.get(f"/runs/{run}").text  # no worker at all: the banner says so
    beat(db, "gpu-box:4242")  # alive, without this model
    assert (
        f"No worker that is running can load {model}: this run waits for one that can."
        in client.get(f"/runs/{run}").text
    )
    big = client.post("/api/runs", json={"dataset_id": dataset, "base_model": model, "gpus": 4}).json()
    beat(db, "gpu-box:4242", workers.Capabilities(hardware=GPU_BOX.hardware, models=[model]))
    page = client.get(f"/runs/{big['id']}").text
    assert "This run needs 4 GPUs; the workers running that can load its model have at most 2." in page
    assert big["gpus"] == 4 and big["config"]["gpus"] == 4


def test_the_new_run_form_asks_for_gpus_and_how_to_spread_the_model(client):
    dataset = upload(client, "demo.json", DEMO_DATASET.read_bytes()).json()["id"]
    page = client.get("/runs/new").text
    assert 'name="gpus"' in page and '<option value="fsdp"' in page
    form = {"dataset_id": str(dataset), "method": "lora", "gpus": "2", "distributed": "fsdp"}
    response = client.post("/runs", data=form, headers=browser_headers(client))
    assert response.status_code == 204, response.text
    run = client.get(f"/api/runs/{response.headers['HX-Redirect'].rsplit('/', 1)[1]}").json()
    assert run["gpus"] == 2 and run["config"]["distributed"] == "fsdp"
    refused = client.post("/runs", data=form | {"gpus": "-1"}, headers=browser_headers(client))
    assert refused.status_code == 422 and "gpus" in refused.text


def test_a_worker_started_again_under_the_same_name_is_not_stopped_by_the_old_order(db):
    beat(db, "box:1")  # a container's worker is pid 1 on the same host every time
    with db.write_session() as session:
        workers.order(session=session, worker_id="box:1", what="stop")
        workers.order(session=session, worker_id="box:1", what="drain")
        session.commit()
    assert beat(db, "box:1") == workers.Orders(drain=True, stop=True)
    with db.write_session() as session:
        workers.started(session=session, worker_id="box:1")
    assert beat(db, "box:1") == workers.Orders(drain=False, stop=False)


def test_orders_from_another_site_are_refused(client, db):
    beat(db, "gpu-box:4242")
    client.get("/workers")
    forged = client.post(
        "/workers/orders",
        data={"worker_id": "gpu-box:4242", "what": "stop"},
        headers={"Origin": "http://evil.example", "HX-Request": "true"},
    )
    assert forged.status_code == 403
    assert beat(db, "gpu-box:4242") == workers.Orders(drain=False, stop=False)


def test_the_workers_api_lists_workers_and_takes_orders(client, db):
    beat(db, "gpu-box:4242")
    (listed,) = client.get("/api/workers").json()
    assert listed["id"] == "gpu-box:4242" and listed["alive"] and listed["gpus"] == 2
    assert listed["models"] == GPU_BOX.models and listed["hardware"]["cpus"] == 32
    drained = client.post("/api/workers/gpu-box:4242/orders", json={"what": "drain"})
    assert drained.status_code == 200 and drained.json()["draining"] is True
    assert beat(db, "gpu-box:4242").drain
    assert client.post("/api/workers/nobody:1/orders", json={"what": "stop"}).status_code == 404
    bad = client.post("/api/workers/gpu-box:4242/orders", json={"what": "explode"})
    assert bad.status_code == 422 and bad.json()["detail"][0]["field"] == "what"


def test_a_worker_converting_a_model_stays_alive_and_no_banner_says_otherwise(
    client, settings, db, monkeypatch
):
    """Converting the bundled model takes a minute on a first start: the worker keeps beating meanwhile,
    so the pages never say that no worker is running while it is busy."""
    import time

    import worker.main

    quick = settings.model_copy(update={"heartbeat_seconds": 0.1, "stale_after_seconds": 0.4})
    seen: list[bool] = []
    banners: list[bool] = []

    def slow_conversion(settings, db, *, stop):
        for _ in range(12):  # 1.2 s: three times the silence after which a worker counts as gone
            time.sleep(0.1)
            with db.session() as session:
                seen.append(workers.any_alive(session=session, stale_after=quick.stale_after_seconds))
            client.app.state.settings = quick
            banners.append('id="no-worker"' in client.get("/datasets").text)

    monkeypatch.setattr(worker.main, "prepare_pending_models", slow_conversion)
    work_once(quick, db, me="box:9", stop=threading.Event())
    assert len(seen) == 12 and all(seen) and not any(banners)
    with db.session() as session:
        assert session.get(workers.Worker, "box:9").status == "preparing"
