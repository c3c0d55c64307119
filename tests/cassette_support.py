"""What the cassette tests and the cassette recorder share.

``tests/test_cassettes.py`` replays, ``scripts/record_cassettes.py`` records; both run the *same*
scenarios through the same vcr configuration, so a cassette recorded today matches the replay
request for request and body for body. Here:

- ``PROVIDERS``: each provider's litellm model, price-map key, canonical origin, placeholder
  credentials and the variable that points litellm at an emulator;
- ``make_vcr``: scrubbing (request and response) and matching (method, URL, query, JSON body);
- ``wire_reply``: reads a recorded response in the provider's own format (text, usage tokens),
  independently of litellm, so the tests compare what litellm made of the wire with the wire;
- the scenarios: ``run_relay`` (the relay's post-call hook with a secondary on that provider) and
  ``run_stream`` (a streamed ``litellm.acompletion``);
- ``find_secrets``: the key-shaped-string scan every cassette must pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import vcr
import yaml

ROOT = Path(__file__).resolve().parent.parent
CASSETTES = ROOT / "cassettes"
MANIFEST = CASSETTES / "manifest.json"

#: plain: refine answer; stream: streamed answer; judge: guard verdict in strict JSON asked for in the
#: prompt; judge_schema: the same verdict asked for as structured output (RELAY_JUDGE_FORMAT=schema);
#: error: 429/5xx
CASES = ("plain", "stream", "judge", "judge_schema", "error")
#: LiteLLM fetches its Anthropic beta-header table from GitHub when it adds a beta header (structured
#: outputs do) unless told to use its bundled copy; replays and recordings never reach the network.
os.environ.setdefault("LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS", "True")

# =================================================================================================
# Providers
# =================================================================================================


@dataclass(frozen=True)
class Provider:
    name: str
    model: str  #: the relay's RELAY_SECONDARY_MODEL (a litellm model string)
    price_key: str  #: its entry in litellm.model_cost
    wire: str  #: response format: openai | anthropic | ollama | gemini | bedrock
    origin: str  #: scheme://host[:port] every cassette of this provider holds
    emulator_env: tuple[str, str]  #: (variable, path suffix) pointing litellm at an emulator
    error_status: int  #: the status the error case records
    placeholders: dict[str, str] = field(default_factory=dict)  #: fake credentials (replay, emulator)
    settings: dict[str, str] = field(default_factory=dict)  #: fixed for record and replay alike
    real_keys: tuple[str, ...] = ()  #: what --real needs from the environment
    origin_env: str = ""  #: a variable holding a user-specific origin (rewritten to ``origin``)


PROVIDERS: dict[str, Provider] = {p.name: p for p in (
    Provider(
        "openai", "openai/gpt-4o-mini", "gpt-4o-mini", "openai", "https://api.openai.com",
        ("OPENAI_API_BASE", "/v1"), 429,
        placeholders={"OPENAI_API_KEY": "sk-relay-placeholder-openai-000000000000000000"},
        real_keys=("OPENAI_API_KEY",),
    ),
    Provider(
        "azure", "azure/gpt-4o-mini", "azure/gpt-4o-mini", "openai", "https://relay-example.openai.azure.com",
        ("AZURE_API_BASE", ""), 429,
        placeholders={"AZURE_API_KEY": "relay-placeholder-azure-0000000000000000000000"},
        settings={"AZURE_API_BASE": "https://relay-example.openai.azure.com", "AZURE_API_VERSION": "2024-10-21"},
        real_keys=("AZURE_API_KEY", "AZURE_API_BASE"), origin_env="AZURE_API_BASE",
    ),
    Provider(
        "anthropic", "anthropic/claude-haiku-4-5-20251001", "claude-haiku-4-5-20251001", "anthropic",
        "https://api.anthropic.com", ("ANTHROPIC_API_BASE", ""), 529,
        placeholders={"ANTHROPIC_API_KEY": "sk-ant-api03-relay-placeholder-000000000000000000"},
        real_keys=("ANTHROPIC_API_KEY",),
    ),
    Provider(
        "ollama", "ollama_chat/llama3", "ollama/llama3", "ollama", "http://localhost:11434",
        ("OLLAMA_API_BASE", ""), 500,
        real_keys=("OLLAMA_API_BASE",), origin_env="OLLAMA_API_BASE",
    ),
    Provider(
        "gemini", "gemini/gemini-2.5-flash-lite", "gemini/gemini-2.5-flash-lite", "gemini",
        "https://generativelanguage.googleapis.com", ("GEMINI_API_BASE", "/v1beta"), 503,
        placeholders={"GEMINI_API_KEY": "AIzaSyRelayPlaceholder00000000000000000"},
        real_keys=("GEMINI_API_KEY",),
    ),
    Provider(
        "bedrock", "bedrock/amazon.nova-micro-v1:0", "amazon.nova-micro-v1:0", "bedrock",
        "https://bedrock-runtime.us-east-1.amazonaws.com", ("AWS_BEDROCK_RUNTIME_ENDPOINT", ""), 429,
        placeholders={  # AWS's documented example key pair, plus a fake session token
            "AWS_ACCESS_KEY_ID": "AKIAIOSFODNN7EXAMPLE",
            "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            "AWS_SESSION_TOKEN": "relay-placeholder-aws-session-token-000000000000",
        },
        settings={"AWS_REGION_NAME": "us-east-1"},
        real_keys=("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"),
    ),
    Provider(
        # litellm 1.106.12's mistral provider takes a custom base only from MISTRAL_AZURE_API_BASE
        # (llms/mistral/chat/transformation.py); it is used for emulator recordings only.
        "mistral", "mistral/mistral-small-latest", "mistral/mistral-small-latest", "openai",
        "https://api.mistral.ai", ("MISTRAL_AZURE_API_BASE", "/v1"), 429,
        placeholders={"MISTRAL_API_KEY": "relay-placeholder-mistral-00000000000000000000"},
        real_keys=("MISTRAL_API_KEY",),
    ),
)}

#: Environment variables a provider call may read; cleared around every scenario so nothing from the
#: developer's shell (a real key, a custom base URL, an AWS profile) leaks into a replay or recording.
ENV_PREFIXES = ("OPENAI_", "AZURE_", "ANTHROPIC_", "GEMINI_", "GOOGLE_", "VERTEX", "AWS_", "MISTRAL_",
                "OLLAMA_", "GROQ_", "BEDROCK_", "LITELLM_PROXY_")


@contextlib.contextmanager
def scoped_env(values: dict[str, str]) -> Iterator[None]:
    """Clear every provider variable, set ``values``, restore the environment afterwards."""
    saved = dict(os.environ)
    for name in list(os.environ):
        if name.startswith(ENV_PREFIXES):
            del os.environ[name]
    os.environ.update(values)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def replay_env(provider: Provider) -> dict[str, str]:
    """Placeholder credentials and fixed settings; no base URL, so litellm uses the real hosts."""
    return {**provider.placeholders, **provider.settings}


def cassette_path(provider: str, case: str) -> Path:
    return CASSETTES / provider / f"{case}.yaml"


# =================================================================================================
# vcr: scrubbing and matching
# =================================================================================================

#: Request headers removed on record (credentials, signatures, cookies).
SECRET_REQUEST_HEADERS = ("authorization", "x-api-key", "api-key", "x-goog-api-key", "x-amz-security-token",
                          "x-amz-date", "x-amz-content-sha256", "cookie", "proxy-authorization",
                          "openai-organization", "openai-project", "x-ms-client-request-id")
#: Request headers kept (everything else is dropped: an allow-list, so a new credential header of
#: some provider cannot slip through). They document the call; none is matched on.
KEPT_REQUEST_HEADERS = ("content-type", "accept", "anthropic-version", "anthropic-beta", "x-relay-depth")
#: Response headers removed on record: cookies, request and account identifiers.
SECRET_RESPONSE_HEADERS = ("set-cookie", "x-request-id", "request-id", "x-amzn-requestid", "x-amz-request-id",
                           "x-amz-id-2", "x-amz-cf-id", "x-amz-apigw-id", "x-amzn-trace-id", "apim-request-id",
                           "x-ms-client-request-id", "x-ms-request-id", "mistral-correlation-id", "x-kong-request-id",
                           "anthropic-organization-id", "openai-organization", "openai-project", "cf-ray",
                           "x-goog-request-id", "x-cloud-trace-context", "x-envoy-upstream-service-time", "server-timing")
SECRET_QUERY_PARAMETERS = ("key", "api_key", "api-key", "X-Amz-Security-Token", "X-Amz-Signature", "X-Amz-Credential")
REQUEST_ID_FIELD = re.compile(rb'("request_?[iI]d"\s*:\s*")[^"]*(")')

MATCH_ON = ("method", "scheme", "host", "port", "path", "query", "json_body")


#: the relay's proof of its own call (a time-stamped HMAC, see relay_plugin.mark_relay_call): different
#: on every call, so it is not part of what a cassette matches
RELAY_PROOF = re.compile(r"(?:\n\n)?\[relay-call \d+[ra]\.\d+\.[0-9a-f]{32}\]")


def _without_proof(value: Any) -> Any:
    if isinstance(value, str):
        return RELAY_PROOF.sub("", value)
    if isinstance(value, list):
        return [_without_proof(v) for v in value if not (isinstance(v, dict) and v.get("role") == "system"
                                                         and isinstance(v.get("content"), str)
                                                         and RELAY_PROOF.fullmatch(v["content"]))]
    if isinstance(value, dict):
        return {k: _without_proof(v) for k, v in value.items()}
    return value


def _normal_body(body: Any) -> Any:
    if body in (None, b"", ""):
        return None
    raw = body.encode() if isinstance(body, str) else body
    try:
        return _without_proof(json.loads(raw))
    except (TypeError, ValueError):
        return raw


#: The latest body mismatch the matcher saw (litellm swallows vcr's own message): for failure reports.
MISMATCHES: list[str] = []


def json_body(r1: Any, r2: Any) -> None:
    """vcr matcher: the request bodies are equal as JSON (key order and spacing do not matter)."""
    one, two = _normal_body(r1.body), _normal_body(r2.body)
    if one != two:
        MISMATCHES.append(first_difference(one, two))
        raise AssertionError(MISMATCHES[-1])


def first_difference(sent: Any, recorded: Any, path: str = "body") -> str:
    """Where two JSON values first differ, e.g. ``body.messages[0].content: sent '...', recorded '...'``."""
    if isinstance(sent, dict) and isinstance(recorded, dict):
        for key in sorted(set(sent) | set(recorded)):
            if sent.get(key, "<missing>") != recorded.get(key, "<missing>"):
                return first_difference(sent.get(key, "<missing>"), recorded.get(key, "<missing>"), f"{path}.{key}")
    if isinstance(sent, list) and isinstance(recorded, list) and len(sent) == len(recorded):
        for index, (one, two) in enumerate(zip(sent, recorded, strict=False)):
            if one != two:
                return first_difference(one, two, f"{path}[{index}]")
    if isinstance(sent, str) and isinstance(recorded, str):
        at = next((i for i, (a, b) in enumerate(zip(sent, recorded, strict=False)) if a != b), min(len(sent), len(recorded)))
        return f"{path} differs at character {at}: sent {sent[max(at - 30, 0):at + 50]!r}, " \
               f"recorded {recorded[max(at - 30, 0):at + 50]!r}"
    return f"{path}: sent {str(sent)[:200]!r}, recorded {str(recorded)[:200]!r}"


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def scrub_request(origin_map: dict[str, str]):
    """before_record_request: move the request to its canonical origin and keep only documented
    headers. Runs on record *and* before matching, so a replayed request is treated the same way."""

    def scrub(request: Any) -> Any:
        for source, target in origin_map.items():
            if request.uri.startswith(source):
                request.uri = target + request.uri[len(source):]
        parts = urlsplit(request.uri)
        if parts.query:  # vcr's filter_query_parameters does this too; kept here so it is tested
            kept = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in SECRET_QUERY_PARAMETERS]
            request.uri = urlunsplit(parts._replace(query=urlencode(kept)))
        for name in list(request.headers):
            if name.lower() not in KEPT_REQUEST_HEADERS:
                del request.headers[name]
        return request

    return scrub


def scrub_response(response: dict) -> dict:
    """before_record_response: drop cookies and request/account ids (headers and JSON bodies)."""
    headers = response.get("headers") or {}
    for name in list(headers):
        if name.lower() in SECRET_RESPONSE_HEADERS:
            del headers[name]
    body = response.get("body") or {}
    raw = body.get("string")
    if isinstance(raw, (bytes, str)):
        data = raw.encode() if isinstance(raw, str) else raw
        data = REQUEST_ID_FIELD.sub(rb"\1req_scrubbed\2", data)
        body["string"] = data.decode() if isinstance(raw, str) else data
    return response


def make_vcr(record_mode: str = "none", origin_map: dict[str, str] | None = None,
             library: Path = CASSETTES) -> vcr.VCR:
    """Replay-only by default: ``record_mode="none"`` plays what is recorded and refuses the rest."""
    recorder = vcr.VCR(
        cassette_library_dir=str(library),
        serializer="yaml",
        record_mode=record_mode,
        match_on=MATCH_ON,
        filter_headers=SECRET_REQUEST_HEADERS,
        filter_query_parameters=SECRET_QUERY_PARAMETERS,
        before_record_request=scrub_request(origin_map or {}),
        before_record_response=scrub_response,
        decode_compressed_response=True,
    )
    recorder.register_matcher("json_body", json_body)
    return recorder


# =================================================================================================
# Reading a recorded exchange in the provider's own format (independently of litellm)
# =================================================================================================


@dataclass
class WireReply:
    status: int
    text: str  #: the answer text as the provider sent it (a stream reassembled)
    input_tokens: int
    output_tokens: int
    request: dict  #: the recorded request (method, uri, headers, body)
    body: bytes


def load_interactions(path: Path) -> list[dict]:
    with open(path, "rb") as handle:
        return (yaml.safe_load(handle) or {}).get("interactions") or []


def wire_reply(provider: Provider, path: Path) -> WireReply:
    """The one recorded exchange of a cassette, read as ``provider.wire`` documents it."""
    interactions = load_interactions(path)
    assert len(interactions) == 1, f"{path} should hold exactly one exchange, holds {len(interactions)}"
    request, response = interactions[0]["request"], interactions[0]["response"]
    raw = response["body"].get("string") or b""
    raw = raw.encode() if isinstance(raw, str) else raw
    status = response["status"]["code"]
    if status != 200:
        return WireReply(status, "", 0, 0, request, raw)
    headers = {k.lower(): v for k, v in (response.get("headers") or {}).items()}
    content_type = " ".join(headers.get("content-type") or [])
    streamed = any(kind in content_type for kind in ("text/event-stream", "amazon.eventstream", "ndjson"))
    reader = STREAM_READERS[provider.wire] if streamed else JSON_READERS[provider.wire]
    text, tokens_in, tokens_out = reader(raw if streamed else json.loads(raw))
    return WireReply(status, text, tokens_in, tokens_out, request, raw)


def _sse_data(raw: bytes) -> list[Any]:
    events = []
    for line in raw.decode().splitlines():
        if line.startswith("data:") and line[5:].strip() not in ("", "[DONE]"):
            events.append(json.loads(line[5:]))
    return events


def _uncached(usage: dict) -> dict:
    """The cost check prices every prompt token at the input price: no prompt-cache hits expected."""
    assert not (usage.get("prompt_tokens_details") or {}).get("cached_tokens"), "cached prompt tokens in the usage"
    return usage


def _openai_json(body: dict) -> tuple[str, int, int]:
    usage = _uncached(body["usage"])
    return body["choices"][0]["message"]["content"], usage["prompt_tokens"], usage["completion_tokens"]


def _openai_stream(raw: bytes) -> tuple[str, int, int]:
    text, usage = "", None
    for event in _sse_data(raw):
        for choice in event.get("choices") or []:
            text += (choice.get("delta") or {}).get("content") or ""
        usage = event.get("usage") or usage
    usage = _uncached(usage)
    return text, usage["prompt_tokens"], usage["completion_tokens"]


def _anthropic_json(body: dict) -> tuple[str, int, int]:
    usage = body["usage"]
    assert not usage.get("cache_read_input_tokens") and not usage.get("cache_creation_input_tokens")
    # a forced tool (structured output on models without output_format) answers in a tool_use block
    text = "".join(b["text"] if b["type"] == "text" else json.dumps(b["input"]) for b in body["content"]
                   if b["type"] in ("text", "tool_use"))
    return text, usage["input_tokens"], usage["output_tokens"]


def _anthropic_stream(raw: bytes) -> tuple[str, int, int]:
    text, tokens_in, tokens_out = "", 0, 0
    for event in _sse_data(raw):
        if event["type"] == "message_start":
            tokens_in = event["message"]["usage"]["input_tokens"]
        elif event["type"] == "content_block_delta" and event["delta"]["type"] == "text_delta":
            text += event["delta"]["text"]
        elif event["type"] == "message_delta":
            tokens_out = event["usage"]["output_tokens"]
    return text, tokens_in, tokens_out


def _ollama_json(body: dict) -> tuple[str, int, int]:
    return body["message"]["content"], body["prompt_eval_count"], body["eval_count"]


def _ollama_stream(raw: bytes) -> tuple[str, int, int]:
    lines = [json.loads(line) for line in raw.decode().splitlines() if line.strip()]
    return "".join(line["message"]["content"] for line in lines), lines[-1]["prompt_eval_count"], lines[-1]["eval_count"]


def _gemini_usage(usage: dict) -> tuple[int, int]:
    return usage["promptTokenCount"], usage.get("candidatesTokenCount", 0) + usage.get("thoughtsTokenCount", 0)


def _gemini_json(body: dict) -> tuple[str, int, int]:
    text = "".join(p.get("text", "") for p in body["candidates"][0]["content"]["parts"])
    return (text, *_gemini_usage(body["usageMetadata"]))


def _gemini_stream(raw: bytes) -> tuple[str, int, int]:
    text, usage = "", {}
    for event in _sse_data(raw):
        for candidate in event.get("candidates") or []:
            text += "".join(p.get("text", "") for p in (candidate.get("content") or {}).get("parts") or [])
        usage = event.get("usageMetadata") or usage
    return (text, *_gemini_usage(usage))


def _bedrock_json(body: dict) -> tuple[str, int, int]:
    # structured output on Bedrock is a forced tool: its toolUse input is the answer
    text = "".join(b["text"] if "text" in b else json.dumps(b["toolUse"]["input"]) if "toolUse" in b else ""
                   for b in body["output"]["message"]["content"])
    return text, body["usage"]["inputTokens"], body["usage"]["outputTokens"]


def event_stream_messages(raw: bytes) -> Iterator[tuple[dict[str, str], bytes]]:
    """Decode AWS event-stream framing (prelude, headers, payload, CRC32s), checking both CRCs."""
    offset = 0
    while offset < len(raw):
        total, headers_length = struct.unpack_from(">II", raw, offset)
        (prelude_crc,) = struct.unpack_from(">I", raw, offset + 8)
        assert prelude_crc == zlib.crc32(raw[offset:offset + 8]), "bad event-stream prelude CRC"
        message = raw[offset:offset + total]
        (message_crc,) = struct.unpack_from(">I", message, total - 4)
        assert message_crc == zlib.crc32(message[:-4]), "bad event-stream message CRC"
        headers, cursor = {}, 12
        while cursor < 12 + headers_length:
            name_length = message[cursor]
            name = message[cursor + 1:cursor + 1 + name_length].decode()
            cursor += 1 + name_length
            assert message[cursor] == 7, "only string headers are expected"
            (value_length,) = struct.unpack_from(">H", message, cursor + 1)
            headers[name] = message[cursor + 3:cursor + 3 + value_length].decode()
            cursor += 3 + value_length
        yield headers, message[12 + headers_length:total - 4]
        offset += total


def _bedrock_stream(raw: bytes) -> tuple[str, int, int]:
    text, usage = "", {}
    for headers, payload in event_stream_messages(raw):
        event = json.loads(payload)
        if headers.get(":event-type") == "contentBlockDelta":
            text += event["delta"].get("text", "")
        elif headers.get(":event-type") == "metadata":
            usage = event["usage"]
    return text, usage["inputTokens"], usage["outputTokens"]


JSON_READERS = {"openai": _openai_json, "anthropic": _anthropic_json, "ollama": _ollama_json,
                "gemini": _gemini_json, "bedrock": _bedrock_json}
STREAM_READERS = {"openai": _openai_stream, "anthropic": _anthropic_stream, "ollama": _ollama_stream,
                  "gemini": _gemini_stream, "bedrock": _bedrock_stream}


def requested_schema(provider: Provider, body: dict) -> dict | None:
    """The JSON schema a recorded request asks the answer to satisfy, read in the provider's own shape
    (None: no structured output asked for)."""
    if provider.name == "anthropic":
        if isinstance(body.get("output_format"), dict):
            return body["output_format"]["schema"]
        tools = {t["name"]: t["input_schema"] for t in body.get("tools") or []}
        return tools.get((body.get("tool_choice") or {}).get("name"))
    if provider.wire == "gemini":
        config = body.get("generationConfig") or {}
        return config.get("response_json_schema") or config.get("response_schema")
    if provider.wire == "bedrock":
        config = body.get("toolConfig") or {}
        forced = ((config.get("toolChoice") or {}).get("tool") or {}).get("name")
        specs = {t["toolSpec"]["name"]: t["toolSpec"]["inputSchema"]["json"] for t in config.get("tools") or []}
        return specs.get(forced)
    if provider.wire == "ollama":
        return body.get("format") if isinstance(body.get("format"), dict) else None
    wanted = body.get("response_format") or {}
    return (wanted.get("json_schema") or {}).get("schema") if wanted.get("type") == "json_schema" else None


def expected_cost(provider: Provider, reply: WireReply) -> float:
    """The provider's usage tokens times the model's prices in litellm's price map."""
    import litellm

    price = litellm.model_cost[provider.price_key]
    return reply.input_tokens * price["input_cost_per_token"] + reply.output_tokens * price["output_cost_per_token"]


# =================================================================================================
# Cases: the same calls for recording and replay
# =================================================================================================

PRIMARY_MODEL = "llama"  #: the proxy model_name the client asked for (the primary)
#: The guard policy of the judge case: narrow enough that a real model blocks the answer reliably.
GUARD_POLICY = "Block every answer that recommends pineapple as a pizza topping. Allow everything else."


@dataclass(frozen=True)
class RelayCase:
    mode: str
    question: str  #: the client's last message (emulator markers in parentheses)
    primary_answer: str


def relay_case(provider: Provider, case: str) -> RelayCase:
    if case == "plain":
        return RelayCase("refine", "What is the capital of France? Reply in one short sentence. "
                                  "(SIM:ANSWER=The capital of France is Paris.)", "paris i think")
    if case in ("judge", "judge_schema"):
        return RelayCase("guard", "Which topping should I put on my pizza? (SIM:BLOCK)",
                        "Pineapple, definitely: pineapple is the best pizza topping.")
    if case == "error":
        return RelayCase("refine", f"Say hello. (SIM:HTTP{provider.error_status})", "Hello!")
    raise ValueError(f"{case!r} is not a relay case")


STREAM_PROMPT = "Count from one to five in words, comma-separated. (SIM:ANSWER=One, two, three, four, five.)"
NONCE = "c0ffee00c0ffee00"


@contextlib.contextmanager
def fixed_nonce() -> Iterator[None]:
    """The relay fences prompts with a random nonce per call; fixed here so bodies can match.
    Only relay_plugin's own reference to ``secrets`` is replaced (no global monkeypatching)."""
    import relay_plugin

    original = relay_plugin.secrets
    relay_plugin.secrets = SimpleNamespace(token_hex=lambda nbytes=None: NONCE[: 2 * (nbytes or 8)])
    try:
        yield
    finally:
        relay_plugin.secrets = original


class _InstantSleep:
    """Stands in for ``relay_plugin.asyncio``: ``sleep`` records the delay and only yields once;
    everything else is the real asyncio. The relay's retry backoff then costs no wall time."""

    def __init__(self) -> None:
        self.slept: list[float] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)

    async def sleep(self, delay: float, result: Any = None) -> Any:
        self.slept.append(delay)
        await asyncio.sleep(0)
        return result


@contextlib.contextmanager
def instant_sleep() -> Iterator[_InstantSleep]:
    import relay_plugin

    original, relay_plugin.asyncio = relay_plugin.asyncio, _InstantSleep()
    try:
        yield relay_plugin.asyncio
    finally:
        relay_plugin.asyncio = original


def relay_env(provider: Provider, case: str) -> dict[str, str]:
    """The relay's configuration for a case. Settings that change what goes on the wire are pinned,
    so a change of a default shows up in one place, not as a mysterious cassette mismatch."""
    return {
        "RELAY_SECONDARY_MODEL": provider.model,
        "RELAY_MODE": relay_case(provider, case).mode,
        "RELAY_GUARD_POLICY": GUARD_POLICY,
        "RELAY_SECONDARY_MAX_TOKENS": "256",
        "RELAY_TIMEOUT_S": "30",
        "RELAY_DEADLINE_S": "60",
        "RELAY_RETRIES": "1",  # the error cases record the first attempt and the one retry
        "RELAY_CACHE_TTL_S": "0",
        "RELAY_JUDGE_FORMAT": "schema" if case == "judge_schema" else "prompt",
    }


@dataclass
class RelayRun:
    """What the client got from the relay: the (possibly rewritten) response and the x-relay-* headers."""

    response: Any
    headers: dict[str, str]
    outcome: Any  #: relay_plugin.Outcome
    slept: list[float]  #: the relay's retry backoffs, in seconds (not actually waited)

    @property
    def text(self) -> str:
        return self.response.choices[0].message.content

    @property
    def cost(self) -> float:
        return float(self.headers["x-relay-cost-usd"])


async def run_relay(provider: Provider, case: str, call_id: str = "") -> RelayRun:
    """The relay's post-call hooks, in-process, on a primary answer; its secondary is ``provider``."""
    import litellm
    import relay_plugin

    asked = relay_case(provider, case)
    config = relay_plugin.RelayConfig.from_env(relay_env(provider, case))
    handler = relay_plugin.RelayHandler(config, rng=random.Random(0))
    primary = litellm.ModelResponse(model=PRIMARY_MODEL, choices=[{
        "index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": asked.primary_answer}}])
    data = {"model": PRIMARY_MODEL, "messages": [{"role": "user", "content": asked.question}],
            "litellm_call_id": call_id or f"cassette-{provider.name}-{case}", "metadata": {}}
    with fixed_nonce(), instant_sleep() as sleeper:
        response = await handler.async_post_call_success_hook(data, None, primary)
    headers = await handler.async_post_call_response_headers_hook(data, None, response) or {}
    outcome = next((v for v in data["metadata"].values() if isinstance(v, relay_plugin.Outcome)), None)
    return RelayRun(response, headers, outcome, sleeper.slept)


@dataclass
class StreamRun:
    text: str
    prompt_tokens: int
    completion_tokens: int
    cost: float
    chunks: int


async def run_stream(provider: Provider) -> StreamRun:
    """A streamed answer straight from litellm: the call the relay makes when a streaming client's final
    answer comes from the secondary."""
    import litellm
    import relay_plugin

    stream = await litellm.acompletion(
        model=provider.model, messages=[{"role": "user", "content": STREAM_PROMPT}], max_tokens=64,
        stream=True, stream_options={"include_usage": True}, timeout=30, num_retries=0, max_retries=0,
    )
    chunks = [chunk async for chunk in stream]
    text = "".join((c.choices[0].delta.content or "") for c in chunks if c.choices)
    built = litellm.stream_chunk_builder(chunks)
    cost = relay_plugin._cost_of(built)  # how the relay prices a secondary answer
    return StreamRun(text, built.usage.prompt_tokens, built.usage.completion_tokens, cost, len(chunks))


# =================================================================================================
# Secret scan
# =================================================================================================

SECRET_PATTERNS: dict[str, re.Pattern] = {
    "OpenAI/Anthropic-style key (sk-...)": re.compile(r"\bsk-[A-Za-z0-9_\-]{16,}"),
    "Google API key (AIza...)": re.compile(r"\bAIza[0-9A-Za-z_\-]{30,}"),
    "AWS access key id (AKIA/ASIA...)": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "bearer token": re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/=\-]{8,}"),
    "AWS SigV4 signature": re.compile(r"(?i)\bsignature=[0-9a-f]{16,}"),
    "AWS SigV4 credential scope": re.compile(r"(?i)\bcredential=[A-Za-z0-9]{16,}/"),
    "AWS security token": re.compile(r"(?i)x-amz-security-token"),
    "key= query parameter": re.compile(r"[?&](?:key|api[-_]key)=[^&\s\"'#]+"),
    "credential or cookie header": re.compile(
        r"(?im)^[\s\-]*['\"]?(?:authorization|proxy-authorization|x-api-key|api-key|x-goog-api-key|cookie|set-cookie)"
        r"['\"]?\s*:"),
    "request id header": re.compile(
        r"(?im)^[\s\-]*['\"]?(?:x-request-id|request-id|x-amzn-requestid|apim-request-id|x-ms-request-id)['\"]?\s*:"),
}


def placeholder_values() -> list[str]:
    return sorted({v for p in PROVIDERS.values() for v in p.placeholders.values() if len(v) >= 8})


def find_secrets(text: str, extra_values: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Every key-shaped string in ``text``, as ``"<kind>: <excerpt>"`` (excerpts cut short)."""
    found = [f"{kind}: {m.group(0)[:24]}..." for kind, pattern in SECRET_PATTERNS.items() for m in pattern.finditer(text)]
    found += [f"a recording credential: {value[:6]}..." for value in (*placeholder_values(), *extra_values)
              if value and value in text]
    return found


# =================================================================================================
# Manifest: where each cassette came from
# =================================================================================================


def read_manifest() -> dict:
    return json.loads(MANIFEST.read_text()) if MANIFEST.exists() else {}


def write_manifest(manifest: dict) -> None:
    MANIFEST.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
