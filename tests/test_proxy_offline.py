"""A relay never reaches outside the machine on its own: no tokenizer download, no lookup, for any
secondary name, through a real proxy whose every outbound connection is audited.

LiteLLM's ``token_counter`` downloads a Hugging Face tokenizer for model names containing
``llama-3``, ``llama-2`` or ``replicate``; without network that stalled each relay 23 s and froze the
worker. The proxy here loads ``tests/proxy_callbacks/net_audit.py`` first: an audit hook that records
every ``socket.getaddrinfo`` / ``socket.connect`` to a destination that is not loopback and refuses it
at once (so a regression fails fast instead of waiting out the retries). Every secondary is on the
loopback simulator and priced, the relay budget and the calling key's LiteLLM budget are both on (so
both reservations count the prompt), and spend is attributed to the caller (LiteLLM's cost tracker
runs, as in ``test_proxy_books.py``). Two last requests check that both watchers of the module are
live in the proxy: a model outside the machine, and LiteLLM's own token counter for a llama-3 name.
"""

import json
import shutil
import time
from pathlib import Path

import httpx
import openai
import pytest

from sim import stack
from sim.stack import model_entry
from tests.proxy_support import FAKE_PROVIDER_KEY

pytestmark = pytest.mark.proxy

CALLBACKS = Path(__file__).resolve().parent / "proxy_callbacks"
KEY = "sk-offline-budgeted-0001"  #: a LiteLLM key with a budget: the relay checks each call against it
#: the primary answers "SIM:ANSWER=Refined and final." and every secondary reading that answers "Refined and final."
REFINABLE = "SIM:ANSWER=SIM:ANSWER=Refined and final."
CONTROL_HOST = "relay-net-audit-control.invalid"
PRICE = {"input_cost_per_token": 1e-06, "output_cost_per_token": 2e-06}

#: secondaries named like the model families whose tokenizers LiteLLM would fetch or bundle
#: (model_name, litellm model, API of the simulator)
SECONDARIES = [
    ("llama-3-8b-instruct", "ollama_chat/llama-3-8b-instruct", "ollama"),
    ("ollama/llama-3-8b", "openai/llama-3-8b", "openai"),
    ("llama-2-13b-chat", "openai/llama-2-13b-chat", "openai"),
    ("replicate/meta-llama-3-70b", "openai/replicate-meta-llama-3-70b", "openai"),
    ("mistral/mistral-large-latest", "mistral/mistral-large-latest", "openai"),
    ("anthropic/claude-3-5-haiku-20241022", "anthropic/claude-3-5-haiku-20241022", "anthropic"),
    ("claude-2.1", "anthropic/claude-3-5-haiku-20241022", "anthropic"),
    ("claude-haiku-4-5", "anthropic/claude-haiku-4-5-20251001", "anthropic"),  # litellm's own Anthropic tokenizer
]


def _models(sim_url: str) -> list[dict]:
    base = {"ollama": sim_url, "anthropic": sim_url, "openai": sim_url + "/v1"}
    primary = lambda name, relay: model_entry(name, "ollama_chat/llama3", sim_url, relay)  # noqa: E731
    models = [model_entry(name, model, base[api], api_key=FAKE_PROVIDER_KEY, **PRICE)
              for name, model, api in SECONDARIES]
    models += [primary(f"p-refine-{i}", {"mode": "refine", "secondary_model": name})
               for i, (name, _, _) in enumerate(SECONDARIES)]
    models.append(primary("p-consensus", {"mode": "consensus", "consensus_models": [s[0] for s in SECONDARIES[:4]],
                                          "secondary_model": "llama-2-13b-chat"}))
    models.append(primary("p-consensus-2", {"mode": "consensus", "consensus_models": [s[0] for s in SECONDARIES[4:]],
                                            "secondary_model": "llama-3-8b-instruct"}))
    models.append(model_entry("outside", "openai/gpt-4o-mini", f"http://{CONTROL_HOST}/v1", api_key=FAKE_PROVIDER_KEY))
    return models


@pytest.fixture(scope="module")
def audited(workdir, sim):
    """A proxy with the audit hook, LiteLLM's spend tracking (books stub) and the relay."""
    directory = workdir / "offline"
    directory.mkdir(parents=True, exist_ok=True)
    for module in ("net_audit.py", "litellm_books.py"):
        shutil.copy(CALLBACKS / module, directory / module)
    audit_log = directory / "outbound.jsonl"
    config = stack.write_config(directory, _models(sim.url), callbacks=("net_audit.instance", "litellm_books.instance"),
                                litellm_settings={"num_retries": 0})
    proxy = stack.start_proxy(config, timeout=240, workdir=directory, env={
        "NET_AUDIT_LOG": str(audit_log), "BOOKS_ROWS": str(directory / "rows.jsonl"),
        "BOOKS_KEYS": json.dumps([{"key": KEY, "max_budget": 100.0}]),
        "RELAY_SECONDARY_MODEL": SECONDARIES[0][0], "RELAY_APPLY_TO": "p-*", "RELAY_BUDGET_USD": "100",
        "RELAY_TIMEOUT_S": "10", "RELAY_DEADLINE_S": "20", "RELAY_RETRIES": "0", "RELAY_LOG_LEVEL": "info",
        "RELAY_SPEND_ATTRIBUTION": "caller"})
    yield proxy, audit_log
    proxy.stop()


def _outbound(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _shown(entries: list[dict]) -> str:
    return "\n".join(f"{e['event']} {e['host']}:{e['port']} ({e['thread']}) via\n    " + "\n    ".join(e["stack"])
                     for e in entries[:3])


def test_no_relay_attempts_an_outbound_connection_for_llama_mistral_or_claude_secondaries(audited, sim, token):
    proxy, audit_log = audited
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    prompt = f"{REFINABLE} {token}"
    # long, adversarial input on top: CJK, emoji, digit and whitespace runs (a count is never a download)
    long_prompt = f"{prompt} " + "漢字かな交じり文 🙂🙃 " * 300 + "1234567890" * 300 + " \n\t" * 300
    started = time.monotonic()
    outcomes = {}
    for i, (name, _, _) in enumerate(SECONDARIES):
        raw = client.chat.completions.with_raw_response.create(
            model=f"p-refine-{i}", messages=[{"role": "user", "content": prompt if i % 2 else long_prompt}])
        outcomes[f"{name} (refine)"] = raw.headers.get("x-relay-outcome")
        with client.chat.completions.with_streaming_response.create(
                model=f"p-refine-{i}", messages=[{"role": "user", "content": prompt}], stream=True) as streamed:
            chunks = list(streamed.parse())
        relay = [c.model_extra["relay"] for c in chunks if c.model_extra and "relay" in c.model_extra]
        outcomes[f"{name} (refine, streamed)"] = relay[0]["outcome"] if relay else None
    for model in ("p-consensus", "p-consensus-2"):
        raw = client.chat.completions.with_raw_response.create(model=model,
                                                               messages=[{"role": "user", "content": prompt}])
        outcomes[f"{model}"] = raw.headers.get("x-relay-outcome")
    elapsed = time.monotonic() - started
    time.sleep(1.0)  # logging and spend tracking finish after the answers

    # every relay really called its secondary (on the simulator), and got through
    assert all(outcome == "modified" for outcome in outcomes.values()), outcomes
    called = {r["model"] for r in sim.requests(token)}
    assert {model.split("/", 1)[1] for _, model, _ in SECONDARIES} <= called, called
    # (the control model's own host aside: the router asks an OpenAI-compatible api_base for its models)
    outbound = [e for e in _outbound(audit_log) if e["host"] != CONTROL_HOST]
    assert not outbound, f"the proxy tried to reach outside the machine during relays:\n{_shown(outbound)}"
    assert elapsed < 60, f"{len(outcomes)} relays took {elapsed:.1f}s"

    # both watchers are live in this proxy: a model outside the machine (litellm's async HTTP on the
    # event loop) and LiteLLM's own token counter for a llama-3 name (a tokenizer download) are seen
    controls = lambda: [e for e in _outbound(audit_log) if e["host"] == CONTROL_HOST]  # noqa: E731
    before = len(controls())
    with pytest.raises(openai.APIError):
        client.chat.completions.create(model="outside", messages=[{"role": "user", "content": token}])
    assert len(controls()) > before and controls()[-1]["event"] == "httpx async request", controls()
    httpx.post(proxy.url + "/utils/token_counter", headers={"Authorization": f"Bearer {proxy.master_key}"},
               json={"model": "ollama/llama-3-8b", "messages": [{"role": "user", "content": token}]}, timeout=60)
    assert ("socket.getaddrinfo", "huggingface.co") in {(e["event"], e["host"]) for e in _outbound(audit_log)}
