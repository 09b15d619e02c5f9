"""An example user reward function for the grpo method: does the completion mention the row's keyword?

Put a file like this in the agent's rewards directory (--rewards_dir, or the REWARDS_DIR or
TUNEFORGE_REWARDS_DIR environment variable) and name it in the job's parameters:

    {"reward_functions": "accuracy,contains_keyword"}

The file is `<name>.py` and defines a function `<name>` (or `reward`) with TRL's reward signature:

    def contains_keyword(prompts, completions, **kwargs) -> list[float | None]

* prompts, completions: one entry per sampled completion (num_generations per prompt). A completion is a
  string, or, for chat prompts, a list of messages: [{"role": "assistant", "content": "..."}].
* kwargs: the dataset's other columns, one value per completion (here `keyword`, and `answer`), plus TRL's
  completion_ids (token ids), trainer_state, log_extra and log_metric.
* Return one float per completion, or None where the reward does not apply (left out of the averages).

The run logs it as rewards/contains_keyword/mean and rewards/contains_keyword/std. An exception fails the
run with the function's name in the message. Only the standard library and the trainer's own packages are
importable; the file is loaded from the rewards directory itself, which is not put on sys.path.

Rows for this example: {"prompt": "Name a fruit that is yellow.", "answer": "banana", "keyword": "banana"}
"""

from __future__ import annotations

import re
from typing import Any


def _text(completion: Any) -> str:
    if isinstance(completion, str):
        return completion
    return "\n".join(m.get("content") or "" for m in completion if m.get("role") == "assistant")


def contains_keyword(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float | None]:
    """1.0 when the completion contains the row's keyword as a whole word (any case), else 0.0; None without one."""
    keywords = kwargs.get("keyword") or [None] * len(completions)
    rewards: list[float | None] = []
    for completion, keyword in zip(completions, keywords, strict=True):
        if not keyword:
            rewards.append(None)
            continue
        found = re.search(rf"\b{re.escape(str(keyword))}\b", _text(completion), re.IGNORECASE)
        rewards.append(1.0 if found else 0.0)
    return rewards
