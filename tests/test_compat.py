"""The LiteLLM version matrix: what the README claims is the last `make test-compat` run, the runner
fails when a line fails, and the plugin degrades by feature detection where an old proxy lacks a hook."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import relay_plugin
from scripts import compat
from tests.proxy_support import relay_body_as_headers

ROOT = Path(__file__).resolve().parent.parent


# ----- the README table and the results it is rendered from ----------------------------------------


def test_the_readme_compatibility_table_is_the_one_rendered_from_the_last_results():
    readme = (ROOT / "README.md").read_text()
    assert compat.readme_with_table(readme, compat.render_table(compat.load_results())) == readme


def test_every_locked_line_has_a_passing_row_and_every_row_a_lock():
    rows = compat.load_results()
    assert [row["litellm"] for row in rows] == compat.locked_versions()
    assert len(rows) >= 4
    for row in rows:
        assert row["ok"] and row["passed"] == row["total"] > 0, row["litellm"]
        assert set(row["areas"]) == set(compat.AREAS), row["litellm"]  # every area was tested on every line


def test_every_lock_pins_exactly_its_litellm_with_hashes():
    for version in compat.locked_versions():
        spec = (ROOT / "compat" / f"litellm-{version}.in").read_text()
        lock = (ROOT / "compat" / f"litellm-{version}.lock").read_text()
        assert f"litellm[proxy]=={version}" in spec
        assert f"\nlitellm=={version} \\" in lock
        pins = [line for line in lock.splitlines() if "==" in line and not line.lstrip().startswith("#")]
        assert pins and all(line.rstrip().endswith("\\") for line in pins)  # each pin is followed by hashes
        assert "litellm==1.82.7" not in lock and "litellm==1.82.8" not in lock


def test_the_versions_run_newest_first():
    assert compat.locked_versions() == sorted(compat.locked_versions(), key=compat.version_key, reverse=True)
    assert compat.version_key("1.100.5") > compat.version_key("1.90.7")  # numbers, not strings


def row(version: str, ok: bool, degraded=()) -> dict:
    return {"litellm": version, "tested": "2026-12-02", "ok": ok, "passed": 3 if ok else 2, "total": 3,
            "areas": {"modes": {"passed": 2, "failed": 0}, "breaker": {"passed": 1 if ok else 0, "failed": 0 if ok else 1}},
            "failed": [] if ok else ["tests/x.py::test_breaker"], "degraded": list(degraded), "install_s": 0.0, "run_s": 1.0}


def test_the_table_says_what_works_what_degrades_and_what_failed():
    table = compat.render_table([row("1.2.3", True, ["no response-headers hook: no x-relay-* headers"]), row("1.0.0", False)])
    ok_line, failed_line = table.splitlines()[2:]
    assert ok_line == ("| `1.2.3` | pass (3/3 tests) | modes, breaker | no response-headers hook: no x-relay-* headers "
                       "| 2026-12-02 |")
    assert failed_line.startswith("| `1.0.0` | **FAIL** (1 of 3 tests failed: breaker) | modes | nothing |")


# ----- the runner fails when any line fails --------------------------------------------------------


def test_the_matrix_exits_non_zero_when_any_line_fails(monkeypatch):
    versions = compat.locked_versions()
    saved = []
    monkeypatch.setattr(compat, "run_version", lambda v: row(v, v != versions[-1]))
    monkeypatch.setattr(compat, "save_results", saved.append)
    assert compat.main([]) == 1
    assert [r["litellm"] for r in saved[0]] == versions  # every line ran, the failure did not stop the rest
    monkeypatch.setattr(compat, "run_version", lambda v: row(v, True))
    assert compat.main([]) == 0


def test_an_unknown_version_is_refused_with_the_known_ones(capsys):
    assert compat.main(["9.9.9"]) == 2
    assert "no lock for 9.9.9" in capsys.readouterr().err


def test_the_report_plugin_records_each_compat_test_by_area_and_its_failures(tmp_path):
    (tmp_path / "test_sample.py").write_text(textwrap.dedent("""
        import pytest

        @pytest.mark.compat("modes")
        def test_ok():
            pass

        @pytest.mark.compat("breaker")
        def test_broken():
            assert False

        def test_not_compat():
            pass
    """))
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "tests.compat_report", "-p", "no:cacheprovider",
                           "-m", "compat", "-o", "markers=compat", str(tmp_path / "test_sample.py")],
                          cwd=ROOT, env={**os.environ, "COMPAT_REPORT": str(report)},
                          capture_output=True, text=True)
    assert proc.returncode == 1, proc.stdout
    recorded = json.loads(report.read_text())
    assert recorded["exitstatus"] == 1
    assert {k.split("::")[1]: v for k, v in recorded["tests"].items()} == {
        "test_ok": {"area": "modes", "outcome": "passed"}, "test_broken": {"area": "breaker", "outcome": "failed"}}


def test_degradation_lines_are_collected_from_the_proxy_logs(tmp_path):
    (tmp_path / "main").mkdir()
    mark = relay_plugin.DEGRADED_MARK
    line = f"07:00:00 - {relay_plugin.log.name}:WARNING: relay_plugin.py:1 - {mark}no response-headers hook: x"
    (tmp_path / "main" / "proxy-1.log").write_text(f"start\n{line}\n")
    (tmp_path / "proxy-2.log").write_text(line + "\n")
    assert compat.degraded_lines(tmp_path) == ["no response-headers hook: x"]


# ----- feature detection in the plugin ------------------------------------------------------------


def test_the_plugin_sees_the_response_headers_hook_of_this_litellm():
    assert relay_plugin.detect_features() == relay_plugin.LiteLLMFeatures(response_headers=True, stream_disconnect=True)
    assert relay_plugin.degradations(relay_plugin.FEATURES) == []


def test_a_litellm_without_the_headers_hook_is_detected_by_looking_not_by_version(monkeypatch):
    class OldCustomLogger:  # the 1.80 shape: no async_post_call_response_headers_hook
        async def async_post_call_success_hook(self, data, user_api_key_dict, response):
            return response

    monkeypatch.setattr(relay_plugin, "CustomLogger", OldCustomLogger)
    features = relay_plugin.detect_features()
    assert features.response_headers is False
    (line,) = relay_plugin.degradations(features)
    assert "no x-relay-* headers" in line and "`relay` object" in line


def test_a_proxy_whose_dispatcher_lacks_the_headers_hook_is_detected(monkeypatch):
    class OldProxyLogging:  # the proxy side of an old LiteLLM: never calls the hook
        pass

    monkeypatch.setitem(sys.modules, "litellm.proxy.utils", type(sys)("litellm.proxy.utils"))
    sys.modules["litellm.proxy.utils"].ProxyLogging = OldProxyLogging
    assert relay_plugin.detect_features().response_headers is False


@pytest.mark.parametrize("response", ["model", "dict"])
def test_without_headers_every_body_carries_the_relay_object_and_keeps_an_analysis(monkeypatch, response):
    import litellm

    monkeypatch.setattr(relay_plugin, "FEATURES", relay_plugin.LiteLLMFeatures(response_headers=False))
    outcome = relay_plugin.Outcome("refine", "modified", ["sec"], latency_ms=12.0, cost_usd=0.001, override="applied")
    body = litellm.ModelResponse() if response == "model" else {"type": "message", "content": []}
    relay_plugin._say_in_body_without_headers(body, outcome)
    relay = body["relay"] if response == "dict" else body.relay
    assert relay_body_as_headers(relay) == outcome.headers()  # the body says everything the headers would

    outcome = relay_plugin.Outcome("annotate", "relayed", ["sec"])
    body = {"relay": {"analysis": "fine"}}
    relay_plugin._say_in_body_without_headers(body, outcome)
    assert body["relay"]["analysis"] == "fine" and body["relay"]["outcome"] == "relayed"


def test_with_headers_the_body_stays_as_it_was():
    body = {"type": "message", "content": []}
    relay_plugin._say_in_body_without_headers(body, relay_plugin.Outcome("refine", "modified", ["sec"]))
    assert "relay" not in body


def test_an_empty_answer_is_empty_response_whether_litellm_returns_it_or_raises_on_it():
    # litellm 1.100 raises this on a 200 with `choices: []`; 1.106 returns the empty answer instead
    raised = Exception("LiteLLM: provider returned a response with no 'choices'. Received: {'choices': []}")
    assert relay_plugin._classify_error("sec", raised).reason == "empty_response"
    assert relay_plugin._classify_error("sec", Exception("boom")).reason == "error"


def test_typed_content_blocks_in_an_anthropic_message_are_read_like_dicts():
    # litellm 1.80 hands the hook {"type": "message", "content": [<pydantic block>]}; 1.106 plain dicts
    from litellm.types.llms.anthropic import AnthropicResponseContentBlockText

    message = {"type": "message", "content": [AnthropicResponseContentBlockText(type="text", text="the answer")]}
    surface = relay_plugin.Surface(message)
    assert surface.skip is None and surface.get_text() == "the answer"
    surface.set_text("refined")
    assert message["content"] == [{"type": "text", "text": "refined"}]


def test_a_proxy_that_does_not_watch_for_disconnects_is_detected_and_announced(monkeypatch):
    monkeypatch.setitem(sys.modules, "litellm.proxy.common_request_processing", type(sys)("old_processing"))
    features = relay_plugin.detect_features()
    assert features.stream_disconnect is False
    assert any("client that disconnects" in line for line in relay_plugin.degradations(features))
