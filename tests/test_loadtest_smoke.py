"""The load-test harness cannot rot: one short scenario through the same code path as `make loadtest`.

The full suite (every mode, streaming, breaker, budget) stays in `make loadtest`; `make bench` measures.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loadtest import run as loadtest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.proxy
def test_a_short_load_run_leaves_reports_counts_relay_outcomes_and_checks_its_invariants(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "loadtest.run", "smoke", "--duration", "5s", "--users", "4", "--results", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=150)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]

    directory = tmp_path / "smoke"
    for name in ("report.html", "locust_stats.csv", "records.json", "summary.json"):
        assert (directory / name).stat().st_size > 0, name
    summary = json.loads((directory / "summary.json").read_text())
    assert summary["requests"] > 0
    assert summary["failures"] == 0
    assert sum(summary["outcomes"].values()) == summary["requests"]
    assert "(none)" not in summary["outcomes"]  # every relayed answer carried x-relay-outcome
    assert {c["name"] for c in summary["checks"]} >= {"no failed client request (fail-open)",
                                                      "x-relay-outcome on every response"}
    assert all(c["ok"] for c in summary["checks"]) and summary["passed"]
    assert "| smoke" in proc.stdout and "all invariants held" in proc.stdout


def _result(records: list[dict], **scenario) -> loadtest.Result:
    run = loadtest.h.LocustRun(Path("."), records, 0.0, 10.0, {}, len(records), 0)
    return loadtest.Result(loadtest.Scenario("x", "synthetic", **scenario), 1, 10.0, run)


def _record(t: float, outcome: str | None, ok: bool = True, cost: float = 0.0, name: str = "chat mock-primary") -> dict:
    return {"t": t, "name": name, "ok": ok, "outcome": outcome, "cost_usd": cost, "ms": 10.0, "ttft_ms": None,
            "note": "", "final": outcome}


def test_a_failed_request_a_missing_header_or_spend_over_the_cap_breaks_the_run():
    result = _result([_record(1, "modified", cost=0.5), _record(2, None), _record(3, "modified", ok=False, cost=0.6)])
    result.cap = 1.0
    loadtest.check(result, {})
    broken = {name for name, ok, _ in result.checks if not ok}
    assert broken == {"no failed client request (fail-open)", "x-relay-outcome on every response",
                      "spend never above the cap"}
    assert not result.passed


def test_calls_to_the_secondary_while_the_breaker_is_open_break_the_breaker_invariant():
    open_answers = [_record(1 + i * 0.1, "skipped:breaker_open") for i in range(40)]  # open from t=1 to t=4.9
    env = {"RELAY_BREAKER_COOLDOWN_S": "30", "RELAY_BREAKER_PROBES": "1"}

    def verdict(calls_during_span: int) -> bool:
        result = _result(open_answers + [_record(9, "modified")], kind="breaker", healthy=False)
        result.run.sim_samples = [(t / 10, {"by_model": {"gpt-4o-mini": 100 + (calls_during_span if t >= 30 else 0)}})
                                  for t in range(0, 100)]
        loadtest.breaker_checks(result, env)
        return dict((n, ok) for n, ok, _ in result.checks)[
            "no calls to the failing secondary while the breaker was open (probes aside)"]

    assert verdict(1) is True  # one half-open probe is allowed
    assert verdict(5) is False


def test_a_bench_round_with_a_crashed_proxy_or_a_step_nobody_answered_is_lost():
    """make bench throws away (and runs again) a round whose proxy died: its later base steps got no
    answer and CPU 0, which once ended an 8-round run in a ZeroDivisionError after 35 minutes."""
    from types import SimpleNamespace

    from loadtest import bench

    def proxy(exit_code):
        return SimpleNamespace(proc=SimpleNamespace(poll=lambda: exit_code), log_path=Path("proxy-1.log"))

    order = [SimpleNamespace(name="baseline"), SimpleNamespace(name="refine"), SimpleNamespace(name="baseline")]
    answered = [SimpleNamespace(records=[{"ok": True}])] * 3
    assert bench.lost_steps({"baseline": proxy(None), "caller": proxy(None)}, order, answered) == ""

    lost = bench.lost_steps({"baseline": proxy(-11), "caller": proxy(None)}, order,
                            [answered[0], answered[1], SimpleNamespace(records=[])])
    assert "the baseline proxy exited (signal SIGSEGV" in lost and "caller" not in lost
    assert "1 step(s) got no answer (baseline)" in lost

    hung = bench.lost_steps({"caller": proxy(None)}, order, [answered[0], SimpleNamespace(records=[]), answered[2]])
    assert hung == "1 step(s) got no answer (refine)"
    assert "exit status 1" in bench.lost_steps({"budget": proxy(1)}, order, answered)


def test_the_bench_pairs_every_process_of_a_variant_with_every_plain_process_and_books_them_all(tmp_path):
    """Two identical proxy processes can differ in CPU per request by a fifth for minutes: make bench
    rotates which process of each proxy a round measures, so n * n rounds pair every variant's
    process with every plain one; the check that caller books secondary calls (and none does not)
    reads every process's books, not only the first's."""
    import itertools
    import json

    from loadtest import bench

    for n in (1, 2, 3):
        sets = [{name: (name, i) for name in bench.PROXIES} for i in range(n)]
        rounds = [bench.pairing(sets, r) for r in range(n * n)]
        assert {(chosen["caller"][1], chosen["baseline"][1]) for chosen in rounds} == set(itertools.product(range(n), repeat=2))
        for chosen in rounds:  # every variant of a round from one process set, the plain proxy from one
            assert len({chosen[name][1] for name in bench.PROXIES if name != "baseline"}) == 1

    def rows(directory, models):
        directory.mkdir()
        (directory / "spend-rows.jsonl").write_text("".join(json.dumps({"model": m}) + "\n" for m in models))

    rows(bench.proxy_dir(tmp_path, "caller"), ["openai/bench-primary", "openai/bench-sec"])
    rows(bench.proxy_dir(tmp_path, "caller", 1), ["openai/bench-sec", "openai/bench-member-1"])
    rows(bench.proxy_dir(tmp_path, "none"), ["openai/bench-primary"])
    rows(bench.proxy_dir(tmp_path, "none", 1), ["openai/bench-primary"])
    note = bench.books_note(tmp_path)
    assert note.startswith("LiteLLM's spend rows of secondary calls: 3 with attribution caller, 0 with none"), note
    rows(bench.proxy_dir(tmp_path, "caller", 2), ["openai/bench-primary"])  # one caller process booked none
    assert bench.books_note(tmp_path).endswith("(not so in proxy-caller-3)")
    rows(bench.proxy_dir(tmp_path, "none", 2), ["openai/bench-sec"])  # a later process of none booked one
    assert "proxy-none-3" in bench.books_note(tmp_path)


def test_the_bench_stops_the_proxies_it_started_when_another_fails_to_start(tmp_path, monkeypatch):
    """Ten proxy processes start at once, each in a session of its own: when one cannot start, the
    ones that did are stopped before the error goes up (nothing else would ever stop them)."""
    from types import SimpleNamespace

    from loadtest import bench

    stopped = []

    def start_proxy(directory, *args, **kwargs):
        if directory.name == "proxy-none-2":
            raise RuntimeError("the proxy did not answer its health check")
        return SimpleNamespace(stop=lambda: stopped.append(directory.name))

    monkeypatch.setattr(bench.h, "start_proxy", start_proxy)
    with pytest.raises(RuntimeError, match="health check"):
        bench.start_proxies(bench.PROXIES, tmp_path, "http://127.0.0.1:9", "http", (0, 1))
    assert sorted(stopped) == sorted(bench.proxy_dir(tmp_path, name, i).name
                                     for name in bench.PROXIES for i in (0, 1) if (name, i) != ("none", 1))


def test_the_bench_sees_each_collection_of_a_watched_process_and_only_in_its_window(tmp_path):
    """The bench's garbage-collector probe, imported by a real interpreter as the proxies import it:
    two full collections forced in the child show up, with the CPU they took, in the window that
    holds them, and neither a collection before the window nor one after it is counted."""
    from loadtest import bench

    # a second between the collections: the probe writes every quarter second, so a slow machine has margin
    child = ("import gc, time\n"
             "time.sleep(1.0); gc.collect()\n"  # before the window
             "time.sleep(1.0); t = time.time(); c = time.thread_time(); gc.collect(); gc.collect()\n"
             "c = time.thread_time() - c; time.sleep(1.0); u = time.time(); gc.collect()\n"  # after it
             "print(t, c, u, flush=True); time.sleep(1.0)")
    env = {"PYTHONPATH": str(bench.GC_PROBE), "BENCH_GC_STATS": str(tmp_path), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    forced, took, later = map(float, proc.stdout.split())
    (stats,) = tmp_path.glob("gc-*.txt")

    seconds, full = bench.collector_between(stats, forced - 0.5, forced + 0.75)
    assert full == 2
    assert took * 0.5 <= seconds <= took * 1.5 + 0.002
    assert bench.collector_between(stats, forced - 0.5, later - 0.1)[1] == 2
    assert bench.collector_between(stats, forced - 3600, forced - 3599) is None  # before the probe's first line
    assert bench.collector_between(stats, forced, time.time() + 60) is None  # the probe wrote nothing after it


def test_a_figure_pooled_over_rounds_weighs_each_answer_once_and_can_leave_the_collector_out():
    """The pooled figure is CPU per request over all answers, not a mean of per-round ratios: a round
    with few answers weighs little, and taking the collector out changes only the collector's part;
    a round whose proxy was not watched is left out of the collector's column, not counted as 0."""
    from loadtest import bench

    f = bench.Figure("refine", "refine", "baseline", "cpu", 1.25)
    f.steps = [((100, 20.0, 2.0, 1), (100, 10.0, 1.0, 0)), ((300, 12.0, 0.0, 0), (100, 10.0, 0.0, 0))]
    assert f.pooled() == pytest.approx((100 * 20 + 300 * 12) / 400 / 10)
    assert f.pooled(without_collector=True) == pytest.approx((100 * 18 + 300 * 12) / 400 / ((100 * 9 + 100 * 10) / 200))
    capacity = bench.Figure("disabled", "disabled", "baseline", "capacity", 0.97, steps=f.steps)
    assert capacity.pooled() == pytest.approx(1 / f.pooled())
    shown = bench._collector(f)
    assert "1.00 vs 0.50 ms/req" in shown and "per step 0.5 vs 0.0" in shown and "without it 1.42x" in shown

    nan = float("nan")
    f.steps.append(((100, 30.0, nan, nan), (100, 10.0, nan, nan)))
    assert "1.00 vs 0.50 ms/req" in bench._collector(f) and "(2 watched rounds)" in bench._collector(f)
    f.steps = [f.steps[2]]
    assert bench._collector(f) == "not watched"


def test_a_variant_judged_against_another_base_keeps_the_collector_out_of_the_rescaling():
    """refine caller / none compares two variants each against its own bases: the rescaled measure's
    CPU without the collector must follow the bases' CPU without it, so a full collection inside one
    base's steps does not leak into the figure without the collector."""
    from loadtest import bench

    def measure(cpu, gc):
        return bench.Measure("x", [{}] * 100, 1.0, cpu, {}, gc, 0)

    moved = bench.rescaled(measure(14.0, 0.0), around=measure(14.0, 0.0), to=measure(15.0, 1.0))
    assert moved.cpu_ms == pytest.approx(15.0)
    assert moved.cpu_ms - moved.gc_ms == pytest.approx(14.0)


def test_the_instruction_count_takes_the_idle_work_off_and_judges_each_figure_its_way():
    from types import SimpleNamespace

    from loadtest import exact

    # 20 requests in 10 s at 2 M instructions/s of idle work: 20 M of the 1,220 M were the proxy's timers
    assert exact.Count(1_220_000_000, 10.0, 20, idle_per_s=2e6).per_request == 60e6
    by_name = {v.name: v for v in exact.chosen(None)}
    assert {"baseline", "refine", "refine-none", "consensus-stream", "breaker-open", "disabled"} <= set(by_name)
    assert {v.name for v in exact.chosen("breaker")} == {"breaker-open", "baseline"}  # a figure's base comes with it
    counts = {"baseline": 50e6, "refine": 65e6, "refine-none": 60e6, "breaker-open": 52e6}
    for name, per_request in counts.items():
        by_name[name].counts = [exact.Count(int(per_request * 10), 0.0, 10)]
    rows = {line.split(" | ")[0].strip("| "): line for line in
            exact.report([by_name[n] for n in counts], SimpleNamespace(requests=10, windows=1), 60, "idle").splitlines()}
    assert "1.300x | MISS" in rows["instructions/req: refine"]  # 65 / 50 against <= 1.25
    assert "1.200x | PASS" in rows["instructions/req: refine, attribution none"]
    assert "0.962 | MISS" in rows["capacity: breaker open / no plugin"]  # 50 / 52 against >= 0.97
    assert "instructions/req: consensus" not in rows  # not counted: no row
