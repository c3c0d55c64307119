"""StreamRelay in process: synthetic primary streams, a scripted secondary, no network."""

import asyncio
from functools import partial

import litellm
import pytest

import relay_plugin
from relay_plugin import INTERRUPTED_NOTE, RelayHandler, SecondaryError
from tests.support import HANG, SECONDARY, FakeSecondary, make_handler


def chat_stream(*pieces: str, finish: str = "stop"):
    """A primary's chat stream: one chunk per piece, then the finish chunk."""
    def chunk(content=None, finish_reason=None, role=None):
        delta = {"content": content} if content is not None else {}
        if role:
            delta["role"] = role
        return litellm.ModelResponseStream(id="c1", created=1, model="llama", choices=[
            {"index": 0, "delta": delta, "finish_reason": finish_reason}])

    async def stream():
        for i, piece in enumerate(pieces):
            yield chunk(piece, role="assistant" if i == 0 else None)
        yield chunk(finish_reason=finish)
    return stream()


#: a handler without retries whose streams send a heartbeat every 20 ms while the secondary works
stream_handler = partial(make_handler, RETRIES="0", STREAM_HEARTBEAT_S="0.02")


async def run(handler, stream, call_id="call-1"):
    data = {"model": "llama", "stream": True, "messages": [{"role": "user", "content": "q"}],
            "litellm_call_id": call_id, "metadata": {}}
    chunks = [c async for c in handler.async_post_call_streaming_iterator_hook(None, stream, data)]
    text = "".join((c.choices[0].delta.content or "") for c in chunks if c.choices)
    relay = [c.relay for c in chunks if hasattr(c, "relay")]
    return chunks, text, relay[-1] if relay else None


async def test_a_streaming_secondary_reaches_the_client_as_it_arrives():
    rest = asyncio.Event()  # the secondary sends the rest of its answer only when this is set
    fake = FakeSecondary(("Better ", rest, "answer."), cost=0.001)
    data = {"model": "llama", "stream": True, "messages": [{"role": "user", "content": "q"}],
            "litellm_call_id": "call-1", "metadata": {}}

    texts, relays = [], []

    async def read() -> None:
        async for chunk in stream_handler(fake).async_post_call_streaming_iterator_hook(None, chat_stream("pri", "mary"), data):
            if chunk.choices and chunk.choices[0].delta.content:
                texts.append(chunk.choices[0].delta.content)
                if texts == ["Better "]:  # the client has the first delta while the secondary is still at work
                    rest.set()
            relays.extend([chunk.relay] if hasattr(chunk, "relay") else [])

    await asyncio.wait_for(read(), 5)  # a relay that held the text until the answer ended would wait forever
    relay = relays[-1]
    assert [call.streamed for call in fake.calls] == [True]
    assert texts == ["Better ", "answer."]
    assert relay["outcome"] == "modified" and relay["cost_usd"] == 0.001


async def test_deltas_that_arrive_together_leave_as_one_chunk():
    """Text that arrived while the relay was writing the last chunk goes out in one chunk: the proxy's work
    per chunk is paid once for them (a loaded proxy, or a network read carrying several events)."""
    fake = FakeSecondary(("Better ", "answer", "."))

    chunks, text, _ = await run(stream_handler(fake), chat_stream("pri", "mary"))
    assert text == "Better answer."
    assert [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content] == ["Better answer."]


async def test_a_secondary_that_breaks_off_mid_answer_is_followed_by_the_primary_answer():
    fake = FakeSecondary(("Half an ans", SecondaryError("connection", "dropped", retryable=True)))

    _, text, relay = await run(stream_handler(fake, RETRIES="2"), chat_stream("the ", "primary"))
    assert text == "Half an ans" + INTERRUPTED_NOTE + "the primary"
    assert relay["outcome"] == "failed:connection"


async def test_heartbeats_flow_while_the_secondary_works_and_carry_no_text():
    fake = FakeSecondary("done", gate=asyncio.Event())
    asyncio.get_running_loop().call_later(0.15, fake.gate.set)  # the secondary answers after 150 ms

    chunks, text, _ = await run(stream_handler(fake), chat_stream("x"))
    empty = [c for c in chunks if c.choices and c.choices[0].delta.content == ""]
    assert len(empty) >= 3
    assert text == "done"


async def test_closing_the_stream_cancels_the_secondary_call():
    fake = FakeSecondary(HANG)
    handler = stream_handler(fake)
    data = {"model": "llama", "stream": True, "messages": [], "litellm_call_id": "c", "metadata": {}}
    stream = handler.async_post_call_streaming_iterator_hook(None, chat_stream("x"), data)
    async for _ in stream:  # the first heartbeat: the secondary is at work
        if fake.calls:
            break
    await stream.aclose()  # what the proxy does when the client goes away
    assert fake.cancelled == [SECONDARY]
    assert relay_plugin._proxy_metadata(data)["relay_result"].result == "failed:client_disconnected"
    assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []


@pytest.mark.parametrize("mode", ["refine", "guard"])
async def test_an_unchanged_answer_goes_out_as_the_primary_chunks(mode):
    fake = FakeSecondary('{"verdict": "allow", "reason": "ok"}' if mode == "guard" else "same text")

    _, text, relay = await run(stream_handler(fake, MODE=mode), chat_stream("same ", "text"))
    assert text == "same text"
    assert relay["outcome"] == "relayed"


async def test_a_stream_of_several_answers_passes_through_and_says_so():
    fake = FakeSecondary()

    async def two_answers():
        for index in (0, 1):
            yield litellm.ModelResponseStream(id="c1", created=1, model="llama", choices=[
                {"index": index, "delta": {"content": f"answer {index}"}, "finish_reason": None}])
        yield litellm.ModelResponseStream(id="c1", created=1, model="llama", choices=[
            {"index": 0, "delta": {}, "finish_reason": "stop"}])

    chunks, _, relay = await run(stream_handler(fake), two_answers())
    assert fake.calls == []  # no secondary call for n > 1
    assert [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content] == ["answer 0", "answer 1"]
    assert relay["outcome"] == "skipped:multiple_choices"


# ----- native Anthropic streams: raw network reads, cut anywhere -----------------------------------

def anthropic_events(*texts: str) -> bytes:
    """A recorded /v1/messages stream (Anthropic's wire format, CRLF line ends as some servers send)."""
    import json

    events = [{"type": "message_start", "message": {"id": "m", "type": "message", "role": "assistant", "content": [],
                                                    "model": "claude", "stop_reason": None, "usage": {"input_tokens": 1}}},
              {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
              {"type": "ping"},
              *({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": t}} for t in texts),
              {"type": "content_block_stop", "index": 0},
              {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 3}},
              {"type": "message_stop"}]
    return b"".join(f"event: {e['type']}\r\ndata: {json.dumps(e)}\r\n\r\n".encode() for e in events)


def reads_of(stream: bytes) -> dict[str, list[bytes]]:
    """Every way a test cuts the stream into network reads."""
    events = [part + b"\r\n\r\n" for part in stream.split(b"\r\n\r\n") if part]
    return {"one event per read": events, "all in one read": [stream],
            "one byte per read": [stream[i:i + 1] for i in range(len(stream))],
            "three reads": [stream[:100], stream[100:401], stream[401:]]}


def every_byte_boundary(stream: bytes) -> list[list[bytes]]:
    return [[stream[:i], stream[i:]] for i in range(1, len(stream))]


async def relay_raw_stream(handler: RelayHandler, reads: list[bytes]) -> tuple[str, list[dict]]:
    import json

    async def upstream():
        for read in reads:
            yield read

    data = {"model": "claude", "stream": True, "messages": [{"role": "user", "content": "q"}], "litellm_metadata": {}}
    out = b"".join([c async for c in handler.async_post_call_streaming_iterator_hook(None, upstream(), data)])
    events = [json.loads(line[5:]) for line in out.decode().splitlines() if line.startswith("data:")]
    text = "".join(e["delta"].get("text", "") for e in events if e["type"] == "content_block_delta")
    return text, events


def answer_in(messages: list[dict]) -> str:
    """The answer a review prompt shows the secondary."""
    return messages[1]["content"].split("<answer-")[1]


def guard_verdict(model: str, messages: list[dict]) -> str:
    """The script of a guard judge: block an answer that says FORBIDDEN."""
    verdict = "block" if "FORBIDDEN" in answer_in(messages) else "allow"
    return f'{{"verdict": "{verdict}", "reason": "r"}}'


BLOCKED_STREAM = anthropic_events("It is FORB", "IDDEN to say.")
ALLOWED_STREAM = anthropic_events("A fine ", "answer.")


@pytest.mark.parametrize("cut", list(reads_of(BLOCKED_STREAM)))
async def test_a_native_anthropic_stream_cut_anywhere_is_judged_as_one_text_and_blocked(cut):
    judge = FakeSecondary(guard_verdict)
    text, events = await relay_raw_stream(stream_handler(judge, MODE="guard"), reads_of(BLOCKED_STREAM)[cut])
    assert len(judge.calls) == 1 and "It is FORBIDDEN to say." in answer_in(judge.calls[0].messages)
    assert text == relay_plugin.DEFAULT_GUARD_MESSAGE
    assert [e["relay"]["outcome"] for e in events if "relay" in e] == ["blocked"]


@pytest.mark.parametrize("cut", list(reads_of(ALLOWED_STREAM)))
async def test_a_native_anthropic_stream_cut_anywhere_passes_whole_with_one_relay_object(cut):
    handler = stream_handler(FakeSecondary(guard_verdict), MODE="guard")
    text, events = await relay_raw_stream(handler, reads_of(ALLOWED_STREAM)[cut])
    assert text == "A fine answer."
    assert [e["relay"]["outcome"] for e in events if "relay" in e] == ["relayed"]
    assert [e["type"] for e in events] == ["message_start", "content_block_start", "ping", "content_block_delta",
                                           "content_block_delta", "content_block_stop", "message_delta", "message_stop"]


@pytest.mark.parametrize("cut", ["one event per read", "all in one read", "three reads", "one byte per read"])
async def test_refine_of_a_native_anthropic_stream_replaces_the_text_without_gluing(cut):
    text, events = await relay_raw_stream(stream_handler(FakeSecondary("Refined.")), reads_of(ALLOWED_STREAM)[cut])
    assert text == "Refined."
    assert [e["relay"]["outcome"] for e in events if "relay" in e] == ["modified"]


async def test_a_native_anthropic_stream_cut_at_every_byte_boundary_is_judged_whole():
    for stream, expected, outcome in ((BLOCKED_STREAM, relay_plugin.DEFAULT_GUARD_MESSAGE, "blocked"),
                                      (ALLOWED_STREAM, "A fine answer.", "relayed")):
        for reads in every_byte_boundary(stream):
            judge = FakeSecondary(guard_verdict)
            text, events = await relay_raw_stream(stream_handler(judge, MODE="guard"), reads)
            where = f"cut at byte {len(reads[0])}"
            assert len(judge.calls) == 1, where
            assert text == expected, where
            assert [e["relay"]["outcome"] for e in events if "relay" in e] == [outcome], where


@pytest.mark.parametrize("guard", ["buffer", "window"])
async def test_text_a_provider_sends_after_the_end_of_its_stream_is_judged_too(guard):
    def chunk(content=None, finish_reason=None):
        return litellm.ModelResponseStream(id="c1", created=1, model="llama", choices=[
            {"index": 0, "delta": {"content": content} if content else {}, "finish_reason": finish_reason}])

    async def stream():
        yield chunk("A fine answer that fills a window.")
        yield chunk(finish_reason="stop")
        yield chunk("And then something FORBIDDEN.")

    handler = stream_handler(FakeSecondary(guard_verdict), MODE="guard", STREAM_GUARD=guard, STREAM_WINDOW_CHARS="10")
    chunks, text, relay = await run(handler, stream())
    assert "FORBIDDEN" not in "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert relay["outcome"] == "blocked"


async def test_a_secondary_that_breaks_off_after_its_text_went_out_keeps_its_worst_case_on_the_caps(monkeypatch):
    """The provider received the call and generated the text the client read before the stream broke
    off (a dropped connection, a provider error mid-stream): it bills that text, so the call is not
    'refused or never received' and must not settle at 0 on the relay's caps."""
    fake = FakeSecondary(("Half an answer the client read", SecondaryError("connection", "dropped")), cost=0.04)
    handler = stream_handler(fake, BUDGET_USD="1", MAX_CALLS="10", SECONDARY_MAX_TOKENS="38")
    monkeypatch.setattr(handler, "price", lambda model: (2.0 ** -10, 2.0 ** -10))
    monkeypatch.setattr(relay_plugin, "prompt_token_bound", lambda messages: 26)  # worst case: 64 / 1024

    _, text, relay = await run(handler, chat_stream("the ", "primary"))

    assert text.startswith("Half an answer the client read" + INTERRUPTED_NOTE)
    assert relay["outcome"] == "failed:connection"
    assert handler.store.counters == {"spend:0": 0.0625, "calls:0": 1.0}
