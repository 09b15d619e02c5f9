"""Dataset rows for the built-in methods: read, checked with the line named, normalised to TRL's formats.

Supervised rows (sft, sft-lora, qlora), detected from the columns:
  * chat: {"messages": [{"role": ..., "content": ...}, ...]}, rendered with the model's chat template;
  * prompt/completion: {"prompt": ..., "completion": ...}, passed to TRL as is (loss on the completion);
  * question/answer style: columns named by --prompt_input_column/--prompt_output_column, or detected
    among question/instruction/query/input/prompt and answer/response/output/completion; turned into a
    one-turn chat (user/assistant) when the tokenizer has a chat template, plain text otherwise;
  * language modelling: {"text": ...}.
Preference rows (dpo): prompt (optional when chosen/rejected are whole conversations), chosen, rejected.
Prompt rows (grpo): a prompt and the reference answer the reward functions compare against.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from tuneforge_trainer.sdk import ANSWER_COLUMNS, PROMPT_COLUMNS

# The column names a prompt/answer pair is looked for under: the same for the built-ins and the SDK's readers.
PROMPT_CANDIDATES = PROMPT_COLUMNS
ANSWER_CANDIDATES = ANSWER_COLUMNS
# The validation rows depend only on the dataset (and max_samples), not on --seed, so runs that differ in
# seed or hyperparameters are evaluated on the same rows and their eval_loss can be compared.
VALIDATION_SPLIT_SEED = 1234


class DatasetProblem(Exception):
    """A user-facing problem with the dataset file; the message names the line and column."""


def line_number(path: Path, row_index: int) -> int:
    """1-based file line of the row_index-th JSON row (blank lines are not rows)."""
    seen = -1
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                seen += 1
                if seen == row_index:
                    return number
    return row_index + 1


def _first_bad_line(path: Path) -> str | None:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                return f"{path} line {number}: invalid JSON ({exc})"
            if not isinstance(row, dict):
                return f"{path} line {number}: expected a JSON object, got {type(row).__name__}"
    return None


def load_rows(path: Path, max_samples: int, cache_dir: str | None = None):
    import datasets

    if not path.is_file():
        raise DatasetProblem(f"dataset file not found: {path}")
    try:
        dataset = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=cache_dir)
    except Exception as exc:  # the json builder's errors do not name the line; find it ourselves
        raise DatasetProblem(_first_bad_line(path) or f"cannot read {path} as JSON lines: {exc}") from exc
    if len(dataset) == 0:
        raise DatasetProblem(f"{path} holds no rows")
    if max_samples > 0 and len(dataset) > max_samples:
        dataset = dataset.select(range(max_samples))
    return dataset


def _text(value: Any) -> str | None:
    if isinstance(value, str):
        return value if value.strip() else None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return None


def _pick(columns: list[str], explicit: str, candidates: tuple[str, ...], what: str) -> str:
    if explicit:
        if explicit not in columns:
            raise DatasetProblem(f"{what} column {explicit!r} not found; the dataset has {', '.join(columns)}")
        return explicit
    for name in candidates:
        if name in columns:
            return name
    raise DatasetProblem(
        f"no {what} column: expected one of {', '.join(candidates)} (or set "
        f"--prompt_{'input' if what == 'prompt' else 'output'}_column); "
        f"the dataset has {', '.join(columns)}"
    )


def _check_messages(value: Any) -> str | None:
    if not isinstance(value, list) or not value:
        return "'messages' must be a non-empty list of {role, content} objects"
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            return f"messages[{i}] has no 'role'"
        if not isinstance(message.get("content"), str):
            return f"messages[{i}] ('{message['role']}') has no text 'content'"
    return None


def _clean_messages(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    # pyarrow adds the keys other rows' messages have as None; the chat template must see clean dicts.
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _fail(path: Path, index: int, problem: str) -> DatasetProblem:
    return DatasetProblem(f"{path} line {line_number(path, index)}: {problem}")


def _prompt_answer_columns(columns: list[str], input_column: str, output_column: str) -> tuple[str, str]:
    prompt_col = _pick(columns, input_column, PROMPT_CANDIDATES, "prompt")
    answer_col = _pick(columns, output_column, ANSWER_CANDIDATES, "answer")
    if prompt_col == answer_col:
        raise DatasetProblem(f"prompt and answer columns are both {prompt_col!r}")
    return prompt_col, answer_col


def prepare_dataset(dataset, params: Any, has_chat_template: bool, path: Path):
    """Normalise supervised rows to one of TRL's formats (messages / prompt+completion / text); describe it."""
    columns = list(dataset.column_names)
    explicit = params.prompt_input_column or params.prompt_output_column
    if not explicit and "messages" in columns:
        for i, value in enumerate(dataset["messages"]):
            problem = _check_messages(value)
            if problem:
                raise _fail(path, i, problem)
        dataset = dataset.select_columns(["messages"]).map(lambda row: {"messages": _clean_messages(row["messages"])})
        return dataset, "chat"
    if not explicit and "prompt" in columns and "completion" in columns:
        for i, row in enumerate(dataset.select_columns(["prompt", "completion"])):
            for key in ("prompt", "completion"):
                if not isinstance(row[key], (str, list)) or not row[key]:
                    raise _fail(path, i, f"column {key!r} is missing or empty")
        return dataset.select_columns(["prompt", "completion"]), "prompt-completion"
    if not explicit and "text" in columns and not any(c in columns for c in PROMPT_CANDIDATES):
        for i, value in enumerate(dataset["text"]):
            if _text(value) is None:
                raise _fail(path, i, "column 'text' is missing or empty")
        return dataset.select_columns(["text"]), "text"

    if not explicit and not any(c in columns for c in PROMPT_CANDIDATES):
        raise DatasetProblem(
            f"cannot tell the row format from the columns {', '.join(columns)}: expected 'messages' (chat), "
            f"'prompt' and 'completion', 'text', or a prompt/answer pair ({'/'.join(PROMPT_CANDIDATES)} and "
            f"{'/'.join(ANSWER_CANDIDATES)}, or name them with --prompt_input_column/--prompt_output_column)"
        )
    prompt_col, answer_col = _prompt_answer_columns(columns, params.prompt_input_column, params.prompt_output_column)
    # Alpaca-style rows keep their optional `input` as context under the instruction.
    alpaca = prompt_col == "instruction" and "input" in columns and answer_col != "input"
    context_col = "input" if alpaca else None
    rows: list[dict[str, Any]] = []
    for i, row in enumerate(dataset):
        prompt, answer = _text(row.get(prompt_col)), _text(row.get(answer_col))
        if prompt is None:
            raise _fail(path, i, f"column {prompt_col!r} is missing or empty")
        if answer is None:
            raise _fail(path, i, f"column {answer_col!r} is missing or empty")
        context = _text(row.get(context_col)) if context_col else None
        if context:
            prompt = f"{prompt}\n\n{context}"
        if has_chat_template:
            rows.append(
                {
                    "prompt": [{"role": "user", "content": prompt}],
                    "completion": [{"role": "assistant", "content": answer}],
                }
            )
        else:
            rows.append({"prompt": prompt + "\n", "completion": answer})
    import datasets

    return datasets.Dataset.from_list(rows), f"{prompt_col}/{answer_col}"


def chat_as_prompt_completion(dataset):
    """Chat rows as prompt (every turn before the last assistant turn) + completion (that turn).

    For chat templates without {% generation %} markers, which TRL's assistant_only_loss needs: the loss
    then falls on the last assistant turn only. Rows without an assistant turn have nothing to learn.
    """

    def split(row: dict[str, Any]) -> dict[str, Any]:
        messages = row["messages"]
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
        if last <= 0:
            return {"prompt": None, "completion": None}
        return {"prompt": messages[:last], "completion": [messages[last]]}

    converted = dataset.map(split, remove_columns=["messages"])
    return converted.filter(lambda row: row["prompt"] is not None)


def split_validation(dataset, ratio: float, validation=None):
    """(train, validation): the job's own validation rows (from --validation_dataset_path) when it has them,
    else `ratio` of the rows held out (at least one) by a fixed seed; validation None when neither."""
    if validation is not None:
        if ratio > 0:
            raise DatasetProblem(
                f"--validation_ratio={ratio} holds out training rows for validation while --validation_dataset_path "
                "gives the validation rows; set validation_ratio to 0 or leave out the validation dataset"
            )
        return dataset, validation
    if ratio <= 0:
        return dataset, None
    held_out = max(1, round(len(dataset) * ratio))
    if held_out >= len(dataset):
        raise DatasetProblem(
            f"--validation_ratio={ratio} leaves no training rows out of {len(dataset)}; "
            "use more rows or a smaller ratio"
        )
    split = dataset.train_test_split(test_size=held_out, shuffle=True, seed=VALIDATION_SPLIT_SEED)
    return split["train"], split["test"]


def check_same_shape(validation, dataset, validation_format: str, data_format: str, path: Path) -> None:
    """Supervised validation rows are scored as the training rows are (the loss flags follow the training rows'
    shape: chat, prompt/completion or text), so both must come out in the same shape."""
    if sorted(validation.column_names) != sorted(dataset.column_names):
        raise DatasetProblem(
            f"validation dataset {path} holds {validation_format} rows but the training dataset {data_format} rows; "
            "give both in one format"
        )


# --- fill-in-the-middle (Mistral's fim_ratio) --------------------------------------------------------

# Spellings of the FIM sentinels in common code-model tokenizers (Qwen2.5-Coder/StarCoder2, StarCoder, CodeLlama).
FIM_TOKEN_SETS = (
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),
    ("<PRE>", "<SUF>", "<MID>"),
)


def fim_tokens(tokenizer) -> tuple[tuple[str, str, str], bool]:
    """The tokenizer's FIM sentinels, and whether they had to be added (the embeddings then grow)."""
    vocab = tokenizer.get_vocab()
    for tokens in FIM_TOKEN_SETS:
        if all(t in vocab for t in tokens):
            return tokens, False
    tokens = FIM_TOKEN_SETS[0]
    tokenizer.add_special_tokens({"additional_special_tokens": list(tokens)}, replace_extra_special_tokens=False)
    return tokens, True


def fim_transform(dataset, ratio: float, tokens: tuple[str, str, str], seed: int):
    """That share of text rows reordered as prefix-suffix-middle (PSM) around two random cut points.

    The model then learns to write the middle given what comes before and after, as code completion in an
    editor asks. Which rows and where they are cut follow --seed, so a run can be repeated.
    """
    if ratio <= 0:
        return dataset, 0
    prefix_token, suffix_token, middle_token = tokens
    rng = random.Random(seed)
    picks = [rng.random() < ratio for _ in range(len(dataset))]
    cuts = [sorted((rng.random(), rng.random())) for _ in range(len(dataset))]

    def transform(row: dict[str, Any], index: int) -> dict[str, Any]:
        text = row["text"]
        if not picks[index] or len(text) < 3:
            return row
        a, b = (int(c * len(text)) for c in cuts[index])
        prefix, middle, suffix = text[:a], text[a:b], text[b:]
        return {"text": f"{prefix_token}{prefix}{suffix_token}{suffix}{middle_token}{middle}"}

    return dataset.map(transform, with_indices=True), sum(picks)


# --- preference rows (dpo) ------------------------------------------------------------------------


def _text_or_messages(value: Any) -> bool:
    if isinstance(value, str):
        return bool(value.strip())
    return _check_messages(value) is None


def prepare_preference(dataset, path: Path):
    """prompt/chosen/rejected rows (text or message lists) as TRL's DPOTrainer takes them."""
    columns = list(dataset.column_names)
    missing = [c for c in ("chosen", "rejected") if c not in columns]
    if missing:
        raise DatasetProblem(
            f"preference rows need 'chosen' and 'rejected' columns (and usually 'prompt'); the dataset has "
            f"{', '.join(columns)}"
        )
    keep = [c for c in ("prompt", "chosen", "rejected") if c in columns]
    for i, row in enumerate(dataset.select_columns(keep)):
        for key in keep:
            if not _text_or_messages(row[key]):
                raise _fail(path, i, f"column {key!r} is missing, empty or not text / a list of messages")
        if row["chosen"] == row["rejected"]:
            raise _fail(path, i, "'rejected' is identical to 'chosen', so the pair teaches nothing")

    def clean(row: dict[str, Any]) -> dict[str, Any]:
        return {k: _clean_messages(v) if isinstance(v, list) else v for k, v in row.items()}

    return dataset.select_columns(keep).map(clean), "/".join(keep)


# --- prompt rows (grpo) ---------------------------------------------------------------------------


def prepare_prompts(dataset, params: Any, has_chat_template: bool, path: Path):
    """{"prompt", "answer"} rows: the prompt the policy completes, the reference answer rewards compare with.

    A chat prompt (a list of messages) is kept; a text prompt becomes one user turn when the tokenizer has
    a chat template.
    """
    columns = list(dataset.column_names)
    if "prompt" in columns and not params.prompt_input_column:
        prompt_col = "prompt"
        answer_col = _pick(
            columns, params.prompt_output_column, tuple(c for c in ANSWER_CANDIDATES if c != "completion"), "answer"
        )
    else:
        prompt_col, answer_col = _prompt_answer_columns(
            columns, params.prompt_input_column, params.prompt_output_column
        )
    rows: list[dict[str, Any]] = []
    for i, row in enumerate(dataset):
        prompt, answer = row.get(prompt_col), _text(row.get(answer_col))
        if isinstance(prompt, list):
            problem = _check_messages(prompt)
            if problem:
                raise _fail(path, i, problem.replace("'messages'", f"column {prompt_col!r}"))
            prompt = _clean_messages(prompt)
        elif _text(prompt) is None:
            raise _fail(path, i, f"column {prompt_col!r} is missing or empty")
        elif has_chat_template:
            prompt = [{"role": "user", "content": _text(prompt)}]
        if answer is None:
            raise _fail(path, i, f"column {answer_col!r} is missing or empty")
        rows.append({"prompt": prompt, "answer": answer})
    import datasets

    return datasets.Dataset.from_list(rows), f"{prompt_col}/{answer_col}"
