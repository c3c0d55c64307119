"""The test proxies: the models they serve, their settings, and clients ready to talk to them.

The fixtures that start them for a session are in conftest.py; a test module that needs a proxy of its
own calls :func:`start_test_proxy`.
"""

from pathlib import Path

import anthropic
import openai

from sim import stack

#: A key-shaped fake secret given to the secondary entries; it must never show up in a log or header.
FAKE_PROVIDER_KEY = "sk-relaytest-FAKEKEY-0123456789abcdefABCDEF"


def relay_test_models(sim_url: str) -> list[dict]:
    """The models every test proxy serves: primaries on the simulated Ollama, secondaries on the
    simulated OpenAI and Anthropic APIs, and one primary per mode through a ``relay:`` block."""
    ollama = lambda name, relay=None: stack.model_entry(name, "ollama_chat/llama3", sim_url, relay)  # noqa: E731
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
        stack.model_entry("mock-window", "openai/gpt-4o-mini", sim_url + "/v1", {"mode": "guard", "stream_guard": "window"},
                    mock_response=WINDOW_ANSWER),
        stack.model_entry("llama-generate", "ollama/llama3", sim_url),
        stack.model_entry("llama-embed", "openai/text-embedding-3-small", sim_url + "/v1", mock_response=[0.25, 0.5]),
        stack.model_entry("openai-primary", "openai/gpt-4o-mini", sim_url + "/v1", api_key=FAKE_PROVIDER_KEY),
        stack.model_entry("unrelayed", "ollama_chat/llama3", sim_url),
        stack.model_entry("sec", "openai/gpt-4o-mini", sim_url + "/v1", api_key=FAKE_PROVIDER_KEY),
        stack.model_entry("sec-claude", "anthropic/claude-haiku-4-5-20251001", sim_url, api_key=FAKE_PROVIDER_KEY),
        stack.model_entry("premium", "openai/gpt-4o", sim_url + "/v1", api_key=FAKE_PROVIDER_KEY),
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

    def stop(self) -> None:
        """Stop the proxy and close the clients' connections to it."""
        self.proxy.stop()
        self.openai.close()
        self.anthropic.close()


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
    config = stack.write_config(directory, model_list or relay_test_models(sim_url))
    proxy = stack.start_proxy(config, env, port=port, workdir=directory)
    try:
        return ProxyHandle(proxy)
    except Exception:
        proxy.stop()  # never leave a proxy running that no fixture will stop
        raise
