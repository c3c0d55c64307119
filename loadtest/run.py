"""``make loadtest``: bounded Locust runs against a local LiteLLM proxy with the relay, and their checks.

    python -m loadtest.run                       # every scenario below except smoke, ~15 s of load each
    python -m loadtest.run refine breaker        # some of them
    python -m loadtest.run --duration 30s --users 32 --secondary-latency-ms 50

Each scenario starts its own simulator and proxy (so breaker and budget state start clean), warms
every path up, runs ``locust --headless`` with a fixed number of users (all spawned at once) for a
fixed time, stops everything, and leaves under ``loadtest/results/<scenario>/``: Locust's
``report.html`` and ``locust_*.csv``, ``records.json`` (every request: outcome, cost, duration),
``summary.json``, the proxy's config and log and the simulator's log. The terminal gets the tables;
the exit code is 1 when an invariant broke (or a run did not complete).

The stack
---------
Primary models: ``mock-primary`` (litellm's ``mock_response``: no network) and ``ollama-primary``
(``ollama_chat/llama3`` on the simulator's Ollama API, NDJSON streaming with ``--ttft-ms`` and
``--tokens-per-s``; a real Ollama when ``OLLAMA_API_BASE`` is set, model ``OLLAMA_MODEL``, default
llama3.2). Secondary models on the simulator: ``sec`` (OpenAI API, gpt-4o-mini prices: the relay's
secondary, judge, aggregator and shadow analyst), ``sec-claude`` (Anthropic API, second consensus
member), ``premium`` (gpt-4o, the escalation model), each answering after ``--secondary-latency-ms``.
The proxy runs with one worker (litellm's default), on loopback, with the dev master key.

Clients cycle through chat and ``/v1/messages``, non-streaming and streaming, on both primaries.
Prompts cycle through five texts; one carries ``SIM:BLOCK`` (the simulated guard blocks it) and one
``SIM:LOWSCORE`` (the simulated judge scores it low, so escalate escalates).

Invariants (each scenario checks those that apply)
--------------------------------------------------
- no failed client request (every scenario is fail-open);
- every response carries ``x-relay-outcome`` when the relay is on, none when it is off or absent;
- no ``failed:*`` relay outcome while the secondary is healthy;
- spend (the sum of ``x-relay-cost-usd``, warm-up included) never above ``RELAY_BUDGET_USD``, and the
  budget scenario does reach its cap;
- real (``real-baseline``, ``real-guard``, run when the real tier is installed: ``make real-install``):
  the primary is SmolLM2-135M on llama.cpp's server (sim/real.py), chat and streamed chat, 2 users (the
  server answers one request at a time), answers capped at 48 tokens; the report adds the model's own
  generation speed (tokens/s, measured right after the run) and the relay's added latency relative to
  the real model's own (real-guard's p50 against real-baseline's);
- breaker: it opened, and while it was open (a run of ``skipped:breaker_open`` answers) the failing
  secondary received no calls beyond the half-open probes (``/_sim/stats`` sampled every 0.2 s);
  after the secondary healed the relay got through again.
"""

import argparse
import json
import shutil
import sys
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from loadtest import harness as h
from sim import real

PRIMARIES = ("mock-primary", "ollama-primary")
MODES = ("refine", "guard", "annotate", "escalate", "consensus", "shadow")
SECONDARY_SIM_MODEL = "gpt-4o-mini"  #: the `model` the simulator sees for the `sec` secondary
BASE_ENV = {
    "RELAY_SECONDARY_MODEL": "sec",
    "RELAY_ESCALATE_MODEL": "premium",
    "RELAY_CONSENSUS_MODELS": "sec,sec-claude",
    "RELAY_APPLY_TO": ",".join(PRIMARIES),
    "RELAY_TIMEOUT_S": "10",
    "RELAY_DEADLINE_S": "20",
}
#: roughly what one relayed call to `sec` costs here (gpt-4o-mini prices, the simulator's token counts);
#: only used to size the budget scenario's cap so that it runs out about a third of the way in
EST_COST_PER_CALL_USD = 3e-5


@dataclass
class Scenario:
    name: str
    title: str
    plugin: bool = True
    env: dict = field(default_factory=dict)
    mix: tuple = h.KINDS
    models: tuple = PRIMARIES
    rate: float = 0.0  #: requests/s per user; 0 = back to back
    users: int | None = None  #: None: --users
    duration: float | None = None  #: None: --duration
    relay_on: bool = True
    healthy: bool = True  #: the secondary is healthy throughout: a failed:* outcome is a bug
    kind: str = "mode"  #: mode | breaker | budget | real

    def __post_init__(self):
        if self.plugin and self.relay_on:
            self.env = {**BASE_ENV, **self.env}


def scenarios() -> dict[str, Scenario]:
    found = [
        Scenario("baseline", "no plugin loaded", plugin=False, relay_on=False),
        Scenario("disabled", "plugin loaded, RELAY_ENABLED=false", env={"RELAY_ENABLED": "false"}, relay_on=False),
        *(Scenario(mode, f"relay on, RELAY_MODE={mode}", env={"RELAY_MODE": mode}) for mode in MODES),
        Scenario("breaker", "refine; the secondary turns to 5xx and hangs mid-run, then heals", kind="breaker",
                 healthy=False, env={
                     "RELAY_MODE": "refine", "RELAY_TIMEOUT_S": "1", "RELAY_DEADLINE_S": "3", "RELAY_RETRIES": "1",
                     "RELAY_BREAKER_FAILURE_RATE": "0.5", "RELAY_BREAKER_WINDOW": "20", "RELAY_BREAKER_MIN_CALLS": "10",
                     "RELAY_BREAKER_COOLDOWN_S": "2", "RELAY_BREAKER_PROBES": "1"}),
        Scenario("budget", "refine with RELAY_BUDGET_USD that runs out mid-run (non-streaming: costs are in the headers)",
                 kind="budget", mix=("chat", "messages"), rate=2.0,
                 env={"RELAY_MODE": "refine", "RELAY_SECONDARY_MAX_TOKENS": "128"}),
        Scenario("smoke", "CI smoke: refine on the mock primary", mix=("chat", "messages"), models=("mock-primary",),
                 users=4, duration=5),
        Scenario("real-baseline", "the real model (SmolLM2 on llama.cpp), no plugin", plugin=False, relay_on=False,
                 kind="real", mix=REAL_MIX, models=(REAL_PRIMARY,), users=1),
        Scenario("real-guard", "the real model, RELAY_MODE=guard (simulated judge)", kind="real", mix=REAL_MIX,
                 models=(REAL_PRIMARY,), users=1, env={"RELAY_MODE": "guard", "RELAY_APPLY_TO": REAL_PRIMARY}),
    ]
    return {s.name: s for s in found}


REAL_PRIMARY = "smollm2"
REAL_MIX = ("chat", "chat-stream")
REAL_MAX_TOKENS = 48
#: the real-model scenarios join the default run when the real tier is installed (make real-install)
REAL_RUN = ("real-baseline", "real-guard") if real.installed() else ()
DEFAULT_RUN = ("baseline", "disabled", *MODES, "breaker", "budget", *REAL_RUN)


def model_list(sim_url: str) -> list[dict]:
    return [
        h.mock("mock-primary", "Paris is the capital of France. It lies on the Seine.", model="openai/mock-primary"),
        h.ollama_primary("ollama-primary", sim_url),
        h.simulated("sec", "openai/gpt-4o-mini", sim_url),
        h.simulated("sec-claude", "anthropic/claude-haiku-4-5-20251001", sim_url),
        h.simulated("premium", "openai/gpt-4o", sim_url),
    ]


# =================================================================================================
# Running one scenario
# =================================================================================================


@dataclass
class Result:
    scenario: Scenario
    users: int
    duration: float
    run: h.LocustRun | None = None
    warm: list[tuple[int, dict]] = field(default_factory=list)
    cap: float | None = None
    checks: list[tuple[str, bool, str]] = field(default_factory=list)
    info: list[str] = field(default_factory=list)
    error: str = ""

    @property
    def passed(self) -> bool:
        return not self.error and all(ok for _, ok, _ in self.checks)


def run_scenario(s: Scenario, args: argparse.Namespace, root: Path) -> Result:
    users = s.users if s.users is not None and not args.users_given else args.users
    duration = s.duration if s.duration is not None and not args.duration_given else args.duration
    result = Result(s, users, duration)
    directory = root / s.name
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    shape = {"llama3": {"ttft_ms": args.ttft_ms, "tokens_per_s": args.tokens_per_s, "latency_ms": args.primary_latency_ms}}
    for model in (SECONDARY_SIM_MODEL, "claude-haiku-4-5-20251001", "gpt-4o"):
        shape[model] = {"latency_ms": args.secondary_latency_ms}
    env = dict(s.env)
    phases: list[tuple[float, dict]] = []
    if s.kind == "budget":
        expected_calls = users * s.rate * duration
        result.cap = round(expected_calls * EST_COST_PER_CALL_USD * 0.35, 6)
        env["RELAY_BUDGET_USD"] = f"{result.cap:.6f}"
    if s.kind == "breaker":
        faults = {"error_rate": args.error_rate, "hang_rate": args.hang_rate}
        failing = {**shape, SECONDARY_SIM_MODEL: {**shape[SECONDARY_SIM_MODEL], **faults}}
        fail_at, heal_at = min(3.0, duration * 0.2), duration * 0.65
        phases = [(fail_at, {"model_config": failing}), (heal_at, {"model_config": shape})]
        result.info.append(f"secondary {SECONDARY_SIM_MODEL}: healthy, then {args.error_rate:.0%} HTTP 500 + "
                           f"{args.hang_rate:.0%} hangs from "
                           f"t={fail_at:g}s, healthy again from t={heal_at:g}s")
    sim = h.start_simulator(directory, shape)
    proxy = llama = None
    try:
        models = model_list(sim.url)
        if s.kind == "real":
            llama = real.start_llama(directory / "llama.log")
            models.append(real.real_deployment(REAL_PRIMARY, llama.url, max_tokens=REAL_MAX_TOKENS))
        proxy = h.start_proxy(directory / "proxy", models, s.plugin, env)
        for kind in s.mix:
            for model in s.models:
                for _ in range(2):
                    result.warm.append(h.send(proxy, kind, model))
        result.run = h.run_locust(proxy, directory, users=users, duration=duration, mix=s.mix, models=s.models,
                                  rate=s.rate, sim_url=sim.url, phases=phases, extra_groups={"sim": sim.proc.pid})
        if llama is not None:
            result.info.append(real_generation_speed(llama.url))
    except Exception as exc:  # noqa: BLE001 - reported as a broken scenario, the others still run
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        if proxy is not None:
            proxy.stop()
        if llama is not None:
            llama.stop()
        sim.stop()
    if result.run is not None:
        check(result, env)
    (directory / "summary.json").write_text(json.dumps(summary_dict(result), indent=2))
    return result


def real_generation_speed(llama_url: str, requests: int = 3) -> str:
    """The real model's own speed, straight from llama.cpp (no proxy): completion tokens per second."""
    tokens, seconds = 0, 0.0
    for i in range(requests):
        body = {"model": real.MODEL_ALIAS, "max_tokens": REAL_MAX_TOKENS, **real.DETERMINISTIC,
                "messages": [{"role": "user", "content": f"Describe the sea in a few sentences ({i})."}]}
        request = urllib.request.Request(llama_url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        began = time.monotonic()
        with urllib.request.urlopen(request, timeout=300) as resp:
            usage = json.loads(resp.read()).get("usage") or {}
        seconds += time.monotonic() - began
        tokens += int(usage.get("completion_tokens") or 0)
    return (f"real model alone (llama.cpp, one request at a time): {tokens / seconds:.1f} completion tokens/s "
            f"({tokens} tokens in {seconds:.1f}s over {requests} requests)")


def real_added_latency(results: list["Result"]) -> None:
    """real-guard's p50 against real-baseline's: what the relay adds on top of the real model's own latency."""
    by_name = {r.scenario.name: r for r in results if r.run is not None}
    base, relayed = by_name.get("real-baseline"), by_name.get("real-guard")
    if base is None or relayed is None:
        return
    for kind in REAL_MIX:
        one = [x["ms"] for x in base.run.records if x["name"].split()[0] == kind]
        two = [x["ms"] for x in relayed.run.records if x["name"].split()[0] == kind]
        if one and two:
            p_base, p_relay = h.percentile(one, 50), h.percentile(two, 50)
            relayed.info.append(f"{kind}: relay added {p_relay - p_base:+.0f} ms to the real model's p50 of "
                                f"{p_base:.0f} ms ({(p_relay - p_base) / p_base:+.0%})")


# =================================================================================================
# Invariants
# =================================================================================================


def check(result: Result, env: dict) -> None:
    s, run = result.scenario, result.run
    records = run.records
    add = result.checks.append
    add(("requests were made", len(records) > 0, f"{len(records)} requests"))
    failures = Counter(r["name"] for r in records if not r["ok"])
    add(("no failed client request (fail-open)", not failures,
         "0 failed" if not failures else "failed: " + ", ".join(f"{n} x{c}" for n, c in failures.most_common())))
    missing = sum(1 for r in records if r["outcome"] is None)
    if s.relay_on:
        add(("x-relay-outcome on every response", missing == 0, f"{missing} without it"))
    else:
        present = len(records) - missing
        add(("no x-relay-* header (relay off)", present == 0, f"{present} carried one"))
    if s.healthy and s.relay_on:
        failed = Counter(final_outcome(r) for r in records if final_outcome(r).startswith("failed:"))
        add(("no failed:* outcome (healthy secondary)", not failed,
             ", ".join(f"{o} x{c}" for o, c in failed.most_common()) or "none"))
    spend = total_spend(result)
    cap = result.cap
    if cap is not None:
        add(("spend never above the cap", spend <= cap + 1e-12, f"${spend:.6f} of ${cap:.6f}"))
    if s.kind == "budget":
        refused = sum(1 for r in records if r["outcome"] == "skipped:budget")
        add(("the budget ran out and requests went on (skipped:budget)", refused > 0, f"{refused} skipped:budget"))
        first = min((r["t"] for r in records if r["outcome"] == "skipped:budget"), default=None)
        if first is not None:
            later = sum(1 for r in records if r["t"] > first and r["cost_usd"] > 0)
            result.info.append(
                f"budget: first skipped:budget {first - run.started_at:.1f}s into the run; "
                f"relays still charged after it: {later} (reservations hold a call's worst case while it runs; as they "
                "settle at the actual cost, room frees up for a few more)"
            )
    if s.kind == "breaker":
        breaker_checks(result, env)


def total_spend(result: Result) -> float:
    warm = sum(float(hd.get("x-relay-cost-usd") or 0) for _, hd in result.warm)
    return warm + sum(r["cost_usd"] for r in result.run.records)


def open_spans(records: list[dict], min_requests: int = 10, min_seconds: float = 1.0) -> list[tuple[float, float, int]]:
    """Runs of consecutive non-streaming answers that all said ``skipped:breaker_open``: the breaker was
    open from (about) the first to the last. Streamed answers are left out: their headers go out before
    the relay has decided anything."""
    spans, current = [], []
    for r in sorted((r for r in records if not r["name"].split()[0].endswith("-stream")), key=lambda r: r["t"]):
        if r["outcome"] == "skipped:breaker_open":
            current.append(r["t"])
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    return [(c[0], c[-1], len(c)) for c in spans if len(c) >= min_requests and c[-1] - c[0] >= min_seconds]


def breaker_checks(result: Result, env: dict, margin: float = 0.5) -> None:
    run = result.run
    add = result.checks.append
    refused = sum(1 for r in run.records if r["outcome"] == "skipped:breaker_open")
    add(("the breaker opened (skipped:breaker_open)", refused > 0, f"{refused} answers skipped:breaker_open"))
    cooldown, probes = float(env["RELAY_BREAKER_COOLDOWN_S"]), int(env["RELAY_BREAKER_PROBES"])
    hits = [(t, stats.get("by_model", {}).get(SECONDARY_SIM_MODEL, 0)) for t, stats in run.sim_samples]
    worst, total_open, details = None, 0.0, []
    for start, end, n in open_spans(run.records):
        inside = [c for t, c in hits if start + margin <= t <= end - margin]
        if len(inside) < 2:
            continue
        calls = inside[-1] - inside[0]
        allowed = probes * (1 + int((end - start) / cooldown))
        total_open += end - start
        details.append(f"{end - start:.1f}s/{n} answers: {calls} calls (probes allowed {allowed})")
        if calls > allowed and (worst is None or calls - allowed > worst[0]):
            worst = (calls - allowed, start, end)
    add(("no calls to the failing secondary while the breaker was open (probes aside)",
         bool(details) and worst is None,
         "; ".join(details) if details else "no open span long enough to judge (>= 10 answers, >= 1 s)"))
    heal_at = run.started_at + result.duration * 0.65
    healed = sum(1 for r in run.records if r["t"] > heal_at and r["outcome"] in ("modified", "relayed"))
    add(("the relay got through again after the secondary healed", healed > 0,
         f"{healed} relayed answers after t={result.duration * 0.65:g}s"))
    result.info.append(f"breaker: open about {total_open:.1f}s of {run.seconds:.1f}s in {len(details)} spans; "
                       f"secondary calls in total {hits[-1][1] if hits else '?'} for {len(run.records)} requests")


# =================================================================================================
# Output
# =================================================================================================


def fmt_ms(value: float) -> str:
    return "-" if value != value else f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def outcome_label(r: dict) -> str:
    """The header's outcome; for a stream whose headers said ``pending``, ``pending->`` its final outcome."""
    label = r["outcome"] or "(none)"
    final = r.get("final")
    return f"{label}->{final}" if final and final != r["outcome"] else label


def final_outcome(r: dict) -> str:
    return r.get("final") or r["outcome"] or ""


def outcome_text(records: list[dict]) -> str:
    counts = Counter(outcome_label(r) for r in records)
    return ", ".join(f"{o} {c}" for o, c in counts.most_common()) or "-"


def summary_rows(results: list[Result]) -> list[list]:
    rows = []
    for r in results:
        if r.run is None:
            rows.append([r.scenario.name, r.users, f"{r.duration:g}", "-", "-", "-", "-", "-", "-", "-", "-", "ERROR"])
            continue
        d = r.run.durations
        spend = total_spend(r)
        cpu = r.run.cpu
        rows.append([
            r.scenario.name, r.users, f"{r.run.seconds:.0f}", len(r.run.records), f"{r.run.rps:.1f}",
            fmt_ms(h.percentile(d, 50)), fmt_ms(h.percentile(d, 95)), fmt_ms(h.percentile(d, 99)), r.run.failures,
            f"{spend:.6f}" + (f" / {r.cap:.6f}" if r.cap is not None else " / no cap"),
            "/".join(f"{cpu.get(k, float('nan')):.0f}" for k in ("proxy", "locust", "sim", "other")),
            "PASS" if r.passed else "FAIL",
        ])
    return rows


SUMMARY_HEADERS = ["scenario", "users", "s", "requests", "req/s", "p50 ms", "p95 ms", "p99 ms", "failures",
                   "spend USD / cap", "CPU % proxy/locust/sim/other", "invariants"]


def kind_rows(results: list[Result]) -> list[list]:
    rows = []
    for r in results:
        if r.run is None:
            continue
        for kind in r.scenario.mix:
            recs = [x for x in r.run.records if x["name"].split()[0] == kind]
            ttft = [x["ttft_ms"] for x in recs if x["ttft_ms"] is not None]
            notes = Counter(x["note"] for x in recs if x["note"])
            rows.append([r.scenario.name, kind, len(recs), fmt_ms(h.percentile([x["ms"] for x in recs], 50)),
                         fmt_ms(h.percentile(ttft, 50)) if ttft else "-",
                         outcome_text(recs) + "".join(f" [{n}: {c}]" for n, c in notes.items())])
    return rows


def report(results: list[Result], info: dict) -> str:
    lines = [f"Machine: {h.machine_line(info)}.", "",
             h.table(SUMMARY_HEADERS, summary_rows(results)), "",
             "Relay outcomes by client kind: x-relay-outcome, and for streams `pending->` the outcome on the stream's last "
             "event; stream p50 is to the last byte, ttft to the first text:", "",
             h.table(["scenario", "kind", "requests", "p50 ms", "ttft p50 ms", "outcomes"], kind_rows(results),
                     align="llrrrl"), "", "Invariants:", ""]
    for r in results:
        lines.append(f"- {r.scenario.name} ({r.scenario.title}): {'PASS' if r.passed else 'FAIL'}")
        if r.error:
            lines.append(f"  - ERROR {r.error}")
        for name, ok, detail in r.checks:
            lines.append(f"  - [{'x' if ok else ' '}] {name}: {detail}")
        for note in r.info:
            lines.append(f"  - {note}")
        warnings = r.run.cpu_warnings if r.run else []
        if warnings:
            lines.append(f"  - Locust reported itself CPU-bound ({max(warnings):.0f}%): its req/s understates the proxy")
        if r.run and r.run.locust_total >= 0 and r.run.locust_total != len(r.run.records):
            lines.append(f"  - note: Locust's summary counts {r.run.locust_total} requests, the records {len(r.run.records)}")
    json_streams = Counter(r.scenario.name for r in results for x in (r.run.records if r.run else [])
                           if x["note"] == "stream_answered_as_json")
    if json_streams:
        lines += ["", f"Note: {sum(json_streams.values())} streaming /v1/messages requests to mock-primary "
                  f"({', '.join(f'{n} {c}' for n, c in json_streams.items())}) were answered with one JSON body, not "
                  "an event stream: litellm does that for mock_response models, with or without the plugin "
                  "(see baseline). They are checked as non-streaming answers and marked stream_answered_as_json."]
    return "\n".join(lines)


def summary_dict(result: Result) -> dict:
    run = result.run
    d = run.durations if run else []
    return {
        "scenario": result.scenario.name, "title": result.scenario.title, "users": result.users,
        "duration_s": result.duration, "env": result.scenario.env, "error": result.error,
        "requests": len(run.records) if run else 0, "rps": run.rps if run else None,
        "p50_ms": h.percentile(d, 50) if d else None, "p95_ms": h.percentile(d, 95) if d else None,
        "p99_ms": h.percentile(d, 99) if d else None, "failures": run.failures if run else None,
        "outcomes": dict(Counter(outcome_label(r) for r in run.records)) if run else {},
        "spend_usd": total_spend(result) if run else None, "cap_usd": result.cap,
        "cpu_percent": run.cpu if run else {}, "passed": result.passed,
        "checks": [{"name": n, "ok": ok, "detail": dt} for n, ok, dt in result.checks], "info": result.info,
    }


# =================================================================================================
# Command line
# =================================================================================================


def main(argv: list[str] | None = None) -> int:
    known = scenarios()
    parser = argparse.ArgumentParser(prog="python -m loadtest.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", nargs="*", help=f"default: {' '.join(DEFAULT_RUN)}; also: smoke")
    parser.add_argument("--duration", default=None, help="load per scenario, e.g. 15s (default 15s)")
    parser.add_argument("--users", type=int, default=None, help="Locust users, all spawned at once (default 16)")
    parser.add_argument("--results", type=Path, default=h.RESULTS, help="results directory (default loadtest/results)")
    parser.add_argument("--ttft-ms", type=float, default=20.0, help="Ollama primary: time to first token")
    parser.add_argument("--tokens-per-s", type=float, default=200.0, help="Ollama primary: streaming pace")
    parser.add_argument("--primary-latency-ms", type=float, default=0.0, help="Ollama primary: delay before any answer")
    parser.add_argument("--secondary-latency-ms", type=float, default=20.0, help="simulated secondaries' latency")
    parser.add_argument("--error-rate", type=float, default=0.5, help="breaker: share of 500s while failing")
    parser.add_argument("--hang-rate", type=float, default=0.3, help="breaker: share of hangs while failing")
    args = parser.parse_args(argv)
    args.duration_given, args.users_given = args.duration is not None, args.users is not None
    args.duration = h.parse_duration(args.duration or "15s")
    args.users = args.users or 16
    names = args.scenario or list(DEFAULT_RUN)
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(known)}")
    info = h.machine()
    print(f"relay load test: {', '.join(names)}; results in {args.results}/", flush=True)
    results = []
    for name in names:
        began = time.monotonic()
        print(f"  {name}: {known[name].title} ...", end=" ", flush=True)
        result = run_scenario(known[name], args, args.results)
        results.append(result)
        verdict = "ERROR " + result.error if result.error else ("PASS" if result.passed else "FAIL")
        print(f"{verdict} ({time.monotonic() - began:.0f}s)", flush=True)
    real_added_latency(results)
    text = report(results, info)
    print("\n" + text, flush=True)
    (args.results / "summary.md").write_text(text + "\n")
    if args.results.resolve() == h.RESULTS.resolve() and names == list(DEFAULT_RUN):
        h.update_results("loadtest", "## make loadtest (`python -m loadtest.run`)\n\n" + text)
    broken = [r.scenario.name for r in results if not r.passed]
    print(f"\n{'FAILED: ' + ', '.join(broken) if broken else 'all invariants held'}", flush=True)
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
