"""Simulated LLM providers for the relay: OpenAI, Anthropic and Ollama on one local port.

Used by `make run`, the pytest suite and the Locust load tests. Standard library + aiohttp.

Running it
----------
    python -m sim.providers --port 0            # prints "SIM_READY http://127.0.0.1:<port>"

(``sim.stack.start_simulator`` runs it so for the tests, the load tests and ``make run``.)

Endpoints
---------
OpenAI-compatible (clients use api_base = <url>/v1):
    POST /v1/chat/completions  (also /chat/completions)   JSON, or SSE when "stream": true
    POST /v1/completions       (also /completions)        JSON, or SSE when "stream": true
    GET  /v1/models            (also /models)             Anthropic's format if the request
                                                          carries an `anthropic-version` header
Anthropic Messages (clients use api_base = <url>):
    POST /v1/messages                                     JSON, or SSE events when "stream": true
Ollama (clients use api_base = <url>):
    POST /api/chat       litellm `ollama_chat/<model>`    NDJSON stream unless "stream": false
    POST /api/generate   litellm `ollama/<model>`         NDJSON stream unless "stream": false
    GET  /api/tags, POST /api/show, GET /api/version
Admin (JSON, not recorded):
    GET  /_sim/requests[?model=X][&path=/v1/messages]     recorded requests, oldest first
    GET  /_sim/stats                                      hit counters, in-flight, cancelled
    POST /_sim/reset                                      clear recordings/counters, re-seed RNG
    GET|POST /_sim/config                                 read / change the knobs below, and
                                                          force_markers {"<model>": "SIM:HTTP429"}
    GET  /_sim/health                                     {"ok": true}

Every non-admin request is recorded (the last 10,000) as {id, path, model, headers, body,
received_at, status, cancelled, outcome}. `status` is the HTTP status answered (None when
nothing was answered: drop, or a hang the client gave up on); `cancelled` is true when the
client went away before the answer was complete.

Markers (searched in `prompt_text`: system + all messages of the current request, one string)
-------
The answers follow sim/markers.py, the marker language the provider emulators speak too:
SIM:HTTP<status> (429 carries `Retry-After`, knob retry_after), the guard verdict and escalate
score of a judge prompt (SIM:BLOCK, SIM:LOWSCORE, SIM:GARBAGE), SIM:ANSWER=<text>, structured
output, max_tokens truncation, SIM:USAGE=<n>, and "<model> says: <last user message>" otherwise.
This simulator knows a few more, after SIM:HTTP<status> in this order (the first found decides):
    SIM:HANG          never answer (sleeps an hour; cancelled when the client goes away)
    SIM:DROP          close the connection without any response
    SIM:MALFORMED     200 with a body (or stream line) that is not valid JSON
    SIM:EMPTY         200 with choices: [] / content: [] / empty Ollama message content
    SIM:SLEEP=<ms>    extra latency before answering (last occurrence wins)
and tool calls: a forced tool (`tool_choice` naming one) is called with the judge's JSON object as
its arguments; SIM:TOOLCALL in the last user message of a request with tools (not a judge prompt)
calls the first tool (or SIM:TOOLCALL=<name>), arguments = the schema's required properties with
placeholders. Structured output is asked for as OpenAI `response_format` (`json_schema`, or
`json_object` with a `schema` as llama-cpp-python takes it), Anthropic `output_format`, Ollama `format`.

Knobs (CLI flag, env var, POST /_sim/config key, per-model override)
-----
    --host          SIM_HOST          127.0.0.1 (loopback addresses only)
    --port          SIM_PORT          0 = pick a free port
    --latency-ms    SIM_LATENCY_MS    latency before the first byte of every answer
    --ttft-ms       SIM_TTFT_MS       streaming: extra delay before the first token
    --tokens-per-s  SIM_TOKENS_PER_S  streaming: token pacing (0 = no pacing)
    --error-rate    SIM_ERROR_RATE    fraction of requests answered with a 500
    --hang-rate     SIM_HANG_RATE     fraction of requests that hang
    --retry-after   SIM_RETRY_AFTER   seconds sent in Retry-After on 429s (default 1)
    --seed          SIM_SEED          seed for the error/hang RNG
    --model-config  SIM_MODEL_CONFIG  JSON {"<model>": {"latency_ms": 50, "error_rate": 0.5}},
                                      keyed by the request's `model` field; the keys are the
                                      knob names latency_ms ... retry_after above
    --access-log                      log every request to stderr
Random faults (error_rate, hang_rate) only hit requests that carry no fault marker.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import ipaddress
import json
import os
import random
import re
import signal
import socket
import time
import uuid
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from aiohttp import web

from sim.markers import (
    PLACEHOLDERS, Answer, compose, content_text, count_tokens, error_status, forced_tool, is_judge_prompt,
    judged_values, new_id, ollama_schema, openai_schema, pieces, schema_instance, sse,
)

# =============================================================================
# Configuration
# =============================================================================

MAX_RECORDS = 10_000
HANG_SECONDS = 3600.0
DEFAULT_MODELS = ("gpt-x", "claude-x", "llama3")
OLLAMA_VERSION = "0.12.0"

# Knobs that can also be overridden per model in `model_config`.
KNOB_NAMES = ("latency_ms", "ttft_ms", "tokens_per_s", "error_rate", "hang_rate", "retry_after")


@dataclass
class SimConfig:
    host: str = "127.0.0.1"
    port: int = 0
    latency_ms: float = 0.0
    ttft_ms: float = 0.0
    tokens_per_s: float = 0.0
    error_rate: float = 0.0
    hang_rate: float = 0.0
    retry_after: float = 1.0
    seed: int | None = None
    model_config: dict[str, dict[str, float]] = field(default_factory=dict)
    # Markers added to every request for a model, e.g. {"gpt-4o-mini": "SIM:HTTP429"}: lets a test make
    # one secondary misbehave without the marker appearing in (and breaking) the primary's prompt.
    force_markers: dict[str, str] = field(default_factory=dict)

    def for_model(self, model: str) -> SimConfig:
        """This config with the per-model overrides for `model` applied."""
        return dataclasses.replace(self, **self.model_config.get(model, {}))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_knobs(values: dict[str, Any]) -> dict[str, float]:
    """Validate knob values (names from KNOB_NAMES, non-negative numbers, rates <= 1)."""
    clean = {}
    for name, value in values.items():
        if name not in KNOB_NAMES:
            raise ValueError(f"unknown knob {name!r}; known: {', '.join(KNOB_NAMES)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name} must be a number, got {value!r}")
        if value < 0 or (name.endswith("_rate") and value > 1):
            raise ValueError(f"{name} out of range: {value!r}")
        clean[name] = float(value)
    return clean


def check_model_config(value: Any) -> dict[str, dict[str, float]]:
    """Validate a per-model override table, given as a dict or a JSON string."""
    if isinstance(value, str):
        value = json.loads(value) if value.strip() else {}
    if not isinstance(value, dict):
        raise ValueError("model_config must be a JSON object keyed by model name")
    table = {}
    for model, knobs in value.items():
        if not isinstance(knobs, dict):
            raise ValueError(f"model_config[{model!r}] must be an object of knobs")
        table[str(model)] = check_knobs(knobs)
    return table


def check_seed(value: Any) -> int | None:
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise ValueError(f"seed must be an integer or null, got {value!r}")


def loopback_host(host: str) -> str:
    """The host to bind, refusing anything that is not a loopback address."""
    if host == "localhost":
        return "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"host must be a loopback IP address, got {host!r}") from None
    if not address.is_loopback:
        raise ValueError(f"host must be a loopback address, got {host!r}")
    return host


# =============================================================================
# Small helpers: ids, tokens, text of a request
# =============================================================================


def messages_text(messages: Any) -> list[str]:
    if not isinstance(messages, list):
        return []
    return [content_text(m.get("content")) for m in messages if isinstance(m, dict)]


def last_user_text(messages: Any) -> str | None:
    if not isinstance(messages, list):
        return None
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return content_text(message.get("content"))
    return None


def normalise_tools(tools: Any) -> list[dict[str, Any]]:
    """Tools as [{"name", "schema"}], from OpenAI/Ollama ({"type": "function", "function":
    {"name", "parameters"}}) or Anthropic ({"name", "input_schema"}) definitions."""
    if not isinstance(tools, list):
        return []
    result = []
    for tool in tools:
        if not isinstance(tool, dict):
            continue
        if isinstance(tool.get("function"), dict):
            function = tool["function"]
            result.append({"name": function.get("name", ""), "schema": function.get("parameters")})
        elif "name" in tool:
            schema = tool.get("input_schema", tool.get("parameters"))
            result.append({"name": tool["name"], "schema": schema})
    return result


def positive_int(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


# =============================================================================
# Deciding what to answer
# =============================================================================


@dataclass
class SimRequest:
    """What the simulator needs from one generation request, whatever the API."""

    model: str
    prompt_text: str  # system + all messages, flattened; markers are searched here
    last_user_text: str
    stream: bool
    n: int = 1
    max_tokens: int | None = None
    tools: list[dict[str, Any]] = field(default_factory=list)
    include_usage: bool = False
    logprobs: bool = False  # chat: the client asked for token log probabilities
    #: structured output: the JSON schema the answer must satisfy ({} = any JSON object), or None
    schema: dict[str, Any] | None = None
    forced_tool: str | None = None  #: the tool a tool_choice insists on
    started: float = field(default_factory=time.monotonic)


@dataclass
class Behaviour:
    """What the simulator does with one request, decided from its markers (and the random-fault knobs)."""

    kind: str  # "answer", "error", "hang", "drop" or "malformed"
    status: int = 200
    message: str = ""
    sleep_ms: float = 0.0
    answer: Answer | None = None


SLEEP_RE = re.compile(r"SIM:SLEEP=(\d+(?:\.\d+)?)")
TOOLCALL_RE = re.compile(r"SIM:TOOLCALL(?:=([\w.-]+))?")
ERROR_MESSAGES = {500: "simulated server error", 429: "simulated rate limit", 400: "simulated bad request"}


def behaviour_for(req: SimRequest) -> Behaviour:
    """Decide the outcome of a request from the markers in its text."""
    text = req.prompt_text
    sleeps = SLEEP_RE.findall(text)
    sleep_ms = float(sleeps[-1]) if sleeps else 0.0
    status = error_status(text)
    if status is not None:
        message = f"{ERROR_MESSAGES.get(status, 'simulated error')} (SIM:HTTP{status})"
        return Behaviour("error", status=status, message=message, sleep_ms=sleep_ms)
    if "SIM:HANG" in text:
        return Behaviour("hang")
    if "SIM:DROP" in text:
        return Behaviour("drop", sleep_ms=sleep_ms)
    if "SIM:MALFORMED" in text:
        return Behaviour("malformed", sleep_ms=sleep_ms)
    if "SIM:EMPTY" in text:
        empty = Answer("empty", prompt_tokens=count_tokens(text))
        return Behaviour("answer", sleep_ms=sleep_ms, answer=empty)
    return Behaviour("answer", sleep_ms=sleep_ms, answer=compose_answer(req))


def compose_answer(req: SimRequest) -> Answer:
    """The answer of sim/markers.py, or a tool call: a forced tool, or SIM:TOOLCALL outside a judge prompt."""
    if req.forced_tool and req.tools:
        return tool_call_answer(req, wanted_name=req.forced_tool)
    tool_marker = TOOLCALL_RE.search(req.last_user_text)
    if tool_marker and req.tools and not is_judge_prompt(req.prompt_text):
        return tool_call_answer(req, wanted_name=tool_marker.group(1))
    return compose(req.model, req.prompt_text, req.last_user_text, schema=req.schema, max_tokens=req.max_tokens)


def tool_call_answer(req: SimRequest, wanted_name: str | None) -> Answer:
    tool = req.tools[0]
    for candidate in req.tools:
        if candidate["name"] == wanted_name:
            tool = candidate
    arguments = fake_arguments(tool["schema"])
    if req.forced_tool:  # a forced tool stands in for structured output: the judge's values where they fit
        plain = compose_answer(dataclasses.replace(req, forced_tool=None, tools=[], schema=None, max_tokens=None))
        arguments = schema_instance(tool["schema"], judged_values(plain.text))
    return Answer(
        "tool_call",
        finish="tool_calls",
        tool_name=tool["name"],
        tool_arguments=arguments,
        tool_call_id=uuid.uuid4().hex[:24],
        prompt_tokens=count_tokens(req.prompt_text),
        completion_tokens=count_tokens(tool["name"] + " " + json.dumps(arguments)),
    )


def fake_arguments(schema: Any) -> dict[str, Any]:
    """Every required property of a tool's JSON schema, with a placeholder of the right type."""
    if not isinstance(schema, dict):
        return {}
    properties = schema.get("properties") or {}
    arguments = {}
    for name in schema.get("required") or []:
        spec = properties.get(name) or {}
        if spec.get("enum"):
            arguments[name] = spec["enum"][0]
        elif isinstance(spec.get("type"), str):
            arguments[name] = PLACEHOLDERS.get(spec["type"], "sim")
        else:
            arguments[name] = "sim"
    return arguments


# =============================================================================
# Streaming helper (pacing, client disconnects)
# =============================================================================


class ClientGone(Exception):
    """The client closed the connection while a stream was being written."""

    def __init__(self, response: web.StreamResponse) -> None:
        super().__init__("client disconnected")
        self.response = response


class Streamer:
    """A prepared streaming response plus the pacing knobs (ttft_ms, tokens_per_s)."""

    def __init__(self, response: web.StreamResponse, config: SimConfig) -> None:
        self.response = response
        self.ttft_s = config.ttft_ms / 1000
        self.token_gap_s = 1 / config.tokens_per_s if config.tokens_per_s > 0 else 0.0
        self.tokens_sent = 0

    @classmethod
    async def open(
        cls, request: web.Request, content_type: str, config: SimConfig
    ) -> Streamer:
        headers = {"Content-Type": content_type, "Cache-Control": "no-cache"}
        response = web.StreamResponse(status=200, headers=headers)
        streamer = cls(response, config)
        try:
            await response.prepare(request)
        except ConnectionResetError:
            raise ClientGone(response) from None
        return streamer

    async def pace(self) -> None:
        """Wait before the next generated token: ttft before the first, then 1/tokens_per_s."""
        delay = self.ttft_s if self.tokens_sent == 0 else self.token_gap_s
        self.tokens_sent += 1
        if delay > 0:
            await asyncio.sleep(delay)

    async def send(self, data: bytes) -> None:
        try:
            await self.response.write(data)
        except ConnectionResetError:
            raise ClientGone(self.response) from None

    async def close(self) -> None:
        try:
            await self.response.write_eof()
        except ConnectionResetError:
            raise ClientGone(self.response) from None


def ndjson(data: dict[str, Any]) -> bytes:
    return json.dumps(data).encode() + b"\n"


# The body sent for SIM:MALFORMED: the start of a JSON object that never ends.
BROKEN_JSON = b'{"id": "sim-malformed", "choices": [{"broken": '
SSE_TYPE = "text/event-stream; charset=utf-8"
NDJSON_TYPE = "application/x-ndjson"


# =============================================================================
# OpenAI: /v1/chat/completions, /v1/completions
# =============================================================================

OPENAI_ERROR_TYPES = {
    400: ("invalid_request_error", None),
    429: ("requests", "rate_limit_exceeded"),
    500: ("server_error", None),
}


def openai_error(status: int, message: str) -> dict[str, Any]:
    error_type, code = OPENAI_ERROR_TYPES.get(status, ("server_error", None))
    return {"error": {"message": message, "type": error_type, "param": None, "code": code}}


def openai_max_tokens(body: dict[str, Any]) -> int | None:
    return positive_int(body.get("max_completion_tokens")) or positive_int(body.get("max_tokens"))


def openai_include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def openai_usage(req: SimRequest, answer: Answer) -> dict[str, int]:
    completion = answer.completion_tokens * (req.n if answer.kind != "empty" else 1)
    return {
        "prompt_tokens": answer.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": answer.prompt_tokens + completion,
    }


def chat_request(body: dict[str, Any], **fields: Any) -> SimRequest:
    """A SimRequest from a body with OpenAI/Ollama-style ``messages``; ``fields`` are the API's own."""
    messages = body.get("messages")
    prompt_text = "\n".join(messages_text(messages))
    last_user = last_user_text(messages)
    return SimRequest(
        model=str(body.get("model", "")),
        prompt_text=prompt_text,
        last_user_text=prompt_text if last_user is None else last_user,
        tools=normalise_tools(body.get("tools")),
        **fields,
    )


def parse_openai_chat(body: dict[str, Any]) -> SimRequest:
    return chat_request(
        body,
        stream=body.get("stream") is True,
        n=positive_int(body.get("n")) or 1,
        max_tokens=openai_max_tokens(body),
        include_usage=openai_include_usage(body),
        logprobs=body.get("logprobs") is True,
        schema=openai_schema(body),
        forced_tool=forced_tool(body.get("tool_choice")),
    )


def openai_logprobs(answer: Answer) -> dict[str, Any]:
    """Chat ``logprobs``: one entry per streamed piece of the answer, each with logprob -0.5."""
    return {"content": [{"token": p, "logprob": -0.5, "bytes": list(p.encode()), "top_logprobs": []}
                        for p in pieces(answer.text)],
            "refusal": None}


def openai_tool_call(answer: Answer) -> dict[str, Any]:
    return {
        "id": "call_" + answer.tool_call_id,
        "type": "function",
        "function": {"name": answer.tool_name, "arguments": json.dumps(answer.tool_arguments)},
    }


def render_openai_chat(req: SimRequest, answer: Answer) -> dict[str, Any]:
    choices = []
    for index in range(req.n if answer.kind != "empty" else 0):
        message: dict[str, Any] = {"role": "assistant", "content": answer.text, "refusal": None}
        if answer.kind == "tool_call":
            message["content"] = None
            message["tool_calls"] = [openai_tool_call(answer)]
        choices.append(
            {"index": index, "message": message, "finish_reason": answer.finish,
             "logprobs": openai_logprobs(answer) if req.logprobs and answer.kind == "text" else None}
        )
    return openai_envelope("chatcmpl-", "chat.completion", req, answer, choices)


def openai_envelope(
    id_prefix: str, kind: str, req: SimRequest, answer: Answer, choices: list[dict[str, Any]]
) -> dict[str, Any]:
    """The body around the choices of a non-streamed OpenAI chat or text completion."""
    return {
        "id": new_id(id_prefix),
        "object": kind,
        "created": int(time.time()),
        "model": req.model,
        "choices": choices,
        "usage": openai_usage(req, answer),
        "system_fingerprint": None,
    }


async def stream_openai_chat(streamer: Streamer, req: SimRequest, answer: Answer) -> None:
    chunk_id = new_id("chatcmpl-")
    created = int(time.time())

    def chunk(choices: list[dict[str, Any]]) -> bytes:
        data: dict[str, Any] = {
            "id": chunk_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": req.model,
            "system_fingerprint": None,
            "choices": choices,
        }
        if req.include_usage:
            data["usage"] = None
        return sse(data)

    def choice(index: int, delta: dict[str, Any], finish: str | None = None) -> list[dict]:
        return [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]

    if answer.kind == "empty":
        await streamer.send(chunk([]))
    for index in range(req.n if answer.kind != "empty" else 0):
        if answer.kind == "tool_call":
            await streamer.send(chunk(choice(index, {"role": "assistant", "content": None})))
            call = openai_tool_call(answer)
            await streamer.pace()
            opening = {**call, "index": 0, "function": {"name": answer.tool_name, "arguments": ""}}
            await streamer.send(chunk(choice(index, {"tool_calls": [opening]})))
            await streamer.pace()
            arguments = {"index": 0, "function": {"arguments": call["function"]["arguments"]}}
            await streamer.send(chunk(choice(index, {"tool_calls": [arguments]})))
        else:
            await streamer.send(chunk(choice(index, {"role": "assistant", "content": ""})))
            for piece in pieces(answer.text):
                await streamer.pace()
                await streamer.send(chunk(choice(index, {"content": piece})))
        await streamer.send(chunk(choice(index, {}, answer.finish)))

    if req.include_usage:
        usage_chunk = {
            "id": chunk_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": req.model,
            "system_fingerprint": None,
            "choices": [],
            "usage": openai_usage(req, answer),
        }
        await streamer.send(sse(usage_chunk))
    await streamer.send(b"data: [DONE]\n\n")


def parse_openai_completion(body: dict[str, Any]) -> SimRequest:
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt if isinstance(prompt, list) else []
    texts = [p for p in prompts if isinstance(p, str)]  # token-id prompts carry no text
    return SimRequest(
        model=str(body.get("model", "")),
        prompt_text="\n".join(texts),
        last_user_text=texts[-1] if texts else "",
        stream=body.get("stream") is True,
        n=positive_int(body.get("n")) or 1,
        max_tokens=openai_max_tokens(body),
        include_usage=openai_include_usage(body),
    )


def render_openai_completion(req: SimRequest, answer: Answer) -> dict[str, Any]:
    choices = [
        {"text": answer.text, "index": index, "logprobs": None, "finish_reason": answer.finish}
        for index in range(req.n if answer.kind != "empty" else 0)
    ]
    return openai_envelope("cmpl-", "text_completion", req, answer, choices)


async def stream_openai_completion(streamer: Streamer, req: SimRequest, answer: Answer) -> None:
    chunk_id = new_id("cmpl-")
    created = int(time.time())

    def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> bytes:
        data: dict[str, Any] = {
            "id": chunk_id,
            "object": "text_completion",
            "created": created,
            "model": req.model,
            "choices": choices,
        }
        if req.include_usage:
            data["usage"] = usage
        return sse(data)

    def choice(index: int, text: str, finish: str | None = None) -> list[dict[str, Any]]:
        return [{"text": text, "index": index, "logprobs": None, "finish_reason": finish}]

    if answer.kind == "empty":
        await streamer.send(chunk([]))
    for index in range(req.n if answer.kind != "empty" else 0):
        for piece in pieces(answer.text):
            await streamer.pace()
            await streamer.send(chunk(choice(index, piece)))
        await streamer.send(chunk(choice(index, "", answer.finish)))
    if req.include_usage:
        await streamer.send(chunk([], usage=openai_usage(req, answer)))
    await streamer.send(b"data: [DONE]\n\n")


# =============================================================================
# Anthropic: /v1/messages
# =============================================================================

ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 429: "rate_limit_error", 500: "api_error"}
ANTHROPIC_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


def anthropic_error(status: int, message: str) -> dict[str, Any]:
    error_type = ANTHROPIC_ERROR_TYPES.get(status, "api_error")
    return {"type": "error", "error": {"type": error_type, "message": message}}


def parse_anthropic(body: dict[str, Any]) -> SimRequest:
    messages = body.get("messages")
    texts = [content_text(body.get("system"))] + messages_text(messages)
    prompt_text = "\n".join(text for text in texts if text)
    last_user = last_user_text(messages)
    return SimRequest(
        model=str(body.get("model", "")),
        prompt_text=prompt_text,
        last_user_text=prompt_text if last_user is None else last_user,
        stream=body.get("stream") is True,
        max_tokens=positive_int(body.get("max_tokens")),
        tools=normalise_tools(body.get("tools")),
        schema=anthropic_schema(body),
        forced_tool=forced_tool(body.get("tool_choice")),
    )


def anthropic_schema(body: dict[str, Any]) -> dict[str, Any] | None:
    """Anthropic's structured outputs: ``output_format`` {"type": "json_schema", "schema"}."""
    wanted = body.get("output_format")
    if isinstance(wanted, dict) and wanted.get("type") == "json_schema":
        return wanted.get("schema") if isinstance(wanted.get("schema"), dict) else {}
    return None


def anthropic_content(answer: Answer) -> list[dict[str, Any]]:
    if answer.kind == "empty":
        return []
    if answer.kind == "tool_call":
        return [
            {
                "type": "tool_use",
                "id": "toolu_" + answer.tool_call_id,
                "name": answer.tool_name,
                "input": answer.tool_arguments,
            }
        ]
    return [{"type": "text", "text": answer.text}]


def render_anthropic(req: SimRequest, answer: Answer) -> dict[str, Any]:
    return {
        "id": new_id("msg_"),
        "type": "message",
        "role": "assistant",
        "model": req.model,
        "content": anthropic_content(answer),
        "stop_reason": ANTHROPIC_STOP_REASONS[answer.finish],
        "stop_sequence": None,
        "usage": {
            "input_tokens": answer.prompt_tokens,
            "output_tokens": answer.completion_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
        },
    }


async def stream_anthropic(streamer: Streamer, req: SimRequest, answer: Answer) -> None:
    """The documented event sequence: message_start, content_block_start, ping,
    content_block_delta..., content_block_stop, message_delta, message_stop."""
    message = render_anthropic(req, answer)
    message["content"] = []
    message["stop_reason"] = None
    message["usage"] = {**message["usage"], "output_tokens": 1}
    await streamer.send(sse({"type": "message_start", "message": message}, "message_start"))

    blocks = anthropic_content(answer)
    if not blocks:
        await streamer.send(sse({"type": "ping"}, "ping"))
    for index, block in enumerate(blocks):
        if block["type"] == "tool_use":
            start = {**block, "input": {}}
            deltas = [{"type": "input_json_delta", "partial_json": json.dumps(block["input"])}]
        else:
            start = {"type": "text", "text": ""}
            deltas = [{"type": "text_delta", "text": p} for p in pieces(block["text"])]
        event = {"type": "content_block_start", "index": index, "content_block": start}
        await streamer.send(sse(event, "content_block_start"))
        if index == 0:
            await streamer.send(sse({"type": "ping"}, "ping"))
        for delta in deltas:
            await streamer.pace()
            event = {"type": "content_block_delta", "index": index, "delta": delta}
            await streamer.send(sse(event, "content_block_delta"))
        event = {"type": "content_block_stop", "index": index}
        await streamer.send(sse(event, "content_block_stop"))

    message_delta = {
        "type": "message_delta",
        "delta": {"stop_reason": ANTHROPIC_STOP_REASONS[answer.finish], "stop_sequence": None},
        "usage": {"output_tokens": answer.completion_tokens},
    }
    await streamer.send(sse(message_delta, "message_delta"))
    await streamer.send(sse({"type": "message_stop"}, "message_stop"))


# =============================================================================
# Ollama: /api/chat, /api/generate (+ /api/tags, /api/show, /api/version below)
# =============================================================================

OLLAMA_DONE_REASONS = {"stop": "stop", "length": "length", "tool_calls": "stop"}


def ollama_error(status: int, message: str) -> dict[str, Any]:
    return {"error": message}


def ollama_now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def ollama_max_tokens(body: dict[str, Any]) -> int | None:
    options = body.get("options")
    return positive_int(options.get("num_predict")) if isinstance(options, dict) else None


def ollama_final_fields(req: SimRequest, answer: Answer) -> dict[str, Any]:
    """The fields of Ollama's last object (done: true): counts, and durations in ns."""
    load_ns = 1_000_000
    prompt_eval_ns = answer.prompt_tokens * 100_000
    eval_ns = answer.completion_tokens * 1_000_000
    elapsed_ns = int((time.monotonic() - req.started) * 1e9)
    return {
        "done": True,
        "done_reason": OLLAMA_DONE_REASONS[answer.finish],
        "total_duration": max(elapsed_ns, load_ns + prompt_eval_ns + eval_ns),
        "load_duration": load_ns,
        "prompt_eval_count": answer.prompt_tokens,
        "prompt_eval_duration": prompt_eval_ns,
        "eval_count": answer.completion_tokens,
        "eval_duration": eval_ns,
    }


def parse_ollama_chat(body: dict[str, Any]) -> SimRequest:
    return chat_request(
        body,
        stream=body.get("stream", True) is not False,  # Ollama streams unless told not to
        max_tokens=ollama_max_tokens(body),
        schema=ollama_schema(body),
    )


def ollama_message(answer: Answer, content: str) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if answer.kind == "tool_call":
        call = {"function": {"name": answer.tool_name, "arguments": answer.tool_arguments}}
        message["tool_calls"] = [call]
    return message


def render_ollama_chat(req: SimRequest, answer: Answer) -> dict[str, Any]:
    return {
        "model": req.model,
        "created_at": ollama_now(),
        "message": ollama_message(answer, answer.text),
        **ollama_final_fields(req, answer),
    }


async def stream_ollama_chat(streamer: Streamer, req: SimRequest, answer: Answer) -> None:
    if answer.kind == "tool_call":
        await streamer.pace()
        line = {"model": req.model, "created_at": ollama_now(), "done": False}
        await streamer.send(ndjson({**line, "message": ollama_message(answer, "")}))
    for piece in pieces(answer.text):
        await streamer.pace()
        message = {"role": "assistant", "content": piece}
        line = {"model": req.model, "created_at": ollama_now(), "message": message, "done": False}
        await streamer.send(ndjson(line))
    final = {
        "model": req.model,
        "created_at": ollama_now(),
        "message": {"role": "assistant", "content": ""},
        **ollama_final_fields(req, answer),
    }
    await streamer.send(ndjson(final))


def parse_ollama_generate(body: dict[str, Any]) -> SimRequest:
    prompt = body.get("prompt") if isinstance(body.get("prompt"), str) else ""
    system = body.get("system") if isinstance(body.get("system"), str) else ""
    return SimRequest(
        model=str(body.get("model", "")),
        prompt_text="\n".join(text for text in (system, prompt) if text),
        last_user_text=prompt,
        stream=body.get("stream", True) is not False,
        max_tokens=ollama_max_tokens(body),
        schema=ollama_schema(body),
    )


def render_ollama_generate(req: SimRequest, answer: Answer) -> dict[str, Any]:
    return {
        "model": req.model,
        "created_at": ollama_now(),
        "response": answer.text,
        "context": [1, 2, 3],
        **ollama_final_fields(req, answer),
    }


async def stream_ollama_generate(streamer: Streamer, req: SimRequest, answer: Answer) -> None:
    for piece in pieces(answer.text):
        await streamer.pace()
        line = {"model": req.model, "created_at": ollama_now(), "response": piece, "done": False}
        await streamer.send(ndjson(line))
    final = {
        "model": req.model,
        "created_at": ollama_now(),
        "response": "",
        "context": [1, 2, 3],
        **ollama_final_fields(req, answer),
    }
    await streamer.send(ndjson(final))


def ollama_model_entry(name: str) -> dict[str, Any]:
    tag = name if ":" in name else name + ":latest"
    return {
        "name": tag,
        "model": tag,
        "modified_at": "2025-01-01T00:00:00Z",
        "size": 4_661_224_676,
        "digest": uuid.uuid5(uuid.NAMESPACE_DNS, tag).hex * 2,
        "details": ollama_details(),
    }


def ollama_details() -> dict[str, Any]:
    return {
        "parent_model": "",
        "format": "gguf",
        "family": "llama",
        "families": ["llama"],
        "parameter_size": "8.0B",
        "quantization_level": "Q4_0",
    }


def ollama_show(name: str) -> dict[str, Any]:
    """/api/show. litellm reads `template` ("tools" in it => supports function calling) and
    `model_info.*context_length` (=> max tokens)."""
    return {
        "modelfile": f"# simulated Modelfile\nFROM {name}\n",
        "parameters": "stop \"<|eot_id|>\"",
        "template": "{{- if .Tools }}{{ .Tools }}{{ end }}{{ .Prompt }}",
        "details": ollama_details(),
        "model_info": {
            "general.architecture": "llama",
            "general.parameter_count": 8_030_261_248,
            "llama.context_length": 8192,
        },
        "capabilities": ["completion", "tools"],
        "modified_at": "2025-01-01T00:00:00Z",
    }


# =============================================================================
# The table of generation APIs
# =============================================================================


@dataclass(frozen=True)
class Api:
    """How one generation endpoint parses requests and shapes answers."""

    name: str
    parse: Callable[[dict[str, Any]], SimRequest]
    error_body: Callable[[int, str], dict[str, Any]]
    render: Callable[[SimRequest, Answer], dict[str, Any]]
    stream: Callable[[Streamer, SimRequest, Answer], Awaitable[None]]
    stream_type: str
    malformed_stream: bytes


OPENAI_CHAT = Api(
    "openai_chat",
    parse_openai_chat,
    openai_error,
    render_openai_chat,
    stream_openai_chat,
    SSE_TYPE,
    b"data: " + BROKEN_JSON + b"\n\n",
)
OPENAI_COMPLETION = Api(
    "openai_completion",
    parse_openai_completion,
    openai_error,
    render_openai_completion,
    stream_openai_completion,
    SSE_TYPE,
    b"data: " + BROKEN_JSON + b"\n\n",
)
ANTHROPIC_MESSAGES = Api(
    "anthropic_messages",
    parse_anthropic,
    anthropic_error,
    render_anthropic,
    stream_anthropic,
    SSE_TYPE,
    b"event: message_start\ndata: " + BROKEN_JSON + b"\n\n",
)
OLLAMA_CHAT = Api(
    "ollama_chat",
    parse_ollama_chat,
    ollama_error,
    render_ollama_chat,
    stream_ollama_chat,
    NDJSON_TYPE,
    BROKEN_JSON + b"\n",
)
OLLAMA_GENERATE = Api(
    "ollama_generate",
    parse_ollama_generate,
    ollama_error,
    render_ollama_generate,
    stream_ollama_generate,
    NDJSON_TYPE,
    BROKEN_JSON + b"\n",
)


# =============================================================================
# The server
# =============================================================================


class SimServer:
    """The simulator: an aiohttp app plus recordings, counters and knobs.

    ``await sim.start()`` / ``await sim.stop()``; ``sim.url`` is "http://127.0.0.1:<port>" once started.
    Tests and load tests run it as a process (``sim.stack.start_simulator``), never in their own loop.
    """

    def __init__(
        self, config: SimConfig | None = None, *, access_log: bool = False, **knobs: Any
    ) -> None:
        self.config = dataclasses.replace(config or SimConfig(), **knobs)
        self.config.host = loopback_host(self.config.host)
        self.config.model_config = check_model_config(self.config.model_config)
        check_knobs({name: getattr(self.config, name) for name in KNOB_NAMES})
        self.access_log = access_log
        self.url = ""
        self.app = self._build_app()
        self._runner: web.AppRunner | None = None
        self.reset()

    # --- state ---------------------------------------------------------------

    def reset(self) -> None:
        """Clear recordings and counters, and re-seed the fault RNG."""
        self.records: deque[dict[str, Any]] = deque(maxlen=MAX_RECORDS)
        self.record_count = 0
        self.hits_by_model: Counter[str] = Counter()
        self.hits_by_path: Counter[str] = Counter()
        self.hits_by_status: Counter[str] = Counter()
        self.in_flight = 0
        self.cancelled = 0
        self.rng = random.Random(self.config.seed)

    def requests(self, model: str | None = None, path: str | None = None) -> list[dict]:
        """Recorded requests, oldest first, optionally filtered by model and/or path."""
        return [
            record
            for record in self.records
            if (model is None or record["model"] == model)
            and (path is None or record["path"] == path)
        ]

    def stats(self) -> dict[str, Any]:
        return {
            "total": self.record_count,
            "in_flight": self.in_flight,
            "cancelled": self.cancelled,
            "by_model": dict(self.hits_by_model),
            "by_path": dict(self.hits_by_path),
            "by_status": dict(self.hits_by_status),
        }

    def configure(self, **changes: Any) -> dict[str, Any]:
        """Change knobs at runtime (same names as POST /_sim/config); returns the config."""
        unknown = set(changes) - set(KNOB_NAMES) - {"seed", "model_config", "force_markers"}
        if unknown:
            raise ValueError(f"cannot change {sorted(unknown)} at runtime")
        knobs = check_knobs({k: v for k, v in changes.items() if k in KNOB_NAMES})
        model_config = check_model_config(changes.get("model_config", self.config.model_config))
        seed = check_seed(changes.get("seed", self.config.seed))
        force_markers = changes.get("force_markers", self.config.force_markers)
        if not isinstance(force_markers, dict) or not all(isinstance(v, str) for v in force_markers.values()):
            raise ValueError("force_markers must be an object of model -> marker text")
        self.config = dataclasses.replace(
            self.config, **knobs, model_config=model_config, seed=seed, force_markers=dict(force_markers)
        )
        if "seed" in changes:
            self.rng = random.Random(seed)
        return self.config.to_dict()

    def known_models(self) -> list[str]:
        names = set(DEFAULT_MODELS) | set(self.config.model_config) | set(self.hits_by_model)
        return sorted(name for name in names if name)

    # --- lifecycle -------------------------------------------------------------

    async def start(self) -> str:
        host = self.config.host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, self.config.port))
        port = sock.getsockname()[1]
        self._runner = web.AppRunner(
            self.app,
            handler_cancellation=True,  # cancel handlers when the client disconnects
            access_log=web.access_logger if self.access_log else None,
            shutdown_timeout=1.0,
        )
        await self._runner.setup()
        await web.SockSite(self._runner, sock).start()
        self.config.port = port
        self.url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # --- routes ----------------------------------------------------------------

    def _build_app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._openai_chat)
        app.router.add_post("/chat/completions", self._openai_chat)
        app.router.add_post("/v1/completions", self._openai_completion)
        app.router.add_post("/completions", self._openai_completion)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/models", self._models)
        app.router.add_post("/v1/messages", self._anthropic_messages)
        app.router.add_post("/api/chat", self._ollama_chat)
        app.router.add_post("/api/generate", self._ollama_generate)
        app.router.add_get("/api/tags", self._ollama_tags)
        app.router.add_post("/api/show", self._ollama_show)
        app.router.add_get("/api/version", self._ollama_version)
        app.router.add_get("/_sim/requests", self._admin_requests)
        app.router.add_get("/_sim/stats", self._admin_stats)
        app.router.add_post("/_sim/reset", self._admin_reset)
        app.router.add_get("/_sim/config", self._admin_config)
        app.router.add_post("/_sim/config", self._admin_config)
        app.router.add_get("/_sim/health", self._admin_health)
        return app

    async def _openai_chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, OPENAI_CHAT)

    async def _openai_completion(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, OPENAI_COMPLETION)

    async def _anthropic_messages(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, ANTHROPIC_MESSAGES)

    async def _ollama_chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, OLLAMA_CHAT)

    async def _ollama_generate(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, OLLAMA_GENERATE)

    # --- recording ---------------------------------------------------------------

    async def _record(self, request: web.Request) -> dict[str, Any]:
        """Read the request body and append a record of the request."""
        raw = await request.read()
        body: Any = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                body = raw.decode("utf-8", errors="replace")
        model = None
        if isinstance(body, dict):
            model = body.get("model") or body.get("name")
        self.record_count += 1
        record = {
            "id": self.record_count,
            "path": request.path,
            "model": model,
            "headers": dict(request.headers),
            "body": body,
            "received_at": time.time(),
            "status": None,
            "cancelled": False,
            "outcome": None,
        }
        self.records.append(record)
        self.hits_by_path[request.path] += 1
        if model:
            self.hits_by_model[str(model)] += 1
        return record

    def _answered(self, record: dict[str, Any], response: web.StreamResponse) -> Any:
        record["status"] = response.status
        self.hits_by_status[str(response.status)] += 1
        return response

    def _mark_cancelled(self, record: dict[str, Any]) -> None:
        if not record["cancelled"]:
            record["cancelled"] = True
            self.cancelled += 1

    # --- generation --------------------------------------------------------------

    async def _generate(self, request: web.Request, api: Api) -> web.StreamResponse:
        record = await self._record(request)
        body = record["body"]
        if not isinstance(body, dict):
            error = api.error_body(400, "request body must be a JSON object")
            return self._answered(record, web.json_response(error, status=400))

        req = api.parse(body)
        forced = self.config.force_markers.get(req.model)
        if forced:
            req.prompt_text += "\n" + forced
        config = self.config.for_model(req.model)
        behaviour = self._behaviour(req, config)
        record["outcome"] = behaviour.answer.kind if behaviour.answer else behaviour.kind
        self.in_flight += 1
        try:
            return await self._carry_out(request, api, req, behaviour, config, record)
        except ClientGone as gone:  # the client left mid-stream
            self._mark_cancelled(record)
            return gone.response
        except asyncio.CancelledError:  # the client left; aiohttp cancels the handler
            self._mark_cancelled(record)
            raise
        finally:
            self.in_flight -= 1

    def _behaviour(self, req: SimRequest, config: SimConfig) -> Behaviour:
        """Markers first; requests without a fault marker may get a random 500 or hang."""
        behaviour = behaviour_for(req)
        if behaviour.kind != "answer" or behaviour.answer is None or behaviour.answer.kind == "empty":
            return behaviour
        if config.error_rate == 0 and config.hang_rate == 0:
            return behaviour
        roll = self.rng.random()
        if roll < config.error_rate:
            message = "simulated random server error (error_rate)"
            return Behaviour("error", status=500, message=message, sleep_ms=behaviour.sleep_ms)
        if roll < config.error_rate + config.hang_rate:
            return Behaviour("hang")
        return behaviour

    async def _carry_out(
        self,
        request: web.Request,
        api: Api,
        req: SimRequest,
        behaviour: Behaviour,
        config: SimConfig,
        record: dict[str, Any],
    ) -> web.StreamResponse:
        if behaviour.kind == "hang":
            await asyncio.sleep(HANG_SECONDS)
        delay_s = (config.latency_ms + behaviour.sleep_ms) / 1000
        if delay_s > 0:
            await asyncio.sleep(delay_s)

        if behaviour.kind == "drop":
            if request.transport is not None:
                request.transport.close()
            return web.Response()  # never sent: the connection is already closed

        if behaviour.kind == "error":
            headers = {}
            if behaviour.status == 429:
                headers["Retry-After"] = f"{config.retry_after:g}"
            error = api.error_body(behaviour.status, behaviour.message)
            response = web.json_response(error, status=behaviour.status, headers=headers)
            return self._answered(record, response)

        if behaviour.kind == "malformed":
            if req.stream:
                headers = {"Content-Type": api.stream_type}
                broken = web.Response(body=api.malformed_stream, headers=headers)
            else:
                broken = web.Response(body=BROKEN_JSON, content_type="application/json")
            return self._answered(record, broken)

        assert behaviour.answer is not None
        if not req.stream:
            return self._answered(record, web.json_response(api.render(req, behaviour.answer)))

        streamer = await Streamer.open(request, api.stream_type, config)
        self._answered(record, streamer.response)
        await api.stream(streamer, req, behaviour.answer)
        await streamer.close()
        return streamer.response

    # --- model info endpoints ---------------------------------------------------

    async def _models(self, request: web.Request) -> web.Response:
        record = await self._record(request)
        if "anthropic-version" in request.headers:
            data = [
                {
                    "type": "model",
                    "id": name,
                    "display_name": name,
                    "created_at": "2025-01-01T00:00:00Z",
                }
                for name in self.known_models()
            ]
            body: dict[str, Any] = {
                "data": data,
                "has_more": False,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
            }
        else:
            data = [
                {"id": name, "object": "model", "created": 1735689600, "owned_by": "sim"}
                for name in self.known_models()
            ]
            body = {"object": "list", "data": data}
        return self._answered(record, web.json_response(body))

    async def _ollama_tags(self, request: web.Request) -> web.Response:
        record = await self._record(request)
        models = [ollama_model_entry(name) for name in self.known_models()]
        return self._answered(record, web.json_response({"models": models}))

    async def _ollama_show(self, request: web.Request) -> web.Response:
        record = await self._record(request)
        name = record["model"]
        if not name:
            error = web.json_response({"error": "model is required"}, status=400)
            return self._answered(record, error)
        return self._answered(record, web.json_response(ollama_show(str(name))))

    async def _ollama_version(self, request: web.Request) -> web.Response:
        record = await self._record(request)
        return self._answered(record, web.json_response({"version": OLLAMA_VERSION}))

    # --- admin endpoints -----------------------------------------------------------

    async def _admin_requests(self, request: web.Request) -> web.Response:
        records = self.requests(
            model=request.query.get("model"), path=request.query.get("path")
        )
        return web.json_response(records)

    async def _admin_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    async def _admin_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"ok": True})

    async def _admin_config(self, request: web.Request) -> web.Response:
        if request.method == "GET":
            return web.json_response(self.config.to_dict())
        try:
            changes = await request.json()
            if not isinstance(changes, dict):
                raise ValueError("body must be a JSON object")
            return web.json_response(self.configure(**changes))
        except ValueError as exc:  # also covers invalid JSON
            return web.json_response({"error": str(exc)}, status=400)

    async def _admin_health(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True})


# =============================================================================
# Command line
# =============================================================================


def build_arg_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    parser = argparse.ArgumentParser(
        prog="python -m sim.providers",
        description="Simulated OpenAI / Anthropic / Ollama providers on one local port.",
    )
    parser.add_argument("--host", default=env("SIM_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=env("SIM_PORT", "0"))
    parser.add_argument("--latency-ms", type=float, default=env("SIM_LATENCY_MS", "0"))
    parser.add_argument("--ttft-ms", type=float, default=env("SIM_TTFT_MS", "0"))
    parser.add_argument("--tokens-per-s", type=float, default=env("SIM_TOKENS_PER_S", "0"))
    parser.add_argument("--error-rate", type=float, default=env("SIM_ERROR_RATE", "0"))
    parser.add_argument("--hang-rate", type=float, default=env("SIM_HANG_RATE", "0"))
    parser.add_argument("--retry-after", type=float, default=env("SIM_RETRY_AFTER", "1"))
    parser.add_argument("--seed", type=int, default=env("SIM_SEED"))
    parser.add_argument("--model-config", default=env("SIM_MODEL_CONFIG", "{}"))
    parser.add_argument("--access-log", action="store_true", help="log requests to stderr")
    return parser


async def serve(server: SimServer) -> None:
    """Run until SIGINT/SIGTERM, announcing the url with a SIM_READY line."""
    await server.start()
    print(f"SIM_READY {server.url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await server.stop()


def main(argv: list[str] | None = None) -> None:
    parser = build_arg_parser()
    args = parser.parse_args(argv)
    if args.access_log:
        import logging

        logging.basicConfig(level=logging.INFO)
    try:
        config = SimConfig(
            host=args.host,
            port=args.port,
            latency_ms=args.latency_ms,
            ttft_ms=args.ttft_ms,
            tokens_per_s=args.tokens_per_s,
            error_rate=args.error_rate,
            hang_rate=args.hang_rate,
            retry_after=args.retry_after,
            seed=args.seed,
            model_config=check_model_config(args.model_config),
        )
        server = SimServer(config, access_log=args.access_log)
    except ValueError as exc:
        parser.error(str(exc))
    asyncio.run(serve(server))


if __name__ == "__main__":
    main()
