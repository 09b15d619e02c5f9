"""Per-row token counts with a model's own tokenizer and chat template, without transformers or torch.

Rows are rendered the way the sft runner feeds them to TRL: chat rows and prompt/answer pairs through the
model's chat template when it has one (as transformers' apply_chat_template does: a sandboxed Jinja
template given messages, bos_token and eos_token), everything else as plain text.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tuneforge_common.errors import FailedPrecondition

from . import datasets as rules


def _token_text(value: Any) -> str:
    # tokenizer_config.json writes special tokens either as strings or as AddedToken dicts.
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return value if isinstance(value, str) else ""


def _generation_tag() -> type:
    """`{% generation %}...{% endgeneration %}` marks assistant tokens for assistant-only loss (transformers'
    extension); for counting, the block renders its body."""
    from jinja2 import nodes
    from jinja2.ext import Extension

    class GenerationTag(Extension):
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return caller()

    return GenerationTag


class TokenCounter:
    def __init__(self, model_dir: Path, model_id: str) -> None:
        from tokenizers import Tokenizer

        tokenizer_file = model_dir / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FailedPrecondition(f"model {model_id!r} has no tokenizer.json to count tokens with")
        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        config_path = model_dir / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        self.special = {
            "bos_token": _token_text(config.get("bos_token")),
            "eos_token": _token_text(config.get("eos_token")),
        }
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates; "default" is what apply_chat_template uses
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        template_file = model_dir / "chat_template.jinja"
        if template_file.is_file():
            template = template_file.read_text()
        self.template = self._compile(template) if isinstance(template, str) and template else None

    @staticmethod
    def _compile(source: str) -> Any:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[_generation_tag(), "jinja2.ext.loopcontrols"]
        )
        env.globals["raise_exception"] = raise_exception
        env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
        try:
            return env.from_string(source)
        except TemplateError as exc:
            raise FailedPrecondition(f"the model's chat template does not compile: {exc}") from None

    def messages_of(self, row: dict[str, Any], fmt: str, in_col: str, out_col: str) -> list[dict[str, str]] | None:
        if fmt == rules.CHAT:
            return row.get("messages")
        if fmt in (rules.INSTRUCTION, rules.COLUMNS):
            prompt_key, answer_key = ("instruction", "output") if fmt == rules.INSTRUCTION else (in_col, out_col)
            prompt = str(row.get(prompt_key) or "")
            if fmt == rules.INSTRUCTION and row.get("input"):
                prompt = f"{prompt}\n\n{row['input']}"
            return [{"role": "user", "content": prompt}, {"role": "assistant", "content": str(row.get(answer_key))}]
        return None

    def render(self, row: dict[str, Any], fmt: str, in_col: str = "", out_col: str = "") -> tuple[str, bool]:
        """(text, whether the tokenizer adds its special tokens): a template already wrote them."""
        messages = self.messages_of(row, fmt, in_col, out_col) if self.template else None
        if messages is not None and self.template is not None:
            from jinja2.exceptions import TemplateError

            try:
                return self.template.render(messages=messages, add_generation_prompt=False, **self.special), False
            except TemplateError as exc:
                raise FailedPrecondition(f"the model's chat template failed on a row: {exc}") from None
        return rules.row_text(row, fmt, in_col, out_col), True

    def count(self, row: dict[str, Any], fmt: str, in_col: str = "", out_col: str = "") -> int:
        text, special = self.render(row, fmt, in_col, out_col)
        return len(self.tokenizer.encode(text, add_special_tokens=special).ids)

    def count_all(
        self, rows: Iterable[dict[str, Any]], fmt: str, in_col: str = "", out_col: str = "", batch: int = 1024
    ) -> Iterator[int]:
        """Counts in row order, encoded in batches (the tokenizer spreads a batch over the CPU's cores)."""
        pending: dict[bool, list[str]] = {True: [], False: []}
        order: list[bool] = []

        def flush() -> Iterator[int]:
            encoded = {
                special: iter(self.tokenizer.encode_batch(texts, add_special_tokens=special))
                for special, texts in pending.items()
                if texts
            }
            for special in order:
                yield len(next(encoded[special]).ids)
            for texts in pending.values():
                texts.clear()
            order.clear()

        for row in rows:
            text, special = self.render(row, fmt, in_col, out_col)
            pending[special].append(text)
            order.append(special)
            if len(order) >= batch:
                yield from flush()
        yield from flush()
