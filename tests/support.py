"""One fake of each kind for the in-process tests: a clock, a secondary, a config, a handler, a chat answer.

A handler built here has no network and no time of its own: its secondary is a :class:`FakeSecondary`,
its monotonic ``clock`` and epoch ``wall`` are :class:`FakeClock` objects that stand still until a test
moves them, and its random draws come from a seeded ``random.Random``.
"""

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import litellm

from relay_plugin import RelayConfig, RelayHandler, Reply

SECONDARY = "openai/sec"  #: the secondary model of a config built here, unless a test names another
QUESTION = "Why is the sky blue?"
PRIMARY = "Because of Rayleigh scattering."  #: the primary's answer of :func:`chat_response`
HANG = "<hang>"  #: a script whose reply never comes: the call waits until it is cancelled


class FakeClock:
    """A clock tests move by hand: call it for the time, ``advance`` it; ``on_advance(seconds)`` follows."""

    def __init__(self, now: float = 1000.0, *, on_advance: Callable[[float], None] | None = None):
        self.now = now
        self.on_advance = on_advance

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
        if self.on_advance is not None:
            self.on_advance(seconds)


@dataclass
class Call:
    """One call the relay made to a :class:`FakeSecondary`, with the arguments it passed."""

    model: str
    messages: list
    max_tokens: int
    timeout: float
    depth: int
    response_format: dict | None = None  #: only judges ask for structured output
    streamed: bool = False  #: the relay passed ``on_delta``: it forwards the answer as it arrives


class FakeSecondary:
    """A scripted secondary, the ``complete`` of ``RelayHandler(config, complete=fake)``: it records every
    call in ``calls``, then answers by its script.

    ``replies`` is one script for every model, or a dict of scripts by model. A script is

    - a text: the answer (sent as one delta when the relay streams it);
    - a tuple of texts: the answer, streamed in those deltas; an exception in it breaks the stream off there,
      an ``asyncio.Event`` holds the rest of the answer until it is set;
    - an exception: raised;
    - a :class:`Reply`: returned as it is;
    - :data:`HANG`: no answer until the call is cancelled;
    - a list of scripts: one per call, in order;
    - a function of ``(model, messages)`` that returns a script.

    ``cost`` is what every answer costs, or a dict of costs by model. A ``gate`` (an ``asyncio.Event``)
    holds every call until it is set; with a ``clock`` each call moves it by ``takes`` seconds;
    ``on_call(model)`` runs as each call starts. Calls cancelled while waiting are listed in ``cancelled``.
    """

    def __init__(self, replies: Any = "refined", *, cost: float | dict[str, float] = 0.0,
                 gate: asyncio.Event | None = None, clock: FakeClock | None = None, takes: float = 0.0,
                 on_call: Callable[[str], None] | None = None):
        self.replies, self.cost, self.gate, self.clock, self.takes = replies, cost, gate, clock, takes
        self.on_call = on_call
        self.calls: list[Call] = []
        self.cancelled: list[str] = []

    async def __call__(self, model: str, messages: list, *, max_tokens: int, timeout: float, depth: int,
                       on_delta: Callable[[str], Any] | None = None, response_format: dict | None = None) -> Reply:
        self.calls.append(Call(model, messages, max_tokens, timeout, depth, response_format, on_delta is not None))
        if self.on_call is not None:
            self.on_call(model)
        script = self._script(model, messages)
        try:
            if self.gate is not None:
                await self.gate.wait()
            if isinstance(script, str) and script == HANG:
                await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.append(model)
            raise
        if self.clock is not None:
            self.clock.advance(self.takes)
        if isinstance(script, BaseException):
            raise script
        if isinstance(script, Reply):
            return script
        pieces = script if isinstance(script, tuple) else (script,)
        for piece in pieces:
            if isinstance(piece, BaseException):
                raise piece
            if isinstance(piece, asyncio.Event):
                await piece.wait()
            elif on_delta is not None:
                await on_delta(piece)
        cost = self.cost[model] if isinstance(self.cost, dict) else self.cost
        return Reply(model=model, text="".join(p for p in pieces if isinstance(p, str)), cost_usd=cost)

    def _script(self, model: str, messages: list) -> Any:
        script = self.replies[model] if isinstance(self.replies, dict) else self.replies
        if isinstance(script, list):
            script = script.pop(0)
        return script(model, messages) if callable(script) else script

    @property
    def models(self) -> list[str]:
        """The model of every call, in order."""
        return [c.model for c in self.calls]


def config(**env: str | None) -> RelayConfig:
    """A config from ``NAME=value`` pairs without the ``RELAY_`` prefix; secondary :data:`SECONDARY` unless
    given; a ``None`` value leaves the variable unset. Bind a file's own defaults with ``functools.partial``."""
    values = {"SECONDARY_MODEL": SECONDARY, **env}
    return RelayConfig.from_env({f"RELAY_{name}": value for name, value in values.items() if value is not None})


def make_handler(complete: Callable[..., Any] | None = None, cfg: RelayConfig | None = None, *,
            clock: Callable[[], float] | None = None, wall: Callable[[], float] | None = None,
            rng: Any = None, **env: str | None) -> RelayHandler:
    """A handler with ``cfg`` (or ``config(**env)``) and the secondary ``complete`` (a FakeSecondary
    answering "refined" unless given); its clocks stand still (monotonic 1000.0, epoch 0.0) unless given."""
    return RelayHandler(cfg or config(**env), complete=complete or FakeSecondary(), clock=clock or FakeClock(),
                        wall=wall or FakeClock(0.0), rng=rng or random.Random(0))


def chat_response(text: str | None = PRIMARY) -> litellm.ModelResponse:
    """A primary's chat completion with one answer, ``text``."""
    return litellm.ModelResponse(
        choices=[{"message": {"role": "assistant", "content": text}, "finish_reason": "stop", "index": 0}], model="m")
