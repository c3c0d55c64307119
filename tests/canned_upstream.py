"""Two small loopback HTTP servers for the guard-integrity tests.

``CannedProvider`` answers each POST with a scripted reply chosen by a word in the request body: a
provider that sends exactly the bytes a test needs (several choices, thinking blocks, reasoning items,
an error that echoes the caller's key), and writes a stream in the pieces a test asks for (one event per
write, all events in one write, a few bytes per write), the way a network may hand them to LiteLLM.

``HeaderDroppingForwarder`` relays POSTs to one target, keeping only standard headers, like an
intermediary that knows nothing of ``x-relay-*``.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Canned:
    """One scripted reply: a status and a body, or a stream written in ``writes`` pieces."""

    status: int = 200
    body: dict | None = None
    writes: list[bytes] = field(default_factory=list)
    gap_s: float = 0.0  #: pause between two writes (lets each write reach the reader on its own)
    echo_auth: bool = False  #: the body's error message repeats the request's credentials (some gateways do)


def sse(event: dict) -> bytes:
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()


def data_sse(event: dict) -> bytes:
    return f"data: {json.dumps(event)}\n\n".encode()


def pieces(stream: bytes, how: str) -> tuple[list[bytes], float]:
    """``stream`` cut as the test asks: "events" (one event per write, with a gap), "one" (everything in
    one write) or "bytes:N" (N bytes per write, with a gap)."""
    if how == "one":
        return [stream], 0.0
    if how == "events":
        return [part + b"\n\n" for part in stream.split(b"\n\n") if part], 0.02
    size = int(how.split(":")[1])
    return [stream[i:i + size] for i in range(0, len(stream), size)], 0.002


class _Server(ThreadingHTTPServer):
    daemon_threads = True


class CannedProvider:
    """Scripted replies by keyword: ``provider.script("CANNED:x", Canned(...))``; requests are recorded."""

    def __init__(self) -> None:
        self.scripts: dict[str, Canned] = {}
        self.requests: list[dict] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # the body ends when the connection closes: any write pattern works

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                self._send(Canned(200, {"data": [], "object": "list"}))

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("content-length") or 0))
                text = raw.decode("utf-8", "replace")
                owner.requests.append({"path": self.path, "headers": dict(self.headers), "body": text})
                canned = next((c for word, c in owner.scripts.items() if word in text), None)
                self._send(canned or Canned(404, {"error": {"message": "no script for this request"}}))

            def _send(self, canned: Canned) -> None:
                body = canned.body
                if canned.echo_auth:
                    credentials = self.headers.get("authorization") or self.headers.get("x-api-key") or ""
                    body = {"error": {"message": f"Incorrect API key provided: {credentials}. Upstream "
                                                 "http://inference.corp.internal:8443/v1 (cluster prod-eu-7, "
                                                 "user svc-alice) refused it.", "type": "invalid_request_error"}}
                self.send_response(canned.status)
                if canned.writes:
                    self.send_header("content-type", "text/event-stream")
                    self.send_header("cache-control", "no-cache")
                    self.end_headers()
                    for n, piece in enumerate(canned.writes):
                        if n and canned.gap_s:
                            time.sleep(canned.gap_s)
                        self.wfile.write(piece)
                        self.wfile.flush()
                    return
                payload = json.dumps(body or {}).encode()
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def script(self, word: str, canned: Canned) -> str:
        self.scripts[word] = canned
        return word

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


#: headers a plain HTTP intermediary passes on; everything else (x-relay-depth included) is dropped
STANDARD_HEADERS = ("content-type", "authorization", "accept", "user-agent")


class HeaderDroppingForwarder:
    """POSTs to ``target`` with only ``STANDARD_HEADERS``; answers with the target's status and body."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.forwarded = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("content-length") or 0))
                headers = {k: v for k, v in self.headers.items() if k.lower() in STANDARD_HEADERS}
                owner.forwarded += 1
                request = urllib.request.Request(owner.target + self.path, data=raw, headers=headers, method="POST")
                try:
                    with urllib.request.urlopen(request, timeout=120) as reply:
                        status, content_type, body = reply.status, reply.headers.get("content-type"), reply.read()
                except urllib.error.HTTPError as error:
                    status, content_type, body = error.code, error.headers.get("content-type"), error.read()
                self.send_response(status)
                self.send_header("content-type", content_type or "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
