"""What this machine can run: precision, 4-bit loading, FlashAttention-2, Liger kernels; and loading the model.

Everything a flag asks for that the hardware or the installed packages can't honour fails here, before the
model is loaded, with a message naming the flag; FlashAttention-2 alone falls back (to SDPA) with a notice.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def resolve_precision(compute_type: str, cuda: bool, cuda_bf16: bool) -> str:
    """bf16, fp16 or fp32 for --compute_type on this machine; SystemExit when it can't be honoured.

    auto: bf16 on a GPU that supports it, else fp32 (fp16 is never picked silently: it needs loss scaling
    and overflows more easily). bf16 runs on a CPU too (slowly, but as asked); fp16 mixed precision
    needs CUDA.
    """
    if compute_type == "auto":
        return "bf16" if cuda and cuda_bf16 else "fp32"
    if compute_type == "fp16" and not cuda:
        raise SystemExit(
            "error: --compute_type=fp16 needs a CUDA GPU (fp16 mixed precision scales the loss on CUDA); "
            "this machine has none: use bf16, fp32 or auto"
        )
    if compute_type == "bf16" and cuda and not cuda_bf16:
        raise SystemExit("error: --compute_type=bf16: this GPU does not support bfloat16; use fp16, fp32 or auto")
    return compute_type


def check_hardware(params: Any, cuda: bool, cuda_bf16: bool) -> str:
    """The precision to train in, after checking that what the flags ask for can run here."""
    precision = resolve_precision(params.compute_type, cuda, cuda_bf16)
    if getattr(params, "load_in_4bit", False):
        if not cuda:
            raise SystemExit(
                "error: --load_in_4bit=true: 4-bit quantization (bitsandbytes) needs a CUDA GPU and this "
                "machine has none; set load_in_4bit=false to train on the unquantized model"
            )
        if not installed("bitsandbytes"):
            raise SystemExit(
                "error: --load_in_4bit=true needs the bitsandbytes package: pip install 'tuneforge-trainer[gpu]'"
            )
    if params.flash_attention and precision == "fp32" and flash_attention_available(cuda):
        raise SystemExit("error: --flash_attention=true needs bf16 or fp16 compute; set --compute_type=bf16 or fp16")
    if getattr(params, "use_liger_kernel", False):
        if not installed("liger_kernel"):
            raise SystemExit(
                "error: --use_liger_kernel=true needs the liger-kernel package: pip install 'tuneforge-trainer[gpu]'"
            )
        if not cuda:
            raise SystemExit("error: --use_liger_kernel=true: Liger's Triton kernels need a CUDA GPU")
    return precision


def flash_attention_available(cuda: bool) -> bool:
    return cuda and installed("flash_attn")


def attention_implementation(params: Any, cuda: bool) -> tuple[str, str]:
    """(attn_implementation, a notice for the log): FlashAttention-2 when asked and it can run, else PyTorch's
    scaled-dot-product attention, which gives the same results with more memory for long sequences."""
    if not params.flash_attention:
        return "sdpa", ""
    if not cuda:
        return "sdpa", "flash_attention: FlashAttention-2 needs a CUDA GPU; falling back to PyTorch SDPA attention"
    if not installed("flash_attn"):
        return "sdpa", (
            "flash_attention: the flash-attn package is not installed (pip install flash-attn); "
            "falling back to PyTorch SDPA attention"
        )
    return "flash_attention_2", "flash_attention: using FlashAttention-2"


def torch_dtype(precision: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def load_model(model_path: Path, params: Any, precision: str, *, quantize: bool | None = None):
    """The model in the precision to train in; 4-bit NF4 (QLoRA) when load_in_4bit, unless quantize=False."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch_dtype(precision)
    attention, notice = attention_implementation(params, torch.cuda.is_available())
    if notice:
        print(notice, file=sys.stderr, flush=True)
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attention}
    if getattr(params, "load_in_4bit", False) if quantize is None else quantize:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            # QLoRA's choices; the qlora method's schema makes both settable.
            bnb_4bit_quant_type=getattr(params, "bnb_4bit_quant_type", "nf4"),
            bnb_4bit_use_double_quant=getattr(params, "bnb_4bit_use_double_quant", True),
            bnb_4bit_compute_dtype=dtype,
            # Kept in full precision so the saved embeddings and head match the base a merge is done on.
            llm_int8_skip_modules=["lm_head"],
        )
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    return AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
