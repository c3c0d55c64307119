"""Streaming clients: every mode's contract, through the real proxy with the official SDKs."""

import json
import time

import httpx
import pytest

from tests.proxy_support import WINDOW_ANSWER

pytestmark = pytest.mark.proxy

#: the primary answers "SIM:ANSWER=Refined and final." and any secondary reading that answers "Refined and final."
REFINABLE = "SIM:ANSWER=SIM:ANSWER=Refined and final."


def stream_chat(proxy, model: str, content: str, **kwargs):
    """``(headers, text, chunks)`` of a streamed chat completion."""
    with proxy.openai.chat.completions.with_streaming_response.create(
            model=model, messages=[{"role": "user", "content": content}], stream=True, **kwargs) as raw:
        headers = dict(raw.headers)
        chunks = list(raw.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return headers, text, chunks


def relay_of(chunks) -> dict:
    """The relay object of a stream: it rides on the last chunk."""
    found = [c.model_extra["relay"] for c in chunks if c.model_extra and "relay" in c.model_extra]
    assert len(found) == 1, f"expected one relay object, got {len(found)}"
    return found[0]


def finish_reason(chunks) -> str | None:
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    return reasons[-1] if reasons else None


# ----- buffered modes: refine, escalate, consensus, guard=buffer -----------------------------------


@pytest.mark.compat("streaming")
def test_a_refined_stream_reassembles_into_the_non_streaming_answer(proxy, token):
    prompt = f"{REFINABLE} {token}"
    plain = proxy.chat("llama", prompt).parse().choices[0].message.content
    headers, text, chunks = stream_chat(proxy, "llama", prompt)
    if proxy.relay_headers:  # a LiteLLM without the response-headers hook sends none (the plugin said so)
        assert headers["x-relay-mode"] == "refine"
        assert headers["x-relay-outcome"] == "pending"  # the outcome travels in the stream
    else:
        assert not [name for name in headers if name.lower().startswith("x-relay-")]
    assert text == plain == f"Refined and final. {token}"
    relay = relay_of(chunks)
    assert relay["outcome"] == "modified"
    assert relay["secondary_model"] == ["sec"]
    assert relay["cost_usd"] > 0
    assert finish_reason(chunks) == "stop"


@pytest.mark.compat("streaming")
def test_a_refined_stream_streams_the_secondary_itself(proxy, sim, token):
    stream_chat(proxy, "llama", f"{REFINABLE} {token}")
    (secondary,) = [r for r in sim.requests(token) if r["model"] == "gpt-4o-mini"]
    assert secondary["body"]["stream"] is True  # its first token goes straight on to the client


@pytest.mark.compat("streaming")
def test_an_escalated_stream_carries_the_premium_answer(proxy, token):
    prompt = f"Explain gravity SIM:LOWSCORE {token}"
    _, text, chunks = stream_chat(proxy, "llama-escalate", prompt)
    assert text == f"gpt-4o says: {prompt}"
    assert relay_of(chunks)["outcome"] == "escalated"


@pytest.mark.compat("streaming")
def test_a_consensus_stream_carries_the_merged_answer(proxy, token):
    _, text, chunks = stream_chat(proxy, "llama-consensus", f"Best pizza topping? {token}")
    assert text.startswith("gpt-4o-mini says:")
    assert relay_of(chunks)["outcome"] == "modified"
    assert relay_of(chunks)["secondary_model"] == ["sec", "sec-claude"]


@pytest.mark.compat("streaming")
def test_a_buffered_guard_releases_an_allowed_answer_unchanged(proxy, token):
    _, text, chunks = stream_chat(proxy, "llama-guard", f"Tell me about tea {token}")
    assert text == f"llama3 says: Tell me about tea {token}"
    assert relay_of(chunks)["outcome"] == "relayed"
    assert finish_reason(chunks) == "stop"


@pytest.mark.compat("streaming")
def test_a_buffered_guard_sends_only_the_refusal_when_it_blocks(proxy, token):
    _, text, chunks = stream_chat(proxy, "llama-guard", f"SIM:BLOCK harmful {token}")
    assert text == "I can't help with that request."
    assert finish_reason(chunks) == "content_filter"
    assert relay_of(chunks)["outcome"] == "blocked"


@pytest.mark.compat("streaming")
def test_a_guard_with_error_action_refuses_in_stream_since_the_status_is_already_sent(proxy, token):
    _, text, chunks = stream_chat(proxy, "llama-guard-error", f"SIM:BLOCK harmful {token}")
    assert text == "I can't help with that request."
    assert finish_reason(chunks) == "content_filter"


# ----- guard=window ---------------------------------------------------------------------------------


@pytest.mark.compat("streaming")
def test_a_window_guard_releases_judged_windows_and_never_the_blocked_one(proxy, sim, token):
    _, text, chunks = stream_chat(proxy, "mock-window", f"Hello {token}")
    first_two = WINDOW_ANSWER[:80]
    assert text.startswith(first_two)
    assert "SIM:BLOCK" not in text and "never be seen" not in text
    assert text.endswith("I can't help with that request.")
    assert finish_reason(chunks) == "content_filter"
    assert relay_of(chunks)["outcome"] == "blocked"
    judged = [r for r in sim.requests(token) if r["model"] == "gpt-4o-mini"]
    assert len(judged) == 3  # windows 1 and 2 allowed, window 3 blocked, window 4 never judged


@pytest.mark.compat("streaming")
def test_a_window_guard_passes_a_clean_stream_whole(proxy, sim, token):
    prompt = f"Tell me a rather long story about tea and biscuits {token}"
    _, text, chunks = stream_chat(proxy, "llama-guard-window", prompt)
    assert text == f"llama3 says: {prompt}"
    assert relay_of(chunks)["outcome"] == "relayed"
    assert len([r for r in sim.requests(token) if r["model"] == "gpt-4o-mini"]) >= 2


# ----- pass-through modes: annotate, shadow -------------------------------------------------------


@pytest.mark.compat("streaming")
def test_an_annotated_stream_passes_text_through_and_ends_with_the_analysis(proxy, token):
    _, text, chunks = stream_chat(proxy, "llama-annotate", f"What is 2+2? {token}")
    assert text == f"llama3 says: What is 2+2? {token}"
    relay = relay_of(chunks)
    assert relay["analysis"].startswith("gpt-4o-mini says:")
    assert relay["outcome"] == "relayed"


@pytest.mark.compat("streaming")
def test_an_annotated_stream_with_append_adds_the_review_before_the_end(proxy, token):
    prompt = f"What is 2+2? {token}"
    plain = proxy.chat("llama-append", prompt).parse().choices[0].message.content
    _, text, chunks = stream_chat(proxy, "llama-append", prompt)
    assert text.startswith(f"llama3 says: {prompt}\n\n---\nReview by sec:\ngpt-4o-mini says:")
    assert text.split("gpt-4o-mini says:")[0] == plain.split("gpt-4o-mini says:")[0]
    assert finish_reason(chunks) == "stop"


@pytest.mark.compat("streaming")
def test_a_shadowed_stream_is_untouched_and_analysed_afterwards(proxy, sim, token):
    _, text, chunks = stream_chat(proxy, "llama-shadow", f"Hello {token}")
    assert text == f"llama3 says: Hello {token}"
    assert relay_of(chunks)["outcome"] == "relayed"
    for _ in range(50):
        if [r for r in sim.requests(token) if r["model"] == "gpt-4o-mini"]:
            break
        time.sleep(0.1)
    assert len([r for r in sim.requests(token) if r["model"] == "gpt-4o-mini"]) == 1


# ----- other endpoints ------------------------------------------------------------------------------


@pytest.mark.compat("streaming")
def test_a_refined_anthropic_stream_reassembles_into_the_non_streaming_answer(proxy, token):
    prompt = f"{REFINABLE} {token}"
    plain = proxy.anthropic.messages.create(model="llama", max_tokens=100, messages=[{"role": "user", "content": prompt}])
    with proxy.anthropic.messages.stream(model="llama", max_tokens=100, messages=[{"role": "user", "content": prompt}]) as stream:
        events = list(stream)
        final = stream.get_final_message()
    assert final.content[0].text == plain.content[0].text == f"Refined and final. {token}"
    deltas = [e for e in events if e.type == "message_delta"]
    assert deltas[-1].model_extra["relay"]["outcome"] == "modified"


@pytest.mark.compat("streaming")
def test_a_blocked_anthropic_stream_stops_with_the_refusal_stop_reason(proxy, token):
    with proxy.anthropic.messages.stream(model="llama-guard", max_tokens=100,
                                         messages=[{"role": "user", "content": f"SIM:BLOCK {token}"}]) as stream:
        final = stream.get_final_message()
    assert final.content[0].text == "I can't help with that request."
    assert final.stop_reason == "refusal"


def test_a_refined_responses_stream_carries_the_final_text(proxy, token):
    prompt = f"{REFINABLE} {token}"
    events = list(proxy.openai.responses.create(model="llama", input=prompt, stream=True))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    completed = [e for e in events if e.type == "response.completed"][-1]
    assert deltas == completed.response.output_text == f"Refined and final. {token}"
    assert completed.response.model_extra["relay"]["outcome"] == "modified"


def test_a_refined_text_completion_stream_carries_the_final_text(proxy, token):
    chunks = list(proxy.openai.completions.create(model="llama", prompt=f"{REFINABLE} {token}", stream=True))
    assert "".join(c.choices[0].text or "" for c in chunks if c.choices) == f"Refined and final. {token}"


# ----- failures and disconnects --------------------------------------------------------------------


@pytest.mark.compat("streaming")
def test_a_failing_secondary_leaves_the_full_primary_stream(proxy, sim, token):
    sim.configure(force_markers={"gpt-4o-mini": "SIM:HTTP500"})
    try:
        _, text, chunks = stream_chat(proxy, "llama", f"Hi {token}")
    finally:
        sim.configure(force_markers={})
    assert text == f"llama3 says: Hi {token}"
    assert relay_of(chunks)["outcome"] == "failed:provider_error"


@pytest.mark.compat("streaming")
def test_a_client_that_disconnects_cancels_the_secondary_call(proxy, sim, token):
    sim.configure(force_markers={"gpt-4o-mini": "SIM:SLEEP=3000"})
    try:
        body = {"model": "llama", "stream": True, "messages": [{"role": "user", "content": f"Hi {token}"}]}
        with httpx.stream("POST", proxy.url + "/v1/chat/completions", json=body, timeout=10,
                          headers={"Authorization": f"Bearer {proxy.key}"}) as response:
            assert response.headers.get("x-relay-outcome") == ("pending" if proxy.relay_headers else None)
            deadline = time.monotonic() + 5
            while not [r for r in sim.requests(token) if r["model"] == "gpt-4o-mini"] and time.monotonic() < deadline:
                time.sleep(0.05)
        # the client is gone while the secondary is still thinking
        deadline = time.monotonic() + 5
        secondary = []
        while time.monotonic() < deadline:
            secondary = [r for r in sim.requests(token) if r["model"] == "gpt-4o-mini"]
            if secondary and secondary[0]["cancelled"]:
                break
            time.sleep(0.05)
    finally:
        sim.configure(force_markers={})
    if any("client that disconnects" in line for line in proxy.degraded):
        # this LiteLLM's proxy never tells the stream the client left (the plugin said so at startup)
        assert len(secondary) == 1
        return
    assert len(secondary) == 1 and secondary[0]["cancelled"] is True
    time.sleep(0.2)
    assert "outcome=failed:client_disconnected" in proxy.log()


@pytest.mark.compat("streaming")
def test_a_stream_with_tool_calls_passes_through(proxy, token):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    _, _, chunks = stream_chat(proxy, "openai-primary", f"SIM:TOOLCALL {token}", tools=tools)
    calls = [c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert calls and calls[0][0].function.name == "get_weather"
    assert relay_of(chunks)["outcome"] == "skipped:tool_calls"
    assert json.dumps(relay_of(chunks))


# ----- every format's event order, as its SDK reads it ---------------------------------------------


@pytest.mark.compat("streaming")
def test_an_appended_review_on_an_anthropic_stream_stays_inside_its_text_block(proxy, token):
    prompt = f"What is 2+2? {token}"
    with proxy.anthropic.messages.stream(model="llama-append", max_tokens=100,
                                         messages=[{"role": "user", "content": prompt}]) as stream:
        events = list(stream)
        final = stream.get_final_message()
    stops = [i for i, e in enumerate(events) if e.type == "content_block_stop"]
    text_deltas = [i for i, e in enumerate(events) if e.type == "content_block_delta" and e.delta.type == "text_delta"]
    assert text_deltas and stops and max(text_deltas) < min(stops)  # no delta for a block already stopped
    assert final.content[0].text.startswith(f"llama3 says: {prompt}\n\n---\nReview by sec:\ngpt-4o-mini says:")
    assert [e.model_extra["relay"]["outcome"] for e in events if e.type == "message_delta"] == ["modified"]


def test_a_window_guard_block_on_a_responses_stream_completes_the_response_with_the_refusal(proxy, token):
    prompt = f"Tell me a rather long story about tea and biscuits SIM:BLOCK {token}"
    with proxy.openai.responses.stream(model="llama-guard-window", input=prompt) as stream:
        events = list(stream)
        final = stream.get_final_response()  # raises without a response.completed event
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text.endswith("I can't help with that request.") and "SIM:BLOCK" not in text
    assert [e.type for e in events][-4:] == ["response.output_text.done", "response.content_part.done",
                                            "response.output_item.done", "response.completed"]
    assert final.output_text == text
    assert final.status == "incomplete"
    assert final.model_extra["relay"]["outcome"] == "blocked"
