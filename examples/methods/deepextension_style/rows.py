"""Training text from one dataset row, whatever its shape. A sibling module of train.py: the agent puts
the script's directory on PYTHONPATH, as DeepExtension does, so `import rows` works."""

from __future__ import annotations

from typing import Any


def row_text(row: dict[str, Any], input_column: str = "", output_column: str = "") -> str:
    if input_column and output_column and input_column in row:
        return f"{row[input_column]}\n{row.get(output_column, '')}"
    if isinstance(row.get("messages"), list):
        return "\n".join(f"{m.get('role', '')}: {m.get('content', '')}" for m in row["messages"])
    if "prompt" in row and "completion" in row:
        return f"{row['prompt']}{row['completion']}"
    if "question" in row and "answer" in row:
        return f"{row['question']}\n{row['answer']}"
    if "text" in row:
        return str(row["text"])
    raise ValueError(f"row has none of the known shapes (messages, prompt/completion, text): keys {sorted(row)}")
