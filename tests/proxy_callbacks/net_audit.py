"""Test-only callback module: every outbound connection the proxy process attempts to a destination
that is not loopback, recorded and refused.

Two watchers, because the proxy's event loop is uvloop, whose own C code resolves and connects
without Python's audit events:
- an audit hook (``sys.addaudithook``) sees ``socket.getaddrinfo`` and ``socket.connect`` of every
  Python socket in every thread: sync HTTP clients (huggingface_hub's tokenizer download, requests,
  urllib) and whatever runs in worker threads;
- the async HTTP clients litellm and the relay use on the loop, ``aiohttp.ClientSession._request``
  and ``httpx.AsyncClient.send``, are wrapped to check the URL's host before anything is sent.
A destination that is not loopback (nor a Unix socket) is appended to ``NET_AUDIT_LOG`` (JSONL: how
it was seen, host, port, thread, the relay's and litellm's frames that led there) and refused at once
with an exception that is not an ``OSError``: HTTP clients retry connection errors (Hugging Face's
client backs off for 23 s), so a plain refusal would make the test wait for their retries.
"""

import ipaddress
import json
import os
import sys
import threading
import traceback
import urllib.parse

import aiohttp
import httpx
from litellm.integrations.custom_logger import CustomLogger

LOG = os.environ["NET_AUDIT_LOG"]
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})


class OutboundRefused(RuntimeError):
    """Raised inside the audited call: the destination is not loopback."""


def _is_loopback(host) -> bool:
    if host is None:  # getaddrinfo(None, port): the local wildcard address
        return True
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    host = str(host).strip("[]").split("%", 1)[0]
    if host.lower() in LOOPBACK_NAMES or host == "":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name to resolve: not loopback


def _destination(event: str, args: tuple):
    """``(host, port)`` of an audited call, or None when it is local by construction."""
    if event == "socket.getaddrinfo":
        return args[0], args[1]
    address = args[1]  # socket.connect: (socket, address)
    if isinstance(address, (str, bytes)):  # AF_UNIX path
        return None
    if isinstance(address, tuple) and len(address) >= 2:
        return address[0], address[1]
    return None


def _audit(event: str, args: tuple) -> None:
    if event != "socket.getaddrinfo" and event != "socket.connect":
        return
    destination = _destination(event, args)
    if destination is None or _is_loopback(destination[0]):
        return
    _refuse(event, *destination)


def _check_url(url, via: str) -> None:
    parts = urllib.parse.urlsplit(str(url))
    if parts.scheme in ("http", "https", "ws", "wss") and not _is_loopback(parts.hostname):
        _refuse(via, parts.hostname, parts.port)


def _refuse(event: str, host, port) -> None:
    stack = traceback.extract_stack()[:-2]
    # who asked: the relay's and litellm's frames, then the innermost two (the HTTP client's)
    callers = [f for f in stack if f.filename.endswith("relay_plugin.py") or "site-packages/litellm/" in f.filename]
    frames = [f"{f.filename.rsplit('site-packages/', 1)[-1].rsplit('/', 1)[-1]}:{f.lineno} {f.name}"
              for f in callers[-15:] + stack[-2:]]
    entry = {"event": event, "host": host if isinstance(host, str) else repr(host), "port": repr(port),
             "thread": threading.current_thread().name, "stack": frames}
    with open(LOG, "a") as out:
        out.write(json.dumps(entry) + "\n")
    raise OutboundRefused(f"relay test: outbound connection to {host}:{port} refused (not loopback)")


sys.addaudithook(_audit)

_aiohttp_request = aiohttp.ClientSession._request
_httpx_send = httpx.AsyncClient.send


async def _watched_aiohttp_request(self, method, str_or_url, *args, **kwargs):
    _check_url(str_or_url, "aiohttp request")
    return await _aiohttp_request(self, method, str_or_url, *args, **kwargs)


async def _watched_httpx_send(self, request, *args, **kwargs):
    _check_url(request.url, "httpx async request")
    return await _httpx_send(self, request, *args, **kwargs)


aiohttp.ClientSession._request = _watched_aiohttp_request
httpx.AsyncClient.send = _watched_httpx_send

instance = CustomLogger()
