"""StreamRelay in process, per stream format and strategy: a primary stream built from a list of chunks,
a scripted secondary, and what the client receives. No network: each test takes milliseconds.

- the window guard (RELAY_STREAM_GUARD=window) on chat streams;
- /v1/messages: Anthropic SSE events as the raw bytes the proxy reads, cut anywhere across reads;
- /v1/responses: litellm's typed Responses events;
each under every stream strategy (pass: annotate, shadow; buffer: refine, guard; window: guard), and with
the streams the relay leaves alone or judges whole (tool calls, several choices, text after the end).

The handler builder and the scripted secondary are local to this file (tests/support.py may take them over).
"""

import asyncio
import json
import re

import litellm
import pytest
from litellm.llms.openai.responses.transformation import OpenAIResponsesAPIConfig

from relay_plugin import DEFAULT_GUARD_MESSAGE, RelayConfig, RelayHandler, Reply, SecondaryError

REFUSAL = DEFAULT_GUARD_MESSAGE


# ----- the secondary, the handler, the primary -------------------------------------------------------

class Secondary:
    """A scripted secondary: ``reply(answer)`` is its text for the answer it is shown (or raises);
    ``answers`` records what it was shown, in order. With ``on_delta`` it streams its text in two halves,
    10 ms apart (the relay sends together what arrives while it writes)."""

    def __init__(self, reply):
        self.reply, self.answers = reply, []

    async def __call__(self, model, messages, *, max_tokens, timeout, depth, on_delta=None, **_):
        content = messages[-1]["content"]
        shown = re.search(r"<answer-(\w+)>\n(.*)\n</answer-\1>", content, re.S)
        self.answers.append(shown.group(2) if shown else content)
        text = self.reply(self.answers[-1])
        if on_delta is not None:
            for i, half in enumerate(halves(text)):
                if i:
                    await asyncio.sleep(0.01)
                await on_delta(half)
        return Reply(model, text, 0.0)


def halves(text: str) -> list[str]:
    return [text[:len(text) // 2], text[len(text) // 2:]]


def judge(answer: str) -> str:
    """A guard judge: it blocks what says FORBIDDEN."""
    verdict = "block" if "FORBIDDEN" in answer else "allow"
    return json.dumps({"verdict": verdict, "reason": "r"})


def failing(reason: str = "timeout"):
    def reply(answer: str) -> str:
        raise SecondaryError(reason, "scripted failure")
    return reply


def handler_for(secondary, **env) -> RelayHandler:
    config = RelayConfig.from_env({"RELAY_SECONDARY_MODEL": "sec", "RELAY_RETRIES": "0",
                                   "RELAY_STREAM_HEARTBEAT_S": "5", **env})
    return RelayHandler(config, complete=secondary)


def window_guard(secondary, **env) -> RelayHandler:
    return handler_for(secondary, RELAY_MODE="guard", RELAY_STREAM_GUARD="window", RELAY_STREAM_WINDOW_CHARS="10",
                       **env)


class Primary:
    """A primary stream from a list of chunks; it counts the chunks read and sees being closed."""

    def __init__(self, chunks: list):
        self.chunks, self.read, self.closed = list(chunks), 0, False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.read == len(self.chunks):
            raise StopAsyncIteration
        self.read += 1
        return self.chunks[self.read - 1]

    async def aclose(self):
        self.closed = True


async def relay(handler: RelayHandler, primary: Primary, data: dict | None = None, on_chunk=None) -> list:
    """What the client receives; ``on_chunk(chunk)`` is called as each chunk arrives."""
    data = data or {"model": "llama", "stream": True, "messages": [{"role": "user", "content": "q"}], "metadata": {}}
    out = []
    async for chunk in handler.async_post_call_streaming_iterator_hook(None, primary, data):
        out.append(chunk)
        if on_chunk is not None:
            on_chunk(chunk)
    return out


# ----- chat streams ----------------------------------------------------------------------------------

def chat_chunk(content=None, finish=None, index=0, role=None, tool=None):
    delta = {"content": content} if content is not None else {}
    if role:
        delta["role"] = role
    if tool is not None:
        delta["tool_calls"] = [{"index": 0, "id": "call_1", "type": "function",
                                "function": {"name": "lookup", "arguments": tool}}]
    return litellm.ModelResponseStream(id="c1", created=1, model="llama", choices=[
        {"index": index, "delta": delta, "finish_reason": finish}])


def chat(*pieces: str, finish: str = "stop") -> list:
    return [chat_chunk(role="assistant"), *(chat_chunk(p) for p in pieces), chat_chunk(finish=finish)]


def chat_text(chunks: list, index: int = 0) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == index)


def finish_reasons(chunks: list) -> list:
    return [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]


def relay_objects(chunks: list) -> list[dict]:
    return [c.relay for c in chunks if hasattr(c, "relay")]


# ----- guard=window, chat ----------------------------------------------------------------------------

CLEAN = ["One. ", "Two. ", "Three", "Four.", "Five ", "six. ", "Seven"]  # 35 characters: windows of 10, 10, 10, 5


async def test_a_window_guard_releases_each_window_only_after_the_judge_saw_it():
    secondary = Secondary(judge)
    sent = []

    def on_chunk(chunk):  # what the client has now must all have been judged already
        sent.append(chat_text([chunk]))
        assert "".join(sent) == "" or secondary.answers[-1].startswith("".join(sent))

    primary = Primary(chat(*CLEAN))
    chunks = await relay(window_guard(secondary), primary, on_chunk=on_chunk)

    whole = "".join(CLEAN)
    assert secondary.answers == [whole[:10], whole[:20], whole[:30], whole]  # the whole answer so far, each time
    assert chat_text(chunks) == whole
    assert [c for c in chunks if chat_text([c])] == primary.chunks[1:-1]  # the primary's own chunks
    assert finish_reasons(chunks) == ["stop"]
    assert [r["outcome"] for r in relay_objects(chunks)] == ["relayed"]


async def test_a_window_guard_block_stops_the_stream_before_the_offending_window_reaches_the_client():
    secondary = Secondary(judge)
    primary = Primary(chat("Fine one. ", "Fine two. ", "FORBIDDEN!", "never read", "nor this.."))
    chunks = await relay(window_guard(secondary), primary)

    assert chat_text(chunks) == "Fine one. Fine two. \n\n" + REFUSAL
    assert not any("FORBIDDEN" in chat_text([c]) for c in chunks)
    assert finish_reasons(chunks) == ["content_filter"]
    assert [r["outcome"] for r in relay_objects(chunks)] == ["blocked"]
    assert len(secondary.answers) == 3
    assert primary.read == 4 and primary.closed  # role chunk and three windows: the rest is never read


async def test_a_block_in_the_last_short_window_ends_with_the_primary_finish_marked_content_filter():
    primary = Primary(chat("Fine one. ", "FORBIDDEN"))
    chunks = await relay(window_guard(Secondary(judge)), primary)

    assert chat_text(chunks) == "Fine one. \n\n" + REFUSAL
    assert finish_reasons(chunks) == ["content_filter"]
    assert [r["outcome"] for r in relay_objects(chunks)] == ["blocked"]


async def test_a_window_guard_that_blocks_the_first_window_sends_only_the_refusal():
    chunks = await relay(window_guard(Secondary(judge)), Primary(chat("FORBIDDEN!", "more text.")))

    assert chat_text(chunks) == REFUSAL
    assert finish_reasons(chunks) == ["content_filter"]


@pytest.mark.parametrize("late, text, outcome", [
    ("And then more.", "A fine answer.And then more.", "relayed"),
    ("And then FORBIDDEN.", "A fine answer.\n\n" + REFUSAL, "blocked"),
])
async def test_text_after_the_end_of_a_window_guarded_stream_is_judged_with_the_whole_answer(late, text, outcome):
    secondary = Secondary(judge)
    primary = Primary([chat_chunk("A fine answer."), chat_chunk(finish="stop"), chat_chunk(late)])
    chunks = await relay(window_guard(secondary), primary)

    assert secondary.answers[-1] == "A fine answer." + late
    assert chat_text(chunks) == text
    assert [r["outcome"] for r in relay_objects(chunks)] == [outcome]


async def test_a_window_guard_that_cannot_judge_fails_open_with_the_whole_answer():
    chunks = await relay(window_guard(Secondary(failing("timeout"))), Primary(chat(*CLEAN)))

    assert chat_text(chunks) == "".join(CLEAN)
    assert [r["outcome"] for r in relay_objects(chunks)] == ["failed:timeout"]


async def test_a_window_guard_that_cannot_judge_fails_closed_with_the_refusal_and_no_unjudged_text():
    primary = Primary(chat(*CLEAN))
    chunks = await relay(window_guard(Secondary(failing("timeout")), RELAY_FAIL_MODE="closed"), primary)

    assert chat_text(chunks) == REFUSAL
    assert finish_reasons(chunks) == ["content_filter"]
    relay_object, = relay_objects(chunks)
    assert relay_object["outcome"] == "blocked" and "fail-closed" in relay_object["reason"]
    assert primary.closed


async def test_a_later_window_that_cannot_be_judged_fails_closed_after_the_released_text():
    def reply(answer):
        if len(answer) > 10:
            raise SecondaryError("connection", "dropped")
        return judge(answer)

    chunks = await relay(window_guard(Secondary(reply), RELAY_FAIL_MODE="closed"), Primary(chat(*CLEAN)))

    assert chat_text(chunks) == "One. Two. \n\n" + REFUSAL
    assert [r["outcome"] for r in relay_objects(chunks)] == ["blocked"]


async def test_a_window_that_could_not_be_judged_stays_in_the_outcome_when_a_later_one_is_judged():
    def reply(answer):
        if len(answer) == 10:
            raise SecondaryError("connection", "dropped")
        return judge(answer)

    secondary = Secondary(reply)
    chunks = await relay(window_guard(secondary), Primary(chat(*CLEAN)))

    assert len(secondary.answers) == 4
    assert chat_text(chunks) == "".join(CLEAN)
    assert [r["outcome"] for r in relay_objects(chunks)] == ["failed:connection"]


def two_choices(second: str) -> list:
    return [chat_chunk("Answer zero is fine.", role="assistant"), chat_chunk(second, index=1),
            chat_chunk(finish="stop"), chat_chunk(finish="stop", index=1)]


@pytest.mark.parametrize("second, outcome", [("Answer one is fine.", "relayed"), ("Answer one: FORBIDDEN.", "blocked")])
async def test_a_window_guard_judges_every_choice_of_a_stream_of_several_answers(second, outcome):
    secondary = Secondary(judge)
    chunks = await relay(window_guard(secondary), Primary(two_choices(second)))

    assert secondary.answers[-1] == second  # each choice judged as one answer
    assert [r["outcome"] for r in relay_objects(chunks)] == [outcome]
    if outcome == "blocked":
        assert chat_text(chunks, index=1) == "" and "FORBIDDEN" not in str([c.model_dump() for c in chunks])
        assert chat_text(chunks) == "Answer zero is fine.\n\n" + REFUSAL  # the first window was out already
    else:
        assert chat_text(chunks, index=1) == second


@pytest.mark.parametrize("arguments, outcome", [('{"q": "tea"}', "relayed"), ('{"q": "FORBIDDEN"}', "blocked")])
async def test_a_window_guard_judges_tool_call_arguments_with_the_text(arguments, outcome):
    secondary = Secondary(judge)
    primary = Primary([chat_chunk("Let me look.", role="assistant"), chat_chunk(tool=arguments),
                       chat_chunk(finish="tool_calls")])
    chunks = await relay(window_guard(secondary), primary)

    assert arguments in secondary.answers[-1]
    assert [r["outcome"] for r in relay_objects(chunks)] == [outcome]
    tool_calls = [c for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert len(tool_calls) == (1 if outcome == "relayed" else 0)


async def test_a_window_guard_reads_a_tool_call_after_released_text_on_a_line_of_its_own():
    secondary = Secondary(judge)
    primary = Primary([chat_chunk("Let me look it up.", role="assistant"), chat_chunk(tool='{"q": "tea"}'),
                       chat_chunk(finish="tool_calls")])
    chunks = await relay(window_guard(secondary), primary)

    assert secondary.answers == ["Let me look it up.", 'Let me look it up.\n[tool call lookup] {"q": "tea"}']
    assert chunks[:3] == primary.chunks
    assert [r["outcome"] for r in relay_objects(chunks)] == ["relayed"]


async def test_text_held_below_a_window_when_a_tool_call_begins_is_judged_and_sent_with_it():
    secondary = Secondary(judge)
    primary = Primary([chat_chunk("Short.", role="assistant"), chat_chunk(tool='{"q": "tea"}'),
                       chat_chunk(finish="tool_calls")])
    chunks = await relay(window_guard(secondary), primary)

    assert secondary.answers == ['Short.\n[tool call lookup] {"q": "tea"}']
    assert chunks[:3] == primary.chunks
    assert [r["outcome"] for r in relay_objects(chunks)] == ["relayed"]


def tool_call_stream() -> list:
    return [chat_chunk("Let me look.", role="assistant"), chat_chunk(tool='{"q": "tea"}'),
            chat_chunk(finish="tool_calls")]


@pytest.mark.parametrize("mode", ["annotate", "shadow"])
@pytest.mark.parametrize("stream, outcome", [(lambda: two_choices("Answer one."), "skipped:multiple_choices"),
                                             (tool_call_stream, "skipped:tool_calls")])
async def test_a_passed_stream_the_relay_leaves_alone_is_untouched_and_still_ends_with_the_relay_object(
        mode, stream, outcome):
    secondary = Secondary(lambda answer: "analysis")
    handler = handler_for(secondary, RELAY_MODE=mode)
    primary = Primary(stream())
    chunks = await relay(handler, primary)
    await asyncio.gather(*handler.shadow_tasks)

    assert chunks[:-1] == primary.chunks
    assert chunks[-1].choices == [] and [r["outcome"] for r in relay_objects(chunks)] == [outcome]
    assert secondary.answers == []


# ----- /v1/messages: Anthropic SSE events, raw bytes --------------------------------------------------

def anthropic(*texts: str, tool_input: str | None = None, thinking: str | None = None) -> list[dict]:
    """The events of a /v1/messages stream: an optional thinking block, a text block, an optional tool_use."""
    blocks = []
    if thinking is not None:
        blocks.append([{"type": "content_block_start", "content_block": {"type": "thinking", "thinking": ""}},
                       {"type": "content_block_delta", "delta": {"type": "thinking_delta", "thinking": thinking}},
                       {"type": "content_block_delta", "delta": {"type": "signature_delta", "signature": "sig"}}])
    blocks.append([{"type": "content_block_start", "content_block": {"type": "text", "text": ""}},
                   *({"type": "content_block_delta", "delta": {"type": "text_delta", "text": t}} for t in texts)])
    if tool_input is not None:
        blocks.append([{"type": "content_block_start",
                        "content_block": {"type": "tool_use", "id": "tu_1", "name": "lookup", "input": {}}},
                       {"type": "content_block_delta",
                        "delta": {"type": "input_json_delta", "partial_json": tool_input}}])
    events = [{"type": "message_start", "message": {"id": "m", "type": "message", "role": "assistant", "content": [],
                                                    "model": "claude", "stop_reason": None,
                                                    "usage": {"input_tokens": 1}}},
              {"type": "ping"}]
    for index, block in enumerate(blocks):
        events += [{**event, "index": index} for event in block] + [{"type": "content_block_stop", "index": index}]
    stop = "tool_use" if tool_input is not None else "end_turn"
    return events + [{"type": "message_delta", "delta": {"stop_reason": stop}, "usage": {"output_tokens": 3}},
                     {"type": "message_stop"}]


def sse(events: list[dict]) -> bytes:
    return b"".join(f"event: {e['type']}\r\ndata: {json.dumps(e)}\r\n\r\n".encode() for e in events)


CUTS = {"one event per read": lambda raw: [e + b"\r\n\r\n" for e in raw.split(b"\r\n\r\n") if e],
        "reads of 7 bytes": lambda raw: [raw[i:i + 7] for i in range(0, len(raw), 7)],
        "all in one read": lambda raw: [raw]}


def decoded(chunks: list) -> list[dict]:
    raw = b"".join(c if isinstance(c, bytes) else c.encode() for c in chunks)
    return [json.loads(line[5:]) for line in raw.decode().splitlines() if line.startswith("data:")]


def messages_text(events: list[dict]) -> str:
    return "".join(e["delta"].get("text", "") for e in events if e["type"] == "content_block_delta")


def messages_relay(events: list[dict]) -> list[dict]:
    return [e["relay"] for e in events if "relay" in e]


def without_relay(events: list[dict]) -> list[dict]:
    return [{k: v for k, v in e.items() if k != "relay"} for e in events]


MESSAGES_REQUEST = {"model": "claude", "stream": True, "max_tokens": 100,
                    "messages": [{"role": "user", "content": "q"}], "litellm_metadata": {}}


async def relay_messages(handler, events: list[dict], cut: str = "one event per read", primary: Primary | None = None):
    primary = primary or Primary(CUTS[cut](sse(events)))
    return decoded(await relay(handler, primary, dict(MESSAGES_REQUEST)))


@pytest.mark.parametrize("cut", list(CUTS))
async def test_an_annotated_messages_stream_passes_its_events_and_appends_the_analysis_before_the_end(cut):
    secondary = Secondary(lambda answer: "Looks right.")
    events = anthropic("Two plus ", "two is four.")
    handler = handler_for(secondary, RELAY_MODE="annotate", RELAY_ANNOTATE_TARGET="append")
    out = await relay_messages(handler, events, cut)

    assert secondary.answers == ["Two plus two is four."]
    assert messages_text(out) == "Two plus two is four.\n\n---\nReview by sec:\nLooks right."
    assert without_relay(out[:5]) == events[:5]  # text went out as it came
    assert [e["type"] for e in out[-2:]] == ["message_delta", "message_stop"]  # the analysis is in before the end
    assert [r["outcome"] for r in messages_relay(out)] == ["modified"]


async def test_an_appended_analysis_on_messages_goes_into_the_text_block_before_its_stop():
    secondary = Secondary(lambda answer: "Looks right.")
    handler = handler_for(secondary, RELAY_MODE="annotate", RELAY_ANNOTATE_TARGET="append")
    events = anthropic("Two plus ", "two is four.", thinking="hmm")
    out = await relay_messages(handler, events)

    assert [e["type"] for e in out] == ["message_start", "ping",
                                        "content_block_start", "content_block_delta", "content_block_delta",
                                        "content_block_stop",  # the thinking block's stop goes out as it came
                                        "content_block_start", "content_block_delta", "content_block_delta",
                                        "content_block_delta", "content_block_stop", "message_delta", "message_stop"]
    assert out[-4]["delta"]["text"] == "\n\n---\nReview by sec:\nLooks right." and out[-4]["index"] == 1
    assert out[-3] == {"type": "content_block_stop", "index": 1}


async def test_a_shadowed_messages_stream_is_untouched_and_analysed_after_the_end():
    secondary = Secondary(lambda answer: "analysis")
    handler = handler_for(secondary, RELAY_MODE="shadow")
    events = anthropic("A plain ", "answer.")
    out = await relay_messages(handler, events, "reads of 7 bytes")
    await asyncio.gather(*handler.shadow_tasks)

    assert without_relay(out) == events
    assert [r["outcome"] for r in messages_relay(out)] == ["relayed"]
    assert secondary.answers == ["A plain answer."]


@pytest.mark.parametrize("cut", list(CUTS))
async def test_a_refined_messages_stream_streams_the_secondary_answer_in_the_primary_text_block(cut):
    secondary = Secondary(lambda answer: "A refined answer.")
    events = anthropic("A rough ", "answer.", thinking="hmm")
    out = await relay_messages(handler_for(secondary, RELAY_MODE="refine"), events, cut)

    assert secondary.answers == ["A rough answer."]  # the thinking is not the answer
    assert messages_text(out) == "A refined answer."
    assert [e["delta"]["text"] for e in out if e["type"] == "content_block_delta"
            and e["delta"]["type"] == "text_delta"] == halves("A refined answer.")  # as the secondary sent them
    assert {e["index"] for e in out if e["type"] == "content_block_delta" and e["delta"]["type"] == "text_delta"} == {1}
    assert [r["outcome"] for r in messages_relay(out)] == ["modified"]


@pytest.mark.parametrize("cut", list(CUTS))
async def test_a_buffer_guard_on_messages_judges_the_tool_input_and_sends_only_the_refusal(cut):
    secondary = Secondary(judge)
    out = await relay_messages(handler_for(secondary, RELAY_MODE="guard"),
                               anthropic("Looking it up.", tool_input='{"q": "FORBIDDEN"}'), cut)

    assert secondary.answers == ['Looking it up.\n[tool call lookup] {"q": "FORBIDDEN"}']
    assert "FORBIDDEN" not in json.dumps(out)
    assert messages_text(out) == REFUSAL
    assert [e["delta"]["stop_reason"] for e in out if e["type"] == "message_delta"] == ["refusal"]
    assert [r["outcome"] for r in messages_relay(out)] == ["blocked"]


@pytest.mark.parametrize("cut", list(CUTS))
async def test_a_window_guard_on_messages_releases_judged_windows_and_ends_its_own_block_on_a_block(cut):
    secondary = Secondary(judge)
    events = anthropic("Fine one. ", "Fine two. ", "FORBIDDEN!", "never read")
    primary = Primary(CUTS[cut](sse(events)))
    out = await relay_messages(window_guard(secondary), events, primary=primary)

    assert messages_text(out) == "Fine one. Fine two. \n\n" + REFUSAL
    assert "FORBIDDEN" not in json.dumps(out)
    assert [e["type"] for e in out] == ["message_start", "ping", "content_block_start", "content_block_delta",
                                        "content_block_delta", "content_block_delta", "content_block_stop",
                                        "message_delta", "message_stop"]
    assert {e.get("index") for e in out if e["type"].startswith("content_block")} == {0}
    assert [e["delta"]["stop_reason"] for e in out if e["type"] == "message_delta"] == ["refusal"]
    assert [r["outcome"] for r in messages_relay(out)] == ["blocked"]
    assert primary.closed
    assert primary.read < len(primary.chunks) or cut == "all in one read"  # not read past the blocked window


async def test_a_window_guard_that_blocks_the_first_window_on_messages_still_opens_the_message_and_its_block():
    events = anthropic("FORBIDDEN!", "never read", thinking="hmm")
    out = await relay_messages(window_guard(Secondary(judge)), events)

    assert [e["type"] for e in out] == ["message_start", "ping", "content_block_start", "content_block_delta",
                                        "content_block_delta", "content_block_stop", "content_block_start",
                                        "content_block_delta", "content_block_stop", "message_delta", "message_stop"]
    assert out[:6] == events[:6]  # the thinking block keeps the text block's index valid
    assert messages_text(out) == REFUSAL and out[-4]["index"] == 1
    assert [r["outcome"] for r in messages_relay(out)] == ["blocked"]


@pytest.mark.parametrize("cut", list(CUTS))
async def test_a_window_guard_on_messages_passes_a_clean_stream_event_for_event(cut):
    secondary = Secondary(judge)
    events = anthropic(*CLEAN)
    out = await relay_messages(window_guard(secondary), events, cut)

    assert without_relay(out) == events
    assert secondary.answers[-1] == "".join(CLEAN) and len(secondary.answers) == 4
    assert [r["outcome"] for r in messages_relay(out)] == ["relayed"]


@pytest.mark.parametrize("mode", ["refine", "annotate", "shadow"])
async def test_a_messages_stream_with_a_tool_call_passes_untouched_in_a_replacing_or_pass_mode(mode):
    secondary = Secondary(lambda answer: "something else")
    handler = handler_for(secondary, RELAY_MODE=mode)
    events = anthropic("Let me look.", tool_input='{"q": "tea"}')
    out = await relay_messages(handler, events, "reads of 7 bytes")
    await asyncio.gather(*handler.shadow_tasks)

    assert without_relay(out) == events
    assert secondary.answers == []
    assert [e["type"] for e in out if "relay" in e] == ["message_delta"]
    assert [r["outcome"] for r in messages_relay(out)] == ["skipped:tool_calls"]


@pytest.mark.parametrize("tool_input, outcome", [('{"q": "tea"}', "relayed"), ('{"q": "FORBIDDEN"}', "blocked")])
async def test_a_window_guard_on_messages_judges_a_tool_call_whole_with_the_released_text(tool_input, outcome):
    secondary = Secondary(judge)
    out = await relay_messages(window_guard(secondary), anthropic("Let me look it up.", tool_input=tool_input))

    assert secondary.answers[-1] == f"Let me look it up.\n[tool call lookup] {tool_input}"
    assert [r["outcome"] for r in messages_relay(out)] == [outcome]
    if outcome == "blocked":
        assert messages_text(out) == "Let me look it up.\n\n" + REFUSAL and "FORBIDDEN" not in json.dumps(out)


# ----- /v1/responses: typed events -------------------------------------------------------------------

def responses(*texts: str, arguments: str | None = None, late: str | None = None) -> list:
    """The events of a /v1/responses stream: one message, then an optional function call or a second message."""
    def response(status, output):
        return {"id": "resp_1", "object": "response", "created_at": 1, "model": "gpt", "status": status,
                "output": output}

    def message(item_id, text, status="completed"):
        return {"type": "message", "id": item_id, "role": "assistant", "status": status,
                "content": [{"type": "output_text", "text": text, "annotations": []}] if text is not None else []}

    def message_events(item_id, index, parts):
        where = {"item_id": item_id, "output_index": index, "content_index": 0}
        text = "".join(parts)
        return [{"type": "response.output_item.added", "output_index": index,
                 "item": message(item_id, None, "in_progress")},
                {"type": "response.content_part.added", **where,
                 "part": {"type": "output_text", "text": "", "annotations": []}},
                *({"type": "response.output_text.delta", **where, "delta": t} for t in parts),
                {"type": "response.output_text.done", **where, "text": text},
                {"type": "response.content_part.done", **where,
                 "part": {"type": "output_text", "text": text, "annotations": [], "logprobs": None}},
                {"type": "response.output_item.done", "output_index": index, "item": message(item_id, text)}]

    events = [{"type": "response.created", "response": response("in_progress", [])},
              {"type": "response.in_progress", "response": response("in_progress", [])},
              *message_events("msg_1", 0, texts)]
    output = [message("msg_1", "".join(texts))]
    if arguments is not None:
        call = {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "lookup", "arguments": arguments,
                "status": "completed"}
        events += [{"type": "response.output_item.added", "output_index": 1,
                    "item": {**call, "arguments": "", "status": "in_progress"}},
                   {"type": "response.function_call_arguments.delta", "item_id": "fc_1", "output_index": 1,
                    "delta": arguments},
                   {"type": "response.function_call_arguments.done", "item_id": "fc_1", "output_index": 1,
                    "arguments": arguments},
                   {"type": "response.output_item.done", "output_index": 1, "item": call}]
        output.append(call)
    if late is not None:
        events += message_events("msg_2", 1, [late])
        output.append(message("msg_2", late))
    events.append({"type": "response.completed", "response": response("completed", output)})
    return [OpenAIResponsesAPIConfig.get_event_model_class(e["type"])(**e) for e in events]


RESPONSES_REQUEST = {"model": "gpt", "stream": True, "input": "q", "litellm_metadata": {}}


def kind(event) -> str:
    return str(getattr(event.type, "value", event.type))


def deltas(events: list) -> str:
    return "".join(e.delta for e in events if kind(e) == "response.output_text.delta")


def completed(events: list) -> list:
    return [e.response for e in events if kind(e) == "response.completed"]


def responses_relay(events: list) -> list[dict]:
    return [r.relay for r in completed(events) if hasattr(r, "relay")]


def final_text(events: list) -> str:
    response, = completed(events)
    return "".join(part.text if hasattr(part, "text") else part["text"]
                   for item in response.output if (item.type if hasattr(item, "type") else item["type"]) == "message"
                   for part in (item.content if hasattr(item, "content") else item["content"]))


async def relay_responses(handler, events: list, primary: Primary | None = None) -> list:
    return await relay(handler, primary or Primary(events), dict(RESPONSES_REQUEST))


async def test_an_annotated_responses_stream_passes_its_deltas_and_appends_the_analysis_to_the_done_events():
    secondary = Secondary(lambda answer: "Looks right.")
    events = responses("Two plus ", "two is four.")
    out = await relay_responses(handler_for(secondary, RELAY_MODE="annotate", RELAY_ANNOTATE_TARGET="append"), events)

    whole = "Two plus two is four.\n\n---\nReview by sec:\nLooks right."
    assert out[:6] == events[:6]  # the deltas went out as they came
    assert deltas(out) == whole
    assert [e.text for e in out if kind(e) == "response.output_text.done"] == [whole]
    assert final_text(out) == whole
    assert [r["outcome"] for r in responses_relay(out)] == ["modified"]


async def test_a_shadowed_responses_stream_is_untouched_and_analysed_after_the_end():
    secondary = Secondary(lambda answer: "analysis")
    handler = handler_for(secondary, RELAY_MODE="shadow")
    events = responses("A plain ", "answer.")
    out = await relay_responses(handler, events)
    await asyncio.gather(*handler.shadow_tasks)

    assert out == events and deltas(out) == "A plain answer."
    assert [r["outcome"] for r in responses_relay(out)] == ["relayed"]
    assert secondary.answers == ["A plain answer."]


async def test_a_refined_responses_stream_streams_the_secondary_answer_and_patches_the_done_events():
    secondary = Secondary(lambda answer: "A refined answer.")
    out = await relay_responses(handler_for(secondary, RELAY_MODE="refine"), responses("A rough ", "answer."))

    assert secondary.answers == ["A rough answer."]
    assert [e.delta for e in out if kind(e) == "response.output_text.delta"] == halves("A refined answer.")
    assert [e.text for e in out if kind(e) == "response.output_text.done"] == ["A refined answer."]
    assert final_text(out) == "A refined answer."
    assert [r["outcome"] for r in responses_relay(out)] == ["modified"]


@pytest.mark.parametrize("arguments, outcome", [('{"q": "tea"}', "relayed"), ('{"q": "FORBIDDEN"}', "blocked")])
async def test_a_buffer_guard_on_responses_judges_the_function_call_with_the_text(arguments, outcome):
    secondary = Secondary(judge)
    events = responses("Looking it up.", arguments=arguments)
    out = await relay_responses(handler_for(secondary, RELAY_MODE="guard"), events)

    assert secondary.answers == [f"Looking it up.\n[tool call lookup] {arguments}"]
    assert [r["outcome"] for r in responses_relay(out)] == [outcome]
    if outcome == "relayed":
        assert out == events and out[-1] is events[-1]  # the message's done events before the function call
    else:
        assert "FORBIDDEN" not in str([e.model_dump() for e in out])
        assert deltas(out) == REFUSAL and final_text(out) == REFUSAL


async def test_a_window_guard_on_responses_passes_a_clean_stream_event_for_event():
    secondary = Secondary(judge)
    events = responses(*CLEAN)
    out = await relay_responses(window_guard(secondary), events)

    assert out == events
    assert len(secondary.answers) == 4 and secondary.answers[-1] == "".join(CLEAN)
    assert [r["outcome"] for r in responses_relay(out)] == ["relayed"]


async def test_a_window_guard_on_responses_never_sends_the_blocked_window_and_stops_reading():
    secondary = Secondary(judge)
    primary = Primary(responses("Fine one. ", "Fine two. ", "FORBIDDEN!", "never read"))
    out = await relay_responses(window_guard(secondary), [], primary)

    assert deltas(out) == "Fine one. Fine two. \n\n" + REFUSAL
    assert "FORBIDDEN" not in str([e.model_dump() for e in out])
    assert len(secondary.answers) == 3
    assert primary.closed and primary.read < len(primary.chunks)


async def test_a_window_guard_block_on_responses_ends_the_message_and_completes_the_response_with_the_relay():
    primary = Primary(responses("Fine one. ", "Fine two. ", "FORBIDDEN!", "never read"))
    out = await relay_responses(window_guard(Secondary(judge)), [], primary)

    text = "Fine one. Fine two. \n\n" + REFUSAL
    assert [kind(e) for e in out[-5:]] == ["response.output_text.delta", "response.output_text.done",
                                           "response.content_part.done", "response.output_item.done",
                                           "response.completed"]
    assert {(e.item_id, e.output_index, e.content_index) for e in out[-5:-2]} == {("msg_1", 0, 0)}
    assert out[-4].text == out[-3].part.text == text
    assert out[-2].output_index == 0 and out[-2].item.id == "msg_1"
    response = out[-1].response
    assert response.id == "resp_1" and response.status == "incomplete"
    assert final_text(out) == text and "FORBIDDEN" not in str([e.model_dump() for e in out])
    assert [r["outcome"] for r in responses_relay(out)] == ["blocked"]


async def test_a_window_guard_that_blocks_the_first_window_on_responses_still_opens_the_response():
    events = responses("FORBIDDEN!", "never read")
    out = await relay_responses(window_guard(Secondary(judge)), events)

    assert out[:4] == events[:4]  # response.created, in_progress, the message and its part added
    assert deltas(out) == REFUSAL and final_text(out) == REFUSAL
    assert [r["outcome"] for r in responses_relay(out)] == ["blocked"]


@pytest.mark.parametrize("late, outcome", [("A second message.", "relayed"),
                                           ("A FORBIDDEN second message.", "blocked")])
async def test_a_second_responses_message_after_the_first_ended_is_judged_with_it_in_a_window_guard(late, outcome):
    secondary = Secondary(judge)
    events = responses("A fine first message.", late=late)
    out = await relay_responses(window_guard(secondary), events)

    assert secondary.answers[-1] == "A fine first message." + late
    assert [r["outcome"] for r in responses_relay(out)] == [outcome]
    if outcome == "relayed":
        assert deltas(out) == "A fine first message." + late
    else:
        assert deltas(out) == "A fine first message.\n\n" + REFUSAL


@pytest.mark.parametrize("mode", ["refine", "annotate", "shadow"])
async def test_a_responses_stream_with_a_function_call_passes_untouched_without_a_secondary_call(mode):
    secondary = Secondary(lambda answer: "something else")
    handler = handler_for(secondary, RELAY_MODE=mode)
    events = responses("Let me look.", arguments='{"q": "tea"}')
    out = await relay_responses(handler, events)
    await asyncio.gather(*handler.shadow_tasks)

    assert out == events  # in order: the message's done events before the function call's
    assert secondary.answers == []
    assert [r["outcome"] for r in responses_relay(out)] == ["skipped:tool_calls"]
