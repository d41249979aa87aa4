"""A trained run in the browser: chat with it beside its base model, export it, and blind votes that
become a preference dataset, a leaderboard and a DPO run."""

from __future__ import annotations

import re

import httpx
import pytest

from tests.browser.conftest import api_run, finished_runs, launch

pytestmark = pytest.mark.browser


def test_chat_with_a_trained_run_side_by_side(app, context):
    """Train on the demo data, press "Chat with this run", ask one question: both panes fill, differently."""
    run_id = launch(app, epochs=12)
    page = context.new_page()
    page.goto(f"{app['base']}/runs/{run_id}")
    page.wait_for_function(
        "document.getElementById('run-summary').dataset.status === 'succeeded'", timeout=120_000
    )
    page.reload()
    page.click("#chat-with-run")
    page.wait_for_url(re.compile(r"/playground\?run=\d+$"))
    assert page.eval_on_selector_all("select.pane-target", "s => s.map(x => x.value)") == [
        app["model"],
        f"run-{run_id}",
    ]

    question = "What is the capital of Quillmere? <b>not bold</b>"
    page.fill("#prompt", question)
    page.press("#prompt", "Enter")
    page.wait_for_function(
        "document.querySelectorAll('.answer-stats').length === 2 && "
        "[...document.querySelectorAll('.answer-stats')].every(s => s.textContent.includes('tokens'))",
        timeout=60_000,
    )
    base, tuned = page.eval_on_selector_all(".answer .answer-text", "els => els.map(e => e.textContent)")
    assert base.strip() and tuned.strip() and base != tuned
    chunks = page.eval_on_selector_all(".answer", "els => els.map(e => Number(e.dataset.chunks))")
    tokens = page.eval_on_selector_all(".answer-stats", "els => els.map(e => parseInt(e.textContent))")
    # Each pane arrives in pieces as it is generated (a one-token answer can only arrive whole).
    assert all(n > 1 or t <= 1 for n, t in zip(chunks, tokens, strict=True)) and max(chunks) > 1, (
        chunks,
        tokens,
    )
    # The question is shown as text, never as markup.
    assert page.inner_text(".turn-question .turn-text") == question
    assert page.locator(".turn-question b").count() == 0

    # A second turn continues the conversation, and Stop ends a long answer in every pane.
    page.click("#settings summary")
    page.fill("#max-new-tokens", "250")  # the tiny model reads 512 tokens; the host refuses more
    page.fill("#prompt", "Tell me more.")
    page.press("#prompt", "Enter")
    page.wait_for_function("document.querySelectorAll('.turn').length === 2")
    page.wait_for_function(
        "[...document.querySelectorAll('.turn')][1].querySelector('.answer-text').textContent"
    )
    page.click("#stop")
    page.wait_for_function("!document.getElementById('send').disabled")
    states = page.eval_on_selector_all(
        ".turn:nth-child(2) .answer-state", "els => els.map(e => e.textContent)"
    )
    assert states == ["Stopped.", "Stopped."], states

    # The validation set: asking a held-out row shows the dataset's reference answer beside the panes.
    page.click(".ask-row >> nth=0")
    page.wait_for_selector(".answer.reference")
    page.wait_for_function("!document.getElementById('send').disabled", timeout=60_000)
    assert page.locator(".turn").count() == 1
    assert context.errors == []


def test_export_a_run_as_merged_safetensors_and_gguf_and_load_both(app, context, tmp_path):
    """From a finished run's page: see each format's size, export the merged model and an F16 GGUF, follow
    them, download both; the files load and answer as the run does (transformers, its GGUF loader and
    llama.cpp); then the GGUF becomes a base model."""
    import zipfile

    import torch
    from llama_cpp import Llama
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    (run_id,) = finished_runs(app, 1)
    page = context.new_page()
    page.goto(f"{app['base']}/runs/{run_id}")
    assert "About" in page.inner_text("#export-size")  # the first format's size, before anything starts
    files = {}
    for format in ("gguf-f16", "merged"):  # merged is the first choice: choosing F16 first changes both
        before = page.inner_text("#export-estimate")
        page.select_option("#export-format", format)
        page.wait_for_function("t => document.getElementById('export-estimate').innerText !== t", arg=before)
        assert re.search(r"About \d[\d.,]* (kB|MB)", page.inner_text("#export-size"))
        page.click("#export-button")
        row = f".export-row[data-format='{format}']"
        page.wait_for_selector(row)
        page.wait_for_selector(f"{row}[data-status='succeeded']", timeout=120_000)
        with page.expect_download() as download:
            page.click(f"{row} .export-download")
        files[format] = tmp_path / download.value.suggested_filename
        download.value.save_as(files[format])
    page.locator("#run-exports").screenshot(path=str(tmp_path / "exports-1280.png"))
    page.set_viewport_size({"width": 390, "height": 800})
    # the charts follow the new width once their resize handler has run: then nothing sticks out
    page.wait_for_function("document.documentElement.scrollWidth <= window.innerWidth", timeout=5_000)
    page.locator("#run-exports").screenshot(path=str(tmp_path / "exports-390.png"))
    assert files["merged"].name == f"run-{run_id}-merged.zip"
    # deleting an export removes it from the list (and its files)
    page.on("dialog", lambda dialog: dialog.accept())
    page.click(".export-row[data-format='merged'] .export-delete")
    page.wait_for_selector(".export-row[data-format='merged']", state="detached")
    assert page.locator(".export-row").count() == 1
    assert files["gguf-f16"].name == f"run-{run_id}-f16.gguf"

    torch.set_num_threads(1)
    model_dir = httpx.get(f"{app['base']}/api/models").json()
    model_dir = next(m["path"] for m in model_dir if m["id"] == app["model"])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of Quillmere?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    run = PeftModel.from_pretrained(base, app["folder"] / "data" / "runs" / str(run_id) / "adapter").eval()
    with zipfile.ZipFile(files["merged"]) as archive:
        archive.extractall(tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged" / f"run-{run_id}-merged").eval()
    from_gguf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=files["gguf-f16"].name).eval()
    with torch.no_grad():
        expected = run.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1] :].tolist()
        assert merged.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1] :].tolist() == expected
        assert (from_gguf(ids).logits - run(ids).logits).abs().max().item() < 0.01
    llm = Llama(model_path=str(files["gguf-f16"]), n_ctx=256, n_threads=1, verbose=True)
    try:
        answer = []
        for token in llm.generate(ids[0].tolist(), temp=0.0, top_k=1):
            answer.append(token)
            if len(answer) == 8:
                break
    finally:
        llm.close()
    assert answer == expected

    page.click(".export-row[data-format='gguf-f16'] .export-register")
    page.wait_for_url(re.compile(r"/models$"))
    assert f"#{run_id}" in page.inner_text("main") and "(F16)" in page.inner_text("main")
    assert context.errors == []


def test_blind_votes_become_a_preference_dataset_a_leaderboard_and_a_dpo_run(app, context):
    """Two panes, blind: the answers are shown as A and B, the voter picks and edits the better one, and
    only then sees which pane wrote which; the votes make a preference dataset and rank the targets, and
    the New run page trains DPO on them from the SFT run's adapter, charted and then offered to chat."""
    (run_id,) = finished_runs(app, 1)
    page = context.new_page()
    page.goto(f"{app['base']}/playground?run={run_id}")
    page.check("#blind-mode")
    # short answers keep three turns within the tiny model's 512 positions
    page.locator("#max-new-tokens").evaluate("e => e.value = '40'")
    for question, verdict in (
        ("What is the capital of Quillmere?", "A is better"),
        ("Tell me more.", "Tie"),
        ("Who founded it?", "B is better"),
    ):
        page.fill("#prompt", question)
        page.press("#prompt", "Enter")
        turn = page.locator(".turn").last
        turn.locator(".vote").wait_for(timeout=60_000)
        assert sorted(turn.locator(".answer-label").all_inner_texts()) == ["Answer A", "Answer B"]
        if verdict == "Tie":
            page.screenshot(path=str(app["folder"] / "blind-before-vote.png"), full_page=True)
        turn.locator(".vote-verdict", has_text=verdict).click()
        if verdict != "Tie":
            edited = turn.locator(".vote-chosen").input_value() + " — the Quillmere office"
            turn.locator(".vote-chosen").fill(edited)
            turn.locator(".vote-save").click()
        page.wait_for_function(
            "t => t.querySelector('.vote-result').textContent.startsWith('Vote saved')",
            arg=turn.element_handle(),
        )
        revealed = turn.locator(".answer-label").all_inner_texts()
        assert any(label.startswith(f"#{run_id} ") for label in revealed), revealed  # the panes, named
        assert turn.locator(".voted-best").count() == (1 if verdict != "Tie" else 0)
    page.screenshot(path=str(app["folder"] / "blind-vote.png"), full_page=True)

    votes = httpx.get(f"{app['base']}/api/votes").json()[-3:]
    assert [v["verdict"] for v in votes] == ["better", "tie", "better"]
    assert votes[0]["chosen"].endswith(" — the Quillmere office")
    assert {a["target"] for a in votes[0]["answers"]} == {app["model"], f"run-{run_id}"}
    assert votes[0]["messages"][-1] == {"role": "user", "content": "What is the capital of Quillmere?"}
    made = httpx.post(
        f"{app['base']}/api/votes/dataset", json={"conversation_id": votes[0]["conversation_id"]}
    )
    assert made.status_code == 201, made.text
    dataset = made.json()
    # each "better" vote gives its chosen answer against the other, unless that answer came out blank
    expected = sum(
        1 for v in votes if v["verdict"] == "better" and all(a["text"].strip() for a in v["answers"])
    )
    assert dataset["format"] == "preference" and dataset["rows"] == expected >= 1
    page.goto(f"{app['base']}/leaderboard")
    assert page.locator(f".standing[data-target='run-{run_id}']").count() == 1

    # The New run page sees pairs of answers and offers DPO, from a new adapter or the SFT run's.
    page.goto(f"{app['base']}/runs/new")
    page.select_option("#dataset_id", str(dataset["id"]))
    page.wait_for_selector("#objective-fields[data-objective='dpo']")
    assert "holds pairs of answers" in page.inner_text("#objective-help")
    # the swapped-in fields answer a change only once htmx has processed them (under load that can lag)
    page.wait_for_function("!!(document.getElementById('start_from_run') || {})['htmx-internal-data']")
    page.select_option("#start_from_run", str(run_id))
    # the fields come back from the server with the starting run's note: only then is the form whole
    page.wait_for_selector(f"#start-note:has-text('run #{run_id}')", timeout=60_000)
    page.wait_for_function("(document.getElementById('est-steps') || {}).textContent?.startsWith('10 ')")
    page.screenshot(path=str(app["folder"] / "new-dpo-run.png"), full_page=True)
    page.click("#launch")
    page.wait_for_url(re.compile(r"/runs/\d+$"))
    dpo = int(page.url.rsplit("/", 1)[1])
    assert f"from run #{run_id}'s adapter" in page.inner_text("#run-objective")
    page.wait_for_selector("#run-summary[data-status='succeeded']", timeout=180_000)
    page.wait_for_function("Number(document.getElementById('chart-rewards').dataset.points) == 10")
    assert int(page.get_attribute("#chart-accuracy", "data-points") or 0) == 10
    page.screenshot(path=str(app["folder"] / "dpo-run.png"), full_page=True)
    config = api_run(app, dpo)["config"]
    assert (config["objective"], config["start_run_id"], config["dataset_id"]) == (
        "dpo",
        run_id,
        dataset["id"],
    )

    # Chat-able like any run: the run page's button opens the playground on it.
    page.click("#chat-with-run")
    page.wait_for_url(re.compile(r"/playground\?run=\d+$"))
    assert page.locator(f"option[value='run-{dpo}']").count() >= 1
    assert context.errors == []
