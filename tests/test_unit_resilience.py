"""The resilience layer, in process: circuit breaker, budget, retries, deadline and cache.

Time never passes by sleeping: the breaker and retries read an injected monotonic ``clock``, the budget
windows and cache an injected ``wall`` clock, and tests move them. Only the deadline (an
``asyncio.timeout`` on the event loop) runs on real time, with a deadline of a few hundredths of a second.
"""

import asyncio
import itertools
import random
from functools import partial
from types import SimpleNamespace

import pytest
from fastapi import HTTPException

import relay_plugin
from relay_plugin import Breaker, LocalStore, RelayHandler, Reply, SecondaryError
from tests import support
from tests.support import HANG, FakeClock, FakeSecondary, chat_response, make_handler

_real_sleep = asyncio.sleep  # some tests replace asyncio.sleep with a recorder
_call_ids = itertools.count()

MODEL = "sec"
CLOSED, OPEN, HALF_OPEN = relay_plugin.STATE_CLOSED, relay_plugin.STATE_OPEN, relay_plugin.STATE_HALF_OPEN

#: Binary-exact prices, so budget figures compare with ==. With a prompt bound of 26 tokens and 38 output
#: tokens the worst case of one call is (26 + 38) / 1024 = 64 / 1024 = 0.0625 USD.
PRICE = (2.0 ** -10, 2.0 ** -10)
PROMPT_TOKENS = 26
MAX_TOKENS = "38"
WORST = 0.0625
ACTUAL = 0.046875  # what one call really costs: 48 / 1024, below the worst case


def is_probe(permit) -> bool:
    """Probe permits name the half-open period they belong to: ``probe:<n>`` (a Breaker's own token, or
    the token of the store's Permit)."""
    token = permit.token if isinstance(permit, relay_plugin.Permit) else permit
    return isinstance(token, str) and token.startswith("probe:")


def probes_in(permits) -> int:
    return sum(is_probe(p) for p in permits)


# ----- helpers ------------------------------------------------------------------------------


def failing(reason: str, *, retryable: bool = False, retry_after: float | None = None) -> SecondaryError:
    return SecondaryError(reason, f"fake {reason}", retryable=retryable, retry_after=retry_after)


#: a config from ``NAME=value`` pairs (without the RELAY_ prefix), secondary ``sec``, no retries
config = partial(support.config, SECONDARY_MODEL=MODEL, RETRIES="0")


def priced(monkeypatch, handler: RelayHandler, price=PRICE) -> None:
    """Make the worst-case estimate of every call exactly ``WORST`` (with ``SECONDARY_MAX_TOKENS=38``)."""
    monkeypatch.setattr(handler, "price", lambda model: price)
    monkeypatch.setattr(relay_plugin, "prompt_token_bound", lambda messages: PROMPT_TOKENS)


def request(metadata: dict | None = None) -> dict:
    return {"model": "llama", "messages": [{"role": "user", "content": "q"}],
            "litellm_call_id": f"call-{next(_call_ids)}", "metadata": dict(metadata or {})}


async def relay(handler: RelayHandler, answer: str = "primary", *, key: str | None = "sk-caller-a",
                metadata: dict | None = None, response=None):
    """Run the success hook for one request; returns ``(outcome, response)``."""
    data = request(metadata)
    response = response if response is not None else chat_response(answer)
    user = SimpleNamespace(api_key=key)
    await handler.async_post_call_success_hook(data, user, response)
    return relay_plugin._proxy_metadata(data)["relay_result"], response


async def until(condition, limit: int = 10_000) -> None:
    """Let the event loop run until ``condition()`` holds (never waits on real time)."""
    for _ in range(limit):
        if condition():
            return
        await _real_sleep(0)
    raise AssertionError("the condition never held")


def bare_breaker(**overrides) -> Breaker:
    settings = {"failure_rate": 0.5, "window": 10, "min_calls": 4, "cooldown_s": 30.0, "probes": 3}
    settings.update(overrides)
    return Breaker(**settings)


def trip(breaker: Breaker, clock: FakeClock, failures: int = 4) -> None:
    for _ in range(failures):
        breaker.record(breaker.acquire(clock()), True, clock())


async def trip_store(handler: RelayHandler, model: str = MODEL) -> None:
    """Open ``model``'s breaker through the store interface, with as many failures as the minimum."""
    for _ in range(handler.config.breaker_min_calls):
        permit = await handler.store.breaker_acquire(model, handler.clock())
        await handler.store.breaker_record(model, permit, True, handler.clock())
    assert handler.store.breakers[model].state == OPEN


BREAKER_ENV = {"BREAKER_MIN_CALLS": "4", "BREAKER_WINDOW": "10", "BREAKER_FAILURE_RATE": "0.5",
               "BREAKER_COOLDOWN_S": "30", "BREAKER_PROBES": "3", "BREAKER_SLOW_S": "2"}


breaker_config = partial(config, **BREAKER_ENV)


# ----- breaker: the bare state machine ----------------------------------------------------------------


def test_a_half_open_breaker_admits_exactly_the_configured_probes_among_fifty_callers():
    clock = FakeClock()
    breaker = bare_breaker(probes=3)
    trip(breaker, clock)
    clock.advance(30)

    permits = [breaker.acquire(clock()) for _ in range(50)]

    assert probes_in(permits) == 3
    assert permits.count(None) == 47
    assert all(is_probe(p) for p in permits[:3])
    assert breaker.probes_in_flight == 3


async def test_the_store_admits_exactly_the_configured_probes_to_fifty_concurrent_callers():
    clock = FakeClock()
    store = LocalStore(breaker_config())
    for _ in range(4):
        await store.breaker_record(MODEL, await store.breaker_acquire(MODEL, clock()), True, clock())
    clock.advance(30)

    permits = await asyncio.gather(*(store.breaker_acquire(MODEL, clock()) for _ in range(50)))

    assert probes_in(permits) == 3
    assert permits.count(None) == 47
    assert await store.breaker_state(MODEL, clock()) == HALF_OPEN


def test_fifty_simultaneous_failures_open_the_breaker_exactly_once():
    clock = FakeClock()
    breaker = bare_breaker()
    permits = [breaker.acquire(clock()) for _ in range(50)]  # all admitted while closed
    assert permits == ["call"] * 50

    for permit in permits:
        breaker.record(permit, True, clock())

    assert breaker.opened_count == 1
    assert breaker.state == OPEN
    assert breaker.opened_at == clock()


def test_the_breaker_is_still_open_just_before_the_cooldown_ends_and_half_open_once_it_has():
    clock = FakeClock()
    breaker = bare_breaker()
    trip(breaker, clock)
    opened_at = clock()

    clock.now = opened_at + 30 - 1e-6
    assert breaker.current_state(clock()) == OPEN
    assert breaker.allows(clock()) is False
    assert breaker.acquire(clock()) is None

    clock.now = opened_at + 30
    assert breaker.current_state(clock()) == HALF_OPEN
    assert breaker.allows(clock()) is True
    assert is_probe(breaker.acquire(clock()))


def test_fewer_failed_calls_than_the_minimum_never_open_the_breaker():
    clock = FakeClock()
    breaker = bare_breaker(min_calls=4)

    trip(breaker, clock, failures=3)
    assert breaker.state == CLOSED
    assert breaker.opened_count == 0
    assert list(breaker.results) == [True, True, True]

    trip(breaker, clock, failures=1)
    assert breaker.state == OPEN
    assert breaker.opened_count == 1


def test_the_failure_rate_must_reach_the_threshold_over_the_window():
    clock = FakeClock()
    breaker = bare_breaker(failure_rate=0.5, min_calls=4)
    for failed in (False, False, True):
        breaker.record(breaker.acquire(clock()), failed, clock())
    breaker.record(breaker.acquire(clock()), False, clock())  # 1 of 4 failed: 25 %
    assert breaker.state == CLOSED

    breaker.record(breaker.acquire(clock()), True, clock())  # 2 of 5: 40 %
    assert breaker.state == CLOSED
    breaker.record(breaker.acquire(clock()), True, clock())  # 3 of 6: 50 %
    assert breaker.state == OPEN


def test_one_failed_probe_reopens_the_breaker_and_restarts_the_cooldown():
    clock = FakeClock()
    breaker = bare_breaker(probes=3)
    trip(breaker, clock)
    clock.advance(30)
    first, second = breaker.acquire(clock()), breaker.acquire(clock())

    breaker.record(first, False, clock())
    assert breaker.state == HALF_OPEN
    clock.advance(1)
    breaker.record(second, True, clock())

    assert breaker.state == OPEN
    assert breaker.opened_count == 2
    assert breaker.opened_at == clock()
    clock.advance(30 - 1e-6)
    assert breaker.acquire(clock()) is None
    clock.advance(1e-6)
    assert is_probe(breaker.acquire(clock()))


def test_as_many_probe_successes_as_configured_probes_close_the_breaker():
    clock = FakeClock()
    breaker = bare_breaker(probes=3)
    trip(breaker, clock)
    clock.advance(30)
    probes = [breaker.acquire(clock()) for _ in range(3)]

    breaker.record(probes[0], False, clock())
    breaker.record(probes[1], False, clock())
    assert breaker.state == HALF_OPEN
    breaker.record(probes[2], False, clock())

    assert breaker.state == CLOSED
    assert len(breaker.results) == 0
    assert breaker.acquire(clock()) == "call"
    assert breaker.opened_count == 1


def test_a_released_probe_permit_lets_another_probe_in():
    clock = FakeClock()
    breaker = bare_breaker(probes=1)
    trip(breaker, clock)
    clock.advance(30)
    probe = breaker.acquire(clock())
    assert breaker.acquire(clock()) is None

    breaker.release(probe)

    assert breaker.probes_in_flight == 0
    assert breaker.state == HALF_OPEN
    assert is_probe(breaker.acquire(clock()))


@pytest.mark.parametrize("late_probe_ends", ["succeeded", "cancelled"])
def test_a_probe_still_running_from_an_earlier_half_open_period_does_not_widen_the_next_one(late_probe_ends):
    clock = FakeClock()
    breaker = bare_breaker(probes=2)
    trip(breaker, clock)
    clock.advance(30)
    failing_probe, late_probe = breaker.acquire(clock()), breaker.acquire(clock())
    breaker.record(failing_probe, True, clock())  # reopens while late_probe is still running
    clock.advance(30)
    assert breaker.current_state(clock()) == HALF_OPEN

    if late_probe_ends == "succeeded":
        breaker.record(late_probe, False, clock())
    else:
        breaker.release(late_probe)
    permits = [breaker.acquire(clock()) for _ in range(5)]

    assert probes_in(permits) == 2, f"{permits} {breaker!r}"
    assert breaker.probes_in_flight == 2


def test_breaker_repr_names_the_state_failures_probes_and_open_count():
    clock = FakeClock()
    breaker = bare_breaker(probes=3)
    assert repr(breaker) == "<Breaker closed failures=0/0 probes=0/3 opened=0>"

    breaker.record(breaker.acquire(clock()), True, clock())
    breaker.record(breaker.acquire(clock()), False, clock())
    assert repr(breaker) == "<Breaker closed failures=1/2 probes=0/3 opened=0>"

    trip(breaker, clock, failures=2)
    assert repr(breaker) == "<Breaker open failures=0/0 probes=0/3 opened=1>"

    clock.advance(30)
    breaker.acquire(clock())
    breaker.acquire(clock())
    assert repr(breaker) == "<Breaker half_open failures=0/0 probes=2/3 opened=1>"


async def test_local_store_repr_counts_its_counters_breakers_and_cache_entries():
    store = LocalStore(config(CACHE_TTL_S="60"))
    assert repr(store) == "<LocalStore counters=0 breakers=0 cache=0>"

    await store.reserve([("spend:0", 1.0, 0.5), ("calls:0", 5.0, 1.0)])
    await store.breaker_acquire(MODEL, 0.0)
    await store.cache_put("k", "text", 0.0)

    assert repr(store) == "<LocalStore counters=2 breakers=1 cache=1>"


# ----- breaker: through RelayHandler ------------------------------------------------------------------


async def test_a_half_open_breaker_lets_exactly_the_configured_probes_reach_the_secondary_among_fifty_relays():
    clock, gate = FakeClock(), asyncio.Event()
    fake = FakeSecondary(gate=gate)
    handler = make_handler(fake, breaker_config(BREAKER_PROBES="3"), clock=clock)
    await trip_store(handler)
    clock.advance(30)

    running = asyncio.gather(*(relay(handler) for _ in range(50)))
    await until(lambda: len(fake.calls) + handler.stats["skipped:breaker_open"] == 50)

    assert len(fake.calls) == 3  # all fifty are in flight together; three of them reached the fake
    assert handler.store.breakers[MODEL].probes_in_flight == 3
    gate.set()
    outcomes = [outcome.result for outcome, _ in await running]

    assert outcomes.count("modified") == 3
    assert outcomes.count("skipped:breaker_open") == 47
    assert len(fake.calls) == 3
    assert handler.store.breakers[MODEL].state == CLOSED


async def test_fifty_concurrent_failing_relays_open_the_breaker_exactly_once():
    clock, gate = FakeClock(), asyncio.Event()
    fake = FakeSecondary(failing("provider_error", retryable=True), gate=gate)
    handler = make_handler(fake, breaker_config(), clock=clock)

    running = asyncio.gather(*(relay(handler) for _ in range(50)))
    await until(lambda: len(fake.calls) == 50)
    gate.set()
    outcomes = [outcome.result for outcome, _ in await running]

    assert outcomes == ["failed:provider_error"] * 50
    breaker = handler.store.breakers[MODEL]
    assert breaker.opened_count == 1
    assert breaker.state == OPEN


async def test_slow_successful_calls_alone_open_the_breaker():
    clock = FakeClock()
    fake = FakeSecondary(clock=clock, takes=2.5)  # slower than BREAKER_SLOW_S=2, and successful
    handler = make_handler(fake, breaker_config(), clock=clock)

    outcomes = [(await relay(handler))[0].result for _ in range(4)]

    assert outcomes == ["modified"] * 4
    assert handler.store.breakers[MODEL].state == OPEN
    assert handler.store.breakers[MODEL].opened_count == 1
    blocked, _ = await relay(handler)
    assert blocked.result == "skipped:breaker_open"
    assert len(fake.calls) == 4


async def test_calls_that_take_exactly_the_slow_threshold_are_not_slow():
    clock = FakeClock()
    fake = FakeSecondary(clock=clock, takes=2.0)
    handler = make_handler(fake, breaker_config(), clock=clock)

    for _ in range(8):
        assert (await relay(handler))[0].result == "modified"

    breaker = handler.store.breakers[MODEL]
    assert breaker.state == CLOSED
    assert list(breaker.results) == [False] * 8


async def test_fewer_failed_relays_than_the_minimum_never_open_the_breaker():
    fake = FakeSecondary(failing("provider_error"))
    handler = make_handler(fake, breaker_config(BREAKER_MIN_CALLS="5"))

    for _ in range(4):
        assert (await relay(handler))[0].result == "failed:provider_error"
    assert handler.store.breakers[MODEL].state == CLOSED

    assert (await relay(handler))[0].result == "failed:provider_error"
    assert handler.store.breakers[MODEL].state == OPEN
    assert (await relay(handler))[0].result == "skipped:breaker_open"
    assert len(fake.calls) == 5


async def test_a_probe_cancelled_mid_call_gives_its_permit_back():
    clock, gate = FakeClock(), asyncio.Event()
    fake = FakeSecondary(gate=gate)
    handler = make_handler(fake, breaker_config(BREAKER_PROBES="1"), clock=clock)
    await trip_store(handler)
    clock.advance(30)
    probe = asyncio.create_task(relay(handler))
    await until(lambda: len(fake.calls) == 1)
    assert handler.store.breakers[MODEL].probes_in_flight == 1
    assert (await relay(handler))[0].result == "skipped:breaker_open"  # the one permit is taken

    probe.cancel()
    with pytest.raises(asyncio.CancelledError):
        await probe

    assert fake.cancelled == [MODEL]
    breaker = handler.store.breakers[MODEL]
    assert breaker.probes_in_flight == 0
    assert breaker.state == HALF_OPEN
    gate.set()
    outcome, _ = await relay(handler)
    assert outcome.result == "modified"
    assert len(fake.calls) == 2
    assert breaker.state == CLOSED


async def test_one_failed_probe_relay_reopens_the_breaker():
    clock = FakeClock()
    fake = FakeSecondary(["refined", failing("timeout", retryable=True)])
    handler = make_handler(fake, breaker_config(BREAKER_PROBES="3"), clock=clock)
    await trip_store(handler)
    clock.advance(30)

    assert (await relay(handler))[0].result == "modified"
    assert handler.store.breakers[MODEL].state == HALF_OPEN
    assert (await relay(handler))[0].result == "failed:timeout"

    breaker = handler.store.breakers[MODEL]
    assert breaker.state == OPEN
    assert breaker.opened_count == 2
    assert (await relay(handler))[0].result == "skipped:breaker_open"
    assert len(fake.calls) == 2


async def test_as_many_successful_probe_relays_as_configured_probes_close_the_breaker():
    clock = FakeClock()
    fake = FakeSecondary()
    handler = make_handler(fake, breaker_config(BREAKER_PROBES="2"), clock=clock)
    await trip_store(handler)
    clock.advance(30)

    assert (await relay(handler))[0].result == "modified"
    assert handler.store.breakers[MODEL].state == HALF_OPEN
    assert (await relay(handler))[0].result == "modified"

    assert handler.store.breakers[MODEL].state == CLOSED
    assert handler.store.breakers[MODEL].opened_count == 1


async def test_rejected_requests_do_not_count_against_the_model():
    fake = FakeSecondary(failing("provider_rejected"))
    handler = make_handler(fake, breaker_config())

    outcomes = [(await relay(handler))[0].result for _ in range(8)]

    assert outcomes == ["failed:provider_rejected"] * 8
    breaker = handler.store.breakers[MODEL]
    assert breaker.state == CLOSED
    assert list(breaker.results) == [False] * 8


async def test_bad_verdicts_do_not_count_against_the_model():
    fake = FakeSecondary("I think it is fine.")  # not the strict JSON verdict
    handler = make_handler(fake, breaker_config(MODE="guard"))

    outcomes = [(await relay(handler))[0].result for _ in range(8)]

    assert outcomes == ["failed:bad_verdict"] * 8
    breaker = handler.store.breakers[MODEL]
    assert breaker.state == CLOSED
    assert list(breaker.results) == [False] * 8


async def test_while_open_the_relay_is_skipped_and_the_secondary_is_not_called():
    clock = FakeClock()
    fake = FakeSecondary()
    handler = make_handler(fake, breaker_config(), clock=clock)
    await trip_store(handler)
    clock.advance(30 - 1e-6)

    outcome, response = await relay(handler)

    assert outcome.result == "skipped:breaker_open"
    assert outcome.reason == "the circuit breaker of sec is open"
    assert outcome.headers()["x-relay-outcome"] == "skipped:breaker_open"
    assert outcome.headers()["x-relay-secondary-model"] == "sec"
    assert response.choices[0].message.content == "primary"
    assert fake.calls == []
    assert handler.stats["skipped:breaker_open"] == 1


# ----- budget -----------------------------------------------------------------------------------------


async def test_a_thousand_relays_released_together_spend_no_more_than_a_cap_that_affords_a_hundred_calls(monkeypatch):
    gate, wall = asyncio.Event(), FakeClock(1_000_000.0)
    fake = FakeSecondary(cost=ACTUAL, gate=gate)
    handler = make_handler(fake, config(BUDGET_USD="6.25", SECONDARY_MAX_TOKENS=MAX_TOKENS), wall=wall)
    priced(monkeypatch, handler)
    spend = f"spend:{int(wall.now // 86400)}"

    running = asyncio.gather(*(relay(handler) for _ in range(1000)))
    await until(lambda: len(fake.calls) + handler.stats["skipped:budget"] == 1000)
    reserved_at_peak = handler.store.counters[spend]
    gate.set()
    results = await running

    assert reserved_at_peak == 100 * WORST == 6.25
    outcomes = [outcome.result for outcome, _ in results]
    assert outcomes.count("modified") == 100
    assert outcomes.count("skipped:budget") == 900
    assert len(fake.calls) == 100
    actual_total = sum(outcome.cost_usd for outcome, _ in results)
    assert actual_total == 100 * ACTUAL == 4.6875
    assert handler.store.counters == {spend: actual_total}  # nothing stays reserved
    assert handler.store.counters[spend] <= 6.25


async def test_per_key_caps_isolate_the_keys(monkeypatch):
    fake = FakeSecondary(cost=ACTUAL)
    handler = make_handler(fake, config(BUDGET_USD_PER_KEY=str(WORST), SECONDARY_MAX_TOKENS=MAX_TOKENS))
    priced(monkeypatch, handler)

    first_a, _ = await relay(handler, key="sk-key-a")
    second_a, response = await relay(handler, key="sk-key-a")
    first_b, _ = await relay(handler, key="sk-key-b")

    assert first_a.result == "modified"
    assert second_a.result == "skipped:budget"
    assert response.choices[0].message.content == "primary"
    assert first_b.result == "modified"
    assert len(fake.calls) == 2
    key_a, key_b = (
        relay_plugin._key_id(SimpleNamespace(api_key="sk-key-a")),
        relay_plugin._key_id(SimpleNamespace(api_key="sk-key-b")),
    )
    assert handler.store.counters == {f"spend:key:{key_a}:0": ACTUAL, f"spend:key:{key_b}:0": ACTUAL}


async def test_the_budget_window_rolls_over(monkeypatch):
    wall = FakeClock(0.0)
    fake = FakeSecondary(cost=ACTUAL)
    handler = make_handler(fake, config(BUDGET_USD=str(WORST), BUDGET_WINDOW_S="60", SECONDARY_MAX_TOKENS=MAX_TOKENS),
                           wall=wall)
    priced(monkeypatch, handler)

    assert (await relay(handler))[0].result == "modified"
    wall.now = 59.999
    assert (await relay(handler))[0].result == "skipped:budget"
    wall.now = 60.0
    assert (await relay(handler))[0].result == "modified"

    assert len(fake.calls) == 2
    assert handler.store.counters == {"spend:0": ACTUAL, "spend:1": ACTUAL}


async def test_max_calls_caps_the_number_of_secondary_calls_per_window(monkeypatch):
    fake = FakeSecondary(cost=ACTUAL)
    handler = make_handler(fake, config(MAX_CALLS="2"))
    monkeypatch.setattr(handler, "price", lambda model: None)  # a count cap needs no price

    outcomes = [(await relay(handler))[0].result for _ in range(3)]

    assert outcomes == ["modified", "modified", "skipped:budget"]
    assert len(fake.calls) == 2
    assert handler.store.counters == {"calls:0": 2.0}


async def test_a_budget_refusal_is_skipped_budget_and_leaves_the_answer_alone():
    fake = FakeSecondary()
    handler = make_handler(fake, config(MAX_CALLS="0"))

    outcome, response = await relay(handler)

    assert outcome.result == "skipped:budget"
    assert outcome.reason == "the relay budget of this window cannot cover a call to sec"
    assert outcome.headers()["x-relay-cost-usd"] == "0"
    assert response.choices[0].message.content == "primary"
    assert fake.calls == []
    assert handler.store.counters == {}


async def test_a_failed_call_gives_its_reserved_spend_back_but_still_counts_as_a_call(monkeypatch):
    seen_during_call = []
    fake = FakeSecondary(["refined", failing("provider_rejected")], cost=ACTUAL)
    handler = make_handler(fake, config(BUDGET_USD="1", MAX_CALLS="10", SECONDARY_MAX_TOKENS=MAX_TOKENS))
    fake.on_call = lambda model: seen_during_call.append(dict(handler.store.counters))
    priced(monkeypatch, handler)

    assert (await relay(handler))[0].result == "modified"
    failed, _ = await relay(handler)

    assert failed.result == "failed:provider_rejected"
    # the reservation was held while each call ran
    assert seen_during_call == [{"spend:0": WORST, "calls:0": 1.0}, {"spend:0": ACTUAL + WORST, "calls:0": 2.0}]
    # the failed call reached the provider: its spend settles at 0, the call itself stays counted
    assert handler.store.counters == {"spend:0": ACTUAL, "calls:0": 2.0}
    assert failed.cost_usd == 0.0


async def test_a_call_whose_answer_nobody_read_keeps_its_worst_case_on_the_caps(monkeypatch):
    """A provider that did not answer in time may still bill the whole answer (it went on generating),
    and one whose answer could not be read billed it: the call keeps the worst case it held; a call the
    provider refused settles at 0 (it still counts as a call)."""
    fake = FakeSecondary([failing("timeout"), failing("bad_response"), failing("provider_error")], cost=ACTUAL)
    handler = make_handler(fake, config(BUDGET_USD="1", MAX_CALLS="10", SECONDARY_MAX_TOKENS=MAX_TOKENS))
    priced(monkeypatch, handler)

    outcomes = [(await relay(handler))[0].result for _ in range(3)]

    assert outcomes == ["failed:timeout", "failed:bad_response", "failed:provider_error"]
    assert handler.store.counters == {"spend:0": 2 * WORST, "calls:0": 3.0}


async def test_a_call_cancelled_mid_answer_keeps_its_worst_case_on_the_caps(monkeypatch):
    """The request left (a client that read part of a streamed answer and hung up) while the provider
    was answering: the provider bills what it generated, which nobody learns, so the call keeps the
    worst case it held (giving it back made every abandoned answer free to the caps)."""
    gate = asyncio.Event()
    fake = FakeSecondary(cost=ACTUAL, gate=gate)
    handler = make_handler(fake, config(BUDGET_USD="1", MAX_CALLS="10", SECONDARY_MAX_TOKENS=MAX_TOKENS))
    priced(monkeypatch, handler)
    gate.set()
    await relay(handler)
    before = dict(handler.store.counters)
    assert before == {"spend:0": ACTUAL, "calls:0": 1.0}
    gate.clear()

    task = asyncio.create_task(relay(handler))
    await until(lambda: len(fake.calls) == 2)
    assert handler.store.counters == {"spend:0": ACTUAL + WORST, "calls:0": 2.0}
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert fake.cancelled == [MODEL]
    assert handler.store.counters == {"spend:0": ACTUAL + WORST, "calls:0": 2.0}


async def test_a_call_cut_by_the_deadline_keeps_its_worst_case_and_gives_its_probe_permit_back(monkeypatch):
    clock = FakeClock()
    fake = FakeSecondary(HANG, cost=ACTUAL)
    handler = make_handler(fake, config(BUDGET_USD="1", MAX_CALLS="10", SECONDARY_MAX_TOKENS=MAX_TOKENS,
                                        DEADLINE_S="0.05", TIMEOUT_S="0.05", **BREAKER_ENV), clock=clock)
    priced(monkeypatch, handler)
    await trip_store(handler)
    clock.advance(30)

    outcome, _ = await relay(handler)

    assert outcome.result == "failed:timeout"
    assert handler.store.counters == {"spend:0": WORST, "calls:0": 1.0}  # cut while the provider worked on it
    assert handler.store.breakers[MODEL].probes_in_flight == 0


async def test_an_unpriced_secondary_is_skipped_when_a_usd_cap_is_set(monkeypatch):
    fake = FakeSecondary()
    handler = make_handler(fake, config(BUDGET_USD="1"))
    monkeypatch.setattr(handler, "price", lambda model: None)

    outcome, response = await relay(handler)

    assert outcome.result == "skipped:unpriced"
    assert outcome.reason == "no price is known for sec (RELAY_ALLOW_UNPRICED=true allows it)"
    assert response.choices[0].message.content == "primary"
    assert fake.calls == []
    assert handler.store.counters == {}


async def test_an_unpriced_secondary_is_allowed_with_allow_unpriced_and_settles_its_actual_cost(monkeypatch):
    fake = FakeSecondary(cost=0.25)
    handler = make_handler(fake, config(BUDGET_USD="1", ALLOW_UNPRICED="true"))
    monkeypatch.setattr(handler, "price", lambda model: None)

    outcome, _ = await relay(handler)

    assert outcome.result == "modified"
    assert len(fake.calls) == 1
    assert handler.store.counters == {"spend:0": 0.25}


async def test_fail_closed_guard_blocks_the_answer_when_the_budget_refuses():
    fake = FakeSecondary('{"verdict": "allow", "reason": "ok"}')
    handler = make_handler(fake, config(MODE="guard", FAIL_MODE="closed", MAX_CALLS="0"))

    outcome, response = await relay(handler)

    assert outcome.result == "blocked"
    assert outcome.reason == "unjudged (the relay budget of this window cannot cover a call to sec); fail-closed"
    assert response.choices[0].message.content == relay_plugin.DEFAULT_GUARD_MESSAGE
    assert response.choices[0].finish_reason == "content_filter"
    assert fake.calls == []


async def test_fail_closed_refine_answers_503_when_the_budget_refuses():
    fake = FakeSecondary()
    handler = make_handler(fake, config(FAIL_MODE="closed", MAX_CALLS="0"))
    data = request()

    with pytest.raises(HTTPException) as raised:
        await handler.async_post_call_success_hook(data, SimpleNamespace(api_key="k"), chat_response())

    assert raised.value.status_code == 503
    assert raised.value.detail == ("relay refine failed (skipped:budget): the relay budget of this window "
                                   "cannot cover a call to sec; fail-closed")
    assert raised.value.headers["x-relay-outcome"] == "skipped:budget"
    assert relay_plugin._proxy_metadata(data)["relay_result"].result == "skipped:budget"
    assert fake.calls == []


# ----- retries ----------------------------------------------------------------------------------------


@pytest.fixture
def sleeps(monkeypatch):
    """Replace asyncio.sleep with a recorder that moves the test's fake clock instead of waiting."""
    record = SimpleNamespace(delays=[], clock=FakeClock())

    async def fake_sleep(delay, result=None):
        record.delays.append(delay)
        record.clock.advance(delay)
        await _real_sleep(0)
        return result

    monkeypatch.setattr(relay_plugin.asyncio, "sleep", fake_sleep)
    return record


async def test_a_retryable_error_is_retried_exactly_relay_retries_times_then_fails(sleeps):
    fake = FakeSecondary(failing("provider_error", retryable=True))
    handler = make_handler(fake, config(RETRIES="3"), clock=sleeps.clock)

    outcome, response = await relay(handler)

    assert outcome.result == "failed:provider_error"
    assert len(fake.calls) == 4
    assert len(sleeps.delays) == 3
    assert handler.stats["retries"] == 3
    assert response.choices[0].message.content == "primary"


async def test_a_retried_call_that_then_succeeds_is_relayed(sleeps):
    fake = FakeSecondary([failing("connection", retryable=True), "refined"], cost=0.5)
    handler = make_handler(fake, config(RETRIES="3"), clock=sleeps.clock)

    outcome, response = await relay(handler)

    assert outcome.result == "modified"
    assert response.choices[0].message.content == "refined"
    assert len(fake.calls) == 2
    assert outcome.cost_usd == 0.5
    assert handler.stats["retries"] == 1


async def test_a_non_retryable_error_is_not_retried(sleeps):
    fake = FakeSecondary(failing("provider_rejected", retryable=False))
    handler = make_handler(fake, config(RETRIES="3"), clock=sleeps.clock)

    outcome, _ = await relay(handler)

    assert outcome.result == "failed:provider_rejected"
    assert len(fake.calls) == 1
    assert sleeps.delays == []
    assert handler.stats["retries"] == 0


async def test_retry_after_is_honoured(sleeps):
    fake = FakeSecondary([failing("rate_limited", retryable=True, retry_after=2.5), "refined"])
    handler = make_handler(fake, config(RETRIES="1", RETRY_BASE_S="0.25"), clock=sleeps.clock)

    outcome, _ = await relay(handler)

    assert outcome.result == "modified"
    assert len(sleeps.delays) == 1
    assert sleeps.delays[0] >= 2.5
    assert sleeps.delays == [2.5]  # the jitter (at most 0.25 s) is below the server's wish


async def test_no_retry_starts_when_retry_after_reaches_past_the_deadline(sleeps):
    fake = FakeSecondary(failing("rate_limited", retryable=True, retry_after=5.0))
    handler = make_handler(fake, config(RETRIES="3", DEADLINE_S="1", TIMEOUT_S="1"), clock=sleeps.clock)

    outcome, _ = await relay(handler)

    assert outcome.result == "failed:rate_limited"
    assert len(fake.calls) == 1
    assert sleeps.delays == []
    assert handler.stats["retries"] == 0


async def test_retries_stop_once_the_next_backoff_would_end_past_the_deadline(sleeps):
    fake = FakeSecondary(failing("rate_limited", retryable=True, retry_after=4.0))
    handler = make_handler(fake, config(RETRIES="5", DEADLINE_S="10", TIMEOUT_S="5"), clock=sleeps.clock)

    outcome, _ = await relay(handler)

    assert outcome.result == "failed:rate_limited"
    assert sleeps.delays == [4.0, 4.0]  # at 8 s a third wait of 4 s would end at the 10 s deadline
    assert [call.timeout for call in fake.calls] == [5.0, 5.0, 2.0]  # the last call gets what is left


async def test_backoff_delays_are_full_jitter_under_the_exponential_cap(sleeps):
    fake = FakeSecondary(failing("provider_error", retryable=True))
    handler = make_handler(fake, config(RETRIES="5", RETRY_BASE_S="0.25", RETRY_MAX_S="1", DEADLINE_S="60"),
                           clock=sleeps.clock)

    await relay(handler)

    caps = [min(1.0, 0.25 * 2 ** n) for n in range(5)]
    assert caps == [0.25, 0.5, 1.0, 1.0, 1.0]
    assert len(sleeps.delays) == 5
    assert all(0 <= delay <= cap for delay, cap in zip(sleeps.delays, caps, strict=False))
    same_seed = random.Random(0)
    assert sleeps.delays == [cap * same_seed.random() for cap in caps]


# ----- deadline ---------------------------------------------------------------------------------------


def other_tasks() -> set:
    return asyncio.all_tasks() - {asyncio.current_task()}


async def test_a_secondary_slower_than_the_deadline_fails_with_timeout_and_leaves_no_task_running():
    fake = FakeSecondary(HANG)
    handler = make_handler(fake, config(DEADLINE_S="0.05", TIMEOUT_S="0.05"))
    assert other_tasks() == set()

    outcome, response = await relay(handler)

    assert outcome.result == "failed:timeout"
    assert outcome.reason == "relay deadline of 0.05s passed"
    assert response.choices[0].message.content == "primary"
    assert fake.cancelled == [MODEL]
    assert other_tasks() == set()


async def test_the_consensus_fan_out_is_cancelled_as_a_whole_at_the_deadline():
    fake = FakeSecondary({"c1": HANG, "c2": HANG})
    handler = make_handler(fake, config(MODE="consensus", CONSENSUS_MODELS="c1,c2", DEADLINE_S="0.05",
                                        TIMEOUT_S="0.05"))

    outcome, response = await relay(handler)

    assert outcome.result == "failed:timeout"
    assert sorted(call.model for call in fake.calls) == ["c1", "c2"]
    assert sorted(fake.cancelled) == ["c1", "c2"]
    assert response.choices[0].message.content == "primary"
    assert other_tasks() == set()


# ----- cache ------------------------------------------------------------------------------------------


async def test_an_identical_request_reuses_the_cached_result():
    wall = FakeClock(0.0)
    fake = FakeSecondary(cost=0.125)
    handler = make_handler(fake, config(CACHE_TTL_S="60"), wall=wall)

    first, _ = await relay(handler)
    second, response = await relay(handler)

    assert len(fake.calls) == 1
    assert first.headers()["x-relay-cache"] == "miss"
    assert first.headers()["x-relay-cost-usd"] == "0.125"
    assert second.result == "modified"
    assert response.choices[0].message.content == "refined"
    assert second.headers()["x-relay-cache"] == "hit"
    assert second.headers()["x-relay-cost-usd"] == "0"


async def test_a_cached_result_expires_after_the_ttl():
    wall = FakeClock(0.0)
    fake = FakeSecondary()
    handler = make_handler(fake, config(CACHE_TTL_S="60"), wall=wall)
    await relay(handler)

    wall.now = 59.999
    assert (await relay(handler))[0].cache == "hit"
    wall.now = 60.0
    expired, _ = await relay(handler)

    assert expired.cache == "miss"
    assert len(fake.calls) == 2


async def test_the_cache_bound_evicts_the_oldest_entry():
    fake = FakeSecondary()
    handler = make_handler(fake, config(CACHE_TTL_S="60", CACHE_MAX_ENTRIES="2"))
    for answer in ("answer a", "answer b", "answer c"):
        await relay(handler, answer)
    assert len(fake.calls) == 3
    assert len(handler.store.cache) == 2

    assert (await relay(handler, "answer b"))[0].cache == "hit"
    assert (await relay(handler, "answer c"))[0].cache == "hit"
    assert (await relay(handler, "answer a"))[0].cache == "miss"
    assert len(fake.calls) == 4


async def test_a_different_answer_misses_the_cache():
    fake = FakeSecondary()
    handler = make_handler(fake, config(CACHE_TTL_S="60"))

    first, _ = await relay(handler, "primary")
    other, _ = await relay(handler, "another primary")

    assert (first.cache, other.cache) == ("miss", "miss")
    assert len(fake.calls) == 2


async def test_a_different_mode_misses_the_cache():
    fake = FakeSecondary()
    handler = make_handler(fake, config(CACHE_TTL_S="60", CLIENT_OVERRIDE="opt_in"))

    refined, _ = await relay(handler)
    annotated, _ = await relay(handler, metadata={"relay": {"mode": "annotate"}})
    annotated_again, _ = await relay(handler, metadata={"relay": {"mode": "annotate"}})

    assert (refined.mode, refined.cache) == ("refine", "miss")
    assert (annotated.mode, annotated.cache) == ("annotate", "miss")
    assert (annotated_again.mode, annotated_again.cache) == ("annotate", "hit")
    assert len(fake.calls) == 2


async def test_without_a_ttl_nothing_is_cached():
    fake = FakeSecondary()
    handler = make_handler(fake, config())

    first, _ = await relay(handler)
    second, _ = await relay(handler)

    assert len(fake.calls) == 2
    assert "x-relay-cache" not in first.headers()
    assert "x-relay-cache" not in second.headers()
    assert handler.store.cache == {}


async def test_a_spent_budget_refuses_without_counting_tokens_again(monkeypatch):
    fake = FakeSecondary(cost=WORST)  # each call spends its whole worst case
    handler = make_handler(fake, config(BUDGET_USD=str(WORST), SECONDARY_MAX_TOKENS=MAX_TOKENS))
    priced(monkeypatch, handler)
    counted = []
    monkeypatch.setattr(relay_plugin, "prompt_token_bound", lambda messages: counted.append(1) or PROMPT_TOKENS)

    outcomes = [(await relay(handler))[0].result for _ in range(4)]

    assert outcomes == ["modified", "skipped:budget", "skipped:budget", "skipped:budget"]
    assert len(counted) == 2  # the call that fit, and the first refusal; later ones stop at the floor
    assert len(fake.calls) == 1


# ----- bounded state and overshoot (issue 11) -----------------------------------------------------------


async def test_breakers_and_prices_of_many_client_chosen_models_stay_bounded(monkeypatch):
    fake = FakeSecondary()
    handler = make_handler(fake, config(CLIENT_OVERRIDE="full"))
    monkeypatch.setattr(relay_plugin, "_price_of", lambda model: None)
    monkeypatch.setattr(relay_plugin, "MODELS_MAX", 50)
    for i in range(300):
        await relay(handler, metadata={"relay": {"secondary_model": f"openai/made-up-{i}"}})
    assert len(fake.calls) == 300
    assert len(handler.store.breakers) == 50
    assert len(handler._prices) == 50
    assert "openai/made-up-299" in handler.store.breakers  # the newest stay


async def test_the_counters_remembered_as_refused_stay_bounded(monkeypatch):
    fake = FakeSecondary()
    handler = make_handler(fake, config(BUDGET_USD_PER_KEY=str(WORST / 2), SECONDARY_MAX_TOKENS=MAX_TOKENS))
    priced(monkeypatch, handler)
    monkeypatch.setattr(relay_plugin, "REFUSED_COUNTERS_MAX", 10)

    outcomes = [(await relay(handler, key=f"sk-caller-{i}"))[0].result for i in range(50)]

    assert outcomes == ["skipped:budget"] * 50  # every key's cap is below one call
    assert 0 < len(handler.refused_counters) <= 11  # one refused counter per key, cleared past the bound
    assert fake.calls == []


async def test_a_call_billed_past_its_reservation_is_counted_logged_and_settled_at_its_real_cost(monkeypatch, caplog):
    overbilling = FakeSecondary(Reply(MODEL, "refined", 1.0, output_tokens=1_000_000))  # far past max_tokens
    handler = make_handler(overbilling, config(BUDGET_USD="5", SECONDARY_MAX_TOKENS=MAX_TOKENS))
    priced(monkeypatch, handler)
    outcome, _ = await relay(handler)
    assert outcome.result == "modified" and outcome.cost_usd == 1.0
    assert handler.stats["overshoot"] == 1
    assert handler.stats["overshoot_usd"] == 1.0 - WORST
    assert await handler.store.counter("spend:0") == 1.0  # the budget counts what was billed
    (line,) = [r for r in caplog.records if "overshot" in r.getMessage()]
    assert line.levelname == "WARNING"
    assert "1000000 output tokens reported against max_tokens 38; cost 1 USD against 0.0625 USD reserved" in line.getMessage()


async def test_a_call_within_its_bounds_is_no_overshoot(monkeypatch):
    handler = make_handler(FakeSecondary(cost=ACTUAL), config(BUDGET_USD="5", SECONDARY_MAX_TOKENS=MAX_TOKENS))
    priced(monkeypatch, handler)
    await relay(handler)
    assert handler.stats["overshoot"] == 0


def test_a_router_with_every_deployment_cooling_down_is_named_as_such_not_as_an_unknown_error():
    """With spend attribution the relay's calls feed the router's health, so a failing secondary's
    deployments cool down; the client then reads why, in a fixed phrase, and it is not retried."""
    from litellm.types.router import RouterRateLimitError

    error = relay_plugin._classify_error("sec", RouterRateLimitError(
        model="sec", cooldown_time=5, enable_pre_call_checks=False, cooldown_list=["a1b2"]))
    assert (error.reason, error.retryable) == ("cooldown", False)
    assert error.public == "every deployment of the secondary model is cooling down after failures"


async def test_a_call_answered_without_text_keeps_its_worst_case_on_the_caps(monkeypatch):
    """A provider that answered with no text (a reasoning model that spent its whole output limit on
    hidden reasoning, an output content filter) billed the call: it was neither refused nor unreceived,
    so it must not settle at 0 (repeated, every such call would be free to the caps)."""
    fake = FakeSecondary(failing("empty_response"), cost=ACTUAL)
    handler = make_handler(fake, config(BUDGET_USD="1", MAX_CALLS="10", SECONDARY_MAX_TOKENS=MAX_TOKENS))
    priced(monkeypatch, handler)

    outcome, _ = await relay(handler)

    assert outcome.result == "failed:empty_response"
    assert handler.store.counters == {"spend:0": WORST, "calls:0": 1.0}
