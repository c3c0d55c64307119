"""Instructions per request, counted by valgrind: the bench's CPU figures without the machine's noise.

    python -m loadtest.exact [--requests 20] [--windows 2] [--only refine,consensus]     (make bench-exact)

``make bench`` measures proxy CPU time under load. On this shared 2-CPU virtual machine the CPU time of
one request moves by 10 to 25 % from one 5 s window to the next, for every process alike, and by up to
a fifth between two identical proxy processes for minutes at a time; a figure of ``make bench`` is
settled to about +-0.1 at best (issue 13's closing notes). This counts instead the instructions each
proxy process executes, which do not depend on what else the machine runs: valgrind's callgrind runs
every proxy of ``make bench`` (same models, same simulator, same books, the same virtual key), with
counting off while it starts. Per variant and window: ``--requests`` requests warm the path, the
counters are zeroed, counting goes on, the same number of requests go one after another, the
bookkeeping LiteLLM and the relay do after an answer is given time to finish, counting goes off and
the counters are read. What the proxy runs while idle (its timers and background jobs: instructions per
second, measured with counting on and no request, before and after the windows) is taken off for the
window's length: under valgrind a request takes about a second, so idle work would otherwise add a few
per cent.

What it does not show: instructions are not time (a cache miss costs more than an add; an interpreter's
mix is much the same on every path, so the two track each other closely here), and one request at a time
is not a proxy under load (no contention; the garbage collector runs as often, per allocation, either way).
The figures and targets are ``make bench``'s throughput figures (loadtest/bench.py); latency is not
counted here. Needs valgrind (``make bench-exact`` installs Debian's when missing); about 20 minutes.
"""

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from loadtest import bench
from loadtest import harness as h

HERE = Path(__file__).resolve().parent
#: what the bench's throughput figures compare (its latency figures are not counted here)
FIGURES = (  # (name, variant, base, kind, target)
    *((f"instructions/req{label}: {mode}{', attribution none' if none else ''}", f"{mode}{stream}{none}",
       f"baseline{stream}", "cpu", target)
      for stream, label in (("", ""), ("-stream", ", streamed"))
      for mode, target in (("refine", 1.25), ("consensus", 2.0))
      for none in ("", "-none")),
    ("capacity: breaker open / no plugin", "breaker-open", "baseline", "capacity", 0.97),
    ("capacity: budget refused / no plugin", "budget-refused", "baseline", "capacity", 0.97),
    ("capacity: plugin loaded, disabled / no plugin", "disabled", "baseline", "capacity", 0.97),
    ("capacity: refine, attribution caller / none", "refine", "refine-none", "capacity", 0.95),
)
#: after the last answer of a window: the relay books a call 20 ms after its answer, LiteLLM logs in tasks
#: of its own; under valgrind all of it runs some 30 times slower
SETTLE_S = 3.0
IDLE_S = 30.0


@dataclass
class Count:
    """One window: the instructions the proxy executed while it answered ``requests`` requests."""

    instructions: int
    seconds: float
    requests: int
    idle_per_s: float = 0.0  #: the proxy's idle work (instructions per second), set once it is measured

    @property
    def per_request(self) -> float:
        return (self.instructions - self.idle_per_s * self.seconds) / self.requests


@dataclass
class Variant:
    name: str
    proxy: str
    model: str
    kind: str
    expect: str | None
    counts: list[Count] = field(default_factory=list)

    @property
    def per_request(self) -> float:
        """The windows' instructions per request (each window's idle work taken off), pooled."""
        return sum(c.per_request * c.requests for c in self.counts) / sum(c.requests for c in self.counts)


def launcher(out: Path) -> tuple[str, ...]:
    """valgrind's callgrind around the venv's Python, counting off until told (``callgrind_control -i on``)."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise SystemExit("valgrind is not installed: make bench-exact installs it (Debian's package valgrind)")
    return (valgrind, "--tool=callgrind", "--instr-atstart=no", "--dump-instr=no", "--compress-strings=no",
            f"--callgrind-out-file={out}/callgrind.%p", sys.executable)


def control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True, timeout=120)


def instructions(pid: int, out: Path) -> int:
    """Dump the counters of ``pid`` and read their total (the newest dump file's ``totals:`` line)."""
    before = set(out.glob(f"callgrind.{pid}.*"))
    control(pid, "--dump")
    for _ in range(600):
        new = set(out.glob(f"callgrind.{pid}.*")) - before
        if new:
            text = max(new, key=lambda p: p.stat().st_mtime).read_text()
            found = re.search(r"^totals:\s+(\d+)", text, re.M)
            if found:
                return int(found.group(1))
        time.sleep(0.1)
    raise RuntimeError(f"callgrind wrote no dump for process {pid}")


def send(url: str, model: str, kind: str) -> str | None:
    """One request with the bench's virtual key; the relay outcome it carries (a stream's relay object's)."""
    stream = kind.endswith("-stream")
    body = {"model": model, "messages": [{"role": "user", "content": bench.PROMPT}], "stream": stream}
    request = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(), headers={
        "Authorization": f"Bearer {bench.BENCH_KEY}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as resp:
        text = resp.read().decode()
        outcome = resp.headers.get("x-relay-outcome")
    if stream:
        for line in text.splitlines():
            if line.startswith("data: {") and '"relay"' in line:
                outcome = json.loads(line[6:])["relay"]["outcome"]
    return outcome


def count(proxy, variant: Variant, requests: int, out: Path) -> Count:
    """One window of ``variant`` on ``proxy`` (warm first, counted second)."""
    for _ in range(requests):
        send(proxy.url, variant.model, variant.kind)
    pid = proxy.proc.pid
    control(pid, "--zero")
    control(pid, "--instr=on")
    began = time.monotonic()
    outcomes = {send(proxy.url, variant.model, variant.kind) for _ in range(requests)}
    time.sleep(SETTLE_S)
    control(pid, "--instr=off")
    seconds = time.monotonic() - began
    if outcomes != {variant.expect}:
        raise RuntimeError(f"{variant.name}: answers said {sorted(map(str, outcomes))}, not {variant.expect}")
    return Count(instructions(pid, out), seconds, requests)


def idle_rates(proxies: dict, out: Path) -> dict[str, float]:
    """Instructions per second of each proxy while it serves nothing (its timers and background jobs),
    all counted over the same ``IDLE_S`` seconds."""
    for p in proxies.values():
        control(p.proc.pid, "--zero")
        control(p.proc.pid, "--instr=on")
    time.sleep(IDLE_S)
    for p in proxies.values():
        control(p.proc.pid, "--instr=off")
    return {name: instructions(p.proc.pid, out) / IDLE_S for name, p in proxies.items()}


def chosen(only: str | None) -> list[Variant]:
    """The bench's throughput variants (of ``only``'s figures when given), bases first."""
    wanted = {name for f in FIGURES if only is None or any(o in f[1] for o in only.split(",")) for name in f[1:3]}
    return [Variant(v.name, v.proxy, v.model, v.kind, v.expect) for v in bench.variants()
            if v.load == "throughput" and v.name in wanted]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20, help="requests per window (and as many to warm it)")
    parser.add_argument("--windows", type=int, default=2, help="counted windows per variant, in turn")
    parser.add_argument("--only", help="figures whose variant contains one of these, comma-separated")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "exact")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.windows < 1:
        parser.error("--requests and --windows must be at least 1")

    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    variants = chosen(args.only)
    names = {v.proxy for v in variants}
    # latency 0: instructions do not depend on it, and the shorter a window, the less idle work to take off
    sim = h.start_simulator(args.out, bench.simulated_models(0.0, 0.0), force_markers=bench.DEAD)
    began = time.monotonic()
    try:
        proxies = bench.start_proxies({n: bench.PROXIES[n] for n in names}, args.out, sim.url, "http",
                                      launcher=launcher(args.out.resolve()))[0]
        try:
            print(f"{len(proxies)} proxies started under valgrind in {time.monotonic() - began:.0f} s", flush=True)
            for v in variants:  # every path warm before the idle work is measured: startup jobs done
                for _ in range(args.requests):
                    send(proxies[v.proxy].url, v.model, v.kind)
            time.sleep(5)
            before = idle_rates(proxies, args.out)
            for window in range(args.windows):
                for v in variants:
                    v.counts.append(count(proxies[v.proxy], v, args.requests, args.out))
                    print(f"window {window + 1}: {v.name:22s} {v.counts[-1].instructions / 1e6 / args.requests:7.2f} "
                          f"M instructions/request before the idle work is taken off ({v.counts[-1].seconds:.0f} s)",
                          flush=True)
            after = idle_rates(proxies, args.out)
            for v in variants:  # the idle work as measured before and after the windows, on average
                for c in v.counts:
                    c.idle_per_s = (before[v.proxy] + after[v.proxy]) / 2
            idle_note = "idle work taken off, measured before and after the windows: " + ", ".join(
                f"{name} {before[name] / 1e6:.2f} and {after[name] / 1e6:.2f} M/s" for name in proxies)
            print(idle_note, flush=True)
        finally:
            for p in proxies.values():
                p.stop()
    finally:
        sim.stop()
    text = report(variants, args, time.monotonic() - began, idle_note)
    (args.out / "summary.md").write_text(text)
    print("\n" + text)
    return 0


def report(variants: list[Variant], args: argparse.Namespace, seconds: float, idle_note: str) -> str:
    by_name = {v.name: v for v in variants}
    lines = [f"# Instructions per request (valgrind callgrind; {args.requests} requests a window, "
             f"{args.windows} windows per variant; {seconds / 60:.0f} min)", "",
             "| figure | target | value | | variant | base | windows (variant) |", "|---|---|---|---|---|---|---|"]
    for name, variant, base, kind, target in FIGURES:
        if variant not in by_name or base not in by_name:
            continue
        v, b = by_name[variant].per_request, by_name[base].per_request
        value = v / b if kind == "cpu" else b / v
        ok = value <= target if kind == "cpu" else value >= target
        windows = ", ".join(f"{c.per_request / 1e6:.2f}" for c in by_name[variant].counts)
        lines.append(f"| {name} | {'<=' if kind == 'cpu' else '>='} {target:g} | "
                     f"{value:.3f}{'x' if kind == 'cpu' else ''} | {'PASS' if ok else 'MISS'} | "
                     f"{v / 1e6:.2f} M | {b / 1e6:.2f} M | {windows} |")
    lines += ["", "M: millions of instructions per request, the proxy's idle work taken off; "
              "one request at a time, the bench's proxies, models, books and key; " + idle_note + "."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
