"""The "Live" stage: an OpenAI-compatible inference server for a model (and optionally a LoRA adapter).

    python -m tuneforge_trainer.serve --model_path=DIR [--adapter_path=DIR] [--host=127.0.0.1] [--port=0] \\
        [--served_model_name=NAME] [--max_model_len=N] [--precision=auto|fp32|fp16|bf16] \\
        [--engine=auto|transformers|vllm]

Routes: POST /v1/chat/completions (stream or not), GET /v1/models, GET /health. Once it listens it prints one
line on stdout, `[serve_ready]: {"host": HOST, "port": PORT}` with the port it actually got (--port=0 picks a
free one); before that, `[log_data]` lines report loading. SIGTERM stops it (exit 0) after the requests in
flight end (5 s at most).

Engines: `transformers` generates with the model in this process, one request at a time (others wait their
turn); the adapter is merged in with PEFT. `vllm` (auto picks it when the vllm package is importable and CUDA is
available) runs vLLM's own OpenAI server as a subprocess (the adapter as a LoRA module named
--served_model_name), prints the same ready line once its /health answers, and passes SIGTERM on. The vLLM
path is not exercised by the test suite (no GPU there).

Requests as OpenAI's chat completions API takes them: messages (system/developer/user/assistant with text
content), model (the served name), stream and stream_options.include_usage, max_tokens or
max_completion_tokens (default: the rest of the context), temperature (0: greedy), top_p, stop (a string or up
to 4), seed, n (1 only), frequency_penalty and presence_penalty (applied as OpenAI defines them), logit_bias
(token id -> -100..100, added to that token's logits before sampling: -100 bans it in practice). Errors are
OpenAI-shaped: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneforge_common.methods import param
from tuneforge_common.operations import ServeParams as ServeSettings
from tuneforge_trainer import lifecycle
from tuneforge_trainer.lifecycle import Failure, UsageError, log, required
from tuneforge_trainer.sdk import log_data

READY_PREFIX = "[serve_ready]: "
ROLES = ("system", "developer", "user", "assistant")
MAX_STOP_SEQUENCES = 4
GRACEFUL_SHUTDOWN_S = 5


@dataclass(frozen=True, kw_only=True)
class ServeParams(ServeSettings):
    """Serve a model over an OpenAI-compatible HTTP API (the settings a user gives are
    tuneforge_common.operations.ServeParams; the agent adds the paths and the name)."""

    model_path: str = required("The model directory (a base or a merged model).")
    adapter_path: str = param("", "A LoRA adapter directory to apply to the model; empty for none.")
    host: str = param("127.0.0.1", "The address to listen on.")
    port: int = param(0, "The port to listen on; 0 picks a free one (see the ready line).", minimum=0, maximum=65535)
    served_model_name: str = param(
        "", "The model name requests give and responses carry; default: the adapter's or the model's directory name."
    )
    output_dir: str = param("", "Unused: the agent passes one to every operation on a model.")


def parse_ready_line(line: str) -> dict[str, Any] | None:
    """{"host", "port"} from the ready line; None for any other line."""
    text = line.strip()
    if not text.startswith(READY_PREFIX.rstrip()):
        return None
    try:
        payload = json.loads(text[len(READY_PREFIX.rstrip()) :])
    except ValueError:
        return None
    return payload if isinstance(payload, dict) and isinstance(payload.get("port"), int) else None


def announce_ready(host: str, port: int) -> None:
    print(READY_PREFIX + json.dumps({"host": host, "port": port}), flush=True)


# --- requests -------------------------------------------------------------------------------------


class ApiError(Exception):
    """An error response in OpenAI's shape."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        code: str | None = None,
        status: int = 400,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.type = message, param, code, status, type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class ChatRequest:
    messages: list[dict[str, str]]
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    # (token id, bias) pairs added to the logits before sampling.
    logit_bias: tuple[tuple[int, float], ...] = ()
    stream: bool = False
    include_usage: bool = False


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _number(body: dict[str, Any], key: str, low: float, high: float, default: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if not _is_number(value):
        raise ApiError(f"'{key}' must be a number, got {json.dumps(value)}", param=key)
    if not low <= value <= high:
        raise ApiError(f"'{key}' must be between {low:g} and {high:g}, got {value}", param=key)
    return float(value)


def _integer(body: dict[str, Any], key: str, low: int, high: int | None = None) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if not (_is_number(value) and float(value).is_integer()):
        raise ApiError(f"'{key}' must be an integer, got {json.dumps(value)}", param=key)
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"between {low} and {high}"
        raise ApiError(f"'{key}' must be {bound}, got {value}", param=key)
    return int(value)


MAX_LOGIT_BIAS_ENTRIES = 300


def _logit_bias(value: Any) -> tuple[tuple[int, float], ...]:
    """OpenAI's logit_bias: an object from token ids (as strings, JSON's keys) to a bias in -100..100."""
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise ApiError("'logit_bias' must be an object mapping token ids to a bias", param="logit_bias")
    if len(value) > MAX_LOGIT_BIAS_ENTRIES:
        raise ApiError(
            f"'logit_bias' takes at most {MAX_LOGIT_BIAS_ENTRIES} tokens, got {len(value)}", param="logit_bias"
        )
    pairs = []
    for token, bias in value.items():
        if not (isinstance(token, str) and token.isdigit()):
            raise ApiError(f"'logit_bias' keys must be token ids, got {json.dumps(token)}", param="logit_bias")
        if not (_is_number(bias) and -100 <= bias <= 100):
            raise ApiError(
                f"'logit_bias' values must be numbers between -100 and 100, got {json.dumps(bias)} for token {token}",
                param="logit_bias",
            )
        pairs.append((int(token), float(bias)))
    return tuple(pairs)


def _message_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise ApiError(f"{where}.content[{i}]: only text parts are supported", param=f"{where}.content")
            texts.append(part["text"])
        return "".join(texts)
    raise ApiError(f"{where}.content must be a string or a list of text parts", param=f"{where}.content")


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise ApiError("'messages' must be a non-empty list of {role, content} objects", param="messages")
    messages = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ApiError(f"{where} must be an object with role and content", param=where)
        role = message.get("role")
        if role not in ROLES:
            raise ApiError(f"{where}.role must be one of {', '.join(ROLES)}, got {json.dumps(role)}", param=where)
        # developer is OpenAI's newer name for system; chat templates know system.
        messages.append(
            {"role": "system" if role == "developer" else role, "content": _message_text(message.get("content"), where)}
        )
    return messages


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ApiError("'stop' must be a string or a list of strings", param="stop")
    if len(stops) > MAX_STOP_SEQUENCES:
        raise ApiError(f"'stop' takes at most {MAX_STOP_SEQUENCES} sequences, got {len(stops)}", param="stop")
    return tuple(s for s in stops if s)


def parse_chat_request(body: Any, served_name: str) -> ChatRequest:
    """The request's parameters, checked; ApiError names the first bad one."""
    if not isinstance(body, dict):
        raise ApiError("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError("you must provide a model parameter", param="model")
    if model != served_name:
        raise ApiError(
            f"The model `{model}` does not exist; this server serves `{served_name}`",
            param="model",
            code="model_not_found",
            status=404,
        )
    messages = _messages(body.get("messages"))
    n = _integer(body, "n", 1)
    if n is not None and n != 1:
        raise ApiError(f"only n=1 is supported, got n={n}", param="n")
    for key in ("logprobs", "tools", "tool_choice", "functions"):
        if body.get(key) not in (None, False, [], "none"):
            raise ApiError(f"'{key}' is not supported by this server", param=key)
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise ApiError("'stream' must be a boolean", param="stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise ApiError("'stream_options' is only allowed when 'stream' is true", param="stream_options")
        if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
            raise ApiError("'stream_options' must be an object like {\"include_usage\": true}", param="stream_options")
        include_usage = bool(options.get("include_usage", False))
    max_tokens = _integer(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", 1)
    top_p = _number(body, "top_p", 0.0, 1.0, 1.0)
    if top_p == 0:
        raise ApiError("'top_p' must be greater than 0", param="top_p")
    return ChatRequest(
        messages=messages,
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 0.0, 2.0, 1.0),
        top_p=top_p,
        stop=_stop(body.get("stop")),
        seed=_integer(body, "seed", -(2**63), 2**64 - 1),
        frequency_penalty=_number(body, "frequency_penalty", -2.0, 2.0, 0.0),
        presence_penalty=_number(body, "presence_penalty", -2.0, 2.0, 0.0),
        logit_bias=_logit_bias(body.get("logit_bias")),
        stream=bool(stream),
        include_usage=include_usage,
    )


class StopScanner:
    """Cuts streamed text at the first stop sequence, holding back a tail that may be the start of one."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops, self.pending = stops, ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to send, whether a stop sequence ended the completion)."""
        if not self.stops:
            return text, False
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        hold = max(
            (
                k
                for s in self.stops
                for k in range(min(len(s) - 1, len(self.pending)), 0, -1)
                if self.pending.endswith(s[:k])
            ),
            default=0,
        )
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out) :]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


# --- generation with transformers -----------------------------------------------------------------


@dataclass
class Outcome:
    prompt_tokens: int
    completion_tokens: int = 0
    finish_reason: str = "stop"


class _IncrementalDecoder:
    """Generated tokens to text deltas, as vLLM and TGI detokenize: a delta is sent once the decoded text grows
    and does not end in an incomplete character, so the deltas join to the decode of all tokens."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = self.read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        self.ids.append(token)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        text = self._decode(self.ids[self.prefix_offset :])
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return text[len(prefix) :]
        return ""

    def rest(self) -> str:
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        text = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix) :]


class Engine:
    """One model generating for one request at a time; the others wait on the lock."""

    def __init__(self, model: Any, tokenizer: Any, name: str, context_length: int) -> None:
        self.model, self.tokenizer, self.name, self.context_length = model, tokenizer, name, context_length
        self.device = next(model.parameters()).device
        self.lock = asyncio.Lock()
        # Set on SIGTERM: the completion in progress stops at its next token, those waiting are refused (503).
        self.stopping = threading.Event()
        eos = model.generation_config.eos_token_id
        ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            ids.add(tokenizer.eos_token_id)
        self.eos_ids = sorted(ids)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]

    def encode(self, messages: list[dict[str, str]]) -> list[int]:
        """The prompt's tokens: the chat template with the generation prompt, or without a template the
        messages' text one per line (as training formats prompts for such a model)."""
        if getattr(self.tokenizer, "chat_template", None):
            try:
                text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except Exception as exc:  # a template may refuse an order of roles (raise_exception in Jinja)
                raise ApiError(f"the model's chat template refused these messages: {exc}", param="messages") from None
        else:
            text = "".join(m["content"] + "\n" for m in messages)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def check_logit_bias(self, request: ChatRequest) -> None:
        """ApiError for a biased token id the model's vocabulary lacks (it would index past the logits)."""
        vocabulary = self.model.get_output_embeddings().weight.shape[0]
        unknown = sorted(token for token, _ in request.logit_bias if token >= vocabulary)
        if unknown:
            raise ApiError(
                f"'logit_bias' names token ids this model lacks ({vocabulary} tokens): {unknown[:5]}",
                param="logit_bias",
            )

    def budget(self, prompt_tokens: int, max_tokens: int | None) -> int:
        """The completion's token limit; ApiError when the prompt and it don't fit the context."""
        wanted = max_tokens if max_tokens is not None else 0
        if prompt_tokens + wanted > self.context_length or prompt_tokens >= self.context_length:
            asked = f"{prompt_tokens + wanted} tokens ({prompt_tokens} in the messages, {wanted} in the completion)"
            raise ApiError(
                f"This model's maximum context length is {self.context_length} tokens. However, you requested "
                f"{asked}. Please reduce the length of the messages or completion.",
                param="messages",
                code="context_length_exceeded",
            )
        return max_tokens if max_tokens is not None else self.context_length - prompt_tokens

    def _generation_kwargs(self, ids: list[int], request: ChatRequest, limit: int) -> dict[str, Any]:
        import torch
        from transformers import GenerationConfig, LogitsProcessorList

        sampling: dict[str, Any] = {"do_sample": False}
        if request.temperature > 0:
            # OpenAI's sampling has no top-k: the model's own default (often 50) is turned off.
            sampling = {"do_sample": True, "temperature": request.temperature, "top_p": request.top_p, "top_k": 0}
        config = GenerationConfig(
            max_new_tokens=limit,
            eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id,
            bos_token_id=self.model.generation_config.bos_token_id,
            **sampling,
        )
        processors = LogitsProcessorList()
        if request.frequency_penalty or request.presence_penalty:
            processors.append(_Penalties(len(ids), request.frequency_penalty, request.presence_penalty))
        if request.logit_bias:
            processors.append(_LogitBias(request.logit_bias))
        input_ids = torch.tensor([ids], device=self.device)
        return {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "generation_config": config,
            "logits_processor": processors,
        }

    async def completion(
        self, ids: list[int], request: ChatRequest, limit: int, outcome: Outcome
    ) -> AsyncGenerator[str, None]:
        """Text deltas of the completion (stop sequences cut off); outcome gets the counts and finish reason.

        The model runs in a thread; closing this iterator early (a client that went away) stops it at the next
        token, and the iterator returns only once the thread is done, so the next request never overlaps it.
        """
        import anyio
        import torch
        from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        cancel = threading.Event()
        decoder = _IncrementalDecoder(self.tokenizer)
        counts = {"generated": 0, "last": -1}
        done = object()

        class Streamer(BaseStreamer):
            prompt_seen = False

            def put(self, value: Any) -> None:
                if not self.prompt_seen:  # generate() passes the prompt first
                    self.prompt_seen = True
                    return
                for token in value.reshape(-1).tolist():
                    counts["generated"] += 1
                    counts["last"] = token
                    delta = decoder.add(token)
                    if delta:
                        loop.call_soon_threadsafe(queue.put_nowait, delta)

            def end(self) -> None:
                delta = decoder.rest()
                if delta:
                    loop.call_soon_threadsafe(queue.put_nowait, delta)

        class Cancelled(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                stop = cancel.is_set() or engine.stopping.is_set()
                return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)

        if self.stopping.is_set():
            raise ApiError("the server is shutting down", type="server_error", status=503)
        engine = self
        kwargs = self._generation_kwargs(ids, request, limit)

        def work() -> None:
            try:
                if request.seed is not None:
                    torch.manual_seed(request.seed)
                with torch.inference_mode():
                    self.model.generate(
                        **kwargs, streamer=Streamer(), stopping_criteria=StoppingCriteriaList([Cancelled()])
                    )
                loop.call_soon_threadsafe(queue.put_nowait, done)
            except BaseException as exc:  # handed to the request, which answers with it
                loop.call_soon_threadsafe(queue.put_nowait, exc)

        thread = threading.Thread(target=work, name="generate", daemon=True)
        thread.start()
        scanner = StopScanner(request.stop)
        stopped = False
        try:
            while True:
                item = await queue.get()
                if item is done:
                    break
                if isinstance(item, BaseException):
                    raise item
                text, stopped = scanner.feed(item)
                if text:
                    yield text
                if stopped:
                    break
            if not stopped:
                rest = scanner.flush()
                if rest:
                    yield rest
        finally:
            cancel.set()
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(thread.join)
        outcome.completion_tokens = counts["generated"]
        if stopped or counts["last"] in self.eos_ids:
            outcome.finish_reason = "stop"
        elif counts["generated"] >= limit:
            outcome.finish_reason = "length"
        elif self.stopping.is_set():
            raise ApiError("the server shut down during this completion", type="server_error", status=503)


class _Penalties:
    """OpenAI's frequency and presence penalties: each generated token's logit lowers by
    frequency_penalty x its count so far + presence_penalty if it occurred at all."""

    def __init__(self, prompt_length: int, frequency: float, presence: float) -> None:
        self.prompt_length, self.frequency, self.presence = prompt_length, frequency, presence

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        generated = input_ids[:, self.prompt_length :]
        if generated.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - counts * self.frequency - (counts > 0).to(scores.dtype) * self.presence


class _LogitBias:
    """OpenAI's logit_bias: each listed token's bias added to its logit before sampling (or the greedy pick)."""

    def __init__(self, bias: tuple[tuple[int, float], ...]) -> None:
        self.tokens = [token for token, _ in bias]
        self.values = [value for _, value in bias]

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        shifted = scores.clone()
        shifted[:, self.tokens] += torch.tensor(self.values, dtype=scores.dtype, device=scores.device)
        return shifted


# --- the HTTP app ---------------------------------------------------------------------------------


def _usage(outcome: Outcome) -> dict[str, int]:
    return {
        "prompt_tokens": outcome.prompt_tokens,
        "completion_tokens": outcome.completion_tokens,
        "total_tokens": outcome.prompt_tokens + outcome.completion_tokens,
    }


def build_app(engine: Engine):
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    created_at = int(time.time())

    def error_response(error: ApiError) -> Response:
        return JSONResponse(error.body(), status_code=error.status)

    async def chat_completions(request: Request) -> Response:
        try:
            body = json.loads(await request.body())
        except ValueError as exc:
            return error_response(ApiError(f"the request body is not valid JSON: {exc}"))
        try:
            chat = parse_chat_request(body, engine.name)
            engine.check_logit_bias(chat)
            ids = engine.encode(chat.messages)
            limit = engine.budget(len(ids), chat.max_tokens)
        except ApiError as error:
            return error_response(error)
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        outcome = Outcome(prompt_tokens=len(ids))
        started = time.perf_counter()

        def logged() -> None:
            log(
                f"chat.completion {completion_id}: {outcome.prompt_tokens} prompt + {outcome.completion_tokens} "
                f"completion tokens in {time.perf_counter() - started:.2f}s, {outcome.finish_reason}"
            )

        if not chat.stream:
            try:
                async with engine.lock:
                    async with contextlib.aclosing(engine.completion(ids, chat, limit, outcome)) as deltas:
                        text = "".join([delta async for delta in deltas])
            except ApiError as error:  # shutting down
                return error_response(error)
            logged()
            return JSONResponse(
                {
                    "id": completion_id,
                    "object": "chat.completion",
                    "created": created,
                    "model": engine.name,
                    "system_fingerprint": None,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": text, "refusal": None},
                            "logprobs": None,
                            "finish_reason": outcome.finish_reason,
                        }
                    ],
                    "usage": _usage(outcome),
                }
            )

        def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
            payload: dict[str, Any] = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": engine.name,
                "system_fingerprint": None,
                "choices": choices,
            }
            if chat.include_usage:
                payload["usage"] = usage
            return f"data: {json.dumps(payload)}\n\n"

        def choice(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

        async def events() -> AsyncIterator[str]:
            async with engine.lock:
                yield chunk([choice({"role": "assistant", "content": "", "refusal": None})])
                try:
                    async with contextlib.aclosing(engine.completion(ids, chat, limit, outcome)) as deltas:
                        async for delta in deltas:
                            yield chunk([choice({"content": delta})])
                except Exception as exc:  # the status is sent already: report it in the stream, as OpenAI does
                    log(f"chat.completion {completion_id} failed: {type(exc).__name__}: {exc}")
                    error = (
                        exc
                        if isinstance(exc, ApiError)
                        else ApiError(f"generation failed: {exc}", type="server_error", status=500)
                    )
                    yield f"data: {json.dumps(error.body())}\n\n"
                    return
            logged()
            yield chunk([choice({}, outcome.finish_reason)])
            if chat.include_usage:
                yield chunk([], _usage(outcome))
            yield "data: [DONE]\n\n"

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )

    async def models(request: Request) -> Response:
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {
                        "id": engine.name,
                        "object": "model",
                        "created": created_at,
                        "owned_by": "tuneforge",
                        "max_model_len": engine.context_length,
                    }
                ],
            }
        )

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        error = ApiError(f"{exc.detail}: {request.method} {request.url.path}", status=exc.status_code)
        return JSONResponse(error.body(), status_code=exc.status_code, headers=exc.headers)

    async def server_error(request: Request, exc: Exception) -> Response:
        log(f"{request.method} {request.url.path} failed: {type(exc).__name__}: {exc}")
        error = ApiError(f"internal error: {type(exc).__name__}: {exc}", type="server_error", status=500)
        return JSONResponse(error.body(), status_code=500)

    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
        ],
        exception_handlers={HTTPException: http_error, Exception: server_error},
    )


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UsageError(f"--host={host} --port={port}: cannot listen there: {exc}") from None
    return sock


async def serve_app(app: Any, sock: socket.socket, host: str, engine: Engine) -> None:
    """Serve until SIGTERM/SIGINT (uvicorn's handlers then shut it down gracefully), announcing readiness."""
    import uvicorn

    config = uvicorn.Config(
        app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S
    )

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            engine.stopping.set()  # so the response in progress ends now, not at the graceful timeout
            super().handle_exit(sig, frame)

    server = Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if _stop_requested.is_set():
            server.should_exit = True
        if task.done():
            await task
            raise Failure("the HTTP server stopped while starting")
        await asyncio.sleep(0.02)
    announce_ready(host, sock.getsockname()[1])
    await task


_stop_requested = threading.Event()


def _note_stop(signum: int, frame: Any) -> None:
    _stop_requested.set()


def context_length(model: Any, flag: int) -> int:
    limit = getattr(model.config, "max_position_embeddings", None) or 0
    if flag and limit and flag > limit:
        raise UsageError(f"--max_model_len={flag}: the model's context is {limit} tokens (max_position_embeddings)")
    if not (flag or limit):
        raise UsageError("--max_model_len: the model's config gives no max_position_embeddings; set it")
    return flag or limit


def serve_transformers(params: ServeParams, model_path: Path, adapter: Path | None, name: str) -> int:
    import torch

    from tuneforge_trainer.runner import cuda_state, quiet_libraries

    cuda, cuda_bf16 = cuda_state()
    precision = lifecycle.inference_precision(params.precision, cuda, cuda_bf16)
    sock = bind(params.host, params.port)
    quiet_libraries()
    log_data(0, stage="loading model")
    model, tokenizer = lifecycle.load_for_inference(model_path, adapter, precision, "cuda" if cuda else "cpu")
    engine = Engine(model, tokenizer, name, context_length(model, params.max_model_len))
    torch.set_grad_enabled(False)
    log(
        f"serve: {name} ({precision}, {engine.device}, context {engine.context_length} tokens) "
        f"on http://{params.host}:{sock.getsockname()[1]}/v1"
    )
    # uvicorn catches SIGTERM while it serves and raises it again once stopped; ours only notes it, so the exit
    # is 0, and a SIGTERM in the moment before uvicorn's handler is in place still stops the server.
    signal.signal(signal.SIGTERM, _note_stop)
    asyncio.run(serve_app(build_app(engine), sock, params.host, engine))
    log("serve: stopped")
    return 0


# --- vLLM -----------------------------------------------------------------------------------------


def _local(host: str) -> str:
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def serve_vllm(params: ServeParams, model_path: Path, adapter: Path | None, name: str) -> int:
    """vLLM's OpenAI server as a subprocess (its log on our stderr); not covered by the tests (needs a GPU)."""
    import urllib.request

    port = params.port
    if port == 0:  # vLLM takes no port 0: pick a free one
        with bind(params.host, 0) as probe:
            port = probe.getsockname()[1]
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_path)]
    command += ["--host", params.host, "--port", str(port)]
    if adapter is not None:
        rank = int(json.loads((adapter / "adapter_config.json").read_text()).get("r", 16))
        command += [
            "--enable-lora",
            "--lora-modules",
            f"{name}={adapter}",
            "--max-lora-rank",
            str(max(16, 1 << (rank - 1).bit_length())),
        ]
        if (adapter / "tokenizer_config.json").is_file():
            command += ["--tokenizer", str(adapter)]
    else:
        command += ["--served-model-name", name]
    if params.max_model_len:
        command += ["--max-model-len", str(params.max_model_len)]
    if params.precision != "auto":
        command += ["--dtype", {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[params.precision]]
    log("serve: " + " ".join(command))
    process = subprocess.Popen(command, stdout=sys.stderr)
    stopping = False

    def forward(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True
        process.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    local = _local(params.host)
    url = f"http://{f'[{local}]' if ':' in local else local}:{port}/health"
    while not stopping:
        if process.poll() is not None:
            raise Failure(f"vLLM exited with code {process.returncode} before it was ready (its log is above)")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    announce_ready(params.host, port)
                    break
        except OSError:
            pass
        time.sleep(1)
    code = process.wait()
    return 0 if stopping and code in (0, -signal.SIGTERM) else code


def choose_engine(flag: str) -> str:
    from tuneforge_trainer.hardware import installed
    from tuneforge_trainer.runner import cuda_state

    vllm_ok = installed("vllm") and cuda_state()[0]
    if flag == "vllm" and not vllm_ok:
        raise UsageError("--engine=vllm needs the vllm package and a CUDA GPU")
    if flag == "auto":
        return "vllm" if vllm_ok else "transformers"
    return flag


def serve(params: ServeParams) -> int:
    model_path = lifecycle.model_dir("model_path", params.model_path)
    adapter = lifecycle.adapter_dir("adapter_path", params.adapter_path)
    name = params.served_model_name or (adapter or model_path).resolve().name
    try:
        if choose_engine(params.engine) == "vllm":
            return serve_vllm(params, model_path, adapter, name)
        return serve_transformers(params, model_path, adapter, name)
    except lifecycle.Stopped:  # SIGTERM while loading: a clean stop too
        log("serve: stopped before it was ready")
        return 0


def main(argv: list[str] | None = None) -> int:
    return lifecycle.run_program("serve", ServeParams, serve, argv)


if __name__ == "__main__":
    raise SystemExit(main())
