"""Provider emulators: seven LLM APIs in their documented wire formats, for recording cassettes.

``scripts/record_cassettes.py`` records the relay's cassettes against these when no provider key is
at hand. Each emulator serves one provider on its own loopback port, with that provider's request
paths, auth headers, JSON bodies, streaming framing, usage fields and error bodies, as given in the
provider's API reference (the sources are listed per provider in ``cassettes/README.md``).
Standard library + aiohttp.

    with Emulator("gemini") as emu:             # background thread, free port; emu.url
        ...
    async with Emulator("bedrock") as emu:      # on the running loop
        ...
    python -m sim.emulators --provider azure --port 8099   # prints "EMULATOR_READY <url>"

Providers and endpoints
-----------------------
    openai     POST /v1/chat/completions                                  Bearer key
    azure      POST /openai/deployments/{deployment}/chat/completions     api-key header,
               ?api-version=...                                           api-version required
    anthropic  POST /v1/messages                                          x-api-key, anthropic-version
    ollama     POST /api/chat (NDJSON stream unless "stream": false), POST /api/show
    gemini     POST /v1beta/models/{model}:generateContent                x-goog-api-key or ?key=
               POST /v1beta/models/{model}:streamGenerateContent?alt=sse
    bedrock    POST /model/{modelId}/converse                             SigV4 Authorization
               POST /model/{modelId}/converse-stream                      (AWS event-stream frames)
    mistral    POST /v1/chat/completions                                  Bearer key
A request without the provider's credentials, or with a body that misses a required field, gets
the provider's own 400/401/403 error, so a wrong request shape fails the recording loudly.

What is answered (the marker language of ``sim/markers.py``, which ``sim/providers.py`` speaks too)
-------------------------------------------------------------------------------------------------
Markers are searched in all the text of the request (system prompt and every message):
    SIM:HTTP<status>   that status (429, 500, 503, 529 ...) with the provider's documented error
                       body; 429 and 503 carry ``retry-after: 1``
    "verdict"          (with quotes: a guard prompt) {"verdict": "block", ...} if SIM:BLOCK is
                       present, else {"verdict": "allow", ...}
    "score"            (an escalate judge prompt) {"score": 2, ...} with SIM:LOWSCORE, else 9
    SIM:ANSWER=<text>  <text> up to the end of the line or a closing parenthesis
    otherwise          "<model> says: <last user message, first 200 characters>"
Structured output, asked for the way each provider takes it (what litellm 1.106.12 sends for an
OpenAI ``response_format`` of type ``json_schema``):
    openai, azure, mistral  ``response_format`` {"type": "json_schema", "json_schema": {"name", "schema"}}
                            (a missing name or schema is the provider's 400)
    anthropic               ``output_format`` {"type": "json_schema", "schema"}, only with the
                            ``anthropic-beta: structured-outputs-2025-11-13`` header (else 400); or a
                            tool forced by ``tool_choice`` {"type": "tool", "name"}: a ``tool_use`` block
    gemini                  ``generationConfig.response_mime_type: application/json`` with
                            ``response_json_schema`` or ``response_schema`` (a schema without the JSON
                            MIME type is the provider's 400)
    bedrock                 ``toolConfig`` with ``toolChoice: {"tool": {"name"}}``: a ``toolUse`` block
    ollama                  ``format``: "json" or a JSON schema
The answer is then a JSON object satisfying the schema, with the judge's values above where they fit.
Usage: one token per whitespace-separated word of the request text (prompt) and of the answer
(completion), reported in each provider's own usage fields, so cost accounting is exercised.
Every response carries the provider's request-id style headers (and OpenAI/Mistral a cookie), so
the recorder's scrubbing is exercised too.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import signal
import socket
import struct
import threading
import time
import uuid
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable

from aiohttp import web

from sim.markers import (
    Answer, compose, content_text, count_tokens, error_status, forced_tool, judged_values, new_id, ollama_schema,
    openai_schema, pieces, schema_instance, sse,
)

PROVIDERS = ("openai", "azure", "anthropic", "ollama", "gemini", "bedrock", "mistral")

#: The model name a provider reports back for a requested alias (as the real services do).
RESPONSE_MODEL = {"gpt-4o-mini": "gpt-4o-mini-2024-07-18"}

# =================================================================================================
# Deciding what to answer
# =================================================================================================


@dataclass
class Turn:
    """What a generation request asks, whatever the provider's format."""

    model: str
    text: str  #: system prompt + all messages, one string; markers are searched here
    last_user: str
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None
    schema: dict | None = None  #: structured output: the JSON schema the answer satisfies ({} = any object)


def answer_to(turn: Turn) -> Answer:
    """What the model answers to ``turn``, in the marker language of sim/markers.py."""
    return compose(turn.model, turn.text, turn.last_user, schema=turn.schema, max_tokens=turn.max_tokens)


def chat_turn(model: str, system: Any, messages: Any, **kwargs: Any) -> Turn:
    messages = messages if isinstance(messages, list) else []
    texts = [content_text(system)] + [content_text(m.get("content", m)) for m in messages if isinstance(m, dict)]
    users = [content_text(m.get("content", m)) for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    text = "\n".join(t for t in texts if t)
    return Turn(model=model, text=text, last_user=users[-1] if users else text, **kwargs)


def positive(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


class Reject(Exception):
    """A request the provider itself would refuse (missing key, missing field)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


# =================================================================================================
# OpenAI-style chat completions: OpenAI, Azure OpenAI, Mistral
# =================================================================================================


def openai_turn(body: dict) -> Turn:
    if not isinstance(body.get("messages"), list) or not body["messages"]:
        raise Reject(400, "'messages' is a required property")
    options = body.get("stream_options")
    wanted = body.get("response_format")
    if isinstance(wanted, dict) and wanted.get("type") == "json_schema":
        spec = wanted.get("json_schema")
        for name in ("name", "schema"):
            if not isinstance(spec, dict) or name not in spec:
                raise Reject(400, f"Missing required parameter: 'response_format.json_schema.{name}'.")
    return chat_turn(
        str(body.get("model", "")), None, body["messages"],
        stream=body.get("stream") is True,
        include_usage=isinstance(options, dict) and options.get("include_usage") is True,
        max_tokens=positive(body.get("max_completion_tokens")) or positive(body.get("max_tokens")),
        schema=openai_schema(body),
    )


def openai_usage(answer: Answer, detailed: bool) -> dict:
    usage: dict[str, Any] = {
        "prompt_tokens": answer.prompt_tokens,
        "completion_tokens": answer.completion_tokens,
        "total_tokens": answer.prompt_tokens + answer.completion_tokens,
    }
    if detailed:
        usage["prompt_tokens_details"] = {"cached_tokens": 0, "audio_tokens": 0}
        usage["completion_tokens_details"] = {
            "reasoning_tokens": 0, "audio_tokens": 0,
            "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0,
        }
    return usage


AZURE_FILTERS = {name: {"filtered": False, "severity": "safe"} for name in ("hate", "self_harm", "sexual", "violence")}


class OpenAIChat:
    """OpenAI Chat Completions; ``flavour`` is "openai", "azure" or "mistral" (small differences)."""

    def __init__(self, flavour: str):
        self.flavour = flavour

    def routes(self, emu: "Emulator") -> list[tuple[str, str, Callable]]:
        path = "/openai/deployments/{deployment}/chat/completions" if self.flavour == "azure" else "/v1/chat/completions"
        return [("POST", path, self.chat)]

    def check_auth(self, request: web.Request) -> None:
        if self.flavour == "azure":
            if "api-version" not in request.query:
                raise Reject(404, "Resource not found")
            if not request.headers.get("api-key") and not request.headers.get("Authorization", "").startswith("Bearer "):
                raise Reject(401, "Access denied due to invalid subscription key or wrong API endpoint. Make sure to "
                                  "provide a valid key for an active subscription and use a correct regional API "
                                  "endpoint for your resource.")
        elif not request.headers.get("Authorization", "").startswith("Bearer "):
            raise Reject(401, "You didn't provide an API key. You need to provide your API key in an Authorization "
                              "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).")

    def error(self, status: int, message: str) -> tuple[dict, dict]:
        headers = {"retry-after": "1"} if status in (429, 503) else {}
        if self.flavour == "azure":
            return {"error": {"code": str(status), "message": message}}, headers
        if self.flavour == "mistral":
            kind = {429: "rate_limited", 401: "invalid_request_error"}.get(status, "internal_server_error")
            code = {429: "1300", 401: "1000"}.get(status, "3000")
            return {"object": "error", "message": message, "type": kind, "param": None, "code": code}, headers
        kind, code = {429: ("requests", "rate_limit_exceeded"), 401: ("invalid_request_error", "invalid_api_key"),
                      400: ("invalid_request_error", None)}.get(status, ("server_error", None))
        return {"error": {"message": message, "type": kind, "param": None, "code": code}}, headers

    def error_message(self, status: int, turn: Turn) -> str:
        if status == 429 and self.flavour == "azure":
            return ("Requests to the ChatCompletions_Create Operation under Azure OpenAI API version 2024-10-21 have "
                    "exceeded token rate limit of your current OpenAI S0 pricing tier. Please retry after 1 second.")
        if status == 429 and self.flavour == "mistral":
            return "Rate limit exceeded"
        if status == 429:
            return (f"Rate limit reached for {turn.model} on requests per min (RPM): Limit 3, Used 3, Requested 1. "
                    "Please try again in 20s.")
        return "The server had an error while processing your request. Sorry about that!"

    def request_headers(self) -> dict[str, str]:
        if self.flavour == "azure":
            return {"apim-request-id": str(uuid.uuid4()), "x-request-id": str(uuid.uuid4()),
                    "x-ms-region": "East US", "x-ratelimit-remaining-requests": "99"}
        if self.flavour == "mistral":
            return {"mistral-correlation-id": str(uuid.uuid4()), "x-kong-request-id": uuid.uuid4().hex,
                    "set-cookie": f"__cf_bm={uuid.uuid4().hex}; path=/; HttpOnly; Secure"}
        return {"x-request-id": new_id("req_", 32), "openai-processing-ms": "120",
                "x-ratelimit-remaining-requests": "9999",
                "set-cookie": f"__cf_bm={uuid.uuid4().hex}; path=/; domain=.api.openai.com; HttpOnly; Secure"}

    def model_of(self, turn: Turn, request: web.Request) -> str:
        model = turn.model or request.match_info.get("deployment", "")
        return RESPONSE_MODEL.get(model, model) if self.flavour != "mistral" else model

    def render(self, turn: Turn, answer: Answer, model: str) -> dict:
        message: dict[str, Any] = {"role": "assistant", "content": answer.text}
        choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": answer.finish}
        body: dict[str, Any] = {"id": new_id("chatcmpl-"), "object": "chat.completion", "created": int(time.time()),
                                "model": model, "choices": [choice]}
        if self.flavour == "mistral":
            message["tool_calls"] = None
            body["usage"] = openai_usage(answer, detailed=False)
            return body
        message.update({"refusal": None, "annotations": []})
        choice["logprobs"] = None
        body["usage"] = openai_usage(answer, detailed=True)
        body["system_fingerprint"] = "fp_" + uuid.uuid4().hex[:10]
        if self.flavour == "azure":
            choice["content_filter_results"] = AZURE_FILTERS
            body["prompt_filter_results"] = [{"prompt_index": 0, "content_filter_results": AZURE_FILTERS}]
        else:
            body["service_tier"] = "default"
        return body

    def stream(self, turn: Turn, answer: Answer, model: str) -> list[bytes]:
        head = {"id": new_id("chatcmpl-"), "object": "chat.completion.chunk", "created": int(time.time()), "model": model}
        if self.flavour != "mistral":
            head["system_fingerprint"] = "fp_" + uuid.uuid4().hex[:10]
        frames = []

        def chunk(delta: dict, finish: str | None = None, **extra: Any) -> bytes:
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
            if self.flavour != "mistral":
                choice["logprobs"] = None
            if self.flavour == "azure":
                choice["content_filter_results"] = {} if finish or not delta.get("content") else AZURE_FILTERS
            data = {**head, "choices": [choice], **extra}
            if turn.include_usage and self.flavour != "mistral":
                data.setdefault("usage", None)
            return sse(data)

        if self.flavour == "azure":  # Azure opens with the prompt's filter results and no choices
            frames.append(sse({"id": "", "object": "", "created": 0, "model": "", "choices": [],
                               "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": AZURE_FILTERS}]}))
        frames.append(chunk({"role": "assistant", "content": ""}))
        frames += [chunk({"content": piece}) for piece in pieces(answer.text)]
        if self.flavour == "mistral":  # Mistral puts usage on the last chunk, always
            frames.append(chunk({"content": ""}, answer.finish, usage=openai_usage(answer, detailed=False)))
        else:
            frames.append(chunk({}, answer.finish))
            if turn.include_usage:
                frames.append(sse({**head, "choices": [], "usage": openai_usage(answer, detailed=True)}))
        frames.append(b"data: [DONE]\n\n")
        return frames

    async def chat(self, emu: "Emulator", request: web.Request) -> web.StreamResponse:
        self.check_auth(request)
        body = await emu.json_body(request)
        turn = openai_turn(body)
        if self.flavour == "azure" and not turn.model:
            turn.model = request.match_info["deployment"]
        status = error_status(turn.text)
        if status:
            payload, headers = self.error(status, self.error_message(status, turn))
            return web.json_response(payload, status=status, headers={**headers, **self.request_headers()})
        answer = answer_to(turn)
        model = self.model_of(turn, request)
        if turn.stream:
            return await emu.send_stream(request, "text/event-stream; charset=utf-8", self.stream(turn, answer, model),
                                         self.request_headers())
        return web.json_response(self.render(turn, answer, model), headers=self.request_headers())


# =================================================================================================
# Anthropic Messages
# =================================================================================================

ANTHROPIC_ERRORS = {400: "invalid_request_error", 401: "authentication_error", 429: "rate_limit_error",
                    500: "api_error", 529: "overloaded_error"}
ANTHROPIC_STOP = {"stop": "end_turn", "length": "max_tokens", "tool_use": "tool_use"}


class AnthropicMessages:
    def routes(self, emu: "Emulator") -> list[tuple[str, str, Callable]]:
        return [("POST", "/v1/messages", self.messages)]

    @staticmethod
    def error(status: int, message: str, request_id: str) -> dict:
        return {"type": "error", "error": {"type": ANTHROPIC_ERRORS.get(status, "api_error"), "message": message},
                "request_id": request_id}

    async def messages(self, emu: "Emulator", request: web.Request) -> web.StreamResponse:
        request_id = new_id("req_011C", 20)
        headers = {"request-id": request_id, "anthropic-organization-id": str(uuid.uuid4())}
        if not request.headers.get("x-api-key") and not request.headers.get("Authorization"):
            raise Reject(401, "x-api-key header is required")
        if not request.headers.get("anthropic-version"):
            raise Reject(400, "anthropic-version: header is required")
        body = await emu.json_body(request)
        if positive(body.get("max_tokens")) is None:
            raise Reject(400, "max_tokens: Field required")
        output_format = body.get("output_format")
        if output_format is not None and "structured-outputs-2025-11-13" not in request.headers.get("anthropic-beta", ""):
            raise Reject(400, "output_format: Extra inputs are not permitted")
        schema = output_format.get("schema") if isinstance(output_format, dict) else None
        turn = chat_turn(str(body.get("model", "")), body.get("system"), body.get("messages"),
                         stream=body.get("stream") is True, max_tokens=positive(body.get("max_tokens")),
                         schema=schema if isinstance(schema, dict) else None)
        status = error_status(turn.text)
        if status:
            message = {529: "Overloaded", 429: "Number of request tokens has exceeded your per-minute rate limit"}.get(
                status, "Internal server error")
            extra = {"retry-after": "1"} if status == 429 else {}
            return web.json_response(self.error(status, message, request_id), status=status, headers={**headers, **extra})
        answer = answer_to(turn)
        content: list[dict] = [{"type": "text", "text": answer.text}]
        tool = forced_tool(body.get("tool_choice"))
        tools = {t.get("name"): t for t in body.get("tools") or [] if isinstance(t, dict)}
        if tool in tools and not turn.stream:  # the forced tool is called with the judge's values
            arguments = schema_instance(tools[tool].get("input_schema"), judged_values(answer.text))
            content = [{"type": "tool_use", "id": new_id("toolu_01"), "name": tool, "input": arguments}]
            answer.finish = "tool_use"
        message = {
            "id": new_id("msg_01"), "type": "message", "role": "assistant", "model": turn.model,
            "content": content,
            "stop_reason": ANTHROPIC_STOP[answer.finish], "stop_sequence": None,
            "usage": {"input_tokens": answer.prompt_tokens, "cache_creation_input_tokens": 0,
                      "cache_read_input_tokens": 0, "output_tokens": answer.completion_tokens,
                      "service_tier": "standard"},
        }
        if not turn.stream:
            return web.json_response(message, headers=headers)
        start = {**message, "content": [], "stop_reason": None, "usage": {**message["usage"], "output_tokens": 1}}
        frames = [sse({"type": "message_start", "message": start}, "message_start"),
                  sse({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                      "content_block_start"),
                  sse({"type": "ping"}, "ping")]
        frames += [sse({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": p}},
                       "content_block_delta") for p in pieces(answer.text)]
        frames += [sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
                   sse({"type": "message_delta", "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
                        "usage": {"output_tokens": answer.completion_tokens}}, "message_delta"),
                   sse({"type": "message_stop"}, "message_stop")]
        return await emu.send_stream(request, "text/event-stream; charset=utf-8", frames, headers)


# =================================================================================================
# Ollama /api/chat
# =================================================================================================


class OllamaChat:
    def routes(self, emu: "Emulator") -> list[tuple[str, str, Callable]]:
        return [("POST", "/api/chat", self.chat), ("POST", "/api/show", self.show)]

    @staticmethod
    def now() -> str:
        return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")

    def final(self, turn: Turn, answer: Answer, content: str) -> dict:
        return {"model": turn.model, "created_at": self.now(), "message": {"role": "assistant", "content": content},
                "done_reason": answer.finish, "done": True, "total_duration": 5_000_000 + answer.completion_tokens * 1_000_000,
                "load_duration": 1_000_000, "prompt_eval_count": answer.prompt_tokens,
                "prompt_eval_duration": answer.prompt_tokens * 100_000, "eval_count": answer.completion_tokens,
                "eval_duration": answer.completion_tokens * 1_000_000}

    async def chat(self, emu: "Emulator", request: web.Request) -> web.StreamResponse:
        body = await emu.json_body(request)
        if not body.get("model"):
            raise Reject(400, "model is required")
        options = body.get("options") if isinstance(body.get("options"), dict) else {}
        turn = chat_turn(str(body["model"]), None, body.get("messages"), stream=body.get("stream", True) is not False,
                         max_tokens=positive(options.get("num_predict")), schema=ollama_schema(body))
        status = error_status(turn.text)
        if status:
            message = "the model failed to generate a response" if status >= 500 else "too many requests"
            return web.json_response({"error": message}, status=status)
        answer = answer_to(turn)
        if not turn.stream:
            return web.json_response(self.final(turn, answer, answer.text))
        frames = [json.dumps({"model": turn.model, "created_at": self.now(),
                              "message": {"role": "assistant", "content": p}, "done": False}).encode() + b"\n"
                  for p in pieces(answer.text)]
        frames.append(json.dumps(self.final(turn, answer, "")).encode() + b"\n")
        return await emu.send_stream(request, "application/x-ndjson", frames, {})

    async def show(self, emu: "Emulator", request: web.Request) -> web.Response:
        body = await emu.json_body(request)
        name = body.get("model") or body.get("name") or ""
        return web.json_response({
            "modelfile": f"FROM {name}\n", "parameters": "", "template": "{{ .Prompt }}",
            "details": {"format": "gguf", "family": "llama", "parameter_size": "8.0B", "quantization_level": "Q4_0"},
            "model_info": {"general.architecture": "llama", "llama.context_length": 8192},
            "capabilities": ["completion"],
        })


# =================================================================================================
# Google Gemini API generateContent / streamGenerateContent
# =================================================================================================

GEMINI_STATUS = {400: "INVALID_ARGUMENT", 403: "PERMISSION_DENIED", 429: "RESOURCE_EXHAUSTED",
                 500: "INTERNAL", 503: "UNAVAILABLE"}
GEMINI_FINISH = {"stop": "STOP", "length": "MAX_TOKENS"}


class GeminiGenerate:
    def routes(self, emu: "Emulator") -> list[tuple[str, str, Callable]]:
        return [("POST", "/v1beta/models/{call}", self.generate)]

    @staticmethod
    def error(status: int, message: str) -> dict:
        return {"error": {"code": status, "message": message, "status": GEMINI_STATUS.get(status, "UNKNOWN")}}

    @staticmethod
    def usage(answer: Answer, completion_tokens: int | None = None) -> dict:
        out = answer.completion_tokens if completion_tokens is None else completion_tokens
        return {"promptTokenCount": answer.prompt_tokens, "candidatesTokenCount": out,
                "totalTokenCount": answer.prompt_tokens + out,
                "promptTokensDetails": [{"modality": "TEXT", "tokenCount": answer.prompt_tokens}]}

    async def generate(self, emu: "Emulator", request: web.Request) -> web.StreamResponse:
        model, _, method = request.match_info["call"].partition(":")
        if method not in ("generateContent", "streamGenerateContent"):
            raise Reject(404, f"Method {method!r} not found")
        if not request.headers.get("x-goog-api-key") and not request.query.get("key"):
            raise Reject(403, "Method doesn't allow unregistered callers (callers without established identity). "
                              "Please use API Key or other form of API consumer identity to call this API.")
        body = await emu.json_body(request)
        if not isinstance(body.get("contents"), list) or not body["contents"]:
            raise Reject(400, "* GenerateContentRequest.contents: contents is not specified")
        config = body.get("generationConfig") or body.get("generation_config") or {}
        system = body.get("system_instruction") or body.get("systemInstruction")
        messages = [{"role": c.get("role", "user"), "content": c.get("parts", [])} for c in body["contents"]]
        schema = next((config[k] for k in ("response_json_schema", "responseJsonSchema", "response_schema",
                                           "responseSchema") if isinstance(config.get(k), dict)), None)
        mime = config.get("response_mime_type") or config.get("responseMimeType")
        if schema is not None and mime != "application/json":
            raise Reject(400, "* GenerateContentRequest.generation_config.response_mime_type: a response schema "
                              "requires response_mime_type application/json")
        turn = chat_turn(model, system, messages, stream=method == "streamGenerateContent",
                         max_tokens=positive(config.get("max_output_tokens") or config.get("maxOutputTokens")),
                         schema=schema if schema is not None else ({} if mime == "application/json" else None))
        status = error_status(turn.text)
        if status:
            message = {503: "The model is overloaded. Please try again later.",
                       429: "You exceeded your current quota, please check your plan and billing details."}.get(
                status, "An internal error has occurred.")
            extra = {"retry-after": "1"} if status in (429, 503) else {}
            return web.json_response(self.error(status, message), status=status, headers=extra)
        answer = answer_to(turn)
        response_id = uuid.uuid4().hex[:22]
        if not turn.stream:
            return web.json_response({
                "candidates": [{"content": {"parts": [{"text": answer.text}], "role": "model"},
                                "finishReason": GEMINI_FINISH[answer.finish], "index": 0}],
                "usageMetadata": self.usage(answer), "modelVersion": model, "responseId": response_id,
            })
        if request.query.get("alt") != "sse":
            raise Reject(400, "this emulator streams server-sent events only (alt=sse)")
        frames, sent = [], 0
        chunks = pieces(answer.text)
        for i, piece in enumerate(chunks):  # every chunk carries usage so far, the last one the total
            sent += count_tokens(piece)
            candidate: dict[str, Any] = {"content": {"parts": [{"text": piece}], "role": "model"}, "index": 0}
            if i == len(chunks) - 1:
                candidate["finishReason"] = GEMINI_FINISH[answer.finish]
                sent = answer.completion_tokens
            frames.append(sse({"candidates": [candidate], "usageMetadata": self.usage(answer, sent),
                               "modelVersion": model, "responseId": response_id}, sep="\r\n\r\n"))
        return await emu.send_stream(request, "text/event-stream", frames, {})


# =================================================================================================
# Amazon Bedrock Runtime Converse / ConverseStream
# =================================================================================================

BEDROCK_ERRORS = {400: "ValidationException", 403: "AccessDeniedException", 429: "ThrottlingException",
                  500: "InternalServerException", 503: "ServiceUnavailableException"}
BEDROCK_STOP = {"stop": "end_turn", "length": "max_tokens"}


def event_header(name: str, value: str) -> bytes:
    """One AWS event-stream header of type 7 (string)."""
    raw_name, raw_value = name.encode(), value.encode()
    return bytes([len(raw_name)]) + raw_name + b"\x07" + struct.pack(">H", len(raw_value)) + raw_value


def event_frame(event_type: str, payload: dict) -> bytes:
    """One message of the AWS event-stream encoding (application/vnd.amazon.eventstream):
    total length, headers length, prelude CRC32, headers, JSON payload, message CRC32."""
    headers = (event_header(":event-type", event_type) + event_header(":content-type", "application/json")
               + event_header(":message-type", "event"))
    body = json.dumps(payload, separators=(",", ":")).encode()
    prelude = struct.pack(">II", 12 + len(headers) + len(body) + 4, len(headers))
    message = prelude + struct.pack(">I", zlib.crc32(prelude)) + headers + body
    return message + struct.pack(">I", zlib.crc32(message))


class BedrockConverse:
    def routes(self, emu: "Emulator") -> list[tuple[str, str, Callable]]:
        return [("POST", "/model/{model_id}/converse", self.converse),
                ("POST", "/model/{model_id}/converse-stream", self.converse)]

    @staticmethod
    def error_headers(status: int) -> dict:
        kind = BEDROCK_ERRORS.get(status, "InternalServerException")
        return {"x-amzn-ErrorType": f"{kind}:http://internal.amazon.com/coral/com.amazon.bedrock/"}

    async def converse(self, emu: "Emulator", request: web.Request) -> web.StreamResponse:
        request_id = str(uuid.uuid4())
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("AWS4-HMAC-SHA256 Credential=") or "Signature=" not in auth or \
                not request.headers.get("X-Amz-Date"):
            raise Reject(403, "Missing Authentication Token")
        body = await emu.json_body(request)
        if not isinstance(body.get("messages"), list) or not body["messages"]:
            raise Reject(400, "1 validation error detected: Value null at 'messages' failed to satisfy constraint: "
                              "Member must not be null")
        config = body.get("inferenceConfig") or {}
        stream = request.path.endswith("/converse-stream")
        turn = chat_turn(request.match_info["model_id"], body.get("system"), body["messages"], stream=stream,
                         max_tokens=positive(config.get("maxTokens")))
        status = error_status(turn.text)
        headers = {"x-amzn-RequestId": request_id}
        if status:
            message = {429: "Too many requests, please wait before trying again.",
                       503: "Bedrock is unable to process your request."}.get(status, "The server encountered an internal error.")
            return web.json_response({"message": message}, status=status, headers={**headers, **self.error_headers(status)})
        answer = answer_to(turn)
        usage = {"inputTokens": answer.prompt_tokens, "outputTokens": answer.completion_tokens,
                 "totalTokens": answer.prompt_tokens + answer.completion_tokens}
        tool_config = body.get("toolConfig") if isinstance(body.get("toolConfig"), dict) else {}
        tool = ((tool_config.get("toolChoice") or {}).get("tool") or {}).get("name")
        specs = {t["toolSpec"].get("name"): t["toolSpec"] for t in tool_config.get("tools") or []
                 if isinstance(t, dict) and isinstance(t.get("toolSpec"), dict)}
        if tool in specs and not stream:  # the forced tool is called with the judge's values
            schema = (specs[tool].get("inputSchema") or {}).get("json")
            call = {"toolUseId": new_id("tooluse_", 22), "name": tool,
                    "input": schema_instance(schema, judged_values(answer.text))}
            return web.json_response({
                "output": {"message": {"role": "assistant", "content": [{"toolUse": call}]}},
                "stopReason": "tool_use", "usage": usage, "metrics": {"latencyMs": 120},
            }, headers=headers)
        if not stream:
            return web.json_response({
                "output": {"message": {"role": "assistant", "content": [{"text": answer.text}]}},
                "stopReason": BEDROCK_STOP[answer.finish], "usage": usage, "metrics": {"latencyMs": 120},
            }, headers=headers)
        frames = [event_frame("messageStart", {"role": "assistant"})]
        frames += [event_frame("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": p}})
                   for p in pieces(answer.text)]
        frames += [event_frame("contentBlockStop", {"contentBlockIndex": 0}),
                   event_frame("messageStop", {"stopReason": BEDROCK_STOP[answer.finish]}),
                   event_frame("metadata", {"usage": usage, "metrics": {"latencyMs": 120}})]
        return await emu.send_stream(request, "application/vnd.amazon.eventstream", frames, headers)


# =================================================================================================
# The server
# =================================================================================================

APIS: dict[str, Callable[[], Any]] = {
    "openai": lambda: OpenAIChat("openai"),
    "azure": lambda: OpenAIChat("azure"),
    "mistral": lambda: OpenAIChat("mistral"),
    "anthropic": AnthropicMessages,
    "ollama": OllamaChat,
    "gemini": GeminiGenerate,
    "bedrock": BedrockConverse,
}


def reject_body(provider: str, status: int, message: str) -> tuple[dict, dict]:
    """A request-shape or auth refusal in the provider's own error format."""
    if provider in ("openai", "azure", "mistral"):
        return OpenAIChat(provider).error(status, message)
    if provider == "anthropic":
        return AnthropicMessages.error(status, message, new_id("req_011C", 20)), {}
    if provider == "gemini":
        return GeminiGenerate.error(status, message), {}
    if provider == "bedrock":
        return {"message": message}, BedrockConverse.error_headers(status)
    return {"error": message}, {}


class Emulator:
    """One provider's API on a loopback port. ``requests`` keeps what it received (path, headers, body)."""

    def __init__(self, provider: str, host: str = "127.0.0.1", port: int = 0):
        if provider not in APIS:
            raise ValueError(f"unknown provider {provider!r}; known: {', '.join(PROVIDERS)}")
        if not ipaddress.ip_address("127.0.0.1" if host == "localhost" else host).is_loopback:
            raise ValueError(f"an emulator listens on loopback only, not {host!r}")
        self.provider = provider
        self.host, self.port = host, port
        self.url = ""
        self.requests: list[dict[str, Any]] = []
        self.api = APIS[provider]()
        self.app = web.Application(client_max_size=64 * 1024 * 1024)
        for method, path, handler in self.api.routes(self):
            self.app.router.add_route(method, path, self._wrap(handler))
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def __repr__(self) -> str:
        return f"<Emulator {self.provider} url={self.url or '(stopped)'} requests={len(self.requests)}>"

    def _wrap(self, handler: Callable) -> Callable:
        async def handle(request: web.Request) -> web.StreamResponse:
            self.requests.append({"method": request.method, "path": request.path_qs, "headers": dict(request.headers)})
            try:
                return await handler(self, request)
            except Reject as rejected:
                body, headers = reject_body(self.provider, rejected.status, rejected.message)
                return web.json_response(body, status=rejected.status, headers=headers)

        return handle

    async def json_body(self, request: web.Request) -> dict:
        raw = await request.read()
        self.requests[-1]["body"] = raw.decode("utf-8", "replace")
        try:
            body = json.loads(raw)
        except ValueError:
            raise Reject(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise Reject(400, "the request body must be a JSON object")
        return body

    @staticmethod
    async def send_stream(request: web.Request, content_type: str, frames: list[bytes], headers: dict) -> web.StreamResponse:
        response = web.StreamResponse(status=200, headers={"Content-Type": content_type, "Cache-Control": "no-cache", **headers})
        await response.prepare(request)
        for frame in frames:
            await response.write(frame)
        await response.write_eof()
        return response

    # ----- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> str:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.SockSite(self._runner, sock).start()
        self.url = f"http://{self.host}:{self.port}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> "Emulator":
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def __enter__(self) -> "Emulator":
        ready, failure = threading.Event(), []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self.start())
            except BaseException as exc:  # noqa: BLE001 - report start-up errors to the caller
                failure.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self.stop())
            loop.close()

        self._thread = threading.Thread(target=run, name=f"emulator-{self.provider}", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise TimeoutError("emulator did not start in time")
        if failure:
            raise failure[0]
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        self._thread = self._loop = None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sim.emulators", description=__doc__.splitlines()[0])
    parser.add_argument("--provider", required=True, choices=PROVIDERS)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)

    async def serve() -> None:
        emulator = Emulator(args.provider, args.host, args.port)
        print(f"EMULATOR_READY {await emulator.start()}", flush=True)
        stop = asyncio.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(signum, stop.set)
        try:
            await stop.wait()
        finally:
            await emulator.stop()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
