"""Faults of the shared state under load, small and fast: the same runs as ``python -m loadtest.failover``
(part of ``make loadtest``), with fewer calls.

Each run starts its own topology (a Redis Cluster of 3 masters with replicas, or a primary/replica
pair under 3 sentinels), a simulator and two proxies: A with RELAY_STATE_FAILURE=closed, B with
local. Requests go to both; a third of the way to RELAY_MAX_CALLS a node is lost; the load goes on
until the shared cap refuses both (the call cap, or in the Sentinel run the USD cap). No timing is
asserted: only what was answered, what was spent and called against the caps, and what the logs say.
"""

import pytest

from loadtest.failover import BINDING_CAP, FAULTS, budget_for, run_fault

pytestmark = pytest.mark.proxy

MAX_CALLS = 18


@pytest.fixture(scope="module", params=FAULTS)
def fault_run(request, workdir):
    report = run_fault(request.param, workdir / f"fault-{request.param}", threads=2, max_calls=MAX_CALLS,
                       budget_usd=budget_for(request.param, MAX_CALLS), stall_s=2.5)
    print("\n" + report.summary())
    return report


def test_every_request_keeps_its_answer_through_the_fault(fault_run):
    assert fault_run.errors == []
    assert fault_run.samples and all(s.status == 200 for s in fault_run.samples)


def test_during_the_fault_each_instance_follows_its_declared_policy(fault_run):
    a, b = fault_run.outcomes["a"], fault_run.outcomes["b"]
    assert a["skipped:state_unavailable"] >= 1  # closed: no relay without a guaranteed cap
    assert b["skipped:state_unavailable"] == 0  # local: relayed on the process's own state meanwhile
    assert set(a) | set(b) <= {"modified", "skipped:state_unavailable", "skipped:budget"}


def test_the_caps_hold_over_the_whole_run_counting_the_local_fallback_per_process(fault_run):
    checks = {label: (ok, detail) for label, ok, detail in fault_run.checks()}
    for label in ("shared calls <= RELAY_MAX_CALLS", "calls beyond the shared counter (B's local state) <= one cap",
                  "instance A (closed) made no call the shared counter missed", "shared spend <= RELAY_BUDGET_USD",
                  "spend beyond the shared counter <= one cap"):
        assert checks[label][0], (label, checks[label][1])


def test_shared_state_resumes_without_a_restart(fault_run):
    # the shared cap, in the healed topology, refuses both instances once each uses Redis again (B's own
    # cap may refuse it before, while it runs on its local state)
    assert all(fault_run.refused_after_resuming(i) for i in "ab"), {i: fault_run.resumed_at(i) for i in "ab"}
    if BINDING_CAP[fault_run.fault] == "calls":
        assert fault_run.shared_calls == MAX_CALLS
    else:  # the call cap was not reached: the refusals were the USD cap's
        assert fault_run.shared_calls < MAX_CALLS and fault_run.shared_spend > fault_run.budget_usd / 2


def test_each_instance_logs_the_faults_outage_once_at_error_and_when_redis_is_back(fault_run):
    for name in "ab":
        announced, detail = fault_run.fault_outage(name)
        assert announced, (name, detail)
        errors, _ = fault_run.outage_lines(name, since_fault=False)
        policy = "RELAY_STATE_FAILURE=closed" if name == "a" else "RELAY_STATE_FAILURE=local"
        assert errors and all(policy in line for line in errors)
