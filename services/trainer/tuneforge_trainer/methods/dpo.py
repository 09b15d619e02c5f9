"""Built-in `dpo` method: Direct Preference Optimization with TRL DPOTrainer.

    python -m tuneforge_trainer.methods.dpo --model_path=DIR --dataset_path=FILE.jsonl --output_dir=DIR \\
        [--resume_from_checkpoint=DIR] [--beta=0.1 --loss_type=sigmoid --max_prompt_length=512 ...]

Rows: prompt/chosen/rejected, each text or a list of {role, content} messages (tuneforge_trainer.data).
Message rows are rendered with the model's chat template (TRL does it). Without a prompt column, or with
a text prompt beside whole conversations (UltraFeedback's shape), the prompt is the turns chosen and
rejected both begin with; a text prompt beside assistant-only replies becomes one user turn, and text
replies beside a message prompt become assistant turns. Text rows stay text (TRL appends EOS); a text
prompt that would run straight into its replies gets a newline after it, as sft's question/answer rows do.

What each parameter does here:
  * use_lora=true (default): a LoRA adapter (runner.apply_lora); the reference model is the same model
    with the adapter disabled, so nothing is copied. use_lora=false trains every weight against a frozen
    reference copy of the model, which TRL loads.
  * beta, loss_type: DPOConfig's (exo_pair gets label_smoothing 1e-3, the EXO paper's value: TRL refuses 0).
  * max_seq_length: DPOConfig.max_length, prompt plus reply; a longer pair loses the end of its reply.
  * max_prompt_length: TRL 1.16 dropped it, so prompts are cut here before TRL sees them, keeping their
    end (the tokens right before the reply). A text prompt keeps its last max_prompt_length tokens (as
    this tokenizer counts them, special tokens included). A chat prompt, counted as rendered with the
    generation prompt, loses its oldest turns first, keeping a leading system message; when the last
    turn alone is still too long, only that turn is kept (without the system message) and its text
    loses its beginning.
  * prompt_input_column: the prompt column when it is not 'prompt' (prompt_output_column does not apply).
  * lora_dropout: honoured. TRL zeroes every dropout for DPO; here only the base model's are zeroed, the
    adapter's dropout stays as asked.
  * loraplus_lr_ratio: runner.build_optimizer. merge_adapter: runner.train_and_finish.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tuneforge_common.methods import DpoParams
from tuneforge_trainer import data, hardware, runner, supervised

METHOD_ID = "dpo"
# TRL refuses exo_pair without label smoothing; the EXO paper recommends 1e-3.
EXO_LABEL_SMOOTHING = 1e-3

Message = dict[str, str]
Prompt = str | list[Message]


@dataclasses.dataclass
class Built(supervised.Built):
    prompts_cut: int = 0


# --- rows -----------------------------------------------------------------------------------------


def _shared_turns(chosen: list[Message], rejected: list[Message]) -> int:
    """How many leading messages chosen and rejected share, leaving each at least one of its own."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1
    return shared


def _shared_text(chosen: str, rejected: str) -> int:
    """The length of the text chosen and rejected both begin with (as TRL's extract_prompt: a space before
    the first difference goes with the replies), leaving each at least one character of its own."""
    limit = min(len(chosen), len(rejected)) - 1
    shared = 0
    while shared < limit and chosen[shared] == rejected[shared]:
        shared += 1
    if shared > 0 and chosen[shared - 1] == " ":
        shared -= 1
    return shared


def _preference_row(row: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """(prompt, chosen, rejected) all text or all messages, with an explicit prompt; or (None, the problem)."""
    chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt")
    chat = isinstance(chosen, list)
    if chat != isinstance(rejected, list):
        return None, "'chosen' and 'rejected' must both be text or both be lists of messages"
    if chat:
        shared = _shared_turns(chosen, rejected)
        if prompt is None or (isinstance(prompt, str) and shared > 0):
            # The prompt is the conversations' shared beginning (a text prompt beside them is a copy of it).
            if shared == 0:
                return None, (
                    "no 'prompt' column, and 'chosen' and 'rejected' do not begin with the same turns, so there "
                    "is no prompt to answer: add a 'prompt' column"
                )
            prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
        elif isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
    elif prompt is None:
        shared = _shared_text(chosen, rejected)
        if shared == 0:
            return None, (
                "no 'prompt' column, and 'chosen' and 'rejected' do not begin with the same text, so there is "
                "no prompt to answer: add a 'prompt' column"
            )
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    elif isinstance(prompt, list):
        chosen = [{"role": "assistant", "content": chosen}]
        rejected = [{"role": "assistant", "content": rejected}]
    elif not prompt[-1].isspace() and not (chosen[0].isspace() and rejected[0].isspace()):
        prompt += "\n"  # "Why?" + "Because." would run together
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}, ""


def preference_rows(dataset, path: Path, prompt_column: str = "") -> tuple[list[dict[str, Any]], str]:
    """Checked rows with an explicit prompt and one kind per row, and that kind: chat or text.

    prompt_column (--prompt_input_column) names the prompt column when it is not 'prompt'. DatasetProblem
    names the file line of the first bad row.
    """
    columns = list(dataset.column_names)
    if prompt_column and prompt_column != "prompt":
        if prompt_column not in columns:
            raise data.DatasetProblem(
                f"prompt column {prompt_column!r} not found; the dataset has {', '.join(columns)}"
            )
        dataset = dataset.remove_columns([c for c in ("prompt",) if c in columns]).rename_column(
            prompt_column, "prompt"
        )
    prepared, _columns = data.prepare_preference(dataset, path)
    rows: list[dict[str, Any]] = []
    for i, row in enumerate(prepared):
        fixed, problem = _preference_row(row)
        if fixed is None:
            raise data.DatasetProblem(f"{path} line {data.line_number(path, i)}: {problem}")
        rows.append(fixed)
    # A JSON column holds one kind (the loader refuses a mix), so the first row tells them all.
    return rows, "chat" if isinstance(rows[0]["prompt"], list) else "text"


# --- max_prompt_length ----------------------------------------------------------------------------


def _keep_end(text: str, tokenizer, fits: Callable[[str], bool]) -> str:
    """The longest end of `text`, cut at a token boundary, that `fits` accepts ("" when none)."""
    if tokenizer.is_fast:  # cut the text itself at token starts: exactly an end of it
        starts = [
            s for s, _ in tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        ]
        tokens = len(starts)

        def tail(k: int) -> str:
            return text[starts[-k] :] if k else ""
    else:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        tokens = len(ids)

        def tail(k: int) -> str:
            return tokenizer.decode(ids[-k:]) if k else ""

    low, high = 0, tokens  # largest k whose tail fits; the token count grows with k
    while low < high:
        middle = (low + high + 1) // 2
        if fits(tail(middle)):
            low = middle
        else:
            high = middle - 1
    return tail(low)


def _fit_chat(messages: list[Message], count: Callable[[list[Message]], int], limit: int, tokenizer) -> list[Message]:
    system = messages[:1] if messages[0]["role"] == "system" and len(messages) > 1 else []
    turns = messages[len(system) :]
    # The oldest turns go first; a shorter conversation starts on a user turn (some templates insist).
    for start in range(1, len(turns)):
        if turns[start]["role"] == "assistant" and start < len(turns) - 1:
            continue
        if count(system + turns[start:]) <= limit:
            return system + turns[start:]
    last = turns[-1]

    def alone(content: str) -> list[Message]:
        return [{"role": last["role"], "content": content}]

    if count(alone("")) > limit:
        raise SystemExit(
            f"error: --max_prompt_length={limit}: the chat template alone takes {count(alone(''))} tokens for one "
            "message; raise max_prompt_length"
        )
    return alone(_keep_end(last["content"], tokenizer, lambda content: count(alone(content)) <= limit))


def fit_prompts(rows: list[dict[str, Any]], tokenizer, limit: int, path: Path) -> int:
    """Cut, in place, each prompt longer than `limit` tokens, keeping its end (see the module doc); how many."""

    def count_text(text: str) -> int:
        return len(tokenizer(text)["input_ids"])  # as TRL tokenizes a text prompt

    def count_chat(messages: list[Message]) -> int:
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        return len(rendered["input_ids"])

    cut = 0
    for i, row in enumerate(rows):
        prompt: Prompt = row["prompt"]
        try:
            if isinstance(prompt, list):
                if count_chat(prompt) > limit:
                    row["prompt"] = _fit_chat(prompt, count_chat, limit, tokenizer)
                    cut += 1
            elif count_text(prompt) > limit:
                row["prompt"] = _keep_end(prompt, tokenizer, lambda text: count_text(text) <= limit)
                cut += 1
        except Exception as exc:  # a chat template that refuses the conversation (roles, order, ...)
            raise data.DatasetProblem(
                f"{path} line {data.line_number(path, i)}: the model's chat template cannot render the prompt: "
                f"{type(exc).__name__}: {exc}"
            ) from None
    return cut


# --- trainer --------------------------------------------------------------------------------------


def _zero_base_dropout(model) -> None:
    """TRL's disable_dropout, except the LoRA layers' own dropout (lora_dropout)."""
    import torch

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout) and ".lora_dropout." not in f"{name}.":
            module.p = 0.0


def _check_head_not_targeted(model, params: Any) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    if isinstance(model.get_output_embeddings(), BaseTunerLayer):
        raise SystemExit(
            f"error: --target_modules={params.target_modules}: DPO cannot train LoRA on the output head "
            "(TRL computes log-probabilities from its weight directly); leave lm_head out"
        )


@contextlib.contextmanager
def _dataset_problems_exit() -> Iterator[None]:
    try:
        yield
    except data.DatasetProblem as exc:
        raise SystemExit(f"error: dataset: {exc}") from None


def build(params: Any, paths: runner.RunPaths, cache_dir: str | None) -> Built:
    """The DPOTrainer for these parameters, built but not trained."""
    import datasets
    import transformers

    if params.prompt_output_column:
        raise SystemExit(
            f"error: --prompt_output_column={params.prompt_output_column}: preference rows have two answers, "
            "'chosen' and 'rejected', so it does not apply; leave it empty"
        )
    runner.quiet_libraries()
    with _dataset_problems_exit():  # checked first: no torch, transformers or trl is imported for it
        loaded = data.load_rows(paths.dataset, params.max_samples, cache_dir)
        rows, data_format = preference_rows(loaded, paths.dataset, params.prompt_input_column)
        validation_rows = None
        if paths.validation is not None:  # every row of it: max_samples limits the training rows
            loaded = data.load_rows(paths.validation, 0, cache_dir)
            # Each row is its own conversation or text to TRL: the two files need not share a kind.
            validation_rows, _ = preference_rows(loaded, paths.validation, params.prompt_input_column)
    tokenizer = runner.load_tokenizer(paths.model)
    cuda, cuda_bf16 = runner.cuda_state()
    precision = hardware.check_hardware(params, cuda, cuda_bf16)
    if data_format == "chat" and not tokenizer.chat_template:
        raise SystemExit(f"error: {paths.model} has no chat template, so message rows cannot be used")
    with _dataset_problems_exit():
        prompts_cut = fit_prompts(rows, tokenizer, params.max_prompt_length, paths.dataset)
        validation = None
        if validation_rows is not None and paths.validation is not None:
            fit_prompts(validation_rows, tokenizer, params.max_prompt_length, paths.validation)
            validation = datasets.Dataset.from_list(validation_rows)
        dataset, eval_dataset = data.split_validation(
            datasets.Dataset.from_list(rows), params.validation_ratio, validation
        )
    held_out = supervised.validation_note(eval_dataset, paths.validation)
    cut = f", {prompts_cut} prompts cut to their last {params.max_prompt_length} tokens" if prompts_cut else ""
    print(
        f"{METHOD_ID}: {len(dataset)} {data_format} preference rows from {paths.dataset}{held_out}{cut}",
        file=sys.stderr,
        flush=True,
    )

    from trl import DPOConfig, DPOTrainer  # imports peft too: only once the rows are known to be good

    transformers.set_seed(params.seed)  # the LoRA matrices' initialisation follows --seed too
    model = hardware.load_model(paths.model, params, precision)
    optimizer = None
    if params.use_lora:
        # Wrapped here rather than by DPOTrainer(peft_config=...) so the LoRA+ optimizer can see the adapter.
        model = runner.apply_lora(model, params)
        _check_head_not_targeted(model, params)
        _zero_base_dropout(model)
        optimizer = runner.build_optimizer(model, params)

    config = DPOConfig(
        **runner.trainer_arguments(params, precision, cuda, paths.output, eval_dataset is not None),
        max_length=params.max_seq_length,
        beta=params.beta,
        loss_type=[params.loss_type],
        label_smoothing=EXO_LABEL_SMOOTHING if params.loss_type == "exo_pair" else 0.0,
        # With LoRA the base model's dropout is already off and the adapter's stays as asked.
        disable_dropout=not params.use_lora,
    )
    trainer = DPOTrainer(**runner.trainer_inputs(model, config, dataset, eval_dataset, tokenizer, optimizer))
    if params.use_lora and "ref" in model.peft_config:
        # Given a PeftModel, TRL adds a "ref" adapter copied from ours; freshly initialised (lora_B = 0) that is
        # the base model itself, which TRL uses when no "ref" adapter exists (adapters disabled). Dropped, so it
        # is neither kept in memory nor saved beside the trained adapter.
        model.delete_adapter("ref")
    return Built(trainer, tokenizer, eval_dataset, precision, data_format, len(dataset), prompts_cut)


def train(params: DpoParams, extras: dict[str, str]) -> dict[str, Any]:
    paths = runner.run_paths(extras)
    return runner.train_built(
        paths, lambda cache_dir: build(params, paths, cache_dir), merge=params.use_lora and params.merge_adapter
    )


def main(argv: list[str] | None = None) -> int:
    return runner.run_main(METHOD_ID, DpoParams, train, argv)


if __name__ == "__main__":
    raise SystemExit(main())
