"""Two proxy instances on one Redis under load: the caps hold for the pair, not per instance.

    python -m loadtest.two_instances [--users 8] [--duration 15] [--max-calls 40]   (part of make loadtest)

One simulator, one ``redis-server`` on loopback and two LiteLLM proxies with the relay (refine on the
mock primary, secondary ``sec`` at gpt-4o-mini prices), both with ``RELAY_REDIS_URL`` on the same
prefix, ``RELAY_MAX_CALLS`` and a ``RELAY_BUDGET_USD`` that the load runs through in a few seconds.
Two Locust runs, one per instance, go at the same time. Invariants (exit code 1 when one breaks):
no failed client request; the secondary calls the simulator received are at most RELAY_MAX_CALLS;
the spend summed from ``x-relay-cost-usd`` is at most RELAY_BUDGET_USD; both instances end up
answering ``skipped:budget``, so neither had a cap of its own.
"""

import argparse
import sys
import tempfile
import threading
from collections import Counter
from pathlib import Path

from loadtest import harness as h
from loadtest.run import model_list
from tests.redis_support import RedisServer

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.two_instances", description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=8, help="users per instance")
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--max-calls", type=int, default=40)
    parser.add_argument("--budget-usd", type=float, default=0.0012)
    args = parser.parse_args(argv)
    directory = ROOT / "loadtest" / "results" / "two-instances"
    directory.mkdir(parents=True, exist_ok=True)
    redis = RedisServer(Path(tempfile.mkdtemp(prefix="relay-lt-redis-"))).start()
    sim = h.start_simulator(directory / "sim", {"gpt-4o-mini": {"latency_ms": 20}})
    env = {"RELAY_MODE": "refine", "RELAY_SECONDARY_MODEL": "sec", "RELAY_APPLY_TO": "mock-*",
           "RELAY_REDIS_URL": redis.url, "RELAY_REDIS_PREFIX": "lt-two", "RELAY_MAX_CALLS": str(args.max_calls),
           "RELAY_BUDGET_USD": f"{args.budget_usd:.6f}", "RELAY_SECONDARY_MAX_TOKENS": "64"}
    proxies, runs, errors = [], {}, []
    try:
        for name in ("a", "b"):
            proxies.append(h.start_proxy(directory / f"proxy-{name}", model_list(sim.url), True, env))

        def load(name, proxy):
            try:
                runs[name] = h.run_locust(proxy, directory / name, users=args.users, duration=args.duration,
                                          mix=("chat", "messages"), models=("mock-primary",))
            except Exception as exc:  # noqa: BLE001 - reported below as a broken run
                errors.append(f"instance {name}: {type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=load, args=(name, proxy)) for name, proxy in zip("ab", proxies, strict=False)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        calls = h.sim_get(sim.url, "/_sim/stats")["by_model"].get("gpt-4o-mini", 0)
    finally:
        for proxy in proxies:
            proxy.stop()
        sim.stop()
        redis.stop()
    if errors:
        print("\n".join(errors), file=sys.stderr)
        return 1
    records = {name: run.records for name, run in runs.items()}
    every = [r for rs in records.values() for r in rs]
    spend = sum(r["cost_usd"] or 0.0 for r in every)
    outcomes = {name: Counter(r["final"] or r["outcome"] for r in rs) for name, rs in records.items()}
    checks = [
        ("no failed client request", all(r["ok"] for r in every), f"{sum(not r['ok'] for r in every)} failed of {len(every)}"),
        ("secondary calls <= RELAY_MAX_CALLS", calls <= args.max_calls, f"{calls} calls, cap {args.max_calls}"),
        ("spend <= RELAY_BUDGET_USD", spend <= args.budget_usd + 1e-12, f"{spend:.6f} USD, cap {args.budget_usd:.6f}"),
        ("both instances were refused by the shared cap",
         all(c["skipped:budget"] > 0 for c in outcomes.values()), str({n: c["skipped:budget"] for n, c in outcomes.items()})),
    ]
    print(f"\ntwo instances on one Redis, {args.users} users each, {args.duration:g} s:")
    for name, rs in records.items():
        print(f"  instance {name}: {len(rs)} requests, outcomes {dict(outcomes[name])}")
    print(f"  overshoot: calls {max(calls - args.max_calls, 0)}, spend {max(spend - args.budget_usd, 0.0):.6f} USD")
    for label, ok, detail in checks:
        print(f"  {'PASS' if ok else 'FAIL'}  {label}: {detail}")
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
