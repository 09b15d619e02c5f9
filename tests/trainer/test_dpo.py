"""The built-in dpo method (TRL DPOTrainer): runs end to end, and each of its own parameters takes effect.

Runs: a LoRA run in a child process as the agent starts it, and a full (use_lora=false) run on chat rows
in-process. The parameters are checked on trainers built with `dpo.build` (not trained).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tuneforge_common.methods import DpoParams
from tuneforge_trainer.sdk import parse_log_data

REPO = Path(__file__).resolve().parents[2]
PREFERENCE = REPO / "examples" / "datasets" / "sample-preference.jsonl"

# Raised inside PEFT/transformers when loading the adapter, not by our code.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")

CHAT_ROWS = [
    {
        "prompt": [{"role": "user", "content": question}],
        "chosen": [{"role": "assistant", "content": good}],
        "rejected": [{"role": "assistant", "content": bad}],
    }
    for question, good, bad in [
        ("What is the capital of Italy?", "Rome.", "Madrid."),
        ("How many wheels does a bicycle have?", "Two.", "Five."),
        ("What colour is grass?", "Green.", "Purple."),
        ("What do bees make?", "Honey.", "Bread."),
    ]
]


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_dpo(env: dict[str, str], *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tuneforge_trainer.methods.dpo", *flags],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )


@pytest.fixture
def build(tiny_model_dir, tmp_path):
    """build(dataset=..., **flags) -> dpo.Built for that run, not trained."""
    from tuneforge_trainer import runner
    from tuneforge_trainer.methods import dpo

    counter = iter(range(1000))

    def make(dataset: Path = PREFERENCE, **flags):
        params = DpoParams(**{"max_steps": 2, "batch_size": 2, **flags})
        paths = runner.RunPaths(tiny_model_dir, dataset, tmp_path / f"out-{next(counter)}", None)
        return dpo.build(params, paths, str(tmp_path / "cache"))

    return make


# --- runs -----------------------------------------------------------------------------------------


def test_dpo_lora_run_reports_rewards_and_saves_a_trained_adapter(tiny_model_dir, child_env, tmp_path):
    output_dir = tmp_path / "adapter"
    result = run_dpo(
        child_env,
        f"--model_path={tiny_model_dir}",
        f"--dataset_path={PREFERENCE}",
        f"--output_dir={output_dir}",
        "--max_steps=3",
        "--batch_size=2",
        "--lora_rank=4",
        "--learning_rate=1e-3",
        "--beta=0.2",
        "--validation_ratio=0.1",
        "--merge_adapter",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    payloads = [p for p in map(parse_log_data, lines) if p is not None]
    assert len(payloads) == len(lines)  # stdout carries only the protocol
    assert "dpo: 22 text preference rows" in result.stderr and "2 held out for validation" in result.stderr

    steps = [p["details"] for p in payloads if "rewards/accuracies" in p["details"]]
    assert [d["step"] for d in steps] == [1, 2, 3]
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert all(isinstance(d[key], float) and math.isfinite(d[key]) for d in steps), key
    assert all(0.0 <= d["rewards/accuracies"] <= 1.0 for d in steps)
    # The reference is the base model (adapter disabled): before the first update the policy is the same
    # model, so the rewards are exactly zero and the loss is log 2.
    assert steps[0]["rewards/margins"] == 0.0 and steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    evaluated = [p["details"] for p in payloads if "eval_rewards/accuracies" in p["details"]]
    assert [d["step"] for d in evaluated] == [1, 2, 3] and all(math.isfinite(d["eval_loss"]) for d in evaluated)
    final = payloads[-1]
    assert final["progress"] == 100 and "train_loss" in final["details"]
    assert final["details"]["eval_loss"] == evaluated[-1]["eval_loss"]

    from peft import PeftModel

    assert json.loads((output_dir / "adapter_config.json").read_text())["r"] == 4
    assert (output_dir / "tokenizer.json").is_file()
    assert not (output_dir / "ref").exists()  # TRL's reference adapter copy is not saved
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), output_dir)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(torch.count_nonzero(p) > 0 for p in lora_b)  # lora_B starts at zero
    merged = AutoModelForCausalLM.from_pretrained(output_dir / "merged")  # --merge_adapter
    assert not any("lora" in n for n, _ in merged.named_parameters())


def test_full_dpo_on_chat_rows_saves_a_changed_model(tiny_model_dir, tmp_path, capsys):
    from tuneforge_trainer.methods import dpo

    dataset = write_rows(tmp_path / "chat.jsonl", CHAT_ROWS)
    output_dir = tmp_path / "full"
    params = DpoParams(use_lora=False, max_steps=2, batch_size=2, learning_rate=1e-3)
    extras = {"model_path": str(tiny_model_dir), "dataset_path": str(dataset), "output_dir": str(output_dir)}
    metrics = dpo.train(params, extras)
    assert math.isfinite(metrics["train_loss"])
    assert "dpo: 4 chat preference rows" in capsys.readouterr().err

    assert not (output_dir / "adapter_config.json").exists() and (output_dir / "model.safetensors").is_file()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    trained = AutoModelForCausalLM.from_pretrained(output_dir).state_dict()
    assert trained.keys() == base.keys()
    assert any(not torch.equal(trained[k], base[k]) for k in base)
    assert AutoTokenizer.from_pretrained(output_dir).chat_template


# --- parameters -----------------------------------------------------------------------------------


def test_lora_beta_loss_type_and_loraplus_reach_the_trainer(build):
    from peft import PeftModel

    built = build(
        beta=0.3, loss_type="ipo", lora_rank=3, target_modules="q_proj,v_proj", lora_dropout=0.2, loraplus_lr_ratio=16
    )
    trainer, model = built.trainer, built.trainer.model
    assert (trainer.args.beta, trainer.beta, trainer.loss_types) == (0.3, 0.3, ["ipo"])
    assert trainer.args.max_length == DpoParams().max_seq_length

    # use_lora: the adapter is trained and the reference is the same model with it disabled (no copy).
    assert isinstance(model, PeftModel) and trainer.ref_model is None
    assert list(model.peft_config) == ["default"]  # TRL's "ref" adapter copy is dropped
    assert model.peft_config["default"].r == 3
    assert set(model.peft_config["default"].target_modules) == {"q_proj", "v_proj"}
    adapted = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == {"q_proj", "v_proj"}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and ".default." in n for n in trainable)

    # lora_dropout stays as asked (TRL would zero it with every other dropout).
    dropouts = {n: m.p for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout)}
    assert dropouts and all(p == (0.2 if ".lora_dropout." in f"{n}." else 0.0) for n, p in dropouts.items())

    # LoRA+: the B matrices learn at 16 x learning_rate.
    names = {id(p): n for n, p in model.named_parameters()}
    lrs = {names[id(p)]: g["lr"] for g in trainer.optimizer.param_groups for p in g["params"]}
    lr = DpoParams().learning_rate
    assert lrs and all(rate == pytest.approx(16 * lr if "lora_B" in n else lr) for n, rate in lrs.items())


def test_full_dpo_trains_every_weight_against_a_frozen_reference_copy(build):
    from peft import PeftModel

    built = build(use_lora=False, loss_type="exo_pair", beta=0.05)
    trainer = built.trainer
    assert not isinstance(trainer.model, PeftModel) and trainer.optimizer is None
    assert trainer.ref_model is not None and trainer.ref_model is not trainer.model
    assert all(p.requires_grad for p in trainer.model.parameters())
    ref = dict(trainer.ref_model.named_parameters())
    assert all(torch.equal(p, ref[n]) for n, p in trainer.model.named_parameters())
    assert (trainer.loss_types, trainer.beta, trainer.label_smoothing) == (["exo_pair"], 0.05, 1e-3)


def test_max_prompt_length_keeps_the_prompt_end_and_max_seq_length_bounds_batches(build, tmp_path):
    long_prompt = " ".join(f"Sentence number {i} of a rather long introduction." for i in range(12)) + " Answer now?"
    rows = [
        {"prompt": long_prompt, "chosen": "A full and kind answer.", "rejected": "No."},
        {"prompt": "Short?", "chosen": "Yes, quite short.", "rejected": "Nope."},
    ] * 2
    built = build(write_rows(tmp_path / "long.jsonl", rows), max_prompt_length=10, max_seq_length=16)
    tokenizer, dataset = built.tokenizer, built.trainer.train_dataset
    assert built.prompts_cut == 2
    assert len(tokenizer(long_prompt)["input_ids"]) > 10
    for row in dataset:
        assert len(row["prompt_ids"]) <= 10
    long_ids = dataset[0]["prompt_ids"]
    assert len(long_ids) >= 8  # cut to about the limit, not far below it
    assert (long_prompt + "\n").endswith(tokenizer.decode(long_ids))  # the end is kept
    assert tokenizer.decode(dataset[1]["prompt_ids"]) == "Short?\n"  # a short prompt is untouched
    batch = next(iter(built.trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[1] <= 16
    assert built.trainer.args.max_length == 16


def test_chat_prompts_lose_their_oldest_turns_first(tiny_model_dir, tmp_path):
    from tuneforge_trainer.methods.dpo import fit_prompts

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)

    def tokens(messages):
        return len(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"])

    system = {"role": "system", "content": "Be brief."}
    old = [
        {"role": "user", "content": "Tell me everything about the history of tea in great detail, please."},
        {"role": "assistant", "content": "Tea was first drunk in China thousands of years ago, and then it spread."},
    ]
    last = {"role": "user", "content": "And coffee?"}
    long_last = {"role": "user", "content": "Tell me about coffee. " * 10 + "Keep the end of this."}
    rows = [
        {"prompt": [system, *old, last]},
        {"prompt": [system, *old, long_last]},
        {"prompt": [last]},
    ]
    limit = tokens([system, last])
    assert fit_prompts(rows, tokenizer, limit, tmp_path / "rows.jsonl") == 2
    assert rows[0]["prompt"] == [system, last]  # the system message stays, the oldest turns go
    (cut,) = rows[1]["prompt"]  # alone too long: only its end is kept
    assert cut["role"] == "user" and long_last["content"].endswith(cut["content"])
    assert cut["content"].endswith("Keep the end of this.") and tokens([cut]) <= limit
    assert rows[2]["prompt"] == [last]

    with pytest.raises(SystemExit, match="--max_prompt_length=3: the chat template alone takes"):
        fit_prompts([{"prompt": [system, *old, last]}], tokenizer, 3, tmp_path / "rows.jsonl")


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        # No prompt column: the conversations' shared beginning is the prompt.
        (
            {
                "chosen": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello!"}],
                "rejected": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Go away."}],
            },
            {
                "prompt": [{"role": "user", "content": "Hi?"}],
                "chosen": [{"role": "assistant", "content": "Hello!"}],
                "rejected": [{"role": "assistant", "content": "Go away."}],
            },
        ),
        # UltraFeedback's shape: a text prompt beside whole conversations that repeat it.
        (
            {
                "prompt": "Hi?",
                "chosen": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello!"}],
                "rejected": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Go away."}],
            },
            {
                "prompt": [{"role": "user", "content": "Hi?"}],
                "chosen": [{"role": "assistant", "content": "Hello!"}],
                "rejected": [{"role": "assistant", "content": "Go away."}],
            },
        ),
        # A text prompt beside assistant replies becomes the user turn; text replies to messages, assistant turns.
        (
            {
                "prompt": "Hi?",
                "chosen": [{"role": "assistant", "content": "Hello!"}],
                "rejected": [{"role": "assistant", "content": "Go away."}],
            },
            {
                "prompt": [{"role": "user", "content": "Hi?"}],
                "chosen": [{"role": "assistant", "content": "Hello!"}],
                "rejected": [{"role": "assistant", "content": "Go away."}],
            },
        ),
        (
            {"prompt": [{"role": "user", "content": "Hi?"}], "chosen": "Hello!", "rejected": "Go away."},
            {
                "prompt": [{"role": "user", "content": "Hi?"}],
                "chosen": [{"role": "assistant", "content": "Hello!"}],
                "rejected": [{"role": "assistant", "content": "Go away."}],
            },
        ),
        # Text: the shared beginning is the prompt; an explicit prompt gets a newline before its replies.
        (
            {"chosen": "The sky is blue.", "rejected": "The sky is green."},
            {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
        ),
        (
            {"prompt": "Why?", "chosen": "Because.", "rejected": "No."},
            {"prompt": "Why?\n", "chosen": "Because.", "rejected": "No."},
        ),
        (
            {"prompt": "Say", "chosen": " yes", "rejected": " no"},
            {"prompt": "Say", "chosen": " yes", "rejected": " no"},
        ),
    ],
)
def test_preference_rows_get_an_explicit_prompt_of_one_kind(tmp_path, row, expected):
    import datasets

    from tuneforge_trainer.methods.dpo import preference_rows

    rows, kind = preference_rows(datasets.Dataset.from_list([row]), tmp_path / "rows.jsonl")
    assert rows == [expected]
    assert kind == ("chat" if isinstance(expected["prompt"], list) else "text")


# --- bad input ------------------------------------------------------------------------------------

GOOD = '{"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away."}'


@pytest.mark.parametrize(
    ("lines", "needle"),
    [
        ([GOOD, '{"prompt": "Hi?", "chosen": "Hello!"}'], "line 2: column 'rejected' is missing"),
        ([GOOD, "", '{"prompt": "Hi?", "chosen": "Same.", "rejected": "Same."}'], "line 3: 'rejected' is identical"),
        ([GOOD, '{"prompt": "Hi?", "chosen": oops}'], "line 2: invalid JSON"),
        (['{"chosen": "Yes.", "rejected": "No."}'], "line 1: no 'prompt' column, and 'chosen' and 'rejected' do not"),
        (
            ['{"prompt": "Hi?", "chosen": [{"role": "assistant", "content": "Hello!"}], "rejected": "Go away."}'],
            "line 1: 'chosen' and 'rejected' must both be text or both be lists of messages",
        ),
        (['{"prompt": "Hi?", "answer": "Hello!"}'], "preference rows need 'chosen' and 'rejected' columns"),
    ],
)
def test_bad_rows_name_their_line(build, tmp_path, lines, needle):
    dataset = tmp_path / "bad.jsonl"
    dataset.write_text("\n".join(lines) + "\n")
    with pytest.raises(SystemExit) as excinfo:
        build(dataset)
    assert str(excinfo.value).startswith("error: dataset: ") and needle in str(excinfo.value)


def test_bad_rows_fail_the_run_without_a_traceback(tiny_model_dir, child_env, tmp_path):
    dataset = write_rows(tmp_path / "bad.jsonl", [{"prompt": "Hi?", "chosen": "Hello!", "rejected": "Hello!"}])
    result = run_dpo(
        child_env, f"--model_path={tiny_model_dir}", f"--dataset_path={dataset}", f"--output_dir={tmp_path / 'o'}"
    )
    assert result.returncode != 0 and result.stdout == ""
    assert f"{dataset} line 1: 'rejected' is identical to 'chosen'" in result.stderr
    assert "Traceback" not in result.stderr


def test_prompt_input_column_names_the_prompt_and_prompt_output_column_is_refused(build, tmp_path):
    dataset = write_rows(
        tmp_path / "question.jsonl", [{"question": "Hi?", "chosen": "Hello!", "rejected": "Go away."}] * 2
    )
    built = build(dataset, prompt_input_column="question")
    assert built.trainer.train_dataset[0]["prompt"] == "Hi?\n"
    with pytest.raises(SystemExit, match="prompt column 'query' not found; the dataset has question, chosen"):
        build(dataset, prompt_input_column="query")
    with pytest.raises(SystemExit, match="--prompt_output_column=chosen: preference rows have two answers"):
        build(dataset, prompt_output_column="chosen")


# Our check comes after PEFT has wrapped the (tied) head, which PEFT warns about first.
@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning")
def test_lm_head_as_a_lora_target_is_refused(build):
    with pytest.raises(SystemExit, match="--target_modules=q_proj,lm_head: DPO cannot train LoRA on the output head"):
        build(target_modules="q_proj,lm_head")
