"""Structured output for the judges, through the real proxy and its router, against the simulator.

One proxy whose guard / escalate primaries each name a different secondary deployment: OpenAI (litellm's map
says it supports response schemas), Anthropic (litellm sends ``output_format`` and its beta header), Ollama
(litellm's map says no), Ollama flagged by the operator (``model_info.supports_response_schema``), and an
OpenAI-compatible llama.cpp-style server flagged ``relay_judge_format: json_object``. The simulator records
what each judge call carried, in that provider's own shape.
"""

import pytest

import relay_plugin
from sim.stack import model_entry
from tests.proxy_support import FAKE_PROVIDER_KEY, start_test_proxy

pytestmark = pytest.mark.proxy

VERDICT, SCORE = relay_plugin.VERDICT_SCHEMA, relay_plugin.SCORE_SCHEMA


def judge_models(sim_url: str) -> list[dict]:
    def primary(name: str, secondary: str, mode: str = "guard") -> dict:
        return model_entry(name, "ollama_chat/llama3", sim_url, {"mode": mode, "secondary_model": secondary})

    flagged = model_entry("j-ollama-flagged", "ollama_chat/qwen-judge", sim_url)
    flagged["model_info"] = {"supports_response_schema": True}
    llamacpp = model_entry("j-llamacpp", "openai/smol-judge", sim_url + "/v1", api_key=FAKE_PROVIDER_KEY)
    llamacpp["model_info"] = {"relay_judge_format": "json_object"}
    return [
        primary("g-openai", "j-openai"),
        primary("g-claude", "j-claude"),
        primary("g-ollama", "j-ollama"),
        primary("g-ollama-flagged", "j-ollama-flagged"),
        primary("g-llamacpp", "j-llamacpp"),
        primary("e-openai", "j-openai", mode="escalate"),
        model_entry("j-openai", "openai/gpt-4o-mini", sim_url + "/v1", api_key=FAKE_PROVIDER_KEY),
        model_entry("j-claude", "anthropic/claude-haiku-4-5-20251001", sim_url, api_key=FAKE_PROVIDER_KEY),
        model_entry("j-ollama", "ollama_chat/llama3", sim_url),
        flagged,
        llamacpp,
        model_entry("premium", "openai/gpt-4o", sim_url + "/v1", api_key=FAKE_PROVIDER_KEY),
    ]


@pytest.fixture(scope="module")
def judged(workdir, sim):
    env = {"RELAY_SECONDARY_MODEL": "j-openai", "RELAY_ESCALATE_MODEL": "premium", "RELAY_APPLY_TO": "g-*,e-*",
           "RELAY_TIMEOUT_S": "10", "RELAY_DEADLINE_S": "20"}
    handle = start_test_proxy(workdir, "judge-format", sim.url, env, model_list=judge_models(sim.url))
    yield handle
    handle.stop()


def judge_call(sim, token: str) -> dict:
    """The one secondary request of this test (the primary is the simulated llama3 on /api/chat)."""
    calls = [r for r in sim.requests(token) if not (r["path"] == "/api/chat" and r["model"] == "llama3"
                                                     and "The conversation:" not in str(r["body"]))]
    assert len(calls) == 1, [c["path"] for c in calls]
    return calls[0]


def test_an_openai_judge_gets_the_verdict_as_a_json_schema_response_format_and_blocks_on_it(judged, sim, token):
    raw = judged.chat("g-openai", f"SIM:BLOCK {token}")
    assert raw.headers["x-relay-outcome"] == "blocked"
    assert raw.parse().choices[0].finish_reason == "content_filter"
    body = judge_call(sim, token)["body"]
    assert body["response_format"] == {"type": "json_schema",
                                       "json_schema": {"name": "relay_verdict", "schema": VERDICT, "strict": True}}


def test_an_anthropic_judge_gets_output_format_with_litellms_beta_header(judged, sim, token):
    raw = judged.chat("g-claude", f"harmless {token}")
    assert raw.headers["x-relay-outcome"] == "relayed"  # the simulated verdict is an allow
    call = judge_call(sim, token)
    assert call["path"] == "/v1/messages"
    assert call["body"]["output_format"] == {"type": "json_schema", "schema": VERDICT}
    assert "structured-outputs-2025-11-13" in call["headers"].get("anthropic-beta", "")


def test_an_ollama_judge_gets_no_format_unless_its_deployment_is_flagged(judged, sim, token):
    judged.chat("g-ollama", f"first {token}")
    assert "format" not in judge_call(sim, token)["body"]  # litellm's map: no response schema for ollama

    other = token + "b"
    raw = judged.chat("g-ollama-flagged", f"SIM:BLOCK second {other}")
    assert raw.headers["x-relay-outcome"] == "blocked"
    assert judge_call(sim, other)["body"]["format"] == VERDICT


def test_a_llama_cpp_deployment_gets_its_json_object_dialect(judged, sim, token):
    raw = judged.chat("g-llamacpp", f"SIM:BLOCK {token}")
    assert raw.headers["x-relay-outcome"] == "blocked"
    assert judge_call(sim, token)["body"]["response_format"] == {"type": "json_object", "schema": VERDICT}


def test_the_escalate_judge_gets_the_score_schema_and_a_low_score_escalates(judged, sim, token):
    raw = judged.chat("e-openai", f"Explain gravity SIM:LOWSCORE {token}")
    assert raw.headers["x-relay-outcome"] == "escalated"
    judges = [r for r in sim.requests(token) if r["model"] == "gpt-4o-mini"]
    assert [r["body"]["response_format"]["json_schema"]["schema"] for r in judges] == [SCORE]
    premium = [r for r in sim.requests(token) if r["model"] == "gpt-4o"]
    assert len(premium) == 1 and "response_format" not in premium[0]["body"]


def test_a_judge_that_ignores_the_schema_and_answers_prose_fails_as_bad_verdict(judged, sim, token):
    raw = judged.chat("g-openai", f"SIM:BLOCK SIM:GARBAGE {token}")
    assert raw.headers["x-relay-outcome"] == "failed:bad_verdict"
    assert "response_format" in judge_call(sim, token)["body"]
    assert raw.parse().choices[0].message.content.startswith("llama3 says:")  # fail-open keeps the answer


def test_a_streamed_guard_asks_for_the_schema_too(judged, sim, token):
    stream = judged.openai.chat.completions.create(
        model="g-openai", stream=True, messages=[{"role": "user", "content": f"SIM:BLOCK {token}"}])
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == relay_plugin.DEFAULT_GUARD_MESSAGE
    assert judge_call(sim, token)["body"]["response_format"]["json_schema"]["schema"] == VERDICT
