"""Second round of attacks on the fast path's cost (_fast_cost / _plain_tokens / _flat_prices, and the
streamed answer they price, _streamed_answer), written by an outside review. Each test builds what the
fast path reads (a provider's raw JSON through the config's ``transform_response``, or a provider's SSE
lines through the config's own stream iterator) and asserts the promise: the fast cost is what
litellm's cost calculation gives that answer, for that deployment. The cost feeds the relay's caps,
the client's cost header and LiteLLM's spend books: an under-count is a cap that does not hold."""

import asyncio
import json
import uuid

import litellm
import pytest

import relay_plugin
from tests.test_fast_cost_attacks import _read

MESSAGES = [{"role": "user", "content": "hi"}]


def _wire(model: str, provider: str = "openai", stream: bool = False, **model_info) -> "relay_plugin._Wire":
    deployment = {"litellm_params": {"model": f"{provider}/{model}", "api_key": "sk-test"}, "model_info": model_info}
    return relay_plugin._wire_call(deployment, MESSAGES, {}, stream=stream)


def _openai(model: str, usage: dict | None = None, **top) -> dict:
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": model,
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "hi"}}],
            "usage": usage or {"prompt_tokens": 1000, "completion_tokens": 500, "total_tokens": 1500}, **top}


def _litellms(answer, wire) -> float:
    model = (wire.deployment.get("model_info") or {}).get("base_model") or wire.backend
    return litellm.completion_cost(completion_response=answer, model=model, custom_llm_provider=wire.provider)


# =================================================================================================
# The streamed answer: _streamed_answer rebuilds the answer from the text and two token counts
# =================================================================================================


class _Lines:
    def __init__(self, lines):
        self._lines = lines

    def __aiter__(self):
        async def each():
            for line in self._lines:
                yield line
        return each()


class _StreamedAnswer:
    """What ``_post`` gives _exchange_stream: an aiohttp response of SSE lines."""

    status = 200
    headers = {"content-type": "text/event-stream"}

    def __init__(self, lines):
        self.content = _Lines(lines)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        return False


def _sse(events: list) -> list[bytes]:
    lines = []
    for event in events:
        lines += [("data: " + (event if isinstance(event, str) else json.dumps(event)) + "\n").encode(), b"\n"]
    return lines


def _openai_stream(model: str, **top) -> list:
    chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": model, **top}
    return [{**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "hi"}, "finish_reason": None}]},
            {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
            {**chunk, "choices": [], "usage": {"prompt_tokens": 1000, "completion_tokens": 500, "total_tokens": 1500}},
            "[DONE]"]


def _fast_stream_cost(wire, lines, monkeypatch) -> float:
    monkeypatch.setattr(relay_plugin, "_post", lambda _wire, _timeout: _StreamedAnswer(lines))

    async def on_delta(text):
        return None

    answer = asyncio.run(relay_plugin._exchange_stream(wire, MESSAGES, 30, on_delta))
    return answer._hidden_params["response_cost"]


def _litellms_stream_cost(wire, lines) -> float:
    """What litellm's own streaming call books: the config iterator's chunks, assembled by
    stream_chunk_builder (the complete streaming response its logging prices), priced for the deployment."""
    async def chunks():
        async def text():
            for line in lines:
                if line.strip():
                    yield line.decode().strip()
        iterator = wire.config.get_model_response_iterator(streaming_response=text(), sync_stream=False, json_mode=False)
        return [chunk async for chunk in iterator]

    whole = litellm.stream_chunk_builder(chunks=asyncio.run(chunks()), messages=MESSAGES)
    return litellm.completion_cost(completion_response=whole, model=wire.backend, custom_llm_provider=wire.provider)


def test_a_streamed_answer_naming_a_dearer_model_costs_what_litellm_says(monkeypatch, no_http_proxy):
    """The first review's response.model attack, on the stream path. Every chunk of OpenAI's stream names
    the model that answered (an alias "gpt-4o" answered by gpt-4o-2024-05-13, 5/15 USD per M against
    2.5/10, or any model a gateway behind an openai/ deployment says it used); litellm's streaming call
    keeps it (provider_response_model, the assembled response's model) and prices it. Priced as the
    alias, it would be 0.0075 for 0.0125, a 40% under-count on every streamed call."""
    wire = _wire("gpt-4o", stream=True)
    lines = _sse(_openai_stream("gpt-4o-2024-05-13"))
    theirs = _litellms_stream_cost(wire, lines)
    assert relay_plugin._fast_cost(_read(_wire("gpt-4o"), _openai("gpt-4o-2024-05-13")), _wire("gpt-4o")) == (
        pytest.approx(theirs, rel=1e-9))  # the same answer, not streamed
    assert _fast_stream_cost(wire, lines, monkeypatch) == pytest.approx(theirs, rel=1e-9)


def test_a_streamed_answer_served_at_the_priority_tier_costs_what_litellm_says(monkeypatch, no_http_proxy):
    """The first review's service-tier attack, on the stream path. OpenAI's chunks carry the tier that
    served the call (``service_tier: "priority"``); litellm's assembled response keeps it and prices
    gpt-4.1's priority rates (3.5/14 USD per M against 2/8); at the standard rates it would be 0.006
    for 0.0105, a 43% under-count. (The streamed answer keeps only the usage's two token counts: cached
    prompt tokens are priced at the input rate, not the cache-read rate, an over-count.)"""
    wire = _wire("gpt-4.1", stream=True)
    lines = _sse(_openai_stream("gpt-4.1", service_tier="priority"))
    theirs = _litellms_stream_cost(wire, lines)
    assert relay_plugin._fast_cost(_read(_wire("gpt-4.1"), _openai("gpt-4.1", service_tier="priority")),
                                   _wire("gpt-4.1")) == pytest.approx(theirs, rel=1e-9)  # non-streamed: right
    assert _fast_stream_cost(wire, lines, monkeypatch) == pytest.approx(theirs, rel=1e-9)


# =================================================================================================
# Cost-map entries whose prices are not flat though no key says "above_" or "tier"
# =================================================================================================


def test_a_cost_map_entry_with_off_peak_pricing_is_not_flat(cost_map):
    """litellm's generic_cost_per_token swaps in the entry's ``off_peak_pricing`` rates while the current
    UTC time is inside one of its windows (DeepSeek's entries carry one; any registered model may).
    Taken as flat, the standard rates would be charged at any hour. The window here covers the whole
    day (start == end), so the test does not depend on the clock."""
    litellm.register_model({"openai/relay-attack-offpeak": {
        "litellm_provider": "openai", "mode": "chat", "input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6,
        "off_peak_pricing": {"hours_utc": "00:00-00:00", "input_cost_per_token": 5e-6, "output_cost_per_token": 9e-6}}})
    wire = _wire("relay-attack-offpeak")
    answer = _read(wire, _openai("relay-attack-offpeak"))
    theirs = _litellms(answer, wire)
    assert theirs == pytest.approx(1000 * 5e-6 + 500 * 9e-6)  # litellm: the off-peak rates
    assert relay_plugin._fast_cost(answer, wire) == pytest.approx(theirs, rel=1e-9)  # fast: 0.002 for 0.0095


# =================================================================================================
# The deployment's own prices: litellm's call books them all, the fast path two of them, or none
# =================================================================================================

#: model_info a deployment may carry (the fast path reads model_info whatever it holds), and what the
#: litellm's call does with it: the prices below are all in litellm's CustomPricingLiteLLMParams or its
#: deployment-scoped pricing fields, so litellm's call prices the deployment by its registered entry
DEPLOYMENT_PRICES = {
    # a long-context tier next to the custom flat prices: litellm applies it (tokens x the two flat
    # prices: 0.0075 for 0.015)
    "custom prices with a long-prompt tier": {
        "input_cost_per_token": 2.5e-6, "output_cost_per_token": 1e-5,
        "input_cost_per_token_above_500_tokens": 5e-6, "output_cost_per_token_above_500_tokens": 2e-5},
    # only the output price is the deployment's: litellm's call prices output at it (gpt-4o's
    # cost-map rates: 0.0075 for 0.025)
    "only an output price": {"output_cost_per_token": 5e-5},
    # a deployment-scoped off-peak block (use_custom_pricing_for_model names it): litellm's call
    # applies it; the cost map's shared entry never carries it
    "deployment-scoped off-peak pricing": {
        "off_peak_pricing": {"hours_utc": "00:00-00:00", "input_cost_per_token": 5e-6, "output_cost_per_token": 2e-5}},
}


@pytest.mark.parametrize("prices", DEPLOYMENT_PRICES.values(), ids=DEPLOYMENT_PRICES.keys())
def test_a_deployments_own_prices_cost_what_litellms_call_books(prices, cost_map):
    """The proxy's router registers each deployment's model_info (with its litellm_params prices) in the
    cost map under the deployment's id, and litellm's call prices an answer with custom_pricing and that
    id (response_cost_calculator: custom_pricing from use_custom_pricing_for_model, router_model_id from
    the hidden model_id). custom_cost_per_token of an input and an output price, or the cost map,
    would drop every other price the deployment states."""
    model_id = str(uuid.uuid4())
    router = litellm.Router(model_list=[{"model_name": "secondary", "model_info": {"id": model_id, **prices},
                                         "litellm_params": {"model": "openai/gpt-4o", "api_key": "sk-test"}}])
    deployment = router.get_deployment(model_id=model_id)
    wire = relay_plugin._wire_call({"litellm_params": deployment.litellm_params.model_dump(exclude_none=True),
                                    "model_info": deployment.model_info.model_dump(exclude_none=True)}, MESSAGES, {})
    answer = _read(wire, _openai("gpt-4o"))
    books = litellm.completion_cost(completion_response=answer, model=wire.backend, custom_llm_provider=wire.provider,
                                    custom_pricing=True, router_model_id=model_id)
    assert relay_plugin._fast_cost(answer, wire) == pytest.approx(books, rel=1e-9)
