"""The "Evaluate" stage: a model's (or model + adapter's) loss and perplexity on a dataset, and sample answers.

    python -m tuneforge_trainer.evaluate --model_path=DIR [--adapter_path=DIR] --dataset_path=FILE.jsonl \\
        --output_dir=OUT [--max_samples=200] [--max_seq_length=512] [--batch_size=4] [--num_generations=5] \\
        [--max_new_tokens=64] [--prompt_input_column=] [--prompt_output_column=] [--precision=auto]

Rows are read and formatted as the supervised methods train on them (tuneforge_trainer.data: chat,
prompt/completion, question/answer style, text) and tokenized as TRL's SFTTrainer does, so the loss is on the
same tokens training puts it on: assistant turns (the chat template's {% generation %} blocks, else the last
assistant turn), completions, or the whole text for text rows. Each row is cut to max_seq_length tokens.

eval_loss is the mean cross-entropy over all those tokens of all rows (each token weighs the same), perplexity
is exp(eval_loss). The first num_generations rows also get a greedy answer to their prompt (the part before the
scored answer; for text rows, the first half of the text).

Output: OUT/metrics.json ({"eval_loss", "perplexity", "eval_samples", "eval_tokens", "skipped_rows",
"data_format", ...}) and OUT/generations.jsonl (one {"prompt", "reference", "generated"} a line). Progress:
`[log_data]` lines as batches are scored and answers generated, then progress 100 with details
{"eval_loss", "perplexity", "eval_samples", "eval_tokens"}.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneforge_common.methods import param
from tuneforge_common.operations import EvaluateParams as EvaluateSettings
from tuneforge_trainer import lifecycle
from tuneforge_trainer.lifecycle import Failure, UsageError, log, required
from tuneforge_trainer.sdk import log_data

LOSS_SHARE = 80.0  # percent of the progress for scoring; the rest for generating


@dataclass(frozen=True, kw_only=True)
class EvaluateParams(EvaluateSettings):
    """Evaluate a model on a dataset: loss, perplexity and sample generations (the settings a user gives are
    tuneforge_common.operations.EvaluateParams; the agent adds the paths)."""

    model_path: str = required("The model directory (a base or a merged model).")
    dataset_path: str = required("The JSON-lines dataset to evaluate on (the supervised methods' formats).")
    output_dir: str = required("Where metrics.json and generations.jsonl are written.")
    adapter_path: str = param("", "A LoRA adapter directory to apply to the model; empty for none.")


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # -100 where the loss is not taken
    prompt_ids: list[int]  # what a generation starts from
    prompt: str  # shown in generations.jsonl
    reference: str


# --- rows to examples -----------------------------------------------------------------------------


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _chat_ids(tokenizer: Any, messages: list[dict[str, str]], **kwargs: Any) -> dict[str, Any]:
    return dict(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs))


def _last_user_text(messages: list[dict[str, str]]) -> str:
    users = [m["content"] for m in messages if m["role"] == "user"]
    return users[-1] if users else (messages[-1]["content"] if messages else "")


def _prompt_completion(tokenizer: Any, prompt: Any, completion: Any) -> Example:
    """Loss on the completion: where the tokenized prompt and prompt + completion part (TRL's rule)."""
    if isinstance(prompt, list):
        prompt_ids = _chat_ids(tokenizer, prompt, add_generation_prompt=True)["input_ids"]
        ids = _chat_ids(tokenizer, prompt + completion)["input_ids"]
        shown, reference = _last_user_text(prompt), "".join(m["content"] for m in completion)
    else:
        eos = tokenizer.eos_token or ""
        prompt_ids = tokenizer(text=prompt)["input_ids"]
        ids = tokenizer(text=prompt + (completion if completion.endswith(eos) else completion + eos))["input_ids"]
        shown, reference = prompt, completion
    start = _common_prefix(prompt_ids, ids)
    return Example(ids, [-100] * start + ids[start:], prompt_ids, shown, reference)


def _chat(tokenizer: Any, messages: list[dict[str, str]], marked: bool) -> Example | None:
    """Loss on every assistant turn when the template marks them ({% generation %}), else on the last one."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    if last <= 0:
        return None  # nothing to score: training skips such rows too
    if not marked:
        return _prompt_completion(tokenizer, messages[:last], [messages[last]])
    encoded = _chat_ids(tokenizer, messages, return_assistant_tokens_mask=True)
    ids, mask = encoded["input_ids"], encoded["assistant_masks"]
    labels = [token if keep else -100 for token, keep in zip(ids, mask, strict=False)]
    prompt_ids = _chat_ids(tokenizer, messages[:last], add_generation_prompt=True)["input_ids"]
    return Example(ids, labels, prompt_ids, _last_user_text(messages[:last]), messages[last]["content"])


def _text(tokenizer: Any, text: str) -> Example:
    eos = tokenizer.eos_token or ""
    ids = tokenizer(text=text if text.endswith(eos) else text + eos)["input_ids"]
    plain = tokenizer(text=text)["input_ids"]
    half = max(1, len(plain) // 2)
    return Example(
        ids,
        list(ids),
        plain[:half],
        tokenizer.decode(plain[:half], skip_special_tokens=True),
        tokenizer.decode(plain[half:], skip_special_tokens=True),
    )


def to_examples(rows: list[dict[str, Any]], data_format: str, tokenizer: Any) -> list[Example | None]:
    """One Example per row (None for a row with nothing to score), in the file's order."""
    template = tokenizer.chat_template or ""
    marked = "{% generation %}" in template or "{%- generation %}" in template
    examples: list[Example | None] = []
    for row in rows:
        if data_format == "chat":
            examples.append(_chat(tokenizer, row["messages"], marked))
        elif data_format == "text":
            examples.append(_text(tokenizer, row["text"]))
        else:  # prompt-completion, and question/answer rows prepare_dataset turned into it
            examples.append(_prompt_completion(tokenizer, row["prompt"], row["completion"]))
    return examples


def read_examples(params: EvaluateParams, path: Path, tokenizer: Any) -> tuple[list[Example | None], str]:
    from tuneforge_trainer import data

    try:
        with tempfile.TemporaryDirectory(prefix="tuneforge-datasets-") as cache_dir:
            dataset = data.load_rows(path, params.max_samples, cache_dir)
            dataset, data_format = data.prepare_dataset(dataset, params, bool(tokenizer.chat_template), path)
            rows = dataset.to_list()
    except data.DatasetProblem as exc:
        raise Failure(f"--dataset_path: {str(exc).removeprefix(f'{path} ')}") from None
    if data_format == "chat" and not tokenizer.chat_template:
        raise Failure("--dataset_path: chat ('messages') rows need a chat template and this model has none")
    return to_examples(rows, data_format, tokenizer), data_format


# --- scoring and generating -----------------------------------------------------------------------


def score(model: Any, examples: list[Example], params: EvaluateParams, pad_id: int) -> tuple[float, int]:
    """(sum of token losses, tokens scored): the model predicts each labelled token from the ones before it."""
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    total_loss, total_tokens = 0.0, 0
    for start in range(0, len(examples), params.batch_size):
        batch = examples[start : start + params.batch_size]
        width = max(len(e.input_ids) for e in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, example in enumerate(batch):
            n = len(example.input_ids)
            ids[i, :n] = torch.tensor(example.input_ids)
            labels[i, :n] = torch.tensor(example.labels)
            mask[i, :n] = 1
        with torch.inference_mode():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        targets = labels[:, 1:].to(device)
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
        )
        total_loss += float(loss)
        total_tokens += int((targets != -100).sum())
        done = start + len(batch)
        log_data(
            LOSS_SHARE * done / len(examples),
            stage="scoring",
            rows=done,
            eval_loss=total_loss / total_tokens if total_tokens else None,
        )
    return total_loss, total_tokens


def generate(model: Any, tokenizer: Any, examples: list[Example], params: EvaluateParams) -> list[dict[str, str]]:
    import torch

    device = next(model.parameters()).device
    eos = model.generation_config.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    results = []
    for i, example in enumerate(examples):
        ids = torch.tensor([example.prompt_ids[-params.max_seq_length :]], device=device)
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=params.max_new_tokens,
                eos_token_id=eos,
                pad_token_id=pad,
            )
        generated = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        results.append({"prompt": example.prompt, "reference": example.reference, "generated": generated})
        # Below 100 until the final report.
        log_data(LOSS_SHARE + (99 - LOSS_SHARE) * (i + 1) / len(examples), stage="generating", generations=i + 1)
    return results


def write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def evaluate(params: EvaluateParams) -> None:
    from tuneforge_trainer import runner

    model_path = lifecycle.model_dir("model_path", params.model_path)
    adapter = lifecycle.adapter_dir("adapter_path", params.adapter_path)
    dataset = Path(params.dataset_path)
    if not dataset.is_file():
        raise UsageError(f"--dataset_path={params.dataset_path}: no such file")
    if not params.output_dir:
        raise UsageError("--output_dir: needs a directory")
    out = Path(params.output_dir)
    cuda, cuda_bf16 = runner.cuda_state()
    precision = lifecycle.inference_precision(params.precision, cuda, cuda_bf16)
    if params.precision == "auto" and precision == "fp16":
        precision = "fp32"  # a loss is compared across runs: no fp16 unless asked
    runner.quiet_libraries()

    log_data(0, stage="reading dataset")
    tokenizer = runner.load_tokenizer(lifecycle.tokenizer_dir(adapter, model_path))
    all_examples, data_format = read_examples(params, dataset, tokenizer)
    examples: list[Example] = []
    for example in all_examples:
        if example is None:
            continue
        example.input_ids = example.input_ids[: params.max_seq_length]
        example.labels = example.labels[: params.max_seq_length]
        if any(label != -100 for label in example.labels[1:]):
            examples.append(example)
    skipped = len(all_examples) - len(examples)
    if not examples:
        raise Failure(
            f"--dataset_path: none of its {len(all_examples)} rows has a token to score within "
            f"max_seq_length={params.max_seq_length} (no assistant turn or completion, or a prompt that long)"
        )
    log(
        f"evaluate: {len(examples)} {data_format} rows from {dataset}"
        + (f", {skipped} without tokens to score" if skipped else "")
    )

    model, tokenizer = lifecycle.load_for_inference(model_path, adapter, precision, "cuda" if cuda else "cpu")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total_loss, tokens = score(model, examples, params, pad_id)
    loss = total_loss / tokens
    perplexity = math.exp(loss) if loss < 700 else math.inf
    generations = generate(model, tokenizer, examples[: params.num_generations], params)

    metrics = {
        "eval_loss": loss,
        "perplexity": perplexity if math.isfinite(perplexity) else "inf",
        "eval_samples": len(examples),
        "eval_tokens": tokens,
        "skipped_rows": skipped,
        "data_format": data_format,
        "model_path": str(model_path),
        "adapter_path": str(adapter) if adapter is not None else None,
        "dataset_path": str(dataset),
        "precision": precision,
    }
    out.mkdir(parents=True, exist_ok=True)
    write_atomically(out / "generations.jsonl", "".join(json.dumps(g, ensure_ascii=False) + "\n" for g in generations))
    write_atomically(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    log(f"evaluate: eval_loss {loss:.4f}, perplexity {perplexity:.4g} over {tokens} tokens; written to {out}")
    log_data(100, eval_loss=loss, perplexity=perplexity, eval_samples=len(examples), eval_tokens=tokens)


def main(argv: list[str] | None = None) -> int:
    return lifecycle.run_program("evaluate", EvaluateParams, evaluate, argv)


if __name__ == "__main__":
    raise SystemExit(main())
