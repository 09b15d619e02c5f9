"""The built-in grpo method: a LoRA run with built-in and user rewards, failures named, parameters that take effect.

Kept short on a CPU: 2 completions of at most 8 tokens per prompt, one prompt a step, one torch thread (the
tiny model's matrices are too small to share out, and on a busy machine threads only wait for each other).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tuneforge_trainer.sdk import parse_checkpoint, parse_log_data

REPO = Path(__file__).resolve().parents[2]
DATASETS = REPO / "examples" / "datasets"

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")

FAST = ["--batch_size=2", "--num_generations=2", "--max_completion_length=8", "--max_prompt_length=64"]

# A user reward with a spread even on a random model's output, so every group has an advantage to learn from.
VOWEL_SHARE = '''
def vowel_share(prompts, completions, **kwargs):
    """Share of the completion's letters that are vowels."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [sum(ch in "aeiou" for ch in t.lower()) / max(1, sum(ch.isalpha() for ch in t)) for t in texts]
'''


@pytest.fixture
def grpo_env(child_env) -> dict[str, str]:
    from tuneforge_common.methods import GrpoParams, env_name, param_fields

    for name in {env_name(f.name) for f in param_fields(GrpoParams)} | {"REWARDS_DIR", "REWARD_REGEX"}:
        child_env.pop(name, None)
    child_env.pop("TUNEFORGE_REWARDS_DIR", None)
    child_env["OMP_NUM_THREADS"] = "1"
    return child_env


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_method(env: dict[str, str], *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tuneforge_trainer.methods.grpo", *flags],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )


def test_grpo_lora_run_reports_builtin_and_user_rewards_and_saves_an_adapter(tiny_model_dir, grpo_env, tmp_path):
    rewards_dir = tmp_path / "rewards"
    rewards_dir.mkdir()
    (rewards_dir / "vowel_share.py").write_text(VOWEL_SHARE)
    grpo_env["REWARDS_DIR"] = str(rewards_dir)  # the environment fallback of --rewards_dir
    output_dir = tmp_path / "adapter"
    result = run_method(
        grpo_env,
        f"--model_path={tiny_model_dir}",
        f"--dataset_path={DATASETS / 'sample-qa.jsonl'}",
        f"--output_dir={output_dir}",
        "--max_steps=3",
        "--save_steps=2",
        "--lora_rank=4",
        "--learning_rate=1e-2",
        "--reward_functions=accuracy,format,length,vowel_share",
        *FAST,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "20 question/answer rows" in result.stderr
    assert "rewards accuracy, format, length, vowel_share" in result.stderr
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    payloads = [p for p in map(parse_log_data, lines) if p is not None]
    checkpoints = [c for c in map(parse_checkpoint, lines) if c is not None]
    assert len(payloads) + len(checkpoints) == len(lines)  # stdout is the protocol only
    assert [c["step"] for c in checkpoints] == [2, 3] and "reward" in checkpoints[0]["metrics"]

    steps = [p["details"] for p in payloads if "reward" in p["details"]]
    assert [d["step"] for d in steps] == [1, 2, 3]
    for details in steps:
        for name in ("accuracy", "format", "length", "vowel_share"):
            assert math.isfinite(details[f"rewards/{name}/mean"]) and f"rewards/{name}/std" in details
        assert math.isfinite(details["reward_std"]) and math.isfinite(details["loss"])
        assert details["completions/max_length"] <= 8
        assert 0 <= details["rewards/format/mean"] <= 1 and 0 <= details["rewards/vowel_share/mean"] <= 1
    assert payloads[-1]["progress"] == 100 and payloads[-1]["details"]["step"] == 3

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert json.loads((output_dir / "adapter_config.json").read_text())["r"] == 4
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), output_dir)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(torch.count_nonzero(p) > 0 for p in lora_b)  # trained: lora_B starts at zero


def test_unknown_rewards_and_escaping_names_fail_before_the_model_loads(tiny_model_dir, grpo_env, tmp_path):
    common = [f"--model_path={tiny_model_dir}", f"--dataset_path={DATASETS / 'sample-qa.jsonl'}"]
    common.append(f"--output_dir={tmp_path / 'out'}")
    result = run_method(grpo_env, *common, "--reward_functions=accuracy,nope", f"--rewards_dir={tmp_path}")
    assert result.returncode != 0 and result.stdout == ""
    assert "error: --reward_functions: unknown reward function 'nope'" in result.stderr
    assert "accuracy, format, length, regex" in result.stderr
    assert f"no nope.py in the rewards directory {tmp_path}" in result.stderr
    assert "Traceback" not in result.stderr

    result = run_method(grpo_env, *common, "--reward_functions=../evil")
    assert result.returncode != 0 and result.stdout == ""
    assert "error: --reward_functions: must be comma-separated names (a-z, 0-9, _), got '../evil'" in result.stderr
    assert "Traceback" not in result.stderr

    (tmp_path / "outside.py").write_text("raise SystemExit('loaded')\n")
    (tmp_path / "rewards").mkdir()
    (tmp_path / "rewards" / "sneaky.py").symlink_to(tmp_path / "outside.py")
    grpo_env["TUNEFORGE_REWARDS_DIR"] = str(tmp_path / "rewards")
    result = run_method(grpo_env, *common, "--reward_functions=sneaky")
    assert result.returncode != 0 and "loaded" not in result.stderr
    assert f"leads to {tmp_path / 'outside.py'}, outside {tmp_path / 'rewards'}" in result.stderr
    assert "Traceback" not in result.stderr


def paths_for(model: Path, dataset: Path, output: Path):
    from tuneforge_trainer.runner import RunPaths

    return RunPaths(model, dataset, output, None)


def build(tmp_path: Path, model: Path, dataset: Path = DATASETS / "sample-qa.jsonl", extras=None, **params):
    from tuneforge_common.methods import GrpoParams
    from tuneforge_trainer.methods import grpo

    defaults = {"batch_size": 2, "num_generations": 2, "max_completion_length": 8, "lora_rank": 2}
    paths = paths_for(model, dataset, tmp_path / "out")
    return grpo.build(GrpoParams(**{**defaults, **params}), paths, str(tmp_path / "cache"), extras or {})


def test_generation_parameters_reach_the_trainer(tiny_model_dir, tmp_path, one_thread):
    from peft import PeftModel

    built = build(
        tmp_path,
        tiny_model_dir,
        num_generations=4,
        batch_size=4,
        grad_accum_steps=2,
        max_completion_length=12,
        beta=0.04,
        temperature=0.7,
    )
    trainer = built.trainer
    assert (trainer.args.num_generations, trainer.num_generations) == (4, 4)
    assert trainer.args.max_completion_length == 12 and trainer.generation_config.max_new_tokens == 12
    assert trainer.args.beta == 0.04 and trainer.beta == 0.04
    assert trainer.args.temperature == 0.7 and trainer.generation_config.temperature == 0.7
    # one generation batch per optimizer step: batch_size x grad_accum_steps completions, whole groups
    assert (trainer.args.generation_batch_size, trainer.args.steps_per_generation) == (8, 2)
    assert trainer.args.log_completions is False
    assert trainer.reward_func_names == ["accuracy", "format"]  # the schema's default reward_functions
    # use_lora: the adapter alone trains, and beta's reference is the base without it (no second model)
    assert isinstance(trainer.model, PeftModel) and trainer.ref_model is None
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)

    full = build(tmp_path, tiny_model_dir, use_lora=False, beta=0.04).trainer
    assert not isinstance(full.model, PeftModel)
    assert all(p.requires_grad for p in full.model.parameters())
    assert full.ref_model is not None  # full weights: a frozen copy of the start for the KL term


def test_max_prompt_length_keeps_the_end_of_the_prompt(tiny_model_dir, tmp_path, one_thread):
    built = build(tmp_path, tiny_model_dir, max_prompt_length=6, reward_functions="length")
    prompt = built.trainer.train_dataset[0]["prompt"]
    full = built.tokenizer.apply_chat_template([prompt], add_generation_prompt=True, tokenize=True, return_dict=True)
    full_ids = list(full["input_ids"][0])
    (ids,), _, _ = built.trainer._tokenize_prompts([prompt])
    assert len(full_ids) > 6 and list(ids) == full_ids[-6:]
    assert built.tokenizer.decode(ids).endswith("<|im_start|>assistant\n")  # the answer still starts right

    # the length reward's default target: half of max_completion_length (8)
    (length,) = built.trainer.reward_funcs
    assert length(prompts=[None] * 2, completions=["", ""], completion_ids=[[1] * 4, [1] * 8]) == [1.0, 0.0]

    roomy = build(tmp_path, tiny_model_dir, max_prompt_length=512).trainer
    (ids,), _, _ = roomy._tokenize_prompts([prompt])
    assert list(ids) == full_ids


def test_dataset_columns_reach_user_rewards_and_a_failing_reward_names_itself(
    tiny_model_dir, tmp_path, capsys, one_thread
):
    from tuneforge_trainer.methods import grpo

    dataset = tmp_path / "keywords.jsonl"
    rows = [{"prompt": f"Name fruit {i}.", "answer": "banana", "keyword": f"kw{i}"} for i in range(4)]
    dataset.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "boom.py").write_text(
        "def reward(prompts, completions, keyword, **kwargs):\n"
        "    raise ValueError(f'no luck with {sorted(set(keyword))}')\n"
    )
    code = grpo.main(
        [
            f"--model_path={tiny_model_dir}",
            f"--dataset_path={dataset}",
            f"--output_dir={tmp_path / 'out'}",
            f"--rewards_dir={tmp_path}",
            "--reward_functions=format,boom",
            "--max_steps=1",
            "--seed=3",
            *FAST,
        ]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert "error: grpo training failed: RewardFunctionError: reward function 'boom'" in err
    assert f"({tmp_path / 'boom.py'}) raised ValueError: no luck with ['kw" in err  # the row's keyword column


def test_regex_reward_needs_a_pattern_and_checks_each_rows(tiny_model_dir, tmp_path):
    with pytest.raises(SystemExit, match="regex reward needs an answer_regex column in the dataset or --reward_regex"):
        build(tmp_path, tiny_model_dir, reward_functions="regex")
    with pytest.raises(SystemExit, match=r"error: --reward_regex: invalid regular expression '\(\['"):
        build(tmp_path, tiny_model_dir, reward_functions="regex", extras={"reward_regex": "(["})
    dataset = tmp_path / "patterns.jsonl"
    rows = [{"prompt": "a", "answer": "1", "answer_regex": r"\d+"}, {"prompt": "b", "answer": "2", "answer_regex": "("}]
    dataset.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(SystemExit, match=rf"{dataset} line 2: column 'answer_regex': invalid regular expression"):
        build(tmp_path, tiny_model_dir, dataset, reward_functions="regex")
