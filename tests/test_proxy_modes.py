"""Every mode on every endpoint, through the real LiteLLM proxy, with the official SDKs."""

import json
import time

import anthropic
import openai
import pytest

pytestmark = pytest.mark.proxy


def relay_headers(raw) -> dict[str, str]:
    return {k.lower(): v for k, v in raw.headers.items() if k.lower().startswith("x-relay-")}


def secondary_requests(sim, token: str, model: str = "gpt-4o-mini") -> list[dict]:
    return [r for r in sim.requests(token) if r["model"] == model]


# ----- refine ---------------------------------------------------------------------------------


@pytest.mark.compat("headers")
def test_refine_replaces_the_chat_answer_with_the_secondary_answer(proxy, sim, token):
    raw = proxy.chat("llama", f"Why is the sky blue? {token}")
    answer = raw.parse().choices[0].message.content
    headers = relay_headers(raw)

    assert answer.startswith("gpt-4o-mini says: The conversation:")
    assert headers["x-relay-mode"] == "refine"
    assert headers["x-relay-outcome"] == "modified"
    assert headers["x-relay-secondary-model"] == "sec"
    assert float(headers["x-relay-latency-ms"]) > 0
    assert float(headers["x-relay-cost-usd"]) > 0
    (secondary,) = secondary_requests(sim, token)
    prompt = secondary["body"]["messages"][1]["content"]
    assert f"llama3 says: Why is the sky blue? {token}" in prompt  # the primary answer, inside delimiters
    assert secondary["body"]["max_tokens"] == 1024
    # the recursion guard's proof: depth 1, in the header and in the system prompt
    assert secondary["headers"].get("x-relay-depth", "").startswith("1r.")
    assert f"[relay-call {secondary['headers']['x-relay-depth']}]" in secondary["body"]["messages"][0]["content"]


def test_refine_works_on_text_completions(proxy, token):
    raw = proxy.openai.completions.with_raw_response.create(model="llama", prompt=f"Say hi {token}")
    assert raw.parse().choices[0].text.startswith("gpt-4o-mini says:")
    assert relay_headers(raw)["x-relay-outcome"] == "modified"


@pytest.mark.compat("modes")
def test_refine_works_on_anthropic_messages(proxy, token):
    raw = proxy.anthropic.messages.with_raw_response.create(
        model="llama", max_tokens=200, messages=[{"role": "user", "content": f"Say hi {token}"}])
    message = raw.parse()
    assert message.content[0].text.startswith("gpt-4o-mini says:")
    assert relay_headers(raw)["x-relay-outcome"] == "modified"


def test_refine_works_on_the_responses_api(proxy, token):
    raw = proxy.openai.responses.with_raw_response.create(model="llama", input=f"Say hi {token}")
    assert raw.parse().output_text.startswith("gpt-4o-mini says:")
    assert relay_headers(raw)["x-relay-outcome"] == "modified"


def test_a_primary_on_ollama_generate_is_refined_too(proxy, token):
    raw = proxy.chat("llama-generate", f"Say hi {token}")
    assert raw.parse().choices[0].message.content.startswith("gpt-4o-mini says:")
    assert relay_headers(raw)["x-relay-outcome"] == "modified"


# ----- guard ----------------------------------------------------------------------------------


def test_guard_lets_an_allowed_answer_through_unchanged(proxy, token):
    raw = proxy.chat("llama-guard", f"Tell me about tea {token}")
    choice = raw.parse().choices[0]
    assert choice.message.content == f"llama3 says: Tell me about tea {token}"
    assert choice.finish_reason == "stop"
    assert relay_headers(raw)["x-relay-outcome"] == "relayed"


def test_guard_replaces_a_blocked_answer_with_the_refusal_and_content_filter(proxy, token):
    raw = proxy.chat("llama-guard", f"SIM:BLOCK something harmful {token}")
    choice = raw.parse().choices[0]
    headers = relay_headers(raw)
    assert choice.message.content == "I can't help with that request."
    assert choice.finish_reason == "content_filter"
    assert headers["x-relay-outcome"] == "blocked"
    assert headers["x-relay-reason"] == "simulated policy violation"


@pytest.mark.compat("modes")
def test_guard_block_on_anthropic_messages_uses_the_refusal_stop_reason(proxy, token):
    message = proxy.anthropic.messages.create(
        model="llama-guard", max_tokens=100, messages=[{"role": "user", "content": f"SIM:BLOCK x {token}"}])
    assert message.content[0].text == "I can't help with that request."
    assert message.stop_reason == "refusal"


@pytest.mark.compat("modes")
def test_guard_with_error_action_answers_400_with_the_reason(proxy, token):
    with pytest.raises(openai.BadRequestError) as caught:
        proxy.chat("llama-guard-error", f"SIM:BLOCK something harmful {token}")
    assert "simulated policy violation" in caught.value.message
    assert caught.value.response.headers["x-relay-outcome"] == "blocked"


@pytest.mark.compat("fail policy")
def test_a_garbage_verdict_is_a_failure_never_an_allow(proxy, token):
    raw = proxy.chat("llama-guard", f"SIM:BLOCK SIM:GARBAGE {token}")
    headers = relay_headers(raw)
    assert headers["x-relay-outcome"] == "failed:bad_verdict"
    # fail-open (the default): the client keeps the primary answer, the header says it was not judged
    assert raw.parse().choices[0].message.content.startswith("llama3 says: SIM:BLOCK")


@pytest.mark.compat("fail policy")
def test_a_garbage_verdict_with_fail_closed_blocks(proxy, token):
    raw = proxy.chat("llama-guard-closed", f"SIM:GARBAGE {token}")
    assert raw.parse().choices[0].message.content == "I can't help with that request."
    assert relay_headers(raw)["x-relay-outcome"] == "blocked"


# ----- annotate -------------------------------------------------------------------------------


@pytest.mark.compat("modes")
def test_annotate_keeps_the_answer_and_attaches_a_relay_object(proxy, token):
    raw = proxy.chat("llama-annotate", f"What is 2+2? {token}")
    completion = raw.parse()
    assert completion.choices[0].message.content == f"llama3 says: What is 2+2? {token}"
    relay = completion.model_extra["relay"]
    assert relay["mode"] == "annotate"
    assert relay["secondary_model"] == ["sec"]
    assert relay["analysis"].startswith("gpt-4o-mini says:")
    assert relay_headers(raw)["x-relay-outcome"] == "relayed"


@pytest.mark.parametrize("endpoint", ["messages", "responses", "completions"])
def test_annotate_attaches_the_relay_object_on_every_endpoint(proxy, token, endpoint):
    if endpoint == "messages":
        body = proxy.anthropic.messages.create(
            model="llama-annotate", max_tokens=100, messages=[{"role": "user", "content": token}]).model_dump()
    elif endpoint == "responses":
        body = proxy.openai.responses.create(model="llama-annotate", input=token).model_dump()
    else:
        body = proxy.openai.completions.create(model="llama-annotate", prompt=token).model_dump()
    assert body["relay"]["analysis"].startswith("gpt-4o-mini says:")


def test_annotate_append_adds_the_review_to_the_text(proxy, token):
    raw = proxy.chat("llama-append", f"What is 2+2? {token}")
    text = raw.parse().choices[0].message.content
    assert text.startswith(f"llama3 says: What is 2+2? {token}\n\n---\nReview by sec:\ngpt-4o-mini says:")
    assert relay_headers(raw)["x-relay-outcome"] == "modified"


# ----- escalate -------------------------------------------------------------------------------


def test_escalate_keeps_a_well_scored_answer(proxy, sim, token):
    raw = proxy.chat("llama-escalate", f"Explain gravity {token}")
    assert raw.parse().choices[0].message.content == f"llama3 says: Explain gravity {token}"
    headers = relay_headers(raw)
    assert headers["x-relay-outcome"] == "relayed"
    assert headers["x-relay-reason"].startswith("score 9")
    assert not [r for r in sim.requests(token) if r["model"] == "gpt-4o"]


def test_escalate_replaces_a_low_scored_answer_with_the_premium_answer(proxy, sim, token):
    raw = proxy.chat("llama-escalate", f"Explain gravity SIM:LOWSCORE {token}")
    headers = relay_headers(raw)
    assert raw.parse().choices[0].message.content == f"gpt-4o says: Explain gravity SIM:LOWSCORE {token}"
    assert headers["x-relay-outcome"] == "escalated"
    assert headers["x-relay-secondary-model"] == "sec,premium"
    (premium,) = [r for r in sim.requests(token) if r["model"] == "gpt-4o"]
    proof, *conversation = premium["body"]["messages"]  # the conversation, after the relay's proof of its own call
    assert conversation == [{"role": "user", "content": f"Explain gravity SIM:LOWSCORE {token}"}]
    assert proof == {"role": "system", "content": f"[relay-call {premium['headers']['x-relay-depth']}]"}


# ----- consensus ------------------------------------------------------------------------------


def test_consensus_asks_every_member_concurrently_then_merges(proxy, sim, token):
    raw = proxy.chat("llama-consensus", f"SIM:SLEEP=400 Best pizza topping? {token}")
    headers = relay_headers(raw)
    assert headers["x-relay-outcome"] == "modified"
    assert headers["x-relay-secondary-model"] == "sec,sec-claude"
    received = sim.requests(token)
    members = [r for r in received if r["path"] in ("/v1/messages", "/v1/chat/completions")
               and "Candidate answer" not in json.dumps(r["body"])]
    merge = [r for r in received if "Candidate answer" in json.dumps(r["body"])]
    assert sorted(r["model"] for r in members) == ["claude-haiku-4-5-20251001", "gpt-4o-mini"]
    # both members were asked before either could have answered (each sleeps 400 ms): concurrent
    assert abs(members[0]["received_at"] - members[1]["received_at"]) < 0.3
    (merge,) = merge
    merged_prompt = merge["body"]["messages"][1]["content"]
    assert "(from primary)" in merged_prompt and "(from sec)" in merged_prompt and "(from sec-claude)" in merged_prompt
    assert raw.parse().choices[0].message.content.startswith("gpt-4o-mini says:")


# ----- shadow ---------------------------------------------------------------------------------


def test_shadow_returns_the_primary_answer_and_analyses_it_afterwards(proxy, sim, token):
    raw = proxy.chat("llama-shadow", f"Hello {token}")
    assert raw.parse().choices[0].message.content == f"llama3 says: Hello {token}"
    assert relay_headers(raw)["x-relay-outcome"] == "relayed"
    for _ in range(50):
        if secondary_requests(sim, token):
            break
        time.sleep(0.1)
    assert len(secondary_requests(sim, token)) == 1


# ----- what is passed through untouched -------------------------------------------------------


def test_a_model_outside_apply_to_is_not_relayed(proxy, sim, token):
    raw = proxy.chat("unrelayed", f"Hi {token}")
    assert relay_headers(raw)["x-relay-outcome"] == "skipped:not_applied"
    assert raw.parse().choices[0].message.content == f"llama3 says: Hi {token}"
    assert not secondary_requests(sim, token)


def test_tool_calls_pass_through_untouched(proxy, sim, token):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    raw = proxy.chat("openai-primary", f"SIM:TOOLCALL weather {token}", tools=tools)
    assert raw.parse().choices[0].message.tool_calls[0].function.name == "get_weather"
    assert relay_headers(raw)["x-relay-outcome"] == "skipped:tool_calls"
    assert len(sim.requests(token)) == 1  # only the primary


def test_several_choices_pass_through_untouched(proxy, token):
    raw = proxy.chat("openai-primary", f"Hi {token}", n=2)
    assert len(raw.parse().choices) == 2
    assert relay_headers(raw)["x-relay-outcome"] == "skipped:multiple_choices"


def test_embeddings_pass_through_untouched_and_say_so(proxy, sim, token):
    raw = proxy.openai.embeddings.with_raw_response.create(model="llama-embed", input=f"hello {token}")
    assert raw.parse().data[0].embedding == [0.25, 0.5]
    assert raw.headers["x-relay-outcome"] == "skipped:unsupported_response"
    assert sim.requests(token) == []  # no secondary was asked


@pytest.mark.compat("headers")
def test_a_stream_outside_apply_to_passes_through_and_says_why(proxy, token):
    with proxy.openai.chat.completions.with_streaming_response.create(
            model="unrelayed", messages=[{"role": "user", "content": f"Hi {token}"}], stream=True) as raw:
        # without the response-headers hook (the plugin said so at startup) a skipped stream says nothing
        assert raw.headers.get("x-relay-outcome") == ("skipped:not_applied" if proxy.relay_headers else None)
        text = "".join(chunk.choices[0].delta.content or "" for chunk in raw.parse() if chunk.choices)
    assert text == f"llama3 says: Hi {token}"


# ----- per-model configuration ----------------------------------------------------------------


def test_a_bad_relay_block_in_model_info_refuses_that_model_and_is_logged(proxy, sim, token):
    with pytest.raises(openai.APIStatusError) as refused:
        proxy.chat("llama-bad", f"Hi {token}")
    assert refused.value.status_code == 503
    assert refused.value.response.headers["x-relay-outcome"] == "failed:model_config"
    assert sim.requests(token) == []  # never served without the relay its operator configured
    assert "model_info.relay.mode='telepathy' is invalid" in proxy.log()


# ----- failure policy -------------------------------------------------------------------------


@pytest.mark.compat("fail policy")
def test_a_failing_secondary_leaves_the_primary_answer_in_fail_open(proxy, sim, token):
    sim.configure(model_config={"gpt-4o-mini": {"error_rate": 1.0}})
    try:
        raw = proxy.chat("llama", f"Hi {token}")
    finally:
        sim.configure(model_config={})
    assert raw.parse().choices[0].message.content == f"llama3 says: Hi {token}"
    assert relay_headers(raw)["x-relay-outcome"] == "failed:provider_error"


@pytest.mark.compat("fail policy")
def test_a_failing_secondary_answers_503_in_fail_closed(proxy, sim, token):
    sim.configure(model_config={"gpt-4o-mini": {"error_rate": 1.0}})
    try:
        with pytest.raises(openai.APIStatusError) as caught:
            proxy.chat("llama-closed", f"Hi {token}")
    finally:
        sim.configure(model_config={})
    assert caught.value.status_code == 503
    assert "failed:provider_error" in caught.value.message


@pytest.mark.compat("modes")
def test_anthropic_sdk_errors_are_clear_too(proxy, token):
    with pytest.raises(anthropic.BadRequestError) as caught:
        proxy.anthropic.messages.create(model="llama-guard-error", max_tokens=50,
                                        messages=[{"role": "user", "content": f"SIM:BLOCK {token}"}])
    assert "simulated policy violation" in str(caught.value)


# ----- the whole matrix: every mode on every endpoint ---------------------------------------------

MODE_CASES = {
    # model: (text in the prompt, the outcome the client must see)
    "llama": ("", "modified"),
    "llama-guard": ("SIM:BLOCK", "blocked"),
    "llama-annotate": ("", "relayed"),
    "llama-escalate": ("SIM:LOWSCORE", "escalated"),
    "llama-consensus": ("", "modified"),
    "llama-shadow": ("", "relayed"),
}


def call_endpoint(proxy, endpoint: str, model: str, content: str):
    """One non-streaming call on ``endpoint``: ``(x-relay-outcome, answer text)``."""
    if endpoint == "chat":
        raw = proxy.chat(model, content)
        return raw.headers["x-relay-outcome"], raw.parse().choices[0].message.content
    if endpoint == "completions":
        raw = proxy.openai.completions.with_raw_response.create(model=model, prompt=content)
        return raw.headers["x-relay-outcome"], raw.parse().choices[0].text
    if endpoint == "messages":
        raw = proxy.anthropic.messages.with_raw_response.create(
            model=model, max_tokens=200, messages=[{"role": "user", "content": content}])
        return raw.headers["x-relay-outcome"], raw.parse().content[0].text
    raw = proxy.openai.responses.with_raw_response.create(model=model, input=content)
    return raw.headers["x-relay-outcome"], raw.parse().output_text


#: `make test-compat` runs every mode on the two endpoints most operators serve, on every LiteLLM line
ON_EVERY_LINE = pytest.mark.compat("modes")


@pytest.mark.parametrize("endpoint", [pytest.param("chat", marks=ON_EVERY_LINE), "completions",
                                      pytest.param("messages", marks=ON_EVERY_LINE), "responses"])
@pytest.mark.parametrize("model", list(MODE_CASES))
def test_every_mode_works_on_every_endpoint(proxy, token, endpoint, model):
    marker, expected = MODE_CASES[model]
    content = f"{marker} Question {token}".strip()
    outcome, text = call_endpoint(proxy, endpoint, model, content)
    assert outcome == expected
    if expected == "blocked":
        assert text == "I can't help with that request."
    elif model in ("llama-annotate", "llama-shadow"):
        assert token in text and text.startswith("llama3 says:")  # unchanged primary answer
    elif model == "llama-escalate":
        assert text.startswith("gpt-4o says:")
    else:
        assert text.startswith("gpt-4o-mini says:")
