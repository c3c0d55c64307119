"""``make bench``: what the relay costs, against a proxy without the plugin, measured side by side.

    python -m loadtest.bench [--rounds 4] [--instances 2] [--duration 7s] [--latency-duration 4s] [--latency-ms 50] [--no-profile]

The figures are issue 13's goals: proxy CPU per request of a relayed request as a multiple of a
plain one (refine with one HTTP secondary <= 1.25x, consensus with 3 members + merge <= 2.0x, the
same two for a streamed client request, whose final answer streams from the secondary's own stream),
each with RELAY_SPEND_ATTRIBUTION=caller (the default) and =none; the latency a relay adds (refine:
p50 <= L + 3 ms for a secondary of latency L); and the capacity of a proxy whose relay does not call
(breaker open, budget refused, plugin disabled) >= 0.97 of a plugin-free proxy. Each figure is
printed with its raw values (CPU ms per request, variant and base) beside the ratio and its target.

One simulator and five proxies on the same model list, each proxy as two processes (``--instances``),
all started together, then measured one at a time while the others sit idle. Two identical proxy
processes can differ in CPU per request by a fifth for minutes on end, so the rounds rotate which
process of each proxy they measure (INSTANCES): n * n rounds pair every variant's process with
every plain one. Every proxy runs LiteLLM's spend tracking without a database
(``tests/proxy_callbacks/litellm_books.py``: the real cost tracker, key auth and budget counters,
only the final database write replaced by a recorder), and the load uses a virtual key with a
budget, so "attribution caller" really books each secondary call to the key and checks its budget:

    baseline   no plugin (the config without the relay's callbacks entry)
    disabled   the plugin loaded, RELAY_ENABLED=false
    caller     the relay, RELAY_SPEND_ATTRIBUTION=caller (the default): refine, consensus and shadow
               primaries whose `relay:` blocks point at simulated secondaries of latency L (consensus:
               three members of latency L and an aggregator of latency A), and a primary whose
               secondary always answers 500 (`p-breaker`: its breaker is opened in the warm-up and
               stays open, RELAY_BREAKER_COOLDOWN_S=3600)
    none       the same with RELAY_SPEND_ATTRIBUTION=none (secondary calls `no-log`, no key budget check)
    budget     refine with RELAY_BUDGET_USD=0: every relay is refused before any call (`skipped:budget`)

The primary is, as in issue 13's own measurement, a real HTTP model: the simulator's OpenAI API at
~0 ms latency (``--primary mock``: a mock_response model litellm answers itself, a cheaper plain
request, so every ratio is stricter). Its answer carries ``SIM:ANSWER=`` (the client's prompt makes
the simulated primary answer it), so every simulated secondary answers the primary's own text: a
relayed answer is as long as a plain one (and a streamed one has as many chunks), and the figures
compare like with like.

Throughput: 16 Locust users (FastHttpUser) back to back; CPU per request is taken from the proxy's
own CPU time over the step (robust to neighbours taking the CPU, unlike wall-clock req/s, which is
printed beside it). Latency: one user sending 8 requests/s (one request at a time, the proxy idle in
between), so the p50 difference is the latency the relay itself adds, not queueing. L in "L + 3 ms"
is the secondary's latency as a client sees it: the same client calls the simulated secondary
directly in the same round (``secondary-alone``: the simulator's sleep of L ms plus its own handling).

The measurements run in rounds. A round is one Locust process that walks a timed plan (see
``LOADTEST_PLAN`` in locustfile.py): each variant once, right between two runs of its base (B v1 B
v2 B ... vn B; the variants in an order rotated from round to round), with a pause between steps so
nothing of one step spills into the next. Each figure is taken within a round, the variant against
the mean of the two base runs around it: a drift of the machine during the round (other virtual
machines on the host, caches) weighs on both sides alike. The median over rounds is reported with
the spread. The plugin's own work is measured in process (``loadtest/inproc.py``).

A figure that misses its target gets a profile when py-spy is installed (``.venv/bin/pip install
py-spy``; not a project dependency): py-spy samples the proxy (``--gil``) while that variant and its
baseline run again, and the note splits the extra CPU per request into the plugin's own code,
litellm's work for the secondary call under the hooks, litellm's worker threads and the rest of the
proxy, and names the functions whose self time grew most. The in-process figure is profiled with
cProfile.

Every proxy, the plugin-free one included, imports ``loadtest/gc_probe/sitecustomize.py`` at startup
(on its PYTHONPATH): it writes what Python's garbage collector did, so each figure shows the
collector's share beside it. A full collection of a LiteLLM proxy's ~820,000 objects takes ~0.45 s of
CPU and came every 10 to 20 s under this load: whether one falls inside a 7 s step or just outside it
moves that step by about 1 ms per request, a large part of the round-to-round spread. Each figure is
also given pooled over the rounds (all answers together), which such a pause skews less than it
skews one round. Results: ``loadtest/results/bench/`` and the ``bench`` section of ``loadtest/RESULTS.md``.
"""

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadtest import harness as h

#: the primary's answer; the marker makes every simulated secondary answer the same text (a relayed
#: answer is as long as a plain one) while the relayed answer still differs from the primary's (modified)
ANSWER = "SIM:ANSWER=Paris is the capital of France. It lies on the Seine."
#: what the client asks: the simulated HTTP primary answers the text after the first marker (ANSWER itself)
PROMPT = f"What is the capital of France? SIM:ANSWER={ANSWER}"
#: ``--primary``: what the plain model is
PRIMARIES = {"http": "an HTTP primary (the simulator's OpenAI API, latency ~0)",
             "mock": "a mock_response primary (no network)"}
PRIMARY = "primary"  #: the plain model every proxy serves (a base's model, and the disabled and budget variants')
THROUGHPUT_USERS = 16
LATENCY_USERS, LATENCY_RATE = 1, 8.0  #: one request at a time: the relay's own added latency, no queueing
LEAD_S, GAP_S, SETTLE_S = 2.0, 1.0, 0.5  #: before the first step (users spawn), between steps, unmeasured step start
#: a step during which other processes used more than this (% of one core) is noisy: on 2 vCPUs a busy neighbour
#: slows the proxy's own core too (shared caches, hyperthread siblings), so even its CPU time per request inflates
NOISY_OTHER_PCT = 25.0
MIN_QUIET_ROUNDS = 3
#: rounds run again because a proxy stopped answering, before the bench gives up
MAX_DISCARDED_ROUNDS = 3
#: processes per proxy (``--instances``). Two identical proxy processes, measured one after the other
#: under the same load, differed in CPU per request by up to a fifth for minutes on end (2026-12-03:
#: two plugin-free proxies 17.8 and 14.9 ms, two `caller` proxies 19.5 and 22.1 ms, in one round;
#: refine `caller` against the plain proxy 1.07x to 1.10x on one pair of processes, 1.43x to 1.49x on
#: the other, in the same rounds). A figure from one pair of processes carries that pair's bias
#: however many rounds it runs, so round r measures the variants on instance r % n and the plain
#: proxy on instance (r // n) % n: n * n rounds pair every variant's process with every plain one.
INSTANCES = 2


@dataclass
class Measure:
    """One variant in one round."""

    variant: str
    records: list[dict]
    seconds: float  #: length of the measured window
    cpu_ms: float  #: the variant's proxy: CPU milliseconds per request
    cpu: dict[str, float]  #: % of one core: proxy (this variant's), locust, other
    #: of cpu_ms, what Python's garbage collector took (ms per request; nan: the proxy's collector was not watched)
    gc_ms: float = float("nan")
    full: float = float("nan")  #: full (generation 2) collections during the step (a bracket: per step, the mean)

    @property
    def rps(self) -> float:
        return len(self.records) / self.seconds

    @property
    def p50(self) -> float:
        return h.percentile([r["ms"] for r in self.records], 50)

    @property
    def p99(self) -> float:
        return h.percentile([r["ms"] for r in self.records], 99)

    @property
    def relay_p50(self) -> float:
        return h.percentile([r["relay_ms"] for r in self.records if r.get("relay_ms") is not None], 50)


@dataclass
class Variant:
    name: str
    proxy: str  #: a key of PROXIES
    model: str
    load: str  #: throughput | latency
    expect: str | None  #: the relay outcome every answer must carry (a stream's: its relay object's; None: no header)
    kind: str = "chat"  #: chat | chat-stream (locustfile KINDS)
    base: str | None = None  #: the base measured right before and right after this variant (None: a base)
    runs: list[Measure] = field(default_factory=list)  #: one per round (a base: one per step it ran)
    brackets: list[Measure] = field(default_factory=list)  #: per round, the base as measured around this variant


#: the simulator itself as a step's target (the ``secondary-alone`` step calls the secondary directly)
SIM = "sim"


def variants() -> list[Variant]:
    plain, stream, light = {"base": "baseline"}, {"kind": "chat-stream", "base": "baseline-stream"}, {"base": "baseline-light"}
    return [
        Variant("baseline", "baseline", PRIMARY, "throughput", None),
        Variant("baseline-stream", "baseline", PRIMARY, "throughput", None, kind="chat-stream"),
        Variant("disabled", "disabled", PRIMARY, "throughput", None, **plain),
        Variant("breaker-open", "caller", "p-breaker", "throughput", "skipped:breaker_open", **plain),
        Variant("budget-refused", "budget", PRIMARY, "throughput", "skipped:budget", **plain),
        Variant("refine", "caller", "p-refine", "throughput", "modified", **plain),
        Variant("refine-none", "none", "p-refine", "throughput", "modified", **plain),
        Variant("consensus", "caller", "p-consensus", "throughput", "modified", **plain),
        Variant("consensus-none", "none", "p-consensus", "throughput", "modified", **plain),
        Variant("refine-stream", "caller", "p-refine", "throughput", "modified", **stream),
        Variant("refine-stream-none", "none", "p-refine", "throughput", "modified", **stream),
        Variant("consensus-stream", "caller", "p-consensus", "throughput", "modified", **stream),
        Variant("consensus-stream-none", "none", "p-consensus", "throughput", "modified", **stream),
        Variant("baseline-light", "baseline", PRIMARY, "latency", None),
        # L as a client sees it: the simulated secondary called directly, the same way (its sleep of L ms
        # plus the simulator's own handling)
        Variant("secondary-alone", SIM, "bench-sec", "latency", None, **light),
        Variant("refine-L", "caller", "p-refine", "latency", "modified", **light),
        Variant("refine-L-none", "none", "p-refine", "latency", "modified", **light),
        Variant("consensus-L", "caller", "p-consensus", "latency", "modified", **light),
        Variant("shadow-L", "caller", "p-shadow", "latency", "relayed", **light),
    ]


def round_order(all_variants: list[Variant], rnd: int) -> list[Variant]:
    """One round's steps: per base, the base, then each of its variants followed by the base again
    (B v1 B v2 B ... vn B), the variants in an order rotated from round to round. Each variant is
    judged against the mean of the two base steps around it, so a drift of the machine during the
    round (other virtual machines on the host, caches, clocks) weighs on both sides alike."""
    order = []
    for base in (v for v in all_variants if v.base is None):
        family = [v for v in all_variants if v.base == base.name]
        shift = rnd % len(family) if family else 0
        order.append(base)
        for v in family[shift:] + family[:shift]:
            order += [v, base]
    return order


def rescaled(m: Measure, around: Measure, to: Measure) -> Measure:
    """``m`` (measured between the base runs ``around``) as if measured between the base runs ``to``:
    its CPU per request and req/s scaled by the bases' ratio, so two variants of one base compare
    each against its own neighbours."""
    scale = to.cpu_ms / around.cpu_ms
    # the collector's share rescaled apart: the rest of m's CPU by the rest of the bases', so a collection
    # inside one base's steps does not leak into the figure without the collector
    rest = (m.cpu_ms - m.gc_ms) * (to.cpu_ms - to.gc_ms) / (around.cpu_ms - around.gc_ms)
    return Measure(m.variant, m.records, m.seconds * scale, m.cpu_ms * scale, m.cpu, m.cpu_ms * scale - rest, m.full)


def bracket(before: Measure, after: Measure) -> Measure:
    """The base as measured around a variant: both steps' answers, the mean of their CPU per request."""
    return Measure(before.variant, before.records + after.records, before.seconds + after.seconds,
                   (before.cpu_ms + after.cpu_ms) / 2, {k: max(before.cpu[k], after.cpu[k]) for k in before.cpu},
                   (before.gc_ms + after.gc_ms) / 2, (before.full + after.full) / 2)


#: what the simulated models cost (gpt-4o-mini's prices): every call is priced, so the books hold real costs
PRICE = {"input_cost_per_token": 1.5e-07, "output_cost_per_token": 6e-07}
SECONDARY_MODELS = ("bench-sec", "bench-member-1", "bench-member-2", "bench-member-3", "bench-aggregator")


def model_list(sim_url: str, primary: str = "http") -> list[dict]:
    """The models of every proxy; ``primary``: http (the simulator's OpenAI API, latency ~0) or mock
    (mock_response: litellm answers itself, no network)."""
    if primary == "http":
        def entry(name: str, relay: dict | None = None) -> dict:
            return h.simulated(name, "openai/bench-primary", sim_url, relay, **PRICE)
    else:
        def entry(name: str, relay: dict | None = None) -> dict:
            return h.mock(name, ANSWER, relay, model="openai/mock-primary", **PRICE)
    return [
        entry(PRIMARY),
        h.simulated("sec-http", "openai/bench-sec", sim_url, **PRICE),
        *(h.simulated(f"m{i}", f"openai/bench-member-{i}", sim_url, **PRICE) for i in (1, 2, 3)),
        h.simulated("agg", "openai/bench-aggregator", sim_url, **PRICE),
        h.simulated("sec-dead", "openai/bench-dead", sim_url, **PRICE),
        entry("p-refine", {"mode": "refine", "secondary_model": "sec-http"}),
        entry("p-consensus", {"mode": "consensus", "consensus_models": ["m1", "m2", "m3"], "secondary_model": "agg"}),
        entry("p-shadow", {"mode": "shadow", "secondary_model": "sec-http"}),
        entry("p-breaker", {"mode": "refine", "secondary_model": "sec-dead"}),
    ]


#: the virtual key the load uses, seeded into every proxy's books with a budget it never reaches
BENCH_KEY = "sk-bench-budgeted-0001"
BOOKS = ("litellm_books.instance",)
RELAY_ENV = {"RELAY_MODE": "refine", "RELAY_SECONDARY_MODEL": "sec-http", "RELAY_TIMEOUT_S": "5",
             "RELAY_DEADLINE_S": "10"}
PROXIES = {  # name: (plugin loaded, env)
    "baseline": (False, {}),
    "disabled": (True, {"RELAY_ENABLED": "false"}),
    "caller": (True, {**RELAY_ENV, "RELAY_BREAKER_COOLDOWN_S": "3600", "RELAY_SPEND_ATTRIBUTION": "caller"}),
    "none": (True, {**RELAY_ENV, "RELAY_SPEND_ATTRIBUTION": "none"}),
    "budget": (True, {**RELAY_ENV, "RELAY_BUDGET_USD": "0"}),
}


def simulated_models(latency_ms: float, aggregator_ms: float) -> dict[str, dict]:
    """The simulator's models: a primary that answers at once, secondaries and members of latency L, the
    aggregator's A."""
    return {"bench-primary": {"latency_ms": 0.0}, "bench-sec": {"latency_ms": latency_ms},
            **{f"bench-member-{i}": {"latency_ms": latency_ms} for i in (1, 2, 3)},
            "bench-aggregator": {"latency_ms": aggregator_ms}}


#: the simulator's answer to every call of the dead secondary (``p-breaker``'s)
DEAD = {"bench-dead": "SIM:HTTP500"}


def books_env(directory: Path) -> dict[str, str]:
    """The books stub's settings for one proxy: where its spend rows go, and the seeded key."""
    return {"BOOKS_ROWS": str(directory / "spend-rows.jsonl"),
            "BOOKS_KEYS": json.dumps([{"key": BENCH_KEY, "max_budget": 1e6, "alias": "bench"}])}


def booked_models(directory: Path) -> Counter:
    """Spend rows per model in one proxy's books."""
    found = Counter()
    path = directory / "spend-rows.jsonl"
    if path.exists():
        with open(path) as rows:
            for line in rows:
                with contextlib.suppress(ValueError):
                    found[json.loads(line).get("model") or "?"] += 1
    return found


# =================================================================================================
# Measuring: one Locust process per round walks a timed plan of steps
# =================================================================================================


def proxy_dir(root: Path, name: str, instance: int = 0) -> Path:
    """Where one process of a proxy works: ``proxy-caller``, ``proxy-caller-2``, ..."""
    return root / (f"proxy-{name}" + (f"-{instance + 1}" if instance else ""))


def start_proxies(which: dict, root: Path, sim_url: str, primary: str, instances: tuple[int, ...] = (0,),
                  launcher: tuple[str, ...] = ()) -> list[dict]:
    """The proxies of ``which`` (names and settings of PROXIES), each instance of ``instances`` a
    process of its own, all started together: per instance, a dict of its proxies by name. Python's
    fault handler is on: a proxy that crashes leaves its Python stack in its log (the plugin-free
    proxy once died of a segfault inside the interpreter under this load). Each proxy's garbage
    collector is watched (``loadtest/gc_probe``), the plugin-free one's too, unless a ``launcher``
    (valgrind: loadtest/exact.py) runs them: the watcher's thread would be counted."""
    def start(name: str, plugin: bool, env: dict, directory: Path) -> Any:
        watch = {} if launcher else {
            "PYTHONPATH": os.pathsep.join(filter(None, (str(GC_PROBE), os.environ.get("PYTHONPATH")))),
            "BENCH_GC_STATS": str(directory.resolve())}
        return h.start_proxy(directory, model_list(sim_url, primary), plugin,
                             {**env, **books_env(directory), "PYTHONFAULTHANDLER": "1", **watch}, BOOKS,
                             launcher=launcher)

    with ThreadPoolExecutor(max(len(which) * len(instances), 1)) as pool:
        futures = [{name: pool.submit(start, name, plugin, env, proxy_dir(root, name, i))
                    for name, (plugin, env) in which.items()} for i in instances]
    try:
        return [{name: future.result() for name, future in started.items()} for started in futures]
    except BaseException:  # one did not start: stop the ones that did (they run in sessions of their own)
        for future in (f for started in futures for f in started.values()):
            if future.exception() is None:
                future.result().stop()
        raise


def restart_exited(sets: list[dict], root: Path, sim_url: str, primary: str, notes: list[str]) -> None:
    """Every proxy process that exited, in any set, started again and warmed up (a dead process of
    the set a round does not measure would otherwise lose the round that next measures it)."""
    for i, instance in enumerate(sets):
        gone = {name: PROXIES[name] for name, p in instance.items() if p.proc.poll() is not None}
        for name in gone:
            instance[name].stop()
        if gone:
            instance.update(start_proxies(gone, root, sim_url, primary, (i,))[0])
            warm_up(instance, notes)


def pairing(sets: list[dict], rnd: int) -> dict:
    """The processes round ``rnd`` measures: every variant's proxy from instance ``rnd % n``, the
    plain proxy from instance ``(rnd // n) % n`` (see INSTANCES)."""
    chosen = dict(sets[rnd % len(sets)])
    chosen["baseline"] = sets[(rnd // len(sets)) % len(sets)]["baseline"]
    return chosen


#: a ``sitecustomize`` the proxies import at startup: their garbage collector's work, written to a file
GC_PROBE = h.HERE / "gc_probe"


def collector_between(path: Path, t0: float, t1: float) -> tuple[float, int] | None:
    """What a proxy's garbage collector did from ``t0`` to ``t1`` (epoch seconds), from its probe's
    file (lines ``time n0 n1 n2 s0 s1 s2``, cumulative, every quarter second): CPU seconds of every
    collection, and the number of full (generation 2) ones. None: no line at or before ``t0``, or
    none after ``t1`` (the probe had stopped writing: nothing it says covers the window).

    A collection is counted whole in the line written after it ended, so one that straddles an end
    of the window (a full one takes ~0.45 s) is counted on one side of it only: noise of up to ~1 ms
    per request in a 7 s step either way, which cancels on average, not a bias."""
    if not path.exists():
        return None
    at_start = at_end = None
    after = False
    for line in path.read_text().splitlines():
        fields = line.split()
        if len(fields) != 7:  # a line still being written when the file was read
            continue
        if float(fields[0]) <= t0:
            at_start = fields
        if float(fields[0]) <= t1:
            at_end = fields
        else:
            after = True
    if at_start is None or at_end is None or not after:
        return None
    seconds = sum(float(at_end[i]) - float(at_start[i]) for i in (4, 5, 6))
    return seconds, int(at_end[3]) - int(at_start[3])


def lost_steps(proxies: dict, order: list[Variant], measures: list["Measure"]) -> str:
    """'' when every step of a round got answers and every proxy still runs; else what was lost (a
    proxy that exited, with its exit status; the steps that got no answer at all)."""
    lost = []
    for name, proxy in proxies.items():
        code = proxy.proc.poll()
        if code is not None:
            how = f"exit status {code}"
            if code < 0:
                with contextlib.suppress(ValueError):  # a number no signal of this system has stays a number
                    how = f"signal {signal.Signals(-code).name}"
            lost.append(f"the {name} proxy exited ({how}; its log: {proxy.log_path})")
    silent = [v.name for v, m in zip(order, measures, strict=True) if not m.records]
    if silent:
        lost.append(f"{len(silent)} step(s) got no answer ({', '.join(dict.fromkeys(silent))})")
    return "; ".join(lost)


def warm_up(proxies: dict, notes: list[str]) -> None:
    """Every path warm (first calls build clients and caches), and the dead secondary's breaker open."""
    for v in variants():
        for _ in range(20 if v.proxy != SIM else 0):
            h.send(proxies[v.proxy], v.kind, v.model, PROMPT)
    for attempt in range(100):
        _, headers = h.send(proxies["caller"], "chat", "p-breaker", PROMPT)
        if headers.get("x-relay-outcome") == "skipped:breaker_open":
            notes.append(f"the breaker of sec-dead opened after {attempt + 1} warm-up requests")
            return
    notes.append("WARNING: the breaker of sec-dead did not open in the warm-up")


def run_plan(order: list[Variant], proxies: dict, directory: Path, lengths: dict[str, float],
             spy: set[str] = frozenset(), sim=None, idle: tuple = ()) -> tuple[list[Measure], dict[str, Path]]:
    """One Locust process: each variant of ``order`` for ``lengths[v.load]`` seconds, one after another.

    Variants named in ``spy`` are sampled by py-spy during their step (profiles of the misses).
    ``idle``: the proxy processes this plan does not measure (the other instances): their CPU is
    counted apart, not as other load on the machine."""
    steps, at = [], LEAD_S
    for i, v in enumerate(order):
        users, rate = (THROUGHPUT_USERS, 0.0) if v.load == "throughput" else (LATENCY_USERS, LATENCY_RATE)
        host = sim.url if v.proxy == SIM else proxies[v.proxy].url
        steps.append({"id": i, "name": v.name, "host": host, "model": v.model, "kind": v.kind, "prompt": PROMPT,
                      "users": users, "rate": rate, "start": at, "end": at + lengths[v.load]})
        at += lengths[v.load] + GAP_S
    directory.mkdir(parents=True, exist_ok=True)
    plan = directory / "plan.json"
    plan.write_text(json.dumps({"steps": steps}, indent=1))
    groups = {f"proxy:{name}": p.proc.pid for name, p in proxies.items()}
    groups.update({f"idle:{i}": p.proc.pid for i, p in enumerate(idle)})
    if sim is not None:
        groups["sim"] = sim.proc.pid
    spies = {s["name"]: directory / f"py-spy-{s['name']}.txt" for s in steps if s["name"] in spy}
    threads = [threading.Thread(target=_spy_on_step, args=(proxies[v.proxy].proc.pid, s, directory, spies[v.name]),
                                daemon=True) for v, s in zip(order, steps, strict=False) if v.name in spies]
    for thread in threads:
        thread.start()
    run = h.run_locust(proxies["baseline"], directory, users=THROUGHPUT_USERS, duration=at, mix=("chat",),
                       models=(PRIMARY,), extra_env={"LOADTEST_PLAN": str(plan), "LOADTEST_KEY": BENCH_KEY},
                       extra_groups=groups,
                       sample_every=0.1)
    for thread in threads:
        thread.join(timeout=60)
    measures = []
    for v, s in zip(order, steps, strict=False):
        start, end = run.started_at + s["start"], run.started_at + s["end"]
        mine = [r for r in run.records if r["step"] == s["id"]]
        if v.load == "throughput":  # steady state: answers completed inside the window, CPU over the same window
            t0, t1, used = run.sampler.window(start + SETTLE_S, end)
            counted = [r for r in mine if t0 <= r["t"] <= t1]
        else:  # every request of the step; CPU until the pause ends (a shadow analysis finishes after its answer)
            t0, t1, used = run.sampler.window(start, end + GAP_S * 0.9)
            counted = mine
        seconds = max(t1 - t0, 1e-9)
        proxy_cpu = used.get(f"proxy:{v.proxy}", float("nan"))
        cpu = {"proxy": 100 * proxy_cpu / seconds, "locust": 100 * used.get("locust", 0) / seconds,
               "other": 100 * used.get("other", 0) / seconds}
        collected = None if v.proxy == SIM else collector_between(
            proxies[v.proxy].workdir / f"gc-{proxies[v.proxy].proc.pid}.txt", t0, t1)
        gc_ms, full = (1000 * collected[0] / max(len(counted), 1), collected[1]) if collected else (float("nan"),) * 2
        measures.append(Measure(v.name, counted, seconds if v.load == "throughput" else end - start,
                                1000 * proxy_cpu / max(len(counted), 1), cpu, gc_ms, full))
    return measures, spies


def _spy_on_step(pid: int, step: dict, directory: Path, out: Path) -> None:
    """Start py-spy just before ``step`` and let it sample until the step ends (the pause before it is idle)."""
    started = directory / "records.json.started"
    deadline = time.time() + 120
    while not started.exists() and time.time() < deadline:
        time.sleep(0.05)
    if not started.exists():
        return
    begin = float(started.read_text()) + step["start"] - 0.4
    time.sleep(max(begin - time.time(), 0))
    seconds = step["end"] - step["start"] + 0.4
    subprocess.run([py_spy(), "record", "--pid", str(pid), "--rate", "500", "--gil", "--nonblocking",
                    "--duration", f"{max(int(round(seconds)), 1)}", "--format", "raw", "--output", str(out)],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=seconds + 30)


def valid(v: Variant, m: Measure) -> str:
    """'' when every answer succeeded with the expected outcome, else what went wrong."""
    problems = []
    failed = sum(1 for r in m.records if not r["ok"])
    if failed:
        problems.append(f"{failed} failed")
    if not m.records:
        problems.append("no requests")
    counts = Counter(r["final"] for r in m.records)  # a stream's outcome rides on its relay object
    wrong = sum(c for o, c in counts.items() if o != v.expect)
    if wrong:
        problems.append(f"{wrong} answers not {v.expect or 'without header'}: "
                        + ", ".join(f"{o} {c}" for o, c in counts.items() if o != v.expect))
    return "; ".join(problems)


# =================================================================================================
# Figures: ratios and added latencies, per round, then the median over rounds
# =================================================================================================


@dataclass
class Figure:
    """One target, judged on the median over rounds of a per-round value:

    - ``cpu``: proxy CPU per request of the variant as a multiple of the base's (``<= target``);
    - ``capacity``: requests per proxy CPU-second against the base's (``>= target``), the inverse;
    - ``added``: client-side p50 of the variant minus the base's, in ms (``<= target``);
    - ``over-L``: the same minus L, the p50 of the secondary called directly in the same round (the
      simulator's sleep plus its own handling: the secondary's latency as a client sees it) (``<= target``).

    Throughput figures show the wall-clock req/s ratio beside; latency figures the added CPU per request."""

    name: str
    variant: str
    base: str
    kind: str  #: cpu | capacity | added | over-L
    target: float
    source: str = "issue 13"  #: where the target comes from
    attribution: str = "-"  #: RELAY_SPEND_ATTRIBUTION of the variant's proxy (caller | none), "-" when no call is made
    why: str = ""
    rounds: str = ""  #: which rounds the value comes from
    values: list[float] = field(default_factory=list)  #: the judged figure, per round
    also: list[float] = field(default_factory=list)  #: the other view, per round
    #: (v, base, v cpu ms, base cpu ms, relay p50 ms, L ms): req/s or p50 ms of the variant and the base
    raw: list[tuple[float, ...]] = field(default_factory=list)
    #: per round, variant and base: (answers, CPU ms per request, of it the garbage collector's, full collections)
    steps: list[tuple[tuple[float, ...], tuple[float, ...]]] = field(default_factory=list)
    #: latency figures, per round: the client's ms of each answer of the variant, of the base, of the secondary alone
    answers: list[tuple[list[float], list[float], list[float]]] = field(default_factory=list)

    @property
    def value(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")

    @property
    def passed(self) -> bool:
        return self.value >= self.target if self.kind == "capacity" else self.value <= self.target

    @property
    def throughput(self) -> bool:
        return self.kind in ("cpu", "capacity")

    def pooled(self, without_collector: bool = False) -> float:
        """The figure from every round's answers together (CPU per request over all of the variant's
        answers against the same over the bases', a round's base being the mean of the two steps
        around the variant), not the median of per-round figures; with ``without_collector``: the
        garbage collector's CPU taken out of both sides."""
        return pooled(self.kind, self.steps, without_collector)


def pooled(kind: str, steps: list, without_collector: bool = False) -> float:
    """:meth:`Figure.pooled` over ``steps`` (a figure's, or some of them)."""
    def per_request(side: int) -> float:
        answers = sum(step[side][0] for step in steps)
        used = sum(step[side][0] * (step[side][1] - (step[side][2] if without_collector else 0.0)) for step in steps)
        return used / answers if answers else float("nan")
    variant, base = per_request(0), per_request(1)
    return variant / base if kind == "cpu" else base / variant


def figures(by_name: dict[str, Variant], latency_ms: float, aggregator_ms: float) -> list[Figure]:
    L, A = f"L={latency_ms:g} ms", f"A={aggregator_ms:g} ms"
    found = []
    for streamed, base in (("", "baseline"), ("-stream", "baseline-stream")):
        for mode, target, what in (("refine", 1.25, f"1 HTTP secondary ({L})"),
                                   ("consensus", 2.0, f"3 members ({L}) + merge ({A})")):
            if streamed:  # the final answer streams from the secondary's (the merge's) own stream
                what = ("the secondary's stream to the client" if mode == "refine" else
                        "the merge streamed to the client")
            for attribution, suffix in (("caller", ""), ("none", "-none")):
                found.append(Figure(f"CPU/req{', streamed' if streamed else ''}: {mode}, {what}",
                                    f"{mode}{streamed}{suffix}", base, "cpu", target, attribution=attribution))
    found += [
        Figure("capacity: breaker open / no plugin", "breaker-open", "baseline", "capacity", 0.97,
               attribution="caller"),
        Figure("capacity: budget refused / no plugin", "budget-refused", "baseline", "capacity", 0.97,
               attribution="caller"),
        Figure("capacity: plugin loaded, disabled / no plugin", "disabled", "baseline", "capacity", 0.97),
        # what RELAY_SPEND_ATTRIBUTION=caller costs over none: LiteLLM's logging and cost tracking of the
        # secondary call, and the key's budget check
        Figure("capacity: refine, attribution caller / none", "refine", "refine-none", "capacity", 0.95,
               source="earlier", attribution="caller"),
        *(Figure(f"added p50: refine, secondary of latency L ({L} simulated)", variant, "baseline-light", "over-L",
                 3.0, attribution=attribution)
          for variant, attribution in (("refine-L", "caller"), ("refine-L-none", "none"))),
        Figure(f"added p50: consensus, 3 members of {L} + aggregator {A}", "consensus-L", "baseline-light", "added",
               latency_ms + aggregator_ms + 5, source="earlier", attribution="caller"),
        Figure(f"added p50: shadow, secondary of latency {L}", "shadow-L", "baseline-light", "added", 1.0,
               source="earlier", attribution="caller"),
    ]
    alone = by_name["secondary-alone"].runs
    for f in found:
        variant, other = by_name[f.variant], by_name[f.base]
        if variant.base == f.base:  # against the base steps right around the variant
            bases = variant.brackets
        else:  # two variants of one base (caller / none): each as a multiple of the base runs around it
            bases = [rescaled(o, ob, vb) for o, ob, vb in zip(other.runs, other.brackets, variant.brackets, strict=False)]
        pairs = list(zip(variant.runs, bases, alone, strict=False))
        quiet = [(m, b, a) for m, b, a in pairs if m.cpu["other"] < NOISY_OTHER_PCT and b.cpu["other"] < NOISY_OTHER_PCT]
        use = quiet if len(quiet) >= MIN_QUIET_ROUNDS else pairs
        f.rounds = f"{len(use)} of {len(pairs)}" + ("" if use is quiet else ", noisy")
        for m, base, direct in use:
            f.steps.append(((len(m.records), m.cpu_ms, m.gc_ms, m.full), (len(base.records), base.cpu_ms, base.gc_ms, base.full)))
            if f.throughput:
                f.raw.append((m.rps, base.rps, m.cpu_ms, base.cpu_ms, float("nan"), float("nan")))
                f.values.append(m.cpu_ms / base.cpu_ms if f.kind == "cpu" else base.cpu_ms / m.cpu_ms)
                f.also.append(m.rps / base.rps)
            else:
                f.raw.append((m.p50, base.p50, m.cpu_ms, base.cpu_ms, m.relay_p50, direct.p50))
                f.answers.append(tuple([r["ms"] for r in x.records] for x in (m, base, direct)))
                f.values.append(m.p50 - base.p50 - (direct.p50 if f.kind == "over-L" else 0.0))
                f.also.append(m.cpu_ms - base.cpu_ms)
    return found


FIGURE_HEADERS = ["figure", "attribution", "target", "value", "", "raw: variant vs base (medians)", "spread", "rounds",
                  "beside it", "pooled", "garbage collector: variant vs base"]
FIGURE_ALIGN = "llrrllrrrrl"


def _target(f: Figure) -> str:
    shown = {"cpu": f"<= {f.target:g}x", "capacity": f">= {f.target:g}", "added": f"<= {f.target:g} ms",
             "over-L": f"<= L + {f.target:g} ms"}[f.kind]
    return shown + ("" if f.source == "issue 13" else f" ({f.source})")


def figure_rows(found: list[Figure], inproc: dict | None) -> list[list]:
    rows = []
    for f in found:
        med = [statistics.median(x[i] for x in f.raw) for i in range(6)] if f.raw else [float("nan")] * 6
        if f.throughput:
            raw = f"CPU/req {med[2]:.2f} vs {med[3]:.2f} ms; {med[0]:.1f} vs {med[1]:.1f} req/s"
            value = f"{f.value:.2f}x" if f.kind == "cpu" else f"{f.value:.3f}"
            spread = _spread(f.values, "{:.2f}" if f.kind == "cpu" else "{:.3f}")
            also = f"req/s ratio {statistics.median(f.also):.3f}" if f.also else "-"
            pooled, collector = _pooled(f), _collector(f)
        else:
            raw = (f"p50 {med[0]:.1f} vs {med[1]:.1f} ms (in the relay's hook {med[4]:.1f}"
                   + (f"; L, the secondary alone: {med[5]:.1f}" if f.kind == "over-L" else "")
                   + f"); CPU/req {med[2]:.2f} vs {med[3]:.2f} ms")
            value = f"L {f.value:+.1f} ms" if f.kind == "over-L" else f"{f.value:+.1f} ms"
            spread = _spread(f.values, "{:+.1f}")
            also = f"CPU/req {statistics.median(f.also):+.2f} ms" if f.also else "-"
            pooled, collector = _pooled_latency(f), "-"
        rows.append([f.name, f.attribution, _target(f), value, "PASS" if f.passed else "MISS", raw, spread, f.rounds,
                     also, pooled, collector])
    if inproc:
        r = inproc["refine"]
        rows.append(["plugin's own work per relayed request (refine, in process)", "-", "< 500 us (earlier)",
                     f"p50 {r['p50_ms'] * 1000:.0f} us", "PASS" if r["p50_ms"] < 0.5 else "MISS",
                     f"p99 {r['p99_ms'] * 1000:.0f} us", "-", "-", "-", "-", "-"])
    return rows


def _pooled(f: Figure) -> str:
    fmt = "{:.2f}x" if f.kind == "cpu" else "{:.3f}"
    return fmt.format(f.pooled()) if f.steps else "-"


def _pooled_latency(f: Figure) -> str:
    """A latency figure from every round's answers together: the p50 of all the variant's answers less
    the p50 of all the base's (less L's, the same way), not the median of per-round figures. A round
    holds ~32 answers a step, and a plain request's p50 moves by a millisecond or two from step to step."""
    every = [[ms for answers in f.answers for ms in answers[side]] for side in range(3)]
    if not all(every):
        return "-"
    value = h.percentile(every[0], 50) - h.percentile(every[1], 50)
    if f.kind == "over-L":
        return f"L {value - h.percentile(every[2], 50):+.1f} ms"
    return f"{value:+.1f} ms"


def _collector(f: Figure) -> str:
    """The garbage collector's share: its CPU per request (medians), the full collections per step
    (each ~0.45 s of a LiteLLM proxy's CPU, one more or fewer in a step moves that step by ~1 ms per
    request), and the pooled figure without the collector on either side."""
    watched = [step for step in f.steps if step[0][2] == step[0][2] and step[1][2] == step[1][2]]
    if not watched:
        return "not watched"
    median = lambda side, i: statistics.median(step[side][i] for step in watched)  # noqa: E731
    fmt = "{:.2f}x" if f.kind == "cpu" else "{:.3f}"
    without = pooled(f.kind, watched, without_collector=True)
    return (f"{median(0, 2):.2f} vs {median(1, 2):.2f} ms/req; full collections per step "
            f"{statistics.mean(step[0][3] for step in watched):.1f} vs {statistics.mean(step[1][3] for step in watched):.1f}"
            f"; pooled without it {fmt.format(without)}" + ("" if len(watched) == len(f.steps) else
                                                             f" ({len(watched)} watched rounds)"))


def _spread(values: list[float], fmt: str) -> str:
    return f"{fmt.format(min(values))} .. {fmt.format(max(values))}" if len(values) > 1 else "-"


# =================================================================================================
# Profiles of the misses
# =================================================================================================


def py_spy() -> str | None:
    candidate = Path(sys.executable).parent / "py-spy"
    return str(candidate) if candidate.exists() else shutil.which("py-spy")


@dataclass
class Profile:
    """py-spy samples of one proxy during one step (``--gil``: only the thread holding the GIL, so the
    samples are Python CPU time), turned into CPU milliseconds per request."""

    measure: Measure
    stacks: list[tuple[list[str], int]]

    @property
    def total(self) -> int:
        return sum(c for _, c in self.stacks)

    def ms(self, count: int) -> float:
        return count / max(self.total, 1) * self.measure.cpu_ms

    def buckets(self) -> dict[str, float]:
        found = Counter()
        for stack, count in self.stacks:
            found[bucket_of(stack)] += count
        return {name: self.ms(found[name]) for name in BUCKETS}

    def self_ms(self) -> Counter:
        found = Counter()
        for stack, count in self.stacks:
            found[_short(stack[-1])] += count
        return Counter({name: self.ms(c) for name, c in found.items()})


BUCKETS = ("the plugin's own code", "the secondary call under the hooks (litellm router, async part)",
           "worker threads (litellm runs sync completion and logging there)", "the rest of the proxy")


def bucket_of(stack: list[str]) -> str:
    if any("relay_plugin.py" in f for f in stack):
        return BUCKETS[1] if any("_litellm_complete" in f for f in stack) else BUCKETS[0]
    if stack and stack[0].startswith("Thread._bootstrap"):
        return BUCKETS[2]
    return BUCKETS[3]


def profile(names: list[str], by_name: dict[str, Variant], proxies: dict, directory: Path,
            lengths: dict[str, float], sim=None) -> dict[str, "Profile | str"]:
    """Run ``names`` once more, one after another, each sampled by py-spy."""
    if py_spy() is None:
        return dict.fromkeys(names, "no profile: py-spy is not installed (.venv/bin/pip install py-spy, then make "
                                    "bench again)")
    measures, spies = run_plan([by_name[n] for n in names], proxies, directory, lengths, spy=set(names), sim=sim)
    found: dict[str, Profile | str] = {}
    for m in measures:
        raw = spies[m.variant]
        stacks = []
        if raw.exists():
            for line in raw.read_text().splitlines():
                stack, _, count = line.rpartition(" ")
                if stack and count.isdigit():
                    stacks.append((stack.split(";"), int(count)))
        found[m.variant] = Profile(m, stacks) if stacks else "no profile: py-spy recorded no samples"
    return found


def explain(f: Figure, variant: "Profile | str", base: "Profile | str") -> str:
    """Where the variant's extra CPU per request went, part by part and function by function."""
    if isinstance(variant, str) or isinstance(base, str):
        return variant if isinstance(variant, str) else base
    cpu_v, cpu_b = variant.measure.cpu_ms, base.measure.cpu_ms
    bv, bb = variant.buckets(), base.buckets()
    own = bv[BUCKETS[0]] - bb[BUCKETS[0]]
    # the figure the plugin's own code alone would give (the rest of the variant's CPU as the base's)
    alone = {"cpu": (cpu_b + own) / cpu_b, "capacity": cpu_b / (cpu_b + own)}.get(f.kind)
    explained = alone is not None and (alone <= f.target if f.kind == "cpu" else alone >= f.target)
    calls = f.variant not in ("breaker-open", "budget-refused", "disabled")
    parts = [f"of the {cpu_v - cpu_b:+.2f} ms of proxy CPU per request, the plugin's own code is {own:+.2f} ms and "
             f"everything else (litellm's work for the secondary call(s): router, worker threads, logging, proxy "
             f"hooks; and run-to-run noise) {cpu_v - cpu_b - own:+.2f} ms"
             + (f"; the plugin's own code alone would make the figure {alone:.3f}" if alone is not None else ""),
             *([] if not explained else [
                 ("so the plugin's own code does not explain the miss: "
                  + ("the rest is litellm's work for the secondary call(s)" if calls else
                     "no secondary call is made on this path, so the rest is the difference between runs on this "
                     f"machine (the rounds spread {min(f.values):.3f} .. {max(f.values):.3f})"))]),
             f"profiled run: {cpu_v:.2f} against {cpu_b:.2f} ms CPU per request, {variant.measure.rps:.1f} against "
             f"{base.measure.rps:.1f} req/s, {variant.total} and {base.total} samples",
             "by part: " + ", ".join(f"{name} {bv[name] - bb[name]:+.2f} ms" for name in BUCKETS)]
    sv, sb = variant.self_ms(), base.self_ms()
    grew = sorted(((sv[k] - sb.get(k, 0.0), k) for k in sv), reverse=True)[:6]
    parts.append("largest self-time increases: " + ", ".join(f"{name} {d:+.2f} ms" for d, name in grew if d > 0))
    if not f.throughput and variant.measure.relay_p50 == variant.measure.relay_p50:
        parts.append(f"time inside the relay's hook (x-relay-latency-ms) p50 {variant.measure.relay_p50:.1f} ms, "
                     "the secondary's simulated latency included")
    return "; ".join(parts)


def _short(frame: str) -> str:
    """``func (path/file.py:12)`` -> ``func (file.py)``."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit('/', 1)[-1].split(':')[0]})" if where else name


# =================================================================================================
# Command line
# =================================================================================================


def books_note(root: Path) -> str:
    """What LiteLLM's books held for the secondaries: attribution caller books them, none does not (else
    the caller/none figures would not measure attribution)."""
    secondary = lambda rows: sum(c for m, c in rows.items() if m.split("/")[-1] in SECONDARY_MODELS)  # noqa: E731
    caller, none, wrong = Counter(), Counter(), []
    for directory in sorted(root.glob("proxy-*")):  # every process of each proxy on its own
        name = directory.name.removeprefix("proxy-").split("-")[0]
        if name in ("caller", "none"):
            rows = booked_models(directory)
            (caller if name == "caller" else none).update(rows)
            if (secondary(rows) > 0) != (name == "caller"):
                wrong.append(directory.name)
    booked, unbooked = secondary(caller), secondary(none)
    note = (f"LiteLLM's spend rows of secondary calls: {booked} with attribution caller, {unbooked} with none "
            f"(primary rows: {sum(caller.values()) - booked} and {sum(none.values()) - unbooked})")
    if wrong or not booked:
        note = ("INVALID books: " + note + ": caller must book secondary calls, none must not"
                + (f" (not so in {', '.join(wrong)})" if wrong else ""))
    return note


def run_inproc(directory: Path) -> dict:
    profile_path = directory / "inproc-profile.txt"
    proc = subprocess.run([sys.executable, "-m", "loadtest.inproc", "--json", "--profile", str(profile_path)],
                          cwd=h.ROOT, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"loadtest.inproc failed:\n{proc.stderr[-3000:]}")
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    return {r["mode"]: r for r in data["results"]} | {"_profile": profile_path}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds (default: instances squared, every pairing of processes once)")
    parser.add_argument("--instances", type=int, default=INSTANCES,
                        help=f"processes per proxy (default {INSTANCES}): round r measures the variants on process "
                             f"r %% n and the plain proxy on process (r // n) %% n")
    parser.add_argument("--duration", default="7s", help="each throughput measurement (default 7s: 13 throughput "
                        "variants; 10 s windows swing by about 3%% here, shorter ones more, the median over "
                        "rounds helps)")
    parser.add_argument("--latency-duration", default="4s", help="each latency measurement (default 4s)")
    parser.add_argument("--latency-ms", type=float, default=50.0, help="L: latency of the simulated secondaries")
    parser.add_argument("--aggregator-ms", type=float, default=20.0, help="A: latency of the consensus aggregator")
    parser.add_argument("--extra-rounds", type=int, default=0,
                        help=f"at most this many more rounds while a figure has fewer than {MIN_QUIET_ROUNDS} quiet ones")
    parser.add_argument("--primary", choices=tuple(PRIMARIES), default="http",
                        help="the primary: http (default, issue 13's setup: the simulator's OpenAI API at ~0 ms) or "
                             "mock (mock_response: litellm answers itself; a cheaper plain request, stricter ratios)")
    parser.add_argument("--no-profile", action="store_true", help="do not profile the misses")
    parser.add_argument("--results", type=Path, default=h.RESULTS / "bench")
    args = parser.parse_args(argv)
    if args.instances < 1:
        parser.error("--instances must be at least 1")
    if args.rounds is None:
        args.rounds = args.instances ** 2
    lengths = {"throughput": h.parse_duration(args.duration), "latency": h.parse_duration(args.latency_duration)}
    root = args.results
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    info = h.machine()
    notes: list[str] = []
    began = time.monotonic()
    all_variants = variants()
    by_name = {v.name: v for v in all_variants}
    steps = len(round_order(all_variants, 0))
    print(f"relay bench: {args.rounds} rounds of {steps} steps ({lengths['throughput']:g}s throughput, "
          f"{lengths['latency']:g}s latency); results in {root}/", flush=True)

    print("  in process: the plugin's own work per relayed request ...", end=" ", flush=True)
    inproc = run_inproc(root)
    print(f"refine p50 {inproc['refine']['p50_ms'] * 1000:.0f} us", flush=True)

    sim = h.start_simulator(root, simulated_models(args.latency_ms, args.aggregator_ms), force_markers=DEAD)
    sets: list[dict] = []
    try:
        print(f"  starting {len(PROXIES)} proxies ({', '.join(PROXIES)}), {args.instances} processes each ...",
              end=" ", flush=True)
        sets += start_proxies(PROXIES, root, sim.url, args.primary, tuple(range(args.instances)))
        print("warming up ...", end=" ", flush=True)
        for i, proxies in enumerate(sets):
            warm_up(proxies, notes)
            # a whole round under load, not counted: litellm imports modules lazily on paths it meets for the first time
            run_plan(all_variants, proxies, root / f"round-0-warm-up-{i + 1}", {"throughput": 2.0, "latency": 2.0}, sim=sim)
        print("done", flush=True)
        dead_before = h.sim_get(sim.url, "/_sim/stats")["by_model"].get("bench-dead", 0)
        rnd = discarded = 0
        while True:
            if rnd >= args.rounds:
                short = [f.name for f in figures(by_name, args.latency_ms, args.aggregator_ms) if "noisy" in f.rounds]
                if not short or rnd >= args.rounds + args.extra_rounds:
                    break
                print(f"  another round: fewer than {MIN_QUIET_ROUNDS} rounds with the machine quiet for "
                      f"{len(short)} figure(s)", flush=True)
            restart_exited(sets, root, sim.url, args.primary, notes)
            order, proxies = round_order(all_variants, rnd), pairing(sets, rnd)
            idle = tuple(p for instance in sets for p in instance.values() if p not in proxies.values())
            measures, _ = run_plan(order, proxies, root / f"round-{rnd + 1}", lengths, sim=sim, idle=idle)
            lost = lost_steps(proxies, order, measures)
            if lost:  # a round with a step nobody answered measures nothing: run it again, on live proxies
                discarded += 1
                (root / f"round-{rnd + 1}").rename(root / f"round-{rnd + 1}-discarded-{discarded}")
                notes.append(f"round {rnd + 1} discarded and run again: {lost}")
                print(f"  round {rnd + 1} discarded: {lost}", flush=True)
                if discarded > MAX_DISCARDED_ROUNDS:
                    raise SystemExit(f"bench: {discarded} rounds lost to proxies that stopped answering; "
                                     f"see {root}/proxy-*/ and round-*-discarded-*/")
                continue  # the next round begins by restarting what exited
            shown = []
            for i, (v, m) in enumerate(zip(order, measures, strict=True)):
                v.runs.append(m)
                problem = valid(v, m)
                if problem:
                    notes.append(f"{v.name} round {rnd + 1} INVALID: {problem}")
                if v.base is not None:  # round_order puts the variant's base right before and right after it
                    v.brackets.append(bracket(measures[i - 1], measures[i + 1]))
                    shown.append(f"{v.name} {m.rps:.0f}/s" if v.load == "throughput" else f"{v.name} p50 {m.p50:.1f}ms")
            other = statistics.median(m.cpu["other"] for m in measures)
            processes = (f"; variants on processes {rnd % len(sets) + 1}, plain on {(rnd // len(sets)) % len(sets) + 1}"
                         if len(sets) > 1 else "")
            print(f"  round {rnd + 1}: {', '.join(shown)} (other load {other:.0f}%{processes})", flush=True)
            rnd += 1
        dead_after = h.sim_get(sim.url, "/_sim/stats")["by_model"].get("bench-dead", 0)
        notes.append(f"calls that reached the dead secondary while its breaker was open (all rounds): "
                     f"{dead_after - dead_before}")
        notes.append(books_note(root))
        found = figures(by_name, args.latency_ms, args.aggregator_ms)
        misses = [f for f in found if not f.passed]
        if misses and not args.no_profile:
            names = list(dict.fromkeys(n for f in misses for n in (f.base, f.variant)))
            print(f"  profiling {', '.join(names)} ...", end=" ", flush=True)
            profiles = profile(names, by_name, sets[0], root / "profiles", {"throughput": 10.0, "latency": 8.0}, sim)
            print("done", flush=True)
            for f in misses:
                f.why = explain(f, profiles[f.variant], profiles[f.base])
    finally:
        for proxy in (p for instance in sets for p in instance.values()):
            proxy.stop()
        sim.stop()

    text = report(found, by_name, inproc, notes, info, args, lengths, time.monotonic() - began)
    print("\n" + text, flush=True)
    (root / "summary.md").write_text(text + "\n")
    if root.resolve() == (h.RESULTS / "bench").resolve():
        h.update_results("bench", "## make bench (`python -m loadtest.bench`)\n\n" + text)
    invalid = [n for n in notes if "INVALID" in n]
    if invalid:  # a variant that did not do what it stands for makes its figure meaningless
        print(f"\nINVALID measurements: {len(invalid)} (see the notes)", flush=True)
    return 1 if invalid else 0


def report(found: list[Figure], by_name: dict, inproc: dict, notes: list[str], info: dict,
           args: argparse.Namespace, lengths: dict[str, float], elapsed: float) -> str:
    rows = figure_rows(found, inproc)
    runs = [m for v in by_name.values() for m in v.runs]
    lines = [
        f"Machine: {h.machine_line(info)}.",
        f"Load: throughput {THROUGHPUT_USERS} users back to back, latency {LATENCY_USERS} user at "
        f"{LATENCY_RATE:g} req/s; chat completions (streamed ones where the figure says so) on {PRIMARIES[args.primary]}, "
        f"with a virtual key that has a budget; every proxy, the plugin-free one included, runs LiteLLM's "
        f"spend tracking (the books stub of tests/proxy_callbacks/litellm_books.py). Each proxy runs as "
        f"{args.instances} processes; round r measures the variants on process r % {args.instances} and the plain proxy "
        f"on process (r // {args.instances}) % {args.instances}, so {args.instances ** 2} rounds pair each variant's "
        f"process with each plain one (two identical processes can differ by a fifth in CPU per request; rounds left "
        f"out as noisy leave their pairing out). {args.rounds} rounds; a round "
        f"measures every variant once ({lengths['throughput']:g} s throughput, {lengths['latency']:g} s latency), "
        f"each right between two runs of its base (B v1 B v2 B ...; the variants in an order rotated from round to "
        f"round), one after another. value = median over rounds of the per-round figure (variant against the mean of "
        f"the two base runs around it, so the machine's drift during a round weighs on both alike; the two "
        f"attributions of refine against each other in the same round), from the rounds in which other processes "
        f"used less than "
        f"{NOISY_OTHER_PCT:g}% of a core during both steps when there were at least {MIN_QUIET_ROUNDS} such rounds "
        f"(column rounds; up to {args.extra_rounds} extra rounds are run to get them); spread = min .. max over "
        f"those rounds. CPU/request is the proxy's own CPU time per answered request over the step (robust to "
        f"neighbours taking the CPU, unlike req/s); `Nx` = the variant's CPU/request as a multiple of the base's "
        f"(a plain request to the plugin-free proxy; streamed figures against a plain streamed request); capacity = "
        f"the inverse (requests per proxy CPU-second, variant / base). Added latency: client p50 against a plain "
        f"request's, one request at a time; `L + x` = the part of it beyond L, the p50 of the secondary called "
        f"directly by the same client in the same round (the simulated sleep of L ms plus the simulator's own "
        f"handling: the secondary's latency as any client sees it). pooled = the figure from all those rounds' "
        f"answers together (CPU per request over every answer of the variant against the same over its bases'; "
        f"for latency, the p50 of every answer of the variant against the p50 of every answer of its bases), "
        f"beside the median. Garbage collector: of the CPU per request, what Python's collector took in the "
        f"variant's and the base's proxy (medians over rounds; loadtest/gc_probe), the full collections per step "
        f"(each about 0.45 s of CPU in a LiteLLM proxy: one more or fewer in a step moves its CPU per request by "
        f"about a millisecond), and the pooled figure with the collector's CPU left out of both sides. "
        f"Targets from issue 13 unless marked. "
        f"Bench time {elapsed / 60:.1f} min.",
        "",
        h.table(FIGURE_HEADERS, rows, align=FIGURE_ALIGN),
        "",
        "Per variant (medians over rounds):",
        "",
        h.table(["variant", "users", "req/s", "proxy CPU ms/req", "p50 ms", "p99 ms", "CPU % proxy", "CPU % locust",
                 "CPU % other", "outcome"],
                [[v.name, THROUGHPUT_USERS if v.load == "throughput" else LATENCY_USERS,
                  f"{statistics.median(m.rps for m in v.runs):.1f}",
                  f"{statistics.median(m.cpu_ms for m in v.runs):.2f}",
                  f"{statistics.median(m.p50 for m in v.runs):.1f}",
                  f"{statistics.median(m.p99 for m in v.runs):.1f}",
                  f"{statistics.median(m.cpu['proxy'] for m in v.runs):.0f}",
                  f"{statistics.median(m.cpu['locust'] for m in v.runs):.0f}",
                  f"{statistics.median(m.cpu['other'] for m in v.runs):.0f}",
                  v.expect or "(no header)"] for v in by_name.values() if v.runs]),
        "",
        f"In process (fake instant secondary, {inproc['refine']['calls']} calls per mode), the plugin's own work: "
        + ", ".join(f"{m} p50 {r['p50_ms'] * 1000:.0f} us / p99 {r['p99_ms'] * 1000:.0f} us"
                    for m, r in inproc.items() if not m.startswith("_")) + ".",
    ]
    locust_cpu = max((m.cpu["locust"] for m in runs), default=0)
    proxy_cpu = statistics.median(m.cpu["proxy"] for m in by_name["baseline"].runs) if by_name["baseline"].runs else 0
    lines.append(f"Load generator: Locust used at most {locust_cpu:.0f}% of a core"
                 + (": it may have been the bottleneck, req/s may understate the proxy" if locust_cpu > 85 else
                    f" (not the bottleneck); the baseline proxy used {proxy_cpu:.0f}% of its one core."))
    misses = [f for f in found if not f.passed]
    in_miss = inproc["refine"]["p50_ms"] >= 0.5
    lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    if not misses and not in_miss:
        lines.append("- every figure met its target")
    other = statistics.median(m.cpu["other"] for m in runs) if runs else 0
    if other > 30:
        lines.append(f"- the machine was shared: other processes used a median {other:.0f}% of a core (of "
                     f"{info['cpus']} cores) during the measurements; wall-clock req/s and latencies carry that noise")
    for f in misses:
        shown = {"cpu": f"{f.value:.2f}x", "capacity": f"{f.value:.3f}", "over-L": f"L {f.value:+.1f} ms"}.get(
            f.kind, f"{f.value:+.1f} ms")
        lines.append(f"- MISS {f.name} (attribution {f.attribution}): {shown} against {_target(f)}. "
                     f"Profile of {f.variant} against {f.base}: "
                     f"{f.why or 'not profiled (--no-profile)'}")
    if in_miss:
        top = Path(inproc["_profile"]).read_text().splitlines()[:30]
        lines.append("- MISS in-process plugin work; cProfile (tottime):\n\n```\n" + "\n".join(top) + "\n```")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
