"""The fast path of a secondary call (relay_plugin, section "Reaching a secondary"), in-process.

- per provider it covers, the recorded cassettes replayed through the proxy's router: the same
  request body and URL as litellm's full call (vcr matches them), the same answer, usage and cost,
  and no full litellm call made;
- it falls back cleanly: a provider it does not cover, and a provider config that breaks while the
  request is built, are answered by litellm's full call;
- the router hears of every relay call on every path: a dead deployment next to a good one is
  cooled down (issue 13: 11 of 30 relay calls failed when `no-log` silenced the router);
- router fallbacks, RELAY_FULL_PATH_MODELS, typed failures, an oversized answer, keys in errors.
"""

import asyncio
import json
import socket
import sys
from types import SimpleNamespace

import litellm
import pytest

import relay_plugin
from relay_plugin import SecondaryError
from tests import cassette_support as cs
from tests.proxy_support import FAKE_PROVIDER_KEY
from tests.test_cassettes import no_network, replaying  # noqa: F401 - the cassette tests' network guard


async def bookkeeping_done() -> None:
    """Wait for the bookkeeping the relay runs after a call's answer (its booking, the router's counters)."""
    while relay_plugin._BOOKING:
        await asyncio.gather(*list(relay_plugin._BOOKING))

#: the providers the fast path covers, by cassette provider name
FAST = [name for name, p in cs.PROVIDERS.items() if p.model.split("/", 1)[0] in relay_plugin.FAST_PROVIDERS]
#: those it leaves to litellm's full call
FULL = [name for name in cs.PROVIDERS if name not in FAST]
QUESTION = [{"role": "user", "content": "Say hello."}]


def test_the_fast_path_covers_the_common_providers():
    assert set(FAST) >= {"openai", "anthropic", "ollama", "mistral"}
    assert set(FULL) >= {"gemini", "bedrock"}


@pytest.fixture
def paths(monkeypatch):
    """Counts the calls each path made: ``fast`` (one HTTP exchange) and ``full`` (litellm.acompletion)."""
    counts = {"fast": 0, "full": 0}
    exchange, stream, acompletion = relay_plugin._exchange, relay_plugin._exchange_stream, litellm.acompletion

    async def fast(*args, **kwargs):
        counts["fast"] += 1
        return await exchange(*args, **kwargs)

    async def fast_stream(*args, **kwargs):
        counts["fast"] += 1
        return await stream(*args, **kwargs)

    async def full(*args, **kwargs):
        counts["full"] += 1
        return await acompletion(*args, **kwargs)

    monkeypatch.setattr(relay_plugin, "_exchange", fast)
    monkeypatch.setattr(relay_plugin, "_exchange_stream", fast_stream)
    monkeypatch.setattr(litellm, "acompletion", full)
    return counts


@pytest.fixture
def proxy_router(monkeypatch):
    """Install a litellm Router as the running proxy's router (what `_proxy_router()` finds)."""

    def install(model_list: list[dict], **settings) -> litellm.Router:
        router = litellm.Router(model_list=model_list, **settings)
        proxy = SimpleNamespace(llm_router=router, master_key=None)
        monkeypatch.setitem(sys.modules, "litellm.proxy.proxy_server", proxy)
        return router

    return install


@pytest.fixture
def via_router(monkeypatch, proxy_router):
    """The cassette scenarios with the secondary as a ``model_name`` of the proxy's router."""
    relay_env = cs.relay_env

    def install(provider: cs.Provider) -> None:
        proxy_router([{"model_name": "secondary", "litellm_params": {"model": provider.model}}])
        monkeypatch.setattr(cs, "relay_env",
                            lambda p, case: {**relay_env(p, case), "RELAY_SECONDARY_MODEL": "secondary"})

    return install


# =================================================================================================
# Cassettes, per provider the fast path covers
# =================================================================================================


@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("case", ["plain", "judge_schema"])
async def test_through_the_router_the_fast_path_sends_what_litellm_sends_and_reads_the_answer(name, case, via_router,
                                                                                              paths):
    provider = cs.PROVIDERS[name]
    via_router(provider)
    wire = cs.wire_reply(provider, cs.cassette_path(name, case))
    with replaying(provider, case):  # vcr matches method, URL, query and JSON body
        run = await cs.run_relay(provider, case)

    assert run.headers["x-relay-outcome"] == ("modified" if case == "plain" else "blocked"), run.headers
    assert run.headers["x-relay-secondary-model"] == "secondary"
    expected = wire.text if case == "plain" else relay_plugin.DEFAULT_GUARD_MESSAGE
    assert run.text == expected
    assert run.cost == pytest.approx(cs.expected_cost(provider, wire), abs=1e-8)
    assert paths == {"fast": 1, "full": 0}


@pytest.mark.parametrize("name", FAST)
async def test_a_provider_error_on_the_fast_path_is_typed_and_retried_like_litellms(name, via_router, paths):
    provider = cs.PROVIDERS[name]
    via_router(provider)
    with replaying(provider, "error"):
        run = await cs.run_relay(provider, "error")

    wanted = "failed:rate_limited" if provider.error_status == 429 else "failed:provider_error"
    assert run.headers["x-relay-outcome"] == wanted
    assert run.text == cs.relay_case(provider, "error").primary_answer
    assert run.cost == 0.0
    assert paths == {"fast": 2, "full": 0}  # the first attempt and the relay's one retry


@pytest.mark.parametrize("name", FAST)
async def test_a_provider_model_string_takes_the_fast_path_too(name, paths):
    provider = cs.PROVIDERS[name]
    with replaying(provider, "plain"):
        run = await cs.run_relay(provider, "plain")
    assert run.headers["x-relay-outcome"] == "modified"
    assert paths == {"fast": 1, "full": 0}


#: the providers whose streams the fast path reads (litellm's chat config has a stream iterator for them)
STREAMED = [name for name in FAST if name != "anthropic"]


def test_a_stream_litellm_reads_with_a_handler_of_its_own_takes_the_full_call():
    deployment = {"litellm_params": {"model": cs.PROVIDERS["anthropic"].model, "api_key": "sk-ant-x"}, "model_info": {}}
    assert relay_plugin._wire_call(deployment, QUESTION, {"max_tokens": 8}).provider == "anthropic"
    with pytest.raises(relay_plugin._NoFastPath):
        relay_plugin._wire_call(deployment, QUESTION, {"max_tokens": 8}, stream=True)


@pytest.mark.parametrize("name", STREAMED)
@pytest.mark.parametrize("routed", [True, False], ids=["router", "provider-string"])
async def test_a_streamed_secondary_gives_the_providers_deltas_text_usage_and_cost(name, routed, proxy_router, paths):
    provider = cs.PROVIDERS[name]
    if routed:
        proxy_router([{"model_name": "secondary", "litellm_params": {"model": provider.model}}])
    wire = cs.wire_reply(provider, cs.cassette_path(name, "stream"))
    deltas = []

    async def on_delta(text):
        deltas.append(text)

    with replaying(provider, "stream"):  # the request litellm's own streaming call recorded
        reply = await relay_plugin._litellm_complete(
            "secondary" if routed else provider.model, [{"role": "user", "content": cs.STREAM_PROMPT}], max_tokens=64,
            timeout=30, depth=1, on_delta=on_delta)

    assert len(deltas) > 1 and "".join(deltas) == reply.text == wire.text
    assert (reply.prompt_tokens, reply.output_tokens) == (wire.input_tokens, wire.output_tokens)
    assert reply.cost_usd == pytest.approx(cs.expected_cost(provider, wire), abs=1e-8)
    assert paths == {"fast": 1, "full": 0}


# =================================================================================================
# Falling back to litellm's full call
# =================================================================================================


@pytest.mark.parametrize("name", FULL)
async def test_a_provider_the_fast_path_does_not_cover_is_answered_by_litellms_full_call(name, via_router, paths):
    provider = cs.PROVIDERS[name]
    via_router(provider)
    wire = cs.wire_reply(provider, cs.cassette_path(name, "plain"))
    with replaying(provider, "plain"):
        run = await cs.run_relay(provider, "plain")

    assert run.headers["x-relay-outcome"] == "modified"
    assert run.text == wire.text
    assert run.cost == pytest.approx(cs.expected_cost(provider, wire), abs=1e-8)
    assert paths == {"fast": 0, "full": 1}


@pytest.mark.parametrize("routed", [True, False], ids=["router", "provider-string"])
async def test_a_provider_config_that_breaks_while_building_the_request_hands_the_call_to_litellm(
        routed, via_router, paths, monkeypatch):
    provider = cs.PROVIDERS["anthropic"]
    if routed:
        via_router(provider)
    config = type(litellm.utils.ProviderConfigManager.get_provider_chat_config(
        model="claude-haiku-4-5-20251001", provider=litellm.LlmProviders.ANTHROPIC))
    broken = []

    def get_complete_url(self, *args, **kwargs):  # only the fast path asks the config for the URL
        broken.append(True)
        raise RuntimeError("a provider config that changed under the fast path")

    monkeypatch.setattr(config, "get_complete_url", get_complete_url)
    wire = cs.wire_reply(provider, cs.cassette_path("anthropic", "plain"))
    with replaying(provider, "plain"):
        run = await cs.run_relay(provider, "plain")

    assert broken, "the fast path never tried"
    assert run.headers["x-relay-outcome"] == "modified"
    assert run.text == wire.text
    assert run.cost == pytest.approx(cs.expected_cost(provider, wire), abs=1e-8)
    assert paths == {"fast": 0, "full": 1}


async def test_a_provider_config_whose_methods_take_other_arguments_is_left_to_litellm(via_router, paths, monkeypatch):
    """litellm's BaseConfig signatures change between releases: found out before anything is sent."""
    provider = cs.PROVIDERS["openai"]
    via_router(provider)
    config = type(litellm.utils.ProviderConfigManager.get_provider_chat_config(
        model="gpt-4o-mini", provider=litellm.LlmProviders.OPENAI))

    def transform_response(self, raw_response, *, renamed):  # a release that renamed what the fast path passes
        raise AssertionError("the fast path must not call a method it cannot call right")

    monkeypatch.setattr(config, "transform_response", transform_response)
    monkeypatch.setattr(relay_plugin, "_CONFIG_CHECKED", {})
    wire = cs.wire_reply(provider, cs.cassette_path("openai", "plain"))
    with replaying(provider, "plain"):
        run = await cs.run_relay(provider, "plain")
    assert run.headers["x-relay-outcome"] == "modified" and run.text == wire.text
    assert paths == {"fast": 0, "full": 1}


async def test_a_deployment_setting_the_fast_path_does_not_know_takes_the_full_call(proxy_router, paths, sim):
    proxy_router([{"model_name": "sec", "litellm_params": {
        "model": "openai/gpt-4o-mini", "api_base": sim.url + "/v1", "api_key": FAKE_PROVIDER_KEY,
        "extra_headers": {"x-operator": "1"}}}])
    reply = await relay_plugin._litellm_complete("sec", QUESTION, max_tokens=16, timeout=5, depth=1)
    assert reply.text and paths == {"fast": 0, "full": 1}


async def test_relay_full_path_models_sends_a_model_through_litellms_full_call(proxy_router, paths, sim):
    proxy_router([{"model_name": "sec", "litellm_params": {
        "model": "openai/gpt-4o-mini", "api_base": sim.url + "/v1", "api_key": FAKE_PROVIDER_KEY}}])
    config = relay_plugin.RelayConfig.from_env({"RELAY_SECONDARY_MODEL": "sec", "RELAY_FULL_PATH_MODELS": "se*"})
    handler = relay_plugin.RelayHandler(config)
    run = relay_plugin.RelayRun(handler, config.plan, 0, relay_plugin.Outcome("refine", "relayed", []))
    reply = await run.call("sec", QUESTION)
    assert reply.text and paths == {"fast": 0, "full": 1}
    assert relay_plugin.RelayConfig.from_env({"RELAY_SECONDARY_MODEL": "sec"}).full_path_models == ()


# =================================================================================================
# The router hears of every relay call
# =================================================================================================


@pytest.fixture
async def serve():
    """Serve one aiohttp handler on /v1/chat/completions; returns the base URL (``.../v1``)."""
    from aiohttp import web

    runners = []

    async def start(handler) -> str:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        return f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/v1"

    yield start
    for runner in runners:
        await runner.cleanup()


async def failing(request):
    from aiohttp import web

    await request.read()
    return web.json_response({"error": {"message": "the deployment is broken", "type": "server_error"}}, status=500)


def deployment(name: str, api_base: str, **params) -> dict:
    """A model_list entry of an OpenAI-compatible deployment at ``api_base``."""
    return {"model_name": name, "litellm_params": {
        "model": "openai/gpt-4o-mini", "api_base": api_base, "api_key": FAKE_PROVIDER_KEY, **params}}


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(params=["none", "caller"])
def attribution(request):
    """RELAY_SPEND_ATTRIBUTION: `none` (no-log, which silenced the router) or `caller` (booked)."""
    books = relay_plugin.CallerBooks("refine", True, {"user_api_key_hash": "hash-of-a-key"}, {}) \
        if request.param == "caller" else None
    token = relay_plugin._BOOKS.set(books)
    yield request.param
    relay_plugin._BOOKS.reset(token)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "full"])
async def test_relay_calls_cool_a_failing_deployment_down_like_any_call(proxy_router, sim, serve, attribution, fast):
    dead = await serve(failing)
    proxy_router([
        deployment("pair", dead), deployment("pair", sim.url + "/v1"),
    ], allowed_fails=0, cooldown_time=120)
    failures = []
    for i in range(30):
        try:
            await relay_plugin._litellm_complete("pair", [{"role": "user", "content": f"Question {i}"}], max_tokens=16,
                                                 timeout=5, depth=1, fast=fast)
        except SecondaryError as exc:
            failures.append(exc.reason)
    # the first failure cools the failing deployment down (allowed_fails=0), so every later call goes to
    # the good one. With `no-log` silencing the router, about half of the 30 failed (issue 13: 11 of 30).
    assert len(failures) <= 2, failures
    assert set(failures) <= {"provider_error"}


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "full"])
async def test_a_deployment_s_own_cooldown_time_of_zero_keeps_it_in_rotation(proxy_router, sim, serve, attribution,
                                                                             fast):
    """The router hears what litellm tells it, the deployment's settings included: `cooldown_time: 0`."""
    proxy_router([deployment("pair", await serve(failing), cooldown_time=0), deployment("pair", sim.url + "/v1")],
                 allowed_fails=0, cooldown_time=120)
    failures = 0
    for i in range(30):
        try:
            await relay_plugin._litellm_complete("pair", [{"role": "user", "content": f"Question {i}"}], max_tokens=16,
                                                 timeout=5, depth=1, fast=fast)
        except SecondaryError:
            failures += 1
    assert failures >= 5  # about half: the failing deployment is never cooled down


async def test_a_stream_cut_at_its_limit_says_so(proxy_router, serve):
    from aiohttp import web

    async def cut(request):
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        for piece, finish in (("Paris is", None), (" the", None), (None, "length")):
            choice = {"index": 0, "delta": {"content": piece} if piece else {}, "finish_reason": finish}
            chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-mini",
                     "choices": [choice]}
            await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        usage = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
        await response.write(b"data: " + json.dumps({"id": "c1", "object": "chat.completion.chunk", "created": 1,
                                                      "model": "gpt-4o-mini", "choices": [], "usage": usage}).encode()
                             + b"\n\ndata: [DONE]\n\n")
        return response

    proxy_router([deployment("cut", await serve(cut))])
    deltas = []

    async def on_delta(text):
        deltas.append(text)

    reply = await relay_plugin._litellm_complete("cut", QUESTION, max_tokens=3, timeout=5, depth=1, on_delta=on_delta)
    assert "".join(deltas) == reply.text == "Paris is the"
    assert reply.truncated and (reply.prompt_tokens, reply.output_tokens) == (5, 3)


async def test_router_fallbacks_answer_when_the_whole_group_fails(proxy_router, sim, serve, paths):
    dead = await serve(failing)
    proxy_router([
        deployment("only-dead", dead), deployment("backup", sim.url + "/v1"),
    ], fallbacks=[{"only-dead": ["backup"]}])
    reply = await relay_plugin._litellm_complete("only-dead", QUESTION, max_tokens=16, timeout=5, depth=1)
    assert reply.text
    assert paths == {"fast": 2, "full": 0}  # the dead deployment, then the fallback group, both on the fast path


async def test_the_router_usage_counters_count_fast_path_calls(proxy_router, sim):
    router = proxy_router([deployment("limited", sim.url + "/v1", rpm=1000, tpm=10**6)])
    for _ in range(3):
        await relay_plugin._litellm_complete("limited", QUESTION, max_tokens=16, timeout=5, depth=1)
    await bookkeeping_done()  # a success is told to the router after the answer, as litellm's own logging does
    model_id = router.get_model_list(model_name="limited")[0]["model_info"]["id"]
    rpm = [v for k, v in router.cache.in_memory_cache.cache_dict.items() if model_id in k and ":rpm:" in k]
    tpm = [v for k, v in router.cache.in_memory_cache.cache_dict.items() if model_id in k and ":tpm:" in k]
    assert rpm == [3] and tpm and tpm[0] > 0



async def test_each_relay_call_counts_once_among_its_deployments_successes(proxy_router, sim, attribution):
    """The router's successes of the minute (what its cooldown weighs failures against) count every relay
    call once, booked or not, on a deployment without rpm/tpm limits, where a booked call's success is
    told to the router apart from litellm's logging of it."""
    router = proxy_router([deployment("plain", sim.url + "/v1")])
    for _ in range(3):
        await relay_plugin._litellm_complete("plain", QUESTION, max_tokens=16, timeout=5, depth=1)
    await bookkeeping_done()
    model_id = router.get_model_list(model_name="plain")[0]["model_info"]["id"]
    assert router.cache.get_cache(key=f"{model_id}:successes", local_only=True) == 3


async def test_a_deployment_updated_under_its_id_to_take_an_rpm_limit_has_its_relay_calls_counted(proxy_router, sim,
                                                                                                   attribution):
    """A model edited in place (`/model/update`, an explicit `model_info.id`) keeps its id: the relay's
    memory of "no limits, nothing to count" must not outlive the limit it gains."""
    from litellm.types.router import Deployment

    plain = {**deployment("edited", sim.url + "/v1"), "model_info": {"id": "edited-1"}}
    router = proxy_router([plain])
    await relay_plugin._litellm_complete("edited", QUESTION, max_tokens=16, timeout=5, depth=1)
    await bookkeeping_done()
    limited = {**plain, "litellm_params": {**plain["litellm_params"], "rpm": 1000}}
    router.upsert_deployment(Deployment(**limited))
    for _ in range(2):
        await relay_plugin._litellm_complete("edited", QUESTION, max_tokens=16, timeout=5, depth=1)
    await bookkeeping_done()
    assert [v for k, v in router.cache.in_memory_cache.cache_dict.items() if "edited-1" in k and ":rpm:" in k] == [2]


async def test_a_deployments_rpm_limit_counts_a_relay_call_before_the_routers_next_pick(proxy_router, serve, attribution,
                                                                                        monkeypatch):
    """Usage-based routing keeps a deployment under its rpm limit only if each call is counted before the
    router picks a deployment for the next one, as litellm's own call is. Counted BOOKKEEPING_DELAY_S
    after the answer, 40 relay calls in a row put 6 to 21 on a deployment allowed 3 a minute (either attribution)."""
    from aiohttp import web

    hits = {"limited": 0, "roomy": 0}

    def answering(name):
        async def answer(request):
            await request.read()
            hits[name] += 1
            return web.json_response({"id": "c1", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
                                      "choices": [{"index": 0, "finish_reason": "stop",
                                                   "message": {"role": "assistant", "content": "Paris."}}],
                                      "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}})
        return answer

    monkeypatch.setattr(litellm, "callbacks", list(litellm.callbacks))  # the router's strategy is registered there
    router = proxy_router([deployment("pair", await serve(answering("limited")), rpm=3),
                           deployment("pair", await serve(answering("roomy")), rpm=1000)],
                          routing_strategy="usage-based-routing")
    # where litellm's logging finds the strategy once any full call ran, as on a proxy after its first request
    monkeypatch.setattr(litellm, "_async_success_callback", [*litellm._async_success_callback, router.lowesttpm_logger])
    import time

    minutes = {time.strftime("%H-%M")}  # the router counts usage per wall-clock minute
    for i in range(40):
        await relay_plugin._litellm_complete("pair", [{"role": "user", "content": f"Question {i}"}], max_tokens=16,
                                             timeout=5, depth=1)
    await bookkeeping_done()
    minutes.add(time.strftime("%H-%M"))
    allowed = 3 * len(minutes)  # 3 a minute: 6 when the calls straddled a minute's end
    assert hits["limited"] <= allowed and hits["roomy"] >= 40 - allowed, hits


async def test_a_client_leaving_while_a_rate_limited_deployments_call_is_booked_leaves_it_booked(proxy_router, sim,
                                                                                                 monkeypatch):
    """A call on a deployment with rpm/tpm limits is booked before the call returns; a client that leaves
    then (a stream's last delta read, the connection closed) cancels the request, not the booking of a call
    its provider billed."""
    from litellm.integrations.custom_logger import CustomLogger

    class SlowRecorder(CustomLogger):  # a logging callback that takes its time (a database, an exporter)
        def __init__(self):
            super().__init__()
            self.started, self.booked = asyncio.Event(), 0

        async def async_log_success_event(self, kwargs, response_obj, start_time, end_time):
            self.started.set()
            await asyncio.sleep(0.2)
            self.booked += 1

    recorder = SlowRecorder()
    monkeypatch.setattr(litellm, "_async_success_callback", [*litellm._async_success_callback, recorder])
    proxy_router([deployment("limited", sim.url + "/v1", rpm=1000)])
    books = relay_plugin._BOOKS.set(relay_plugin.CallerBooks("refine", True, {"user_api_key_hash": "hash-of-a-key"}, {}))
    try:
        request = asyncio.ensure_future(relay_plugin._litellm_complete("limited", QUESTION, max_tokens=16, timeout=5,
                                                                       depth=1))
        await asyncio.wait_for(recorder.started.wait(), 5)  # answered, being booked
        request.cancel()  # the client leaves
        with pytest.raises(asyncio.CancelledError):
            await request
    finally:
        relay_plugin._BOOKS.reset(books)
    await bookkeeping_done()
    assert recorder.booked == 1


async def test_the_latency_told_of_a_call_is_its_own_not_the_wait_for_its_bookkeeping(proxy_router, sim, attribution,
                                                                                       monkeypatch):
    """The bookkeeping of an answered call runs after the request's own work (its booking, or the router's
    counters): the latency it tells the router (lowest-latency routing) and the books (spend row, span) must
    be the call's, not the call's plus however long the request kept the event loop busy afterwards."""
    import time

    monkeypatch.setattr(litellm, "callbacks", list(litellm.callbacks))  # the router's selector is registered there
    router = proxy_router([deployment("timed", sim.url + "/v1")], routing_strategy="latency-based-routing")
    # where litellm's logging finds it once any full call ran (function_setup), as on a proxy after its first request
    monkeypatch.setattr(litellm, "_async_success_callback", [*litellm._async_success_callback, router.lowestlatency_logger])
    took = time.monotonic()
    reply = await relay_plugin._litellm_complete("timed", QUESTION, max_tokens=16, timeout=5, depth=1)
    took = time.monotonic() - took
    time.sleep(1.0)  # the request's own work after the answer (a big answer, a busy proxy) holds the loop
    await bookkeeping_done()
    model_id = router.get_model_list(model_name="timed")[0]["model_info"]["id"]
    latencies = (await router.cache.async_get_cache(key="timed_map", local_only=True) or {}).get(model_id, {})
    assert latencies.get("latency"), latencies  # the router heard of the call
    told = latencies["latency"][0] * (reply.output_tokens or 1)  # seconds per output token, as litellm records it
    assert told <= took + 0.2, (told, took)



async def test_a_provider_string_call_is_booked_with_its_own_end_not_its_bookings(sim, monkeypatch):
    """The same for a ``provider/model`` secondary (no router): its booking (spend row, span) ends when
    its answer came, however long the request held the event loop before the booking ran."""
    import time

    from litellm.integrations.custom_logger import CustomLogger

    class Recorder(CustomLogger):
        def __init__(self):
            super().__init__()
            self.spans = []

        async def async_log_success_event(self, kwargs, response_obj, start_time, end_time):
            self.spans.append((end_time - start_time).total_seconds())

    recorder = Recorder()
    monkeypatch.setattr(litellm, "_async_success_callback", [*litellm._async_success_callback, recorder])
    token = relay_plugin._BOOKS.set(relay_plugin.CallerBooks("refine", True, {"user_api_key_hash": "hash-of-a-key"}, {}))
    try:
        monkeypatch.setenv("OPENAI_API_KEY", FAKE_PROVIDER_KEY)
        monkeypatch.setenv("OPENAI_BASE_URL", sim.url + "/v1")
        took = time.monotonic()
        await relay_plugin._litellm_complete("openai/gpt-4o-mini", QUESTION, max_tokens=16, timeout=5, depth=1)
        took = time.monotonic() - took
    finally:
        relay_plugin._BOOKS.reset(token)
    time.sleep(1.0)  # the request's own work after the answer holds the loop
    await bookkeeping_done()
    assert recorder.spans and recorder.spans[0] <= took + 0.2, (recorder.spans, took)


def _success_counter(monkeypatch):
    """A logging callback that counts the successes litellm's logging books (as the proxy's callbacks are
    reached: litellm's async success callbacks)."""
    from litellm.integrations.custom_logger import CustomLogger

    class Recorder(CustomLogger):
        def __init__(self):
            super().__init__()
            self.booked = 0

        async def async_log_success_event(self, kwargs, response_obj, start_time, end_time):
            self.booked += 1

    recorder = Recorder()
    monkeypatch.setattr(litellm, "_async_success_callback", [*litellm._async_success_callback, recorder])
    return recorder


async def test_an_answered_calls_bookkeeping_waits_until_the_answer_has_left(proxy_router, sim, monkeypatch):
    """The booking of an answered call (litellm's logging: ~3 ms of CPU) must not run on the event loop
    while the proxy is still writing the relay's answer: it waits BOOKKEEPING_DELAY_S, then books."""
    recorder = _success_counter(monkeypatch)
    proxy_router([deployment("booked", sim.url + "/v1")])
    token = relay_plugin._BOOKS.set(relay_plugin.CallerBooks("refine", True, {"user_api_key_hash": "hash-of-a-key"}, {}))
    try:
        await relay_plugin._litellm_complete("booked", QUESTION, max_tokens=16, timeout=5, depth=1)
    finally:
        relay_plugin._BOOKS.reset(token)
    for _ in range(50):  # the proxy writing the answer: its awaits give the loop many turns
        await asyncio.sleep(0)
    assert recorder.booked == 0 and relay_plugin._BOOKING
    await bookkeeping_done()
    assert recorder.booked == 1


def test_a_call_answered_just_before_the_event_loop_ends_is_still_booked(proxy_router, sim, monkeypatch):
    """A proxy stopped gracefully (SIGTERM: a deploy, a scale-down) lets the requests in flight finish, then
    its event loop ends: uvicorn's asyncio.run cancels every task left. A secondary call answered in the
    last BOOKKEEPING_DELAY_S before that was billed by its provider and its text went to the client: its
    booking (spend row, key spend, every logging callback) must run, not be cancelled in its wait
    (litellm's own logging of a call answered then still runs: its queue is flushed at exit)."""
    recorder = _success_counter(monkeypatch)
    proxy_router([deployment("booked", sim.url + "/v1")])

    async def answer_then_stop():
        books = relay_plugin._BOOKS.set(relay_plugin.CallerBooks("refine", True, {"user_api_key_hash": "hash-of-a-key"}, {}))
        try:
            await relay_plugin._litellm_complete("booked", QUESTION, max_tokens=16, timeout=5, depth=1)
        finally:
            relay_plugin._BOOKS.reset(books)
        for loop, session in relay_plugin._SESSION:  # this loop's connections close with it, as a proxy's do
            if loop is asyncio.get_running_loop():
                await session.close()
        # the answer has left: the server finds no request left and returns

    asyncio.run(answer_then_stop())  # as uvicorn runs the proxy: the loop's end cancels what is left
    assert recorder.booked == 1
    assert not relay_plugin._BOOKING


def test_bookkeeping_that_hangs_as_the_event_loop_ends_does_not_hold_the_proxy_up(monkeypatch):
    """Booking at the loop's end is bounded (BOOKKEEPING_AT_EXIT_S): a logging callback that never returns
    (a dead exporter) must not keep a stopping proxy from exiting."""
    import time

    monkeypatch.setattr(relay_plugin, "BOOKKEEPING_AT_EXIT_S", 0.2)

    async def answer_then_stop():
        relay_plugin._after_answer(asyncio.Event().wait())  # bookkeeping that never ends
        await asyncio.sleep(0)  # it began its wait

    took = time.monotonic()
    asyncio.run(answer_then_stop())
    assert time.monotonic() - took < 3.0
    assert not relay_plugin._BOOKING


async def test_bookkeeping_still_waiting_when_the_loop_stops_is_dropped_cleanly():
    """A proxy shutting down cancels bookkeeping that has not started: it is closed, never run, and
    not left behind as a coroutine "never awaited" (a warning in the operator's log)."""
    import inspect

    ran = []

    async def bookkeeping():
        ran.append(True)

    coro = bookkeeping()
    relay_plugin._after_answer(coro)
    pending = list(relay_plugin._BOOKING)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    assert not ran and not relay_plugin._BOOKING
    assert inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED


# =================================================================================================
# What a broken or hostile provider can do
# =================================================================================================


@pytest.mark.parametrize("stream", [False, True])
async def test_a_connection_that_times_out_never_reached_the_provider_and_is_a_connection_failure(
        proxy_router, monkeypatch, stream):
    """aiohttp's ConnectionTimeoutError (the connect itself ran out of time, a blackholed host) is a
    connection failure, which nothing billed, not a timeout, whose provider may bill the answer: the
    relay's caps give a connection failure's reservation back and keep a timeout's."""
    import aiohttp

    class NoConnection:
        async def __aenter__(self):
            raise aiohttp.ConnectionTimeoutError("Connection timeout to host http://10.255.255.1/v1")

        async def __aexit__(self, *exc):
            return False

    monkeypatch.setattr(relay_plugin, "_post", lambda wire, timeout: NoConnection())
    proxy_router([deployment("blackholed", "http://10.255.255.1/v1")])
    with pytest.raises(SecondaryError) as failed:
        await relay_plugin._litellm_complete("blackholed", QUESTION, max_tokens=16, timeout=5, depth=1,
                                             **({"on_delta": lambda text: None} if stream else {}))
    assert failed.value.reason == "connection"


async def test_an_unreachable_provider_is_a_connection_failure_that_names_no_key(proxy_router):
    key = "sk-relay-secret-DO-NOT-LEAK-0123456789"
    proxy_router([{"model_name": "gone", "litellm_params": {
        "model": "openai/gpt-4o-mini", "api_base": f"http://user:{key}@127.0.0.1:{closed_port()}/v1", "api_key": key}}])
    with pytest.raises(SecondaryError) as failed:
        await relay_plugin._litellm_complete("gone", QUESTION, max_tokens=16, timeout=5, depth=1)
    assert failed.value.reason == "connection"
    assert key not in str(failed.value) and key not in failed.value.detail


async def test_an_oversized_answer_is_refused_not_read(proxy_router, serve, monkeypatch):
    from aiohttp import web

    async def huge(request):
        response = web.StreamResponse(headers={"content-type": "application/json"})
        await response.prepare(request)
        for _ in range(40):
            await response.write(b" " * 65536)
        return response

    monkeypatch.setattr(relay_plugin, "FAST_MAX_RESPONSE_BYTES", 1024 * 1024)
    proxy_router([{"model_name": "huge", "litellm_params": {
        "model": "openai/gpt-4o-mini", "api_base": await serve(huge), "api_key": FAKE_PROVIDER_KEY}}])
    with pytest.raises(SecondaryError) as failed:
        await relay_plugin._litellm_complete("huge", QUESTION, max_tokens=16, timeout=5, depth=1)
    assert failed.value.reason == "bad_response"


@pytest.mark.parametrize("status, body, reason", [
    (200, b"<html>not json</html>", "bad_response"),
    (307, b"", "error"),  # a redirect is not followed (the key would travel with the body elsewhere)
    (401, b'{"error": {"message": "bad key sk-relay-secret-DO-NOT-LEAK-0123456789"}}', "provider_rejected"),
])
async def test_a_broken_answer_is_a_typed_failure(proxy_router, serve, status, body, reason):
    from aiohttp import web

    async def broken(request):
        return web.Response(status=status, body=body, content_type="application/json",
                            headers={"location": "http://127.0.0.1:9/elsewhere"} if status == 307 else None)

    proxy_router([{"model_name": "broken", "litellm_params": {
        "model": "openai/gpt-4o-mini", "api_base": await serve(broken), "api_key": FAKE_PROVIDER_KEY}}])
    with pytest.raises(SecondaryError) as failed:
        await relay_plugin._litellm_complete("broken", QUESTION, max_tokens=16, timeout=5, depth=1)
    assert failed.value.reason == reason  # a followed redirect would have been a connection failure
    assert "DO-NOT-LEAK" not in failed.value.public and "DO-NOT-LEAK" not in str(failed.value)
    assert FAKE_PROVIDER_KEY not in str(failed.value)


async def test_a_timeout_on_the_fast_path_is_a_timeout(proxy_router, serve):
    from aiohttp import web

    async def slow(request):
        await asyncio.sleep(2)
        return web.json_response({})

    proxy_router([{"model_name": "slow", "litellm_params": {
        "model": "openai/gpt-4o-mini", "api_base": await serve(slow), "api_key": FAKE_PROVIDER_KEY}}])
    with pytest.raises(SecondaryError) as failed:
        await relay_plugin._litellm_complete("slow", QUESTION, max_tokens=16, timeout=0.3, depth=1)
    assert failed.value.reason == "timeout" and failed.value.retryable


def test_the_fast_path_knows_what_it_sends(sim):
    """Header values come from litellm's provider config and the relay; a newline in a configured key
    is refused by the HTTP client, never sent as a second header."""
    deployment = {"litellm_params": {"model": "openai/gpt-4o-mini", "api_base": sim.url + "/v1",
                                     "api_key": "sk-x\r\nx-injected: 1"}, "model_info": {}}
    wire = relay_plugin._wire_call(deployment, QUESTION, {"max_tokens": 8, "extra_headers": {"x-relay-depth": "1"}})
    assert wire.url == sim.url + "/v1/chat/completions"
    assert json.loads(json.dumps(wire.body))["max_tokens"] == 8

    async def send():
        return await relay_plugin._exchange(wire, QUESTION, 5)

    with pytest.raises(Exception) as refused:
        asyncio.run(send())
    assert "x-injected" not in json.dumps([r.get("headers") for r in sim.requests()])
    assert refused.value is not None


# =================================================================================================
# The call's cost: tokens times flat prices where that is what litellm computes, litellm otherwise
# =================================================================================================


def _answer(prompt: int, output: int, model: str = "m", **usage):
    """A provider's answer as the fast path reads it, naming ``model`` as the one that answered, with
    ``usage`` beside its plain token counts."""
    from litellm.types.utils import ModelResponse, Usage

    tier = usage.pop("response_tier", None)
    response = ModelResponse(model=model, choices=[{"index": 0, "finish_reason": "stop", "message": {
        "role": "assistant", "content": "hi"}}], usage=Usage(prompt_tokens=prompt, completion_tokens=output,
                                                               total_tokens=prompt + output, **usage))
    if tier is not None:
        response.service_tier = tier
    return response


def _wire_of(model: str, provider: str, **litellm_params) -> "relay_plugin._Wire":
    deployment = {"litellm_params": {"model": f"{provider}/{model}", **litellm_params}, "model_info": {}}
    return relay_plugin._Wire(deployment, provider, model, None, "", {}, {}, {}, {}, False, None)


@pytest.fixture
def litellm_costs(monkeypatch):
    """Counts the calls of litellm's own cost calculation."""
    counted = {"calls": 0}
    original = litellm.completion_cost

    def counting(*args, **kwargs):
        counted["calls"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(litellm, "completion_cost", counting)
    return counted


#: usages litellm prices otherwise than tokens times prices: each must take litellm's calculation
NOT_PLAIN = {
    "cached tokens": {"prompt_tokens_details": {"cached_tokens": 900}},
    "cache writes": {"cache_creation_input_tokens": 700},
    "reasoning tokens": {"completion_tokens_details": {"reasoning_tokens": 400}},
    "audio tokens": {"prompt_tokens_details": {"audio_tokens": 50}},
    "a priority tier": {"response_tier": "priority"},
    "an unknown count": {"frobnicated_tokens": 3},
}


def test_the_cost_of_every_fast_provider_model_in_litellms_cost_map_is_litellms(litellm_costs):
    """Every chat model of the cost map the fast path can call, priced from the map: with plain usage
    (below and above any long-prompt tier) and with every kind of usage litellm prices otherwise."""
    models = [(name, entry["litellm_provider"]) for name, entry in litellm.model_cost.items()
              if isinstance(entry, dict) and entry.get("litellm_provider") in relay_plugin.FAST_PROVIDERS
              and entry.get("mode") in (None, "chat")]
    assert len(models) > 50
    flat = 0  # plain answers priced without litellm's calculation
    for name, provider in models:
        model = name.split("/", 1)[1] if name.startswith(provider + "/") else name
        wire = _wire_of(model, provider)
        for prompt, output, usage in [(1234, 567, {}), (300_000, 20, {}), (0, 0, {}),
                                      *((1234, 567, dict(extra)) for extra in NOT_PLAIN.values())]:
            answer = _answer(prompt, output, model, **usage)
            before = litellm_costs["calls"]
            ours = relay_plugin._fast_cost(answer, wire)
            flat += not usage and litellm_costs["calls"] == before
            theirs = litellm.completion_cost(completion_response=answer, model=model, custom_llm_provider=provider)
            assert ours == pytest.approx(theirs, rel=1e-9, abs=1e-15), (name, prompt, output, usage)
    assert flat >= 2 * len(models)  # plain answers are priced without litellm's calculation (not only tiered ones)


@pytest.mark.parametrize("kind", NOT_PLAIN)
def test_usage_that_litellm_prices_otherwise_is_never_priced_flat(kind, litellm_costs):
    answer = _answer(1234, 567, "gpt-4o-mini", **dict(NOT_PLAIN[kind]))
    assert relay_plugin._plain_tokens(answer) is None
    relay_plugin._fast_cost(answer, _wire_of("gpt-4o-mini", "openai"))
    assert litellm_costs["calls"] == 1


def test_a_long_prompt_tier_is_priced_by_litellm():
    """A model whose prices change above some prompt length: never tokens times its base prices."""
    tiered = [(name, e["litellm_provider"]) for name, e in litellm.model_cost.items() if isinstance(e, dict)
              and e.get("litellm_provider") in relay_plugin.FAST_PROVIDERS and e.get("mode") in (None, "chat")
              and any(k.startswith("input_cost_per_token_above_") and v for k, v in e.items())]
    if not tiered:
        pytest.skip("this litellm's cost map has no tiered model of a fast-path provider")
    name, provider = tiered[0]
    model = name.split("/", 1)[1] if name.startswith(provider + "/") else name
    answer = _answer(400_000, 20, model)
    theirs = litellm.completion_cost(completion_response=answer, model=model, custom_llm_provider=provider)
    entry = litellm.model_cost[name]
    assert theirs != pytest.approx(400_000 * entry["input_cost_per_token"] + 20 * entry["output_cost_per_token"])
    assert relay_plugin._fast_cost(answer, _wire_of(model, provider)) == pytest.approx(theirs)


@pytest.mark.parametrize("where", ["litellm_params", "model_info"])
def test_the_deployments_own_prices_give_litellms_cost(where, litellm_costs):
    prices = {"input_cost_per_token": 2.5e-06, "output_cost_per_token": 1e-05}
    wire = _wire_of("my-local-model", "hosted_vllm", **(prices if where == "litellm_params" else {}))
    if where == "model_info":
        wire.deployment["model_info"] = dict(prices)
    plain, cached = _answer(1000, 300), _answer(1000, 300, prompt_tokens_details={"cached_tokens": 600})
    assert relay_plugin._fast_cost(plain, wire) == pytest.approx(1000 * 2.5e-06 + 300 * 1e-05, rel=1e-12)
    assert litellm_costs["calls"] == 0
    theirs = litellm.completion_cost(completion_response=cached, custom_cost_per_token=prices)
    assert relay_plugin._fast_cost(cached, wire) == pytest.approx(theirs, rel=1e-12)
