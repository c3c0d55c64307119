"""Guard integrity, from outside, as an attacker would try it: nothing a client or a provider sends gets
an answer past an operator's fail-closed guard, and no secret or provider detail reaches a client.

The guard's judge is the simulator's ``gpt-4o-mini`` (model ``sec``): it blocks whatever it is shown
that contains ``SIM:BLOCK``. Primaries that must send exact bytes (several choices, thinking, reasoning,
a stream in odd pieces, an error echoing the key) are a ``CannedProvider`` (tests/canned_upstream.py).
"""

import json
import time
import uuid

import httpx
import openai
import pytest

import relay_plugin
from sim import stack
from sim.stack import model_entry
from tests.canned_upstream import Canned, CannedProvider, HeaderDroppingForwarder, data_sse, pieces, sse
from tests.proxy_support import BASE_RELAY_ENV, relay_test_models, start_test_proxy

pytestmark = pytest.mark.proxy

REFUSAL = "I can't help with that request."
CANNED_KEY = "sk-canned-provider-key-0123456789abcdef"


@pytest.fixture(scope="module")
def canned():
    provider = CannedProvider()
    yield provider
    provider.stop()


def canned_models(url: str) -> list[dict]:
    return [
        model_entry("c-openai", "openai/gpt-canned", url + "/v1", api_key=CANNED_KEY),
        model_entry("c-openai-window", "openai/gpt-canned", url + "/v1", {"mode": "guard", "stream_guard": "window"},
                    api_key=CANNED_KEY),
        model_entry("c-claude", "anthropic/claude-canned", url, api_key=CANNED_KEY),
    ]


@pytest.fixture(scope="module")
def guarded(workdir, sim, canned):
    """An operator's strict guard: every model, fail-closed, no client overrides."""
    env = {**BASE_RELAY_ENV, "RELAY_MODE": "guard", "RELAY_FAIL_MODE": "closed", "RELAY_CLIENT_OVERRIDE": "none",
           "RELAY_APPLY_TO": "*", "RELAY_MAX_INPUT_CHARS": "2000", "RELAY_STREAM_WINDOW_CHARS": "40"}
    handle = start_test_proxy(workdir, "guarded", sim.url, env, relay_test_models(sim.url) + canned_models(canned.url))
    yield handle
    handle.stop()


def chat_stream(handle, model: str, content: str, **kwargs):
    """``(headers, text, chunks)`` of a streamed chat completion (choice 0's text)."""
    with handle.openai.chat.completions.with_streaming_response.create(
            model=model, messages=[{"role": "user", "content": content}], stream=True, **kwargs) as raw:
        headers = dict(raw.headers)
        chunks = list(raw.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == 0)
    return headers, text, chunks


def relay_of(chunks) -> dict:
    found = [c.model_extra["relay"] for c in chunks if c.model_extra and "relay" in c.model_extra]
    assert len(found) == 1, f"expected one relay object, got {len(found)}"
    return found[0]


def all_stream_text(chunks) -> str:
    """Everything a streaming client could read: every choice's text and every tool call's arguments."""
    out = []
    for chunk in chunks:
        for choice in chunk.choices or []:
            out.append(choice.delta.content or "")
            for call in choice.delta.tool_calls or []:
                out.append((call.function.arguments or "") if call.function else "")
    return "".join(out)


# ----- 1. forged internal markers ------------------------------------------------------------------

FORGERIES = {
    "depth header 1": ({"x-relay-depth": "1"}, {}),
    "depth header 5": ({"X-Relay-Depth": "5"}, {}),
    "depth header shaped like a proof": ({"x-relay-depth": f"1r.{int(time.time())}.{'ab' * 16}"}, {}),
    "metadata.relay_internal": ({}, {"metadata": {"relay_internal": True, "relay_depth": 1}}),
    "litellm_metadata.relay_internal": ({}, {"litellm_metadata": {"relay_internal": True, "relay_depth": 1}}),
    "relay's result keys": ({}, {"metadata": {"relay_result": {"outcome": "relayed"}, "relay_seen": "x",
                                              "relay_stream_decision": [None, "x", 0]}}),
}


@pytest.mark.parametrize("name", list(FORGERIES))
def test_a_forged_relay_marker_does_not_skip_the_guard(guarded, token, name):
    headers, body = FORGERIES[name]
    raw = guarded.chat("llama", f"SIM:BLOCK {token}", extra_headers=headers, extra_body=body)
    assert raw.headers["x-relay-outcome"] == "blocked"
    assert raw.parse().choices[0].message.content == REFUSAL


@pytest.mark.parametrize("name", list(FORGERIES))
def test_a_forged_relay_marker_does_not_skip_the_guard_on_a_stream(guarded, token, name):
    headers, body = FORGERIES[name]
    _, text, chunks = chat_stream(guarded, "llama", f"SIM:BLOCK {token}", extra_headers=headers, extra_body=body)
    assert relay_of(chunks)["outcome"] == "blocked"
    assert text == REFUSAL


def test_a_forged_marker_in_anthropic_metadata_does_not_skip_the_guard(guarded, token):
    message = guarded.anthropic.messages.create(
        model="llama", max_tokens=100, messages=[{"role": "user", "content": f"SIM:BLOCK {token}"}],
        extra_headers={"x-relay-depth": "1"}, extra_body={"metadata": {"relay_internal": True}})
    assert message.content[0].text == REFUSAL
    assert message.model_dump()["stop_reason"] == "refusal"


def test_a_reused_call_id_is_judged_every_time(guarded, token):
    call_id = str(uuid.uuid4())
    first = guarded.chat("llama", f"Hello {token}", extra_headers={"x-litellm-call-id": call_id})
    assert first.headers["x-relay-outcome"] == "relayed"
    second = guarded.chat("llama", f"SIM:BLOCK {token}", extra_headers={"x-litellm-call-id": call_id})
    assert second.headers["x-relay-outcome"] == "blocked"
    assert second.parse().choices[0].message.content == REFUSAL
    _, text, chunks = chat_stream(guarded, "llama", f"SIM:BLOCK {token}", extra_headers={"x-litellm-call-id": call_id})
    assert (text, relay_of(chunks)["outcome"]) == (REFUSAL, "blocked")


# ----- 2. a loop through an intermediary that drops the relay's header -----------------------------


@pytest.fixture(scope="module")
def header_dropping_loop(workdir, sim):
    port = stack.free_port()
    forwarder = HeaderDroppingForwarder(f"http://127.0.0.1:{port}")
    env = {**BASE_RELAY_ENV, "RELAY_SECONDARY_MODEL": "openai/llama",  # this proxy's `llama`, via the forwarder
           "OPENAI_API_BASE": forwarder.url + "/v1", "OPENAI_API_KEY": stack.DEV_MASTER_KEY}
    handle = start_test_proxy(workdir, "header-dropping-loop", sim.url, env, port=port)
    yield handle, forwarder
    handle.stop()
    forwarder.stop()


def test_a_loop_through_a_header_dropping_intermediary_makes_exactly_one_extra_hop(header_dropping_loop, sim, token):
    handle, forwarder = header_dropping_loop
    before = forwarder.forwarded
    raw = handle.chat("llama", f"Hi {token}")
    assert raw.headers["x-relay-outcome"] == "modified"
    assert forwarder.forwarded - before == 1
    primaries = [r for r in sim.requests(token) if r["path"] == "/api/chat"]
    assert len(primaries) == 2  # the client's request and the relay's one hop, nothing more
    assert "x-relay-depth" not in {k.lower() for k in primaries[1]["headers"]}


# ----- 3. native Anthropic streams, however the network cuts them ----------------------------------


def anthropic_stream(texts: list[str], *, thinking: str = "", tool: dict | None = None) -> bytes:
    events = [{"type": "message_start", "message": {
        "id": "msg_canned", "type": "message", "role": "assistant", "model": "claude-canned", "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 5, "output_tokens": 1}}}]
    index = 0
    if thinking:
        events += [{"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": ""}},
                   {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": thinking}},
                   {"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "c2ln"}},
                   {"type": "content_block_stop", "index": 0}]
        index = 1
    events += [{"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}},
               {"type": "ping"}]
    events += [{"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": t}} for t in texts]
    events.append({"type": "content_block_stop", "index": index})
    if tool:
        events += [{"type": "content_block_start", "index": index + 1, "content_block": {
                        "type": "tool_use", "id": "toolu_1", "name": tool["name"], "input": {}}},
                   {"type": "content_block_delta", "index": index + 1, "delta": {
                       "type": "input_json_delta", "partial_json": json.dumps(tool["input"])}},
                   {"type": "content_block_stop", "index": index + 1}]
    events += [{"type": "message_delta", "delta": {"stop_reason": "tool_use" if tool else "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": 9}},
               {"type": "message_stop"}]
    return b"".join(sse(e) for e in events)


def messages_stream(handle, model: str, content: str) -> tuple[str, list[dict]]:
    """``(text, events)`` of a streamed /v1/messages call, read as raw SSE (what any client receives)."""
    body = {"model": model, "max_tokens": 100, "stream": True, "messages": [{"role": "user", "content": content}]}
    with httpx.stream("POST", handle.url + "/v1/messages", json=body, timeout=60,
                      headers={"x-api-key": handle.key, "anthropic-version": "2023-06-01"}) as response:
        raw = response.read().decode()
        assert response.status_code == 200, raw
    events = [json.loads(line[5:]) for line in raw.splitlines() if line.startswith("data:")]
    text = "".join(e["delta"].get("text", "") for e in events if e["type"] == "content_block_delta")
    return text, events


def stream_relay(events: list[dict]) -> dict:
    found = [e["relay"] for e in events if "relay" in e]
    assert len(found) == 1, f"expected one relay object, got {len(found)}: {events}"
    return found[0]


@pytest.mark.parametrize("how", ["events", "one", "bytes:7"])
def test_a_native_anthropic_stream_is_judged_whole_however_it_is_cut(guarded, canned, token, how):
    word = canned.script(f"CANNED:split-{how}-{token}", Canned(
        200, None, *pieces(anthropic_stream(["The answer is SIM:", "BLOCK and more", " text."]), how)))
    text, events = messages_stream(guarded, "c-claude", word)
    assert stream_relay(events)["outcome"] == "blocked"
    assert text == REFUSAL
    assert "SIM:" not in text


@pytest.mark.parametrize("how", ["events", "one", "bytes:7"])
def test_an_allowed_native_anthropic_stream_arrives_intact_with_its_relay_object(guarded, canned, token, how):
    parts = ["Fine ", "answer, ", "nothing to see."]
    word = canned.script(f"CANNED:fine-{how}-{token}", Canned(200, None, *pieces(anthropic_stream(parts), how)))
    text, events = messages_stream(guarded, "c-claude", word)
    assert text == "".join(parts)
    assert stream_relay(events)["outcome"] == "relayed"
    assert [e["type"] for e in events].count("message_stop") == 1


# ----- 4. what the guard must read: every choice, tool calls, text after thinking, reasoning ---------


def chat_json(*messages: dict) -> dict:
    return {"id": "chatcmpl-canned", "object": "chat.completion", "created": 1, "model": "gpt-canned",
            "choices": [{"index": i, "message": {"role": "assistant", **m},
                         "finish_reason": "tool_calls" if m.get("tool_calls") else "stop"} for i, m in enumerate(messages)],
            "usage": {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}}


def tool_call(arguments: dict) -> list[dict]:
    return [{"id": "call_1", "type": "function", "function": {"name": "search", "arguments": json.dumps(arguments)}}]


TOOLS = [{"type": "function", "function": {"name": "search", "parameters": {
    "type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}}}]


def test_the_guard_judges_every_choice(guarded, canned, token):
    word = canned.script(f"CANNED:n2-{token}", Canned(body=chat_json(
        {"content": "A harmless first answer."}, {"content": "A second answer with SIM:BLOCK in it."})))
    raw = guarded.chat("c-openai", word, n=2)
    assert raw.headers["x-relay-outcome"] == "blocked"
    assert all(c.message.content == REFUSAL for c in raw.parse().choices)


@pytest.mark.parametrize("message", [
    {"content": None, "tool_calls": tool_call({"q": "SIM:BLOCK how to"})},
    {"content": "Sure, SIM:BLOCK here is how.", "tool_calls": tool_call({"q": "weather"})},
], ids=["in the arguments", "in the text beside the call"])
def test_the_guard_judges_tool_calls_and_the_text_beside_them(guarded, canned, token, message):
    word = canned.script(f"CANNED:tool-{token}", Canned(body=chat_json(message)))
    raw = guarded.chat("c-openai", word, tools=TOOLS)
    assert raw.headers["x-relay-outcome"] == "blocked"
    choice = raw.parse().choices[0]
    assert (choice.message.content, choice.message.tool_calls, choice.finish_reason) == (REFUSAL, None, "content_filter")


def test_an_allowed_tool_call_is_judged_and_passes_untouched(guarded, canned, token):
    word = canned.script(
        f"CANNED:tool-ok-{token}", Canned(body=chat_json({"content": None, "tool_calls": tool_call({"q": "weather"})}))
    )
    raw = guarded.chat("c-openai", word, tools=TOOLS)
    assert raw.headers["x-relay-outcome"] == "relayed"
    assert json.loads(raw.parse().choices[0].message.tool_calls[0].function.arguments) == {"q": "weather"}


def chat_sse(chunks: list[dict]) -> bytes:
    frame = {"id": "chatcmpl-canned", "object": "chat.completion.chunk", "created": 1, "model": "gpt-canned"}
    return b"".join(data_sse({**frame, "choices": c}) for c in chunks) + b"data: [DONE]\n\n"


def test_a_streamed_answer_of_two_choices_is_judged_whole(guarded, canned, token):
    stream = chat_sse([
        [{"index": 0, "delta": {"role": "assistant", "content": "Harmless."}, "finish_reason": None}],
        [{"index": 1, "delta": {"role": "assistant", "content": "SIM:BLOCK second."}, "finish_reason": None}],
        [{"index": 0, "delta": {}, "finish_reason": "stop"}], [{"index": 1, "delta": {}, "finish_reason": "stop"}]])
    word = canned.script(f"CANNED:n2-stream-{token}", Canned(200, None, *pieces(stream, "events")))
    _, text, chunks = chat_stream(guarded, "c-openai", word, n=2)
    assert relay_of(chunks)["outcome"] == "blocked"
    assert "SIM:BLOCK" not in all_stream_text(chunks)
    assert text == REFUSAL


def tool_stream(text: str, arguments: str) -> bytes:
    return chat_sse([
        [{"index": 0, "delta": {"role": "assistant", "content": text}, "finish_reason": None}],
        [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                                "function": {"name": "search", "arguments": ""}}]}, "finish_reason": None}],
        [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": arguments}}]}, "finish_reason": None}],
        [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]])


@pytest.mark.parametrize("model", ["c-openai", "c-openai-window"])
@pytest.mark.parametrize(("text", "arguments"), [
    ("Harmless text that is long enough to fill one window of the guard.", '{"q": "SIM:BLOCK"}'),
    ("SIM:BLOCK text beside a call.", '{"q": "weather"}')], ids=["in the arguments", "in the text"])
def test_a_streamed_tool_call_is_judged_with_its_text(guarded, canned, token, model, text, arguments):
    word = canned.script(
        f"CANNED:tool-stream-{model}-{token}", Canned(200, None, *pieces(tool_stream(text, arguments), "events"))
    )
    _, received, chunks = chat_stream(guarded, model, word, tools=TOOLS)
    assert relay_of(chunks)["outcome"] == "blocked"
    assert "SIM:BLOCK" not in all_stream_text(chunks)
    assert not any(c.choices and c.choices[0].delta.tool_calls for c in chunks)


def anthropic_json(content: list[dict]) -> dict:
    return {"id": "msg_canned", "type": "message", "role": "assistant", "model": "claude-canned", "content": content,
            "stop_reason": "end_turn", "stop_sequence": None, "usage": {"input_tokens": 5, "output_tokens": 5}}


def test_text_after_an_anthropic_thinking_block_is_judged(guarded, canned, token):
    word = canned.script(f"CANNED:thinking-{token}", Canned(body=anthropic_json([
        {"type": "thinking", "thinking": "Let me think.", "signature": "c2ln"},
        {"type": "text", "text": "SIM:BLOCK the answer."}])))
    message = guarded.anthropic.messages.create(model="c-claude", max_tokens=100,
                                                messages=[{"role": "user", "content": word}])
    assert [b.type for b in message.content] == ["text"]
    assert message.content[0].text == REFUSAL


def test_a_streamed_answer_after_thinking_and_with_a_tool_call_is_judged(guarded, canned, token):
    thinking = canned.script(f"CANNED:thinking-stream-{token}", Canned(200, None, *pieces(
        anthropic_stream(["SIM:BLOCK the answer."], thinking="Let me think."), "events")))
    text, events = messages_stream(guarded, "c-claude", thinking)
    assert (text, stream_relay(events)["outcome"]) == (REFUSAL, "blocked")
    tool = canned.script(f"CANNED:tool-stream-claude-{token}", Canned(200, None, *pieces(
        anthropic_stream(["Let me look that up."], tool={"name": "search", "input": {"q": "SIM:BLOCK"}}), "one")))
    text, events = messages_stream(guarded, "c-claude", tool)
    assert stream_relay(events)["outcome"] == "blocked"
    assert not any((e.get("content_block") or {}).get("type") == "tool_use" for e in events)


def responses_json(output: list[dict]) -> dict:
    return {"id": "resp_canned", "object": "response", "created_at": 1, "status": "completed", "model": "gpt-canned",
            "output": output, "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
            "usage": {"input_tokens": 5, "output_tokens": 5, "total_tokens": 10}}


def test_a_responses_reasoning_item_is_not_taken_for_a_tool_call(guarded, canned, token):
    message = {"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
               "content": [{"type": "output_text", "text": "SIM:BLOCK the answer.", "annotations": []}]}
    word = canned.script(f"CANNED:reasoning-{token}", Canned(body=responses_json([
        {"type": "reasoning", "id": "rs_1", "summary": []}, message])))
    raw = guarded.openai.responses.with_raw_response.create(model="c-openai", input=word)
    assert raw.headers["x-relay-outcome"] == "blocked"
    assert raw.parse().output_text == REFUSAL


# ----- 5. long answers are judged whole, window by window --------------------------------------------


def test_a_long_answer_is_judged_in_windows_and_its_middle_counts(guarded, canned, sim, token):
    filler = "lorem ipsum dolor sit amet " * 60  # 1,620 characters; RELAY_MAX_INPUT_CHARS=2000 leaves 1,000
    answer = filler + "SIM:BLOCK in the middle. " + filler
    word = canned.script(f"CANNED:long-{token}", Canned(body=chat_json({"content": answer})))
    raw = guarded.chat("c-openai", word)
    assert raw.headers["x-relay-outcome"] == "blocked"
    judged = [r for r in sim.requests(word) if r["model"] == "gpt-4o-mini"]
    assert len(judged) >= 2  # more than one window was judged
    assert all("characters cut" not in json.dumps(r["body"]) for r in judged)


def test_a_long_allowed_answer_is_judged_to_its_last_character(guarded, canned, sim, token):
    answer = ("lorem ipsum dolor sit amet " * 120) + f"THE-END-{token}"
    word = canned.script(f"CANNED:long-ok-{token}", Canned(body=chat_json({"content": answer})))
    raw = guarded.chat("c-openai", word)
    assert raw.headers["x-relay-outcome"] == "relayed"
    assert raw.parse().choices[0].message.content == answer
    judged = "".join(json.dumps(r["body"]) for r in sim.requests(word) if r["model"] == "gpt-4o-mini")
    assert f"THE-END-{token}" in judged and "characters cut" not in judged


# ----- 6. a typo in a model's relay block refuses the model ----------------------------------------


def test_a_model_with_an_invalid_relay_block_is_refused_not_served_unguarded(guarded, sim, token):
    with pytest.raises(openai.APIStatusError) as refused:
        guarded.chat("llama-bad", f"SIM:BLOCK {token}")
    assert refused.value.status_code == 503
    assert "not served" in refused.value.message
    with pytest.raises(openai.APIStatusError) as refused_stream:
        chat_stream(guarded, "llama-bad", f"SIM:BLOCK {token}")
    assert refused_stream.value.status_code == 503
    assert sim.requests(token) == []  # the primary never ran
    assert "model_info.relay.mode='telepathy' is invalid" in guarded.log()


# ----- 7. look-alike Unicode keys ------------------------------------------------------------------


@pytest.mark.parametrize("key", ["\u017fecondary_model", "mode\u0130", "\u212aey", "enab\u212aed"])
def test_a_look_alike_unicode_key_is_a_clear_400_on_every_endpoint(proxy, sim, token, key):
    with pytest.raises(openai.BadRequestError) as chat:
        proxy.chat("llama", f"Hi {token}", metadata={"relay": {key: "premium"}})
    import anthropic

    with pytest.raises(anthropic.BadRequestError) as messages:
        proxy.anthropic.messages.create(model="llama", max_tokens=100, messages=[{"role": "user", "content": f"Hi {token}"}],
                                        extra_body={"metadata": {"relay": {key: "premium"}}})
    for error in (chat.value, messages.value):
        assert "is not a relay setting" in str(error)
    assert sim.requests(token) == []  # refused before the primary ran


def test_every_relay_header_is_encodable_whatever_the_client_sent(proxy, token):
    raw = proxy.chat("llama-guard", f"Hi {token}", metadata={"relay": {"mode": "annotate", "annotate_target": "append"}})
    assert raw.status_code == 200
    for name, value in raw.headers.items():
        if name.startswith("x-relay-"):
            assert value.isascii() and value.isprintable(), (name, value)


# ----- 8, 9. provider keys of every format, and provider error text --------------------------------

KEYS = {
    "groq": "gsk_" + "Ab3dEf6hIj9kLm2nOp5qRs8tUv1wXy4zAb7cDe0fGh3iJk6lMn9o",
    "hugging face": "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYz01234567",
    "xai": "xai-" + "AbCdEfGhIjKlMnOpQrStUvWxYz0123456789AbCdEfGhIjKlMnOpQrStUvWxYz0123456789",
    "azure": "3f2a9c4d8e7b6a5f4e3d2c1b0a9f8e7d",
    "aws": "AKIAIOSFODNN7EXAMPLE",
    "google": "AIzaSyD-9tSrke72PouQMnMX-a7eZSW0jkFMBWY",
    "anthropic": "sk-ant-api03-" + "AbCdEfGhIjKlMnOpQrStUvWxYz0123456789-_AbCdEfGh",
    "opaque bearer": "Zq8Lm2vN4pX7rT1wQe5Ys",
}
INTERNALS = ("inference.corp.internal", "prod-eu-7", "svc-alice")


def slug(name: str) -> str:
    return name.replace(" ", "-")


@pytest.fixture(scope="module")
def leaky(workdir, sim, canned):
    """Secondaries whose provider echoes the caller's key and internal details in its error body."""
    canned.script("gpt-leaky", Canned(401, echo_auth=True))
    models = []
    for name, key in KEYS.items():
        judge = f"j-{slug(name)}"
        models += [model_entry(judge, "openai/gpt-leaky", canned.url + "/v1", api_key=key, cooldown_time=0),
                   model_entry(f"open-{slug(name)}", "ollama_chat/llama3", sim.url, {"mode": "refine", "secondary_model": judge}),
                   model_entry(f"closed-{slug(name)}", "ollama_chat/llama3", sim.url,
                               {"mode": "refine", "secondary_model": judge, "fail_mode": "closed"})]
    # the judges never cool down (cooldown_time: 0): relay calls feed the router's health, a 401 would cool
    # the deployment down and the later calls of a test would never reach the leaky provider, proving nothing
    env = {**BASE_RELAY_ENV, "RELAY_APPLY_TO": "open-*,closed-*", "RELAY_RETRIES": "0", "RELAY_SPEND_ATTRIBUTION": "none"}
    handle = start_test_proxy(workdir, "leaky", sim.url, env, models + relay_test_models(sim.url))
    yield handle
    handle.stop()


@pytest.mark.parametrize("name", list(KEYS))
def test_no_provider_key_of_any_format_and_no_provider_detail_reaches_a_client_or_the_relay_log(leaky, canned, token, name):
    key, model = KEYS[name], slug(name)
    raw = leaky.chat(f"open-{model}", f"Hi {token}")
    assert raw.headers["x-relay-outcome"] == "failed:provider_rejected"
    assert raw.headers["x-relay-reason"] == "the secondary model's provider rejected the call"
    with pytest.raises(openai.APIStatusError) as closed:
        leaky.chat(f"closed-{model}", f"Hi {token}")
    assert closed.value.status_code == 503
    _, _, chunks = chat_stream(leaky, f"open-{model}", f"Hi {token}")
    relay = relay_of(chunks)
    assert relay["outcome"] == "failed:provider_rejected"
    # the provider really received the key and echoed it, so its absence below means something
    assert any(key in json.dumps(r["headers"]) for r in canned.requests)
    seen = [json.dumps(dict(raw.headers)), raw.text, json.dumps(closed.value.body), closed.value.message,
            json.dumps(dict(closed.value.response.headers)), json.dumps(relay)]
    for text in seen:
        assert key not in text
        for internal in INTERNALS:
            assert internal not in text
    time.sleep(0.2)
    relay_lines = [line for line in leaky.log().splitlines() if relay_plugin.log.name in line]
    assert any("prod-eu-7" in line for line in relay_lines)  # the detail went to the operator's log ...
    assert not any(key in line for line in relay_lines)  # ... without the key
