"""The store contract, ``relay_plugin.Store``: every store class defines each of the protocol's coroutines
with its signature; then one suite of its promises runs against the in-process store and the Redis store
on three topologies (one real redis-server, a Redis Cluster of 3 masters with replicas, a Sentinel-managed
primary/replica pair); then what only the shared store does (keys, hash slots, expiry, several
processes, outages) and how RELAY_STATE / RELAY_REDIS_* choose and build the store.

Time never passes by sleeping: LocalStore reads the ``now`` argument, RedisStore's breakers read the
server clock plus ``clock_offset_s``, and :func:`clock_of` moves both.
"""

import asyncio
import inspect
import logging
import re
import subprocess
import sys
import time
import uuid
from functools import partial
from pathlib import Path

import pytest

import relay_plugin
from relay_plugin import ConfigError, FailoverStore, LocalStore, RedisStore, RelayConfig, SecondaryError, Store
from tests import support
from tests.redis_support import RedisClusterNodes, RedisServer
from tests.support import FakeClock

ROOT = Path(__file__).resolve().parent.parent
CLOSED, OPEN, HALF_OPEN = relay_plugin.STATE_CLOSED, relay_plugin.STATE_OPEN, relay_plugin.STATE_HALF_OPEN
MODEL = "sec"

#: window of 4 results, opens at half of them failed, 30 s cooldown, 2 probes; cache of 3 entries for 60 s
SETTINGS = {
    "SECONDARY_MODEL": "openai/sec", "BREAKER_WINDOW": "4", "BREAKER_MIN_CALLS": "4", "BREAKER_FAILURE_RATE": "0.5",
    "BREAKER_COOLDOWN_S": "30", "BREAKER_PROBES": "2", "CACHE_TTL_S": "60", "CACHE_MAX_ENTRIES": "3",
    "TIMEOUT_S": "5", "DEADLINE_S": "10", "BUDGET_WINDOW_S": "3600",
}


config = partial(support.config, **SETTINGS)


def clock_of(*stores) -> FakeClock:
    """Monotonic time for the stores' breakers, moved by hand; a RedisStore's breakers read the server
    clock plus ``clock_offset_s``, which moves with it."""
    def follow(seconds: float) -> None:
        for store in stores:
            if isinstance(store, RedisStore):
                store.clock_offset_s += seconds
    return FakeClock(on_advance=follow)


def target_of(topology) -> relay_plugin.RedisTarget:
    """The RedisTarget of a running RedisServer, RedisClusterNodes or RedisSentinelSet, as the
    RELAY_REDIS_* settings an operator would write for it name it."""
    env = {"RELAY_SECONDARY_MODEL": "openai/sec"}
    if isinstance(topology, RedisServer):
        env["RELAY_REDIS_URL"] = topology.url
    elif isinstance(topology, RedisClusterNodes):
        env["RELAY_REDIS_CLUSTER_NODES"] = topology.nodes_setting
    else:
        env["RELAY_REDIS_SENTINELS"] = topology.sentinels_setting
        env["RELAY_REDIS_SENTINEL_SERVICE"] = topology.service
    return relay_plugin.redis_target_of(RelayConfig.from_env(env), {})


def client_of(topology, timeout_s: float):
    """A client as make_store builds it for ``topology``."""
    target = target_of(topology)
    if target.topology == "cluster":
        return relay_plugin.redis_cluster_client(target, timeout_s)
    if target.topology == "sentinel":
        return relay_plugin.redis_sentinel_client(target, timeout_s)
    return relay_plugin.redis_client(target.url, timeout_s)


async def close(store: RedisStore) -> None:
    """Close a store's client, and a Sentinel client's connections to the sentinels it asked for the primary."""
    await store.client.aclose()
    manager = getattr(getattr(store.client, "connection_pool", None), "sentinel_manager", None)
    for sentinel in manager.sentinels if manager is not None else ():
        await sentinel.aclose()


async def new_redis_store(server, cfg: RelayConfig, prefix: str | None = None, timeout_s: float = 5.0) -> RedisStore:
    """A RedisStore as make_store builds it, on its own client (one per "process"), under a fresh prefix.
    ``server``: a RedisServer, RedisClusterNodes or RedisSentinelSet."""
    from dataclasses import replace

    cfg = replace(cfg, redis_prefix=prefix or "t" + uuid.uuid4().hex[:10])
    return RedisStore(cfg, client_of(server, timeout_s), where=target_of(server).where)


#: the shared topologies, each a session fixture of conftest.py
TOPOLOGIES = {"redis": "redis_server", "cluster": "redis_cluster", "sentinel": "redis_sentinel"}


@pytest.fixture(params=["local", *TOPOLOGIES])
async def make(request):
    """``await make(cfg)`` builds a store of the kind under test; clients are closed afterwards."""
    made = []

    async def build(cfg: RelayConfig | None = None, prefix: str | None = None):
        cfg = cfg or config()
        if request.param == "local":
            return LocalStore(cfg)
        store = await new_redis_store(request.getfixturevalue(TOPOLOGIES[request.param]), cfg, prefix)
        made.append(store)
        return store

    yield build
    for store in made:
        await close(store)


@pytest.fixture
async def store(make):
    return await make()


def kind(permit) -> str | None:
    """``"call"``, ``"probe"`` or None, whatever the store writes after the colon of a probe permit."""
    if permit is None:
        return None
    return "probe" if permit.token.startswith("probe") else permit.token


# ----- the protocol -------------------------------------------------------------------------------------


def departures_from_the_store_protocol(cls: type) -> list[str]:
    """How ``cls`` departs from :class:`relay_plugin.Store`: a protocol coroutine it does not define itself
    (a stub inherited from the protocol does not count), one with another signature (parameter names,
    kinds, defaults and annotations), and a public coroutine the protocol does not declare."""
    declared = {name: f for name, f in vars(Store).items() if inspect.iscoroutinefunction(f)}
    own = {name: f for name, f in vars(cls).items() if inspect.iscoroutinefunction(f)}
    departures = []
    for name, protocol_method in declared.items():
        if name not in own:
            departures.append(f"{name}: not a coroutine of {cls.__name__}")
        elif inspect.signature(own[name]) != inspect.signature(protocol_method):
            departures.append(f"{name}{inspect.signature(own[name])} is not {name}{inspect.signature(protocol_method)}")
    departures += [f"{name}: not in the protocol" for name in own if not name.startswith("_") and name not in declared]
    return departures


def test_the_store_protocol_declares_exactly_the_store_coroutines_the_relay_calls():
    source = (ROOT / "relay_plugin.py").read_text()
    called = set(re.findall(r"\bstore\.([a-z]\w*)\(", source))
    declared = {name for name, f in vars(Store).items() if inspect.iscoroutinefunction(f)}
    assert declared == called
    assert all(inspect.getdoc(getattr(Store, name)) for name in declared)


@pytest.mark.parametrize("cls", [LocalStore, RedisStore, FailoverStore], ids=lambda cls: cls.__name__)
def test_every_store_defines_every_coroutine_of_the_store_protocol_with_its_signature(cls):
    assert issubclass(cls, Store)
    assert departures_from_the_store_protocol(cls) == []


def test_a_store_that_departs_from_the_protocol_is_caught_method_by_method():
    class Sloppy:  # LocalStore's coroutines but five
        reserve, settle, release = LocalStore.reserve, LocalStore.settle, LocalStore.release
        breaker_record, breaker_state = LocalStore.breaker_record, LocalStore.breaker_state

        async def counter(self, key: str) -> float:  # another parameter name
            return 0.0

        async def breaker_acquire(self, model: str, now: float) -> str | None:  # the old permit type
            return "call"

        def cache_get(self, key: str, now: float) -> str | None:  # not a coroutine
            return None

        async def peek(self) -> None:  # public, but not in the protocol
            return None

    assert departures_from_the_store_protocol(Sloppy) == [
        "counter(self, key: str) -> float is not counter(self, name: str) -> float",
        "breaker_acquire(self, model: str, now: float) -> str | None is not "
        "breaker_acquire(self, model: str, now: float) -> relay_plugin.Permit | None",
        "cache_get: not a coroutine of Sloppy",
        "cache_put: not a coroutine of Sloppy",
        "peek: not in the protocol",
    ]


def test_the_handler_and_make_store_hold_a_store():
    assert isinstance(relay_plugin.RelayHandler(config()).store, Store)
    assert isinstance(relay_plugin.make_store(config(REDIS_URL="redis://127.0.0.1:1"), {}), Store)


# ----- budget ------------------------------------------------------------------------------------------


async def test_a_reservation_holds_its_amount_on_every_counter(store):
    reservation = await store.reserve([("spend:1", 1.0, 0.25), ("calls:1", 10.0, 1.0)])
    assert reservation is not None
    assert dict(reservation.counters) == {"spend:1": 0.25, "calls:1": 1.0}
    assert (await store.counter("spend:1"), await store.counter("calls:1")) == (0.25, 1.0)


async def test_a_counter_never_used_is_zero(store):
    assert await store.counter("spend:never") == 0.0


async def test_a_reservation_may_fill_a_cap_exactly_but_not_pass_it(store):
    assert await store.reserve([("calls:1", 3.0, 1.0)]) is not None
    assert await store.reserve([("calls:1", 3.0, 2.0)]) is not None
    assert await store.reserve([("calls:1", 3.0, 1.0)]) is None
    assert await store.counter("calls:1") == 3.0


async def test_a_reservation_is_all_or_nothing_across_its_counters(store):
    await store.reserve([("calls:1", 2.0, 2.0)])
    refused = await store.reserve([("spend:1", 1.0, 0.5), ("spend:key:k:1", 1.0, 0.5), ("calls:1", 2.0, 1.0)])
    assert refused is None
    assert [await store.counter(n) for n in ("spend:1", "spend:key:k:1", "calls:1")] == [0.0, 0.0, 2.0]


async def test_settling_replaces_a_hold_with_the_actual_amount_and_keeps_the_holds_not_named(store):
    reservation = await store.reserve([("spend:1", 1.0, 0.5), ("calls:1", 10.0, 1.0)])
    await store.settle(reservation, {"spend:1": 0.125})
    assert (await store.counter("spend:1"), await store.counter("calls:1")) == (0.125, 1.0)


async def test_releasing_gives_the_whole_hold_back(store):
    kept = await store.reserve([("spend:1", 1.0, 0.25)])
    released = await store.reserve([("spend:1", 1.0, 0.5), ("calls:1", 10.0, 1.0)])
    await store.release(released)
    assert (await store.counter("spend:1"), await store.counter("calls:1")) == (0.25, 0.0)
    await store.settle(kept, {"spend:1": 0.0})
    assert await store.counter("spend:1") == 0.0


async def test_room_freed_by_a_settle_is_reservable_again(store):
    first = await store.reserve([("spend:1", 1.0, 0.75)])
    assert await store.reserve([("spend:1", 1.0, 0.5)]) is None
    await store.settle(first, {"spend:1": 0.25})
    assert await store.reserve([("spend:1", 1.0, 0.5)]) is not None


async def test_counters_of_different_names_are_independent(store):
    await store.reserve([("calls:1", 1.0, 1.0)])
    assert await store.reserve([("calls:1", 1.0, 1.0)]) is None
    assert await store.reserve([("calls:2", 1.0, 1.0)]) is not None  # the next window starts empty


async def test_a_thousand_concurrent_reservations_admit_exactly_what_the_caps_afford(store):
    holds = [("spend:1", 1.0, 0.01), ("calls:1", 100.0, 1.0)]
    results = await asyncio.gather(*(store.reserve(holds) for _ in range(1000)))
    admitted = [r for r in results if r is not None]
    assert len(admitted) == 100
    assert await store.counter("calls:1") == 100.0
    assert await store.counter("spend:1") == pytest.approx(1.0, abs=1e-9)


# ----- breaker -----------------------------------------------------------------------------------------


async def record(store, clock, *failures: bool, model: str = MODEL) -> list:
    """One call per entry: acquire a permit, record the outcome. Returns the permits."""
    permits = []
    for failed in failures:
        permit = await store.breaker_acquire(model, clock())
        permits.append(permit)
        if permit is not None:
            await store.breaker_record(model, permit, failed, clock())
    return permits


async def trip(store, clock, model: str = MODEL) -> None:
    await record(store, clock, True, True, True, True, model=model)
    assert await store.breaker_state(model, clock()) == OPEN


async def test_a_breaker_starts_closed_and_gives_call_permits(store):
    clock = clock_of(store)
    assert await store.breaker_state(MODEL, clock()) == CLOSED
    assert kind(await store.breaker_acquire(MODEL, clock())) == "call"


async def test_the_breaker_opens_at_the_failure_rate_only_once_the_window_holds_min_calls(store):
    clock = clock_of(store)
    await record(store, clock, True, True, True)
    assert await store.breaker_state(MODEL, clock()) == CLOSED  # 3 failures, but min calls is 4
    await record(store, clock, False)  # 3 of 4 failed
    assert await store.breaker_state(MODEL, clock()) == OPEN
    assert await store.breaker_acquire(MODEL, clock()) is None


async def test_a_failure_rate_below_the_threshold_keeps_it_closed(store):
    clock = clock_of(store)
    await record(store, clock, False, False, True, False, False, False, True, False)  # never 2 of any 4
    assert await store.breaker_state(MODEL, clock()) == CLOSED


async def test_the_rate_counts_only_the_last_window_of_results(store):
    clock = clock_of(store)
    await record(store, clock, True, False, False, False, False, True)
    assert await store.breaker_state(MODEL, clock()) == CLOSED  # last 4: 1 failed
    await record(store, clock, True)  # last 4: 2 failed, opens; of all 7 only 3 failed
    assert await store.breaker_state(MODEL, clock()) == OPEN


async def test_an_open_breaker_half_opens_after_the_cooldown_and_admits_exactly_probes_permits(store):
    clock = clock_of(store)
    await trip(store, clock)
    clock.advance(29)
    assert await store.breaker_acquire(MODEL, clock()) is None
    clock.advance(1)
    assert await store.breaker_state(MODEL, clock()) == HALF_OPEN
    permits = [await store.breaker_acquire(MODEL, clock()) for _ in range(5)]
    assert [kind(p) for p in permits] == ["probe", "probe", None, None, None]


async def test_as_many_probe_successes_as_probes_close_it(store):
    clock = clock_of(store)
    await trip(store, clock)
    clock.advance(30)
    first, second = await store.breaker_acquire(MODEL, clock()), await store.breaker_acquire(MODEL, clock())
    await store.breaker_record(MODEL, first, False, clock())
    assert await store.breaker_state(MODEL, clock()) == HALF_OPEN
    await store.breaker_record(MODEL, second, False, clock())
    assert await store.breaker_state(MODEL, clock()) == CLOSED
    assert kind(await store.breaker_acquire(MODEL, clock())) == "call"


async def test_one_failed_probe_reopens_it_for_another_cooldown(store):
    clock = clock_of(store)
    await trip(store, clock)
    clock.advance(30)
    probe = await store.breaker_acquire(MODEL, clock())
    await store.breaker_record(MODEL, probe, True, clock())
    assert await store.breaker_state(MODEL, clock()) == OPEN
    clock.advance(29)
    assert await store.breaker_acquire(MODEL, clock()) is None
    clock.advance(1)
    assert kind(await store.breaker_acquire(MODEL, clock())) == "probe"


async def test_a_cancelled_probe_gives_its_permit_back(store):
    clock = clock_of(store)
    await trip(store, clock)
    clock.advance(30)
    first, _second = await store.breaker_acquire(MODEL, clock()), await store.breaker_acquire(MODEL, clock())
    assert await store.breaker_acquire(MODEL, clock()) is None
    await store.breaker_record(MODEL, first, None, clock())
    assert await store.breaker_state(MODEL, clock()) == HALF_OPEN
    assert kind(await store.breaker_acquire(MODEL, clock())) == "probe"
    assert await store.breaker_acquire(MODEL, clock()) is None


async def test_a_call_admitted_before_the_breaker_opened_does_not_count_afterwards(store):
    clock = clock_of(store)
    early = await store.breaker_acquire(MODEL, clock())
    await trip(store, clock)
    clock.advance(30)
    await store.breaker_record(MODEL, early, True, clock())
    assert await store.breaker_state(MODEL, clock()) == HALF_OPEN
    assert [kind(p) for p in [await store.breaker_acquire(MODEL, clock()) for _ in range(3)]] == ["probe", "probe", None]


@pytest.mark.parametrize("late_probe_ends", ["succeeded", "cancelled"])
async def test_a_probe_from_an_earlier_half_open_period_does_not_widen_the_next_one(store, late_probe_ends):
    clock = clock_of(store)
    await trip(store, clock)
    clock.advance(30)
    failing, late = await store.breaker_acquire(MODEL, clock()), await store.breaker_acquire(MODEL, clock())
    await store.breaker_record(MODEL, failing, True, clock())
    clock.advance(30)
    assert await store.breaker_state(MODEL, clock()) == HALF_OPEN
    await store.breaker_record(MODEL, late, False if late_probe_ends == "succeeded" else None, clock())
    assert await store.breaker_state(MODEL, clock()) == HALF_OPEN
    assert [kind(p) for p in [await store.breaker_acquire(MODEL, clock()) for _ in range(4)]] == ["probe", "probe", None, None]


async def test_breakers_of_different_models_are_independent(store):
    clock = clock_of(store)
    await trip(store, clock, model="a")
    assert await store.breaker_state("b", clock()) == CLOSED
    assert kind(await store.breaker_acquire("b", clock())) == "call"


# ----- cache -------------------------------------------------------------------------------------------


async def test_the_cache_answers_what_was_put_until_its_ttl_ends(store):
    now = time.time()
    assert await store.cache_get("k", now) is None
    await store.cache_put("k", "cached answer", now)
    assert await store.cache_get("k", now + 59.9) == "cached answer"
    assert await store.cache_get("k", now + 60) is None


async def test_the_cache_keeps_text_verbatim_and_a_new_put_replaces_the_entry(store):
    now = time.time()
    text = "line one | with a bar\nline two: ünïcödé ✓"
    await store.cache_put("k", "old", now)
    await store.cache_put("k", text, now + 1)
    assert await store.cache_get("k", now + 2) == text
    assert await store.cache_get("k", now + 60.5) == text  # the second put restarted the ttl


async def test_the_cache_holds_at_most_max_entries_dropping_the_oldest(store):
    now = time.time()
    for i in range(4):
        await store.cache_put(f"k{i}", f"v{i}", now + i)
    assert [await store.cache_get(f"k{i}", now + 5) for i in range(4)] == [None, "v1", "v2", "v3"]


# ----- only the shared store: keys, expiry, several processes ------------------------------------------


async def all_keys(store: RedisStore) -> list[str]:
    """Every key on every primary (a Cluster client asks one node unless told otherwise)."""
    if hasattr(store.client, "nodes_manager"):
        return await store.client.keys("*", target_nodes=store.client.PRIMARIES)
    return await store.client.keys("*")


@pytest.fixture(params=list(TOPOLOGIES))
def topology(request):
    """Each shared topology in turn: one Redis, a Redis Cluster, a Sentinel-managed primary."""
    return request.getfixturevalue(TOPOLOGIES[request.param])


@pytest.fixture
async def redis_pair(topology):
    """Two RedisStores on separate clients and one prefix: two processes of one deployment."""
    prefix = "pair" + uuid.uuid4().hex[:8]
    a, b = [await new_redis_store(topology, config(), prefix) for _ in range(2)]
    yield a, b
    for store in (a, b):
        await close(store)


async def test_every_key_is_under_the_prefix_and_expires(redis_pair):
    a, _ = redis_pair
    clock = clock_of(a)
    await a.reserve([("spend:7", 1.0, 0.5), ("calls:7", 5.0, 1.0)])
    await record(a, clock, True)
    await a.cache_put("k", "v", time.time())
    keys = sorted(k for k in await all_keys(a) if k.startswith(a.prefix + ":"))
    assert keys == [f"{a.prefix}:{{breaker:{MODEL}}}", f"{a.prefix}:{{budget:7}}:calls:7", f"{a.prefix}:{{budget:7}}:spend:7",
                    f"{a.prefix}:{{cache:0}}:index", f"{a.prefix}:{{cache:0}}:k"]
    ttl = {k.split(":", 1)[1]: await a.client.pttl(k) / 1000 for k in keys}
    c = a.config
    assert c.budget_window_s < ttl["{budget:7}:spend:7"] <= c.budget_window_s + c.deadline_s + relay_plugin.COUNTER_GRACE_S
    assert 59 < ttl["{cache:0}:k"] <= 60 and 59 < ttl["{cache:0}:index"] <= 60
    assert relay_plugin.BREAKER_IDLE_S < ttl[f"{{breaker:{MODEL}}}"] <= relay_plugin.BREAKER_IDLE_S + c.breaker_cooldown_s


async def test_what_one_script_touches_shares_a_slot_and_the_rest_spreads_over_the_cluster(redis_cluster):
    cfg = config(CACHE_MAX_ENTRIES="2048", BUDGET_USD="1", BUDGET_USD_PER_KEY="0.1", MAX_CALLS="100")
    store = await new_redis_store(redis_cluster, cfg)
    try:
        holds = [("spend:20000", 1.0, 0.01), ("spend:key:abc:20000", 0.1, 0.01), ("calls:20000", 100.0, 1.0)]
        assert await store.reserve(holds) is not None  # a cross-slot script would be refused (CROSSSLOT)
        assert len({redis_cluster.slot_of(store.key("budget", name)) for name, _, _ in holds}) == 1
        scopes = ([store.key("budget", f"calls:{w}") for w in range(20000, 20012)]
                  + [store.key("breaker", f"model-{i}") for i in range(12)]
                  + [store.key("cache", f"{i:064x}") for i in range(48)])
        owners = {redis_cluster.master_of(key).port for key in scopes}
        assert len(owners) == redis_cluster.masters  # windows, models and cache shards reach every master
        for i in range(40):  # a cache put touches its entry and its shard's index: one slot
            await store.cache_put(f"{i:064x}", "v", time.time())
        assert store._cache_shards == relay_plugin.CACHE_SHARDS
    finally:
        await close(store)


async def test_stores_with_different_prefixes_share_nothing(topology):
    a, b = await new_redis_store(topology, config()), await new_redis_store(topology, config())
    try:
        await a.reserve([("calls:1", 1.0, 1.0)])
        assert await b.reserve([("calls:1", 1.0, 1.0)]) is not None
    finally:
        await close(a)
        await close(b)


async def test_a_settle_after_the_counter_expired_does_not_recreate_it(redis_pair):
    a, _ = redis_pair
    reservation = await a.reserve([("spend:1", 1.0, 0.5)])
    await a.client.delete(a.key("budget", "spend:1"))  # the window ended and its counter expired
    await a.settle(reservation, {"spend:1": 0.25})
    await a.release(reservation)
    assert await a.client.exists(a.key("budget", "spend:1")) == 0


async def test_two_processes_share_one_budget(redis_pair):
    a, b = redis_pair
    assert await a.reserve([("calls:1", 2.0, 1.0)]) is not None
    held = await b.reserve([("calls:1", 2.0, 1.0)])
    assert held is not None
    assert await a.reserve([("calls:1", 2.0, 1.0)]) is None
    await b.release(held)
    assert await a.reserve([("calls:1", 2.0, 1.0)]) is not None


async def test_failures_seen_by_one_process_open_the_breaker_for_the_other_whatever_their_clocks(redis_pair):
    a, b = redis_pair
    clock_a = clock_of(a)
    await record(a, clock_a, True, True)
    await record(b, lambda: -5e6, True, True)  # b's monotonic clock is nowhere near a's: it is not used
    assert await b.breaker_acquire(MODEL, 12345.0) is None
    assert await a.breaker_state(MODEL, clock_a()) == OPEN


async def test_the_probes_are_shared_too_exactly_probes_across_processes(redis_pair):
    a, b = redis_pair
    clock = clock_of(a, b)
    await trip(a, clock)
    clock.advance(30)
    permits = [await s.breaker_acquire(MODEL, clock()) for s in (a, b, a, b)]
    assert [kind(p) for p in permits] == ["probe", "probe", None, None]
    await b.breaker_record(MODEL, permits[1], False, clock())
    await a.breaker_record(MODEL, permits[0], False, clock())
    assert await b.breaker_state(MODEL, clock()) == CLOSED


async def test_a_probe_permit_never_given_back_expires_after_the_deadline(redis_pair):
    a, _ = redis_pair
    clock = clock_of(a)
    await trip(a, clock)
    clock.advance(30)
    held = [await a.breaker_acquire(MODEL, clock()) for _ in range(2)]  # their process dies with them
    assert all(kind(p) == "probe" for p in held) and await a.breaker_acquire(MODEL, clock()) is None
    clock.advance(a.config.deadline_s + relay_plugin.PROBE_LEASE_MARGIN_S)
    assert kind(await a.breaker_acquire(MODEL, clock())) == "probe"
    await a.breaker_record(MODEL, held[0], False, clock())  # too late: counts for nothing
    assert await a.breaker_state(MODEL, clock()) == HALF_OPEN


# ----- failover: Redis stopped, frozen, back -------------------------------------------------------------


@pytest.fixture
def own_redis(workdir):
    """A redis-server of this test alone: it may be stopped, frozen and restarted on its port."""
    server = RedisServer(workdir / f"redis-own-{uuid.uuid4().hex[:6]}").start()
    yield server
    server.stop()


class RelayRecords:
    """The records of the relay's logger among those caplog collects at the root logger (the relay's
    logger is a child of LiteLLM's proxy logger, and its records travel up to the root)."""

    def __init__(self, caplog):
        self.caplog = caplog

    @property
    def records(self) -> list[logging.LogRecord]:
        return [r for r in self.caplog.records if r.name == relay_plugin.log.name]


@pytest.fixture
def relay_log(caplog):
    """Records of the relay's logger, at INFO and above."""
    with caplog.at_level(logging.INFO, logger=relay_plugin.log.name):
        yield RelayRecords(caplog)


async def failover(server: RedisServer, on_failure: str, clock=None) -> FailoverStore:
    cfg = config(STATE_FAILURE=on_failure, REDIS_TIMEOUT_S="0.2", REDIS_RETRY_S="5")
    primary = await new_redis_store(server, cfg, timeout_s=0.2)
    return FailoverStore(primary, LocalStore(cfg), on_failure=on_failure, retry_s=5, bound_s=0.6,
                         clock=clock or FakeClock(0.0))


async def test_closed_with_redis_down_skips_what_needs_state_and_never_raises_after_a_call(own_redis):
    store = await failover(own_redis, "closed")
    reservation = await store.reserve([("spend:1", 1.0, 0.5)])
    permit = await store.breaker_acquire(MODEL, 0.0)
    own_redis.stop()
    for needed in (store.reserve([("spend:1", 1.0, 0.1)]), store.breaker_acquire(MODEL, 0.0), store.cache_get("k", 0.0)):
        with pytest.raises(SecondaryError) as caught:
            await needed
        assert (caught.value.reason, caught.value.skipped) == ("state_unavailable", True)
    await store.settle(reservation, {"spend:1": 0.25})
    await store.release(reservation)
    await store.breaker_record(MODEL, permit, True, 0.0)
    await store.cache_put("k", "v", time.time())
    assert store.lost == 3
    await close(store.primary)


async def test_local_with_redis_down_uses_this_process_state_and_says_so_once(own_redis, relay_log):
    clock = FakeClock(0.0)
    store = await failover(own_redis, "local", clock)
    shared = await store.reserve([("calls:1", 1.0, 1.0)])
    assert isinstance(shared, relay_plugin.SharedReservation)
    own_redis.stop()
    local = await store.reserve([("calls:1", 1.0, 1.0)])  # the in-process counter starts at 0
    assert local is not None and not isinstance(local, relay_plugin.SharedReservation)
    assert await store.reserve([("calls:1", 1.0, 1.0)]) is None
    permit = await store.breaker_acquire(MODEL, 0.0)
    assert kind(permit) == "call" and not isinstance(permit, relay_plugin.SharedPermit)
    await store.breaker_record(MODEL, permit, True, 0.0)
    await store.settle(shared, {"calls:1": 0.0})  # made in Redis: never applied to the local counter
    assert await store.fallback.counter("calls:1") == 1.0
    await store.release(local)
    assert await store.fallback.counter("calls:1") == 0.0
    await store.cache_put("k", "v", 100.0)
    assert await store.cache_get("k", 101.0) == "v"
    errors = [r for r in relay_log.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "RELAY_STATE_FAILURE=local" in errors[0].getMessage()
    await close(store.primary)


async def test_redis_is_not_tried_again_before_the_retry_pause_and_is_used_again_after_it(own_redis, relay_log):
    clock = FakeClock(0.0)
    store = await failover(own_redis, "closed", clock)
    await store.reserve([("calls:1", 5.0, 1.0)])
    own_redis.stop()
    with pytest.raises(SecondaryError):
        await store.reserve([("calls:1", 5.0, 1.0)])
    own_redis.start()
    clock.now += 4.9
    with pytest.raises(SecondaryError):  # still pausing: Redis is not asked
        await store.reserve([("calls:1", 5.0, 1.0)])
    clock.now += 0.1
    assert await store.reserve([("calls:1", 5.0, 1.0)]) is not None  # reconnected by itself
    assert await store.counter("calls:1") == 1.0  # a restarted Redis without persistence starts empty
    messages = [r.getMessage() for r in relay_log.records]
    assert sum("is unavailable" in m for m in messages) == 1
    assert sum("is back after" in m for m in messages) == 1
    # a second outage, well after the first one ended, is announced again
    own_redis.stop()
    clock.now += relay_plugin.OUTAGE_MERGE_RETRIES * 5 + 0.1
    with pytest.raises(SecondaryError):
        await store.counter("calls:1")
    assert store.outages == 2
    assert sum("is unavailable" in r.getMessage() for r in relay_log.records) == 2
    await close(store.primary)


class Flaky:
    """A primary store whose operations fail while ``failing`` is set, with what a client may raise."""

    def __init__(self, exc: BaseException):
        self.failing, self.exc = False, exc
        self.where, self.prefix = "flaky", "p"

    async def counter(self, name: str) -> float:
        if self.failing:
            raise self.exc
        return 1.0


@pytest.mark.parametrize("exc", [ConnectionError("refused"), AttributeError("'NoneType' object has no attribute 'writelines'")])
async def test_a_failure_soon_after_redis_came_back_continues_the_same_outage_with_no_second_error_line(exc, relay_log):
    clock = FakeClock(0.0)
    primary = Flaky(exc)
    store = FailoverStore(primary, LocalStore(config()), on_failure="closed", retry_s=0.5, bound_s=1, clock=clock)
    for step in range(6):  # a Cluster failing over: some operations answer, others fail, for a few seconds
        primary.failing = step % 2 == 0
        clock.now += 0.5
        try:
            await store.counter("calls:1")
        except SecondaryError as caught:
            assert caught.reason == "state_unavailable"  # whatever the client raised, never the client's error
    errors = [r for r in relay_log.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and store.outages == 1
    primary.failing = False
    clock.now += 1
    assert await store.counter("calls:1") == 1.0
    clock.now += relay_plugin.OUTAGE_MERGE_RETRIES * 0.5 + 0.1  # a later, separate outage is announced again
    primary.failing = True
    with pytest.raises(SecondaryError):
        await store.counter("calls:1")
    assert store.outages == 2 and len([r for r in relay_log.records if r.levelno >= logging.ERROR]) == 2


async def test_a_frozen_redis_costs_one_bounded_wait_then_none_until_the_retry(own_redis):
    clock = FakeClock(0.0)
    store = await failover(own_redis, "closed", clock)
    await store.reserve([("calls:1", 5.0, 1.0)])
    own_redis.pause()
    try:
        started = time.perf_counter()
        with pytest.raises(SecondaryError):
            await store.breaker_acquire(MODEL, 0.0)
        first = time.perf_counter() - started
        started = time.perf_counter()
        with pytest.raises(SecondaryError):
            await store.reserve([("calls:1", 5.0, 1.0)])
        second = time.perf_counter() - started
    finally:
        own_redis.resume()
    assert 0.15 < first < 0.7 and second < 0.05
    clock.now += 5  # thawed and past the pause: answers match their commands again
    assert await store.counter("calls:1") == 1.0
    assert await store.reserve([("calls:1", 2.0, 1.0)]) is not None
    assert await store.counter("calls:1") == 2.0
    await close(store.primary)


# ----- configuration: RELAY_STATE and RELAY_REDIS_* ------------------------------------------------------


def test_state_is_local_by_default_and_redis_when_a_url_is_set():
    assert relay_plugin.redis_url_of(config(), {}) is None
    assert relay_plugin.redis_url_of(config(REDIS_URL="redis://r:6379/2"), {}) == "redis://r:6379/2"
    assert relay_plugin.redis_url_of(config(STATE="local", REDIS_URL="redis://r:6379/2"), {}) is None


def test_redis_state_without_a_url_uses_litellms_redis_host_port_and_password():
    env = {"REDIS_HOST": "cache.internal", "REDIS_PORT": "6380", "REDIS_PASSWORD": "p@ss/word"}
    assert relay_plugin.redis_url_of(config(STATE="redis"), env) == "redis://:p%40ss%2Fword@cache.internal:6380"
    assert relay_plugin.redis_url_of(config(STATE="redis"), {"REDIS_HOST": "r"}) == "redis://r:6379"


def test_redis_state_without_a_url_or_redis_host_is_refused_naming_the_variables():
    with pytest.raises(ConfigError) as caught:
        relay_plugin.redis_url_of(config(STATE="REDIS"), {})
    message = str(caught.value)
    assert "\n" not in message
    assert all(name in message for name in ("RELAY_REDIS_URL", "REDIS_HOST", "RELAY_STATE"))


@pytest.mark.parametrize("url", ["http://r:6379", "r:6379", "localhost", "redis//r"])
def test_a_url_of_another_scheme_is_refused_with_the_allowed_ones(url):
    with pytest.raises(ConfigError, match=r"^RELAY_REDIS_URL='.*' is invalid: allowed: a redis://, rediss:// or unix:// URL$"):
        relay_plugin.redis_url_of(config(REDIS_URL=url), {})


def test_a_refused_url_never_shows_its_password():
    with pytest.raises(ConfigError) as caught:
        relay_plugin.redis_url_of(config(REDIS_URL="http://user:s3cret@r:6379"), {})
    assert "s3cret" not in str(caught.value) and "user:***@r:6379" in str(caught.value)


@pytest.mark.parametrize("port", ["0", "65536", "six", "-1"])
def test_a_bad_redis_port_is_refused(port):
    with pytest.raises(ConfigError, match=f"^REDIS_PORT='{port}' is invalid: allowed: a TCP port, 1 to 65535$"):
        relay_plugin.redis_url_of(config(STATE="redis"), {"REDIS_HOST": "r", "REDIS_PORT": port})


@pytest.mark.parametrize("name, raw, allowed", [
    ("STATE", "memcached", "allowed: local | redis"),
    ("STATE_FAILURE", "open", "allowed: closed | local"),
    ("REDIS_TIMEOUT_S", "0", "allowed: a number >= 0.001 and <= 60"),
    ("REDIS_RETRY_S", "soon", "allowed: a number >= 0.001 and <= 3600"),
])
def test_a_bad_state_setting_names_the_variable_the_value_and_what_is_allowed(name, raw, allowed):
    with pytest.raises(ConfigError) as caught:
        config(**{name: raw})
    assert str(caught.value) == f"RELAY_{name}={raw!r} is invalid: {allowed}"


def test_the_state_settings_have_their_documented_defaults():
    c = config()
    assert (c.state, c.redis_url, c.redis_prefix, c.state_failure, c.redis_timeout_s, c.redis_retry_s) == (
        None, None, "relay", "closed", 0.25, 1.0)


def test_make_store_builds_redis_with_the_local_store_as_fallback():
    store = relay_plugin.make_store(config(REDIS_URL="redis://:pw@127.0.0.1:1/0", STATE_FAILURE="local",
                                           REDIS_PREFIX="blue"), {})
    assert isinstance(store, FailoverStore) and isinstance(store.fallback, LocalStore)
    assert (store.on_failure, store.primary.prefix, store.primary.where) == (
        "local", "blue", "redis://:***@127.0.0.1:1/0")
    assert "pw" not in repr(store)
    assert isinstance(relay_plugin.make_store(config(), {}), LocalStore)


def test_redis_state_without_the_redis_package_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "redis", None)
    monkeypatch.setitem(sys.modules, "redis.asyncio", None)
    with pytest.raises(ConfigError, match="^RELAY_STATE=redis is invalid here: allowed: only where the redis package"):
        relay_plugin.make_store(config(REDIS_URL="redis://r"), {})


def run_import(env: dict) -> subprocess.CompletedProcess:
    code = "import sys, relay_plugin; print(type(relay_plugin.proxy_handler_instance.store).__name__, 'redis' in sys.modules)"
    clean = {"PATH": "/usr/bin:/bin", "LITELLM_LOCAL_MODEL_COST_MAP": "True", "RELAY_SECONDARY_MODEL": "openai/x", **env}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=clean, capture_output=True, text=True, timeout=120)


def test_the_plugin_imports_redis_only_when_redis_state_is_enabled():
    assert run_import({}).stdout.split() == ["LocalStore", "False"]
    assert run_import({"RELAY_REDIS_URL": "redis://127.0.0.1:1"}).stdout.split() == ["FailoverStore", "True"]


def test_importing_with_redis_state_but_no_redis_exits_2_with_one_line():
    done = run_import({"RELAY_STATE": "redis"})
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(
        "relay_plugin: invalid configuration: RELAY_REDIS_URL is missing"
    )


# ----- configuration: Redis Cluster and Sentinel ----------------------------------------------------------


def target(env: dict[str, str] | None = None, **settings: str) -> relay_plugin.RedisTarget | None:
    return relay_plugin.redis_target_of(config(**settings), env or {})


def test_cluster_nodes_name_a_cluster_and_imply_redis_state():
    found = target(REDIS_CLUSTER_NODES="10.0.0.1:7000, redis-b:7001,[::1]:7002")
    assert (found.topology, found.nodes, found.tls, found.password) == (
        "cluster", (("10.0.0.1", 7000), ("redis-b", 7001), ("::1", 7002)), False, None)
    assert target(STATE="local", REDIS_CLUSTER_NODES="r:7000") is None


def test_cluster_nodes_as_urls_carry_tls_and_the_password_which_is_never_shown():
    found = target(REDIS_CLUSTER_NODES="rediss://relay:p%40ss@a:7000,rediss://relay:p%40ss@b:7001")
    assert (found.tls, found.username, found.password) == (True, "relay", "p@ss")
    assert "p@ss" not in repr(found) and "p%40ss" not in found.where and found.where == "rediss cluster a:7000,b:7001"


@pytest.mark.parametrize("nodes", ["a", "a:port", "a:70000", "http://a:7000", ":7000", "redis://:x@a:1,redis://:y@b:2",
                                   "redis://a:1,rediss://b:2", "redis://a:7000/3", " , "])
def test_bad_cluster_nodes_are_refused_naming_the_variable_and_what_is_allowed(nodes):
    with pytest.raises(ConfigError) as caught:
        target(REDIS_CLUSTER_NODES=nodes)
    message = str(caught.value)
    assert message.startswith("RELAY_REDIS_CLUSTER_NODES=") and "allowed: comma-separated host:port" in message
    assert "\n" not in message and ":x@" not in message and ":y@" not in message


def test_sentinels_need_the_service_name_and_carry_one_password_for_sentinels_and_primary():
    with pytest.raises(ConfigError, match="^RELAY_REDIS_SENTINEL_SERVICE is missing: allowed: the name of the primary"):
        target(REDIS_SENTINELS="s1:26379")
    found = target(REDIS_SENTINELS="redis://:pw@s1:26379,redis://:pw@s2:26379", REDIS_SENTINEL_SERVICE="mymaster")
    assert (found.topology, found.service, found.nodes) == ("sentinel", "mymaster", (("s1", 26379), ("s2", 26379)))
    assert found.password == found.sentinel_password == "pw" and "pw" not in found.where


def test_a_sentinel_service_without_sentinels_is_refused():
    with pytest.raises(ConfigError, match="^RELAY_REDIS_SENTINELS is missing: allowed: comma-separated host:port"):
        target(REDIS_URL="redis://r", REDIS_SENTINEL_SERVICE="mymaster")


@pytest.mark.parametrize("first, second", [("REDIS_URL", "REDIS_CLUSTER_NODES"), ("REDIS_URL", "REDIS_SENTINELS"),
                                           ("REDIS_CLUSTER_NODES", "REDIS_SENTINELS")])
def test_two_topologies_at_once_are_refused(first, second):
    values = {"REDIS_URL": "redis://r:6379", "REDIS_CLUSTER_NODES": "r:7000", "REDIS_SENTINELS": "s:26379"}
    with pytest.raises(ConfigError, match=f"^RELAY_{second} is invalid together with RELAY_{first}: allowed: one of"):
        target(**{first: values[first], second: values[second]}, REDIS_SENTINEL_SERVICE="m")


def test_redis_state_alone_uses_litellms_cluster_nodes_with_its_credentials():
    env = {"REDIS_CLUSTER_NODES": '[{"host": "c1", "port": 7000}, {"host": "c2", "port": "7001"}]',
           "REDIS_PASSWORD": "secret", "REDIS_USERNAME": "app", "REDIS_SSL": "True", "REDIS_HOST": "ignored"}
    found = target(env, STATE="redis")
    assert (found.topology, found.nodes, found.username, found.password, found.tls) == (
        "cluster", (("c1", 7000), ("c2", 7001)), "app", "secret", True)


def test_redis_state_alone_uses_litellms_sentinel_nodes_and_service_name():
    env = {"REDIS_SENTINEL_NODES": '[["s1", 26379], ["s2", 26380]]', "REDIS_SERVICE_NAME": "mymaster",
           "REDIS_PASSWORD": "data-pw", "REDIS_SENTINEL_PASSWORD": "sentinel-pw"}
    found = target(env, STATE="redis")
    assert (found.topology, found.nodes, found.service) == ("sentinel", (("s1", 26379), ("s2", 26380)), "mymaster")
    assert (found.password, found.sentinel_password) == ("data-pw", "sentinel-pw")
    assert target({**env, "REDIS_SERVICE_NAME": ""}, STATE="redis", REDIS_SENTINEL_SERVICE="other").service == "other"


@pytest.mark.parametrize("name, raw", [("REDIS_CLUSTER_NODES", "c1:7000"), ("REDIS_CLUSTER_NODES", "[]"),
                                       ("REDIS_CLUSTER_NODES", '[{"host": "c1"}]'), ("REDIS_SENTINEL_NODES", '[{"host": "s"}]')])
def test_litellms_node_lists_in_another_format_are_refused_with_the_format(name, raw):
    with pytest.raises(ConfigError, match=f"^{name} is invalid: allowed: LiteLLM's JSON list"):
        target({name: raw, "REDIS_SERVICE_NAME": "m"}, STATE="redis")


def test_the_relays_own_settings_win_over_litellms():
    env = {"REDIS_CLUSTER_NODES": '[{"host": "c1", "port": 7000}]', "REDIS_SENTINEL_NODES": '[["s", 1]]'}
    assert target(env, REDIS_URL="redis://mine:6379").url == "redis://mine:6379"
    assert target(env, REDIS_SENTINELS="mine:26379", REDIS_SENTINEL_SERVICE="m").nodes == (("mine", 26379),)


def test_a_prefix_with_braces_is_refused_on_a_cluster_where_it_would_move_keys_between_slots():
    with pytest.raises(ConfigError, match=r"^RELAY_REDIS_PREFIX='a\{b' is invalid: allowed: a prefix without"):
        target(REDIS_CLUSTER_NODES="c:7000", REDIS_PREFIX="a{b")
    assert target(REDIS_URL="redis://r", REDIS_PREFIX="a{b").topology == "single"


def test_make_store_builds_a_cluster_or_sentinel_client_bounded_by_the_timeout():
    from redis.asyncio import Redis
    from redis.asyncio.cluster import RedisCluster

    store = relay_plugin.make_store(config(REDIS_CLUSTER_NODES="redis://:pw@127.0.0.1:1", REDIS_TIMEOUT_S="0.3"), {})
    assert isinstance(store.primary.client, RedisCluster) and store.bound_s == 0.3
    assert store.primary.where == "redis cluster 127.0.0.1:1" and "pw" not in repr(store)
    store = relay_plugin.make_store(config(REDIS_SENTINELS="127.0.0.1:1", REDIS_SENTINEL_SERVICE="m"), {})
    assert isinstance(store.primary.client, Redis) and store.primary.where == "redis sentinel 127.0.0.1:1 service m"


def test_the_plugin_imports_redis_only_when_a_cluster_or_sentinel_is_named():
    assert run_import({"RELAY_REDIS_CLUSTER_NODES": "127.0.0.1:1"}).stdout.split() == ["FailoverStore", "True"]
    done = run_import({"RELAY_REDIS_SENTINELS": "127.0.0.1:1"})
    assert done.returncode == 2 and done.stderr.startswith(
        "relay_plugin: invalid configuration: RELAY_REDIS_SENTINEL_SERVICE is missing"
    )
