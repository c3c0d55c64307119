"""Shared fixtures. Environment first: litellm reads LITELLM_LOCAL_MODEL_COST_MAP at import."""

import os

os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
for _name in [n for n in os.environ if n.startswith("RELAY_")]:
    del os.environ[_name]

import json
import uuid
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
import yaml

from sim import stack

#: A key-shaped fake secret given to the secondary entries; it must never show up in a log or header.
FAKE_PROVIDER_KEY = "sk-relaytest-FAKEKEY-0123456789abcdefABCDEF"


class SimControl:
    """The running simulator, as tests see it: what it received, and its knobs."""

    def __init__(self, url: str):
        self.url = url
        self.http = httpx.Client(base_url=url, timeout=10)

    def requests(self, token: str | None = None, path: str | None = None) -> list[dict]:
        """Recorded requests, optionally only those whose body mentions ``token``."""
        params = {"path": path} if path else {}
        records = self.http.get("/_sim/requests", params=params).json()
        records = records["requests"] if isinstance(records, dict) else records
        return [r for r in records if token is None or token in json.dumps(r.get("body"))]

    def configure(self, **knobs) -> dict:
        response = self.http.post("/_sim/config", json=knobs)
        response.raise_for_status()
        return response.json()

    def stats(self) -> dict:
        return self.http.get("/_sim/stats").json()


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("relay")


@pytest.fixture(scope="session")
def sim_server(workdir):
    server = stack.start_simulator(workdir / "simulator.log")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def sim(sim_server) -> SimControl:
    return SimControl(sim_server.url)


@pytest.fixture
def token() -> str:
    """A unique word to put in a prompt, so a test finds its own requests in the simulator."""
    return "tok" + uuid.uuid4().hex[:12]


def model_entry(name: str, model: str, api_base: str, relay: dict | None = None, **params) -> dict:
    entry = {"model_name": name, "litellm_params": {"model": model, "api_base": api_base, **params}}
    if relay is not None:
        entry["model_info"] = {"relay": relay}
    return entry


def write_config(directory: Path, model_list: list[dict]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump({
        "model_list": model_list,
        "litellm_settings": {"callbacks": "relay_plugin.proxy_handler_instance", "drop_params": True},
        "general_settings": {"master_key": "os.environ/LITELLM_MASTER_KEY"},
    }, sort_keys=False))
    return path


def relay_test_models(sim_url: str) -> list[dict]:
    """The models every test proxy serves: primaries on the simulated Ollama, secondaries on the
    simulated OpenAI and Anthropic APIs, and one primary per mode through a ``relay:`` block."""
    ollama = lambda name, relay=None: model_entry(name, "ollama_chat/llama3", sim_url, relay)  # noqa: E731
    return [
        ollama("llama"),
        ollama("llama-guard", {"mode": "guard"}),
        ollama("llama-guard-error", {"mode": "guard", "guard_action": "error"}),
        ollama("llama-annotate", {"mode": "annotate"}),
        ollama("llama-append", {"mode": "annotate", "annotate_target": "append"}),
        ollama("llama-escalate", {"mode": "escalate"}),
        ollama("llama-consensus", {"mode": "consensus"}),
        ollama("llama-shadow", {"mode": "shadow"}),
        ollama("llama-closed", {"mode": "refine", "fail_mode": "closed"}),
        ollama("llama-guard-closed", {"mode": "guard", "fail_mode": "closed"}),
        ollama("llama-bad", {"mode": "telepathy"}),
        ollama("llama-guard-window", {"mode": "guard", "stream_guard": "window"}),
        model_entry("mock-window", "openai/gpt-4o-mini", sim_url + "/v1", {"mode": "guard", "stream_guard": "window"},
                    mock_response=WINDOW_ANSWER),
        model_entry("llama-generate", "ollama/llama3", sim_url),
        model_entry("llama-embed", "openai/text-embedding-3-small", sim_url + "/v1", mock_response=[0.25, 0.5]),
        model_entry("openai-primary", "openai/gpt-4o-mini", sim_url + "/v1", api_key=FAKE_PROVIDER_KEY),
        model_entry("unrelayed", "ollama_chat/llama3", sim_url),
        model_entry("sec", "openai/gpt-4o-mini", sim_url + "/v1", api_key=FAKE_PROVIDER_KEY),
        model_entry("sec-claude", "anthropic/claude-haiku-4-5-20251001", sim_url, api_key=FAKE_PROVIDER_KEY),
        model_entry("premium", "openai/gpt-4o", sim_url + "/v1", api_key=FAKE_PROVIDER_KEY),
    ]


#: a primary answer whose third window (of RELAY_STREAM_WINDOW_CHARS=40) is one the guard blocks
WINDOW_ANSWER = ("The first forty characters are all fine. " "And the next forty characters are fine. "
                 "But SIM:BLOCK marks this window as bad. " "This last window must never be seen.")

BASE_RELAY_ENV = {
    "RELAY_SECONDARY_MODEL": "sec",
    "RELAY_ESCALATE_MODEL": "premium",
    "RELAY_CONSENSUS_MODELS": "sec,sec-claude",
    "RELAY_APPLY_TO": "llama*,openai-primary",
    "RELAY_LOG_LEVEL": "info",
    "RELAY_TIMEOUT_S": "5",
    "RELAY_DEADLINE_S": "10",
    "RELAY_STREAM_WINDOW_CHARS": "40",
}


class ProxyHandle:
    """A running proxy plus ready-made clients for it."""

    def __init__(self, proxy: stack.Proxy):
        self.proxy = proxy
        self.url = proxy.url
        self.key = proxy.master_key
        #: what the plugin said at startup it cannot do on this proxy's LiteLLM (``make test-compat``)
        self.degraded = degraded_lines(proxy.log_text())
        #: False on a LiteLLM without the response-headers hook: what the relay did is in the body only
        self.relay_headers = not any("no response-headers hook" in line for line in self.degraded)
        hooks = {"event_hooks": {"response": [relay_headers_from_the_body]}}
        with_hooks = lambda sdk: {} if self.relay_headers else {"http_client": sdk.DefaultHttpxClient(**hooks)}  # noqa: E731
        self.openai = openai.OpenAI(base_url=proxy.url + "/v1", api_key=proxy.master_key, max_retries=0, timeout=60,
                                    **with_hooks(openai))
        self.anthropic = anthropic.Anthropic(base_url=proxy.url, api_key=proxy.master_key, max_retries=0, timeout=60,
                                             **with_hooks(anthropic))

    def chat(self, model: str, content: str, **kwargs):
        """A chat completion; returns the raw response (``.headers``, ``.parse()``)."""
        return self.openai.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": content}], **kwargs)

    def log(self) -> str:
        return self.proxy.log_text()


def degraded_lines(log: str) -> list[str]:
    """The plugin's startup lines about what the proxy's LiteLLM cannot do."""
    from relay_plugin import DEGRADED_MARK

    return [line.split(DEGRADED_MARK, 1)[1] for line in log.splitlines() if DEGRADED_MARK in line]


def relay_headers_from_the_body(response) -> None:
    """For a proxy whose LiteLLM has no response-headers hook (the plugin said so at startup): check
    that it really sent no x-relay-* header, then expose the body's ``relay`` object as the headers
    it stands for, so the same tests check what the relay did on every LiteLLM line. Error answers
    (4xx/5xx) carry their x-relay-* headers on every line, and streams carry the object themselves."""
    if response.status_code >= 400 or "text/event-stream" in response.headers.get("content-type", ""):
        return
    response.read()
    relay = response.json().get("relay") if response.content.startswith(b"{") else None
    sent = [name for name in response.headers if name.lower().startswith("x-relay-")]
    assert not sent, f"the plugin said this LiteLLM sends no x-relay-* headers, yet it sent {sent}"
    if isinstance(relay, dict):
        response.headers.update(relay_body_as_headers(relay))


def relay_body_as_headers(relay: dict) -> dict[str, str]:
    """The x-relay-* headers the relay object stands for (relay_plugin.Outcome.headers, from the body)."""
    import relay_plugin

    outcome = relay_plugin.Outcome(relay["mode"], relay["outcome"], list(relay["secondary_model"]),
                                   latency_ms=relay["latency_ms"], cost_usd=relay["cost_usd"],
                                   reason=relay.get("reason", ""), override=relay.get("override", ""),
                                   cache=relay.get("cache", ""))
    return outcome.headers()


def start_test_proxy(workdir: Path, name: str, sim_url: str, env: dict, model_list=None, port: int = 0) -> ProxyHandle:
    directory = workdir / name
    config = write_config(directory, model_list or relay_test_models(sim_url))
    proxy = stack.start_proxy(config, env, port=port, workdir=directory)
    try:
        return ProxyHandle(proxy)
    except Exception:
        proxy.stop()  # never leave a proxy running that no fixture will stop
        raise


@pytest.fixture(scope="session")
def proxy(workdir, sim) -> ProxyHandle:
    """The main test proxy: every mode by model, client overrides `opt_in`, secondaries via the router."""
    handle = start_test_proxy(workdir, "main", sim.url, {**BASE_RELAY_ENV, "RELAY_CLIENT_OVERRIDE": "opt_in"})
    yield handle
    handle.proxy.stop()


# ----- Redis: real redis-server processes for the shared state (tests/redis_support.py) ------------


@pytest.fixture(scope="session")
def redis_server(workdir):
    """One redis-server for the session; tests that stop or pause a server start their own."""
    from tests.redis_support import RedisServer

    server = RedisServer(workdir / "redis").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster(workdir):
    """One Redis Cluster (3 masters, 3 replicas) for the session; fault tests start their own."""
    from tests.redis_support import RedisClusterNodes

    cluster = RedisClusterNodes(workdir / "redis-cluster").start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def redis_sentinel(workdir):
    """One Sentinel-managed primary/replica pair for the session; fault tests start their own."""
    from tests.redis_support import RedisSentinelSet

    sentinels = RedisSentinelSet(workdir / "redis-sentinel").start()
    yield sentinels
    sentinels.stop()
