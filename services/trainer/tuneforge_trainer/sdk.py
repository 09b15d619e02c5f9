"""Runner SDK: the DeepExtension runner contract shared by every training method.

A method is a child process. It reads its hyperparameters from `--key=value` flags (falling back to
upper-snake environment variables) and reports progress on stdout as `[log_data]: {json}` lines,
which the agent parses with `parse_log_data`. The agent imports this module, so torch and
transformers are only imported when the trainer callback is first asked for.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tuneforge_common.params import ParamSpec, check_range, coerce, specs_from_dataclass

LOG_DATA_PREFIX = "[log_data]: "
CHECKPOINT_PREFIX = "[checkpoint]: "
# A runner that stopped after checkpointing because a pause was asked exits with this (EX_TEMPFAIL).
PAUSED_EXIT_CODE = 75

# LogDataCallback is served by __getattr__ and left out of __all__ so `import *` stays torch-free.
__all__ = ["LOG_DATA_PREFIX", "log_data", "make_log_data_callback", "parse_flags", "parse_log_data"]

_BOOL_WORDS = {"true", "false", "1", "0", "yes", "no", "on", "off"}


# --- progress lines -----------------------------------------------------------------------------


def _json_value(value: Any) -> Any:
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        try:
            value = value.item()
        except (TypeError, ValueError, RuntimeError):  # not a single element: json's default=str
            pass
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # strict JSON has no NaN/Infinity; keep the signal as text
    return value


def format_log_data(progress: float, code: int = 200, **details: Any) -> str:
    progress = min(100.0, max(0.0, float(progress)))
    payload = {
        "code": int(code),
        "progress": round(progress, 2),
        "details": {k: _json_value(v) for k, v in details.items() if v is not None},
    }
    return LOG_DATA_PREFIX + json.dumps(payload, allow_nan=False, default=str)


def log_data(progress: float, code: int = 200, **details: Any) -> None:
    """Report progress (percent, 0-100) and metrics as one `[log_data]: {json}` line on stdout."""
    print(format_log_data(progress, code, **details), flush=True)


def _prefixed_object(line: str, prefix: str) -> dict[str, Any] | None:
    """The JSON object after a protocol prefix; None for any other line, including malformed ones."""
    text, prefix = line.strip(), prefix.rstrip()
    if not text.startswith(prefix):
        return None
    try:
        payload = json.loads(text[len(prefix) :])
    except ValueError:
        return None
    return payload if isinstance(payload, dict) else None


def parse_log_data(line: str) -> dict[str, Any] | None:
    """The payload of a `[log_data]` line; None for any other line, including malformed ones."""
    return _prefixed_object(line, LOG_DATA_PREFIX)


def format_checkpoint(step: int, path: str, metrics: Mapping[str, Any]) -> str:
    numbers = {k: _json_value(v) for k, v in metrics.items() if isinstance(_numeric(v), (int, float))}
    return CHECKPOINT_PREFIX + json.dumps({"step": int(step), "path": str(path), "metrics": numbers}, default=str)


def report_checkpoint(step: int, path: str, metrics: Mapping[str, Any]) -> None:
    """Tell the agent a checkpoint is saved at path; it copies it into the artifact store and records it."""
    print(format_checkpoint(step, path, metrics), flush=True)


def parse_checkpoint(line: str) -> dict[str, Any] | None:
    """The payload of a `[checkpoint]` line ({step, path, metrics}); None for any other line."""
    payload = _prefixed_object(line, CHECKPOINT_PREFIX)
    if payload is None or not isinstance(payload.get("step"), int) or not payload.get("path"):
        return None
    payload.setdefault("metrics", {})
    return payload


# --- the paths the agent passes ------------------------------------------------------------------

REQUIRED_EXTRAS = ("model_path", "dataset_path", "output_dir")


@dataclasses.dataclass(frozen=True)
class RunPaths:
    model: Path
    dataset: Path
    output: Path
    # A checkpoint directory, True (the latest in output), or None for a fresh start.
    resume: str | bool | None
    # The job's validation dataset (--validation_dataset_path), evaluated on instead of held-out rows; None without.
    validation: Path | None = None


def run_paths(extras: dict[str, str]) -> RunPaths:
    """The agent's flags (or their upper-case environment variables), checked; SystemExit names the flag."""
    values = {k: extras.get(k) or os.environ.get(k.upper(), "") for k in REQUIRED_EXTRAS}
    missing = [f"--{k}" for k, v in values.items() if not v]
    if missing:
        raise SystemExit(f"error: missing required flag(s): {', '.join(missing)}")
    model = Path(values["model_path"])
    if not (model / "config.json").is_file():
        raise SystemExit(f"error: --model_path={model}: no model there (config.json missing)")
    flag = extras.get("resume_from_checkpoint", os.environ.get("RESUME_FROM_CHECKPOINT")) or None
    resume: str | bool | None = flag
    if flag is not None:
        if flag.lower() == "true":
            resume = True  # Trainer picks the last checkpoint in output_dir
        elif not Path(flag).is_dir():
            raise SystemExit(f"error: --resume_from_checkpoint={flag}: no such checkpoint directory")
    validation = extras.get("validation_dataset_path") or os.environ.get("VALIDATION_DATASET_PATH") or None
    if validation is not None and not Path(validation).is_file():
        raise SystemExit(f"error: --validation_dataset_path={validation}: no such file")
    return RunPaths(
        model,
        Path(values["dataset_path"]),
        Path(values["output_dir"]),
        resume,
        Path(validation) if validation is not None else None,
    )


# --- pause ----------------------------------------------------------------------------------------

_pause_requested = False


def _on_pause_signal(signum: int, frame: Any) -> None:
    global _pause_requested
    _pause_requested = True


def install_pause_handler() -> None:
    """SIGUSR1 from the agent asks for a pause: the trainer callback saves a checkpoint and stops."""
    import signal

    signal.signal(signal.SIGUSR1, _on_pause_signal)


def pause_requested() -> bool:
    return _pause_requested


# --- flags ----------------------------------------------------------------------------------------


def _flag_help(params_cls: type, specs: list[ParamSpec]) -> str:
    lines = [f"{params_cls.__name__}: {(params_cls.__doc__ or '').strip()}", "", "flags:"]
    for spec in specs:
        extra = []
        if spec.choices:
            extra.append("one of " + ", ".join(spec.choices))
        if spec.aliases:
            extra.append("aliases " + ", ".join("--" + a for a in spec.aliases))
        suffix = f" ({'; '.join(extra)})" if extra else ""
        kind = f"[{spec.type}, env {spec.env_name}]"
        lines.append(f"  --{spec.name}={spec.default!r} {kind} {spec.help}{suffix}")
    return "\n".join(lines)


def _split_flags(argv: Sequence[str], bool_names: set[str]) -> list[tuple[str, str | None]]:
    """(name, raw value) pairs from `--key=value` and `--key value`; value None for a bare flag."""
    pairs: list[tuple[str, str | None]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith("--") or arg == "--":
            raise SystemExit(f"error: unexpected argument {arg!r}; flags look like --key=value")
        key, sep, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if sep:
            pairs.append((key, value))
        elif (
            i < len(argv)
            and not argv[i].startswith("--")
            and (key not in bool_names or argv[i].strip().lower() in _BOOL_WORDS)
        ):
            pairs.append((key, argv[i]))
            i += 1
        else:
            pairs.append((key, None))
    return pairs


def parse_flags(
    params_cls: type, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> tuple[Any, dict[str, str]]:
    """Parameters for `params_cls` from flags, then environment, then defaults; plus unknown flags.

    Unknown flags (the runner's --model_path, --dataset_path, --output_dir, ...) are returned as
    extras. A bad value raises SystemExit naming the flag or environment variable.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    environ = os.environ if environ is None else environ
    specs = specs_from_dataclass(params_cls)
    by_name = {s.name: s for s in specs}
    alias_to_name = {alias: s.name for s in specs for alias in s.aliases}
    if "--help" in argv or "-h" in argv:
        print(_flag_help(params_cls, specs))
        raise SystemExit(0)

    given: dict[str, tuple[str, Any]] = {}  # canonical name -> (where it came from, raw value)
    extras: dict[str, str] = {}
    for key, raw in _split_flags(
        argv,
        {s.name for s in specs if s.type == "bool"}
        | {a for a, n in alias_to_name.items() if by_name[n].type == "bool"},
    ):
        name = key if key in by_name else alias_to_name.get(key)
        if name is None:
            extras[key] = "true" if raw is None else raw
            continue
        if name in given:
            raise SystemExit(f"error: --{key}: given twice (as {given[name][0]} and --{key})")
        spec = by_name[name]
        if raw is None:
            if spec.type != "bool":
                raise SystemExit(f"error: --{key}: needs a value ({spec.type})")
            raw = "true"
        given[name] = (f"--{key}", raw)
    for spec in specs:
        if spec.name not in given and spec.env_name in environ:
            given[spec.name] = (f"environment variable {spec.env_name}", environ[spec.env_name])

    values: dict[str, Any] = {}
    for spec in specs:
        if spec.name not in given:
            if spec.required:
                raise SystemExit(f"error: --{spec.name} is required")
            values[spec.name] = spec.default
            continue
        source, raw = given[spec.name]
        try:
            value = coerce(spec, raw)
        except ValueError as exc:
            raise SystemExit(f"error: {source}: {exc}") from None
        problem = check_range(spec, value)
        if problem:
            raise SystemExit(f"error: {source}: {problem}")
        values[spec.name] = value
    field_names = {f.name for f in dataclasses.fields(params_cls)}
    return params_cls(**{k: v for k, v in values.items() if k in field_names}), extras


# --- rows for scripts without the HF Trainer ------------------------------------------------------

PROMPT_COLUMNS = ("question", "instruction", "query", "input", "prompt")
ANSWER_COLUMNS = ("answer", "response", "output", "completion")


def read_prompt_answer_rows(
    path: str, max_samples: int = -1, input_column: str = "", output_column: str = ""
) -> list[tuple[str, str]]:
    """(prompt, answer) pairs from a JSON-lines file: the named columns, or the first of the usual names.

    Chat rows ({"messages": [...]}) give their last user turn and the assistant turn after it. A row without
    both raises ValueError naming its line, so a custom script fails with the line in its error.
    """
    pairs: list[tuple[str, str]] = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"{path} line {number}: invalid JSON ({exc})") from None
            pair = _prompt_answer(row, input_column, output_column) if isinstance(row, dict) else None
            if pair is None:
                wanted = f"{input_column or '/'.join(PROMPT_COLUMNS)} and {output_column or '/'.join(ANSWER_COLUMNS)}"
                raise ValueError(f"{path} line {number}: no prompt/answer pair (expected {wanted}, or messages)")
            pairs.append(pair)
            if 0 < max_samples <= len(pairs):
                break
    return pairs


def _prompt_answer(row: dict[str, Any], input_column: str, output_column: str) -> tuple[str, str] | None:
    if not (input_column or output_column) and isinstance(row.get("messages"), list):
        turns = [m for m in row["messages"] if isinstance(m, dict) and isinstance(m.get("content"), str)]
        for i in range(len(turns) - 1, 0, -1):
            if turns[i].get("role") == "assistant" and turns[i - 1].get("role") == "user":
                return turns[i - 1]["content"], turns[i]["content"]
        return None
    prompt_key = input_column or next((c for c in PROMPT_COLUMNS if c in row), "")
    answer_key = output_column or next((c for c in ANSWER_COLUMNS if c in row and c != prompt_key), "")
    prompt, answer = row.get(prompt_key), row.get(answer_key)
    if isinstance(prompt, str) and prompt.strip() and isinstance(answer, str) and answer.strip():
        return prompt, answer
    return None


def prompt_text(tokenizer: Any, prompt: str) -> str:
    """The prompt as the model sees it before its answer: one user turn of its chat template, or the plain
    text and a newline when it has none."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return prompt + "\n"


def encode_prompt_answer(
    tokenizer: Any, prompt: str, answer: str, max_input_length: int, max_content_length: int, max_seq_length: int
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for one pair: the prompt keeps its last max_input_length tokens, the answer its first
    max_content_length (ending with EOS), both together at most max_seq_length; prompt labels are -100 so
    the loss is on the answer only. Uses the chat template when the tokenizer has one."""
    prompt_ids = tokenizer(prompt_text(tokenizer, prompt), add_special_tokens=False)["input_ids"][-max_input_length:]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"][: max(0, max_content_length - 1)]
    answer_ids = [*answer_ids, tokenizer.eos_token_id]
    room = max_seq_length - len(prompt_ids)
    answer_ids = answer_ids[: max(room, 1)]
    ids = (prompt_ids + answer_ids)[:max_seq_length]
    labels = ([-100] * len(prompt_ids) + answer_ids)[:max_seq_length]
    return ids, labels


def log_generations(model: Any, tokenizer: Any, prompt: str, count: int, max_new_tokens: int = 32) -> list[str]:
    """Sample `count` answers to a prompt (chat template when there is one) and print them to the log as JSON,
    so a run shows what it learned, not only its loss; reports `generations` as a metric."""
    import torch

    text = prompt_text(tokenizer, prompt)
    device = next(model.parameters()).device
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]], device=device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=True,
            max_new_tokens=max_new_tokens,
            num_return_sequences=count,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
    model.train(was_training)
    texts = tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
    print(json.dumps({"prompt": prompt, "generations": texts}), file=sys.stderr, flush=True)
    log_data(100, generations=len(texts))
    return texts


# --- transformers callback (built lazily) -------------------------------------------------------


def _numeric(value: Any) -> float | int | None:
    if hasattr(value, "item") and callable(value.item):
        try:
            value = value.item()
        except (TypeError, ValueError, RuntimeError):
            return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value


_callback_class: type | None = None


def _build_callback_class() -> type:
    global _callback_class
    if _callback_class is not None:
        return _callback_class
    from transformers import TrainerCallback

    class LogDataCallback(TrainerCallback):
        """Reports every Trainer log (loss, learning_rate, grad_norm, eval_loss, ...) as log_data, with the
        training tokens per second since the previous log and, on a GPU, the peak memory."""

        def __init__(self) -> None:
            self._last: tuple[float, int] | None = None  # (time, tokens seen) at the previous training log

        def on_train_begin(self, args, state, control, **kwargs):
            self._last = (time.perf_counter(), getattr(state, "num_input_tokens_seen", 0) or 0)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero:
                return
            progress = 100.0 * state.global_step / state.max_steps if state.max_steps else 0.0
            details: dict[str, Any] = {"step": state.global_step, "epoch": state.epoch}
            for key, value in (logs or {}).items():
                number = _numeric(value)
                if number is not None:
                    details[key] = number
            if "loss" in details:  # a training log, not an evaluation
                details.update(self._throughput(state))
            log_data(progress, **details)

        def _throughput(self, state) -> dict[str, float]:
            extra: dict[str, float] = {}
            now, seen = time.perf_counter(), getattr(state, "num_input_tokens_seen", 0) or 0
            if self._last is not None and seen > self._last[1] and now > self._last[0]:
                extra["tokens_per_second"] = round((seen - self._last[1]) / (now - self._last[0]), 1)
            self._last = (now, seen)
            if seen:
                extra["tokens_seen"] = seen
            import torch

            if torch.cuda.is_available():
                extra["gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
            return extra

        def on_step_end(self, args, state, control, **kwargs):
            if _pause_requested:
                control.should_save = True  # the checkpoint a resume starts from
                control.should_training_stop = True

        def on_save(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:
                return
            path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            # Metrics at that step: the latest logged values up to it (loss, eval_loss, ...).
            metrics: dict[str, Any] = {}
            for entry in state.log_history:
                if entry.get("step", 0) <= state.global_step:
                    metrics.update({k: v for k, v in entry.items() if k not in ("step", "epoch")})
            report_checkpoint(state.global_step, path, metrics)

    _callback_class = LogDataCallback
    return LogDataCallback


def make_log_data_callback() -> Any:
    """A new LogDataCallback instance (imports transformers)."""
    return _build_callback_class()()


def __getattr__(name: str) -> Any:
    if name == "LogDataCallback":
        return _build_callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
