"""RELAY_JUDGE_FORMAT: guard verdicts and escalate scores asked for as structured output, parsed as strictly.

In process, with a scripted secondary that records the arguments of each call; the style decision
(``judge_style``) is checked against litellm's own capability map and a real ``litellm.Router`` whose
deployments carry the operator's ``model_info`` flags.
"""

import copy
import json

import litellm
import pytest

import relay_plugin
from relay_plugin import ConfigError, RelayConfig, RelayHandler, SecondaryError
from tests.support import PRIMARY, QUESTION, FakeSecondary, chat_response, config, make_handler

KNOWN = "openai/gpt-4o-mini"  #: litellm's map says it supports response schemas
UNKNOWN = "openai/unit-judge"  #: litellm knows nothing about it
PREMIUM = "openai/premium"


def formats(judge: FakeSecondary, model: str) -> list:
    """The response_format of every call to ``model``: what structured output the relay asked it for."""
    return [c.response_format for c in judge.calls if c.model == model]


def chat_data() -> dict:
    return {"model": "llama", "messages": [{"role": "user", "content": QUESTION}], "metadata": {},
            "litellm_call_id": f"call-{id(object())}-{len(str(QUESTION))}-{json.dumps(None)}"}


async def relay(h: RelayHandler) -> tuple[litellm.ModelResponse, dict]:
    data = chat_data()
    data["litellm_call_id"] = f"call-{id(data)}"
    response = await h.async_post_call_success_hook(data, None, chat_response())
    headers = await h.async_post_call_response_headers_hook(data, None, response)
    return response, headers


@pytest.fixture(autouse=True)
def fresh_style_cache():
    relay_plugin._JUDGE_STYLE_CACHE.clear()
    yield
    relay_plugin._JUDGE_STYLE_CACHE.clear()


# ----- the setting -------------------------------------------------------------------------------


def test_judge_format_defaults_to_auto_and_rejects_an_unknown_value_naming_the_allowed_ones():
    assert RelayConfig.from_env({"RELAY_SECONDARY_MODEL": UNKNOWN}).judge_format == "auto"
    with pytest.raises(ConfigError, match=r"RELAY_JUDGE_FORMAT='json' is invalid: allowed: auto \| schema \| prompt"):
        RelayConfig.from_env({"RELAY_SECONDARY_MODEL": UNKNOWN, "RELAY_JUDGE_FORMAT": "json"})


# ----- which style a secondary gets --------------------------------------------------------------


def test_auto_asks_for_a_schema_only_where_litellm_knows_the_model_supports_one():
    assert relay_plugin.judge_style("auto", KNOWN) == "schema"
    assert relay_plugin.judge_style("auto", UNKNOWN) == "prompt"
    assert relay_plugin.judge_style("auto", "ollama_chat/llama3") == "prompt"  # litellm's map says no


def test_schema_asks_every_secondary_and_prompt_asks_none():
    assert relay_plugin.judge_style("schema", UNKNOWN) == "schema"
    assert relay_plugin.judge_style("prompt", KNOWN) == "prompt"


@pytest.fixture(autouse=True)
def scratch_model_cost(monkeypatch):
    """litellm's Router registers each deployment's model_info into the global ``litellm.model_cost``;
    the routers here get a scratch copy, so no other test sees their flags."""
    monkeypatch.setattr(litellm, "model_cost", copy.deepcopy(litellm.model_cost))


def router_with(*deployments: tuple[str, str, dict]) -> litellm.Router:
    return litellm.Router(model_list=[
        {"model_name": name, "litellm_params": {"model": model, "api_base": "http://127.0.0.1:9"}, "model_info": info}
        for name, model, info in deployments])


def test_a_deployments_model_info_flag_beats_litellms_map_under_auto(monkeypatch):
    router = router_with(("local-judge", UNKNOWN, {"supports_response_schema": True}),
                         ("denied", KNOWN, {"supports_response_schema": False}),
                         ("plain", "openai/gpt-4o", {}))
    monkeypatch.setattr(relay_plugin, "_proxy_router", lambda: router)
    assert relay_plugin.judge_style("auto", "local-judge") == "schema"
    assert relay_plugin.judge_style("auto", "denied") == "prompt"
    assert relay_plugin.judge_style("auto", "plain") == "schema"  # the deployment's litellm model decides


def test_relay_judge_format_in_model_info_is_the_most_specific_word(monkeypatch):
    router = router_with(("llamacpp", UNKNOWN, {"relay_judge_format": "json_object"}),
                         ("no-schema", KNOWN, {"relay_judge_format": "prompt"}))
    monkeypatch.setattr(relay_plugin, "_proxy_router", lambda: router)
    assert relay_plugin.judge_style("auto", "llamacpp") == "json_object"
    assert relay_plugin.judge_style("schema", "no-schema") == "prompt"
    assert relay_plugin.judge_style("prompt", "llamacpp") == "prompt"  # the global switch still turns it off


def test_deployments_of_one_name_that_disagree_get_the_prompt(monkeypatch):
    router = router_with(("mixed", KNOWN, {}), ("mixed", UNKNOWN, {}))
    monkeypatch.setattr(relay_plugin, "_proxy_router", lambda: router)
    assert relay_plugin.judge_style("auto", "mixed") == "prompt"


def test_the_response_formats_are_openais_json_schema_and_llama_cpps_json_object():
    schema = relay_plugin.VERDICT_SCHEMA
    assert relay_plugin.judge_response_format("relay_verdict", schema, "schema") == {
        "type": "json_schema", "json_schema": {"name": "relay_verdict", "schema": schema, "strict": True}}
    assert relay_plugin.judge_response_format("relay_verdict", schema, "json_object") == {
        "type": "json_object", "schema": schema}
    assert relay_plugin.judge_response_format("relay_verdict", schema, "prompt") is None


# ----- what the judge calls carry ----------------------------------------------------------------


async def test_guard_sends_the_verdict_schema_and_escalate_the_score_schema():
    judge = FakeSecondary({KNOWN: '{"verdict": "allow", "reason": "fine"}'})
    await relay(make_handler(judge, SECONDARY_MODEL=KNOWN, MODE="guard"))
    assert formats(judge, KNOWN)[0]["json_schema"]["schema"] == relay_plugin.VERDICT_SCHEMA

    judge = FakeSecondary({KNOWN: '{"score": 9, "reason": "good"}', PREMIUM: "better"})
    await relay(make_handler(judge, SECONDARY_MODEL=KNOWN, MODE="escalate", ESCALATE_MODEL=PREMIUM))
    assert formats(judge, KNOWN)[0]["json_schema"]["schema"] == relay_plugin.SCORE_SCHEMA
    assert set(relay_plugin.SCORE_SCHEMA["properties"]["score"]["enum"]) == set(range(11))


async def test_prompt_format_and_unknown_models_send_no_response_format():
    judge = FakeSecondary({KNOWN: '{"verdict": "allow", "reason": "fine"}',
                           UNKNOWN: '{"verdict": "allow", "reason": "fine"}'})
    await relay(make_handler(judge, SECONDARY_MODEL=KNOWN, MODE="guard", JUDGE_FORMAT="prompt"))
    await relay(make_handler(judge, SECONDARY_MODEL=UNKNOWN, MODE="guard"))
    assert [c for c in judge.calls if c.response_format is not None] == []


async def test_refine_annotate_and_the_premium_answer_never_ask_for_json():
    judge = FakeSecondary({KNOWN: "free text", PREMIUM: "premium text"})
    for mode in ("refine", "annotate"):
        await relay(make_handler(judge, SECONDARY_MODEL=KNOWN, MODE=mode, JUDGE_FORMAT="schema"))
    judge.replies[KNOWN] = '{"score": 1, "reason": "weak"}'
    await relay(make_handler(judge, SECONDARY_MODEL=KNOWN, MODE="escalate", ESCALATE_MODEL=PREMIUM,
                             JUDGE_FORMAT="schema"))
    assert [c.model for c in judge.calls if c.response_format is not None] == [KNOWN]  # the escalate judge only


# ----- the contract holds whatever a schema-constrained judge says ------------------------------


@pytest.mark.parametrize("reply", [
    "Apostolos, no. Please provide an appropriate response to the above request.",  # prose despite the schema
    '{"verdict": "maybe", "reason": "unsure"}',  # outside the enum
    '{"verdict": "allow"',  # cut off by max_tokens
    '{"reason": "no verdict at all"}',
    '["allow"]',
])
async def test_a_schema_judge_reply_that_is_not_a_verdict_fails_as_bad_verdict_never_an_allow(reply):
    judge = FakeSecondary({KNOWN: reply})
    response, headers = await relay(make_handler(judge, SECONDARY_MODEL=KNOWN, MODE="guard"))
    assert formats(judge, KNOWN)[0] is not None
    assert headers["x-relay-outcome"] == "failed:bad_verdict"  # fail-open: the operator's choice, and said so
    assert response.choices[0].message.content == PRIMARY

    response, headers = await relay(make_handler(judge, SECONDARY_MODEL=KNOWN, MODE="guard", FAIL_MODE="closed"))
    assert headers["x-relay-outcome"] == "blocked"
    assert headers["x-relay-reason"].startswith("unjudged (") and headers["x-relay-reason"].endswith("; fail-closed")
    assert response.choices[0].message.content == relay_plugin.DEFAULT_GUARD_MESSAGE
    assert response.choices[0].finish_reason == "content_filter"


@pytest.mark.parametrize("reply", ['{"score": 11, "reason": "x"}', '{"score": -1, "reason": "x"}',
                                   '{"score": "9", "reason": "x"}', '{"score": true, "reason": "x"}'])
async def test_a_schema_judge_score_out_of_range_or_of_the_wrong_type_is_a_failure(reply):
    judge = FakeSecondary({KNOWN: reply, PREMIUM: "premium"})
    response, headers = await relay(make_handler(judge, SECONDARY_MODEL=KNOWN, MODE="escalate", ESCALATE_MODEL=PREMIUM))
    assert headers["x-relay-outcome"] == "failed:bad_verdict"
    assert response.choices[0].message.content == PRIMARY
    assert PREMIUM not in judge.models


async def test_an_empty_schema_judge_answer_fails_as_empty_response():
    judge = FakeSecondary({KNOWN: SecondaryError("empty_response", f"{KNOWN} returned no text")})
    response, headers = await relay(make_handler(judge, SECONDARY_MODEL=KNOWN, MODE="guard"))
    assert headers["x-relay-outcome"] == "failed:empty_response"
    assert response.choices[0].message.content == PRIMARY  # fail-open keeps the answer


async def test_the_cache_keeps_prompt_and_schema_verdicts_apart():
    judge = FakeSecondary({KNOWN: '{"verdict": "block", "reason": "x"}'})
    h = make_handler(judge, SECONDARY_MODEL=KNOWN, MODE="guard", CACHE_TTL_S="60")
    await relay(h)
    h.config = config(SECONDARY_MODEL=KNOWN, MODE="guard", CACHE_TTL_S="60", JUDGE_FORMAT="prompt")
    await relay(h)
    assert len(judge.calls) == 2  # a different request shape is a different call
