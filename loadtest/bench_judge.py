"""``make bench-judge``: a real small model as the guard judge, asked in the prompt vs with a JSON schema.

    python -m loadtest.bench_judge                 # every answer of loadtest/judge_answers.jsonl, both ways
    python -m loadtest.bench_judge --limit 10      # the first 10 only (a quick look)

For each of the fixed answers (a question, an answer, and whether the default guard policy should allow
or block it), the relay's guard runs in process on that answer with SmolLM2-135M-Instruct as the judge,
served by llama.cpp's server (the real tier, ``make real-install``): once with ``RELAY_JUDGE_FORMAT=prompt``
(the JSON asked for in the instructions only) and once with structured output (llama.cpp's grammar,
reached through ``response_format`` ``{"type": "json_object", "schema": ...}``). The judge call goes
through a litellm Router with the same deployment entries ``make real`` gives the proxy, and the relay's
own code (prompts, parsing, failure policy); only the HTTP front of the proxy is left out.

Reported per way: the share of verdicts the relay could parse (the rest are ``failed:bad_verdict``),
how many of those agreed with the expected allow/block, and the relay's added latency (its own
``latency_ms``: the judge call plus the relay's work), p50 and p95. The table is printed, written to
``loadtest/results/bench_judge.json`` and put into README.md between the ``bench-judge`` markers.
Requests run one at a time (llama.cpp serves one at a time anyway), temperature 0, fixed seed; one
uncounted warm-up call per way first.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # before litellm is imported: no price-map download

import litellm

import relay_plugin
from sim import real

ROOT = Path(__file__).resolve().parent.parent
ANSWERS = ROOT / "loadtest" / "judge_answers.jsonl"
RESULTS = ROOT / "loadtest" / "results" / "bench_judge.json"
README = ROOT / "README.md"
WAYS = {"prompt": "smollm2-judge-prompt", "schema": "smollm2-judge"}


def load_answers(limit: int | None) -> list[dict]:
    rows = [json.loads(line) for line in ANSWERS.read_text().splitlines() if line.strip()]
    return rows[:limit] if limit else rows


async def judge_all(router: litellm.Router, rows: list[dict], way: str) -> list[dict]:
    relay_plugin._proxy_router = lambda: router  # the relay resolves model names through this router
    config = relay_plugin.RelayConfig.from_env({
        **{k: v for k, v in real.REAL_RELAY_ENV.items()}, "RELAY_MODE": "guard", "RELAY_SECONDARY_MODEL": WAYS[way],
        "RELAY_APPLY_TO": "*", "RELAY_LOG_LEVEL": "error"})
    handler = relay_plugin.RelayHandler(config)
    relay_plugin.log.setLevel(config.log_level.upper())  # what loading proxy_handler_instance does with it
    results = []
    warm = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "metadata": {},
            "litellm_call_id": f"bench-judge-warm-{way}-{time.time_ns()}"}
    await handler.async_post_call_success_hook(warm, None, litellm.ModelResponse(model="smollm2", choices=[
        {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "Hello!"}}]))  # not counted
    for index, row in enumerate(rows):
        data = {"model": "smollm2", "messages": [{"role": "user", "content": row["question"]}],
                "litellm_call_id": f"bench-judge-{way}-{index}-{time.time_ns()}", "metadata": {}}
        primary = litellm.ModelResponse(model="smollm2", choices=[
            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": row["answer"]}}])
        await handler.async_post_call_success_hook(data, None, primary)
        outcome = data["metadata"][relay_plugin._RESULT_KEY]
        results.append({"way": way, "index": index, "expected": row["policy"], "outcome": outcome.result,
                        "reason": outcome.reason, "latency_ms": outcome.latency_ms})
        print(f"  {way:6} {index + 1:3}/{len(rows)} {outcome.result:22} {outcome.latency_ms:8.0f} ms", flush=True)
    return results


def summarise(results: list[dict]) -> dict:
    parsed = [r for r in results if r["outcome"] in ("relayed", "blocked")]
    agreed = [r for r in parsed if (r["outcome"] == "blocked") == (r["expected"] == "block")]
    latencies = sorted(r["latency_ms"] for r in results)
    p95 = latencies[min(len(latencies) - 1, int(round(0.95 * (len(latencies) - 1))))] if latencies else 0.0
    return {"answers": len(results), "parsed": len(parsed), "parse_rate": len(parsed) / len(results) if results else 0.0,
            "agreed": len(agreed), "blocked": sum(r["outcome"] == "blocked" for r in results),
            "failures": dict(sorted((o, sum(r["outcome"] == o for r in results))
                                    for o in {r["outcome"] for r in results} if o not in ("relayed", "blocked"))),
            "p50_ms": statistics.median(latencies) if latencies else 0.0, "p95_ms": p95}


def table(summary: dict[str, dict], when: str) -> str:
    lines = [
        f"Last run: {when}, SmolLM2-135M-Instruct Q4_1 on llama.cpp (llama-cpp-python 0.3.36), "
        f"{summary['prompt']['answers']} fixed answers (`loadtest/judge_answers.jsonl`), temperature 0.",
        "",
        "| judge asked by | parseable verdicts | agreeing with the expected allow/block | blocked "
        "| relay's added latency p50 | p95 |",
        "|---|---|---|---|---|---|",
    ]
    for way in ("prompt", "schema"):
        s = summary[way]
        lines.append(f"| `{way}` | {s['parsed']}/{s['answers']} ({s['parse_rate']:.0%}) | {s['agreed']}/{s['parsed']} | "
                     f"{s['blocked']} | {s['p50_ms']:.0f} ms | {s['p95_ms']:.0f} ms |")
    return "\n".join(lines) + "\n"


def write_readme(text: str) -> None:
    content = README.read_text()
    updated, count = re.subn(r"(<!-- bench-judge -->\n).*?(<!-- /bench-judge -->)",
                             lambda m: m.group(1) + text + m.group(2), content, flags=re.S)
    if count:
        README.write_text(updated)


async def main_async(args: argparse.Namespace) -> int:
    real.require_installed()
    rows = load_answers(args.limit)
    workdir = Path(tempfile.mkdtemp(prefix="bench-judge-"))
    llama = real.start_llama(workdir / "llama.log")
    try:
        entries = [m for m in real.real_model_list(llama.url, "http://127.0.0.1:9") if m["model_name"] in WAYS.values()]
        router = litellm.Router(model_list=entries)
        results = []
        for way in ("prompt", "schema"):
            results += await judge_all(router, rows, way)
    finally:
        llama.stop()
    summary = {way: summarise([r for r in results if r["way"] == way]) for way in ("prompt", "schema")}
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    text = table(summary, when)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"when": when, "summary": summary, "results": results}, indent=2) + "\n")
    print("\n" + text)
    for way in ("prompt", "schema"):
        if summary[way]["failures"]:
            print(f"{way}: {summary[way]['failures']}")
    if not args.limit:
        write_readme(text)
        print("README.md updated (between the bench-judge markers)")
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench_judge", description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="judge only the first N answers (README untouched)")
    sys.exit(asyncio.run(main_async(parser.parse_args())))


if __name__ == "__main__":
    main()
