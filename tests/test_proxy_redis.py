"""Two proxy instances (separate processes) on one Redis: one budget, one call cap, one breaker.

The topology of docker-compose.yaml without Docker: instance A runs with RELAY_STATE_FAILURE=closed,
instance B with RELAY_STATE_FAILURE=local, both on the same redis-server and key prefix. Each test
starts from an empty Redis (FLUSHDB); the outage test stops and restarts that server on its port.
"""

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

import relay_plugin
from sim.stack import model_entry
from tests.proxy_support import BASE_RELAY_ENV, FAKE_PROVIDER_KEY, relay_test_models, start_test_proxy
from tests.redis_support import RedisServer

pytestmark = pytest.mark.proxy

MAX_CALLS = 12
#: a long question's worst case (its prompt's UTF-8 size at gpt-4o-mini's input price, a full answer) is about
#: 0.0017 USD, its real cost about 0.00025: the cap admits a few calls in flight and binds before MAX_CALLS
BUDGET_USD = 0.004
PREFIX = "relaytest"
#: the simulator's name of the secondary whose failures A sees and B must not pay for
BREAKER_UPSTREAM = "shared-breaker-upstream"


@pytest.fixture(scope="module")
def redis_db(workdir):
    server = RedisServer(workdir / "redis-two-instances").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def pair(workdir, sim, redis_db):
    """Instances A (closed on Redis failure) and B (local on Redis failure), started side by side."""
    models = relay_test_models(sim.url) + [
        # priced: under RELAY_BUDGET_USD an unpriced secondary is skipped:unpriced, never called
        model_entry("f-shared", "openai/" + BREAKER_UPSTREAM, sim.url + "/v1", api_key=FAKE_PROVIDER_KEY,
                    input_cost_per_token=1.5e-07, output_cost_per_token=6e-07)]
    env = {
        **BASE_RELAY_ENV,
        "RELAY_CLIENT_OVERRIDE": "full",
        "RELAY_REDIS_URL": redis_db.url,
        "RELAY_REDIS_PREFIX": PREFIX,
        "RELAY_REDIS_RETRY_S": "0.5",
        # generous for a loaded test machine: a slow first connection must not look like an outage
        "RELAY_REDIS_TIMEOUT_S": "2",
        "RELAY_MAX_CALLS": str(MAX_CALLS),
        "RELAY_BUDGET_USD": str(BUDGET_USD),
        "RELAY_SECONDARY_MAX_TOKENS": "40",
        "RELAY_RETRIES": "0",
        "RELAY_BREAKER_WINDOW": "4",
        "RELAY_BREAKER_MIN_CALLS": "4",
        "RELAY_BREAKER_COOLDOWN_S": "120",
    }
    with ThreadPoolExecutor(2) as pool:
        started = [pool.submit(start_test_proxy, workdir, name, sim.url, {**env, "RELAY_STATE_FAILURE": failure},
                               models) for name, failure in (("redis-a", "closed"), ("redis-b", "local"))]
        handles = [f.result() for f in started]
    yield handles
    for handle in handles:
        handle.stop()


@pytest.fixture
def shared(redis_db):
    """A client of the instances' Redis, emptied before the test."""
    import redis

    client = redis.Redis.from_url(redis_db.url, decode_responses=True)
    client.flushdb()
    yield client
    client.close()


def primary_answer(text: str) -> str:
    return f"llama3 says: {text}"


def relay(handle, text: str, **relay_block):
    raw = handle.chat("llama", text, **({"metadata": {"relay": relay_block}} if relay_block else {}))
    return raw, raw.parse().choices[0].message.content


def load(pair, texts: list[str], threads: int = 12) -> list:
    """Every text once, spread over both instances, ``threads`` at a time; (headers, content) each."""
    def one(i_text):
        i, text = i_text
        raw, content = relay(pair[i % 2], text)
        assert raw.status_code == 200
        return raw.headers, content

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, enumerate(texts)))


def secondary_calls(sim, token: str) -> int:
    return len([r for r in sim.requests(token) if r["model"] == "gpt-4o-mini"])


def report(name: str, spent: float, cap: float, calls: int, max_calls: int) -> None:
    print(f"\n{name}: spend {spent:.8f} of {cap} USD (overshoot {max(spent - cap, 0):.8f} USD), "
          f"{calls} of {max_calls} calls (overshoot {max(calls - max_calls, 0)})")


def test_concurrent_load_on_two_instances_stops_at_the_shared_call_cap(pair, sim, shared, token):
    results = load(pair, [f"Short question {i} {token}" for i in range(4 * MAX_CALLS)])
    outcomes = [h["x-relay-outcome"] for h, _ in results]
    spent = sum(float(h["x-relay-cost-usd"]) for h, _ in results)
    calls = secondary_calls(sim, token)
    report("call cap", spent, BUDGET_USD, calls, MAX_CALLS)
    # with state per process each instance would have made MAX_CALLS calls
    assert calls == outcomes.count("modified") == MAX_CALLS
    assert outcomes.count("skipped:budget") == 3 * MAX_CALLS
    assert spent <= BUDGET_USD
    for (headers, content), i in zip(results, range(len(results)), strict=False):
        if headers["x-relay-outcome"] == "skipped:budget":
            assert content == primary_answer(f"Short question {i} {token}")
    window = next(iter(shared.keys(f"{PREFIX}:{{budget:*}}:calls:*")))
    assert float(shared.get(window)) == MAX_CALLS


def test_concurrent_load_on_two_instances_stops_at_the_shared_usd_budget(pair, sim, shared, token):
    long_text = " ".join(f"word{i}" for i in range(1500))
    results = load(pair, [f"Long question {i} {token} {long_text}" for i in range(24)])
    outcomes = [h["x-relay-outcome"] for h, _ in results]
    spent = sum(float(h["x-relay-cost-usd"]) for h, _ in results)
    calls = secondary_calls(sim, token)
    report("USD budget", spent, BUDGET_USD, calls, MAX_CALLS)
    assert 0 < calls == outcomes.count("modified") < MAX_CALLS  # the USD cap binds first
    assert outcomes.count("skipped:budget") == 24 - calls
    assert spent <= BUDGET_USD
    # Under the burst, calls in flight hold their worst case, so how much of the budget it spends
    # depends on the machine's speed. One request at a time, the cap refuses only when what is left
    # cannot cover one call's worst case: the budget is then mostly spent, not merely reserved.
    for i in range(24):
        raw, _ = relay(pair[i % 2], f"Long question {24 + i} {token} {long_text}")
        headers = raw.headers
        spent += float(headers["x-relay-cost-usd"])
        if headers["x-relay-outcome"] == "skipped:budget":
            break
    report("USD budget, then one at a time", spent, BUDGET_USD, secondary_calls(sim, token), MAX_CALLS)
    assert headers["x-relay-outcome"] == "skipped:budget"
    assert 0.3 * BUDGET_USD < spent <= BUDGET_USD
    spend_key = next(iter(shared.keys(f"{PREFIX}:{{budget:*}}:spend:*")))
    assert float(shared.get(spend_key)) == pytest.approx(spent, rel=1e-6)


def test_failures_seen_by_instance_a_open_the_breaker_for_instance_b(pair, sim, shared, token):
    a, b = pair
    markers = sim.configure()["force_markers"]
    sim.configure(force_markers={**markers, BREAKER_UPSTREAM: "SIM:HTTP500"})
    try:
        for i in range(4):
            raw, _ = relay(a, f"Hi {token} {i}", secondary_model="f-shared")
            assert raw.headers["x-relay-outcome"] == "failed:provider_error"
        raw, content = relay(b, f"Hi {token} from b", secondary_model="f-shared")
    finally:
        sim.configure(force_markers=markers)
    assert raw.headers["x-relay-outcome"] == "skipped:breaker_open"
    assert content == primary_answer(f"Hi {token} from b")
    assert len([r for r in sim.requests(token) if r["model"] == BREAKER_UPSTREAM]) == 4  # none from B
    assert shared.hget(f"{PREFIX}:{{breaker:f-shared}}", "state") == "open"


class Background:
    """Requests to both instances, one after another per thread, until stopped: none may be lost."""

    def __init__(self, pair, token: str, threads: int = 2, pause_s: float = 0.15):
        self.pair, self.token, self.pause_s = pair, token, pause_s
        self.results: list[tuple[str, int, str, str]] = []  # (text, status, outcome, content)
        self.errors: list[BaseException] = []
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self.run, args=(i,)) for i in range(threads)]

    def run(self, index: int) -> None:
        n = 0
        while not self.stopping.is_set():
            text = f"Background {index}-{n} {self.token}"
            try:
                raw, content = relay(self.pair[n % 2], text)
                self.results.append((text, raw.status_code, raw.headers["x-relay-outcome"], content))
            except BaseException as exc:  # noqa: BLE001 - a lost request is what the test looks for
                self.errors.append(exc)
            n += 1
            time.sleep(self.pause_s)

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        for thread in self.threads:
            thread.join(30)


def test_redis_stopped_mid_run_loses_no_request_and_shared_state_resumes_when_it_is_back(pair, sim, shared, redis_db, token):
    a, b = pair
    with Background(pair, token) as background:
        for handle in pair:  # Redis up: both relay through the shared state
            raw, _ = relay(handle, f"Before {token} {uuid.uuid4().hex[:6]}")
            assert raw.headers["x-relay-outcome"] == "modified"
        time.sleep(0.5)

        redis_db.stop()
        outage = []
        for i in range(3):
            outage.append((relay(a, f"Outage on a {i} {token}"), f"Outage on a {i} {token}"))
            outage.append((relay(b, f"Outage on b {i} {token}"), f"Outage on b {i} {token}"))
            time.sleep(0.3)

        redis_db.start()  # the same port, empty: no persistence in the tests
        time.sleep(0.8)  # past RELAY_REDIS_RETRY_S
        after = [relay(handle, f"After {token} {i}") for i, handle in enumerate(pair)]
        time.sleep(0.3)

    for ((raw, content), text), handle in zip(outage, [a, b] * 3, strict=False):
        assert raw.status_code == 200
        if handle is a:  # closed: no relay without a guaranteed cap; the primary answer goes out
            assert raw.headers["x-relay-outcome"] == "skipped:state_unavailable"
            assert content == primary_answer(text)
        else:  # local: relayed on this process's own state
            assert raw.headers["x-relay-outcome"] == "modified"
    assert [raw.headers["x-relay-outcome"] for raw, _ in after] == ["modified", "modified"]
    import redis

    restarted = redis.Redis.from_url(redis_db.url, decode_responses=True)
    calls_key = next(iter(restarted.keys(f"{PREFIX}:{{budget:*}}:calls:*")))
    assert float(restarted.get(calls_key)) >= 2  # the instances count in the restarted Redis again
    restarted.close()

    assert background.errors == []
    assert len(background.results) >= 10
    for text, status, outcome, content in background.results:
        assert status == 200
        assert outcome in ("modified", "skipped:state_unavailable", "skipped:budget"), outcome
        if outcome != "modified":
            assert content == primary_answer(text)
    for handle, policy in ((a, "RELAY_STATE_FAILURE=closed"), (b, "RELAY_STATE_FAILURE=local")):
        state_lines = [line for line in handle.log().splitlines() if "relay: shared state in Redis" in line]
        outage_lines = [line for line in state_lines if f"{relay_plugin.log.name}:ERROR" in line]
        assert len(outage_lines) == 1 and policy in outage_lines[0]  # loud once per outage, not per request
        back_lines = [line for line in state_lines if f"{relay_plugin.log.name}:INFO" in line]
        assert len(back_lines) == 2 and "is back after" in back_lines[1]  # first use, then back once
