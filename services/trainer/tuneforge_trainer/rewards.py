"""Reward functions for the grpo method: the built-ins, and the user's own reward files.

Every reward function has TRL's signature, `f(prompts, completions, **kwargs) -> list[float | None]`, one
value per completion (None: "does not apply to this one", which GRPOTrainer leaves out of its averages).
A completion is a string, or, for conversational prompts, a list of message dicts whose assistant
contents are its text. The keyword arguments are the dataset's other columns, one value per completion
(`answer`, and any column the dataset file has, such as `target_length` or `answer_regex`), plus
TRL's `completion_ids` (token ids), `trainer_state`, `log_extra` and `log_metric`.

Built-ins (--reward_functions names them, comma-separated):

* `accuracy`: 1.0 when the completion's final answer equals the row's `answer` after normalisation
  (strip, lowercase, whitespace collapsed, trailing punctuation . , ; : ! ? dropped), else 0.0. The final
  answer is the last <answer>...</answer> when there is one, then the last \\boxed{...} inside it (or
  inside the whole completion), else the whole completion.
* `format`: 1.0 when the whole completion is `<think>...</think>` then `<answer>...</answer>` (whitespace
  around and between allowed, no nested or repeated tags); otherwise partial credit, 0.2 for each of the
  four tags <think>, </think>, <answer>, </answer> that appears exactly once (0.0 to 0.8), so a model that
  is learning the format is rewarded for each step towards it.
* `length`: 1 - |length - target| / target, clipped to [0, 1]: 1.0 at the target, 0.0 at twice it or at
  none. Length counts completion tokens (the `completion_ids` GRPOTrainer passes; called without them,
  whitespace-separated words). The target is the row's `target_length` column when the dataset has one
  (and it is set on that row), else half of max_completion_length.
* `regex`: 1.0 when the final answer (as for accuracy, stripped) matches the row's `answer_regex`
  column as a whole (re.fullmatch; use `.*` around it to look for a part, `(?i)` to ignore case), or, on
  rows without one, the run's --reward_regex flag (REWARD_REGEX); else 0.0. None on a row with neither.

User reward functions: a name that is not a built-in is looked up as the Python file `<name>.py` in the
rewards directory (--rewards_dir, else the REWARDS_DIR environment variable, else TUNEFORGE_REWARDS_DIR),
which must define a function `<name>` or `reward` with the signature above (async functions work too). A
function that takes no **kwargs gets only the arguments it names. The file is loaded from that path only
(it must resolve inside the rewards directory; nothing is put on sys.path). Built-in names win over files.
See examples/rewards/contains_keyword.py.

Every function is wrapped so TRL logs it under its name (`rewards/<name>/mean`), a function that raises
fails the run naming it, and a wrong return value (not one number or None per completion) is named too.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import inspect
import math
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tuneforge_common.methods import REWARD_NAME_RE

RewardFunc = Callable[..., Any]  # (prompts, completions, **kwargs) -> list[float | None], or a coroutine of it

REWARDS_DIR_SOURCES = "--rewards_dir, REWARDS_DIR or TUNEFORGE_REWARDS_DIR"
DEFAULT_TARGET_LENGTH = 128


class RewardProblem(Exception):
    """A reward function that can't be used (unknown name, bad file): the run fails before the model loads."""


class RewardFunctionError(RuntimeError):
    """A reward function raised or returned something unusable while training; the message names it."""


# --- completion text and answers ------------------------------------------------------------------


def completion_text(completion: Any) -> str:
    """The text of a completion: a string as is; for a list of messages, its assistant contents joined."""
    if isinstance(completion, str):
        return completion
    messages = [completion] if isinstance(completion, Mapping) else list(completion or [])
    parts: list[str] = []
    for message in messages:
        if not isinstance(message, Mapping) or message.get("role", "assistant") != "assistant":
            continue
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):  # content blocks: [{"type": "text", "text": ...}, ...]
            parts.extend(b["text"] for b in content if isinstance(b, Mapping) and isinstance(b.get("text"), str))
    return "\n".join(parts)


_TRAILING_PUNCTUATION = ".,;:!?"


def normalize(text: str) -> str:
    """Strip, lowercase, collapse whitespace, drop trailing punctuation: `  The Answer is 42.` -> `the answer is 42`."""
    text = re.sub(r"\s+", " ", text.strip().lower())
    return text.rstrip(_TRAILING_PUNCTUATION + " ").strip()


_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def last_boxed(text: str) -> str | None:
    r"""The content of the last \boxed{...} in text (nested braces allowed); None when there is none or it is open."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for i in range(begin, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            if depth == 0:
                return text[begin:i]
            depth -= 1
    return None


def final_answer(text: str) -> str:
    r"""The answer a completion gives: the last <answer>...</answer>, then a \boxed{...} in it, else the text."""
    tagged = _ANSWER_TAG.findall(text)
    candidate = tagged[-1] if tagged else text
    boxed = last_boxed(candidate)
    return boxed if boxed is not None else candidate


def _column(kwargs: Mapping[str, Any], name: str, count: int) -> list[Any]:
    values = kwargs.get(name)
    if values is None:
        return [None] * count
    return list(values)


# --- the built-ins --------------------------------------------------------------------------------


def accuracy(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
    """1.0 when the final answer equals the row's `answer` after normalisation, else 0.0 (None without one)."""
    if kwargs.get("answer") is None:
        raise ValueError("accuracy needs the dataset's answer column (passed as answer=...)")
    answers = _column(kwargs, "answer", len(completions))
    rewards: list[float | None] = []
    for completion, answer in zip(completions, answers, strict=True):
        if answer is None:
            rewards.append(None)
            continue
        given = normalize(final_answer(completion_text(completion)))
        rewards.append(1.0 if given == normalize(str(answer)) else 0.0)
    return rewards


_FORMAT_FULL = re.compile(
    r"\s*<think>(?:(?!</?think>|</?answer>).)*</think>\s*<answer>(?:(?!</?answer>|</?think>).)*</answer>\s*",
    re.DOTALL,
)
FORMAT_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
FORMAT_TAG_CREDIT = 0.2


def format_reward(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
    """1.0 for `<think>...</think> <answer>...</answer>`; else 0.2 per tag present exactly once (at most 0.8)."""
    rewards: list[float | None] = []
    for completion in completions:
        text = completion_text(completion)
        if _FORMAT_FULL.fullmatch(text):
            rewards.append(1.0)
        else:
            rewards.append(round(FORMAT_TAG_CREDIT * sum(text.count(tag) == 1 for tag in FORMAT_TAGS), 6))
    return rewards


def _positive_number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        return None
    return float(value)


def length(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    default_target: float = DEFAULT_TARGET_LENGTH,
    **kwargs: Any,
) -> list[float | None]:
    """1 - |length - target| / target clipped to [0, 1]; tokens (completion_ids) or else words; see the module."""
    ids = kwargs.get("completion_ids")
    targets = _column(kwargs, "target_length", len(completions))
    rewards: list[float | None] = []
    for i, completion in enumerate(completions):
        size = len(ids[i]) if ids is not None else len(completion_text(completion).split())
        target = default_target
        if targets[i] is not None:
            given = _positive_number(targets[i])
            if given is None:
                raise ValueError(f"target_length must be a positive number, got {targets[i]!r}")
            target = given
        rewards.append(max(0.0, 1.0 - abs(size - target) / target))
    return rewards


def regex(
    prompts: Sequence[Any], completions: Sequence[Any], pattern: str | None = None, **kwargs: Any
) -> list[float | None]:
    """1.0 when the final answer fully matches the row's answer_regex (else `pattern`), 0.0 if not, None without."""
    patterns = _column(kwargs, "answer_regex", len(completions))
    rewards: list[float | None] = []
    for completion, row_pattern in zip(completions, patterns, strict=True):
        chosen = row_pattern or pattern
        if not chosen:
            rewards.append(None)
            continue
        answer = final_answer(completion_text(completion)).strip()
        rewards.append(1.0 if re.fullmatch(chosen, answer) else 0.0)
    return rewards


BUILTIN_REWARDS: dict[str, RewardFunc] = {
    "accuracy": accuracy,
    "format": format_reward,
    "length": length,
    "regex": regex,
}


@dataclasses.dataclass(frozen=True)
class RewardSettings:
    """What the built-ins take from the run rather than the rows."""

    default_target_length: float = DEFAULT_TARGET_LENGTH  # length: rows without target_length
    pattern: str | None = None  # regex: rows without answer_regex


def _builtin(name: str, settings: RewardSettings) -> RewardFunc:
    if name == "length":
        return functools.partial(length, default_target=settings.default_target_length)
    if name == "regex":
        return functools.partial(regex, pattern=settings.pattern)
    return BUILTIN_REWARDS[name]


def regex_problem(pattern: Any) -> str | None:
    """Why pattern is not a usable regular expression; None when it is."""
    if not isinstance(pattern, str):
        return f"expected a regular expression as text, got {pattern!r}"
    try:
        re.compile(pattern)
    except re.error as exc:
        return f"invalid regular expression {pattern!r}: {exc}"
    return None


# --- user reward files ----------------------------------------------------------------------------


def rewards_dir(extras: Mapping[str, str], environ: Mapping[str, str] | None = None) -> Path | None:
    """Where user reward files live: --rewards_dir, else REWARDS_DIR, else TUNEFORGE_REWARDS_DIR; None: nowhere."""
    environ = os.environ if environ is None else environ
    value = extras.get("rewards_dir") or environ.get("REWARDS_DIR") or environ.get("TUNEFORGE_REWARDS_DIR")
    return Path(value).expanduser() if value else None


def _unknown(name: str, why: str) -> RewardProblem:
    builtins = ", ".join(BUILTIN_REWARDS)
    return RewardProblem(f"unknown reward function {name!r}: not a built-in ({builtins}) and {why}")


def load_user_reward(name: str, directory: Path | None) -> tuple[RewardFunc, Path]:
    """The function `name` (or `reward`) defined by <directory>/<name>.py, and that file's path."""
    if not REWARD_NAME_RE.fullmatch(name):
        raise RewardProblem(f"{name!r} is not a reward function name (lowercase letters, digits and _)")
    if directory is None:
        raise _unknown(name, f"no rewards directory is set to look for {name}.py in ({REWARDS_DIR_SOURCES})")
    root = directory.resolve()
    if not root.is_dir():
        raise _unknown(name, f"the rewards directory {root} ({REWARDS_DIR_SOURCES}) does not exist")
    path = (root / f"{name}.py").resolve()
    if not path.is_relative_to(root):  # a symlink out of the directory
        raise RewardProblem(f"reward function {name!r}: {root / (name + '.py')} leads to {path}, outside {root}")
    if not path.is_file():
        raise _unknown(name, f"there is no {name}.py in the rewards directory {root}")
    module_name = f"tuneforge_user_reward_{name}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise RewardProblem(f"reward function {name!r}: cannot load {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # pickle and dataclasses look the module up by name
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(module_name, None)
        raise RewardProblem(f"reward function {name!r}: loading {path} failed: {type(exc).__name__}: {exc}") from exc
    func = getattr(module, name, None)
    if not callable(func):
        func = getattr(module, "reward", None)
    if not callable(func):
        raise RewardProblem(f"reward function {name!r}: {path} defines no function {name}() or reward()")
    return func, path


# --- resolving names, and the wrapper TRL calls ---------------------------------------------------


def _accepted(func: RewardFunc) -> set[str] | None:
    """The keyword names func takes; None when it takes **kwargs (or its signature can't be read)."""
    try:
        parameters = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _checked(name: str, origin: str, values: Any, count: int) -> list[float | None]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise RewardFunctionError(
            f"reward function {name!r} ({origin}) returned {type(values).__name__}, not a list of numbers"
        )
    if len(values) != count:
        raise RewardFunctionError(
            f"reward function {name!r} ({origin}) returned {len(values)} rewards for {count} completions"
        )
    rewards: list[float | None] = []
    for value in values:
        number = value.item() if hasattr(value, "item") and callable(value.item) else value
        if number is not None and (isinstance(number, bool) or not isinstance(number, (int, float))):
            raise RewardFunctionError(
                f"reward function {name!r} ({origin}) returned {value!r}: each reward must be a number or None"
            )
        rewards.append(None if number is None else float(number))
    return rewards


def _is_async(func: RewardFunc) -> bool:
    while isinstance(func, functools.partial):
        func = func.func
    # A callable instance's class may carry the async __call__.
    return inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(type(func).__call__)


def named_reward(name: str, func: RewardFunc, origin: str) -> RewardFunc:
    """func as TRL calls it, logged under `name`; its failures and bad return values name it and its origin."""
    accepted = _accepted(func)

    def arguments(prompts: Any, completions: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        given = {"prompts": prompts, "completions": completions, **kwargs}
        return given if accepted is None else {k: v for k, v in given.items() if k in accepted}

    def failed(exc: Exception) -> RewardFunctionError:
        return RewardFunctionError(f"reward function {name!r} ({origin}) raised {type(exc).__name__}: {exc}")

    if _is_async(func):

        async def reward_async(prompts: Any, completions: Any, **kwargs: Any) -> list[float | None]:
            try:
                values = await func(**arguments(prompts, completions, kwargs))
            except Exception as exc:
                raise failed(exc) from exc
            return _checked(name, origin, values, len(completions))

        wrapper: RewardFunc = reward_async
    else:

        def reward(prompts: Any, completions: Any, **kwargs: Any) -> list[float | None]:
            try:
                values = func(**arguments(prompts, completions, kwargs))
            except Exception as exc:
                raise failed(exc) from exc
            return _checked(name, origin, values, len(completions))

        wrapper = reward
    wrapper.__name__ = name  # type: ignore[attr-defined]  # TRL's metric name: rewards/<name>/mean
    wrapper.__qualname__ = name  # type: ignore[attr-defined]
    return wrapper


def parse_names(value: str) -> list[str]:
    return [n.strip() for n in value.split(",") if n.strip()]


def resolve_rewards(
    names: Sequence[str], directory: Path | None, settings: RewardSettings = RewardSettings()
) -> list[RewardFunc]:
    """The reward functions for these names, wrapped (see named_reward); RewardProblem names the first bad one."""
    if settings.pattern is not None and "regex" in names:
        problem = regex_problem(settings.pattern)
        if problem:
            raise RewardProblem(f"--reward_regex: {problem}")
    functions = []
    for name in names:
        if name in BUILTIN_REWARDS:
            functions.append(named_reward(name, _builtin(name, settings), "built-in"))
        else:
            func, path = load_user_reward(name, directory)
            functions.append(named_reward(name, func, str(path)))
    return functions
