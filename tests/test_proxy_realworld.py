"""Never worse, never over budget: real-world inputs through the real proxy (issue 11).

When the relay cannot do its job well on a request it keeps the primary answer and says why; money is
counted exactly, and when it cannot be bounded the operator hears about it.
"""

import json
import time

import httpx
import pytest

from sim.markers import count_tokens
from sim.providers import messages_text
from sim.stack import model_entry
from tests.proxy_support import BASE_RELAY_ENV, FAKE_PROVIDER_KEY, relay_test_models, start_test_proxy

pytestmark = pytest.mark.proxy

MAX_TOKENS = 60
#: a secondary answer of 100 words: cut at RELAY_SECONDARY_MAX_TOKENS=60 words by the simulator
LONG_REPLY = " ".join(f"word{i}" for i in range(100))
#: a primary answer longer than half of RELAY_MAX_INPUT_CHARS=3000
LONG_PRIMARY = "The complete answer. " + "It has a middle the refiner would never see. " * 80 + "The end."
#: prices with many significant digits, so a rounded cost shows
TINY_PRICE = {"input_cost_per_token": 3.1e-11, "output_cost_per_token": 7.7e-11}
MINI_PRICE = {"input_cost_per_token": 1.5e-07, "output_cost_per_token": 6e-07}


def secondary(name: str, upstream: str, sim_url: str, **params) -> dict:
    return model_entry(name, "openai/" + upstream, sim_url + "/v1", api_key=FAKE_PROVIDER_KEY, **params)


def extra_models(sim_url: str) -> list[dict]:
    return relay_test_models(sim_url) + [
        secondary("sec-trunc", "sim-trunc", sim_url, **MINI_PRICE),
        secondary("sec-malformed", "sim-malformed", sim_url, **MINI_PRICE),
        secondary("sec-slow", "sim-slow", sim_url, **MINI_PRICE),
        secondary("sec-tiny", "sim-tiny", sim_url, **TINY_PRICE),
        secondary("sec-unpriced", "sim-unpriced", sim_url),
        secondary("sec-free", "sim-free", sim_url, input_cost_per_token=0, output_cost_per_token=0),
        secondary("sec-overshoot", "sim-overshoot", sim_url, **MINI_PRICE),
        model_entry("mock-long", "openai/gpt-4o-mini", sim_url + "/v1", mock_response=LONG_PRIMARY),
    ]


FORCED = {
    "sim-trunc": "SIM:ANSWER=" + LONG_REPLY,
    "sim-malformed": "SIM:MALFORMED",
    "sim-slow": "SIM:SLEEP=4000",
    # a provider that bills 10,000 output tokens for a 60-token limit (reasoning tokens, say)
    "sim-overshoot": "SIM:USAGE=10000",
}


@pytest.fixture(scope="module")
def realworld(workdir, sim):
    env = {
        **BASE_RELAY_ENV,
        "RELAY_APPLY_TO": "llama*,openai-primary,mock-long",
        "RELAY_CLIENT_OVERRIDE": "full",
        "RELAY_SECONDARY_MAX_TOKENS": str(MAX_TOKENS),
        "RELAY_MAX_INPUT_CHARS": "3000",
        "RELAY_REDACT": "true",
        "RELAY_RETRIES": "1",
        "RELAY_RETRY_BASE_S": "0.05",
        "RELAY_VENDOR_TRACE_ID": "not ours",  # another program's variable under the prefix
    }
    yield from proxy_with_forced_markers(workdir, sim, "realworld", env)


@pytest.fixture(scope="module")
def budgeted(workdir, sim):
    env = {**BASE_RELAY_ENV, "RELAY_CLIENT_OVERRIDE": "full", "RELAY_SECONDARY_MAX_TOKENS": str(MAX_TOKENS),
           "RELAY_BUDGET_USD": "0.05"}
    yield from proxy_with_forced_markers(workdir, sim, "budgeted", env)


def proxy_with_forced_markers(workdir, sim, name: str, env: dict):
    """A proxy over the extra models while the simulator forces FORCED's markers (restored afterwards)."""
    previous = sim.configure()["force_markers"]
    sim.configure(force_markers={**previous, **FORCED})
    handle = start_test_proxy(workdir, name, sim.url, env, model_list=extra_models(sim.url))
    yield handle
    handle.stop()
    sim.configure(force_markers=previous)


def relay_block(**settings) -> dict:
    return {"relay": settings}


def text_of(raw) -> str:
    return raw.parse().choices[0].message.content


# ----- 1. a truncated secondary never replaces a complete answer --------------------------------------


def test_a_refiner_cut_at_its_token_limit_keeps_the_complete_primary_answer(realworld, sim, token):
    raw = realworld.chat("llama", f"Explain it all {token}", metadata=relay_block(secondary_model="sec-trunc"))
    assert raw.headers["x-relay-outcome"] == "failed:truncated"
    assert text_of(raw) == f"llama3 says: Explain it all {token}"
    (call,) = [r for r in sim.requests(token) if r["model"] == "sim-trunc"]  # it was called, and cut
    assert call["body"]["max_tokens"] == MAX_TOKENS


def test_an_escalation_premium_cut_at_its_token_limit_keeps_the_primary_answer(realworld, sim, token):
    raw = realworld.chat("llama", f"SIM:LOWSCORE {token}",
                         metadata=relay_block(mode="escalate", escalate_model="sec-trunc"))
    assert raw.headers["x-relay-outcome"] == "failed:truncated"
    assert text_of(raw) == f"llama3 says: SIM:LOWSCORE {token}"


def test_a_consensus_merge_cut_at_its_token_limit_keeps_the_primary_answer(realworld, sim, token):
    raw = realworld.chat("llama", f"Merge {token}", metadata=relay_block(mode="consensus", secondary_model="sec-trunc"))
    assert raw.headers["x-relay-outcome"] == "failed:truncated"
    assert text_of(raw) == f"llama3 says: Merge {token}"


def test_a_streamed_refiner_cut_at_its_limit_breaks_off_and_the_primary_answer_follows(realworld, token):
    with realworld.openai.chat.completions.with_streaming_response.create(
            model="llama", messages=[{"role": "user", "content": f"Stream it {token}"}], stream=True,
            metadata=relay_block(secondary_model="sec-trunc")) as raw:
        chunks = list(raw.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    relay = [c.model_extra["relay"] for c in chunks if c.model_extra and "relay" in c.model_extra][0]
    assert relay["outcome"] == "failed:truncated"
    assert text.endswith(f"the original answer follows]\n\nllama3 says: Stream it {token}")


# ----- 2. never replace what the secondary did not see ----------------------------------------------


def test_an_answer_longer_than_the_secondary_may_see_is_not_replaced(realworld, sim, token):
    raw = realworld.chat("mock-long", f"Tell me everything {token}")
    assert raw.headers["x-relay-outcome"] == "skipped:input_too_long"
    assert text_of(raw) == LONG_PRIMARY
    assert not [r for r in sim.requests(token) if r["model"] == "gpt-4o-mini"]  # nothing was spent on it


# ----- 3. images, audio and tool results the secondary would not see --------------------------------

IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="}}


def test_escalate_never_answers_an_image_question_without_the_image(realworld, sim, token):
    messages = [{"role": "user", "content": [{"type": "text", "text": f"What colour is this image? SIM:LOWSCORE {token}"}, IMAGE]}]
    raw = realworld.openai.chat.completions.with_raw_response.create(
        model="openai-primary", messages=messages, metadata=relay_block(mode="escalate"))
    assert raw.headers["x-relay-outcome"] == "skipped:non_text_input"
    assert text_of(raw).startswith("gpt-4o-mini says: What colour is this image?")


def test_refine_keeps_an_answer_built_on_tool_results_it_would_not_see(realworld, token):
    messages = [
        {"role": "user", "content": f"Weather in Paris? {token}"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees and sunny"},
    ]
    raw = realworld.openai.chat.completions.with_raw_response.create(model="openai-primary", messages=messages)
    assert raw.headers["x-relay-outcome"] == "skipped:non_text_input"


# ----- 4. structured answers stay valid -------------------------------------------------------------


def test_refine_leaves_a_json_answer_alone(realworld, token):
    raw = realworld.chat("openai-primary", f'SIM:ANSWER={{"colour": "blue", "id": "{token}"}}',
                         response_format={"type": "json_object"})
    assert raw.headers["x-relay-outcome"] == "skipped:structured_output"
    assert json.loads(text_of(raw)) == {"colour": "blue", "id": token}


def test_annotate_append_puts_its_review_in_the_body_when_the_answer_is_json(realworld, token):
    schema = {"type": "json_schema", "json_schema": {"name": "c", "schema": {"type": "object"}}}
    raw = realworld.chat("openai-primary", f'SIM:ANSWER={{"colour": "blue", "id": "{token}"}}',
                         response_format=schema, metadata=relay_block(mode="annotate", annotate_target="append"))
    assert raw.headers["x-relay-outcome"] == "relayed"
    assert json.loads(text_of(raw)) == {"colour": "blue", "id": token}
    assert raw.parse().model_extra["relay"]["analysis"]


# ----- 5. redaction never leaks into the answer -----------------------------------------------------


def test_a_refined_answer_carries_the_users_own_data_not_placeholders(realworld, sim, token):
    raw = realworld.chat("llama", f"Mail bob@example.com {token}")
    assert raw.headers["x-relay-outcome"] == "modified"
    (call,) = [r for r in sim.requests(token) if r["model"] == "gpt-4o-mini"]
    assert "bob@example.com" not in json.dumps(call["body"])  # the secondary saw a placeholder
    assert "bob@example.com" in text_of(raw)
    assert "REDACTED" not in text_of(raw)


# ----- 6. stop sequences, logprobs, headers on /v1/messages errors, cancelled streams ----------------


def test_a_refined_answer_ends_before_the_clients_stop_sequence(realworld, token):
    raw = realworld.chat("llama", f"Count {token} then STOPHERE and more", stop=["STOPHERE"])
    assert raw.headers["x-relay-outcome"] == "modified"
    answer = text_of(raw)
    assert "STOPHERE" not in answer and token in answer


def test_a_replaced_answer_does_not_keep_the_primarys_logprobs(realworld, token):
    raw = realworld.chat("openai-primary", f"Hi {token}", logprobs=True)
    assert raw.headers["x-relay-outcome"] == "modified"
    assert raw.parse().choices[0].logprobs is None
    unrelayed = realworld.chat("openai-primary", f"Hi {token}", logprobs=True, metadata=relay_block(enabled=False))
    assert unrelayed.parse().choices[0].logprobs is not None  # the primary did send some


def test_a_messages_error_from_the_relay_carries_the_relay_headers(realworld, token):
    response = httpx.post(realworld.url + "/v1/messages", timeout=60,
                          headers={"Authorization": f"Bearer {realworld.key}", "anthropic-version": "2023-06-01"},
                          json={"model": "llama-guard-error", "max_tokens": 100,
                                "messages": [{"role": "user", "content": f"SIM:BLOCK {token}"}]})
    assert response.status_code == 400
    assert response.headers["x-relay-outcome"] == "blocked"
    assert response.headers["x-relay-mode"] == "guard"


def test_a_client_leaving_a_stream_mid_relay_leaves_no_pending_task(realworld, token):
    body = {"model": "llama", "stream": True, "messages": [{"role": "user", "content": f"Leave {token}"}],
            "metadata": relay_block(secondary_model="sec-slow")}
    for _i in range(3):
        with httpx.stream("POST", realworld.url + "/v1/chat/completions", json=body, timeout=30,
                          headers={"Authorization": f"Bearer {realworld.key}"}) as response:
            for _ in response.iter_bytes():
                break  # the first event, then the client is gone
    time.sleep(3)  # heartbeats notice the client left; the relay work is cancelled
    log = realworld.log()
    assert log.count("outcome=failed:client_disconnected") >= 3
    assert "Task was destroyed but it is pending" not in log


# ----- 9. costs keep their digits -------------------------------------------------------------------


def test_the_cost_header_equals_the_providers_usage_times_the_price(realworld, sim, token):
    raw = realworld.chat("llama", f"Price me {token}", metadata=relay_block(secondary_model="sec-tiny"))
    assert raw.headers["x-relay-outcome"] == "modified"
    (call,) = [r for r in sim.requests(token) if r["model"] == "sim-tiny"]
    prompt = count_tokens("\n".join(messages_text(call["body"]["messages"])))
    expected = prompt * TINY_PRICE["input_cost_per_token"] + count_tokens(text_of(raw)) * TINY_PRICE["output_cost_per_token"]
    assert abs(float(raw.headers["x-relay-cost-usd"]) - expected) <= 1e-9 * expected


# ----- 10. an unparseable response is not retried as a dropped connection ---------------------------


def test_an_unparseable_secondary_response_is_a_bad_response_and_is_not_retried(realworld, sim, token):
    raw = realworld.chat("llama", f"Parse me {token}", metadata=relay_block(secondary_model="sec-malformed"))
    assert raw.headers["x-relay-outcome"] == "failed:bad_response"
    assert text_of(raw) == f"llama3 says: Parse me {token}"
    assert len([r for r in sim.requests(token) if r["model"] == "sim-malformed"]) == 1  # RELAY_RETRIES=1


# ----- 11. client-chosen models must be in the model list ---------------------------------------------


@pytest.mark.parametrize("block", [{"secondary_model": "openai/gpt-4o"}, {"mode": "consensus", "consensus_models": "sec,x/y"}])
def test_a_client_may_not_name_a_model_outside_the_model_list(realworld, sim, token, block):
    with pytest.raises(Exception) as caught:
        realworld.chat("llama", f"Hi {token}", metadata=relay_block(**block))
    assert getattr(caught.value, "status_code", None) == 400
    assert "model list" in str(caught.value)
    assert not sim.requests(token)  # refused before the primary ran


# ----- 7. and 8. money: unpriced models, overshoot ---------------------------------------------------


def test_an_unpriced_model_behind_the_router_is_not_free_under_a_budget(budgeted, sim, token):
    raw = budgeted.chat("llama", f"Hi {token}", metadata=relay_block(secondary_model="sec-unpriced"))
    assert raw.headers["x-relay-outcome"] == "skipped:unpriced"
    assert not [r for r in sim.requests(token) if r["model"] == "sim-unpriced"]


def test_an_operators_explicit_zero_price_is_a_price(budgeted, token):
    raw = budgeted.chat("llama", f"Hi {token}", metadata=relay_block(secondary_model="sec-free"))
    assert raw.headers["x-relay-outcome"] == "modified"
    assert raw.headers["x-relay-cost-usd"] == "0"
    assert "x-relay-cost-unpriced" not in raw.headers


def test_the_cost_of_an_unpriced_model_is_reported_as_unknown_not_zero(realworld, token):
    raw = realworld.chat("llama", f"Hi {token}", metadata=relay_block(secondary_model="sec-unpriced"))
    assert raw.headers["x-relay-outcome"] == "modified"
    assert raw.headers["x-relay-cost-unpriced"] == "sec-unpriced"


def test_a_provider_billing_past_the_token_limit_is_logged_with_the_figures(budgeted, token):
    raw = budgeted.chat("llama", f"Think hard {token}", metadata=relay_block(secondary_model="sec-overshoot"))
    assert raw.headers["x-relay-outcome"] == "modified"
    assert float(raw.headers["x-relay-cost-usd"]) >= 10000 * MINI_PRICE["output_cost_per_token"]
    time.sleep(0.2)
    lines = [line for line in budgeted.log().splitlines() if "overshot its bound" in line]
    assert len(lines) == 1
    assert "WARNING" in lines[0] and "sec-overshoot" in lines[0]
    assert f"10000 output tokens reported against max_tokens {MAX_TOKENS}" in lines[0]


# ----- 13. other software's RELAY_* variables get one warning ----------------------------------------


def test_an_unknown_relay_variable_gets_one_warning_line_at_startup(realworld):
    lines = [line for line in realworld.log().splitlines() if "RELAY_VENDOR_TRACE_ID" in line]
    assert len(lines) == 1 and "not a relay variable" in lines[0]
