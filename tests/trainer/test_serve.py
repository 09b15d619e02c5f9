"""The serve program ("Live" stage): an OpenAI-compatible server as a child process, driven by the openai client."""

from __future__ import annotations

import contextlib
import json
import queue
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import torch

from tests.trainer.lora_adapter import make_adapter
from tuneforge_trainer.sdk import parse_log_data
from tuneforge_trainer.serve import parse_ready_line

REPO = Path(__file__).resolve().parents[2]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How do I keep basil fresh?"}]

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")


class Server:
    """A serve child process started on port 0; ready() waits for its ready line and gives the port."""

    def __init__(self, env: dict[str, str], log_path: Path, *flags: str) -> None:
        self.log_path = log_path
        with log_path.open("w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tuneforge_trainer.serve", "--port=0", *flags],
                env=env,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                cwd=REPO,
            )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def ready(self) -> int:
        while True:
            line = self.lines.get(timeout=120)
            assert line is not None, f"serve exited before it was ready: {self.log_path.read_text()[-3000:]}"
            ready = parse_ready_line(line)
            if ready is not None:
                assert ready["host"] == "127.0.0.1" and ready["port"] > 0
                self.ready_port: int = ready["port"]
                return self.ready_port
            assert parse_log_data(line) is not None, f"stdout carries only protocol lines, got {line!r}"

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=30)


@contextlib.contextmanager
def serving(env: dict[str, str], log_path: Path, *flags: str) -> Iterator[Server]:
    """The server, killed after the test if it still runs."""
    server = Server(env, log_path, *flags)
    try:
        yield server
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()


def client_for(port: int) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=60)


def expected_greedy(model, tokenizer, max_new_tokens: int) -> tuple[str, int]:
    """(text, prompt tokens) of a greedy completion of MESSAGES by the model in this process."""
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens
        )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True), ids.shape[1]


def streamed(client: openai.OpenAI, **kwargs) -> tuple[str, list]:
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


def check_base_model(server: Server, tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Computed while the server starts: a greedy completion by transformers' generate in this process.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    text, prompt_tokens = expected_greedy(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tokenizer, 8)
    port = server.ready()
    client = client_for(port)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as response:
        assert response.status == 200
    assert [m.id for m in client.models.list()] == ["tiny"]

    # Greedy, cut by max_tokens.
    greedy = {"model": "tiny", "messages": MESSAGES, "max_tokens": 8, "temperature": 0}
    completion = client.chat.completions.create(**greedy)
    choice = completion.choices[0]
    assert completion.object == "chat.completion" and completion.model == "tiny"
    assert choice.message.role == "assistant" and choice.message.content == text
    assert choice.finish_reason == "length"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (prompt_tokens, 8)
    assert completion.usage.total_tokens == prompt_tokens + 8

    # Streamed: role first, the same text in deltas, the finish reason, then the usage chunk.
    joined, chunks = streamed(client, **greedy, stream_options={"include_usage": True})
    assert joined == text
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage == completion.usage
    assert all(c.usage is None for c in chunks[:-1])
    _, plain_chunks = streamed(client, **greedy)
    assert plain_chunks[-1].choices[0].finish_reason == "length" and plain_chunks[-1].usage is None

    # max_completion_tokens; seeded sampling gives the same text streamed or not.
    short = client.chat.completions.create(**{**greedy, "max_tokens": None}, max_completion_tokens=3)
    assert short.usage is not None and short.usage.completion_tokens == 3
    sampled = {"model": "tiny", "messages": MESSAGES, "max_tokens": 16, "temperature": 1.0, "top_p": 0.9}
    first = client.chat.completions.create(**sampled, seed=7).choices[0].message.content
    assert first == streamed(client, **sampled, seed=7)[0]
    penalised = client.chat.completions.create(**sampled, seed=7, frequency_penalty=1.0, presence_penalty=0.5)
    assert penalised.choices[0].finish_reason in ("stop", "length")

    # logit_bias as OpenAI adds it: +100 makes one ordinary token every pick, -100 bans the greedy first token.
    forced = next(
        i for i in range(len(tokenizer)) if i not in tokenizer.all_special_ids and tokenizer.decode([i]).strip()
    )
    favoured = client.chat.completions.create(**greedy, logit_bias={str(forced): 100})
    assert favoured.choices[0].message.content == tokenizer.decode([forced] * 8, skip_special_tokens=True)
    first_greedy = tokenizer(text, add_special_tokens=False)["input_ids"][0]
    banned = client.chat.completions.create(**greedy, logit_bias={str(first_greedy): -100})
    assert banned.choices[0].message.content != text
    for bias, wrong in (({"abc": 1}, "token ids"), ({"5": 101}, "between -100 and 100"), ({"99999999": 1}, "lacks")):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(**greedy, logit_bias=bias)
        assert refused.value.param == "logit_bias" and wrong in refused.value.message

    # A stop sequence cuts the text before it, streamed or not.
    assert first
    stop_at = first[len(first) // 2 :][:2]
    cut = first[: first.find(stop_at)]
    stopped = client.chat.completions.create(**sampled, seed=7, stop=[stop_at, "never there"])
    assert stopped.choices[0].message.content == cut and stopped.choices[0].finish_reason == "stop"
    assert streamed(client, **sampled, seed=7, stop=stop_at)[0] == cut

    # Requests at once wait their turn and all get their answer.
    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda _: client.chat.completions.create(**greedy), range(3)))
    assert [a.choices[0].message.content for a in answers] == [text] * 3

    with pytest.raises(openai.BadRequestError) as too_long:
        client.chat.completions.create(**{**greedy, "max_tokens": 2000})
    assert too_long.value.code == "context_length_exceeded" and too_long.value.param == "messages"
    assert "maximum context length is 1024 tokens" in too_long.value.message
    with pytest.raises(openai.BadRequestError) as two:
        client.chat.completions.create(**greedy, n=2)
    assert two.value.param == "n" and two.value.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as hot:
        client.chat.completions.create(**{**greedy, "temperature": "hot"})
    assert hot.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as empty:
        client.chat.completions.create(**{**greedy, "messages": []})
    assert empty.value.param == "messages"
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(**{**greedy, "model": "gpt-4o"})
    assert unknown.value.code == "model_not_found"
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=b"{oops", method="POST")
    with pytest.raises(urllib.error.HTTPError) as bad_json:
        urllib.request.urlopen(request, timeout=10)
    assert bad_json.value.code == 400 and "error" in json.loads(bad_json.value.read())


def check_adapter(server: Server, tiny_model_dir: Path, adapter: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, adapter).eval()
    text, prompt_tokens = expected_greedy(model, AutoTokenizer.from_pretrained(adapter), 6)
    client = client_for(server.ready())
    assert [m.id for m in client.models.list().data] == ["my-adapter"]  # the adapter's directory name by default
    completion = client.chat.completions.create(model="my-adapter", messages=MESSAGES, max_tokens=6, temperature=0)
    assert completion.choices[0].message.content == text
    # --max_model_len bounds prompt + completion.
    with pytest.raises(openai.BadRequestError) as too_long:
        client.chat.completions.create(model="my-adapter", messages=MESSAGES, max_tokens=65 - prompt_tokens)
    assert too_long.value.code == "context_length_exceeded"


def test_serve_base_model_and_adapter(tiny_model_dir, child_env, tmp_path):
    """Two servers, started at once (their start-up is most of the time): the base model, checked in depth, and
    the base with an adapter; each stops on SIGTERM with exit 0."""
    adapter = make_adapter(tiny_model_dir, tmp_path / "my-adapter")
    with (
        serving(child_env, tmp_path / "base.log", f"--model_path={tiny_model_dir}", "--served_model_name=tiny") as base,
        serving(
            child_env,
            tmp_path / "adapter.log",
            f"--model_path={tiny_model_dir}",
            f"--adapter_path={adapter}",
            "--max_model_len=64",
        ) as adapted,
    ):
        check_base_model(base, tiny_model_dir)
        check_adapter(adapted, tiny_model_dir, adapter)
        assert adapted.stop() == 0
        # SIGTERM during a stream: the stream ends at once with an error event, the server exits 0.
        client = client_for(base.ready_port)
        stream = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=900, stream=True)
        assert next(iter(stream)).choices[0].delta.role == "assistant"
        assert base.stop() == 0
        # "shut down during this completion" once it was generating, "shutting down" if it had not begun yet.
        with pytest.raises(openai.APIError, match="shut(ting)? down"):
            list(stream)
    for name in ("base.log", "adapter.log"):
        log = (tmp_path / name).read_text()
        assert "serve: stopped" in log and "Traceback" not in log, log[-3000:]
