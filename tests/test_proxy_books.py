"""The relay in the operator's own books, through real proxies: LiteLLM's spend rows, key and team
budgets, the proxy's /metrics, OTel traces, and the Grafana dashboard's queries.

LiteLLM's database cannot run here, so each proxy lists ``tests/proxy_callbacks/litellm_books.py``
first (a stub database client, seeded virtual keys, only the final spend write replaced by a
recorder) and ``payload_log.py`` last (every standard logging payload); see those files.
"""

import json
import re
import shutil
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from sim import stack
from tests.proxy_support import BASE_RELAY_ENV, relay_test_models

pytestmark = pytest.mark.proxy

ROOT = Path(__file__).resolve().parent.parent
CALLBACKS = Path(__file__).resolve().parent / "proxy_callbacks"
DASHBOARD = ROOT / "docs" / "grafana-relay.json"

RICH_KEY, TEAM = "sk-books-rich-0001", "team-books"
SPENDER_KEY = "sk-books-spender-0001"  #: a budget a few relayed requests spend
#: above one secondary call's worst case (about 0.00013 USD here: the prompt bound is its UTF-8 size)
SPENDER_BUDGET = 0.0003
POOR_KEY = "sk-books-poor-0001"  #: a budget below one secondary call's worst case
POOR_TEAM_KEY, POOR_TEAM = "sk-books-poorteam-0001", "team-poor"  #: the team, not the key, is short
KEYS = [
    {"key": RICH_KEY, "max_budget": 100.0, "team_id": TEAM, "alias": "rich"},
    {"key": SPENDER_KEY, "max_budget": SPENDER_BUDGET},
    {"key": POOR_KEY, "max_budget": 0.00001},
    {"key": POOR_TEAM_KEY, "team_id": POOR_TEAM, "team_max_budget": 0.00001},
]
#: what the relay's requests in the book tests ask for: a priced primary (the simulator's gpt-4o-mini)
PRIMARY = "openai-primary"


class BooksProxy:
    """A proxy with the relay between the books stub and the payload recorder."""

    def __init__(self, workdir: Path, name: str, sim_url: str, env: dict, callbacks=(), args=()):
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        for module in ("litellm_books.py", "payload_log.py"):
            shutil.copy(CALLBACKS / module, self.dir / module)
        self.rows_path, self.payloads_path = self.dir / "rows.jsonl", self.dir / "payloads.jsonl"
        config = {
            "model_list": relay_test_models(sim_url),
            "litellm_settings": {"callbacks": ["litellm_books.instance", "relay_plugin.proxy_handler_instance",
                                               "payload_log.instance", *callbacks], "drop_params": True},
            "general_settings": {"master_key": "os.environ/LITELLM_MASTER_KEY"},
        }
        (self.dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        self.proxy = stack.start_proxy(self.dir / "config.yaml", timeout=240, env={
            **BASE_RELAY_ENV, "BOOKS_ROWS": str(self.rows_path), "PAYLOAD_LOG": str(self.payloads_path),
            "BOOKS_KEYS": json.dumps(KEYS), **env}, workdir=self.dir, args=tuple(args))
        self.url = self.proxy.url
        self.clients: dict[str, openai.OpenAI] = {}  #: one per key, closed by stop()

    def client(self, key: str) -> openai.OpenAI:
        if key not in self.clients:
            self.clients[key] = openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)
        return self.clients[key]

    def chat(self, key: str, model: str, content: str, **kwargs):
        return self.client(key).chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": content}], **kwargs)

    def rows(self, token: str) -> list[dict]:
        """Spend rows of the calls whose prompt carried ``token`` (a secondary's prompt quotes the
        conversation). Rows keep no prompt, so they are matched to logged payloads by call id."""
        calls = {
            p["payload"].get("litellm_call_id") for p in self.payloads() if token in json.dumps(p["payload"].get("messages"))
        }
        return [r for r in _jsonl(self.rows_path) if r.get("litellm_call_id") in calls]

    def payloads(self) -> list[dict]:
        return _jsonl(self.payloads_path)

    def metrics(self) -> str:
        response = httpx.get(self.url + "/metrics/", headers={"Authorization": f"Bearer {self.proxy.master_key}"}, timeout=30)
        response.raise_for_status()
        return response.text

    def stop(self) -> None:
        self.proxy.stop()
        for client in self.clients.values():
            client.close()


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def wait_for(check, timeout: float = 15.0):
    """Spend rows and payloads are written by LiteLLM's logging after the response: poll for them."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def wait_for_at_least(count: int, collect, timeout: float = 15.0) -> list:
    """``collect()`` once it holds ``count`` items (or what it holds at the timeout)."""
    found = []
    wait_for(lambda: len(found.__setitem__(slice(None), collect()) or found) >= count, timeout)
    return found


def metadata_of(row: dict) -> dict:
    metadata = row.get("metadata")
    return json.loads(metadata) if isinstance(metadata, str) else (metadata or {})


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """``{(name, labels): value}`` of a Prometheus text exposition."""
    found = {}
    for line in text.splitlines():
        match = re.match(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$", line)
        if match:
            labels = frozenset(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
            found[(match.group(1), labels)] = float(match.group(3))
    return found


def value(text: str, name: str, **labels) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples(text).items() if n == name and wanted <= set(ls))


@pytest.fixture(scope="module")
def caller_books(workdir, sim):
    """RELAY_SPEND_ATTRIBUTION=caller (the default), with LiteLLM's Prometheus and OTel (console) callbacks."""
    proxy = BooksProxy(workdir, "books-caller", sim.url, {"RELAY_CACHE_TTL_S": "60", "LITELLM_OTEL_V2": "true",
                                                          "OTEL_EXPORTER": "console"}, callbacks=["prometheus", "otel"])
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def none_books(workdir, sim):
    proxy = BooksProxy(workdir, "books-none", sim.url, {"RELAY_SPEND_ATTRIBUTION": "none", "LITELLM_OTEL_V2": "true",
                                                        "OTEL_EXPORTER": "console"}, callbacks=["prometheus", "otel"])
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def budget_books(workdir, sim):
    """Small secondary outputs, so a few relayed requests spend SPENDER_KEY's budget."""
    proxy = BooksProxy(workdir, "books-budget", sim.url, {"RELAY_SECONDARY_MAX_TOKENS": "16"})
    yield proxy
    proxy.stop()


# ----- 1. spend attribution -------------------------------------------------------------------------


def test_each_secondary_call_is_one_spend_row_of_the_calling_key_and_team_under_the_secondary_model(caller_books, token):
    headers = []
    for i in range(3):
        raw = caller_books.chat(RICH_KEY, PRIMARY, f"Question {i} {token}")
        assert raw.headers["x-relay-outcome"] == "modified"
        headers.append(raw.headers)
    rows = wait_for_at_least(6, lambda: caller_books.rows(token))
    assert rows and len(rows) == 6, rows  # one primary and one secondary row per request, nothing more
    relay_rows = [r for r in rows if metadata_of(r).get("internal_call_origin") == "relay"]
    primary_rows = [r for r in rows if r not in relay_rows]
    assert len(relay_rows) == 3 and len(primary_rows) == 3
    key_hash = primary_rows[0]["api_key"]
    for row in relay_rows:
        assert row["model_group"] == "sec"
        assert row["api_key"] == key_hash and row["team_id"] == TEAM
        assert metadata_of(row)["user_api_key_alias"] == "rich"
        assert "user_api_key_budget_reservation" not in json.dumps(row)
    # each secondary row sits in its request's session (the pinned trace id)
    assert {r["session_id"] for r in relay_rows} == {r["session_id"] for r in primary_rows}
    assert len({r["session_id"] for r in relay_rows}) == 3
    assert sum(r["spend"] for r in relay_rows) == pytest.approx(sum(float(h["x-relay-cost-usd"]) for h in headers), abs=3e-8)
    assert all(r["spend"] > 0 for r in relay_rows)


def test_streamed_and_shadow_secondary_calls_are_booked_too(caller_books, sim, token):
    stream = caller_books.client(RICH_KEY).chat.completions.create(
        model="llama", messages=[{"role": "user", "content": f"Stream {token}"}], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    caller_books.chat(RICH_KEY, "llama-shadow", f"Shadow {token}")
    rows = wait_for_at_least(
        2, lambda: [x for x in caller_books.rows(token) if metadata_of(x).get("internal_call_origin") == "relay"]
    )
    assert rows and len(rows) == 2, rows
    assert {r["model_group"] for r in rows} == {"sec"} and {r["team_id"] for r in rows} == {TEAM}


def test_a_client_that_leaves_a_stream_mid_secondary_answer_has_not_had_it_for_free(caller_books, sim, token):
    """Refine streams the secondary's answer as it arrives. A client that reads most of it, then leaves,
    has had the text, and the provider bills what it generated: the secondary call must be booked to the
    calling key, not dropped with the cancelled call (repeated, every refined answer would be free)."""
    answer = " ".join(f"word{i}" for i in range(40))
    sim.configure(model_config={"gpt-4o-mini": {"tokens_per_s": 20}})  # the secondary (sec) streams for 2 s
    received = ""
    try:
        with caller_books.client(RICH_KEY).chat.completions.create(
                model="llama", messages=[{"role": "user", "content": f"Leave {token} SIM:ANSWER={answer}"}],
                stream=True) as stream:
            for chunk in stream:
                received += "".join(c.delta.content or "" for c in chunk.choices)
                if len(received.split()) >= 20:
                    break  # half the refined answer read: the client leaves
    finally:
        sim.configure(model_config={})
    assert received.split()[:20] == answer.split()[:20]  # the secondary's text reached the client
    secondary = wait_for(lambda: [r for r in sim.requests(token) if r["model"] == "gpt-4o-mini" and r["cancelled"]])
    assert len(secondary) == 1  # the provider was cut off mid-answer (it bills what it generated)
    relay_rows = wait_for(lambda: [r for r in caller_books.rows(token)
                                   if metadata_of(r).get("internal_call_origin") == "relay"])
    assert len(relay_rows) == 1 and relay_rows[0]["spend"] > 0, relay_rows


def test_no_spend_row_and_no_payload_for_a_secondary_call_with_attribution_none(none_books, sim, token):
    raw = none_books.chat(RICH_KEY, PRIMARY, f"Question {token}")
    assert raw.headers["x-relay-outcome"] == "modified"
    assert [r for r in sim.requests(token) if r["model"] == "gpt-4o-mini" and "draft answer" in json.dumps(r["body"])]
    rows = wait_for(lambda: none_books.rows(token))
    time.sleep(1.0)  # a secondary row, if any, would have been written by now
    rows = none_books.rows(token)
    assert len(rows) == 1 and metadata_of(rows[0]).get("internal_call_origin") is None
    assert not [p for p in none_books.payloads() if p["payload"].get("model_group") == "sec"]


def test_the_relay_never_relays_its_own_attributed_calls(caller_books, sim, token):
    """Caller mode drops `no-log` and copies the caller's metadata: the secondary call must still be
    made exactly once and never relayed again (no request outcome for it, one row)."""
    before = value(caller_books.metrics(), "relay_requests_total")
    for i in range(2):
        assert caller_books.chat(RICH_KEY, PRIMARY, f"Once {i} {token}").headers["x-relay-outcome"] == "modified"
    secondary_requests = [r for r in sim.requests(token) if "draft answer" in json.dumps(r["body"])]
    assert len(secondary_requests) == 2
    rows = wait_for_at_least(4, lambda: caller_books.rows(token))
    assert len(rows) == 4
    assert value(caller_books.metrics(), "relay_requests_total") - before == 2
    assert "skipped:internal" not in caller_books.proxy.log_text()


# ----- key and team budgets ----------------------------------------------------------------------------


def test_relay_spend_counts_toward_the_key_budget_until_litellm_refuses_the_key(budget_books, token):
    outcomes, refused, primary_spend, relay_spend = [], None, 0.0, 0.0
    for i in range(25):
        # a short answer fits RELAY_SECONDARY_MAX_TOKENS=16: a cut one would never replace the primary. Once
        # the relay stops (the key cannot cover another call's worst case), primaries that bill 100 output
        # tokens close the rest of the gap in a few requests
        usage = " SIM:USAGE=100" if "skipped:key_budget" in outcomes else ""
        try:
            raw = budget_books.chat(SPENDER_KEY, PRIMARY,
                                    f"Spend {i} {token} SIM:ANSWER=A short refined answer.{usage}")
        except openai.APIStatusError as exc:
            refused = exc
            break
        assert raw.status_code == 200 and raw.parse().choices[0].message.content
        outcomes.append(raw.headers["x-relay-outcome"])
        primary_spend += float(raw.headers["x-litellm-response-cost"])
        relay_spend += float(raw.headers["x-relay-cost-usd"])
        time.sleep(0.3)  # LiteLLM books each request's spend after the response
    assert refused is not None, outcomes
    assert "budget" in str(refused).lower() and refused.status_code in (400, 422, 429)
    # the first requests were relayed (the refiner may keep the short answer as it is), later ones not
    assert outcomes[0] in ("modified", "relayed") and "skipped:key_budget" in outcomes, outcomes
    # the primaries alone never reached the budget: with the relay's spend in the key's books they did
    assert primary_spend < SPENDER_BUDGET <= primary_spend + relay_spend + 1e-12, (primary_spend, relay_spend)


def test_a_key_whose_budget_cannot_cover_a_secondary_call_keeps_the_primary_answer(budget_books, sim, token):
    raw = budget_books.chat(POOR_KEY, "llama", f"Poor {token}")
    assert raw.status_code == 200
    assert raw.headers["x-relay-outcome"] == "skipped:key_budget"
    assert raw.parse().choices[0].message.content == f"llama3 says: Poor {token}"
    assert "key budget" in raw.headers["x-relay-reason"]
    assert not [r for r in sim.requests(token) if "draft answer" in json.dumps(r["body"])]


def test_a_team_budget_that_cannot_cover_a_secondary_call_skips_it_too(budget_books, sim, token):
    raw = budget_books.chat(POOR_TEAM_KEY, "llama", f"Team {token}")
    assert raw.status_code == 200
    assert raw.headers["x-relay-outcome"] == "skipped:key_budget"
    assert "team budget" in raw.headers["x-relay-reason"]


def test_fail_closed_answers_503_when_the_key_budget_refuses_the_secondary(budget_books, token):
    with pytest.raises(openai.APIStatusError) as refused:
        budget_books.chat(POOR_KEY, "llama-closed", f"Closed {token}")
    assert refused.value.status_code == 503
    assert refused.value.response.headers["x-relay-outcome"] == "skipped:key_budget"


# ----- 2. Prometheus metrics ---------------------------------------------------------------------------

METRICS = ("relay_requests_total", "relay_secondary_calls_total", "relay_secondary_cost_usd_total",
           "relay_secondary_tokens_total", "relay_added_latency_seconds_bucket", "relay_secondary_latency_seconds_bucket",
           "relay_breaker_state", "relay_budget_refusals_total", "relay_cache_requests_total", "relay_shadow_in_flight")


def test_the_proxys_metrics_count_the_relays_traffic(caller_books, token):
    before = caller_books.metrics()
    costs = 0.0
    for i in range(2):
        raw = caller_books.chat(RICH_KEY, "llama-guard", f"Guard {i} {token}")
        assert raw.headers["x-relay-outcome"] == "relayed"
        costs += float(raw.headers["x-relay-cost-usd"])
    assert caller_books.chat(RICH_KEY, "llama-guard", f"Guard 0 {token}").headers["x-relay-cache"] == "hit"
    assert caller_books.chat(RICH_KEY, "unrelayed", f"Plain {token}").headers["x-relay-outcome"] == "skipped:not_applied"
    after = caller_books.metrics()

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("relay_requests_total", mode="guard", outcome="relayed", reason="", requested_model="llama-guard") == 3
    assert delta("relay_requests_total", outcome="skipped", reason="not_applied", requested_model="unrelayed") == 1
    assert delta("relay_secondary_calls_total", secondary_model="sec", result="ok") == 2  # the third was a cache hit
    assert delta("relay_secondary_cost_usd_total", secondary_model="sec", mode="guard") == pytest.approx(costs, abs=3e-8)
    assert delta("relay_secondary_tokens_total", secondary_model="sec", token_type="prompt") > 0
    assert delta("relay_secondary_tokens_total", secondary_model="sec", token_type="completion") > 0
    assert delta("relay_added_latency_seconds_count", mode="guard") == 3
    assert delta("relay_secondary_latency_seconds_count", secondary_model="sec") == 2
    assert delta("relay_cache_requests_total", result="miss") == 2 and delta("relay_cache_requests_total", result="hit") == 1
    assert value(after, "relay_breaker_state", secondary_model="sec") == 0
    assert value(after, "relay_shadow_in_flight") == 0
    assert all(name in {n for n, _ in samples(after)} for name in METRICS if name != "relay_budget_refusals_total")
    # no relay label carries a key, a team, a user or a request id
    relay_lines = "\n".join(line for line in after.splitlines() if line.startswith("relay_"))
    assert not re.search(r"sk-|[0-9a-f]{32}|team-|tok[0-9a-f]{12}", relay_lines)


def test_budget_refusals_are_counted_by_scope(caller_books, token):
    before = value(caller_books.metrics(), "relay_budget_refusals_total", scope="key")
    assert caller_books.chat(POOR_KEY, "llama", f"Poor {token}").headers["x-relay-outcome"] == "skipped:key_budget"
    assert caller_books.chat(POOR_TEAM_KEY, "llama", f"Team {token}").headers["x-relay-outcome"] == "skipped:key_budget"
    after = caller_books.metrics()
    assert value(after, "relay_budget_refusals_total", scope="key") - before == 1
    assert value(after, "relay_budget_refusals_total", scope="team") >= 1


def test_metrics_are_served_from_the_per_process_files_in_multiprocess_mode(workdir, sim, token, tmp_path):
    """With PROMETHEUS_MULTIPROC_DIR, LiteLLM's /metrics aggregates the files every worker writes;
    the relay's samples must go through those files (gauges with a multiprocess mode) too."""
    multiproc = tmp_path / "prometheus"
    multiproc.mkdir()
    proxy = BooksProxy(workdir, "books-multiproc", sim.url, {"PROMETHEUS_MULTIPROC_DIR": str(multiproc)},
                       callbacks=["prometheus"])
    try:
        for i in range(3):
            assert proxy.chat(RICH_KEY, "llama-guard", f"Workers {i} {token}").headers["x-relay-outcome"] == "relayed"
        text = proxy.metrics()
        assert value(text, "relay_requests_total", mode="guard", requested_model="llama-guard") == 3
        assert value(text, "relay_secondary_calls_total", secondary_model="sec", result="ok") == 3
        assert value(text, "relay_breaker_state", secondary_model="sec") == 0
        assert "relay_shadow_in_flight" in text
        assert list(multiproc.glob("counter_*.db")) and list(multiproc.glob("gauge_livemax_*.db"))
    finally:
        proxy.stop()


# ----- 3. traces -----------------------------------------------------------------------------------


def console_spans(log: str) -> list[dict]:
    """Spans the OTel SDK's console exporter printed into the proxy log (one JSON object each)."""
    decoder, spans, at = json.JSONDecoder(), [], 0
    while (at := log.find('{\n    "name"', at)) >= 0:
        try:
            span, length = decoder.raw_decode(log[at:])
            spans.append(span)
            at += length
        except ValueError:
            at += 1
    return spans


def test_the_secondary_calls_span_is_in_the_requests_trace_with_its_cost(caller_books, token):
    raw = caller_books.chat(RICH_KEY, PRIMARY, f"Trace {token}")
    cost = float(raw.headers["x-relay-cost-usd"])
    spans = wait_for(lambda: [s for s in console_spans(caller_books.proxy.log_text()) if s["name"] == "chat sec"
                              and s["attributes"].get("litellm.cost.total") == pytest.approx(cost, abs=3e-8)])
    assert spans, "no `chat sec` span with the relay's cost"
    trace_id = spans[-1]["context"]["trace_id"]
    in_trace = {s["name"] for s in console_spans(caller_books.proxy.log_text()) if s["context"]["trace_id"] == trace_id}
    assert "POST /v1/chat/completions" in in_trace and f"chat {PRIMARY}" in in_trace
    # and every logging callback sees the primary and the secondary under one LiteLLM trace id
    payloads = [p["payload"] for p in caller_books.payloads() if token in json.dumps(p["payload"].get("messages"))]
    assert {p["model_group"] for p in payloads} >= {PRIMARY, "sec"}
    assert len({p["trace_id"] for p in payloads}) == 1


def test_with_attribution_none_the_secondary_has_no_span(none_books, token):
    none_books.chat(RICH_KEY, PRIMARY, f"Trace {token}")
    primary = wait_for(lambda: [s for s in console_spans(none_books.proxy.log_text()) if s["name"] == f"chat {PRIMARY}"])
    assert primary
    assert not [s for s in console_spans(none_books.proxy.log_text()) if s["name"] == "chat sec"]


# ----- 4. the dashboard --------------------------------------------------------------------------------


def dashboard_metrics() -> set[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert exprs
    return {m for e in exprs for m in re.findall(r"\b(relay_[a-z_]+)", e)}


def test_every_metric_the_dashboard_queries_is_on_a_real_proxys_metrics(caller_books, token):
    caller_books.chat(RICH_KEY, "llama-guard", f"Dashboard {token}")
    caller_books.chat(POOR_KEY, "llama", f"Dashboard {token}")  # a budget refusal, so its counter has a sample
    exposed = {name for name, _ in samples(caller_books.metrics())}
    queried = dashboard_metrics()
    assert queried >= {"relay_requests_total", "relay_added_latency_seconds_bucket", "relay_secondary_cost_usd_total",
                       "relay_breaker_state", "relay_budget_refusals_total", "relay_cache_requests_total"}
    assert queried <= exposed, queried - exposed
