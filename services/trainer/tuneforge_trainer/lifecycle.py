"""What the model-lifecycle programs (merge, serve, evaluate) share: flags, exits, paths, loading for inference.

They run as child processes on a trainer agent, as training methods do: `--key=value` flags, progress as
`[log_data]: {json}` lines on stdout, the log on stderr, and on failure a one-line `error: ...` on stderr with
a non-zero exit: 2 for a command line that can't run here (a bad flag, a path that holds no model, hardware
that is missing), 1 for a failure during the run, 143 when stopped by SIGTERM.

Unlike the training methods they read flags only, not environment variables: an environment holds names such
as PORT or HOST that must not silently become a lifecycle program's settings. A flag a program does not take is
named on stderr and ignored.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tuneforge_trainer.sdk import parse_flags

USAGE_EXIT_CODE = 2
STOPPED_EXIT_CODE = 143  # 128 + SIGTERM, as a shell reports it


class UsageError(Exception):
    """The command line can't run here; exits 2 with `error: <message>`."""


class Failure(Exception):
    """A failure the message explains without a traceback; exits 1 with `error: <message>`."""


class Stopped(BaseException):
    """SIGTERM arrived; raised in the main thread so cleanup (finally blocks) runs."""


def required(help: str) -> Any:
    """A flag without a default: parse_flags refuses a command line that lacks it."""
    return dataclasses.field(metadata={"help": help})


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def program_flags(name: str, params_cls: type, argv: list[str] | None) -> Any:
    """The flags (never the environment). An unknown flag is named on stderr and ignored, as the training
    methods ignore flags they don't take: the agent may pass a job's parameters that another program uses."""
    params, extras = parse_flags(params_cls, argv, environ={})
    if extras:
        known = ", ".join(f"--{f.name}" for f in dataclasses.fields(params_cls))
        log(f"{name}: ignoring unknown flag(s) {', '.join(f'--{k}' for k in extras)}; it takes {known}")
    return params


def _raise_stopped(signum: int, frame: Any) -> None:
    raise Stopped


def run_program(name: str, params_cls: type, body: Callable[[Any], int | None], argv: list[str] | None) -> int:
    """Parse the flags, run body(params) and turn what it raises into the exit contract above."""
    try:
        params = program_flags(name, params_cls, argv)
    except SystemExit as exc:  # parse_flags names the bad flag in a str code; --help exits 0
        if isinstance(exc.code, str):
            log(exc.code)
            return USAGE_EXIT_CODE
        raise
    previous = signal.signal(signal.SIGTERM, _raise_stopped)
    try:
        return body(params) or 0
    except UsageError as exc:
        log(f"error: {exc}")
        return USAGE_EXIT_CODE
    except Failure as exc:
        log(f"error: {exc}")
        return 1
    except Stopped:
        log(f"error: {name}: stopped by SIGTERM")
        return STOPPED_EXIT_CODE
    except SystemExit:
        raise
    except Exception as exc:
        traceback.print_exc()
        log(f"error: {name} failed: {type(exc).__name__}: {exc}")
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)  # main() may run inside another program (a test)


# --- paths ------------------------------------------------------------------------------------------


def model_dir(flag: str, value: str) -> Path:
    path = Path(value)
    if not (path / "config.json").is_file():
        raise UsageError(f"--{flag}={value}: no model there (config.json missing)")
    return path


def adapter_dir(flag: str, value: str) -> Path | None:
    if not value:
        return None
    path = Path(value)
    if not (path / "adapter_config.json").is_file():
        raise UsageError(f"--{flag}={value}: no LoRA adapter there (adapter_config.json missing)")
    return path


def tokenizer_dir(adapter: Path | None, base: Path) -> Path:
    """The adapter's tokenizer (and chat template) when it saved one, else the base model's."""
    if adapter is not None and (adapter / "tokenizer_config.json").is_file():
        return adapter
    return base


def config_dtype(model: Path) -> str:
    """fp32, fp16 or bf16: the dtype a model's config.json says its weights are in (fp32 when it doesn't say)."""
    config = json.loads((model / "config.json").read_text(encoding="utf-8"))
    dtype = config.get("dtype") or config.get("torch_dtype")
    return {"float16": "fp16", "bfloat16": "bf16"}.get(str(dtype), "fp32")


def inference_precision(flag: str, cuda: bool, cuda_bf16: bool) -> str:
    """--precision for running a model: auto is bf16 on a GPU that has it, fp16 on another GPU, fp32 on a CPU."""
    if flag == "auto":
        return ("bf16" if cuda_bf16 else "fp16") if cuda else "fp32"
    if flag == "bf16" and cuda and not cuda_bf16:
        raise UsageError("--precision=bf16: this GPU does not support bfloat16; use fp16, fp32 or auto")
    return flag


def load_for_inference(model_path: Path, adapter_path: Path | None, precision: str, device: str):
    """(model, tokenizer) in eval mode on device: the adapter, when given, merged in with PEFT."""
    from transformers import AutoModelForCausalLM

    from tuneforge_trainer.hardware import torch_dtype
    from tuneforge_trainer.runner import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir(adapter_path, model_path))
    model: Any = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype(precision))
    model = model.to(device)
    if adapter_path is not None:
        from peft import PeftModel

        # Merged in memory: the same outputs as the PeftModel, without its extra matmuls on every token.
        model = PeftModel.from_pretrained(model, adapter_path).merge_and_unload()
    model.eval()
    return model, tokenizer


def directory_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
