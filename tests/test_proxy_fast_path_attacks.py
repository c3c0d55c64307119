"""Attacks on the fast path of a secondary call (relay_plugin, "Reaching a secondary") by a broken or
hostile provider: what the relay books, tells the router and reads."""

import asyncio
import gzip
import json

import pytest

import relay_plugin
from relay_plugin import SecondaryError
from tests import test_fast_path
from tests.test_fast_path import deployment

# the fast-path tests' fixtures: the proxy's router, a one-handler provider
proxy_router, serve = test_fast_path.proxy_router, test_fast_path.serve

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


async def test_a_stream_without_usage_costs_its_tokens(proxy_router, serve):
    """A provider ignoring `include_usage` must not make fast-path streams free (it booked $0 and 0
    tokens: spend attribution and the USD cap's settle lost the call). Unreported, they are booked at
    most at what the provider can bill: the prompt's offline bound, the answer's bytes within its limit."""
    proxy_router([deployment("nousage", await serve(no_usage_stream), **PRICED)])
    deltas = []

    async def on_delta(text):
        deltas.append(text)

    reply = await relay_plugin._litellm_complete("nousage", QUESTION, max_tokens=200, timeout=5, depth=1,
                                                 on_delta=on_delta)
    assert "".join(deltas) == reply.text and reply.text.startswith("Hello there")
    assert reply.prompt_tokens >= relay_plugin.prompt_token_bound(QUESTION)  # what was sent: the relay marks its calls
    assert reply.output_tokens == 200  # 420 bytes of text, at most the 200 tokens it was allowed
    assert reply.cost_usd == pytest.approx(reply.prompt_tokens * 1e-6 + 200 * 2e-6)

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


async def slow(request):
    from aiohttp import web

    await request.read()
    await asyncio.sleep(1.5)
    return web.json_response({"id": "c1", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
                              "choices": [{"index": 0, "finish_reason": "stop",
                                           "message": {"role": "assistant", "content": "Fine."}}],
                              "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}})


@pytest.mark.parametrize("full_path", ["", "*"], ids=["fast", "full"])
async def test_a_deadline_a_client_runs_down_does_not_cool_a_healthy_deployment_down(proxy_router, serve, full_path,
                                                                                     monkeypatch):
    """A request whose deadline is nearly spent (a slow primary, a long prompt) leaves its secondary
    call a sliver of RELAY_TIMEOUT_S. That cut is the request's, not the deployment's: the router must
    not cool a healthy (if slow) deployment down for it, or any client could take it out of rotation
    for everyone, primaries included."""
    import time

    from tests.test_unit_resilience import MODEL, config, relay

    proxy_router([deployment(MODEL, await serve(slow))], allowed_fails=0, cooldown_time=120)
    handler = relay_plugin.RelayHandler(config(DEADLINE_S="5", TIMEOUT_S="5", FULL_PATH_MODELS=full_path),
                                        clock=time.monotonic)
    call = relay_plugin.RelayRun.call

    async def late(run, *args, **kwargs):  # the secondary call starts with 0.4 s of the deadline left
        run.deadline_at = min(run.deadline_at, time.monotonic() + 0.4)
        return await call(run, *args, **kwargs)

    monkeypatch.setattr(relay_plugin.RelayRun, "call", late)
    for _ in range(3):
        outcome, _response = await relay(handler)
        assert outcome.result == "failed:timeout", outcome
    reply = await relay_plugin._litellm_complete(MODEL, QUESTION, max_tokens=16, timeout=5, depth=1)
    assert reply.text == "Fine."  # not "every deployment is cooling down"


async def endless_line(request, bomb=False):
    """A stream whose one line never ends (no newline), plain or as a gzip bomb."""
    from aiohttp import web

    await request.read()
    response = web.StreamResponse(headers={"content-type": "text/event-stream",
                                           **({"content-encoding": "gzip"} if bomb else {})})
    await response.prepare(request)
    if bomb:
        await response.write(gzip.compress(b"x" * (64 * 1024 * 1024), 9))
    else:
        for _ in range(64):
            await response.write(b"x" * 65536)
    return response


@pytest.mark.parametrize("bomb", [False, True], ids=["plain", "gzip"])
async def test_a_stream_line_without_end_is_a_bad_response_not_retried(proxy_router, serve, bomb):
    """An answer too long to read is the provider's fault on every try (a retry bills it again): a
    stream's endless line is a bad_response, as an oversized whole answer is, not a retryable
    connection failure."""
    async def handler(request):
        return await endless_line(request, bomb)

    proxy_router([deployment("long", await serve(handler))])

    async def on_delta(text):
        pass

    with pytest.raises(SecondaryError) as failed:
        await relay_plugin._litellm_complete("long", QUESTION, max_tokens=16, timeout=10, depth=1, on_delta=on_delta)
    assert failed.value.reason == "bad_response" and not failed.value.retryable
