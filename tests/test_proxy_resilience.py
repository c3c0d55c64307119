"""Faults, breaker, retries and budget through the real proxy and the simulated provider."""

import time

import pytest

from sim.stack import model_entry
from tests.proxy_support import BASE_RELAY_ENV, FAKE_PROVIDER_KEY, relay_test_models, start_test_proxy

pytestmark = pytest.mark.proxy

FAULTS = {
    # secondary model_name: (marker forced on it at the simulator, the outcome the client sees)
    "f-500": ("SIM:HTTP500", "failed:provider_error"),
    "f-429": ("SIM:HTTP429", "failed:rate_limited"),
    "f-hang": ("SIM:HANG", "failed:timeout"),
    "f-drop": ("SIM:DROP", "failed:connection"),
    "f-malformed": ("SIM:MALFORMED", "failed:bad_response"),
    "f-empty": ("SIM:EMPTY", "failed:empty_response"),
}


def upstream(name: str) -> str:
    """The model name the simulator sees for a fault secondary."""
    return "fault-" + name[2:]


#: secondaries of their own for the retry and breaker tests, so no other test has touched their breakers
FRESH = {"f-retry": "SIM:HTTP500", "f-retry429": "SIM:HTTP429", "f-breaker": "SIM:HTTP500"}


@pytest.fixture(scope="module")
def faults(workdir, sim):
    names = list(FAULTS) + list(FRESH) + ["f-verdict"]
    models = relay_test_models(sim.url) + [
        model_entry(name, "openai/" + upstream(name), sim.url + "/v1", api_key=FAKE_PROVIDER_KEY) for name in names]
    env = {
        **BASE_RELAY_ENV,
        "RELAY_CLIENT_OVERRIDE": "full",
        "RELAY_TIMEOUT_S": "1",
        "RELAY_DEADLINE_S": "4",
        "RELAY_RETRIES": "1",
        "RELAY_RETRY_BASE_S": "0.05",
        "RELAY_BREAKER_WINDOW": "4",
        "RELAY_BREAKER_MIN_CALLS": "4",
        "RELAY_BREAKER_FAILURE_RATE": "0.5",
        "RELAY_BREAKER_COOLDOWN_S": "2",
    }
    markers = {upstream(name): marker for name, (marker, _) in FAULTS.items()}
    markers.update({upstream(name): marker for name, marker in FRESH.items()})
    sim.configure(force_markers=markers, retry_after=0.5)
    handle = start_test_proxy(workdir, "faults", sim.url, env, model_list=models)
    yield handle
    handle.stop()
    sim.configure(force_markers={}, retry_after=1)


def relay_via(faults, secondary: str, text: str, mode: str = "refine"):
    return faults.chat("llama", text, metadata={"relay": {"mode": mode, "secondary_model": secondary}})


def calls_to(sim, token: str, name: str) -> list[dict]:
    return [r for r in sim.requests(token) if r["model"] == upstream(name)]


@pytest.mark.compat("fail policy")
@pytest.mark.parametrize("secondary", list(FAULTS))
def test_a_faulty_secondary_never_costs_the_client_the_primary_answer(faults, sim, token, secondary):
    raw = relay_via(faults, secondary, f"Hi {token}")
    assert raw.status_code == 200
    assert raw.parse().choices[0].message.content == f"llama3 says: Hi {token}"
    assert raw.headers["x-relay-outcome"] == FAULTS[secondary][1]
    assert raw.headers["x-relay-secondary-model"] == secondary


def test_a_garbage_verdict_is_a_failure_and_is_not_retried(faults, sim, token):
    raw = relay_via(faults, "sec", f"SIM:GARBAGE {token}", mode="guard")
    assert raw.headers["x-relay-outcome"] == "failed:bad_verdict"
    assert len([r for r in sim.requests(token) if r["model"] == "gpt-4o-mini"]) == 1


def test_retries_are_owned_by_the_relay_and_not_multiplied_by_the_router(faults, sim, token):
    raw = relay_via(faults, "f-retry", f"Hi {token}")
    assert raw.headers["x-relay-outcome"] == "failed:provider_error"
    # RELAY_RETRIES=1: two attempts in all, though the call went through the router
    assert len(calls_to(sim, token, "f-retry")) == 2


def test_a_429_is_retried_after_the_retry_after_delay(faults, sim, token):
    raw = relay_via(faults, "f-retry429", f"Hi {token}")
    assert raw.headers["x-relay-outcome"] == "failed:rate_limited"
    first, second = calls_to(sim, token, "f-retry429")
    assert second["received_at"] - first["received_at"] >= 0.5  # the simulator's Retry-After


@pytest.mark.compat("breaker")
def test_the_breaker_opens_stops_calls_and_recovers_after_the_cooldown(faults, sim, token):
    outcomes = []
    for i in range(8):
        raw = relay_via(faults, "f-breaker", f"Hi {token} {i}")
        assert raw.status_code == 200
        assert raw.parse().choices[0].message.content == f"llama3 says: Hi {token} {i}"
        outcomes.append(raw.headers["x-relay-outcome"])
    # 2 failing requests x 2 attempts fill the window of 4 and open the breaker; the rest are skipped
    assert outcomes == ["failed:provider_error"] * 2 + ["skipped:breaker_open"] * 6
    assert len(calls_to(sim, token, "f-breaker")) == 4
    # heal the provider, wait out the cooldown: the next request is the probe, and it closes the breaker
    markers = sim.configure()["force_markers"]
    del markers[upstream("f-breaker")]
    sim.configure(force_markers=markers)
    time.sleep(2.1)
    for i in range(2):
        raw = relay_via(faults, "f-breaker", f"Hi {token} healed {i}")
        assert raw.headers["x-relay-outcome"] == "modified"
    assert len(calls_to(sim, token, "f-breaker")) == 6


# ----- budget -------------------------------------------------------------------------------------

BUDGET_USD = 0.0002


@pytest.fixture(scope="module")
def budgeted(workdir, sim):
    env = {**BASE_RELAY_ENV, "RELAY_BUDGET_USD": str(BUDGET_USD), "RELAY_SECONDARY_MAX_TOKENS": "40"}
    handle = start_test_proxy(workdir, "budget", sim.url, env)
    yield handle
    handle.stop()


@pytest.mark.compat("budget cap")
def test_spend_stops_at_the_cap_and_requests_keep_their_primary_answer(budgeted, sim, token):
    outcomes, spent = [], 0.0
    for i in range(12):
        raw = budgeted.chat("llama", f"Tell me a long story {token} {i}")
        assert raw.status_code == 200
        outcomes.append(raw.headers["x-relay-outcome"])
        spent += float(raw.headers["x-relay-cost-usd"])
        if outcomes[-1] == "skipped:budget":
            assert raw.parse().choices[0].message.content == f"llama3 says: Tell me a long story {token} {i}"
    relayed = outcomes.count("modified")
    assert relayed >= 1 and outcomes[relayed:] == ["skipped:budget"] * (12 - relayed)
    assert 0 < spent <= BUDGET_USD
    # the provider saw exactly the admitted calls and no more
    assert len([r for r in sim.requests(token) if r["model"] == "gpt-4o-mini"]) == relayed
