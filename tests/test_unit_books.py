"""The books in process: what a secondary call carries into LiteLLM's spend tracking, and the metrics'
registration. The end-to-end promises are in test_proxy_books.py, through real proxies."""

import importlib.util

import prometheus_client
import pytest

import relay_plugin
from relay_plugin import CallerBooks, ConfigError, RelayConfig, RelayMetrics

CALLER_METADATA = {
    "user_api_key": "hashed-key", "user_api_key_hash": "hashed-key", "user_api_key_alias": "alias",
    "user_api_key_team_id": "team-1", "user_api_key_org_id": "org-1", "user_api_key_user_id": "user-1",
    "user_api_key_end_user_id": "end-1", "user_api_key_spend": 0.5, "user_api_key_max_budget": 1.0,
    "user_api_key_budget_reservation": {"reserved_cost": 0.4, "entries": [], "finalized": False},
    "user_api_key_auth": {"budget_reservation": {"reserved_cost": 0.4}},
    "relay_internal": "forged-by-client",
}


def secondary_kwargs(attribution: str, data: dict) -> dict:
    """The kwargs `_litellm_complete` would send, after attribution, for a request ``data``."""
    kwargs = {"model": "sec", "metadata": {"relay_internal": True, "relay_depth": 1}, "no-log": True}
    config = RelayConfig.from_env({"RELAY_SECONDARY_MODEL": "sec", "RELAY_SPEND_ATTRIBUTION": attribution})
    with relay_plugin._caller_books(data, config, "refine"):
        relay_plugin._attribute_spend(kwargs)
    return kwargs


def test_caller_attribution_books_the_call_to_the_caller_without_its_budget_reservation():
    data = {"metadata": dict(CALLER_METADATA), "litellm_trace_id": "trace-1", "litellm_session_id": "session-1"}
    kwargs = secondary_kwargs("caller", data)
    assert "no-log" not in kwargs
    metadata = kwargs["metadata"]
    assert {k: metadata[k] for k in ("user_api_key_hash", "user_api_key_team_id", "user_api_key_org_id",
                                     "user_api_key_user_id", "user_api_key_end_user_id")} == {
        "user_api_key_hash": "hashed-key", "user_api_key_team_id": "team-1", "user_api_key_org_id": "org-1",
        "user_api_key_user_id": "user-1", "user_api_key_end_user_id": "end-1"}
    assert metadata["internal_call_origin"] == "relay"
    assert "user_api_key_budget_reservation" not in metadata and "user_api_key_auth" not in metadata
    assert metadata["relay_internal"] is True and metadata["relay_depth"] == 1  # the relay's own markers win
    assert kwargs["litellm_trace_id"] == "trace-1" and kwargs["litellm_session_id"] == "session-1"


def test_caller_attribution_reads_messages_and_responses_requests_from_litellm_metadata():
    data = {"metadata": {"user_api_key_hash": "client-said"}, "litellm_metadata": dict(CALLER_METADATA)}
    assert secondary_kwargs("caller", data)["metadata"]["user_api_key_hash"] == "hashed-key"


def test_attribution_none_leaves_the_call_out_of_the_books():
    kwargs = secondary_kwargs("none", {"metadata": dict(CALLER_METADATA), "litellm_trace_id": "trace-1"})
    assert kwargs == {"model": "sec", "metadata": {"relay_internal": True, "relay_depth": 1}, "no-log": True}


def test_a_call_outside_relay_work_is_never_attributed():
    kwargs = {"model": "sec", "metadata": {}, "no-log": True}
    relay_plugin._attribute_spend(kwargs)
    assert kwargs["no-log"] is True


def test_the_books_know_the_key_and_team_budgets_and_the_reservation_to_leave_out():
    data = {"metadata": {**CALLER_METADATA, "user_api_key_team_spend": 2.0, "user_api_key_team_max_budget": 3.0}}
    config = RelayConfig.from_env({"RELAY_SECONDARY_MODEL": "sec"})
    books = CallerBooks.of(data, config, "guard")
    assert books.budgets == (("key", "spend:key:hashed-key", 0.5, 1.0), ("team", "spend:team:team-1", 2.0, 3.0))
    assert books.reservation["reserved_cost"] == 0.4


async def test_the_live_spend_leaves_out_what_this_requests_reservation_holds(monkeypatch):
    class Proxy:
        @staticmethod
        async def get_current_spend(counter_key, fallback_spend):
            return {"spend:key:k": 0.9}[counter_key]

    monkeypatch.setitem(relay_plugin.sys.modules, "litellm.proxy.proxy_server", Proxy)
    held = {"finalized": False, "entries": [{"counter_key": "spend:key:k", "reserved_cost": 0.5, "applied_adjustment": 0.0}]}
    assert await relay_plugin._litellm_spend("spend:key:k", 0.1, held) == pytest.approx(0.4)
    assert await relay_plugin._litellm_spend("spend:key:k", 0.1, {**held, "finalized": True}) == pytest.approx(0.9)


def test_executing_the_module_again_reuses_the_registered_metrics(monkeypatch):
    monkeypatch.setenv("RELAY_SECONDARY_MODEL", "openai/unit-test-secondary")  # what the instance is built from
    first = RelayMetrics.shared()
    spec = importlib.util.spec_from_file_location("relay_plugin_again", relay_plugin.__file__)
    again = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(again)  # what a second `import relay_plugin` next to the proxy's load does
    assert again.RelayMetrics.shared() is first
    level, filters = relay_plugin.log.level, list(relay_plugin.log.filters)
    try:
        assert again.proxy_handler_instance.metrics is first  # built now: it sets the shared logger's level
    finally:
        relay_plugin.log.setLevel(level)
        relay_plugin.log.filters[:] = filters
    assert prometheus_client.REGISTRY.get_sample_value("relay_shadow_in_flight") is not None


def test_label_values_beyond_the_cap_are_reported_as_other():
    metrics = RelayMetrics.shared()
    for i in range(relay_plugin._LABEL_VALUES_MAX + 5):
        metrics.bounded("unit_test_label", f"model-{i}")
    assert metrics.bounded("unit_test_label", "model-0") == "model-0"
    assert metrics.bounded("unit_test_label", "a-new-model") == "other"


def test_metrics_on_without_prometheus_client_stops_the_start(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(relay_plugin.importlib.util, "find_spec",
                        lambda name, *a: None if name == "prometheus_client" else real(name, *a))
    with pytest.raises(ConfigError, match="RELAY_PROMETHEUS=on is invalid"):
        RelayConfig.from_env({"RELAY_SECONDARY_MODEL": "sec", "RELAY_PROMETHEUS": "on"})
    assert RelayConfig.from_env({"RELAY_SECONDARY_MODEL": "sec", "RELAY_PROMETHEUS": "auto"}).prometheus == "auto"


def test_metrics_off_registers_nothing_for_the_handler():
    handler = relay_plugin.RelayHandler(RelayConfig.from_env({"RELAY_SECONDARY_MODEL": "sec", "RELAY_PROMETHEUS": "off"}))
    assert handler.metrics is None and handler.complete is relay_plugin._litellm_complete
