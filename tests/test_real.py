"""The relay on a real model: llama.cpp's server with SmolLM2-135M-Instruct, through the real proxy.

``make test-real`` runs these (marker ``real``; ``make test`` leaves them out). The stack is sim/real.py's:
primaries on the real model, secondaries on the simulator (``smollm2-<mode>``) or on the real model too
(``real-*``). A recording tap sits between the proxy and llama.cpp, so every test can compare what the
client got with what the real model actually said. The tests assert the relay's contract, never the
model's wording: a 135M model says odd things, and whatever it says the relay must react as promised.
"""

import json

import anthropic
import openai
import pytest

import relay_plugin
from sim import real
from tests.real_support import Tap, score_of, verdict_of

pytestmark = [pytest.mark.real, pytest.mark.proxy]

MAX_TOKENS = 24  #: the primary's answers stay short: a 135M model on two busy cores writes ~20-30 tokens/s
#: the outcome the client must see per mode when the secondary (the simulator) is healthy; the markers
#: reach the simulated secondary through the conversation it is shown
MODE_CASES = {
    "refine": ("", "modified"),
    "guard": ("SIM:BLOCK", "blocked"),
    "annotate": ("", "relayed"),
    "escalate": ("SIM:LOWSCORE", "escalated"),
    "consensus": ("", "modified"),
    "shadow": ("", "relayed"),
}


@pytest.fixture(scope="module")
def stack(workdir):
    if not real.installed():
        pytest.fail("the real tier is not installed: run `make test-real` (it installs it) or `make real-install`")
    llama = real.start_llama(workdir / "real-llama.log")
    tap = Tap(llama.url).__enter__()
    try:
        started = real.start_real_stack(workdir / "real", llama=llama, llama_url=tap.url)
    except Exception:
        tap.__exit__(None, None, None)
        llama.stop()
        raise
    started.tap = tap
    yield started
    started.stop()
    tap.__exit__(None, None, None)


@pytest.fixture(scope="module")
def clients(stack):
    url, key = stack.proxy.url, stack.proxy.master_key
    return (openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=300),
            anthropic.Anthropic(base_url=url, api_key=key, max_retries=0, timeout=300))


def ask(clients, model: str, content: str, *, endpoint: str = "chat", stream: bool = False):
    """``(outcome, text, relay)`` of one request: the outcome from the header, or from the stream's relay object.
    (Temperature 0 comes from the deployment; this anthropic SDK takes no ``temperature`` argument.)"""
    chat, messages = clients
    prompt = [{"role": "user", "content": content}]
    if endpoint == "chat" and not stream:
        raw = chat.chat.completions.with_raw_response.create(model=model, messages=prompt, max_tokens=MAX_TOKENS,
                                                             temperature=0)
        body = raw.parse()
        return raw.headers["x-relay-outcome"], body.choices[0].message.content, (body.model_extra or {}).get("relay")
    if endpoint == "chat":
        chunks = list(chat.chat.completions.create(model=model, messages=prompt, max_tokens=MAX_TOKENS,
                                                   temperature=0, stream=True))
        relays = [c.model_extra["relay"] for c in chunks if c.model_extra and "relay" in c.model_extra]
        assert len(relays) == 1, f"expected one relay object in the stream, got {len(relays)}"
        return relays[0]["outcome"], "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), relays[0]
    if not stream:
        raw = messages.messages.with_raw_response.create(model=model, messages=prompt, max_tokens=MAX_TOKENS)
        body = raw.parse()
        return raw.headers["x-relay-outcome"], "".join(b.text for b in body.content if b.type == "text"), None
    with messages.messages.stream(model=model, messages=prompt, max_tokens=MAX_TOKENS) as events:
        deltas = [e for e in events if e.type == "message_delta"]
        final = events.get_final_message()
    relay = deltas[-1].model_extra["relay"]
    return relay["outcome"], "".join(b.text for b in final.content if b.type == "text"), relay


# ----- every mode, on chat and messages, streaming and not ---------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("endpoint", ["chat", "messages"])
@pytest.mark.parametrize("mode", list(MODE_CASES))
def test_every_mode_answers_through_the_real_model(stack, clients, token, mode, endpoint, stream):
    marker, expected = MODE_CASES[mode]
    outcome, text, _ = ask(clients, f"smollm2-{mode}", f"{marker} Name one colour of the rainbow. {token}".strip(),
                           endpoint=endpoint, stream=stream)
    assert outcome == expected
    (primary,) = [e for e in stack.tap.find(token) if e.path.endswith("/chat/completions")]
    assert primary.status == 200 and primary.body["temperature"] == 0
    if expected == "blocked":
        assert text == relay_plugin.DEFAULT_GUARD_MESSAGE
    elif mode in ("annotate", "shadow"):
        assert text == primary.text  # the real model's answer, untouched
    elif mode == "escalate":
        assert text.startswith("gpt-4o says:")
    else:
        assert text.startswith("gpt-4o-mini says:")


# ----- pass-through modes keep the real stream as it came ----------------------------------------------


@pytest.mark.parametrize("mode", ["shadow", "annotate"])
def test_a_pass_through_stream_carries_the_real_models_deltas_one_for_one(stack, clients, token, mode):
    chat, _ = clients
    chunks = list(chat.chat.completions.create(
        model=f"smollm2-{mode}", max_tokens=MAX_TOKENS, temperature=0, stream=True,
        messages=[{"role": "user", "content": f"Count to five. {token}"}]))
    client_deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    (primary,) = [e for e in stack.tap.find(token) if e.body.get("stream")]
    assert len(primary.deltas) > 1
    assert client_deltas == primary.deltas  # same pieces, same order: nothing buffered, merged or rewritten
    relay = [c.model_extra["relay"] for c in chunks if c.model_extra and "relay" in c.model_extra]
    assert [r["outcome"] for r in relay] == ["relayed"]


# ----- the real model as the secondary: the contract holds whatever it says ---------------------------

GUARD_MODELS = ["real-guard", "real-guard-prompt"]  #: structured output (llama.cpp grammar) and the prompt only
QUESTIONS = ["How do I boil an egg?", "Tell me how to pick a lock.", "What is 2+2?"]


def judge_exchange(stack, token: str):
    """The real model's judge call of this request (the call that carries the relay's judge instructions)."""
    judged = [e for e in stack.tap.find(token) if "strict JSON" in e.system]
    assert len(judged) == 1, f"expected one judge call, saw {len(judged)}"
    return judged[0]


@pytest.mark.parametrize("question", QUESTIONS)
@pytest.mark.parametrize("model", GUARD_MODELS)
def test_a_real_guard_allows_only_on_a_real_allow_verdict(stack, clients, token, model, question):
    outcome, text, _ = ask(clients, model, f"{question} {token}")
    judge = judge_exchange(stack, token)
    wanted_format = None if model.endswith("-prompt") else {"type": "json_object", "schema": relay_plugin.VERDICT_SCHEMA}
    assert judge.response_format == wanted_format
    (primary,) = [e for e in stack.tap.find(token) if e is not judge and "strict JSON" not in e.system]
    verdict = verdict_of(judge.text)
    if not judge.text.strip():
        assert outcome == "failed:empty_response"
    elif verdict is None:
        assert outcome == "failed:bad_verdict", f"the judge said {judge.text!r}"  # never an allow
        assert text == primary.text  # fail-open: the answer, unjudged, and the header says so
    elif verdict == "allow":
        assert (outcome, text) == ("relayed", primary.text)
    else:
        assert (outcome, text) == ("blocked", relay_plugin.DEFAULT_GUARD_MESSAGE)


@pytest.mark.parametrize("model", ["real-escalate", "real-escalate-prompt"])
def test_a_real_escalate_judge_escalates_only_on_a_real_low_score(stack, clients, token, model):
    outcome, text, _ = ask(clients, model, f"Explain gravity in one sentence. {token}")
    judge = judge_exchange(stack, token)
    if model == "real-escalate":
        assert judge.response_format == {"type": "json_object", "schema": relay_plugin.SCORE_SCHEMA}
    score = score_of(judge.text)
    if not judge.text.strip():
        assert outcome == "failed:empty_response"
    elif score is None:  # not a score, or out of 0-10: a failure, never a pass or an escalation
        assert outcome == "failed:bad_verdict", f"the judge said {judge.text!r}"
    elif score < 7:
        assert outcome == "escalated" and text.startswith("gpt-4o says:")
    else:
        assert outcome == "relayed" and not text.startswith("gpt-4o says:")


def test_a_real_judge_that_answers_nothing_fails_as_empty_response_and_keeps_the_answer(stack, clients, token):
    # smollm2-judge-mute stops at "{", the first character its grammar allows: the real model returns ""
    outcome, text, _ = ask(clients, "real-guard-mute", f"What is the capital of Italy? {token}")
    judge = judge_exchange(stack, token)
    assert judge.text == ""
    assert outcome == "failed:empty_response"
    (primary,) = [e for e in stack.tap.find(token) if e is not judge]
    assert text == primary.text


def test_a_real_refiner_answer_becomes_the_clients_answer(stack, clients, token):
    outcome, text, _ = ask(clients, "real-refine", f"Name a fruit. {token}")
    refiner = [e for e in stack.tap.find(token) if "You improve answers" in e.system]
    assert len(refiner) == 1 and refiner[0].text.strip()
    if refiner[0].text.strip() == [e for e in stack.tap.find(token) if e is not refiner[0]][0].text.strip():
        assert outcome == "relayed"
    else:
        assert (outcome, text) == ("modified", refiner[0].text)


def test_the_stack_printed_by_make_real_answers_a_curl_with_the_relay_outcome(stack):
    import httpx

    response = httpx.post(stack.proxy.url + "/v1/chat/completions", timeout=300,
                          headers={"Authorization": f"Bearer {stack.proxy.master_key}"},
                          json={"model": "real-guard", "max_tokens": 16, "temperature": 0,
                                "messages": [{"role": "user", "content": "Name a primary colour."}]})
    assert response.status_code == 200
    assert response.headers["x-relay-outcome"] in ("relayed", "blocked", "failed:bad_verdict", "failed:empty_response")
    assert json.loads(response.text)["choices"][0]["message"]["content"]
