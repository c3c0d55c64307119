"""Attacks on the fast path of a secondary call (relay_plugin, "Reaching a secondary") by a broken or
hostile provider: what the relay books, tells the router and reads."""

import asyncio
import gzip
import json

import litellm
import pytest

import relay_plugin
from relay_plugin import SecondaryError
from tests.conftest import FAKE_PROVIDER_KEY
from tests.test_fast_path import deployment, paths, proxy_router, serve  # noqa: F401 - fixtures

QUESTION = [{"role": "user", "content": "Say hello in a long answer, please."}]
PRICED = {"input_cost_per_token": 1e-6, "output_cost_per_token": 2e-6}


def chunk(piece=None, finish=None) -> bytes:
    choice = {"index": 0, "delta": {"content": piece} if piece else {}, "finish_reason": finish}
    return b"data: " + json.dumps({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-mini",
                                   "choices": [choice]}).encode() + b"\n\n"


async def no_usage_stream(request):
    """A stream that never sends usage (an OpenAI-compatible server ignoring stream_options)."""
    from aiohttp import web

    await request.read()
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    for piece in ["Hello", " there,", " friend."] * 20:
        await response.write(chunk(piece))
    await response.write(chunk(None, "stop") + b"data: [DONE]\n\n")
    return response


async def test_a_stream_without_usage_costs_what_litellms_full_call_books(proxy_router, serve):
    """A provider ignoring `include_usage` must not make fast-path streams free (it booked $0 and 0
    tokens: spend attribution and the USD cap's settle lost the call); the full call counts them."""
    proxy_router([deployment("nousage", await serve(no_usage_stream), **PRICED)])
    replies = {}
    for fast in (True, False):
        deltas = []

        async def on_delta(text):
            deltas.append(text)

        replies[fast] = await relay_plugin._litellm_complete("nousage", QUESTION, max_tokens=200, timeout=5, depth=1,
                                                             on_delta=on_delta, fast=fast)
        assert "".join(deltas) == replies[fast].text
    fast, full = replies[True], replies[False]
    assert full.output_tokens > 0 and full.cost_usd > 0  # the reference: litellm's stream_chunk_builder counts
    assert (fast.text, fast.output_tokens) == (full.text, full.output_tokens)
    assert abs(fast.prompt_tokens - full.prompt_tokens) <= 0.1 * full.prompt_tokens  # token_counter, same prompt
    assert fast.cost_usd == pytest.approx(full.cost_usd, rel=0.05)

async def hanging(request):
    from aiohttp import web

    await request.read()
    await asyncio.sleep(3)
    return web.json_response({})


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "full"])
async def test_a_hanging_deployment_is_cooled_down_like_a_failing_one(proxy_router, serve, sim, fast):
    """A deployment that never answers times out every relay call sent to it; the router must hear of
    it (as of any timed-out call) and stop sending it relay calls."""
    proxy_router([deployment("pair", await serve(hanging)), deployment("pair", sim.url + "/v1")],
                 allowed_fails=0, cooldown_time=120)
    failures = []
    for i in range(12):
        try:
            await relay_plugin._litellm_complete("pair", [{"role": "user", "content": f"Question {i}"}],
                                                 max_tokens=16, timeout=0.3, depth=1, fast=fast)
        except SecondaryError as exc:
            failures.append(exc.reason)
    assert len(failures) <= 2, failures
