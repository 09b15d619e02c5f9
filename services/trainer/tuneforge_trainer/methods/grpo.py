"""Built-in `grpo` method: Group Relative Policy Optimization with TRL GRPOTrainer and reward functions.

    python -m tuneforge_trainer.methods.grpo --model_path=DIR --dataset_path=FILE.jsonl --output_dir=DIR \\
        [--reward_functions=accuracy,format] [--rewards_dir=DIR] [--reward_regex=PATTERN] ...

Rows: a prompt (text, or a list of messages) and the reference answer (tuneforge_trainer.data.prepare_prompts);
the dataset's other columns reach the reward functions as keyword arguments too (target_length,
answer_regex, or anything a user reward reads). For each prompt num_generations completions of at most
max_completion_length tokens are sampled at --temperature, scored by the reward functions
(tuneforge_trainer.rewards: the built-ins accuracy, format, length, regex, or <rewards_dir>/<name>.py),
and each is pushed towards the better ones of its group; beta > 0 adds a KL penalty against the starting
model (with LoRA, the base without the adapter, so no second copy is loaded).

batch_size counts completions, not prompts, as in TRL: each step takes batch_size x grad_accum_steps
completions, that is (batch_size x grad_accum_steps) / num_generations prompts, generated in one batch
(TRL's generation_batch_size and steps_per_generation defaults). The catalog's cross-field rule requires
num_generations to divide it.

Prompts longer than max_prompt_length tokens keep their last max_prompt_length tokens (after the chat
template, so the assistant header that starts the answer stays): TRL 1.16's GRPOConfig has no
max_prompt_length, so the trainer truncates the tokenized prompts itself (`_tokenize_prompts`).

Metrics per logging step, besides loss, learning_rate and grad_norm: reward and reward_std (the weighted
sum of all reward functions), rewards/<name>/mean and rewards/<name>/std for each, frac_reward_zero_std,
completions/mean_length (and min, max, clipped_ratio), entropy, and kl when beta > 0.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any

from tuneforge_common.methods import GrpoParams
from tuneforge_trainer import data, hardware, rewards, runner
from tuneforge_trainer.supervised import Built, validation_note

METHOD_ID = "grpo"
# GRPOTrainer passes these to every reward function itself; dataset columns of these names are not passed on.
RESERVED_COLUMNS = frozenset(
    {"prompt", "answer", "completion", "completion_ids", "prompts", "completions", "trainer_state"}
    | {"log_extra", "log_metric", "environments"}
)

_trainer_class: type | None = None


def trainer_class() -> type:
    """GRPOTrainer that keeps the last max_prompt_length tokens of each prompt (built on first use: imports TRL)."""
    global _trainer_class
    if _trainer_class is not None:
        return _trainer_class
    from trl import GRPOTrainer

    class PromptTruncatingGRPOTrainer(GRPOTrainer):
        max_prompt_length: int | None = None

        def _tokenize_prompts(self, prompts: list):
            prompt_ids, images, multimodal_fields = super()._tokenize_prompts(prompts)
            if self.max_prompt_length:
                prompt_ids = [ids[-self.max_prompt_length :] for ids in prompt_ids]
            return prompt_ids, images, multimodal_fields

    _trainer_class = PromptTruncatingGRPOTrainer
    return PromptTruncatingGRPOTrainer


def reward_regex(extras: dict[str, str]) -> str | None:
    """The regex reward's pattern for rows without an answer_regex: --reward_regex, else REWARD_REGEX."""
    return extras.get("reward_regex") or os.environ.get("REWARD_REGEX") or None


def reward_functions(params: GrpoParams, extras: dict[str, str]) -> list[rewards.RewardFunc]:
    """The run's reward functions, resolved before anything heavy loads; SystemExit names the problem."""
    pattern = reward_regex(extras)
    problem = rewards.regex_problem(pattern) if pattern else None
    if problem:
        raise SystemExit(f"error: --reward_regex: {problem}")
    settings = rewards.RewardSettings(default_target_length=max(1, params.max_completion_length // 2), pattern=pattern)
    try:
        return rewards.resolve_rewards(
            rewards.parse_names(params.reward_functions), rewards.rewards_dir(extras), settings
        )
    except rewards.RewardProblem as exc:
        raise SystemExit(f"error: --reward_functions: {exc}") from None


def with_other_columns(prepared, raw):
    """prepare_prompts keeps prompt and answer only; the raw rows' other columns are added back for rewards."""
    import datasets

    extra = [c for c in raw.column_names if c not in prepared.column_names and c not in RESERVED_COLUMNS]
    if not extra:
        return prepared
    return datasets.concatenate_datasets([prepared, raw.select_columns(extra)], axis=1)


def _check_regex_rows(dataset, names: list[str], pattern: str | None, path) -> None:
    if "regex" not in names:
        return
    if "answer_regex" not in dataset.column_names:
        if not pattern:
            raise data.DatasetProblem(
                "the regex reward needs an answer_regex column in the dataset or --reward_regex (REWARD_REGEX)"
            )
        return
    for i, value in enumerate(dataset["answer_regex"]):
        problem = rewards.regex_problem(value) if value else None
        if problem:
            raise data.DatasetProblem(f"{path} line {data.line_number(path, i)}: column 'answer_regex': {problem}")


def _prompt_rows(path: Path, max_samples: int, params: GrpoParams, tokenizer, cache_dir: str | None):
    """A file's prompt rows, with its other columns for the reward functions, and their format."""
    raw = data.load_rows(path, max_samples, cache_dir)
    dataset, data_format = data.prepare_prompts(raw, params, bool(tokenizer.chat_template), path)
    return with_other_columns(dataset, raw), data_format


def build(params: GrpoParams, paths: runner.RunPaths, cache_dir: str | None, extras: dict[str, str]) -> Built:
    """The GRPO trainer, ready to train; the reward functions are checked first, before the model loads."""
    funcs = reward_functions(params, extras)
    names = rewards.parse_names(params.reward_functions)

    import transformers
    from trl import GRPOConfig

    runner.quiet_libraries()
    # TRL toggles checkpointing around each generation under the names transformers 5 deprecated.
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing_(en|dis)able", category=FutureWarning)
    transformers.set_seed(params.seed)
    tokenizer = runner.load_tokenizer(paths.model)
    cuda, cuda_bf16 = runner.cuda_state()
    precision = hardware.check_hardware(params, cuda, cuda_bf16)
    try:
        dataset, data_format = _prompt_rows(paths.dataset, params.max_samples, params, tokenizer, cache_dir)
        _check_regex_rows(dataset, names, reward_regex(extras), paths.dataset)
        validation = None
        if paths.validation is not None:  # every row of it: max_samples limits the training rows
            validation, _ = _prompt_rows(paths.validation, 0, params, tokenizer, cache_dir)
            if params.batch_size % params.num_generations:
                # The rule a job with validation_ratio > 0 is checked by when submitted: TRL evaluates whole
                # groups of generations per batch.
                raise SystemExit(
                    f"error: --num_generations={params.num_generations} must divide --batch_size="
                    f"{params.batch_size} to evaluate on the validation dataset"
                )
            _check_regex_rows(validation, names, reward_regex(extras), paths.validation)
        dataset, eval_dataset = data.split_validation(dataset, params.validation_ratio, validation)
    except data.DatasetProblem as exc:
        raise SystemExit(f"error: dataset: {exc}") from None
    held_out = validation_note(eval_dataset, paths.validation)
    print(
        f"{METHOD_ID}: {len(dataset)} {data_format} rows from {paths.dataset}{held_out}; rewards {', '.join(names)}",
        file=sys.stderr,
        flush=True,
    )

    model = hardware.load_model(paths.model, params, precision)
    optimizer = None
    if params.use_lora:
        model = runner.apply_lora(model, params)
        optimizer = runner.build_optimizer(model, params)

    arguments = runner.trainer_arguments(params, precision, cuda, paths.output, eval_dataset is not None)
    # GRPOTrainer counts prompt and completion tokens itself; the Trainer's count looks for input_ids.
    arguments["include_num_input_tokens_seen"] = "no"
    config = GRPOConfig(
        **arguments,
        num_generations=params.num_generations,
        max_completion_length=params.max_completion_length,
        beta=params.beta,
        temperature=params.temperature,
        log_completions=False,  # it prints tables to stdout, which carries the log_data protocol
    )
    trainer = trainer_class()(
        reward_funcs=funcs, **runner.trainer_inputs(model, config, dataset, eval_dataset, tokenizer, optimizer)
    )
    trainer.max_prompt_length = params.max_prompt_length
    return Built(trainer, tokenizer, eval_dataset, precision, data_format, len(dataset))


def train(params: GrpoParams, extras: dict[str, str]) -> dict[str, Any]:
    paths = runner.run_paths(extras)
    return runner.train_built(
        paths,
        lambda cache_dir: build(params, paths, cache_dir, extras),
        merge=params.use_lora and params.merge_adapter,
    )


def main(argv: list[str] | None = None) -> int:
    return runner.run_main(METHOD_ID, GrpoParams, train, argv)


if __name__ == "__main__":
    raise SystemExit(main())
