"""Record the relay's provider cassettes (cassettes/<provider>/<case>.yaml).

    python scripts/record_cassettes.py --provider gemini            # against the local emulator
    python scripts/record_cassettes.py --provider gemini --real     # against the real service
    python scripts/record_cassettes.py --provider all --auto        # real where a key is set

The scenarios are the ones tests/test_cassettes.py replays (tests/cassette_support.py), so the
requests recorded here are the requests the replay makes. Each cassette is recorded into a
temporary directory, checked (the scenario did what it should, the secret scan is clean, a replay of
the new cassette matches), and only then moved into cassettes/; a failed recording changes nothing.

Emulator recordings point litellm at sim/emulators.py on loopback and rewrite the emulator's
address to the provider's real origin, so every cassette replays against the URLs litellm builds
for the real service. Real recordings use the key from the environment (see --help); the error
case cannot be provoked on a real service and keeps its emulator recording.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"  # before litellm is imported: no price-map download

import litellm  # noqa: E402

from sim.emulators import Emulator  # noqa: E402
from tests import cassette_support as cs  # noqa: E402

REAL_ONLY_SKIPS = {"error"}  #: cases a real service cannot be made to produce on demand


class RecordingFailed(Exception):
    pass


def check_run(provider: cs.Provider, case: str, result) -> None:
    """The scenario did what the case is about (otherwise the cassette would prove nothing)."""
    if case == "stream":
        if not result.text.strip() or result.completion_tokens <= 0:
            raise RecordingFailed(f"the stream gave no text or no usage: {result}")
        return
    outcome = result.headers.get("x-relay-outcome")
    wanted = {"plain": ("modified",), "judge": ("blocked",), "judge_schema": ("blocked",),
              "error": ("failed:rate_limited", "failed:provider_error")}[case]
    if outcome not in wanted:
        raise RecordingFailed(f"outcome {outcome!r}, wanted {' or '.join(wanted)}; reason: "
                              f"{getattr(result.outcome, 'reason', '')}")


async def run_case(provider: cs.Provider, case: str):
    if case == "stream":
        return await cs.run_stream(provider)
    return await cs.run_relay(provider, case)


async def record_one(provider: cs.Provider, case: str, env: dict[str, str], origin_map: dict[str, str],
                     secrets: list[str]) -> None:
    with tempfile.TemporaryDirectory(prefix="relay-cassette-") as tmp:
        library = Path(tmp)
        relative = Path(provider.name) / f"{case}.yaml"
        with cs.scoped_env(env):
            recorder = cs.make_vcr("all", origin_map, library=library)
            with recorder.use_cassette(str(relative)):
                result = await run_case(provider, case)
        check_run(provider, case, result)
        recorded = library / relative
        if not recorded.exists():
            raise RecordingFailed("nothing was recorded (did the call reach the network layer?)")
        leaks = cs.find_secrets(recorded.read_text(errors="replace"), secrets)
        if leaks:
            raise RecordingFailed("the new cassette holds key-shaped strings: " + "; ".join(leaks))
        with cs.scoped_env(cs.replay_env(provider)):  # the replay the tests will do
            with cs.make_vcr("none", library=library).use_cassette(str(relative)) as cassette:
                replayed = await run_case(provider, case)
                if not cassette.all_played:
                    raise RecordingFailed("a replay of the new cassette did not use every recorded exchange")
        check_run(provider, case, replayed)
        target = cs.cassette_path(provider.name, case)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(recorded, target)


def emulator_plan(provider: cs.Provider, emulator_url: str) -> tuple[dict[str, str], dict[str, str]]:
    variable, suffix = provider.emulator_env
    env = {**cs.replay_env(provider), variable: emulator_url + suffix}
    return env, {emulator_url: provider.origin}


def real_plan(provider: cs.Provider) -> tuple[dict[str, str], dict[str, str], list[str]]:
    missing = [name for name in provider.real_keys if not os.environ.get(name)]
    if missing:
        raise RecordingFailed(f"--real needs {', '.join(missing)} in the environment")
    env = {**provider.settings, **{n: os.environ[n] for n in provider.real_keys}}
    if provider.name == "bedrock" and os.environ.get("AWS_SESSION_TOKEN"):
        env["AWS_SESSION_TOKEN"] = os.environ["AWS_SESSION_TOKEN"]
    origin_map = {}
    if provider.origin_env:  # a user-specific host (Azure resource, Ollama machine) -> the cassette's
        origin_map[cs._origin(os.environ[provider.origin_env])] = provider.origin
    secrets = [os.environ[n] for n in provider.real_keys if len(os.environ[n]) >= 8 and n != provider.origin_env]
    return env, origin_map, secrets


def has_real_keys(provider: cs.Provider) -> bool:
    return all(os.environ.get(name) for name in provider.real_keys)


async def record_provider(provider: cs.Provider, real: bool, cases: list[str]) -> list[str]:
    manifest = cs.read_manifest()
    entries = manifest.setdefault(provider.name, {})
    done = []
    stamp = {"date": datetime.date.today().isoformat(), "litellm": litellm_version()}
    if real:
        env, origin_map, secrets = real_plan(provider)
        for case in cases:
            if case in REAL_ONLY_SKIPS:
                print(f"  {provider.name}/{case}: kept (a real service cannot be made to fail on demand)")
                continue
            await record_one(provider, case, env, origin_map, secrets)
            entries[case] = {"origin": "real", **stamp}
            done.append(case)
            print(f"  {provider.name}/{case}: recorded against the real service")
    else:
        with Emulator(provider.name) as emulator:
            env, origin_map = emulator_plan(provider, emulator.url)
            for case in cases:
                await record_one(provider, case, env, origin_map, [])
                entries[case] = {"origin": "emulator", **stamp}
                done.append(case)
                print(f"  {provider.name}/{case}: recorded against the emulator")
    cs.write_manifest(manifest)
    return done


def litellm_version() -> str:
    from importlib.metadata import version

    return version("litellm")


async def record_all(names: list[str], args: argparse.Namespace) -> int:
    """One event loop for the whole run: litellm keeps module-level clients bound to the loop that
    created them, so a second asyncio.run() would hand them a closed loop."""
    failures = 0
    for name in names:
        provider = cs.PROVIDERS[name]
        real = args.real or (args.auto and has_real_keys(provider))
        print(f"{name}: recording against {'the real service' if real else 'the local emulator'}")
        try:
            await record_provider(provider, real, args.case or list(cs.CASES))
        except RecordingFailed as exc:
            failures += 1
            print(f"  {name}: FAILED, cassettes left as they were: {exc}", file=sys.stderr)
    return failures


def main(argv: list[str] | None = None) -> int:
    keys = "; ".join(f"{p.name}: {' + '.join(p.real_keys)}" for p in cs.PROVIDERS.values())
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=f"keys for --real: {keys}")
    parser.add_argument("--provider", required=True, help="one of " + ", ".join(cs.PROVIDERS) + ", or all")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--real", action="store_true", help="record against the real service (key from the env)")
    source.add_argument("--auto", action="store_true", help="real where the provider's key is set, else emulator")
    parser.add_argument("--case", action="append", choices=cs.CASES, help="only this case (repeatable)")
    parser.add_argument("--transport", choices=("aiohttp", "httpx"), default="aiohttp",
                        help="litellm's HTTP transport while recording (cassettes replay through either)")
    args = parser.parse_args(argv)

    names = list(cs.PROVIDERS) if args.provider == "all" else [args.provider]
    unknown = [n for n in names if n not in cs.PROVIDERS]
    if unknown:
        parser.error(f"unknown provider {unknown[0]!r}; known: {', '.join(cs.PROVIDERS)}, all")
    litellm.suppress_debug_info = True
    litellm.disable_aiohttp_transport = args.transport == "httpx"
    failures = asyncio.run(record_all(names, args))
    if not failures:
        print("replay them: .venv/bin/python -m pytest tests/test_cassettes.py -q")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
