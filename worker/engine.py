"""The generation engine: one copy of each base model, adapters attached to it by name, answers streamed
token by token.

LoRA-family adapters (LoRA, DoRA, rsLoRA) share their base model's weights: a side-by-side request is one
batch in which every row names its adapter (PEFT's `adapter_names`, "__base__" for the plain model), so
the base answer and the tuned answers come from the same forward passes. A batch with one adapter (or
none) takes PEFT's ordinary path instead, with that adapter set active (or all disabled): faster, and safe
because only the generation thread touches the model and it runs one batch at a time.

Other PEFT methods change the model in ways that cannot be mixed in one batch; each of those adapters
gets its own copy of the base model and answers in turn.

Everything here runs on the generation thread, one request at a time (worker.gen_server queues them).
"""

from __future__ import annotations

import gc
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, cast

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from app.peft_methods import by_peft_type
from app.playground import GenerationEvent, PaneAnswer
from app.prompts import instruction_prompt
from worker.hardware import choose_dtype, shortfall
from worker.quantized import loading_arguments, weights_in_memory

log = logging.getLogger("tuneboard.generation")
BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch
# For answering, adapter weights take the base model's dtype (PEFT would otherwise keep them in fp32 beside
# a bf16 base: twice the memory, and slower mixed-dtype matmuls).
ADAPTER_LOADING: dict[str, Any] = {"is_trainable": False, "autocast_adapter_dtype": False}


class GenerationError(Exception):
    """A problem the user can act on; its text is shown as it is."""


class PromptTooLong(GenerationError):
    """A conversation (with the tokens asked for) that does not fit the model's context."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


@lru_cache(maxsize=8)
def context_tokenizer(path: str, _stamp: float) -> tuple[Any, int | None]:
    """A tokenizer for counting prompt tokens outside the generation thread, and the model's context
    length from config.json (None when it does not say). Cached per model folder and its mtime."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    context = next(
        (config[k] for k in ("max_position_embeddings", "n_positions", "max_seq_len") if k in config), None
    )
    return tokenizer, context if isinstance(context, int) and context > 0 else None


@dataclass(frozen=True)
class AdapterRef:
    name: str  # unique, e.g. "run-12" or "run-12-step-40"
    path: Path


@dataclass
class PaneRequest:
    model_key: str  # the base model's id
    model_path: Path
    adapter: AdapterRef | None
    messages: list[dict[str, Any]]
    prompt_format: str = "chat"  # chat | instruction
    system: str | None = None
    quantization: str = "none"  # a QLoRA run's adapter answers on the base loaded as it trained: 4bit | 8bit

    @property
    def base_key(self) -> str:
        """The slot of the base model this pane answers on (a quantised base is a model of its own)."""
        return self.model_key if self.quantization == "none" else f"{self.model_key} ({self.quantization})"


@dataclass
class Sampling:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    min_new_tokens: int = 0  # benchmarks force equal lengths with it


@dataclass
class PaneResult:
    text: str = ""
    tokens: int = 0
    prompt_tokens: int = 0
    finish_reason: Literal["stop", "length", "cancelled"] = "length"
    first_token_seconds: float | None = None
    seconds: float = 0.0

    def answer(self) -> PaneAnswer:
        return PaneAnswer(
            text=self.text,
            tokens=self.tokens,
            prompt_tokens=self.prompt_tokens,
            finish_reason=self.finish_reason,
            first_token_seconds=self.first_token_seconds,
            seconds=self.seconds,
        )


Emit = Callable[[GenerationEvent], None]


def param_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


@dataclass
class Slot:
    """One loaded base model copy, with the adapters attached to it."""

    key: str
    model: Any
    tokenizer: Any
    base_bytes: int
    adapters: OrderedDict[str, int] = field(default_factory=OrderedDict)  # name -> bytes, LRU order
    exclusive: str | None = None  # set when this copy carries one non-LoRA adapter

    @property
    def bytes(self) -> int:
        return self.base_bytes + sum(list(self.adapters.values()))


def prompt_ids(tokenizer, pane: PaneRequest) -> list[int]:
    """The prompt exactly as training encoded it (worker.data.encode_row), ending where the answer starts."""
    messages = list(pane.messages)
    if pane.system and pane.system.strip():
        messages = [{"role": "system", "content": pane.system}, *messages]
    return messages_prompt_ids(tokenizer, messages, pane.prompt_format)


def messages_prompt_ids(tokenizer, messages: list[dict[str, Any]], prompt_format: str) -> list[int]:
    """`prompt_ids` for a conversation that ends with the user's turn (a user turn may carry its Alpaca
    fields under "alpaca")."""
    if prompt_format == "instruction" or not tokenizer.chat_template:
        row: dict[str, Any] = {"messages": [{k: m[k] for k in ("role", "content")} for m in messages]}
        last = messages[-1] if messages else {}
        single_turn = sum(m["role"] == "user" for m in messages) == 1
        if last.get("alpaca") and single_turn:
            row["alpaca"] = last["alpaca"]
        prompt, _ = instruction_prompt(row)
        return tokenizer(prompt, add_special_tokens=True)["input_ids"]
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    text = tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class PaneStreamer(BaseStreamer):
    """Receives each step's new token for every row of the batch and emits the new text per pane."""

    def __init__(self, tokenizer, panes: list[int], eos_ids: set[int], emit: Emit, results: list[PaneResult]):
        self.tokenizer, self.panes, self.eos_ids, self.emit, self.results = (
            tokenizer,
            panes,
            eos_ids,
            emit,
            results,
        )
        self.ids: list[list[int]] = [[] for _ in panes]
        self.done = [False] * len(panes)
        self.prompt_seen = False
        self.started = time.perf_counter()

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() hands over the prompt first
            self.prompt_seen = True
            return
        now = time.perf_counter() - self.started
        for row, token in enumerate(value.reshape(-1).tolist()):
            if self.done[row]:
                continue
            result = self.results[self.panes[row]]
            if result.first_token_seconds is None:
                result.first_token_seconds = now
            if token in self.eos_ids:
                self.done[row] = True
                result.finish_reason = "stop"
                result.seconds = now  # this pane is done; the others in the batch may go on
                continue
            self.ids[row].append(token)
            result.tokens += 1
            self._flush(row)

    def _flush(self, row: int, final: bool = False) -> None:
        result = self.results[self.panes[row]]
        text = self.tokenizer.decode(self.ids[row], skip_special_tokens=True)
        if text.endswith(PARTIAL):
            if not final:  # half of a multi-byte character: wait for the rest
                return
            text = whole_characters(text)  # the answer was cut inside one: drop the half
        if text.startswith(result.text):
            delta = text[len(result.text) :]
            if delta:
                self.emit({"type": "token", "pane": self.panes[row], "text": delta})
        else:
            self.emit({"type": "replace", "pane": self.panes[row], "text": text})
        result.text = text

    def end(self) -> None:
        for row in range(len(self.panes)):
            self._flush(row, final=True)


PARTIAL = "\ufffd"  # what decoding makes of the first bytes of a character whose last bytes are missing


def whole_characters(text: str) -> str:
    """Text decoded from tokens that may end inside a multi-byte UTF-8 character (an answer cut at its
    token limit), without the replacement characters that half became."""
    return text.rstrip(PARTIAL)


class StopFlag(StoppingCriteria):
    def __init__(self, stop: threading.Event):
        self.stop = stop

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        done = torch.full(
            (input_ids.shape[0],), self.stop.is_set(), dtype=torch.bool, device=input_ids.device
        )
        return cast(torch.BoolTensor, done)


def exclusive_key(pane: PaneRequest) -> str:
    """The slot of an adapter that needs its own copy of the base model."""
    if pane.adapter is None:
        raise ValueError("only a pane with an adapter has an exclusive slot")
    return f"{pane.base_key}+{pane.adapter.name}"


def shares_base(path: Path) -> bool:
    """Whether the adapter at `path` answers in a mixed batch on a shared base model (the registry's
    `mixed_batch`, found by the peft_type its folder declares); others get a base copy of their own."""
    method = by_peft_type(adapter_type(path))
    return method is not None and method.mixed_batch


def adapter_type(path: Path) -> str:
    import json

    try:
        config = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise GenerationError(f"The adapter at {path} cannot be read ({exc}); was the run deleted?") from exc
    return str(config.get("peft_type", "")).upper()


class Engine:
    def __init__(
        self, *, device: str | None = None, dtype: torch.dtype | None = None, budget_bytes: int | None = None
    ):
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = dtype or choose_dtype("auto")
        self.budget_bytes = budget_bytes
        self.slots: OrderedDict[str, Slot] = OrderedDict()  # LRU order, oldest first

    # ---- memory ----------------------------------------------------------------------------------
    # The host's status page reads these from another thread while the generation thread changes the
    # dictionaries: each read takes a copy first (one C-level step under the GIL), then walks the copy.
    @property
    def loaded_bytes(self) -> int:
        return sum(slot.bytes for slot in list(self.slots.values()))

    def describe(self) -> dict[str, Any]:
        slots = list(self.slots.values())
        return {
            "device": self.device,
            "dtype": str(self.dtype).removeprefix("torch."),
            "budget_bytes": self.budget_bytes,
            "loaded_bytes": sum(s.bytes for s in slots),
            "models": [
                {"key": s.key, "exclusive": s.exclusive, "bytes": s.bytes, "adapters": list(s.adapters)}
                for s in slots
            ],
        }

    def _make_room(self, needed: int, keep: set[str], what: str) -> None:
        """Evict least-recently-used adapters, then whole model copies, until `needed` more bytes fit."""
        if self.budget_bytes is None:
            return
        while self.loaded_bytes + needed > self.budget_bytes:
            victim = self._evict_one(keep)
            if victim is None:
                raise GenerationError(
                    f"Not enough room to load {what}: it needs about {needed / 2**20:.0f} MiB and the "
                    f"generation memory budget is {self.budget_bytes / 2**20:.0f} MiB, with "
                    f"{self.loaded_bytes / 2**20:.0f} MiB in use by the panes of this request. Ask with "
                    "fewer panes, or raise TUNEBOARD_GENERATION_MEMORY_MB."
                )
            log.info("evicted %s to make room for %s", victim, what)

    def _evict_one(self, keep: set[str]) -> str | None:
        for slot in self.slots.values():
            for name in slot.adapters:
                if name not in keep and slot.exclusive is None:
                    del slot.adapters[name]
                    if not slot.adapters:  # the last one: back to the plain model, without the LoRA wrappers
                        slot.model = slot.model.unload()
                    else:
                        slot.model.delete_adapter(name)
                        if slot.model.active_adapter not in slot.model.peft_config:
                            slot.model.set_adapter(next(iter(slot.adapters)))
                    return name
        for key, slot in self.slots.items():
            if key not in keep and not (set(slot.adapters) & keep):
                del self.slots[key]
                gc.collect()
                if self.device == "cuda":
                    torch.cuda.empty_cache()
                return key
        return None

    def _check_free(self, needed: int, what: str) -> None:
        if problem := shortfall(needed, self.device):
            raise GenerationError(
                f"Not enough free memory to load {what}: {problem} (a training run may be using it). "
                "Try again when it ends."
            )

    # ---- loading ---------------------------------------------------------------------------------
    def _load_base(self, key: str, pane: PaneRequest, keep: set[str], emit: Emit, index: int) -> Slot:
        path = pane.model_path
        estimate = weights_in_memory(path, self.dtype, pane.quantization)
        self._make_room(estimate, keep, f"the base model {key}")
        self._check_free(estimate, f"the base model {key}")
        emit({"type": "status", "pane": index, "message": f"Loading {key}…"})
        started = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(path)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        arguments = loading_arguments(pane.quantization, self.dtype)
        if pane.quantization != "none":  # a quantised model is placed as it loads (it refuses `to`)
            arguments["device_map"] = {"": self.device}
        model = AutoModelForCausalLM.from_pretrained(path, **arguments)
        if pane.quantization == "none":
            model = model.to(self.device)  # type: ignore[arg-type]  # transformers types `to` wrongly
        model.eval()
        log.info("loaded %s in %.1f s", key, time.perf_counter() - started)
        return Slot(key=key, model=model, tokenizer=tokenizer, base_bytes=param_bytes(model))

    def shared_slot(self, pane: PaneRequest, keep: set[str], emit: Emit, index: int) -> Slot:
        slot = self.slots.get(pane.base_key)
        if slot is None:
            slot = self._load_base(pane.base_key, pane, keep, emit, index)
            self.slots[pane.base_key] = slot
        self.slots.move_to_end(pane.base_key)
        if pane.adapter is not None:
            self._attach(slot, pane.adapter, keep, emit, index)
        return slot

    def _attach(self, slot: Slot, adapter: AdapterRef, keep: set[str], emit: Emit, index: int) -> None:
        from peft import PeftModel

        if adapter.name in slot.adapters:
            slot.adapters.move_to_end(adapter.name)
            return
        size = sum(p.stat().st_size for p in adapter.path.glob("adapter_model.*"))
        self._make_room(size, keep, f"the adapter {adapter.name}")
        emit({"type": "status", "pane": index, "message": f"Attaching {adapter.name}…"})
        before = param_bytes(slot.model)
        if isinstance(slot.model, PeftModel):
            slot.model.load_adapter(str(adapter.path), adapter_name=adapter.name, **ADAPTER_LOADING)
        else:
            slot.model = PeftModel.from_pretrained(
                slot.model, str(adapter.path), adapter_name=adapter.name, **ADAPTER_LOADING
            )
        slot.model.eval()
        slot.adapters[adapter.name] = param_bytes(slot.model) - before

    def exclusive_slot(self, pane: PaneRequest, keep: set[str], emit: Emit, index: int) -> Slot:
        from peft import PeftModel

        assert pane.adapter is not None
        key = exclusive_key(pane)
        slot = self.slots.get(key)
        if slot is None:
            slot = self._load_base(key, pane, keep, emit, index)
            emit({"type": "status", "pane": index, "message": f"Attaching {pane.adapter.name}…"})
            slot.model = PeftModel.from_pretrained(
                slot.model, str(pane.adapter.path), **ADAPTER_LOADING
            ).eval()
            slot.base_bytes = param_bytes(slot.model)
            slot.exclusive = pane.adapter.name
            self.slots[key] = slot
        self.slots.move_to_end(key)
        return slot

    # ---- generation ------------------------------------------------------------------------------
    def check_prompts(self, panes: list[PaneRequest], max_new_tokens: int) -> None:
        """Refuse, before anything streams, a conversation longer than its model's context, or one that
        leaves less room than `max_new_tokens`. Safe to call from any thread (own tokenizer copies)."""
        for index, pane in enumerate(panes):
            tokenizer, context = context_tokenizer(str(pane.model_path), pane.model_path.stat().st_mtime)
            if context is None:
                continue
            length = len(prompt_ids(tokenizer, pane))
            where = f"pane {index + 1} ({pane.adapter.name if pane.adapter else pane.model_key})"
            if length >= context:
                raise PromptTooLong(
                    f"The conversation in {where} is {length:,} tokens long; the model reads at most "
                    f"{context:,}. Shorten it or start a new conversation.",
                    field=f"panes.{index}.messages",
                )
            if length + max_new_tokens > context:
                raise PromptTooLong(
                    f"The conversation in {where} is {length:,} tokens long, which leaves room for "
                    f"{context - length:,} new tokens in the model's context of {context:,}; "
                    f"{max_new_tokens:,} were asked for. Ask for at most {context - length:,}.",
                    field="sampling.max_new_tokens",
                )

    def generate(
        self, panes: list[PaneRequest], sampling: Sampling, emit: Emit, stop: threading.Event
    ) -> list[PaneResult]:
        """Answer every pane, streaming through `emit`; panes on the same base model and LoRA-family
        adapters form one batch."""
        results = [PaneResult() for _ in panes]
        keep = {p.base_key for p in panes} | {p.adapter.name for p in panes if p.adapter}
        keep |= {exclusive_key(p) for p in panes if p.adapter}
        groups: dict[str, tuple[bool, list[int]]] = {}  # slot key -> (own base copy?, pane indexes)
        for index, pane in enumerate(panes):
            exclusive = pane.adapter is not None and not shares_base(pane.adapter.path)
            key = exclusive_key(pane) if exclusive else pane.base_key
            groups.setdefault(key, (exclusive, []))[1].append(index)
        for exclusive, members in groups.values():
            if stop.is_set():
                break
            for index in members:  # load everything this group needs before it starts
                slot = (self.exclusive_slot if exclusive else self.shared_slot)(
                    panes[index], keep, emit, index
                )
            self._run_batch(slot, [panes[i] for i in members], members, sampling, emit, stop, results)
        for result in results:
            if stop.is_set() and result.finish_reason == "length" and result.tokens < sampling.max_new_tokens:
                result.finish_reason = "cancelled"
        return results

    def _run_batch(self, slot, panes, indexes, sampling, emit, stop, results) -> None:
        from peft import PeftModel

        tokenizer = slot.tokenizer
        prompts = [prompt_ids(tokenizer, pane) for pane in panes]
        for index, ids in zip(indexes, prompts, strict=True):
            results[index].prompt_tokens = len(ids)
            emit({"type": "start", "pane": index, "prompt_tokens": len(ids)})
        batch = tokenizer.pad({"input_ids": prompts}, return_tensors="pt").to(self.device)
        eos = slot.model.generation_config.eos_token_id
        eos_ids = {eos} if isinstance(eos, int) else set(eos or [])
        eos_ids |= {tokenizer.eos_token_id} - {None}
        kwargs: dict[str, Any] = {
            "max_new_tokens": sampling.max_new_tokens,
            "do_sample": sampling.temperature > 0,
            "repetition_penalty": sampling.repetition_penalty,
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": sorted(eos_ids),
        }
        if sampling.min_new_tokens:
            kwargs["min_new_tokens"] = sampling.min_new_tokens
        if sampling.temperature > 0:
            kwargs |= {"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0}
        else:  # greedy: clear the model's own sampling defaults so they do not warn or apply
            kwargs |= {"temperature": None, "top_p": None, "top_k": None}
        adapters: AbstractContextManager[object] = nullcontext()
        if isinstance(slot.model, PeftModel) and slot.exclusive is None:
            names = [pane.adapter.name if pane.adapter else BASE for pane in panes]
            if len(set(names)) > 1:  # a mixed batch: each row names its adapter
                kwargs["adapter_names"] = names
            elif names[0] == BASE:  # the plain model's own forward, without the LoRA layers' work
                adapters = slot.model.disable_adapter()
            else:  # one adapter for every row: PEFT's ordinary (faster) path. Safe: one batch at a time.
                slot.model.set_adapter(names[0])
        seed = sampling.seed if sampling.seed is not None else int(time.time_ns() % 2**31)
        torch.manual_seed(seed)
        streamer = PaneStreamer(tokenizer, indexes, eos_ids, emit, results)
        started = time.perf_counter()
        with torch.inference_mode(), adapters:
            slot.model.generate(
                **batch,
                streamer=streamer,
                stopping_criteria=StoppingCriteriaList([StopFlag(stop)]),
                **kwargs,
            )
        elapsed = time.perf_counter() - started
        for index in indexes:
            results[index].seconds = results[index].seconds or elapsed
