"""A recording tap between the proxy and the real model, for tests/test_real.py and loadtest/bench_judge.py.

The tap forwards every request to llama.cpp's server unchanged and streams every answer back unchanged
(server-sent events are passed on chunk by chunk as they arrive), and keeps what the real model was asked
and what it said. The tests judge the relay's behaviour against that record: whatever the real judge
answered, the relay must have reacted as its contract says.
"""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web


@dataclass
class Exchange:
    path: str
    body: dict
    status: int = 0
    text: str = ""  #: the answer's text (a stream's deltas joined)
    deltas: list[str] = field(default_factory=list)  #: a stream's text deltas, in order

    @property
    def response_format(self) -> Any:
        return self.body.get("response_format")

    @property
    def system(self) -> str:
        messages = self.body.get("messages") or []
        return str(messages[0].get("content")) if messages and messages[0].get("role") == "system" else ""


class Tap:
    """``with Tap(upstream) as tap: tap.url`` forwards to ``upstream``; ``tap.exchanges`` records."""

    def __init__(self, upstream: str):
        self.upstream = upstream.rstrip("/")
        self.url = ""
        self.exchanges: list[Exchange] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    def find(self, token: str) -> list[Exchange]:
        return [e for e in self.exchanges if token in json.dumps(e.body)]

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            body = {}
        exchange = Exchange(request.path, body if isinstance(body, dict) else {})
        self.exchanges.append(exchange)
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("content-type", "accept", "authorization")}
        async with self._session.request(request.method, self.upstream + request.path_qs, data=raw,
                                         headers=headers) as upstream:
            exchange.status = upstream.status
            kind = upstream.headers.get("Content-Type", "")
            if "text/event-stream" not in kind:
                data = await upstream.read()
                with_text = json.loads(data) if data and "json" in kind else {}
                choices = with_text.get("choices") if isinstance(with_text, dict) else None
                if choices:
                    exchange.text = (choices[0].get("message") or {}).get("content") or ""
                return web.Response(body=data, status=upstream.status, content_type=kind.split(";")[0] or None)
            response = web.StreamResponse(status=upstream.status, headers={"Content-Type": kind})
            await response.prepare(request)
            buffer = b""
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)  # on at once: the tap must not change the cadence
                buffer += chunk
                *events, buffer = buffer.split(b"\n")
                for line in events:
                    self._note_event(exchange, line)
            await response.write_eof()
            return response

    @staticmethod
    def _note_event(exchange: Exchange, line: bytes) -> None:
        text = line.decode("utf-8", "replace").strip()
        if not text.startswith("data:") or text[5:].strip() == "[DONE]":
            return
        try:
            event = json.loads(text[5:])
        except ValueError:
            return
        for choice in event.get("choices") or []:
            delta = (choice.get("delta") or {}).get("content")
            if delta:
                exchange.deltas.append(delta)
                exchange.text += delta

    async def _start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600))
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    def __enter__(self) -> "Tap":
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(self._start())
            ready.set()
            self._loop.run_forever()
            self._loop.run_until_complete(self._stop())
            self._loop.close()

        self._thread = threading.Thread(target=run, name="real-model-tap", daemon=True)
        self._thread.start()
        if not ready.wait(15):
            raise TimeoutError("the tap did not start")
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)


# ----- independent oracles: what the relay's contract says a judge reply means ----------------------


def _json_of(text: str) -> object:
    """The JSON value of ``text`` (a ```json fence around it allowed), or None."""
    stripped = text.strip()
    if stripped.startswith("```") and stripped.endswith("```"):
        stripped = stripped.strip("`").removeprefix("json").strip()
    try:
        return json.loads(stripped)
    except ValueError:
        return None


def verdict_of(text: str) -> str | None:
    """"allow" / "block" when ``text`` is exactly the JSON verdict object the contract accepts (a
    ```json fence around it allowed), else None. Written apart from relay_plugin on purpose."""
    value = _json_of(text)
    if not isinstance(value, dict) or value.get("verdict") not in ("allow", "block"):
        return None
    return value["verdict"] if isinstance(value.get("reason", ""), str) else None


def score_of(text: str) -> float | None:
    """The score when ``text`` is the JSON score object with a number in 0-10, else None."""
    value = _json_of(text)
    score = value.get("score") if isinstance(value, dict) else None
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not 0 <= score <= 10:
        return None
    return float(score) if isinstance(value.get("reason", ""), str) else None
