"""Time to first token and total time of streamed answers, per relay mode, against no plugin.

    python -m loadtest.streaming [--requests 15]        (make bench-stream)

One simulator paces every answer like a real model (time to first token, then tokens per second);
the same proxy config runs once without the plugin and once with it, one mode per primary model.
Each figure is the median of sequential streamed chat requests made with the openai SDK, so nothing
but the relay differs. The contract being measured (README "Streaming"):
  shadow, annotate     time to first token unchanged (annotate's end waits for its analysis)
  guard (buffer)       first token after the primary's whole answer plus the judge (L)
  refine               first token after the primary's whole answer plus the secondary's first token (L)
  escalate, consensus  the same plus the judge / the members in parallel before it (2 L)
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import openai

from sim import stack

PRIMARY_TTFT_MS, TOKENS_PER_S = 150, 100
#: every secondary answers its first byte after L ms (a judge's whole verdict, a streamed answer's first token)
SECONDARY_L_MS = 200
#: secondary calls before the final answer's first token, per mode: the L's a buffered mode must add
L_BEFORE_FIRST_TOKEN = {"guard": 1, "refine": 1, "escalate": 2, "consensus": 2}
#: model_name: (relay block or None, prompt marker)
CASES = {
    "baseline": (None, ""),
    "shadow": ({"mode": "shadow"}, ""),
    "annotate": ({"mode": "annotate"}, ""),
    "guard": ({"mode": "guard"}, ""),
    "refine": ({"mode": "refine"}, ""),
    "escalate": ({"mode": "escalate"}, "SIM:LOWSCORE"),
    "consensus": ({"mode": "consensus"}, ""),
}
PROMPT = "Tell me, in a few sentences, why the sky is blue and why sunsets are red."


def model_list(sim_url: str) -> list[dict]:
    """One primary per case on the simulated Ollama; the secondaries on its OpenAI API."""
    models = [stack.model_entry(name, "ollama_chat/llama3", sim_url, relay) for name, (relay, _) in CASES.items()]
    secondaries = (("sec", "openai/gpt-4o-mini"), ("premium", "openai/gpt-4o"), ("member", "openai/gpt-4.1-mini"))
    for name, model in secondaries:
        models.append(stack.model_entry(name, model, sim_url + "/v1", api_key="sk-sim-not-a-real-key"))
    return models


def measure(proxy_url: str, key: str, model: str, marker: str, requests: int) -> tuple[float, float]:
    """Median (time to first token, total) in ms of streamed chat completions."""
    client = openai.OpenAI(base_url=proxy_url + "/v1", api_key=key, max_retries=0, timeout=60)
    firsts, totals = [], []
    for i in range(requests + 1):  # the first request warms the proxy up and is not counted
        started = time.perf_counter()
        first = None
        stream = client.chat.completions.create(
            model=model, stream=True, messages=[{"role": "user", "content": f"{marker} {PROMPT} ({i})".strip()}])
        for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter()
        ended = time.perf_counter()
        if i:
            firsts.append((first - started) * 1000)
            totals.append((ended - started) * 1000)
    return statistics.median(firsts), statistics.median(totals)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.streaming", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=15)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="relay-stream-bench-"))
    sim = stack.start_simulator(work / "sim.log", 0, "--ttft-ms", str(PRIMARY_TTFT_MS), "--tokens-per-s", str(TOKENS_PER_S))
    import httpx

    secondary = {"latency_ms": SECONDARY_L_MS, "ttft_ms": 0, "tokens_per_s": TOKENS_PER_S}
    httpx.post(sim.url + "/_sim/config", json={"model_config": {m: secondary for m in ("gpt-4o-mini", "gpt-4o", "gpt-4.1-mini")}})
    env = {"RELAY_SECONDARY_MODEL": "sec", "RELAY_ESCALATE_MODEL": "premium", "RELAY_CONSENSUS_MODELS": "member",
           "RELAY_APPLY_TO": "none-by-env"}  # only the models with a relay: block are relayed
    rows = {}
    try:
        for with_plugin in (False, True):
            directory = work / ("plugin" if with_plugin else "baseline")
            config = stack.write_config(directory, model_list(sim.url), plugin=with_plugin)
            proxy = stack.start_proxy(config, env, workdir=directory)
            try:
                for name, (relay, marker) in CASES.items():
                    if with_plugin == (relay is not None):
                        rows[name] = measure(proxy.url, proxy.master_key, name, marker, args.requests)
                    if not with_plugin and name == "baseline":
                        break
            finally:
                proxy.stop()
    finally:
        sim.stop()
    base_first, base_total = rows["baseline"]
    print(f"\nStreamed chat, median of {args.requests} sequential requests. Primary: first token after "
          f"{PRIMARY_TTFT_MS} ms, {TOKENS_PER_S} tokens/s; every secondary: first byte after L = {SECONDARY_L_MS} ms.")
    print(f"{'mode':10} {'TTFT ms':>8} {'total ms':>9} {'TTFT vs none':>13} {'contract':>28} {'over it':>8}")
    for name, (first, total) in rows.items():
        if name == "baseline":
            print(f"{name:10} {first:8.0f} {total:9.0f} {'':>13} {'(no plugin)':>28}")
            continue
        if name in ("shadow", "annotate"):
            target, label = base_first, "unchanged"
        else:
            n = L_BEFORE_FIRST_TOKEN[name]
            target, label = base_total + n * SECONDARY_L_MS, f"primary total + {n} L"
        print(f"{name:10} {first:8.0f} {total:9.0f} {first - base_first:+13.0f} {f'{target:.0f} ({label})':>28} "
              f"{first - target:+8.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
