"""GGUF files for llama.cpp, Ollama and LM Studio: a whole (merged) model, or a LoRA adapter alone.

Written with the maintained `gguf` library: its writer, its tensor-name maps and its quantisers (F16, BF16,
Q8_0); the tokenizer and chat template go into the metadata through its `SpecialVocab`. Tensors are
streamed: their table is written first, then each tensor is converted and written on its own, so a model
never needs a second copy in memory. Llama and Qwen2, the architectures of the bundled and the common
small models, are supported; others get a sentence saying so.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from math import prod, sqrt
from pathlib import Path
from typing import Any

import numpy as np

from app import exports
from app.exports import DORA_REFUSED
from app.peft_methods import by_peft_type

Progress = Callable[[float], None]


class ExportError(Exception):
    """An export that cannot be made; the text says why, for the user."""


# Llama's rotary embedding pairs a head's neighbouring dimensions in llama.cpp and its halves in
# transformers, so the query and key projections' rows are reordered on the way (llama.cpp's converter
# does the same); Qwen2 uses the halves layout in both.
ARCHITECTURES = {"llama": ("LLAMA", True), "qwen2": ("QWEN2", False)}  # app.exports.GGUF_ARCHITECTURES
FORMATS = tuple(f.gguf_type for f in exports.FORMATS.values() if f.gguf_type)


def _quant(kind: str):
    import gguf

    return {
        "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
        "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
        "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
        "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    }[kind]


@dataclass(frozen=True)
class Shape:
    """The hyperparameters a GGUF file states, read from a transformers config.json."""

    arch: str  # llama | qwen2
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ff: int
    context: int
    vocab: int
    rms_eps: float
    rope_theta: float
    tied: bool
    permute_qk: bool

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Shape:
        model_type = config.get("model_type", "?")
        if model_type not in ARCHITECTURES:
            raise ExportError(f"GGUF export supports Llama and Qwen2 models, not {model_type!r}.")
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        return cls(
            arch=model_type,
            layers=int(config["num_hidden_layers"]),
            hidden=hidden,
            heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            ff=int(config["intermediate_size"]),
            context=int(config.get("max_position_embeddings") or 2048),
            vocab=int(config["vocab_size"]),
            rms_eps=float(config.get("rms_norm_eps") or 1e-6),
            rope_theta=float(rope.get("rope_theta") or config.get("rope_theta") or 10000.0),
            tied=bool(config.get("tie_word_embeddings", False)),
            permute_qk=ARCHITECTURES[model_type][1],
        )

    def reorder(self, hf_name: str, rows: np.ndarray) -> np.ndarray:
        """Rows of a query or key projection (weight, bias or LoRA B) in llama.cpp's rotary order."""
        if not self.permute_qk:
            return rows
        if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            return permute(rows, self.heads)
        if hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            return permute(rows, self.kv_heads)
        return rows


def permute(rows: np.ndarray, heads: int) -> np.ndarray:
    """Interleave each head's two rotary halves (transformers' layout) into pairs (llama.cpp's)."""
    return (
        rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:])
        .swapaxes(1, 2)
        .reshape(rows.shape)
    )


def read_config(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "config.json").read_text(encoding="utf-8"))


def _writer(path: Path, shape: Shape):
    import gguf

    return gguf.GGUFWriter(
        path, gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, ARCHITECTURES[shape.arch][0])]
    )


def _name_map(shape: Shape):
    import gguf

    return gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, ARCHITECTURES[shape.arch][0]), shape.layers)


def gguf_name(shape: Shape, hf_name: str, name_map=None) -> str:
    """The GGUF name of a transformers tensor (`model.layers.0.self_attn.q_proj.weight` →
    `blk.0.attn_q.weight`), from the gguf library's map."""
    name_map = name_map or _name_map(shape)
    found = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if found is None:
        raise ExportError(f"The tensor {hf_name} has no place in a {shape.arch} GGUF file.")
    return found


# --- the tokenizer ------------------------------------------------------------------------------------


def add_tokenizer(writer, folder: Path, shape: Shape, pre: str) -> None:
    """The vocabulary, merges, special tokens and chat template, as llama.cpp's converter writes a
    byte-level BPE tokenizer (the kind Llama 3, Qwen2 and SmolLM2 use); `pre` names its splitting rules."""
    import gguf
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(shape.vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=shape.vocab)
    if special.chat_template is None and tokenizer.chat_template:
        special.chat_template = tokenizer.chat_template
    special.add_to_gguf(writer, quiet=True)
    writer.add_add_space_prefix(False)


# --- a whole model ------------------------------------------------------------------------------------


def model_tensor_plan(shape: Shape, names: Iterable[str]) -> list[tuple[str, str]]:
    """(transformers name, GGUF name) of every tensor the file holds, in the file's order; the output
    projection is left out when it is tied to the embeddings (llama.cpp reuses them)."""
    name_map = _name_map(shape)
    plan = []
    for hf_name in names:
        if shape.tied and hf_name == "lm_head.weight":
            continue
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        plan.append((hf_name, gguf_name(shape, hf_name, name_map)))
    return plan


def tensor_type(kind: str, shape: tuple[int, ...]):
    """A tensor's stored GGML type (the rule is app.exports.gguf_tensor_kind's)."""
    return _quant(exports.gguf_tensor_kind(kind, shape))[0]


def encode(array: np.ndarray, qtype) -> np.ndarray:
    import gguf

    return gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), qtype)


def write_model(
    out: Path,
    *,
    config: dict[str, Any],
    tokenizer_dir: Path,
    shapes: dict[str, tuple[int, ...]],
    tensor: Callable[[str], np.ndarray],
    kind: str,
    name: str,
    original_pre: str | None = None,
    progress: Progress = lambda fraction: None,
) -> None:
    """Write a whole model as GGUF of `kind` (f16, bf16, q8_0). `shapes` names every tensor of the
    transformers model with its shape, and `tensor(name)` gives one's float values when its turn comes."""
    import gguf

    if kind not in FORMATS:
        raise ExportError(f"There is no GGUF type {kind!r}; choose one of {', '.join(FORMATS)}.")
    shape = Shape.from_config(config)
    pre = exports.gguf_check(config, tokenizer_dir, original_pre)
    plan = model_tensor_plan(shape, shapes)
    writer = _writer(out, shape)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(shape.context)
    writer.add_embedding_length(shape.hidden)
    writer.add_block_count(shape.layers)
    writer.add_feed_forward_length(shape.ff)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_rope_freq_base(shape.rope_theta)
    writer.add_layer_norm_rms_eps(shape.rms_eps)
    writer.add_vocab_size(shape.vocab)
    if shape.head_dim * shape.heads != shape.hidden:
        writer.add_key_length(shape.head_dim)
        writer.add_value_length(shape.head_dim)
    writer.add_file_type(_quant(kind)[1])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_tokenizer(writer, tokenizer_dir, shape, pre)
    types = {hf: tensor_type(kind, shapes[hf]) for hf, _ in plan}
    for hf, gg in plan:
        byte_shape = gguf.quants.quant_shape_to_byte_shape(shapes[hf], types[hf])
        writer.add_tensor_info(gg, byte_shape, np.dtype(np.uint8), prod(byte_shape), raw_dtype=types[hf])
    _stream(writer, [(hf, types[hf]) for hf, _ in plan], lambda hf: shape.reorder(hf, tensor(hf)), progress)


def _stream(
    writer, order: list[tuple[str, Any]], values: Callable[[str], np.ndarray], progress: Progress
) -> None:
    """Write the file's header, metadata and tensor table, then each tensor in the table's order, converted
    to its type only when its turn comes."""
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for done, (name, qtype) in enumerate(order, start=1):
            writer.write_tensor_data(encode(values(name), qtype).view(np.uint8).reshape(-1))
            progress(done / len(order))
    finally:
        writer.close()


# --- a LoRA adapter alone -----------------------------------------------------------------------------

LORA_PARTS = {"lora_A": "lora_a", "lora_B": "lora_b"}


def lora_tensor_plan(shape: Shape, names: Iterable[str]) -> list[tuple[str, str]]:
    """(PEFT name, GGUF name) of an adapter's tensors: `…layers.0.self_attn.q_proj.lora_A.weight` →
    `blk.0.attn_q.weight.lora_a`. Only LoRA's A and B matrices of linear layers have a place."""
    name_map = _name_map(shape)
    plan = []
    for peft_name in names:
        base, _, part = peft_name.removesuffix(".weight").rpartition(".")
        if part not in LORA_PARTS:
            raise ExportError(
                f"The adapter holds {peft_name}, which a llama.cpp LoRA file cannot carry (only LoRA's A "
                "and B matrices). Export the merged model instead."
            )
        hf_name = base.removeprefix("base_model.model.") + ".weight"
        if hf_name.endswith(("embed_tokens.weight", "lm_head.weight")):
            raise ExportError(
                "The adapter trains the embeddings or the output layer, which a llama.cpp LoRA file "
                "cannot carry. Export the merged model instead."
            )
        plan.append((peft_name, f"{gguf_name(shape, hf_name, name_map)}.{LORA_PARTS[part]}"))
    return plan


def lora_alpha(adapter_config: dict[str, Any]) -> float:
    """The alpha llama.cpp scales by (alpha / rank). PEFT's rank-stabilised LoRA scales by
    alpha / sqrt(rank), which the same file expresses with alpha × sqrt(rank)."""
    method = by_peft_type(adapter_config.get("peft_type"))
    if method is None or not method.llama_cpp_adapter:
        raise ExportError(
            "A llama.cpp adapter file holds LoRA adapters; this run trained "
            f"{method.label if method else adapter_config.get('peft_type')}. Export the merged model instead."
        )
    if adapter_config.get("use_dora"):
        raise ExportError(DORA_REFUSED)
    if adapter_config.get("rank_pattern") or adapter_config.get("alpha_pattern"):
        raise ExportError(
            "This adapter gives its layers different ranks or alphas, which a llama.cpp adapter file "
            "cannot state. Export the merged model instead."
        )
    alpha, rank = float(adapter_config["lora_alpha"]), int(adapter_config["r"])
    return alpha * sqrt(rank) if adapter_config.get("use_rslora") else alpha


def write_lora(
    out: Path,
    *,
    config: dict[str, Any],
    adapter_config: dict[str, Any],
    shapes: dict[str, tuple[int, ...]],
    tensor: Callable[[str], np.ndarray],
    name: str,
    progress: Progress = lambda fraction: None,
) -> None:
    """Write a PEFT LoRA adapter as a llama.cpp LoRA GGUF (F16 matrices; applied with `--lora`)."""
    import gguf

    shape = Shape.from_config(config)
    alpha = lora_alpha(adapter_config)
    plan = lora_tensor_plan(shape, shapes)
    writer = _writer(out, shape)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_name(name)
    f16 = gguf.GGMLQuantizationType.F16
    for peft_name, gg in plan:
        byte_shape = gguf.quants.quant_shape_to_byte_shape(shapes[peft_name], f16)
        writer.add_tensor_info(gg, byte_shape, np.dtype(np.uint8), prod(byte_shape), raw_dtype=f16)

    def rows_in_place(peft_name: str) -> np.ndarray:
        # B's rows are the projection's output rows: a query's or key's are reordered like its weight
        values = tensor(peft_name)
        if ".lora_B." in peft_name:
            base = peft_name.rpartition(".lora_B.")[0] + ".weight"
            return shape.reorder(base, values)
        return values

    _stream(writer, [(p, f16) for p, _ in plan], rows_in_place, progress)
