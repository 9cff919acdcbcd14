"""The OpenAI request and response shapes the server speaks: validation of request bodies into
`CompletionParams` (every parameter either honoured or refused with a message naming it), and the
JSON of responses, stream chunks and errors."""

from __future__ import annotations

import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

COMPLETION_KEYS = {"model", "prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "stream",
                   "stream_options", "n", "echo", "logprobs", "best_of", "presence_penalty", "frequency_penalty",
                   "logit_bias", "suffix", "user"}
CHAT_KEYS = (COMPLETION_KEYS - {"prompt", "echo", "best_of", "suffix"}) | {
    "messages", "max_completion_tokens", "top_logprobs", "response_format", "tools", "tool_choice",
    "parallel_tool_calls"}
CHAT_ROLES = ("system", "user", "assistant", "developer")

DEFAULT_CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant:{% endif %}")
"""Used when the checkpoint's tokenizer has no chat template: one `role: content` line per message,
then `assistant:`."""


class RequestError(Exception):
    """A request the server refuses: HTTP `status`, OpenAI error `type`, the parameter at fault."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 type_: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.type, self.code = message, param, status, type_, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class CompletionParams:
    """What one request asks for, validated. prompt: text (None when `prompt_ids` are given) or chat
    `messages`; max_tokens None: as many as the context allows (chat's default)."""

    model: str
    prompt: str | None = None
    prompt_ids: list[int] | None = None
    messages: list[dict] | None = None
    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = field(default_factory=lambda: secrets.randbits(63))
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False


def _number(body: dict, key: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"'{key}' must be a number, got {value!r}", key)
    if value > high or value < low or (low_open and value == low):
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise RequestError(f"'{key}' must be in {bound}, got {value}", key)
    return float(value)


def _integer(body: dict, key: str, low: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"'{key}' must be an integer, got {value!r}", key)
    if value < low:
        raise RequestError(f"'{key}' must be >= {low}, got {value}", key)
    return value


def _refuse_unsupported(body: dict) -> None:
    """Parameters the server knows but does not implement: refused unless given their no-op value."""
    neutral = {"n": (None, 1), "best_of": (None, 1), "echo": (None, False), "logprobs": (None, False),
               "top_logprobs": (None, 0), "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
               "logit_bias": (None, {}), "suffix": (None, ""), "tools": (None, []), "tool_choice": (None, "none"),
               "parallel_tool_calls": (None, False, True)}
    for key, allowed in neutral.items():
        if key in body and body[key] not in allowed:
            raise RequestError(f"'{key}' = {body[key]!r} is not supported by this server", key)
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise RequestError(f"'response_format' = {fmt!r} is not supported (only {{'type': 'text'}})", "response_format")


def _common(body: Any, model_name: str, allowed: set[str]) -> CompletionParams:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise RequestError(f"unsupported parameter '{unknown[0]}'", unknown[0])
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError("'model' is required (a string)", "model")
    if model != model_name:
        raise RequestError(f"the model '{model}' does not exist; this server serves '{model_name}'", "model",
                           code="model_not_found")
    _refuse_unsupported(body)
    params = CompletionParams(model=model)
    params.temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    params.top_p = _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True)
    seed = _integer(body, "seed", -(1 << 63))
    if seed is not None:
        params.seed = seed
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or len(stop) > 4
                             or not all(isinstance(s, str) and s for s in stop)):
        raise RequestError("'stop' must be a non-empty string or a list of at most 4 of them", "stop")
    params.stop = stop or []
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise RequestError(f"'stream' must be a boolean, got {stream!r}", "stream")
    params.stream = bool(stream)
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise RequestError("'stream_options' may only hold 'include_usage'", "stream_options")
        params.include_usage = bool(options.get("include_usage", False))
    if not isinstance(body.get("user", ""), str):
        raise RequestError("'user' must be a string", "user")
    return params


def parse_completion(body: Any, model_name: str) -> CompletionParams:
    """A `/v1/completions` body: one prompt (a string, token ids, or a list of exactly one of those)."""
    params = _common(body, model_name, COMPLETION_KEYS)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str) and prompt:
        params.prompt = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        params.prompt_ids = list(prompt)
    elif isinstance(prompt, list) and len(prompt) > 1:
        raise RequestError("'prompt': one prompt per request (send a request per prompt)", "prompt")
    else:
        raise RequestError("'prompt' must be a non-empty string or a non-empty list of token ids", "prompt")
    params.max_tokens = _integer(body, "max_tokens", 1) or 16
    return params


def parse_chat(body: Any, model_name: str) -> CompletionParams:
    """A `/v1/chat/completions` body: `messages` of string contents; max_tokens defaults to the rest
    of the context."""
    params = _common(body, model_name, CHAT_KEYS)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list", "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES:
            raise RequestError(f"messages[{i}]: 'role' must be one of {', '.join(CHAT_ROLES)}", "messages")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str)
                       for c in content):
                raise RequestError(f"messages[{i}]: only text content parts are supported", "messages")
            content = "".join(c["text"] for c in content)
        if not isinstance(content, str):
            raise RequestError(f"messages[{i}]: 'content' must be a string", "messages")
        extra = set(m) - {"role", "content", "name"}
        if extra:
            raise RequestError(f"messages[{i}]: unsupported field '{sorted(extra)[0]}'", "messages")
    params.messages = [{"role": "system" if m["role"] == "developer" else m["role"],
                        "content": m["content"] if isinstance(m["content"], str)
                        else "".join(c["text"] for c in m["content"])} for m in messages]
    given = [k for k in ("max_completion_tokens", "max_tokens") if body.get(k) is not None]
    params.max_tokens = _integer(body, given[0], 1) if given else None
    return params


# ----------------------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(rid: str, model: str, text: str, finish: str, use: dict, chat: bool) -> dict:
    """A whole (non-streamed) response."""
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish}
        return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
                "choices": [choice], "usage": use}
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [choice], "usage": use}


def chunk_body(rid: str, model: str, text: str | None, finish: str | None, chat: bool, first: bool = False,
               use: dict | None = None) -> dict:
    """One streamed chunk (`text` None: no content, e.g. the final chunk carrying finish_reason)."""
    if chat:
        delta: dict = {"role": "assistant", "content": ""} if first else {}
        if text:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        body = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
                "choices": [choice]}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        body = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
                "choices": [choice]}
    if use is not None:
        body["usage"] = use
    return body
