"""Fourth round of attacks on the fast path's cost, written by an outside review against commit 5c4bc90
(_litellm_cost passing litellm's own arguments; a stream keeping its chunk-named model). Same reference as the third round:
``_books`` (completion_cost with the arguments Logging.response_cost_calculator passes) for routed
deployments, and ``_litellms_stream_cost`` (stream_chunk_builder over the config iterator's chunks)
for streams."""

import pytest

import relay_plugin
from tests.test_fast_cost_attacks import _read
from tests.test_fast_cost_attacks3 import _books, _openai, _routed


def test_an_unpriced_base_model_falls_back_as_litellm_does(cost_map):
    """_litellm_cost passes model=base_model when the deployment has no custom pricing; litellm's call
    passes model=the backend model (base_model separately). completion_cost tries the selected name
    (base_model), then the answer's model, then ``model``: with a base_model the cost map does not know
    (a typo, a name from a newer cost map) and an answer naming an unknown model, litellm books the
    backend gpt-4o (0.0075) and the fast path, whose last candidate is the base_model again, returns
    None: "unpriced" for a call litellm prices."""
    deployment, wire = _routed("openai/gpt-4o", {"base_model": "gpt-4o-not-in-the-cost-map"})
    answer = _read(wire, _openai("gateway-route-7"))
    books = _books(answer, deployment, wire)
    assert books == pytest.approx(1000 * 2.5e-6 + 500 * 10e-6)
    assert relay_plugin._fast_cost(answer, wire) == pytest.approx(books, rel=1e-9)


def test_a_stream_keeps_the_model_stream_chunk_builder_keeps(monkeypatch, cost_map):
    """Not the last chunk's model: litellm's stream_chunk_builder keeps the first model that differs
    from the first chunk's (ChunkProcessor._get_model_from_chunks, for Azure's model router), else the
    first chunk's. A gateway whose chunks name gpt-4o-mini,
    gpt-4o-2024-05-13, gpt-4o-mini is booked by litellm at gpt-4o-2024-05-13 (0.0125); at the last
    chunk's gpt-4o-mini it would be 0.00045."""
    from tests.test_fast_cost_attacks2 import _fast_stream_cost, _litellms_stream_cost, _openai_stream, _sse, _wire

    events = _openai_stream("gpt-4o-mini")
    events[1]["model"] = "gpt-4o-2024-05-13"
    wire = _wire("gpt-4o", stream=True)
    lines = _sse(events)
    theirs = _litellms_stream_cost(wire, lines)
    assert theirs == pytest.approx(1000 * 5e-6 + 500 * 15e-6)
    assert _fast_stream_cost(wire, lines, monkeypatch) == pytest.approx(theirs, rel=1e-9)
