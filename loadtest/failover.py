"""Faults of the shared state under load: two proxy instances, a Redis Cluster or Sentinel, one node lost.

    python -m loadtest.failover [--fault cluster-kill|sentinel-kill|cluster-stall|all] [--threads 4]   (part of make loadtest)

One simulator, the topology (a Redis Cluster of 3 masters with a replica each, or a primary/replica
pair under 3 sentinels, all real ``redis-server`` processes on loopback) and two LiteLLM proxies with
the relay on it: instance A with ``RELAY_STATE_FAILURE=closed``, instance B with ``local``. Threads
send requests to both; once a third of ``RELAY_MAX_CALLS`` is spent the fault strikes:

- ``cluster-kill``: the master holding the budget counters' slot is killed (SIGKILL); its replica
  takes over after the cluster's node timeout;
- ``sentinel-kill``: the primary is killed; the sentinels promote the replica;
- ``cluster-stall``: that master stops answering for ``--stall`` seconds (``CLIENT PAUSE ... ALL``),
  longer than ``RELAY_REDIS_TIMEOUT_S``.

The load goes on until both instances are refused by the shared cap: the call cap in the cluster
runs, the USD cap in the Sentinel run. Invariants (exit code 1
when one breaks): every request answered (HTTP 200); the call counter in Redis at most the cap and the
calls beyond it (B's own while Redis was away) at most one more cap; the same for the spend; one
ERROR line per outage and process, each closed by a "back" line; shared state used again without a
restart. tests/test_proxy_failover.py runs a small version of each fault with the same code.
"""

import argparse
import json
import re
import statistics
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from loadtest import harness as h
from loadtest.run import model_list
from tests.redis_support import RedisClusterNodes, RedisSentinelSet

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "lt-fault"
FAULTS = ("cluster-kill", "sentinel-kill", "cluster-stall")
#: which cap binds first in each run: the call cap, or the USD cap (a fraction of a cent per call)
BINDING_CAP = {"cluster-kill": "calls", "sentinel-kill": "usd", "cluster-stall": "calls"}


def budget_for(fault: str, max_calls: int) -> float:
    """A USD cap that binds before the call cap (about 2/3 of the way) where BINDING_CAP says so,
    else one that the call cap reaches first by far."""
    if BINDING_CAP[fault] == "calls":
        return round(max_calls / 3000, 6)  # 1/30 cent per allowed call, ~10 times what one costs
    per_call = 0.000045  # a little more than one refine call to the secondary costs (gpt-4o-mini, 64 tokens)
    return round(per_call * max_calls * 0.66, 6)


@dataclass
class Sample:
    instance: str
    started: float  #: monotonic seconds since the run began
    seconds: float
    status: int
    outcome: str
    cost_usd: float


@dataclass
class FaultReport:
    fault: str
    max_calls: int
    budget_usd: float
    samples: list[Sample] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  #: requests that got no answer at all
    fault_at: float = 0.0  #: seconds since the run began
    fault_wall: float = 0.0  #: the same, epoch seconds (log lines carry wall time)
    healed_at: float | None = None  #: the topology serves the budget slot again
    calls: dict[str, int] = field(default_factory=dict)  #: secondary calls the simulator saw, per instance
    shared_calls: float = 0.0  #: the call counter in Redis at the end
    shared_spend: float = 0.0
    logs: dict[str, str] = field(default_factory=dict)

    # ----- figures ---------------------------------------------------------------------------------
    @property
    def outcomes(self) -> dict[str, Counter]:
        found: dict[str, Counter] = {"a": Counter(), "b": Counter()}
        for s in self.samples:
            found[s.instance][s.outcome] += 1
        return found

    @property
    def spend(self) -> float:
        return sum(s.cost_usd for s in self.samples)

    def relay_lines(self, name: str) -> list[tuple[float, str, str]]:
        """(epoch seconds, level, message) of each line the relay's logger wrote in instance ``name``'s
        log. The proxies write JSON logs (``json_logs: true``): their timestamps carry microseconds."""
        from relay_plugin import log  # its name is the `component` of the relay's JSON lines

        found = []
        for line in self.logs.get(name, "").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("component") == log.name:
                when = datetime.fromisoformat(record["timestamp"]).timestamp()
                found.append((when, record["level"], record["message"]))
        return found

    def outage_records(self, name: str, since_fault: bool = True) -> tuple[list[tuple[float, str]], ...]:
        """(when, message) of the ERROR lines (an outage begins) and of the INFO "is back" lines of
        instance ``name``, by default those written from the fault on (a loaded machine may time out a
        Redis call before it: that is an outage of its own, with its own line)."""
        lines = [line for line in self.relay_lines(name) if not since_fault or line[0] >= self.fault_wall - 0.5]
        return ([(when, message) for when, level, message in lines
                 if level == "ERROR" and message.startswith("relay: shared state in Redis")],
                [(when, message) for when, _, message in lines if "is back after" in message])

    def outage_lines(self, name: str, since_fault: bool = True) -> tuple[list[str], list[str]]:
        """The messages of :meth:`outage_records`."""
        errors, backs = self.outage_records(name, since_fault)
        return [message for _, message in errors], [message for _, message in backs]

    def fault_outage(self, name: str) -> tuple[bool, str]:
        """Was every outage since the fault announced by exactly one ERROR line, and no ERROR line left
        over that belongs to none of them?

        An outage is what an "is back after D s" line closes; it began D s before that line, possibly
        before the fault (a loaded machine may time out a call just before, and failures that close
        together are one outage). A loaded machine may also see a short second outage: that one must
        be announced once too."""
        errors, backs = self.outage_records(name, since_fault=False)
        closing = [(when, d) for (when, _), d in zip(backs, self.back_after(name, since_fault=False), strict=False)
                   if when >= self.fault_wall]
        if not closing:
            return False, "no line says Redis is back after the fault"
        stamps = [when for when, _ in errors]
        windows = [(back - lasted - 0.5, back) for back, lasted in closing]
        per_outage = [sum(start <= t <= end for t in stamps) for start, end in windows]
        stray = [t for t in stamps if t >= self.fault_wall - 0.5 and not any(s <= t <= e for s, e in windows)]
        return (all(n == 1 for n in per_outage) and not stray,
                f"ERROR lines per outage since the fault {per_outage} "
                f"(first lasted {closing[0][1]:.1f} s, began {closing[0][0] - closing[0][1] - self.fault_wall:+.1f} s "
                f"from the fault), {len(stray)} belonging to no outage")

    def resumed_at(self, name: str) -> float | None:
        """Seconds since the run began when instance ``name`` used the shared state again: its last
        "is back" line since the fault, or the topology's heal if it saw no outage; None while an outage
        is open (instance B answers from its own caps meanwhile: its refusals then are not the shared cap's)."""
        errors, backs = self.outage_records(name)
        if len(backs) < len(errors):
            return None
        return self.fault_at + backs[-1][0] - self.fault_wall if backs else self.healed_at

    def back_after(self, name: str, since_fault: bool = True) -> list[float]:
        return [float(m.group(1)) for line in self.outage_lines(name, since_fault)[1]
                for m in [re.search(r"back after ([\d.]+)s", line)] if m]

    def recovered_in(self) -> float | None:
        """Seconds from the fault to the end of the last ``skipped:state_unavailable`` answer of A."""
        ends = [s.started + s.seconds for s in self.samples if s.outcome == "skipped:state_unavailable"]
        return max(ends) - self.fault_at if ends else 0.0

    def refused_after_resuming(self, name: str) -> bool:
        """Did a request to ``name`` that began after it used the shared state again get ``skipped:budget``?"""
        at = self.resumed_at(name)
        return at is not None and any(s.instance == name and s.outcome == "skipped:budget" and s.started > at
                                      for s in self.samples)

    def latency(self, during: bool) -> tuple[float, float]:
        """p50 and max seconds of requests started before the fault (False) or in the 5 s after it (True)."""
        picked = [s.seconds for s in self.samples
                  if (self.fault_at <= s.started < self.fault_at + 5) == during and (during or s.started < self.fault_at)]
        return (statistics.median(picked), max(picked)) if picked else (0.0, 0.0)

    def checks(self) -> list[tuple[str, bool, str]]:
        local_calls = sum(self.calls.values()) - self.shared_calls
        local_spend = self.spend - self.shared_spend
        found = [
            ("every request answered", not self.errors and all(s.status == 200 for s in self.samples),
             f"{sum(s.status == 200 for s in self.samples)} of {len(self.samples) + len(self.errors)}"),
            ("shared calls <= RELAY_MAX_CALLS", self.shared_calls <= self.max_calls,
             f"{self.shared_calls:g} of {self.max_calls}"),
            ("calls beyond the shared counter (B's local state) <= one cap", local_calls <= self.max_calls,
             f"{local_calls:g}"),
            ("instance A (closed) made no call the shared counter missed", self.calls.get("a", 0) <= self.shared_calls,
             f"A {self.calls.get('a', 0)}, counter {self.shared_calls:g}"),
            ("shared spend <= RELAY_BUDGET_USD", self.shared_spend <= self.budget_usd + 1e-12,
             f"{self.shared_spend:.6f} of {self.budget_usd:.6f}"),
            ("spend beyond the shared counter <= one cap", local_spend <= self.budget_usd + 1e-12, f"{local_spend:.6f}"),
            ("shared state resumed: both instances refused by the shared cap once Redis was back",
             all(self.refused_after_resuming(i) for i in "ab"), str({i: c["skipped:budget"] for i, c in self.outcomes.items()})),
        ]
        for name in "ab":
            ok, detail = self.fault_outage(name)
            found.append((f"instance {name.upper()}: one ERROR line for the fault's outage, and a line when Redis is back",
                          ok, detail))
        return found

    def summary(self) -> str:
        before, during = self.latency(False), self.latency(True)
        lines = [f"{self.fault}: {len(self.samples) + len(self.errors)} requests sent, "
                 f"{sum(s.status == 200 for s in self.samples)} answered"]
        for name, counts in self.outcomes.items():
            lines.append(f"  instance {name.upper()} ({'closed' if name == 'a' else 'local'}): {dict(counts)}, "
                         f"{self.calls.get(name, 0)} secondary calls, back after {self.back_after(name)} s")
        lines += [
            f"  calls: {sum(self.calls.values())} in all, shared counter {self.shared_calls:g} of cap {self.max_calls}",
            f"  spend: {self.spend:.6f} USD in all, shared counter {self.shared_spend:.6f} of cap {self.budget_usd:.6f}",
            f"  topology healed {self.healed_at - self.fault_at:.1f} s after the fault"
            if self.healed_at
            else "  topology: no heal seen",
            f"  A's last skipped:state_unavailable ended {self.recovered_in():.1f} s after the fault",
            f"  latency p50/max: {before[0] * 1000:.0f}/{before[1] * 1000:.0f} ms before, "
            f"{during[0] * 1000:.0f}/{during[1] * 1000:.0f} ms in the 5 s after the fault",
        ]
        for label, ok, detail in self.checks():
            lines.append(f"  {'PASS' if ok else 'FAIL'}  {label}: {detail}")
        return "\n".join(lines)


def _chat(proxy, text: str) -> tuple[int, str, float]:
    body = {"model": "mock-primary", "messages": [{"role": "user", "content": text}]}
    request = urllib.request.Request(proxy.url + "/v1/chat/completions", data=json.dumps(body).encode(), headers={
        "Authorization": f"Bearer {proxy.master_key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            resp.read()
            status, headers = resp.status, resp.headers
    except urllib.error.HTTPError as exc:
        status, headers = exc.code, exc.headers
    return status, headers.get("x-relay-outcome", ""), float(headers.get("x-relay-cost-usd") or 0.0)


class Load:
    """``threads`` senders per instance, one request after another, until stopped."""

    def __init__(self, proxies: dict, report: FaultReport, threads: int, started: float):
        self.proxies, self.report, self.started = proxies, report, started
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, args=(name, i), daemon=True)
                        for name in proxies for i in range(threads)]

    def run(self, name: str, index: int) -> None:
        n = 0
        while not self.stopping.is_set():
            began = time.monotonic()
            try:
                status, outcome, cost = _chat(self.proxies[name], f"inst-{name} {index}-{n} Why is the sky blue?")
                with self.lock:
                    self.report.samples.append(
                        Sample(name, began - self.started, time.monotonic() - began, status, outcome, cost)
                    )
            except Exception as exc:  # noqa: BLE001 - a request without an answer is what this counts
                with self.lock:
                    self.report.errors.append(f"{type(exc).__name__}: {exc}")
            n += 1

    def refused_by_the_shared_cap(self) -> bool:
        """Was each instance refused once it used the shared state again? (Reads the proxies' logs.)"""
        with self.lock:
            for name, proxy in self.proxies.items():
                self.report.logs[name] = proxy.log_text()
            return all(self.report.refused_after_resuming(i) for i in self.proxies)


def _slot_server(topology, key: str):
    return topology.master_of(key) if isinstance(topology, RedisClusterNodes) else topology.current_primary()


def run_fault(fault: str, directory: Path, *, threads: int = 4, max_calls: int = 60, budget_usd: float = 0.02,
              stall_s: float = 2.5, timeout_s: float = 1.0, limit_s: float = 120.0) -> FaultReport:
    """One fault under load, everything started here and stopped afterwards."""
    directory.mkdir(parents=True, exist_ok=True)
    report = FaultReport(fault, max_calls, budget_usd)
    topology = (RedisSentinelSet(directory / "sentinel") if fault.startswith("sentinel")
                else RedisClusterNodes(directory / "cluster")).start()
    sim = proxies = None
    try:
        sim = h.start_simulator(directory / "sim", {"gpt-4o-mini": {"latency_ms": 20}})
        env = {"RELAY_MODE": "refine", "RELAY_SECONDARY_MODEL": "sec", "RELAY_APPLY_TO": "mock-*", "RELAY_LOG_LEVEL": "info",
               "RELAY_REDIS_PREFIX": PREFIX, "RELAY_MAX_CALLS": str(max_calls), "RELAY_BUDGET_USD": f"{budget_usd:.6f}",
               "RELAY_SECONDARY_MAX_TOKENS": "64", "RELAY_REDIS_TIMEOUT_S": str(timeout_s), "RELAY_REDIS_RETRY_S": "0.5",
               "RELAY_RETRIES": "0"}
        if isinstance(topology, RedisClusterNodes):
            env["RELAY_REDIS_CLUSTER_NODES"] = topology.nodes_setting
        else:
            env |= {"RELAY_REDIS_SENTINELS": topology.sentinels_setting, "RELAY_REDIS_SENTINEL_SERVICE": topology.service}
        starting = {}
        threads_up = [threading.Thread(target=lambda n, f: starting.__setitem__(n, h.start_proxy(
            directory / f"proxy-{n}", model_list(sim.url), True, {**env, "RELAY_STATE_FAILURE": f},
            litellm_settings={"json_logs": True})), args=(n, f))
            for n, f in (("a", "closed"), ("b", "local"))]
        for t in threads_up:
            t.start()
        for t in threads_up:
            t.join()
        proxies = starting
        if set(proxies) != {"a", "b"}:
            raise RuntimeError("a proxy did not start")
        window = int(time.time() // 86400)
        calls_key = f"{PREFIX}:{{budget:{window}}}:calls:{window}"
        spend_key = f"{PREFIX}:{{budget:{window}}}:spend:{window}"
        started = time.monotonic()
        load = Load(proxies, report, threads, started)
        for t in load.threads:
            t.start()
        try:
            deadline = started + limit_s
            while h.sim_get(sim.url, "/_sim/stats")["by_model"].get("gpt-4o-mini", 0) < max_calls // 3:
                if time.monotonic() > deadline:
                    raise RuntimeError("the load never reached a third of the cap")
                time.sleep(0.05)
            victim = _slot_server(topology, calls_key)
            report.fault_at, report.fault_wall = time.monotonic() - started, time.time()
            if fault.endswith("kill"):
                victim.kill()
            else:
                victim.command("CLIENT", "PAUSE", str(int(stall_s * 1000)), "ALL")
            time.sleep(stall_s if fault.endswith("stall") else 0.0)
            topology.wait_healthy(timeout=60)
            report.healed_at = time.monotonic() - started
            while not load.refused_by_the_shared_cap():
                if time.monotonic() > deadline:
                    break
                time.sleep(0.25)
        finally:
            load.stopping.set()
            for t in load.threads:
                t.join(60)
        records = h.sim_get(sim.url, "/_sim/requests?model=gpt-4o-mini")
        records = records["requests"] if isinstance(records, dict) else records
        report.calls = {i: sum(f"inst-{i} " in json.dumps(r.get("body")) for r in records) for i in "ab"}
        server = _slot_server(topology, calls_key)
        report.shared_calls = float(server.command("GET", calls_key) or 0)
        report.shared_spend = float(server.command("GET", spend_key) or 0)
    finally:
        for proxy in (proxies or {}).values():
            report.logs[next(k for k, v in proxies.items() if v is proxy)] = proxy.log_text()
            proxy.stop()
        if sim is not None:
            sim.stop()
        topology.stop()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.failover", description=__doc__.split("\n\n")[0])
    parser.add_argument("--fault", choices=(*FAULTS, "all"), default="all")
    parser.add_argument("--threads", type=int, default=4, help="senders per instance")
    parser.add_argument("--max-calls", type=int, default=150)
    parser.add_argument("--stall", type=float, default=2.5, help="seconds the stalled master does not answer "
                        "(RELAY_REDIS_TIMEOUT_S is 1)")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="relay-lt-failover-"))
    ok = True
    for fault in FAULTS if args.fault == "all" else (args.fault,):
        report = run_fault(fault, root / fault, threads=args.threads, max_calls=args.max_calls,
                           budget_usd=budget_for(fault, args.max_calls), stall_s=args.stall)
        print(report.summary(), flush=True)
        ok &= all(passed for _, passed, _ in report.checks())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
