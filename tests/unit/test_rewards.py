"""The grpo method's reward functions: the built-ins, user reward files and the wrapper TRL calls (pure, fast)."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from tuneforge_trainer import rewards
from tuneforge_trainer.rewards import RewardFunctionError, RewardProblem, RewardSettings

REPO = Path(__file__).resolve().parents[2]


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


# --- text, answers, normalisation -----------------------------------------------------------------


def test_completion_text_of_strings_and_messages():
    assert rewards.completion_text("plain") == "plain"
    assert rewards.completion_text(chat("hi")) == "hi"
    blocks = [{"role": "assistant", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert rewards.completion_text(blocks) == "a\nb"
    tool_turns = [*chat("call"), {"role": "tool", "content": "result"}, *chat("done")]
    assert rewards.completion_text(tool_turns) == "call\ndone"


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("  The Answer\n is   42. ", "the answer is 42"),
        ("Paris!?", "paris"),
        ("x, y;", "x, y"),
        ("3.14", "3.14"),
    ],
)
def test_normalize(given, expected):
    assert rewards.normalize(given) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("just 42", "just 42"),
        ("<think>hmm</think><answer> 42 </answer>", " 42 "),
        ("<answer>1</answer> no, <answer>2</answer>", "2"),
        (r"so the result is \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
        (r"<answer>\boxed{7}</answer>", "7"),
        (r"\boxed{open", r"\boxed{open"),  # an unclosed box is not an answer
    ],
)
def test_final_answer(text, expected):
    assert rewards.final_answer(text) == expected


# --- the built-ins ----------------------------------------------------------------------------------


def test_accuracy_matches_the_normalised_final_answer():
    completions = ["Paris.", "<answer> paris </answer>", r"It is \boxed{Paris}", "Lyon", chat("PARIS!")]
    assert rewards.accuracy([None] * 5, completions, answer=["Paris"] * 5) == [1.0, 1.0, 1.0, 0.0, 1.0]
    assert rewards.accuracy([None], ["42"], answer=[42]) == [1.0]  # numeric answer columns
    assert rewards.accuracy([None], ["42"], answer=[None]) == [None]  # no answer on that row
    with pytest.raises(ValueError, match="answer column"):
        rewards.accuracy([None], ["42"])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think>a</think><answer>b</answer>", 1.0),
        ("  <think>\nsteps\n</think>\n\n<answer>42</answer>\n", 1.0),
        ("<think>a</think>b<answer>c</answer>", 0.8),  # text between: every tag once, not the format
        ("<answer>b</answer><think>a</think>", 0.8),  # wrong order
        ("<think>a</think><answer>b</answer><answer>c</answer>", 0.4),  # repeated answer tags
        ("<think>only thinking</think>", 0.4),
        ("<answer>42", 0.2),
        ("no tags", 0.0),
    ],
)
def test_format_full_match_and_partial_credit(text, expected):
    assert rewards.format_reward([None], [text]) == [pytest.approx(expected)]
    assert rewards.format_reward([None], [chat(text)]) == [pytest.approx(expected)]


def test_length_counts_tokens_against_the_row_target_or_the_default():
    ids = [[1] * 10, [1] * 5, [1] * 20, [1] * 30]
    assert rewards.length([None] * 4, ["x"] * 4, completion_ids=ids, default_target=10) == [1.0, 0.5, 0.0, 0.0]
    # a target_length column wins where set
    got = rewards.length([None] * 2, ["x"] * 2, completion_ids=ids[:2], target_length=[20, None], default_target=10)
    assert got == [0.5, 0.5]
    # without completion_ids (called outside training): whitespace-separated words
    assert rewards.length([None], [chat("one two three four")], default_target=4) == [1.0]
    with pytest.raises(ValueError, match="target_length must be a positive number"):
        rewards.length([None], ["x"], target_length=[0])


def test_regex_fully_matches_the_final_answer_per_row_or_run_wide():
    completions = ["<answer>42</answer>", "<answer>forty-two</answer>", "x", "7 apples"]
    rows = [r"\d+", r"\d+", None, None]
    assert rewards.regex([None] * 4, completions, answer_regex=rows) == [1.0, 0.0, None, None]
    assert rewards.regex([None] * 4, completions, answer_regex=rows, pattern=r"\d+ apples") == [1.0, 0.0, 0.0, 1.0]
    assert rewards.regex([None], ["The Answer"], pattern="(?i)the answer") == [1.0]
    assert rewards.regex([None], ["the answer is 42"], pattern="42") == [0.0]  # fullmatch, not search


def test_builtins_are_named_for_trls_metrics_and_take_the_run_settings():
    names = list(rewards.BUILTIN_REWARDS)
    funcs = rewards.resolve_rewards(names, None, RewardSettings(default_target_length=2, pattern=r"\d+"))
    assert [f.__name__ for f in funcs] == ["accuracy", "format", "length", "regex"]
    by_name = dict(zip(names, funcs, strict=True))
    extra = {"completion_ids": [[1, 2]], "trainer_state": None, "log_extra": print, "log_metric": print}
    assert by_name["length"](prompts=[None], completions=["x"], **extra) == [1.0]
    assert by_name["regex"](prompts=[None], completions=["12"], **extra) == [1.0]
    assert by_name["accuracy"](prompts=[None], completions=["12"], answer=["12"], **extra) == [1.0]


def test_regex_problem():
    assert rewards.regex_problem(r"\d+") is None
    assert "invalid regular expression '('" in rewards.regex_problem("(")
    assert "expected a regular expression as text, got 5" in rewards.regex_problem(5)


def test_a_bad_run_wide_regex_is_refused_up_front():
    with pytest.raises(RewardProblem, match=r"--reward_regex: invalid regular expression '\('"):
        rewards.resolve_rewards(["regex"], None, RewardSettings(pattern="("))


# --- user reward files ----------------------------------------------------------------------------------


def test_rewards_dir_comes_from_the_flag_then_the_environment():
    env = {"REWARDS_DIR": "/a", "TUNEFORGE_REWARDS_DIR": "/b"}
    assert rewards.rewards_dir({"rewards_dir": "/f"}, env) == Path("/f")
    assert rewards.rewards_dir({}, env) == Path("/a")
    assert rewards.rewards_dir({}, {"TUNEFORGE_REWARDS_DIR": "/b"}) == Path("/b")
    assert rewards.rewards_dir({}, {}) is None


def test_a_user_file_is_loaded_by_name_with_the_named_function_or_reward(tmp_path):
    (tmp_path / "shout.py").write_text(
        "def shout(prompts, completions, **kwargs):\n    return [float(c.isupper()) for c in completions]\n"
    )
    # `reward` as the function name, and no **kwargs: it gets only what it names
    (tmp_path / "echo_answer.py").write_text(
        "def reward(completions, answer):\n    return [float(c == a) for c, a in zip(completions, answer)]\n"
    )
    shout, echo = rewards.resolve_rewards(["shout", "echo_answer"], tmp_path)
    assert (shout.__name__, echo.__name__) == ("shout", "echo_answer")
    assert shout(prompts=["p", "p"], completions=["HEY", "hey"], completion_ids=[[1], [2]]) == [1.0, 0.0]
    assert echo(prompts=["p"], completions=["x"], answer=["x"], completion_ids=[[1]], trainer_state=None) == [1.0]


def test_the_example_reward_file_works():
    (func,) = rewards.resolve_rewards(["contains_keyword"], REPO / "examples" / "rewards")
    completions = ["I like Bananas.", "A banana!", chat("bananarama"), "x"]
    got = func(prompts=[None] * 4, completions=completions, keyword=["bananas", "banana", "banana", None])
    assert got == [1.0, 1.0, 0.0, None]


def test_async_user_rewards_stay_async(tmp_path):
    (tmp_path / "later.py").write_text("async def later(prompts, completions, **kwargs):\n    return [0.5]\n")
    (func,) = rewards.resolve_rewards(["later"], tmp_path)
    assert asyncio.iscoroutinefunction(func) and func.__name__ == "later"
    assert asyncio.run(func(prompts=["p"], completions=["c"])) == [0.5]


def test_unknown_names_list_the_builtins_and_where_they_were_looked_for(tmp_path):
    with pytest.raises(RewardProblem) as excinfo:
        rewards.resolve_rewards(["accuracy", "nope"], tmp_path)
    message = str(excinfo.value)
    assert "unknown reward function 'nope'" in message
    assert "accuracy, format, length, regex" in message
    assert f"no nope.py in the rewards directory {tmp_path.resolve()}" in message
    with pytest.raises(RewardProblem, match="no rewards directory is set .*--rewards_dir, REWARDS_DIR"):
        rewards.resolve_rewards(["nope"], None)
    with pytest.raises(RewardProblem, match="does not exist"):
        rewards.resolve_rewards(["nope"], tmp_path / "missing")


@pytest.mark.parametrize("name", ["../evil", "sub/evil", "/etc/passwd", "Evil", "evil.py", ""])
def test_names_that_are_not_plain_identifiers_never_reach_the_file_system(tmp_path, name):
    with pytest.raises(RewardProblem, match="is not a reward function name"):
        rewards.load_user_reward(name, tmp_path)


def test_a_file_that_leads_outside_the_rewards_directory_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "evil.py").write_text("raise SystemExit('must not run')\n")
    inside = tmp_path / "rewards"
    inside.mkdir()
    (inside / "evil.py").symlink_to(outside / "evil.py")
    with pytest.raises(RewardProblem, match=r"leads to .*outside.*evil\.py, outside"):
        rewards.resolve_rewards(["evil"], inside)


@pytest.mark.parametrize(
    ("source", "needle"),
    [
        ("def broken(:\n", "loading .*broken.py failed: SyntaxError"),
        ("import not_a_module_anywhere\n", "ModuleNotFoundError"),
        ("x = 1\n", r"defines no function broken\(\) or reward\(\)"),
        ("broken = 3\n", r"defines no function broken\(\) or reward\(\)"),
    ],
)
def test_bad_user_files_are_named(tmp_path, source, needle):
    (tmp_path / "broken.py").write_text(source)
    with pytest.raises(RewardProblem, match=needle):
        rewards.resolve_rewards(["broken"], tmp_path)


# --- failures while training name the function -----------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ("raise KeyError('score')", r"reward function 'flaky' \(.*flaky.py\) raised KeyError: 'score'"),
        ("return 1.0", r"reward function 'flaky' \(.*\) returned float, not a list of numbers"),
        ("return [1.0, 2.0]", "returned 2 rewards for 1 completions"),
        ("return ['high']", "returned 'high': each reward must be a number or None"),
    ],
)
def test_a_failing_user_reward_names_itself(tmp_path, body, needle):
    (tmp_path / "flaky.py").write_text(f"def flaky(prompts, completions, **kwargs):\n    {body}\n")
    (func,) = rewards.resolve_rewards(["flaky"], tmp_path)
    with pytest.raises(RewardFunctionError, match=needle):
        func(prompts=["p"], completions=["c"])


def test_numpy_like_scalars_and_none_are_accepted():
    class Scalar:
        def __init__(self, value):
            self.value = value

        def item(self):
            return self.value

    func = rewards.named_reward("scalars", lambda prompts, completions: [Scalar(0.5), None, 1], "test")
    assert func(prompts=[None] * 3, completions=["a", "b", "c"]) == [0.5, None, 1.0]


def test_builtin_failures_name_the_builtin():
    (func,) = rewards.resolve_rewards(["length"], None)
    with pytest.raises(RewardFunctionError, match=re.escape("reward function 'length' (built-in) raised ValueError")):
        func(prompts=[None], completions=["x"], target_length=["long"])
