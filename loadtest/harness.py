"""What ``loadtest/run.py`` and ``loadtest/bench.py`` share: the stack's config, the Locust runs, the
figures and the tables.

Every server is started through ``sim.stack`` (loopback, free ports, stopped afterwards); Locust runs
as a subprocess (``locust --headless``, bounded in users and time) so gevent never meets asyncio.
"""

import contextlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path


from sim import stack

ROOT = stack.ROOT
HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
RESULTS_MD = HERE / "RESULTS.md"
LOCUSTFILE = HERE / "locustfile.py"
PROXY_CALLBACKS = ROOT / "tests" / "proxy_callbacks"  #: test-only callback modules (LiteLLM's books without a database)
KINDS = ("chat", "chat-stream", "messages", "messages-stream")
SIM_KEY = "sk-sim-not-a-real-key"  # the simulator accepts any key; nothing real is ever needed
_CLK = os.sysconf("SC_CLK_TCK")

# =================================================================================================
# The stack: simulator, proxy config, proxy
# =================================================================================================


def parse_duration(text: str | float) -> float:
    """``15s``, ``2m``, ``90`` -> seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([sm]?)\s*", str(text))
    if not match:
        raise ValueError(f"not a duration: {text!r} (use e.g. 15s or 2m)")
    return float(match.group(1)) * (60 if match.group(2) == "m" else 1)


def mock(name: str, answer: str, relay: dict | None = None, model: str = "openai/gpt-4o-mini", **params) -> dict:
    """A model litellm answers itself (``mock_response``): no network, still priced as ``model`` (or by
    ``params`` such as ``input_cost_per_token``)."""
    return stack.model_entry(name, model, relay=relay or None, mock_response=answer, **params)


def simulated(name: str, model: str, sim_url: str, relay: dict | None = None, **params) -> dict:
    """A model on the simulator: ``openai/x`` and ``anthropic/x`` on its OpenAI/Anthropic APIs (``params``:
    more ``litellm_params``, e.g. prices)."""
    api_base = sim_url + "/v1" if model.startswith("openai/") else sim_url
    return stack.model_entry(name, model, api_base, relay or None, api_key=SIM_KEY, **params)


def ollama_primary(name: str, sim_url: str) -> dict:
    """The Ollama primary: the simulator's Ollama API, or a real Ollama when OLLAMA_API_BASE is set."""
    base = os.environ.get("OLLAMA_API_BASE") or sim_url
    model = os.environ.get("OLLAMA_MODEL", "llama3.2") if os.environ.get("OLLAMA_API_BASE") else "llama3"
    return {"model_name": name, "litellm_params": {"model": f"ollama_chat/{model}", "api_base": base}}


def start_simulator(directory: Path, model_config: dict, force_markers: dict | None = None) -> stack.Simulator:
    directory.mkdir(parents=True, exist_ok=True)
    sim = stack.start_simulator(directory / "simulator.log", 0, "--seed", "7",
                                "--model-config", json.dumps(model_config))
    if force_markers:
        sim_post(sim.url, "/_sim/config", {"force_markers": force_markers})
    return sim


def start_proxy(directory: Path, model_list: list[dict], plugin: bool, env: dict[str, str],
                callbacks: tuple[str, ...] = (), litellm_settings: dict | None = None,
                launcher: tuple[str, ...] = ()) -> stack.Proxy:
    """A proxy on ``model_list``; ``callbacks`` are ``module.instance`` entries of test-only callback
    modules (tests/proxy_callbacks/), copied next to the config and listed before the relay;
    ``launcher``: what runs litellm (stack.start_proxy)."""
    for entry in callbacks:
        directory.mkdir(parents=True, exist_ok=True)
        module = entry.split(".", 1)[0] + ".py"
        shutil.copy(PROXY_CALLBACKS / module, directory / module)
    config = stack.write_config(directory, model_list, plugin=plugin, callbacks=callbacks,
                                litellm_settings=litellm_settings)
    env = {"RELAY_LOG_LEVEL": "warning", **env}
    # six proxies start at once on a busy machine (under valgrind, a few minutes)
    return stack.start_proxy(config, env, workdir=directory, timeout=900 if launcher else 300, launcher=launcher)


def sim_get(url: str, path: str) -> dict:
    with urllib.request.urlopen(url + path, timeout=5) as resp:
        return json.loads(resp.read())


def sim_post(url: str, path: str, body: dict) -> dict:
    request = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as resp:
        return json.loads(resp.read())


def send(proxy: stack.Proxy, kind: str, model: str, prompt: str = "Why is the sky blue?",
         timeout: float = 60) -> tuple[int, dict[str, str]]:
    """One request outside Locust (warm-up, breaker priming): ``(status, x-relay-* headers)``."""
    path = "/v1/messages" if kind.startswith("messages") else "/v1/chat/completions"
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "stream": kind.endswith("-stream")}
    if path == "/v1/messages":
        body["max_tokens"] = 256
    request = urllib.request.Request(proxy.url + path, data=json.dumps(body).encode(), headers={
        "Authorization": f"Bearer {proxy.master_key}", "Content-Type": "application/json",
        "anthropic-version": "2023-06-01"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            resp.read()
            status, headers = resp.status, resp.headers
    except urllib.error.HTTPError as exc:
        status, headers = exc.code, exc.headers
    return status, {k.lower(): v for k, v in headers.items() if k.lower().startswith("x-relay")}


# =================================================================================================
# CPU: how busy each process group was (is the load generator the bottleneck?)
# =================================================================================================


def cpu_seconds_by_group(pgids: set[int]) -> dict[int, float]:
    """User + system CPU seconds of the live processes of each process group in ``pgids`` (one /proc pass)."""
    totals = dict.fromkeys(pgids, 0)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            pgrp = int(fields[2])  # fields after the name: state ppid pgrp ...
            if pgrp in totals:
                totals[pgrp] += int(fields[11]) + int(fields[12])  # utime stime
    return {pgid: ticks / _CLK for pgid, ticks in totals.items()}


def group_cpu_seconds(pgid: int) -> float:
    return cpu_seconds_by_group({pgid})[pgid]


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (all cores, from /proc/stat), for the "other load" figure."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return (sum(values[:8]) - idle) / _CLK


class CpuSampler:
    """Snapshots of the CPU seconds of named process groups (and of the machine), taken on demand;
    :meth:`percent` gives each group's use between two moments, as % of one core, plus ``other``:
    what the rest of the machine used meanwhile (a shared machine's noise, made visible)."""

    def __init__(self, groups: dict[str, int]):
        self.groups = groups
        self.snapshots: list[tuple[float, dict[str, float]]] = []

    def sample(self) -> None:
        by_pgid = cpu_seconds_by_group(set(self.groups.values()))
        values = {name: by_pgid[pgid] for name, pgid in self.groups.items()}
        values["machine"] = machine_busy_seconds()
        self.snapshots.append((time.time(), values))

    def window(self, start: float, end: float) -> tuple[float, float, dict[str, float]]:
        """``(t0, t1, CPU seconds per group)`` between the first and last snapshot inside [start, end]."""
        inside = [s for s in self.snapshots if start <= s[0] <= end]
        if len(inside) < 2:
            return start, end, {}
        (t0, a), (t1, b) = inside[0], inside[-1]
        used = {name: b[name] - a[name] for name in a}
        ours = {self.groups[name]: value for name, value in used.items() if name in self.groups}  # each group once
        used["other"] = max(used.pop("machine") - sum(ours.values()), 0.0)
        return t0, t1, used

    def percent(self, start: float, end: float) -> dict[str, float]:
        t0, t1, used = self.window(start, end)
        return {name: 100 * value / max(t1 - t0, 1e-9) for name, value in used.items()}


# =================================================================================================
# One Locust run
# =================================================================================================


@dataclass
class LocustRun:
    """What one headless Locust run left: every request's record, and the process figures."""

    directory: Path
    records: list[dict]
    started_at: float  #: wall clock of Locust's test_start
    ended_at: float
    cpu: dict[str, float]  #: % of one core per process group during the run, and "other" (the rest of the machine)
    locust_total: int  #: the request count in Locust's own summary (cross-check of the records)
    returncode: int
    sim_samples: list[tuple[float, dict]] = field(default_factory=list)  #: (wall time, /_sim/stats)
    cpu_warnings: list[float] = field(default_factory=list)  #: Locust's own "I am CPU-bound" warnings
    cpu_window: tuple = ()  #: (t0, t1, CPU seconds per group) over which ``cpu`` was measured
    sampler: "CpuSampler | None" = None  #: every CPU snapshot of the run (make bench cuts it into plan steps)

    def proxy_cpu_ms_per_request(self) -> float:
        """The proxy's CPU time per request, over the CPU window (robust to a busy machine, unlike req/s)."""
        if not self.cpu_window or "proxy" not in self.cpu_window[2]:
            return float("nan")
        t0, t1, used = self.cpu_window
        done = sum(1 for r in self.records if t0 <= r["t"] <= t1)
        return 1000 * used["proxy"] / done if done else float("nan")

    @property
    def seconds(self) -> float:
        return max(self.ended_at - self.started_at, 1e-9)

    @property
    def durations(self) -> list[float]:
        return [r["ms"] for r in self.records]

    @property
    def failures(self) -> int:
        return sum(1 for r in self.records if not r["ok"])

    @property
    def rps(self) -> float:
        return len(self.records) / self.seconds


def percentile(values: list[float], p: float) -> float:
    """Linear-interpolated percentile (``p`` in 0-100) of exact values; NaN when there are none."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def run_locust(proxy: stack.Proxy, directory: Path, *, users: int, duration: float, mix: tuple[str, ...],
               models: tuple[str, ...], rate: float = 0.0, spawn_rate: float | None = None,
               sim_url: str | None = None, phases: list[tuple[float, dict]] = (), html: bool = True,
               extra_groups: dict[str, int] | None = None, extra_env: dict[str, str] | None = None,
               sample_every: float = 0.2) -> LocustRun:
    """``locust --headless`` against ``proxy`` for ``duration`` seconds; it stops by itself.

    ``phases`` are ``(seconds after the test started, POST /_sim/config body)`` applied during the run;
    with ``sim_url`` the simulator's hit counters are sampled every 0.2 s (for the breaker check).
    """
    directory.mkdir(parents=True, exist_ok=True)
    out = directory / "records.json"
    started_file = directory / "records.json.started"
    for stale in (out, started_file):
        stale.unlink(missing_ok=True)
    env = {**os.environ, "LOADTEST_KEY": proxy.master_key, "LOADTEST_MIX": ",".join(mix),
           "LOADTEST_MODELS": ",".join(models), "LOADTEST_RATE": str(rate), "LOADTEST_OUT": str(out),
           "PYTHONUNBUFFERED": "1", **(extra_env or {})}
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", proxy.url,
           "-u", str(users), "-r", str(spawn_rate or users), "-t", f"{duration:g}s", "--stop-timeout", "30",
           "--csv", str(directory / "locust"), "--only-summary", "--loglevel", "WARNING",
           "--logfile", str(directory / "locust.log")]
    if html:
        cmd += ["--html", str(directory / "report.html")]
    with open(directory / "locust.out", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    samples: list[tuple[float, dict]] = []
    try:
        deadline = time.monotonic() + 60
        while not started_file.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"locust did not start; see {directory / 'locust.out'}:\n"
                                   + (directory / "locust.out").read_text()[-3000:])
            time.sleep(0.02)
        started_at = float(started_file.read_text())
        sampler = CpuSampler({"proxy": proxy.proc.pid, "locust": proc.pid, **(extra_groups or {})})
        pending = sorted(phases, key=lambda p: p[0])
        while proc.poll() is None:
            now = time.time()
            while pending and now - started_at >= pending[0][0]:
                sim_post(sim_url, "/_sim/config", pending.pop(0)[1])
            if sim_url:
                with contextlib.suppress(OSError, ValueError):
                    samples.append((time.time(), sim_get(sim_url, "/_sim/stats")))
            if time.time() <= started_at + duration + 0.5:
                sampler.sample()
            time.sleep(sample_every)
            if time.time() - started_at > duration + 90:
                raise RuntimeError("locust did not stop by itself")
        cpu = sampler.percent(started_at, started_at + duration)
        cpu_window = sampler.window(started_at, started_at + duration)
    finally:
        stack.stop(proc)
    if not out.exists():
        raise RuntimeError(f"locust left no records (exit {proc.returncode}); see {directory / 'locust.out'}")
    data = json.loads(out.read_text())
    records = [dict(zip(data["fields"], row, strict=False)) for row in data["records"]]
    ended_at = max((r["t"] for r in records), default=started_at)
    return LocustRun(directory, records, started_at, ended_at, cpu, _locust_total(directory),
                     proc.returncode, samples, data.get("cpu_warnings") or [], cpu_window, sampler)


def _locust_total(directory: Path) -> int:
    """The request count of Locust's own closing summary (its CSV is only refreshed every few seconds)."""
    count = -1
    with contextlib.suppress(OSError):
        for line in (directory / "locust.out").read_text().splitlines():
            if line.strip().startswith("Aggregated"):
                numbers = re.findall(r"\b\d+\b", line)
                count = int(numbers[-1]) if numbers else count
    return count


# =================================================================================================
# Tables and the results file
# =================================================================================================


def table(headers: list[str], rows: list[list], align: str = "") -> str:
    """A Markdown table that also reads well on a terminal (columns padded)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    align = align or "l" + "r" * (len(headers) - 1)

    def line(row: list[str]) -> str:
        return (
            "| " + " | ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(row, widths, align, strict=False)) + " |"
        )

    rule = (
        "|" + "|".join(("-" * (w + 1) + ":") if a == "r" else ("-" * (w + 2)) for w, a in zip(widths, align, strict=False)) + "|"
    )
    return "\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]])


def machine() -> dict[str, str]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {}
    for package in ("litellm", "locust"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            versions[package] = version(package)
    with contextlib.suppress(OSError):
        load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": str(os.cpu_count()),
        "cpu": cpu,
        "python": platform.python_version(),
        "litellm": versions.get("litellm", "?"),
        "locust": versions.get("locust", "?"),
        "load": load,
    }


def machine_line(info: dict[str, str]) -> str:
    return (f"{info['date']}; {info['cpus']} CPUs ({info['cpu']}); load average before the run {info['load']}; "
            f"Python {info['python']}, litellm {info['litellm']}, locust {info['locust']}; "
            "one proxy worker (the litellm default), everything on loopback")


def update_results(section: str, body: str) -> None:
    """Replace the ``section`` part of loadtest/RESULTS.md (``make loadtest`` and ``make bench`` each own one)."""
    begin, end = f"<!-- {section}:begin -->", f"<!-- {section}:end -->"
    text = RESULTS_MD.read_text() if RESULTS_MD.exists() else (
        "# Load test and benchmark results\n\n"
        "The last measured tables, written by `make loadtest` and `make bench` (paste into README.md).\n"
        "Absolute figures move from run to run on a shared machine; compare ratios within one run.\n\n"
        "<!-- loadtest:begin -->\n<!-- loadtest:end -->\n\n<!-- bench:begin -->\n<!-- bench:end -->\n")
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    RESULTS_MD.write_text(text)
