"""A base model loaded quantised (QLoRA's 4-bit NF4, or LLM.int8) through bitsandbytes: the loading
settings and what its weights take in memory. The trainer and the generation engine both load a QLoRA run's
base this way, so that its adapter answers on the base it was trained on. Torch and transformers are imported
inside the functions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from worker.hardware import loaded_bytes


def quantization_config(quantization: str, dtype):
    """bitsandbytes' settings: QLoRA's NF4 with double quantisation computing in `dtype`, or LLM.int8."""
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )


def loading_arguments(quantization: str, dtype) -> dict[str, Any]:
    """What `from_pretrained` takes besides the path: the quantisation settings when there are any."""
    if quantization == "none":
        return {"dtype": dtype}
    return {"dtype": dtype, "quantization_config": quantization_config(quantization, dtype)}


def weights_in_memory(model_path: Path, dtype, quantization: str = "none") -> int:
    """About how much the base model's weights take once loaded (quantised linear layers as
    app.runs.estimate counts them; a layout it does not know, as if unquantised: the larger figure)."""
    import torch

    from app.runs.estimate import weights_bytes
    from app.runs.shapes import Shapes

    shapes = Shapes.read(model_path) if quantization != "none" else None
    if shapes is None:
        return loaded_bytes(model_path, dtype)
    return weights_bytes(shapes, quantization, torch.finfo(dtype).bits // 8)


def keep_trainable(model) -> None:
    """Keep a quantised model's 4-bit layers in the layout training needs. bitsandbytes (0.50) repacks a
    4-bit layer's weights for its fast CPU kernel the first time the layer runs in eval mode without
    gradients (on CPUs with AVX512-BF16), and keeps them so; that kernel passes no gradient back, so a run
    that scores answers before or between its steps would stop learning from then on. The generation engine,
    which never trains, keeps the fast kernel."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
