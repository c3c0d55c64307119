"""The relay against each provider's wire format, replayed from recorded cassettes.

For every provider (OpenAI, Azure OpenAI, Anthropic, Ollama, Gemini, Bedrock Converse, Mistral) and
every case (plain refine answer, streamed answer, guard verdict in strict JSON asked for in the prompt and
as structured output, 429/5xx error), the
relay's secondary call goes through litellm to the provider's real URL and is answered from
``cassettes/<provider>/<case>.yaml``. The expected text, tokens and cost are read from the
cassette in the provider's own format (tests/cassette_support.py) and litellm's price map; nothing
is hard-coded. How cassettes are made and refreshed: cassettes/README.md.

Replay only: vcr runs with record_mode "none" (an unrecorded request raises instead of going out,
and a missing cassette is never written), matching on method, URL, query and JSON body; and a
network guard refuses every non-loopback name lookup and connection during these tests.
"""

import contextlib
import json
import socket

import pytest
import yaml

import relay_plugin
from tests import cassette_support as cs

NAMES = list(cs.PROVIDERS)
RECORD_HINT = "if the change is intended, re-record: make record PROVIDER={name}"


# =================================================================================================
# Isolation: no network, replay only
# =================================================================================================


def _is_loopback(host) -> bool:
    return host in (None, "localhost", "127.0.0.1", "::1", b"localhost") or str(host).startswith("127.")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Refuse every non-loopback DNS lookup and connection; the test fails if one was attempted."""
    attempts: list[str] = []
    real_getaddrinfo, real_connect, real_connect_ex = socket.getaddrinfo, socket.socket.connect, socket.socket.connect_ex

    def refuse(what: str) -> OSError:
        attempts.append(what)
        return OSError(f"network access refused in cassette tests: {what}")

    def getaddrinfo(host, *args, **kwargs):
        if not _is_loopback(host):
            raise refuse(f"lookup {host}")
        return real_getaddrinfo(host, *args, **kwargs)

    def guarded(real):
        def connect(sock, address):
            if sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address[0]):
                raise refuse(f"connect {address[0]}")
            return real(sock, address)

        return connect

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", guarded(real_connect))
    monkeypatch.setattr(socket.socket, "connect_ex", guarded(real_connect_ex))
    yield attempts
    assert not attempts, f"a cassette test tried to reach the network: {attempts}"


@contextlib.contextmanager
def replaying(provider: cs.Provider, case: str):
    """Placeholder credentials, no base URL overrides, the cassette in replay-only mode."""
    path = cs.cassette_path(provider.name, case)
    assert path.exists(), f"missing cassette {path}; record it: make record PROVIDER={provider.name}"
    cs.MISMATCHES.clear()
    with cs.scoped_env(cs.replay_env(provider)):
        with cs.make_vcr("none").use_cassette(str(path.relative_to(cs.CASSETTES))) as cassette:
            yield cassette
    difference = f"; the relay's request differs: {cs.MISMATCHES[-1]}" if cs.MISMATCHES else ""
    assert cassette.all_played, (f"{path}: {cassette.play_count} of {len(cassette)} recorded exchanges were "
                                 f"replayed{difference}; {RECORD_HINT.format(name=provider.name)}")


def explain(run: cs.RelayRun, name: str) -> str:
    reason = getattr(run.outcome, "reason", "") or run.headers.get("x-relay-reason", "")
    return f"outcome {run.headers.get('x-relay-outcome')!r}, reason: {reason!r} ({RECORD_HINT.format(name=name)})"


def priced(provider: cs.Provider, reply: cs.WireReply) -> float:
    """The expected cost; non-zero for every provider that charges, so the comparison means something."""
    cost = cs.expected_cost(provider, reply)
    assert cost > 0 or provider.name == "ollama", f"{provider.price_key} should have a price"
    return cost


# =================================================================================================
# The provider x case matrix
# =================================================================================================


@pytest.mark.parametrize("name", NAMES)
async def test_refine_gives_the_client_the_providers_answer_and_charges_its_usage(name):
    provider = cs.PROVIDERS[name]
    wire = cs.wire_reply(provider, cs.cassette_path(name, "plain"))
    with replaying(provider, "plain"):
        run = await cs.run_relay(provider, "plain")

    assert run.headers["x-relay-outcome"] == "modified", explain(run, name)
    assert run.text == wire.text
    assert run.response.choices[0].finish_reason == "stop"
    assert run.headers["x-relay-secondary-model"] == provider.model
    assert run.cost == pytest.approx(priced(provider, wire), abs=1e-8)
    assert wire.request["headers"]["x-relay-depth"] == ["1"]  # the recursion guard reached the provider


@pytest.mark.parametrize("name", NAMES)
async def test_a_streamed_answer_reassembles_to_the_providers_text_usage_and_cost(name):
    # The relay streams a secondary only for streaming clients, through this same litellm streaming call:
    # priced the way the relay prices a secondary answer (relay_plugin._cost_of).
    provider = cs.PROVIDERS[name]
    wire = cs.wire_reply(provider, cs.cassette_path(name, "stream"))
    with replaying(provider, "stream"):
        run = await cs.run_stream(provider)

    assert run.chunks > 1
    assert run.text == wire.text
    assert (run.prompt_tokens, run.completion_tokens) == (wire.input_tokens, wire.output_tokens)
    assert run.cost == pytest.approx(priced(provider, wire), abs=1e-8)


def assert_blocked(run, name: str, reason: str, cost: float) -> None:
    """The guard's block as the client sees it: the refusal, content_filter, the judge's reason, its cost."""
    assert run.headers["x-relay-outcome"] == "blocked", explain(run, name)
    assert run.text == relay_plugin.DEFAULT_GUARD_MESSAGE
    assert run.response.choices[0].finish_reason == "content_filter"
    assert run.outcome.reason == reason
    assert run.cost == pytest.approx(cost, abs=1e-8)


@pytest.mark.parametrize("name", NAMES)
async def test_guard_blocks_the_answer_on_the_providers_strict_json_verdict(name):
    provider = cs.PROVIDERS[name]
    wire = cs.wire_reply(provider, cs.cassette_path(name, "judge"))
    verdict, reason = relay_plugin.parse_verdict(wire.text)
    assert verdict == "block", f"the recorded judge said {verdict!r}; the judge case needs a block"
    with replaying(provider, "judge"):
        run = await cs.run_relay(provider, "judge")

    assert_blocked(run, name, reason, priced(provider, wire))


@pytest.mark.parametrize("name", NAMES)
async def test_guard_asks_for_the_verdict_schema_in_the_providers_own_shape_and_blocks_on_it(name):
    # RELAY_JUDGE_FORMAT=schema: litellm turns the relay's response_format into each provider's
    # structured output (OpenAI/Azure/Mistral json_schema, Anthropic output_format, Gemini
    # response_json_schema, Bedrock a forced tool, Ollama format); the verdict is parsed as strictly.
    provider = cs.PROVIDERS[name]
    wire = cs.wire_reply(provider, cs.cassette_path(name, "judge_schema"))
    asked = cs.requested_schema(provider, json.loads(wire.request["body"]))
    assert asked is not None, f"{name}: the recorded judge request asks for no structured output"
    assert asked["properties"] == relay_plugin.VERDICT_SCHEMA["properties"]
    assert asked["required"] == relay_plugin.VERDICT_SCHEMA["required"]
    prompt_only = json.loads(cs.load_interactions(cs.cassette_path(name, "judge"))[0]["request"]["body"])
    assert cs.requested_schema(provider, prompt_only) is None  # RELAY_JUDGE_FORMAT=prompt asks for none
    verdict, reason = relay_plugin.parse_verdict(wire.text)
    assert verdict == "block", f"the recorded judge said {verdict!r}; the judge_schema case needs a block"
    with replaying(provider, "judge_schema"):
        run = await cs.run_relay(provider, "judge_schema")

    assert_blocked(run, name, reason, priced(provider, wire))


@pytest.mark.parametrize("name", NAMES)
async def test_a_provider_error_leaves_the_primary_answer_and_names_the_failure(name):
    provider = cs.PROVIDERS[name]
    exchanges = cs.load_interactions(cs.cassette_path(name, "error"))
    statuses = {e["response"]["status"]["code"] for e in exchanges}
    assert statuses == {provider.error_status}
    with replaying(provider, "error"):
        run = await cs.run_relay(provider, "error")

    wanted = "failed:rate_limited" if provider.error_status == 429 else "failed:provider_error"
    assert run.headers["x-relay-outcome"] == wanted, explain(run, name)
    assert run.text == cs.relay_case(provider, "error").primary_answer
    assert run.response.choices[0].finish_reason == "stop"
    assert run.cost == 0.0
    assert len(run.slept) == len(exchanges) - 1, f"backoffs {run.slept} between {len(exchanges)} recorded attempts"
    retry_after = [float(v) for e in exchanges for k, vs in e["response"]["headers"].items()
                   if k.lower() == "retry-after" for v in vs]
    if provider.error_status == 429 and retry_after:  # the provider's Retry-After, as litellm passes it on
        assert run.slept[0] >= retry_after[0]


# =================================================================================================
# The cassettes themselves
# =================================================================================================


def test_every_provider_has_a_cassette_for_every_case_and_a_recorded_origin():
    manifest = cs.read_manifest()
    for name in NAMES:
        for case in cs.CASES:
            assert cs.cassette_path(name, case).exists(), f"missing {name}/{case}: make record PROVIDER={name}"
            assert manifest[name][case]["origin"] in ("emulator", "real"), f"{name}/{case}"
    matrix = {cs.cassette_path(n, c) for n in NAMES for c in cs.CASES}
    assert set(cs.CASSETTES.rglob("*.yaml")) == matrix, "a cassette outside the provider x case matrix"


def _scannable_text(path) -> str:
    """A file's text, plus, for a cassette, every body decoded (binary bodies are base64 in YAML)."""
    text = path.read_text(errors="replace")
    if path.suffix == ".yaml":
        for exchange in yaml.safe_load(text).get("interactions") or []:
            for part in (exchange["request"], exchange["response"]):
                body = part.get("body")
                body = body.get("string") if isinstance(body, dict) else body
                if isinstance(body, bytes):
                    text += "\n" + body.decode("utf-8", "replace")
    return text


def test_no_file_under_cassettes_holds_a_key_shaped_string():
    files = [p for p in cs.CASSETTES.rglob("*") if p.is_file()]
    assert len(files) >= len(NAMES) * len(cs.CASES)
    leaks = {str(p.relative_to(cs.ROOT)): cs.find_secrets(_scannable_text(p)) for p in files}
    assert not {path: found for path, found in leaks.items() if found}


@pytest.mark.parametrize("sample", [
    "Authorization: Bearer sk-proj-abcdefghijklmnop0123456789",
    "x-api-key: sk-ant-api03-abcdefghijklmnopqrstuvwxyz",
    "    api-key:\n    - 0123456789abcdef0123456789abcdef",
    "https://generativelanguage.googleapis.com/v1beta/models/m:generateContent?key=AIzaSyA1234567890abcdefghijklmnopqrstu",
    "      x-goog-api-key:\n      - anything",
    "Credential=AKIAIOSFODNN7EXAMPLE/20250101/us-east-1/bedrock/aws4_request",
    "SignedHeaders=host;x-amz-date, Signature=0123456789abcdef0123456789abcdef",
    "X-Amz-Security-Token: FwoGZXIvYXdzEJr",
    "aws_access_key_id = ASIAY34FZKBOKMUTVV7A",
    "      set-cookie:\n      - __cf_bm=abc",
    "      x-request-id:\n      - req_123",
    *cs.placeholder_values(),
])
def test_the_secret_scan_recognises_each_kind_of_credential(sample):
    assert cs.find_secrets(sample)


def test_the_secret_scan_passes_a_scrubbed_exchange():
    clean = cs.cassette_path("openai", "plain").read_text()
    assert "content-type" in clean and not cs.find_secrets(clean)


def test_recording_scrubs_credentials_cookies_and_request_ids():
    from vcr.request import Request

    headers = {"Authorization": "Bearer sk-relay-leak-0123456789abcdef", "api-key": "azure-leak",
               "x-api-key": "sk-ant-leak-0123456789abcdef", "x-goog-api-key": "AIzaLeak",
               "X-Amz-Security-Token": "token-leak", "X-Amz-Date": "20250101T000000Z", "Cookie": "session=leak",
               "Content-Type": "application/json", "x-relay-depth": "1"}
    request = Request("POST", "http://127.0.0.1:5555/v1beta/models/m:generateContent?key=AIzaLeak&alt=sse",
                      b"{}", headers)
    scrubbed = cs.scrub_request({"http://127.0.0.1:5555": "https://generativelanguage.googleapis.com"})(request)
    assert scrubbed.uri == "https://generativelanguage.googleapis.com/v1beta/models/m:generateContent?alt=sse"
    assert {k.lower() for k in scrubbed.headers} == {"content-type", "x-relay-depth"}

    response = {"status": {"code": 429, "message": ""}, "body": {"string": b'{"request_id": "req_011Cleak"}'},
                "headers": {"set-cookie": ["a=b"], "request-id": ["req_1"], "x-amzn-RequestId": ["1"],
                            "apim-request-id": ["1"], "retry-after": ["1"]}}
    scrubbed_response = cs.scrub_response(response)
    assert set(scrubbed_response["headers"]) == {"retry-after"}
    assert b"leak" not in scrubbed_response["body"]["string"]


async def test_a_request_the_cassette_does_not_hold_is_refused_not_sent(monkeypatch, no_network):
    provider = cs.PROVIDERS["openai"]
    monkeypatch.setattr(cs, "NONCE", "0123456789abcdef")  # the prompt body now differs from the recording
    path = cs.cassette_path("openai", "plain")
    with cs.scoped_env(cs.replay_env(provider)):
        with cs.make_vcr("none").use_cassette(str(path.relative_to(cs.CASSETTES))) as cassette:
            run = await cs.run_relay(provider, "plain")

    # vcr raised instead of sending; litellm reports that as a connection failure, the relay fails open
    assert run.headers["x-relay-outcome"] == "failed:connection", explain(run, "openai")
    assert run.text == cs.relay_case(provider, "plain").primary_answer
    assert cassette.play_count == 0 and len(cassette) == 1  # nothing played, nothing recorded
    assert no_network == []


async def test_a_missing_cassette_fails_and_is_not_written(tmp_path):
    provider = cs.PROVIDERS["openai"]
    with cs.scoped_env(cs.replay_env(provider)):
        with cs.make_vcr("none", library=tmp_path).use_cassette("openai/plain.yaml"):
            run = await cs.run_relay(provider, "plain")

    assert run.headers["x-relay-outcome"].startswith("failed:")
    assert not (tmp_path / "openai" / "plain.yaml").exists()
