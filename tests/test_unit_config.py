"""RelayConfig.from_env: defaults, every parser, cross-field rules, error messages, Plan overrides."""

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

import relay_plugin
from relay_plugin import ConfigError, RelayConfig
from tests.support import SECONDARY, config

ROOT = Path(__file__).resolve().parent.parent


def config_error(**env: str) -> str:
    with pytest.raises(ConfigError) as caught:
        config(**env)
    return str(caught.value)


def where_model(key: str) -> str:
    return f"model_info.relay.{key} of llama"


#: the settings a relay: block may change (every ``overridable=True`` variable of the README table at the time of writing)
PLAN_KEYS = {
    "annotate_prompt", "annotate_target", "consensus_models", "enabled", "escalate_model", "escalate_threshold",
    "fail_mode", "guard_action", "guard_message", "guard_policy", "mode", "refine_prompt", "sample_rate",
    "secondary_model",
}
NOT_PLAN_KEYS = {"apply_to", "max_depth", "client_override", "redact", "timeout_s", "deadline_s", "log_level"}


def assert_lists_the_plan_keys(message: str, prefix: str) -> None:
    """``message`` is ``<prefix> is not a relay setting: allowed: k1, k2, ...`` with every plan key, sorted."""
    head, _, tail = message.partition(" is not a relay setting: allowed: ")
    assert head == prefix
    allowed = tail.split(", ")
    assert allowed == sorted(allowed)
    assert PLAN_KEYS <= set(allowed)
    assert not NOT_PLAN_KEYS & set(allowed)


# ----- defaults ---------------------------------------------------------------------------------


def test_defaults_are_the_documented_values_when_only_the_secondary_model_is_set():
    loaded = config()
    documented_plan = {
        "enabled": True, "mode": "refine", "secondary_model": SECONDARY, "fail_mode": "open",
        "guard_policy": relay_plugin.DEFAULT_GUARD_POLICY, "guard_message": "I can't help with that request.",
        "guard_action": "replace", "annotate_target": "body", "escalate_model": None, "escalate_threshold": 7.0,
        "consensus_models": (), "sample_rate": 1.0, "refine_prompt": None, "annotate_prompt": None,
    }
    assert {name: getattr(loaded.plan, name) for name in documented_plan} == documented_plan
    documented = {
        "apply_to": ("*",), "max_depth": 1, "client_override": "none", "redact": False, "max_input_chars": 24000,
        "secondary_max_tokens": 1024, "timeout_s": 20.0, "deadline_s": 45.0, "shadow_max_in_flight": 32,
        "log_level": "warning",
    }
    assert {name: getattr(loaded, name) for name in documented} == documented


def test_every_variable_default_reaches_the_config():
    loaded = config()
    for var in relay_plugin.VARIABLES:
        holder = loaded.plan if var.overridable else loaded
        expected = SECONDARY if var.name == "SECONDARY_MODEL" else var.default
        assert getattr(holder, var.name.lower()) == expected, var.name


def test_a_set_but_empty_variable_counts_as_unset():
    blank = {v.name: " " for v in relay_plugin.VARIABLES if v.name != "SECONDARY_MODEL"}
    assert config(**blank) == config()


def test_an_empty_consensus_model_list_is_unset_like_the_other_optional_models():
    # RELAY_CONSENSUS_MODELS defaults to "(unset)" (see env_table) and is only required in consensus mode,
    # so an empty value in refine mode must not stop the proxy, exactly like an empty RELAY_ESCALATE_MODEL.
    assert config(CONSENSUS_MODELS="").plan.consensus_models == ()


def test_relay_enabled_false_needs_no_other_variable():
    loaded = RelayConfig.from_env({"RELAY_ENABLED": "false"})
    assert loaded.plan.enabled is False
    assert loaded.plan.secondary_model is None


def test_relay_enabled_false_skips_the_mode_requirements_too():
    loaded = RelayConfig.from_env({"RELAY_ENABLED": "off", "RELAY_MODE": "escalate"})
    assert (loaded.plan.enabled, loaded.plan.mode, loaded.plan.escalate_model) == (False, "escalate", None)


def test_relay_enabled_false_still_rejects_a_malformed_value():
    with pytest.raises(ConfigError) as caught:
        RelayConfig.from_env({"RELAY_ENABLED": "false", "RELAY_TIMEOUT_S": "soon"})
    assert str(caught.value) == "RELAY_TIMEOUT_S='soon' is invalid: allowed: a number >= 0.01 and <= 3600"


# ----- booleans ---------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", ["1", "true", "TRUE", " yes ", "on", "On"])
def test_true_forms_of_a_boolean_are_accepted(raw):
    assert config(REDACT=raw).redact is True


@pytest.mark.parametrize("raw", ["0", "false", "False", " no", "off", "OFF "])
def test_false_forms_of_a_boolean_are_accepted(raw):
    assert config(REDACT=raw).redact is False


@pytest.mark.parametrize("raw", ["maybe", "2", "y", "enabled"])
def test_any_other_boolean_form_names_the_variable_the_value_and_the_forms(raw):
    assert config_error(REDACT=raw) == (
        f"RELAY_REDACT={raw!r} is invalid: allowed: true or false (also 1/0, yes/no, on/off)"
    )


# ----- choices ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", relay_plugin.MODES)
def test_every_mode_is_accepted(mode):
    loaded = config(MODE=mode, ESCALATE_MODEL="openai/premium", CONSENSUS_MODELS="openai/a,openai/b")
    assert loaded.plan.mode == mode


def test_choices_are_case_insensitive_and_trimmed():
    loaded = config(MODE=" GUARD ", FAIL_MODE="Closed", GUARD_ACTION="ERROR", CLIENT_OVERRIDE="Opt_In", LOG_LEVEL="DEBUG")
    assert (loaded.plan.mode, loaded.plan.fail_mode, loaded.plan.guard_action) == ("guard", "closed", "error")
    assert (loaded.client_override, loaded.log_level) == ("opt_in", "debug")


def test_unknown_mode_names_the_variable_the_value_and_the_choices():
    assert config_error(MODE="rewrite") == (
        "RELAY_MODE='rewrite' is invalid: allowed: refine | guard | annotate | escalate | consensus | shadow"
    )


@pytest.mark.parametrize(
    ("name", "raw", "allowed"),
    [
        ("CLIENT_OVERRIDE", "all", "none | opt_in | full"),
        ("FAIL_MODE", "half", "open | closed"),
        ("GUARD_ACTION", "drop", "replace | error"),
        ("ANNOTATE_TARGET", "header", "body | append"),
        ("LOG_LEVEL", "trace", "debug | info | warning | error"),
    ],
)
def test_every_choice_variable_lists_its_choices_for_a_bad_value(name, raw, allowed):
    assert config_error(**{name: raw}) == f"RELAY_{name}={raw!r} is invalid: allowed: {allowed}"


# ----- numbers ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "raw", "attribute", "expected"),
    [
        ("MAX_DEPTH", "3", "max_depth", 3),
        ("MAX_DEPTH", " 1 ", "max_depth", 1),
        ("MAX_INPUT_CHARS", "500", "max_input_chars", 500),
        ("SECONDARY_MAX_TOKENS", "256", "secondary_max_tokens", 256),
        ("SHADOW_MAX_IN_FLIGHT", "1", "shadow_max_in_flight", 1),
        ("TIMEOUT_S", "0.5", "timeout_s", 0.5),
        ("DEADLINE_S", "60", "deadline_s", 60.0),
    ],
)
def test_numbers_within_bounds_are_parsed_to_their_type(name, raw, attribute, expected):
    value = getattr(config(**{name: raw}), attribute)
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize(
    ("name", "raw", "expected"),
    [("ESCALATE_THRESHOLD", "0", 0.0), ("ESCALATE_THRESHOLD", "10", 10.0), ("ESCALATE_THRESHOLD", "6.5", 6.5),
     ("SAMPLE_RATE", "0", 0.0), ("SAMPLE_RATE", "1", 1.0), ("SAMPLE_RATE", "0.25", 0.25)],
)
def test_closed_float_bounds_include_both_ends(name, raw, expected):
    assert getattr(config(**{name: raw}).plan, name.lower()) == expected


@pytest.mark.parametrize("raw", ["0", "-1", "-0.5", "1.5", "one", "nan"])
def test_an_integer_below_one_or_not_an_integer_is_rejected(raw):
    assert config_error(MAX_DEPTH=raw) == f"RELAY_MAX_DEPTH={raw!r} is invalid: allowed: an integer >= 1 and <= 100"


@pytest.mark.parametrize("raw", ["0", "-3", "nan", "NaN", "-inf", "fast"])
def test_a_timeout_must_be_a_positive_number(raw):
    assert config_error(TIMEOUT_S=raw) == f"RELAY_TIMEOUT_S={raw!r} is invalid: allowed: a number >= 0.01 and <= 3600"


@pytest.mark.parametrize("raw", ["-0.1", "1.01", "nan", "inf", "half"])
def test_a_sample_rate_outside_zero_to_one_or_nan_is_rejected(raw):
    assert config_error(SAMPLE_RATE=raw) == f"RELAY_SAMPLE_RATE={raw!r} is invalid: allowed: a number >= 0 and <= 1"


@pytest.mark.parametrize("raw", ["-1", "10.5", "11", "NaN"])
def test_an_escalate_threshold_outside_zero_to_ten_or_nan_is_rejected(raw):
    assert config_error(ESCALATE_THRESHOLD=raw) == (
        f"RELAY_ESCALATE_THRESHOLD={raw!r} is invalid: allowed: a number >= 0 and <= 10"
    )


# ----- models, model lists, globs, texts ----------------------------------------------------------


def test_a_model_is_trimmed():
    assert config(SECONDARY_MODEL="  anthropic/claude-haiku  ").plan.secondary_model == "anthropic/claude-haiku"


@pytest.mark.parametrize("raw", ["openai/a openai/b", "openai/a,openai/b", "gpt\t4o"])
def test_a_model_with_spaces_or_commas_is_rejected(raw):
    assert config_error(ESCALATE_MODEL=raw) == (
        f"RELAY_ESCALATE_MODEL={raw!r} is invalid: allowed: one model, as provider/model or a model_name of the proxy's model_list"
    )


def test_a_model_list_is_split_on_commas_and_trimmed_and_empty_items_dropped():
    assert config(CONSENSUS_MODELS=" openai/a , anthropic/b,,gemini/c, ").plan.consensus_models == (
        "openai/a", "anthropic/b", "gemini/c",
    )


@pytest.mark.parametrize("raw", [",", " , ", "openai/a, open ai/b"])
def test_a_model_list_without_models_or_with_a_spaced_model_is_rejected(raw):
    assert config_error(CONSENSUS_MODELS=raw) == (
        f"RELAY_CONSENSUS_MODELS={raw!r} is invalid: allowed: a comma-separated list of one or more models"
    )


def test_a_glob_list_is_split_and_trimmed():
    assert config(APPLY_TO=" local-* , gpt-4o,llama-[0-9]*").apply_to == ("local-*", "gpt-4o", "llama-[0-9]*")


@pytest.mark.parametrize(("raw", "bad"), [("local-[abc", "local-[abc"), ("gpt-4o,local-]", "local-]"),
                                          ("a-[[b]", "a-[[b]")])
def test_a_malformed_glob_is_rejected_and_named(raw, bad):
    assert config_error(APPLY_TO=raw) == f"RELAY_APPLY_TO={raw!r} is invalid: allowed: globs with balanced [ ] (bad: {bad!r})"


@pytest.mark.parametrize("raw", [",", "local-*,,gpt-4o", "gpt-4o,"])
def test_a_glob_list_with_an_empty_glob_is_rejected(raw):
    assert config_error(APPLY_TO=raw) == (
        f"RELAY_APPLY_TO={raw!r} is invalid: allowed: a comma-separated list of model-name globs, e.g. 'local-*,gpt-4o'"
    )


def test_a_blank_guard_message_in_a_model_block_is_rejected():
    with pytest.raises(ConfigError) as caught:
        config().plan.overridden({"guard_message": "   "}, where_model)
    assert str(caught.value) == "model_info.relay.guard_message of llama='   ' is invalid: allowed: a non-empty text"


def test_texts_are_trimmed():
    plan = config(GUARD_MESSAGE="  No.  ", REFINE_PROMPT=" Be terse. ").plan
    assert (plan.guard_message, plan.refine_prompt) == ("No.", "Be terse.")


# ----- cross-field rules --------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [None, "", "   "])
def test_an_enabled_relay_without_a_secondary_model_is_rejected(raw):
    assert config_error(SECONDARY_MODEL=raw) == (
        "RELAY_SECONDARY_MODEL is missing: allowed: a model, required when the relay is enabled"
    )


def test_escalate_without_an_escalate_model_is_rejected():
    assert config_error(MODE="escalate") == (
        "RELAY_ESCALATE_MODEL is missing: allowed: a model, required when mode is escalate"
    )


def test_consensus_without_consensus_models_is_rejected():
    assert config_error(MODE="consensus") == (
        "RELAY_CONSENSUS_MODELS is missing: allowed: a list of models, required when mode is consensus"
    )


def test_a_deadline_shorter_than_the_timeout_is_rejected_with_both_values():
    assert config_error(TIMEOUT_S="2.5", DEADLINE_S="1") == "RELAY_DEADLINE_S=1 is invalid: allowed: a number >= RELAY_TIMEOUT_S (2.5)"


def test_a_deadline_shorter_than_the_default_timeout_is_rejected():
    assert config_error(DEADLINE_S="5") == "RELAY_DEADLINE_S=5 is invalid: allowed: a number >= RELAY_TIMEOUT_S (20)"


def test_a_deadline_equal_to_the_timeout_is_accepted():
    loaded = config(TIMEOUT_S="3", DEADLINE_S="3")
    assert (loaded.timeout_s, loaded.deadline_s) == (3.0, 3.0)


BAD_ENVS = [
    ("ENABLED", {"ENABLED": "perhaps"}, "'perhaps'", "allowed: true or false"),
    ("MODE", {"MODE": "bogus\nmode"}, "'bogus\\nmode'", "allowed: refine | guard"),
    ("SECONDARY_MODEL", {"SECONDARY_MODEL": "a b"}, "'a b'", "allowed: one model"),
    ("APPLY_TO", {"APPLY_TO": "local-[abc"}, "'local-[abc'", "allowed: globs with balanced [ ]"),
    ("MAX_DEPTH", {"MAX_DEPTH": "-1"}, "'-1'", "allowed: an integer >= 1 and <= 100"),
    ("TIMEOUT_S", {"TIMEOUT_S": "nan"}, "'nan'", "allowed: a number >= 0.01 and <= 3600"),
    ("SAMPLE_RATE", {"SAMPLE_RATE": "2"}, "'2'", "allowed: a number >= 0 and <= 1"),
    ("CONSENSUS_MODELS", {"MODE": "consensus", "CONSENSUS_MODELS": ","}, "','", "allowed: a comma-separated list"),
    ("LOG_LEVEL", {"LOG_LEVEL": "loud"}, "'loud'", "allowed: debug | info | warning | error"),
    ("DEADLINE_S", {"TIMEOUT_S": "10", "DEADLINE_S": "2"}, "=2 ", "allowed: a number >= RELAY_TIMEOUT_S (10)"),
]


@pytest.mark.parametrize(("name", "env", "shown", "allowed"), BAD_ENVS, ids=[b[0] for b in BAD_ENVS])
def test_every_config_error_is_one_line_naming_the_variable_the_value_and_what_is_allowed(name, env, shown, allowed):
    message = config_error(**env)
    assert "\n" not in message
    assert message.startswith(f"RELAY_{name}=")
    assert shown in message
    assert allowed in message


# ----- Plan.overridden (model_info relay: blocks) ----------------------------------------------


def test_a_valid_model_block_changes_only_its_keys():
    base = config().plan
    plan = base.overridden({"mode": "guard", "guard_action": "error", "sample_rate": 0.5}, where_model)
    assert plan == replace(base, mode="guard", guard_action="error", sample_rate=0.5)


def test_a_model_block_accepts_native_json_types_and_upper_case_keys():
    base = config().plan
    plan = base.overridden({"ENABLED": False, "escalate_threshold": 4, "consensus_models": ["openai/a", " openai/b "]}, where_model)
    assert (plan.enabled, plan.escalate_threshold, plan.consensus_models) == (False, 4.0, ("openai/a", "openai/b"))


def test_a_model_block_leaves_the_base_plan_untouched():
    base = config().plan
    base.overridden({"mode": "annotate"}, where_model)
    assert base.mode == "refine"


def test_an_unknown_key_in_a_model_block_names_the_key_and_the_allowed_keys():
    with pytest.raises(ConfigError) as caught:
        config().plan.overridden({"colour": "blue"}, where_model)
    assert_lists_the_plan_keys(str(caught.value), "model_info.relay.colour of llama")


def test_a_setting_that_is_not_per_model_is_refused_in_a_model_block():
    with pytest.raises(ConfigError) as caught:
        config().plan.overridden({"apply_to": "*"}, where_model)
    assert_lists_the_plan_keys(str(caught.value), "model_info.relay.apply_to of llama")


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ({"sample_rate": 2}, "model_info.relay.sample_rate of llama=2 is invalid: allowed: a number >= 0 and <= 1"),
        ({"mode": "bogus"}, "model_info.relay.mode of llama='bogus' is invalid: allowed: refine | guard | annotate | escalate | consensus | shadow"),
        ({"escalate_threshold": True}, "model_info.relay.escalate_threshold of llama=True is invalid: allowed: a number >= 0 and <= 10"),
        ({"escalate_threshold": math.nan}, "model_info.relay.escalate_threshold of llama=nan is invalid: allowed: a number >= 0 and <= 10"),
        ({"enabled": "sometimes"}, "model_info.relay.enabled of llama='sometimes' is invalid: allowed: true or false (also 1/0, yes/no, on/off)"),
    ],
)
def test_a_bad_value_in_a_model_block_names_the_key_and_the_value(block, message):
    with pytest.raises(ConfigError) as caught:
        config().plan.overridden(block, where_model)
    assert str(caught.value) == message


def test_a_model_block_that_leaves_the_plan_incomplete_is_rejected():
    with pytest.raises(ConfigError) as caught:
        config().plan.overridden({"mode": "escalate"}, where_model)
    assert str(caught.value) == (
        "model_info.relay.escalate_model of llama is missing: allowed: a model, required when mode is escalate"
    )


def test_a_null_in_a_model_block_leaves_the_setting_as_it_is():
    base = config(MODE="annotate", REFINE_PROMPT="Be terse.").plan
    assert base.overridden({"secondary_model": None, "mode": None, "refine_prompt": None}, where_model) == base


def test_a_null_model_in_a_block_does_not_satisfy_a_required_model():
    # JSON null (YAML `escalate_model:` or a client's `"escalate_model": null`) is no model: the plan stays
    # incomplete and is rejected, instead of calling a model literally named "None".
    with pytest.raises(ConfigError) as caught:
        config().plan.overridden({"mode": "escalate", "escalate_model": None}, where_model)
    assert str(caught.value) == (
        "model_info.relay.escalate_model of llama is missing: allowed: a model, required when mode is escalate"
    )


# ----- env table ----------------------------------------------------------------------------------


def test_the_env_table_has_one_row_per_variable_in_order():
    lines = relay_plugin.env_table().splitlines()
    assert lines[:2] == ["| Variable | Default | Per model / request | Meaning |", "|---|---|---|---|"]
    assert [line.split(" | ")[0] for line in lines[2:]] == [f"| `RELAY_{v.name}`" for v in relay_plugin.VARIABLES]


def test_the_env_table_shows_defaults_and_overridability():
    rows = {line.split(" | ")[0]: line for line in relay_plugin.env_table().splitlines()[2:]}
    assert rows["| `RELAY_MODE`"].startswith("| `RELAY_MODE` | `refine` | yes | ")
    assert rows["| `RELAY_APPLY_TO`"].startswith("| `RELAY_APPLY_TO` | `*` | no | ")
    assert rows["| `RELAY_SECONDARY_MODEL`"].startswith("| `RELAY_SECONDARY_MODEL` | (unset) | yes | ")
    assert rows["| `RELAY_ENABLED`"].startswith("| `RELAY_ENABLED` | `true` | yes | ")


def test_the_env_table_command_prints_the_same_table_without_litellm():
    done = subprocess.run([sys.executable, "relay_plugin.py", "--env-table"], cwd=ROOT, capture_output=True, text=True,
                          env={"PATH": os.environ.get("PATH", "")}, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (0, relay_plugin.env_table() + "\n", "")


# ----- importing, and loading the instance ---------------------------------------------------------


def run_python(code: str, other_env: dict[str, str] | None = None, **relay_env: str) -> subprocess.CompletedProcess:
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"),
           "LITELLM_LOCAL_MODEL_COST_MAP": "True", **(other_env or {})}
    env.update({f"RELAY_{name}": value for name, value in relay_env.items()})
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def load_plugin(**relay_env: str) -> subprocess.CompletedProcess:
    """What the proxy does: execute the file, then look up ``proxy_handler_instance``."""
    return run_python("import relay_plugin; relay_plugin.proxy_handler_instance", **relay_env)


@pytest.mark.parametrize("relay_env", [{}, {"SECONDARY_MODEL": "openai/sec", "MODE": "bogus"}], ids=["unset", "bad"])
def test_importing_reads_no_variable_and_never_exits(relay_env):
    litellm_alone = run_python("import litellm")
    done = run_python("import relay_plugin", **relay_env)
    assert (done.returncode, done.stdout, done.stderr) == (0, litellm_alone.stdout, litellm_alone.stderr)


def test_importing_leaves_every_logger_as_it_was():
    probe = """if True:
        import logging, litellm

        def state():
            loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
            return {lg.name: (lg.level, lg.propagate, lg.disabled, list(lg.handlers), list(lg.filters))
                    for lg in loggers if isinstance(lg, logging.Logger)}

        before = state()
        import relay_plugin
        untouched = (logging.NOTSET, True, False, [], [])  # a logger that was created and left alone
        print([name for name, now in state().items() if now != before.get(name, untouched)])
    """
    done = run_python(probe, SECONDARY_MODEL="openai/sec")
    assert (done.returncode, done.stdout.splitlines()[-1:]) == (0, ["[]"]), done.stdout + done.stderr[-2000:]


@pytest.mark.parametrize(
    ("relay_env", "line"),
    [
        ({"SECONDARY_MODEL": "openai/sec", "MODE": "bogus"},
         "relay_plugin: invalid configuration: RELAY_MODE='bogus' is invalid: allowed: "
         "refine | guard | annotate | escalate | consensus | shadow"),
        ({}, "relay_plugin: invalid configuration: RELAY_SECONDARY_MODEL is missing: allowed: a model, "
             "required when the relay is enabled"),
        ({"SECONDARY_MODEL": "openai/sec", "STATE": "redis"},  # found while building the store
         "relay_plugin: invalid configuration: RELAY_REDIS_URL is missing: allowed: a redis://, rediss:// or "
         "unix:// URL, or LiteLLM's REDIS_HOST (with REDIS_PORT, REDIS_PASSWORD), required when RELAY_STATE is redis"),
    ],
    ids=["bad_mode", "missing_secondary", "store"],
)
def test_loading_the_instance_with_a_bad_environment_exits_2_with_one_stderr_line(relay_env, line):
    done = load_plugin(**relay_env)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [line]


def test_loading_the_instance_with_a_valid_environment_succeeds_silently():
    done = load_plugin(SECONDARY_MODEL="openai/sec")
    assert (done.returncode, done.stderr) == (0, "")


def test_the_instance_is_built_once_and_is_then_a_plain_attribute():
    probe = ("import relay_plugin as r; first = r.proxy_handler_instance; "
             "print(r.proxy_handler_instance is first, r.CONFIG is first.config, 'proxy_handler_instance' in vars(r))")
    done = run_python(probe, SECONDARY_MODEL="openai/sec")
    assert (done.returncode, done.stdout.split()[-3:]) == (0, ["True", "True", "True"]), done.stderr[-2000:]


#: a secret that only the relay knows to be one (from the variable's name): LiteLLM's patterns miss it
PLAIN_SECRET = "correct-horse-battery-staple"
LOG_PROBE = """if True:
    import json, litellm, relay_plugin
    if {json_logs}:
        litellm.turn_on_json()  # what `json_logs: true` in litellm_settings does
    relay_plugin.proxy_handler_instance
    relay_plugin.log.warning("upstream refused %s", "{secret}")
    relay_plugin.log.info("an info line")
""".format


@pytest.mark.parametrize("json_logs", [False, True], ids=["plain", "json"])
def test_loading_the_instance_joins_litellms_proxy_logging_and_scrubs_every_line(json_logs):
    from litellm._logging import verbose_proxy_logger

    assert relay_plugin.log.parent is verbose_proxy_logger
    done = run_python(LOG_PROBE(json_logs=json_logs, secret=PLAIN_SECRET), {"UPSTREAM_API_KEY": PLAIN_SECRET},
                      SECONDARY_MODEL="openai/sec", UNRELATED_SETTING="1")
    lines = [line for line in done.stderr.splitlines()
             if "upstream refused" in line or "RELAY_UNRELATED_SETTING" in line]
    assert done.returncode == 0 and len(lines) == 2, done.stderr[-2000:]
    assert "an info line" not in done.stdout + done.stderr  # RELAY_LOG_LEVEL: warning
    if json_logs:
        records = [json.loads(line) for line in lines]
        assert [(r["component"], r["level"]) for r in records] == [(relay_plugin.log.name, "WARNING")] * 2
        assert records[1]["message"] == "upstream refused [REDACTED_KEY]"
    else:
        assert all(f"{relay_plugin.log.name}:WARNING" in line for line in lines)
        assert lines[1].endswith(" - upstream refused [REDACTED_KEY]")


def test_litellms_log_level_applies_to_the_relays_lines_and_relay_log_level_to_its_own_threshold():
    probe = LOG_PROBE(json_logs=False, secret="x")
    shown = run_python(probe, SECONDARY_MODEL="openai/sec", LOG_LEVEL="info")
    assert "an info line" in shown.stdout and "upstream refused" in shown.stderr, shown.stderr[-2000:]
    hidden = run_python(probe, {"LITELLM_LOG": "ERROR"}, SECONDARY_MODEL="openai/sec", LOG_LEVEL="info")
    assert hidden.returncode == 0, hidden.stderr[-2000:]
    assert "upstream refused" not in hidden.stderr and "an info line" not in hidden.stdout


def test_a_disabled_relay_loads_a_callback_without_hooks_so_the_proxy_keeps_its_fast_paths():
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env.update(RELAY_ENABLED="false", LITELLM_LOCAL_MODEL_COST_MAP="True")
    probe = ("import relay_plugin as r; from litellm.integrations.custom_logger import CustomLogger; "
             "own = [n for n in vars(type(r.proxy_handler_instance)) if n.startswith('async_')]; "
             "print(type(r.proxy_handler_instance).__name__, isinstance(r.proxy_handler_instance, CustomLogger), own)")
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                          cwd=Path(relay_plugin.__file__).parent, timeout=60)
    assert done.stdout.split("\n")[-2] == "DisabledRelay True []", done.stderr[-2000:]


# ----- finite ranges and misspelt names (issue 11) --------------------------------------------------------


@pytest.mark.parametrize("name, raw", [
    ("BUDGET_WINDOW_S", "inf"), ("CACHE_TTL_S", "inf"), ("BREAKER_COOLDOWN_S", "inf"), ("TIMEOUT_S", "inf"),
    ("DEADLINE_S", "Infinity"), ("STREAM_HEARTBEAT_S", "1e-9"), ("SECONDARY_MAX_TOKENS", "100000000000"),
    ("RETRY_MAX_S", "1e308"), ("BUDGET_USD", "nan"), ("CACHE_MAX_ENTRIES", "99999999999"),
])
def test_an_infinite_or_absurd_value_is_refused_at_startup(name, raw):
    assert config_error(**{name: raw}).startswith(f"RELAY_{name}={raw!r} is invalid: allowed: ")


@pytest.mark.parametrize("raw", ["a", "secret", "x" * 64, "0123456789abcdef0123456789abcde"])
def test_a_signing_secret_that_could_be_guessed_is_refused_at_startup(raw):
    # the proof's HMAC is all that tells the relay's own calls from a client's: a guessable key lets a
    # client forge a proof (from one echoed by a secondary) and switch a guard off
    assert config_error(SIGNING_SECRET=raw).startswith(f"RELAY_SIGNING_SECRET={raw!r} is invalid: allowed: ")


def test_a_random_signing_secret_is_accepted():
    secret = "0123456789abcdef" * 2
    assert config(SIGNING_SECRET=secret).signing_secret == secret


def test_an_infinite_value_in_a_model_info_block_is_refused_too():
    with pytest.raises(ConfigError):
        config().plan.overridden({"escalate_threshold": float("inf")}, where_model)


@pytest.mark.parametrize("typo, meant", [
    ("RELAY_MAXCALLS", "RELAY_MAX_CALLS"), ("RELAY_BUDGET_USD_PERKEY", "RELAY_BUDGET_USD_PER_KEY"),
    ("RELAY_TIMEOUT", "RELAY_TIMEOUT_S"), ("RELAY_SECONDARY_MODLE", "RELAY_SECONDARY_MODEL"),
    ("relay_budget_usd", "RELAY_BUDGET_USD"), ("RELAY_CACHE_TTL", "RELAY_CACHE_TTL_S"),
])
def test_a_misspelt_variable_stops_startup_naming_the_known_one(typo, meant):
    with pytest.raises(ConfigError) as caught:
        RelayConfig.from_env({"RELAY_SECONDARY_MODEL": SECONDARY, typo: "1"})
    assert str(caught.value) == f"{typo} is not a relay variable: did you mean {meant}?"


def test_another_programs_relay_variable_gets_one_warning_and_is_ignored(caplog):
    loaded = RelayConfig.from_env({"RELAY_SECONDARY_MODEL": SECONDARY, "RELAY_HOST": "relay.internal",
                                   "RELAY_VENDOR_TRACE_ID": "x"})
    assert loaded.plan.secondary_model == SECONDARY
    warned = [r.getMessage() for r in caplog.records if "not a relay variable" in r.getMessage()]
    assert len(warned) == 2 and all(r.levelname == "WARNING" for r in caplog.records if "not a relay" in r.getMessage())


def test_no_two_known_variables_are_near_misses_of_each_other():
    # otherwise a typo of one could be taken for the other: the table must keep its names apart
    from relay_plugin import VARIABLES, _edit_distance, _squashed

    names = [_squashed(v.name) for v in VARIABLES]
    close = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]
             if _edit_distance(a, b) <= (1 if min(len(a), len(b)) <= 6 else 2)]
    assert close == []


def test_a_breaker_that_could_never_open_is_refused():
    assert config_error(BREAKER_WINDOW="5", BREAKER_MIN_CALLS="10") == (
        "RELAY_BREAKER_MIN_CALLS=10 is invalid: allowed: an integer <= RELAY_BREAKER_WINDOW (5)")
