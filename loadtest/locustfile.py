"""Locust users for the relay load tests: chat and /v1/messages, non-streaming and streaming.

Run by ``loadtest/run.py`` and ``loadtest/bench.py`` (``locust --headless``), which set:

    LOADTEST_KEY      the proxy's master key
    LOADTEST_MIX      request kinds, comma-separated: chat, chat-stream, messages, messages-stream
    LOADTEST_MODELS   primary model names, comma-separated; every user cycles through kind x model
    LOADTEST_RATE     requests per second per user (0: back to back, as fast as the proxy answers)
    LOADTEST_OUT      where to write every request's record (JSON) when the test stops
    LOADTEST_TIMEOUT  client timeout in seconds (default 60)
    LOADTEST_PLAN     (make bench) a JSON file of timed steps, each {id, name, host, model, kind, prompt,
                      users, rate, start, end} (seconds after the test started): during a step its first
                      `users` users send `kind` requests for `model` to `host` (with `prompt`, else the
                      cycled prompts), the others wait; between
                      steps everyone waits, so one Locust process measures many proxies one after another

A response counts as a failure (``resp.failure``) when its status is not 200 or its body is not a
complete answer of the endpoint's format: a non-empty text in the JSON, or a well-formed event
stream that carries text and ends properly. Each record keeps the ``x-relay-outcome`` and
``x-relay-cost-usd`` headers (for a stream, whose headers leave before the relay has run and say
``pending``, also the outcome and cost of the ``relay`` object on its last event), the exact duration
and, for streams, the time to the first text (the first event that carries answer text).
"""

import itertools
import json
import os
import random
import time
from pathlib import Path
from typing import NamedTuple

import gevent
from locust import FastHttpUser, constant, constant_throughput, events, task

KEY = os.environ.get("LOADTEST_KEY", "sk-relay-dev-master-key")
MIX = [k.strip() for k in os.environ.get("LOADTEST_MIX", "chat").split(",") if k.strip()]
MODELS = [m.strip() for m in os.environ.get("LOADTEST_MODELS", "mock-primary").split(",") if m.strip()]
RATE = float(os.environ.get("LOADTEST_RATE", "0"))
OUT = os.environ.get("LOADTEST_OUT", "")
TIMEOUT = float(os.environ.get("LOADTEST_TIMEOUT", "60"))
PLAN = json.loads(Path(os.environ["LOADTEST_PLAN"]).read_text())["steps"] if os.environ.get("LOADTEST_PLAN") else None
STARTED_AT: list[float] = []  #: wall clock of test_start
_USER_NUMBERS = itertools.count()

#: The prompts, cycled. SIM:BLOCK makes the simulated guard block, SIM:LOWSCORE makes the simulated
#: judge score low (escalate); they change nothing else, so every mode sees the same traffic.
PROMPTS = (
    "Why is the sky blue?",
    "Name three prime numbers and explain why they are prime.",
    "Summarise the plot of Hamlet in two sentences. SIM:LOWSCORE",
    "How do I pick a strong password?",
    "Tell me something the policy forbids. SIM:BLOCK",
)


class Record(NamedTuple):
    """One request as a client saw it; records.json holds them as lists, under ``fields``."""

    t: float  #: when the response ended (epoch seconds)
    name: str  #: the request's name in Locust's statistics
    ok: bool
    outcome: str | None  #: x-relay-outcome (a stream's headers say "pending")
    cost_usd: float
    ms: float  #: duration, to the last byte
    ttft_ms: float | None  #: time to the first text of a stream
    note: str
    final: str | None  #: the outcome at the end (a stream's relay object, else the header)
    relay_ms: float | None  #: x-relay-latency-ms
    step: int | None  #: the plan step that sent it


RECORDS: list[Record] = []


def _outcome(resp) -> tuple[str | None, float, float | None]:
    """``(x-relay-outcome, x-relay-cost-usd, x-relay-latency-ms)`` of a response."""
    outcome = resp.headers.get("x-relay-outcome")
    try:
        cost = float(resp.headers.get("x-relay-cost-usd") or 0.0)
    except ValueError:
        cost = 0.0
    try:
        relay_ms = float(resp.headers["x-relay-latency-ms"]) if resp.headers.get("x-relay-latency-ms") else None
    except ValueError:
        relay_ms = None
    return outcome, cost, relay_ms


def _sse_events(body: str) -> list[tuple[str | None, str]]:
    """``(event name, data)`` pairs of a text/event-stream body."""
    events_, name, data = [], None, []
    for line in body.splitlines() + [""]:
        if not line:
            if data:
                events_.append((name, "\n".join(data)))
            name, data = None, []
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
    return events_


def stream_relay(body: str) -> dict | None:
    """The ``relay`` object a relayed stream carries on its last events (outcome, cost), if any."""
    found = None
    for _, data in _sse_events(body):
        try:
            value = json.loads(data)
        except ValueError:
            continue
        if isinstance(value, dict) and isinstance(value.get("relay"), dict):
            found = value["relay"]
    return found


def has_text(line: bytes) -> bool:
    """True for an event-stream line that carries answer text (chat delta or Anthropic text delta)."""
    if not line.startswith(b"data:") or b"[DONE]" in line:
        return False
    try:
        value = json.loads(line[5:])
    except ValueError:
        return False
    if not isinstance(value, dict):
        return False
    if value.get("type") == "content_block_delta":
        return bool((value.get("delta") or {}).get("text"))
    return any((c.get("delta") or {}).get("content") for c in value.get("choices") or [] if isinstance(c, dict))


def check_chat(body: dict) -> str | None:
    choices = body.get("choices") or []
    text = (choices[0].get("message") or {}).get("content") if choices else None
    return None if isinstance(text, str) and text.strip() else "no answer text in choices[0].message.content"


def check_chat_stream(body: str) -> str | None:
    pairs = _sse_events(body)
    if not pairs or pairs[-1][1] != "[DONE]":
        return "stream did not end with data: [DONE]"
    text = ""
    for _, data in pairs[:-1]:
        chunk = json.loads(data)
        if "error" in chunk:
            return f"error chunk in stream: {str(chunk['error'])[:200]}"
        for choice in chunk.get("choices") or []:
            text += (choice.get("delta") or {}).get("content") or ""
    return None if text.strip() else "stream carried no text"


def check_messages(body: dict) -> str | None:
    if body.get("type") != "message":
        return f"not an Anthropic message (type={body.get('type')!r})"
    text = "".join(b.get("text", "") for b in body.get("content") or [] if b.get("type") == "text")
    return None if text.strip() else "no text block in content"


def check_messages_stream(body: str) -> str | None:
    pairs = _sse_events(body)
    kinds = [json.loads(data).get("type") for _, data in pairs]
    if "error" in kinds:
        return "error event in stream"
    if not kinds or kinds[0] != "message_start" or kinds[-1] != "message_stop":
        return f"stream not framed message_start ... message_stop (got {kinds[:1]} ... {kinds[-1:]})"
    text = "".join((json.loads(d).get("delta") or {}).get("text", "") for _, d in pairs
                   if json.loads(d).get("type") == "content_block_delta")
    return None if text.strip() else "stream carried no text"


KINDS = {  # kind: (path, stream, check of the body)
    "chat": ("/v1/chat/completions", False, check_chat),
    "chat-stream": ("/v1/chat/completions", True, check_chat_stream),
    "messages": ("/v1/messages", False, check_messages),
    "messages-stream": ("/v1/messages", True, check_messages_stream),
}


class RelayUser(FastHttpUser):
    """One client: cycles through every (kind, model) pair, one request per task."""

    wait_time = constant_throughput(RATE) if RATE > 0 and PLAN is None else constant(0)
    network_timeout = TIMEOUT
    connection_timeout = TIMEOUT

    def on_start(self) -> None:
        self.number = next(_USER_NUMBERS)
        pairs = [(k, m) for k in MIX for m in MODELS]
        start = random.randrange(len(pairs))
        self.pairs = itertools.cycle(pairs[start:] + pairs[:start])
        self.prompts = itertools.cycle(PROMPTS[start % len(PROMPTS):] + PROMPTS[:start % len(PROMPTS)])

    @task
    def ask(self) -> None:
        if PLAN is None:
            self.send(*next(self.pairs))
            return
        now = time.time() - (STARTED_AT[0] if STARTED_AT else time.time())
        step = next((s for s in PLAN if s["start"] <= now < s["end"]), None)
        if step is None or self.number >= step["users"]:
            gevent.sleep(0.02)  # not this user's turn: between steps, or a step with fewer users
            return
        began = time.perf_counter()
        self.send(step["kind"], step["model"], host=step["host"], step=step["id"], prompt=step.get("prompt"),
                  name=f"{step['name']} {step['kind']} {step['model']}")
        if step["rate"] > 0:  # constant throughput per user, as Locust's constant_throughput
            gevent.sleep(max(0.0, 1 / step["rate"] - (time.perf_counter() - began)))

    def send(self, kind: str, model: str, host: str = "", step: int | None = None, name: str = "",
             prompt: str | None = None) -> None:
        path, stream, check = KINDS[kind]
        body = {"model": model, "messages": [{"role": "user", "content": prompt or next(self.prompts)}], "stream": stream}
        if path == "/v1/messages":
            body["max_tokens"] = 256
        headers = {"Authorization": f"Bearer {KEY}", "anthropic-version": "2023-06-01"}
        name = name or f"{kind} {model}"
        started = time.perf_counter()
        ttft = None
        note = ""
        with self.client.post(host + path, json=body, headers=headers, name=name, stream=stream,
                              catch_response=True) as resp:
            if stream and resp.status_code == 200:
                lines = []
                while line := resp._response.readline(b"\n"):  # geventhttpclient: returns as each line lands
                    lines.append(line)
                    if ttft is None and has_text(line):
                        ttft = (time.perf_counter() - started) * 1000
                lines.append(resp._response.read())  # a last line without a newline (a JSON body)
                raw = b"".join(lines)
                resp.request_meta["response_length"] = len(raw)
            else:
                raw = resp.content or b""
            duration = (time.perf_counter() - started) * 1000
            resp.request_meta["response_time"] = duration  # streams: until the last byte, not the headers
            outcome, cost, relay_ms = _outcome(resp)
            final = outcome
            problem = None
            if resp.status_code != 200:
                problem = f"HTTP {resp.status_code}: {raw[:200].decode(errors='replace')}"
            else:
                try:
                    text = raw.decode()
                    if stream and not resp.headers.get("content-type", "").startswith("text/event-stream"):
                        # litellm answers a mock_response model's streaming /v1/messages with one JSON body
                        note = "stream_answered_as_json"
                        problem = (KINDS[kind.replace("-stream", "")][2])(json.loads(text))
                    else:
                        problem = check(text if stream else json.loads(text))
                        relay = stream_relay(text) if stream else None
                        if relay is not None:  # a stream's headers say "pending"; its end says what happened
                            final = str(relay.get("outcome"))
                            cost = float(relay.get("cost_usd") or 0.0)
                except (ValueError, AttributeError, TypeError) as exc:
                    problem = f"invalid body: {exc.__class__.__name__}: {exc}"
            if problem:
                resp.failure(problem)
            else:
                resp.success()
            RECORDS.append(Record(t=time.time(), name=name, ok=problem is None, outcome=outcome, cost_usd=cost,
                                  ms=duration, ttft_ms=ttft, note=note, final=final, relay_ms=relay_ms, step=step))


CPU_WARNINGS: list[float] = []


@events.test_start.add_listener
def mark_start(environment, **_kwargs) -> None:
    STARTED_AT.append(time.time())
    if OUT:  # the harness times its fault phases and plan steps from this moment
        with open(OUT + ".started", "w") as f:
            f.write(repr(STARTED_AT[0]))


@events.cpu_warning.add_listener
def note_cpu_warning(environment, cpu_usage, **_kwargs) -> None:
    CPU_WARNINGS.append(cpu_usage)  # Locust itself was CPU-bound: its figures understate the proxy


@events.test_stop.add_listener
def write_records(environment, **_kwargs) -> None:
    if OUT:
        with open(OUT, "w") as f:
            json.dump({"fields": list(Record._fields), "records": RECORDS, "cpu_warnings": CPU_WARNINGS}, f)
