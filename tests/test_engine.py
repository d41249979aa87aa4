"""The generation engine against plain transformers/PEFT generation on the tiny model (greedy, fp32)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from worker.engine import (
    AdapterRef,
    Engine,
    GenerationError,
    PaneRequest,
    Sampling,
    prompt_ids,
    whole_characters,
)
from worker.quantized import loading_arguments

QUESTION = [{"role": "user", "content": "What is the capital of Quillmere?"}]


def make_adapter(model_dir: Path, folder: Path, seed: int, kind: str = "lora") -> Path:
    """A random, non-zero adapter: it changes the answers without any training."""
    from peft import IA3Config, LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if kind == "lora":
        config = LoraConfig(r=8, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
    else:
        config = IA3Config(
            target_modules=["q_proj", "v_proj", "down_proj"],
            feedforward_modules=["down_proj"],
            init_ia3_weights=False,
        )
    model = get_peft_model(base, config)
    if kind != "lora":
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "ia3_l" in name:
                    param.mul_(3.0)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "run-1": make_adapter(tiny_model_dir, root / "a1", 1),
        "run-2": make_adapter(tiny_model_dir, root / "a2", 2),
        "run-3": make_adapter(tiny_model_dir, root / "a3", 3),
        "run-ia3": make_adapter(tiny_model_dir, root / "ia3", 4, kind="ia3"),
    }


def pane(model_dir: Path, adapter: str | None = None, adapters=None, **extra) -> PaneRequest:
    ref = AdapterRef(adapter, adapters[adapter]) if adapter else None
    return PaneRequest(model_key="tiny", model_path=model_dir, adapter=ref, messages=QUESTION, **extra)


def reference(model_dir: Path, adapter_dir: Path | None, request: PaneRequest, max_new_tokens: int) -> str:
    """What plain transformers (and PEFT's own loader) answer, one prompt at a time, less the half of a
    character an answer cut at its token limit ends in (the engine drops it; the random-weight model often
    ends inside one)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, **loading_arguments(request.quantization, torch.float32)
    )
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    ids = torch.tensor([prompt_ids(tokenizer, request)])
    with torch.inference_mode():
        out = model.eval().generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            temperature=None,
            top_p=None,
            top_k=None,
        )
    return whole_characters(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))


def collect(engine: Engine, panes: list[PaneRequest], sampling: Sampling, stop=None):
    events: list[dict] = []
    results = engine.generate(panes, sampling, events.append, stop or threading.Event())
    return results, events


GREEDY = Sampling(max_new_tokens=24, temperature=0.0)


def test_each_pane_equals_plain_generation_and_the_stream_equals_the_answer(tiny_model_dir, adapters):
    engine = Engine(device="cpu", dtype=torch.float32)
    panes = [
        pane(tiny_model_dir),
        pane(tiny_model_dir, "run-1", adapters),
        pane(tiny_model_dir, "run-ia3", adapters),
    ]
    results, events = collect(engine, panes, GREEDY)

    assert results[0].text == reference(tiny_model_dir, None, panes[0], 24)
    assert results[1].text == reference(tiny_model_dir, adapters["run-1"], panes[1], 24)
    assert results[2].text == reference(tiny_model_dir, adapters["run-ia3"], panes[2], 24)
    assert len({r.text for r in results}) == 3, "the adapters should change the answer"
    for index, result in enumerate(results):
        streamed = "".join(e["text"] for e in events if e["type"] == "token" and e["pane"] == index)
        assert streamed == result.text
        assert result.tokens > 0 and result.first_token_seconds is not None
    # The LoRA adapter shares the base copy; the IA3 one has its own.
    assert [s["key"] for s in engine.describe()["models"]] == ["tiny", "tiny+run-ia3"]
    assert engine.describe()["models"][0]["adapters"] == ["run-1"]


def test_side_by_side_batch_equals_each_pane_alone(tiny_model_dir, adapters):
    engine = Engine(device="cpu", dtype=torch.float32)
    together, _ = collect(
        engine,
        [pane(tiny_model_dir)] + [pane(tiny_model_dir, f"run-{i}", adapters) for i in (1, 2, 3)],
        GREEDY,
    )
    alone = [
        collect(engine, [pane(tiny_model_dir, name, adapters)], GREEDY)[0][0].text
        for name in (None, "run-1", "run-2", "run-3")
    ]
    assert [r.text for r in together] == alone


def test_the_instruction_layout_is_the_one_training_used(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    request = PaneRequest(
        model_key="tiny",
        model_path=tiny_model_dir,
        adapter=None,
        prompt_format="instruction",
        messages=[
            {
                "role": "user",
                "content": "Name it\n\nQuillmere",
                "alpaca": {"instruction": "Name it", "input": "Quillmere"},
            }
        ],
    )
    text = tokenizer.decode(prompt_ids(tokenizer, request))
    assert text.endswith("Instruction: Name it\nInput: Quillmere\nAnswer: ")
    chat = pane(tiny_model_dir, system="Be brief.")
    assert tokenizer.decode(prompt_ids(tokenizer, chat)).startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_least_recently_used_adapters_are_evicted_within_the_budget(tiny_model_dir, adapters):
    engine = Engine(device="cpu", dtype=torch.float32)
    collect(engine, [pane(tiny_model_dir, "run-1", adapters)], GREEDY)
    one_adapter = engine.loaded_bytes
    engine.budget_bytes = one_adapter + engine.slots["tiny"].adapters["run-1"] // 2  # room for one adapter
    collect(engine, [pane(tiny_model_dir, "run-2", adapters)], GREEDY)
    assert engine.describe()["models"][0]["adapters"] == ["run-2"]
    # An evicted adapter comes back on demand with the same answer.
    again, _ = collect(engine, [pane(tiny_model_dir, "run-1", adapters)], GREEDY)
    assert again[0].text == reference(tiny_model_dir, adapters["run-1"], pane(tiny_model_dir), 24)

    engine.budget_bytes = one_adapter
    with pytest.raises(GenerationError, match="Not enough room"):
        collect(engine, [pane(tiny_model_dir, n, adapters) for n in ("run-1", "run-2")], GREEDY)


def test_a_stop_ends_every_pane_early(tiny_model_dir, adapters):
    engine = Engine(device="cpu", dtype=torch.float32)
    stop = threading.Event()
    seen: list[dict] = []

    def emit(event):
        seen.append(event)
        if event["type"] == "token":
            stop.set()

    results = engine.generate(
        [pane(tiny_model_dir), pane(tiny_model_dir, "run-1", adapters)],
        Sampling(max_new_tokens=200),
        emit,
        stop,
    )
    assert all(r.finish_reason == "cancelled" and r.tokens < 5 for r in results)


def test_a_fixed_seed_makes_sampling_reproducible(tiny_model_dir, adapters):
    engine = Engine(device="cpu", dtype=torch.float32)
    sampling = Sampling(max_new_tokens=16, temperature=1.5, top_p=0.95, seed=7)
    panes = [pane(tiny_model_dir), pane(tiny_model_dir, "run-1", adapters)]
    first, _ = collect(engine, panes, sampling)
    second, _ = collect(engine, panes, sampling)
    assert [r.text for r in first] == [r.text for r in second]
    other, _ = collect(engine, panes, Sampling(max_new_tokens=16, temperature=1.5, top_p=0.95, seed=8))
    assert [r.text for r in other] != [r.text for r in first]


@pytest.mark.parametrize("prompt_format", ["chat", "instruction"])
@pytest.mark.parametrize("with_input", [False, True])
def test_the_generation_prompt_is_trainings_prompt_prefix(tiny_model_dir, prompt_format, with_input):
    """What the playground sends the model is exactly what training put before the answer."""
    from transformers import AutoTokenizer

    from app.datasets.formats import parse_dataset
    from worker.data import IGNORE_INDEX, encode_row

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    record = {"instruction": "What is the capital of Quillmere?", "output": "Tessary, a harbour town."}
    if with_input:
        record["input"] = "Answer in one sentence."
    row = parse_dataset(json.dumps([record]).encode()).rows[0]
    encoded = encode_row(row, tokenizer, prompt_format, max_length=512)
    answer_starts = next(i for i, label in enumerate(encoded["labels"]) if label != IGNORE_INDEX)
    user = next(m for m in row["messages"] if m["role"] == "user")
    pane = PaneRequest(
        model_key="tiny",
        model_path=tiny_model_dir,
        adapter=None,
        messages=[{**user, "alpaca": row.get("alpaca")}],
        prompt_format=prompt_format,
    )
    assert prompt_ids(tokenizer, pane) == encoded["input_ids"][:answer_starts]


class FixedAnswer(torch.nn.Module):
    """A stand-in model whose greedy answer is always the same token ids (to cut one inside a character)."""

    def __init__(self, answer_ids: list[int]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.answer_ids = answer_ids

    def generate(self, input_ids, **_):
        answer = torch.tensor([self.answer_ids] * input_ids.shape[0])
        return torch.cat([input_ids, answer], dim=1)


def test_answers_cut_inside_a_character_carry_no_replacement_character(tiny_model_dir):
    """Every output path (the stream, the final answer the playground and /v1 send, scored answers and
    the references they are scored against) drops the half of a multi-byte character an answer was cut in."""
    from transformers import AutoTokenizer

    from worker.engine import PaneResult, PaneStreamer
    from worker.evaluate import answer, scored_reference

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tokenizer("Hi 漢字", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids[:-1]).endswith("\ufffd")  # the cut falls inside 字

    events, results = [], [PaneResult()]
    streamer = PaneStreamer(tokenizer, [0], set(), events.append, results)
    streamer.put(torch.tensor([[1, 2, 3]]))  # the prompt
    for token in ids[:-1]:
        streamer.put(torch.tensor([token]))
    streamer.end()
    streamed = "".join(e["text"] for e in events if e["type"] == "token")
    assert streamed == results[0].text == "Hi 漢" and not any("\ufffd" in e["text"] for e in events)

    scored = answer(FixedAnswer(ids[:-1]), tokenizer, [[1, 2, 3]], [len(ids) - 1])
    assert scored == ["Hi 漢"]
    cut_reference = scored_reference(tokenizer, "Hi 漢字 and more", len(ids) - 1)
    assert cut_reference == "Hi 漢"
