"""Third round of attacks on the fast path's cost (_fast_cost / _flat_prices / _streamed_answer), written
by an outside review against commit 891895a (deployment prices by the router's registered entry, the
flat-key allowlist, a stream keeping its chunk-named model and tier). Each test compares the fast cost
with what litellm's own call books for the same answer and deployment: completion_cost with the
arguments litellm's Logging.response_cost_calculator hands it (custom_pricing from
use_custom_pricing_for_model over the call's litellm_params and metadata.model_info, router_model_id
from the deployment's id, data_residency from the api_base host)."""

import uuid

import litellm
import pytest
from litellm.litellm_core_utils.litellm_logging import use_custom_pricing_for_model
from litellm.llms.openai.data_residency import infer_openai_data_residency

import relay_plugin
from tests.test_fast_cost_attacks import _read

MESSAGES = [{"role": "user", "content": "hi"}]


def _routed(model: str, model_info: dict | None = None, **params):
    """A deployment as the proxy's router holds it (registered in the cost map under its id) and its wire."""
    model_id = str(uuid.uuid4())
    router = litellm.Router(model_list=[{"model_name": "secondary", "model_info": {"id": model_id, **(model_info or {})},
                                         "litellm_params": {"model": model, "api_key": "sk-test", **params}}])
    deployment = router.get_deployment(model_id=model_id)
    deployment = {"litellm_params": deployment.litellm_params.model_dump(exclude_none=True),
                  "model_info": deployment.model_info.model_dump(exclude_none=True)}
    return deployment, relay_plugin._wire_call(deployment, MESSAGES, {})


def _openai(model: str, **top) -> dict:
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": model,
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "hi"}}],
            "usage": {"prompt_tokens": 1000, "completion_tokens": 500, "total_tokens": 1500}, **top}


def _books(answer, deployment, wire) -> float:
    """What litellm's call books: response_cost_calculator's arguments for this deployment."""
    info = deployment["model_info"]
    litellm_params = {**deployment["litellm_params"], "metadata": {"model_info": info}}
    return litellm.completion_cost(
        completion_response=answer, model=wire.backend, custom_llm_provider=wire.provider,
        base_model=info.get("base_model"), custom_pricing=use_custom_pricing_for_model(litellm_params),
        router_model_id=info["id"],
        data_residency=infer_openai_data_residency(wire.provider, deployment["litellm_params"].get("api_base")))


def test_a_model_info_label_naming_cost_is_no_price(cost_map):
    """(a) counts any model_info key containing "cost" or "pric" as a price the deployment states. A
    label such as ``cost_center`` (team bookkeeping, any key a proxy admin adds) is none: litellm's
    call prices without custom pricing, by the model the answer names (gpt-4o-2024-05-13, 5/15 USD
    per M). The fast path takes the custom-pricing branch, whose registered entry prices nothing, and
    books the deployment's gpt-4o (2.5/10): 0.0075 for 0.0125."""
    deployment, wire = _routed("openai/gpt-4o", {"cost_center": "research"})
    answer = _read(wire, _openai("gpt-4o-2024-05-13"))
    books = _books(answer, deployment, wire)
    assert books == pytest.approx(1000 * 5e-6 + 500 * 15e-6)
    assert relay_plugin._fast_cost(answer, wire) == pytest.approx(books, rel=1e-9)


def test_a_deployment_with_its_own_two_prices_served_at_priority_costs_what_litellm_books(cost_map):
    """A deployment stating only an input and an output price: the router registers it under its id
    with the backend model's service-tier prices inherited (_inherit_builtin_service_tier_pricing), and
    litellm's call (custom pricing) bills a priority-tier answer at gpt-4.1's priority rates (3.5/14
    per M). The fast path sends it to completion_cost with custom_cost_per_token, which knows no tier:
    the deployment's standard prices (2/8 here), 0.006 for 0.0105."""
    deployment, wire = _routed("openai/gpt-4.1", input_cost_per_token=2e-6, output_cost_per_token=8e-6)
    answer = _read(wire, _openai("gpt-4.1", service_tier="priority"))
    books = _books(answer, deployment, wire)
    assert books > 1000 * 2e-6 + 500 * 8e-6
    assert relay_plugin._fast_cost(answer, wire) == pytest.approx(books, rel=1e-9)


def test_an_eu_resident_deployment_costs_the_regional_uplift(cost_map):
    """(b) lets an entry be flat when every set key naming a cost or price is allowed; a regional
    processing uplift names neither (``regional_processing_uplift_multiplier_eu``: 1.1 on gpt-5.4).
    A deployment on OpenAI's EU host (api_base https://eu.api.openai.com/v1) is booked by litellm's
    call at 1.1 times the flat prices; the fast path books the flat prices, 10% less."""
    deployment, wire = _routed("openai/gpt-5.4", api_base="https://eu.api.openai.com/v1")
    answer = _read(wire, _openai("gpt-5.4"))
    books = _books(answer, deployment, wire)
    entry = litellm.model_cost["gpt-5.4"]
    assert books == pytest.approx(1.1 * (1000 * entry["input_cost_per_token"] + 500 * entry["output_cost_per_token"]))
    assert relay_plugin._fast_cost(answer, wire) == pytest.approx(books, rel=1e-9)


def test_a_stream_whose_chunks_name_different_models_costs_what_litellm_books(monkeypatch, cost_map):
    """(c) keeps the first model a chunk names (said.setdefault); the response litellm's streaming
    call assembles (stream_chunk_builder over the config iterator's chunks, the reference of the second
    review's stream tests) carries the last. A gateway whose first chunk names gpt-4o-mini and the rest
    gpt-4o-2024-05-13 is booked by litellm at 0.0125 and by the fast path at 0.00045."""
    from tests.test_fast_cost_attacks2 import _fast_stream_cost, _litellms_stream_cost, _openai_stream, _sse, _wire

    events = _openai_stream("gpt-4o-2024-05-13")
    events[0]["model"] = "gpt-4o-mini"
    wire = _wire("gpt-4o", stream=True)
    lines = _sse(events)
    theirs = _litellms_stream_cost(wire, lines)
    assert theirs == pytest.approx(1000 * 5e-6 + 500 * 15e-6)
    assert _fast_stream_cost(wire, lines, monkeypatch) == pytest.approx(theirs, rel=1e-9)
