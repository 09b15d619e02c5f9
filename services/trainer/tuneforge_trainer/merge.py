"""The "Complete" stage: a LoRA adapter merged into its base model, saved as a complete model.

    python -m tuneforge_trainer.merge --model_path=BASE_DIR --adapter_path=ADAPTER_DIR --output_dir=OUT \\
        [--precision=auto|fp32|fp16|bf16] [--quantize=none|8bit|4bit]

The base is always loaded unquantized, also for a QLoRA adapter (trained on a 4-bit copy of it). OUT gets the
merged weights as safetensors (config.json, generation_config.json, model.safetensors or its shards) and the
adapter's tokenizer with its chat template; --quantize=8bit|4bit adds a bitsandbytes copy of the merged model
under OUT/quantized-8bit or OUT/quantized-4bit (with the tokenizer too), which needs a CUDA GPU.

Everything is written to a hidden directory next to OUT (.OUT.partial-XXXX) and renamed to OUT at the end, so
a stopped or failed merge leaves no half model at OUT. OUT may exist only as an empty directory.

Progress: one `[log_data]` line per stage (details {"stage": ...}), then progress 100 with details
{"output_dir", "size_bytes" (all of OUT), "quantized_dir" (only with --quantize)}.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tuneforge_common.operations import MergeParams as MergeSettings
from tuneforge_trainer import lifecycle
from tuneforge_trainer.lifecycle import Failure, UsageError, log, required
from tuneforge_trainer.sdk import log_data


@dataclass(frozen=True, kw_only=True)
class MergeParams(MergeSettings):
    """Merge a LoRA adapter into its full-precision base model and save the complete model (the settings a user
    gives are tuneforge_common.operations.MergeParams; the agent adds the paths)."""

    model_path: str = required("The base model directory the adapter was trained on (loaded unquantized).")
    adapter_path: str = required("The LoRA adapter directory (adapter_config.json, adapter weights, tokenizer).")
    output_dir: str = required("Where the complete model is saved; must not exist yet, or be empty.")


def check_quantize(quantize: str) -> None:
    """--quantize can run here, checked before any work: bitsandbytes quantizes on a CUDA GPU only."""
    if quantize == "none":
        return
    from tuneforge_trainer.hardware import installed
    from tuneforge_trainer.runner import cuda_state

    if not cuda_state()[0]:
        raise UsageError("--quantize: 8-bit/4-bit quantization needs a CUDA GPU")
    if not installed("bitsandbytes"):
        raise UsageError("--quantize needs the bitsandbytes package: pip install 'tuneforge-trainer[gpu]'")


def check_output(out: Path) -> None:
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise UsageError(f"--output_dir={out}: already exists and is not an empty directory")


def merge_precision(flag: str, base: Path) -> str:
    return lifecycle.config_dtype(base) if flag == "auto" else flag


def quantized_copy(merged: Path, target: Path, bits: str) -> None:
    """The merged model loaded through bitsandbytes (8-bit LLM.int8 or 4-bit NF4) on the GPU, saved to target."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from tuneforge_trainer.runner import cuda_state

    compute = torch.bfloat16 if cuda_state()[1] else torch.float16
    if bits == "8bit":
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
        )
    model = AutoModelForCausalLM.from_pretrained(
        merged, quantization_config=config, dtype=compute, device_map={"": torch.cuda.current_device()}
    )
    model.save_pretrained(target, safe_serialization=True)
    AutoTokenizer.from_pretrained(merged).save_pretrained(target)


def merge(params: MergeParams) -> None:
    from tuneforge_trainer import runner

    base = lifecycle.model_dir("model_path", params.model_path)
    adapter = lifecycle.adapter_dir("adapter_path", params.adapter_path)
    if adapter is None:
        raise UsageError("--adapter_path: needs the adapter directory")
    if not params.output_dir:
        raise UsageError("--output_dir: needs a directory")
    out = Path(params.output_dir)
    check_output(out)
    if "quantization_config" in json.loads((base / "config.json").read_text(encoding="utf-8")):
        raise UsageError(
            f"--model_path={base}: this model is saved quantized; a merge needs the full-precision base model"
        )
    check_quantize(params.quantize)
    precision = merge_precision(params.precision, base)
    runner.quiet_libraries()

    stages = ["loading base", "loading adapter", "merging", "saving"]
    if params.quantize != "none":
        stages.append("quantizing")

    def stage(name: str) -> None:
        log(f"merge: {name}")
        log_data(100.0 * stages.index(name) / len(stages), stage=name)

    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    partial.chmod(0o755)  # mkdtemp makes it private; OUT is an ordinary directory
    quantized_name = f"quantized-{params.quantize}" if params.quantize != "none" else None
    try:
        runner.merge_into_base(adapter, base, partial, precision, on_stage=stage)
        if quantized_name is not None:
            stage("quantizing")
            quantized_copy(partial, partial / quantized_name, params.quantize)
        size = lifecycle.directory_size(partial)
        try:
            os.replace(partial, out)  # replaces an empty directory too (rename(2))
        except OSError as exc:
            raise Failure(f"--output_dir={out}: cannot move the merged model there: {exc}") from None
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    log(f"merge: {precision} model saved to {out} ({size} bytes)")
    log_data(
        100,
        output_dir=str(out),
        size_bytes=size,
        quantized_dir=str(out / quantized_name) if quantized_name is not None else None,
    )


def main(argv: list[str] | None = None) -> int:
    return lifecycle.run_program("merge", MergeParams, merge, argv)


if __name__ == "__main__":
    raise SystemExit(main())
