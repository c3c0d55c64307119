"""Attacks on the fast path's flat-price cost (_fast_cost / _plain_tokens / _flat_prices), written by an
outside review: each test builds an answer the way the fast path reads a provider's answer (the
provider config's own ``transform_response`` on the raw JSON) and asserts the promise: the fast cost
is what ``litellm.completion_cost`` gives that answer and model. The cost feeds the relay's caps and
the key's spend: an under-count is a cap that does not hold. Last, the breaker's probe against a
caller the key budget refuses."""

import httpx
import litellm
import pytest
from litellm.types.utils import ModelResponse

import relay_plugin

MESSAGES = [{"role": "user", "content": "hi"}]


def _wire(model: str, provider: str = "openai", **model_info) -> "relay_plugin._Wire":
    deployment = {"litellm_params": {"model": f"{provider}/{model}", "api_key": "sk-test"}, "model_info": model_info}
    return relay_plugin._wire_call(deployment, MESSAGES, {})


def _read(wire, body: dict):
    """The provider's JSON answer as the fast path's _exchange reads it (without the network)."""
    raw = httpx.Response(200, json=body, request=httpx.Request("POST", wire.url))
    return wire.config.transform_response(
        model=wire.backend, raw_response=raw, model_response=ModelResponse(), logging_obj=relay_plugin._NoLogging(),
        request_data=wire.body, messages=MESSAGES, optional_params=wire.optional, litellm_params=wire.params,
        encoding=None, api_key="sk-test", json_mode=False)


def _openai(model: str, usage: dict | None = None, message: dict | None = None) -> dict:
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": model,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": "hi", **(message or {})}}],
            "usage": usage or {"prompt_tokens": 1000, "completion_tokens": 500, "total_tokens": 1500}}


def _litellms(answer, wire) -> float:
    """What litellm's own call books (its logging passes the deployment's base_model, which prices the
    answer whatever model it names)."""
    base_model = (wire.deployment.get("model_info") or {}).get("base_model")
    return litellm.completion_cost(completion_response=answer, model=base_model or wire.backend,
                                   custom_llm_provider=wire.provider, base_model=base_model)


def test_an_answer_naming_a_dearer_model_than_the_deployment_costs_what_litellm_says(no_http_proxy):
    """litellm prices an answer by the model the provider says answered (response.model) when the cost
    map knows it; the fast path prices the deployment's model. OpenAI's "gpt-4o" alias answered as
    gpt-4o-2024-05-13 (5/15 USD per M tokens, twice gpt-4o's current 2.5/10) for months; any OpenAI-
    compatible gateway behind an openai/ deployment may answer with another model's name."""
    wire = _wire("gpt-4o")
    answer = _read(wire, _openai("gpt-4o-2024-05-13"))
    assert answer.model == "gpt-4o-2024-05-13"
    theirs = _litellms(answer, wire)
    assert relay_plugin._fast_cost(answer, wire) == pytest.approx(theirs, rel=1e-9)  # fast: 0.0075, litellm: 0.0125


def test_base_model_with_an_answer_naming_another_model(no_http_proxy):
    wire = _wire("my-gw-model", base_model="gpt-4o-mini")
    answer = _read(wire, _openai("gpt-4o"))
    assert relay_plugin._fast_cost(answer, wire) == pytest.approx(_litellms(answer, wire), rel=1e-9)


@pytest.mark.parametrize("details", [
    {"prompt_tokens_details": {"text_tokens": 5000, "cached_tokens": 0}},
    {"completion_tokens_details": {"text_tokens": 5000, "reasoning_tokens": 0}},
    {"prompt_tokens_details": {"text_tokens": 10}},
], ids=["prompt-text-above-prompt", "output-text-above-output", "prompt-text-below-prompt"])
def test_text_token_details_litellm_prices_are_not_plain(details, no_http_proxy):
    """litellm's generic cost takes prompt_tokens_details.text_tokens (and completion_tokens_details.
    text_tokens) as the billed text tokens when they are set; _PLAIN_USAGE_FIELDS lets text_tokens of
    any value through as "plain", so the fast path prices prompt_tokens/completion_tokens instead."""
    wire = _wire("gpt-4o")
    answer = _read(wire, _openai("gpt-4o", {"prompt_tokens": 1000, "completion_tokens": 500, "total_tokens": 1500,
                                            **details}))
    assert relay_plugin._fast_cost(answer, wire) == pytest.approx(_litellms(answer, wire), rel=1e-9)


@pytest.mark.parametrize("setting", ["cost_margin_config", "cost_discount_config"])
def test_the_proxys_cost_margin_and_discount_apply_on_the_fast_path_too(setting, monkeypatch, no_http_proxy):
    """litellm_settings.cost_margin_config / cost_discount_config (also PATCH /config/cost_margin_config
    at runtime): completion_cost applies them to every cost; the flat price does not (a 20% margin is
    a 20% under-count on the relay's caps and the key's spend)."""
    monkeypatch.setattr(litellm, setting, {"openai": 0.2})
    wire = _wire("gpt-4o")
    answer = _read(wire, _openai("gpt-4o"))
    assert relay_plugin._fast_cost(answer, wire) == pytest.approx(_litellms(answer, wire), rel=1e-9)


def test_a_search_models_web_search_is_priced(no_http_proxy):
    """gpt-4o-search-preview answers with url_citation annotations when it searched: litellm adds the
    search_context_cost_per_query (0.025-0.05 USD a call); the usage is plain, so the fast path drops it."""
    if "gpt-4o-search-preview" not in litellm.model_cost:
        pytest.skip("no gpt-4o-search-preview in this cost map")
    wire = _wire("gpt-4o-search-preview")
    annotations = [{"type": "url_citation", "url_citation": {"url": "https://example.com", "title": "t",
                                                              "start_index": 0, "end_index": 2}}]
    answer = _read(wire, _openai("gpt-4o-search-preview", message={"annotations": annotations}))
    theirs = _litellms(answer, wire)
    assert relay_plugin._fast_cost(answer, wire) == pytest.approx(theirs, rel=1e-9)


def test_a_registered_model_with_tiered_pricing_is_not_flat(monkeypatch, no_http_proxy):
    """A cost-map entry priced in ``tiered_pricing`` ranges (litellm prices the range the prompt falls
    in) has no "above_" key, so _flat_prices takes its base prices as flat."""
    monkeypatch.setattr(litellm, "model_cost", dict(litellm.model_cost))
    getattr(relay_plugin, "_COST_KEYS", {}).clear()
    litellm.register_model({"openai/relay-attack-tiered": {
        "litellm_provider": "openai", "mode": "chat", "input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6,
        "tiered_pricing": [{"range": [0, 500], "input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6},
                           {"range": [500, 1e9], "input_cost_per_token": 9e-6, "output_cost_per_token": 9e-6}]}})
    try:
        wire = _wire("relay-attack-tiered")
        answer = _read(wire, _openai("relay-attack-tiered"))
        assert relay_plugin._fast_cost(answer, wire) == pytest.approx(_litellms(answer, wire), rel=1e-9)
    finally:
        getattr(relay_plugin, "_COST_KEYS", {}).clear()


# =================================================================================================
# The breaker before the caller's budget: a refused caller holding a half-open breaker's probe
# =================================================================================================


def test_a_caller_the_key_budget_refuses_does_not_take_the_only_probe_from_a_caller_it_would_admit(monkeypatch):
    """RELAY_BREAKER_PROBES=1, the breaker half-open. Caller A's key budget is spent; caller B's is not.
    A arrives first: its permit (the single probe) is taken before its key budget is read, and the read
    awaits LiteLLM's spend counter (Redis in a multi-process proxy). Were the probe taken before that
    read, B, arriving meanwhile, would be refused skipped:breaker_open with no call to the secondary in
    flight, and A then refused key_budget: nobody would probe while over-budget callers keep arriving.
    A caller the key budget refuses must not touch the breaker."""
    import asyncio
    import sys
    import types

    from relay_plugin import CallerBooks, Outcome, RelayRun, SecondaryError
    from tests.support import FakeClock, FakeSecondary, make_handler

    reading = asyncio.Event()
    release = asyncio.Event()

    async def get_current_spend(counter_key, fallback_spend):
        reading.set()
        await release.wait()  # the spend counter is read over the network
        return fallback_spend

    monkeypatch.setitem(sys.modules, "litellm.proxy.proxy_server",
                        types.SimpleNamespace(get_current_spend=get_current_spend))
    clock = FakeClock()
    secondary = FakeSecondary("refined", cost=0.0)
    handler = make_handler(secondary, clock=clock, SECONDARY_MODEL="sec", RETRIES="0", BREAKER_MIN_CALLS="2",
                           BREAKER_WINDOW="2", BREAKER_FAILURE_RATE="0.5", BREAKER_COOLDOWN_S="30",
                           BREAKER_PROBES="1")
    monkeypatch.setattr(handler, "price", lambda model: (1e-6, 1e-6))
    messages = [{"role": "user", "content": "q"}]

    async def attempt(budgets):
        relay_plugin._BOOKS.set(CallerBooks("refine", True, {}, {}, budgets))
        run = RelayRun(handler, handler.config.plan, 0, Outcome("refine", "relayed", []))
        try:
            return await run._attempt("sec", messages)
        except SecondaryError as exc:
            return f"skipped:{exc.reason}"

    async def scenario():
        for _ in range(2):
            permit = await handler.store.breaker_acquire("sec", clock())
            await handler.store.breaker_record("sec", permit, True, clock())
        clock.advance(31)  # half-open now
        broke = asyncio.create_task(attempt((("key", "spend:key:a", 5.0, 5.0),)))   # spent all of 5 USD
        await reading.wait()
        rich = asyncio.create_task(attempt((("key", "spend:key:b", 0.0, 5.0),)))
        await asyncio.sleep(0)
        release.set()
        return await broke, await rich

    broke, rich = asyncio.run(scenario())
    assert broke == "skipped:key_budget"
    assert rich != "skipped:breaker_open", "caller B lost the probe to a caller its key budget refused"
    assert secondary.models == ["sec"]
