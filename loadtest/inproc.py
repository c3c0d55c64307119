"""The plugin's own work per relayed request, measured in process: everything except the secondary call.

    python -m loadtest.inproc [--calls 3000] [--profile FILE] [--json]

A ``RelayHandler`` gets a ``FakeSecondary`` (tests/support.py) that answers at once, so what is timed (with
``time.perf_counter_ns``) is exactly what the proxy runs on top of the primary call: the
``async_post_call_success_hook`` (plan, prompt building, breaker, cache and budget bookkeeping,
answer rewrite) plus the ``async_post_call_response_headers_hook``. Each call gets a fresh request
dict and a fresh ``ModelResponse``, built outside the timed region. ``make bench`` runs this as a
subprocess (clean environment, one event loop) and reports the p50 of ``refine`` against 0.5 ms.
"""

import argparse
import asyncio
import cProfile
import io
import json
import os
import pstats
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

ANSWER = ("Paris is the capital of France. It lies on the Seine, has about two million inhabitants, and has "
          "been the country's political and cultural centre since the Middle Ages.")
PROMPT = "What is the capital of France? Answer in two or three sentences, with one fact about the city."
REPLIES = {
    "refine": "Paris is France's capital, on the Seine; about two million people live there.",
    "guard": '{"verdict": "allow", "reason": "no policy issue"}',
    "annotate": "No errors found.",
    "escalate": '{"score": 9, "reason": "good answer"}',
    "consensus": "Paris is the capital of France.",
    "shadow": "No errors found.",
}
EXPECTED = {"refine": "modified", "guard": "relayed", "annotate": "relayed", "escalate": "relayed",
            "consensus": "modified", "shadow": "relayed"}


def _import_plugin():
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"  # before litellm is imported: no price-map download
    sys.path.insert(0, str(ROOT))
    import relay_plugin

    return relay_plugin


def make_handler(rp, mode: str):
    from tests.support import FakeSecondary

    members = ["openai/bench-m1", "openai/bench-m2", "openai/bench-m3"]
    env = {"RELAY_MODE": mode, "RELAY_SECONDARY_MODEL": "openai/bench-secondary",
           "RELAY_ESCALATE_MODEL": "openai/bench-premium", "RELAY_CONSENSUS_MODELS": ",".join(members)}
    replies = {"openai/bench-secondary": REPLIES[mode], "openai/bench-premium": REPLIES[mode],
               **dict.fromkeys(members, "Paris.")}
    instant = FakeSecondary(replies, cost=0.00001)  # answers at once; its record of calls is not timed apart
    return rp.RelayHandler(rp.RelayConfig.from_env(env), complete=instant)


def make_call(litellm, key):
    data = {
        "model": "mock-primary",
        "messages": [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": PROMPT}],
        "litellm_call_id": str(uuid.uuid4()),
        "metadata": {"model_info": {"id": "mock-primary-1", "db_model": False}, "user_api_key_hash": "h",
                     "headers": {"content-type": "application/json"}},
        "proxy_server_request": {"url": "http://127.0.0.1/v1/chat/completions", "method": "POST",
                                 "headers": {"content-type": "application/json", "user-agent": "bench"}},
    }
    response = litellm.ModelResponse(
        model="mock-primary",
        choices=[{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": ANSWER}}],
        usage={"prompt_tokens": 30, "completion_tokens": 35, "total_tokens": 65})
    return data, response


async def measure(rp, litellm, key, mode: str, calls: int, warmup: int = 300, profiler=None) -> dict:
    handler = make_handler(rp, mode)
    times, outcomes = [], {}
    for i in range(warmup + calls):
        data, response = make_call(litellm, key)
        if profiler is not None:
            profiler.enable()
        started = time.perf_counter_ns()
        await handler.async_post_call_success_hook(data, key, response)
        headers = await handler.async_post_call_response_headers_hook(data, key, response)
        elapsed = time.perf_counter_ns() - started
        if profiler is not None:
            profiler.disable()
        if i >= warmup:
            times.append(elapsed / 1e6)
            outcome = (headers or {}).get("x-relay-outcome", "(none)")
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
        if mode == "shadow":
            await handler.drain()  # the background analysis runs off the response path: not timed
    await handler.drain()
    times.sort()
    pick = lambda p: times[min(int(len(times) * p / 100), len(times) - 1)]  # noqa: E731
    return {"mode": mode, "calls": calls, "p50_ms": pick(50), "p90_ms": pick(90), "p99_ms": pick(99),
            "mean_ms": sum(times) / len(times), "outcomes": outcomes, "expected": EXPECTED[mode]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.inproc", description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--modes", default="refine,guard,annotate,escalate,consensus,shadow")
    parser.add_argument("--profile", type=Path, help="also profile refine (cProfile) and write the top functions here")
    parser.add_argument("--json", action="store_true", help="print one JSON object (for make bench)")
    args = parser.parse_args(argv)
    rp = _import_plugin()
    import litellm

    try:
        from litellm.proxy._types import UserAPIKeyAuth

        key = UserAPIKeyAuth(api_key="sk-bench-caller-key", token="bench-token")
    except Exception:  # noqa: BLE001 - the proxy extras are optional for this measurement
        from types import SimpleNamespace

        key = SimpleNamespace(api_key="sk-bench-caller-key", token="bench-token")
    results = [asyncio.run(measure(rp, litellm, key, mode, args.calls)) for mode in args.modes.split(",")]
    profile_text = ""
    if args.profile:
        profiler = cProfile.Profile()  # enabled around the two hooks only
        asyncio.run(measure(rp, litellm, key, "refine", args.calls, warmup=0, profiler=profiler))
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(25)
        profile_text = out.getvalue()
        args.profile.write_text(profile_text)
    if args.json:
        print(json.dumps({"results": results, "profile": str(args.profile or "")}))
    else:
        for r in results:
            print(f"{r['mode']:10} p50 {r['p50_ms'] * 1000:7.1f} us  p90 {r['p90_ms'] * 1000:7.1f} us  "
                  f"p99 {r['p99_ms'] * 1000:7.1f} us  outcomes {r['outcomes']}")
        if profile_text:
            print(profile_text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
