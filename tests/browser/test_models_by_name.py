"""A real model's path, in the browser, against a stand-in for the Hugging Face Hub (tests/hub_standin.py,
reached through HF_ENDPOINT as a mirror would be): look a model up by name on the Models page, download it
with its progress bar, launch a QLoRA (4-bit) run of it from New run, chat with it beside its base model,
and publish its adapter to a private repository with a model card; then fetch another from the stand-in's
ModelScope origin (MODELSCOPE_ENDPOINT) into ModelScope's cache. Screenshots of each page at 1280 and 390 px
go to the test's folder."""

from __future__ import annotations

import re

import httpx
import pytest

from app.processes import free_port
from tests.browser.conftest import WORKER, shoot
from tests.conftest import DEMO_DATASET
from tests.hub_standin import Repo, running_hub
from tests.servers import running

pytestmark = pytest.mark.browser

SHA = "b" * 40
WRITE = "hf_browserwrite0123456789"


@pytest.fixture(scope="module")
def hub_and_server(tmp_path_factory, tiny_model_dir):
    """The stand-in serving the tiny model as tiny/llama, slowly enough (60 kB/s) to watch its bar, and a
    server whose hub it is."""
    folder = tmp_path_factory.mktemp("models-by-name")
    repos = {
        "tiny/llama": Repo(folder=tiny_model_dir, sha=SHA, bytes_per_second=60_000),
        "tiny/fast": Repo(folder=tiny_model_dir, sha=SHA),
    }
    with running_hub(repos, write_tokens={WRITE}) as standin:
        generation = f"http://127.0.0.1:{free_port()}"
        env = WORKER | {
            "TUNEBOARD_GENERATION_URL": generation,
            "HF_ENDPOINT": standin.url,
            "HF_HUB_CACHE": str(folder / "hf-cache"),
            "MODELSCOPE_ENDPOINT": standin.modelscope_url,
            "MODELSCOPE_CACHE": str(folder / "modelscope"),
        }
        with running("serve", folder / "data", log=folder / "serve.log", env_extra=env) as (base, _):
            files = {"file": ("demo_alpaca.json", DEMO_DATASET.read_bytes())}
            httpx.post(f"{base}/api/datasets", files=files).raise_for_status()
            yield {"base": base, "folder": folder, "hub": standin, "generation": generation}


def test_fetch_a_model_by_name_train_it_4bit_chat_and_publish(hub_and_server, browser):
    base, folder, standin = hub_and_server["base"], hub_and_server["folder"], hub_and_server["hub"]
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))

    # Models: look it up, then download it; the bar moves and says what is left
    page.goto(f"{base}/models")
    page.fill("#repo_id", "tiny/llama")
    page.click("#lookup-button")
    page.wait_for_selector("#download-button")
    assert "LlamaForCausalLM" in page.inner_text("#lookup-result") and "apache-2.0" in page.inner_text(
        "#lookup-result"
    )
    page.click("#download-button")
    page.wait_for_function(
        "(() => { const bar = document.querySelector('#hub-downloads progress');"
        " return bar && Number(bar.value) > 0 && Number(bar.value) < Number(bar.max); })()",
        timeout=30_000,
    )
    assert " of " in page.inner_text("#hub-downloads .download")
    shoot(page, folder, "download")
    page.wait_for_selector(".download[data-status='succeeded']", timeout=60_000)
    assert "ready to train" in page.inner_text(".download[data-status='succeeded']")

    # New run: the fetched model, its base loaded 4-bit; the estimate says so
    page.goto(f"{base}/runs/new")
    page.select_option("#base_model", "tiny/llama")
    page.fill("[name='training.num_train_epochs']", "3")
    scored = page.locator("[name='evaluation.scored_train_rows']")  # no answers scored: a short test
    page.locator("details", has=scored).last.evaluate("d => d.open = true")
    page.fill("[name='evaluation.scored_train_rows']", "0")
    field = page.locator("[name='training.quantization']")
    page.locator("details", has=field).last.evaluate("d => d.open = true")
    field.select_option("4bit")
    page.wait_for_function(
        "(document.getElementById('est-memory') || {}).textContent?.includes('base model 4bit')"
    )
    shoot(page, folder, "new-qlora-run")
    page.click("#launch")
    page.wait_for_url(re.compile(r"/runs/\d+$"))
    run_id = int(page.url.rsplit("/", 1)[1])
    page.wait_for_function(
        "document.getElementById('run-summary').dataset.status === 'succeeded'", timeout=180_000
    )
    run = httpx.get(f"{base}/api/runs/{run_id}").json()
    assert run["base_model"] == "tiny/llama" and run["config"]["training"]["quantization"] == "4bit"

    # Chat: the tuned pane answers on the 4-bit base, beside the base model
    page.reload()
    page.click("#chat-with-run")
    page.wait_for_url(re.compile(r"/playground\?run=\d+$"))
    page.fill("#prompt", "What is the capital of Quillmere?")
    page.press("#prompt", "Enter")
    page.wait_for_function(
        "document.querySelectorAll('.answer-stats').length === 2 && "
        "[...document.querySelectorAll('.answer-stats')].every(s => s.textContent.includes('tokens'))",
        timeout=90_000,
    )
    assert page.locator(".answer .answer-text").count() == 2
    # the generation host holds the base model twice: as it is, and loaded 4-bit with the run's adapter
    loaded = httpx.get(f"{hub_and_server['generation']}/healthz").json()["models"]
    assert {m["key"]: m["adapters"] for m in loaded} == {
        "tiny/llama": [],
        "tiny/llama (4bit)": [f"run-{run_id}"],
    }
    shoot(page, folder, "chat-qlora")

    # Publish: a write token saved on the Models page, then the run page's card
    page.goto(f"{base}/models")
    page.fill("#token", WRITE)
    page.click("#hub-token button[type='submit']")
    page.wait_for_selector("#hub-token [role='status']")
    page.goto(f"{base}/runs/{run_id}#run-publish")
    page.fill("#publish-repo", "standin-user/tiny-qlora")
    assert page.is_checked("#publish-private")
    page.click("#publish-button")
    page.wait_for_selector(".publication[data-status='succeeded']", timeout=60_000)
    assert "the commit on" in page.inner_text(".publication")
    shoot(page, folder, "published")
    for width in (1280, 390):  # the card alone: the run page is long
        page.set_viewport_size({"width": width, "height": 900})
        page.locator("#run-publish").screenshot(path=str(folder / f"publish-card-{width}.png"))
    pushed = standin.pushed["standin-user/tiny-qlora"]
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(pushed)
    card = pushed["README.md"].decode()
    assert (
        "base_model: tiny/llama" in card
        and "QLoRA" in card
        and "BitsAndBytesConfig(load_in_4bit=True" in card
    )
    html = page.content() + httpx.get(f"{base}/api/runs/{run_id}/publications").text
    assert WRITE not in html and WRITE not in (folder / "serve.log").read_text(errors="replace")

    # ModelScope: the same card, the other source; the model goes to ModelScope's cache and is listed
    page.goto(f"{base}/models")
    page.select_option("#source", "modelscope")
    page.fill("#repo_id", "tiny/fast")
    page.click("#lookup-button")
    page.wait_for_selector("#download-button")
    assert "on the ModelScope site at" in page.inner_text("#lookup-result")
    page.click("#download-button")
    page.wait_for_selector(".download[data-status='succeeded']:has-text('from ModelScope')", timeout=60_000)
    page.wait_for_selector("#models-table :text('tiny/fast (ModelScope)')", timeout=30_000)
    assert "ModelScope cache" in page.inner_text("#models-table")
    shoot(page, folder, "modelscope")
    assert errors == []
