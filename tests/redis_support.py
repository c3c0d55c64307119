"""Real redis-server processes for the tests, and a micro-benchmark of the store (``python -m tests.redis_support``).

The tests start their own servers on free loopback ports, without persistence, and stop them; the
outage tests stop, pause and restart theirs on the same port. The server comes from the Debian package
``redis-server``, which ``make test`` installs when it is missing.
"""

import asyncio
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from sim import stack


def redis_server_binary() -> str:
    found = shutil.which("redis-server") or ("/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None)
    if found is None:
        raise RuntimeError("redis-server is not installed: `make test` installs it "
                           "(apt-get install -y redis-server), as does .ci/run")
    return found


class RedisServer:
    """One ``redis-server`` on 127.0.0.1: no snapshots, no append-only file, its own directory."""

    def __init__(self, directory: Path, port: int = 0):
        self.directory = Path(directory)
        self.port = port or stack.free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def __repr__(self) -> str:
        return f"<RedisServer {self.url} {'running' if self.running else 'stopped'}>"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 10) -> "RedisServer":
        self.directory.mkdir(parents=True, exist_ok=True)
        log = open(self.directory / f"redis-{self.port}.log", "a")
        self.proc = subprocess.Popen(
            [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.directory)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self.ping():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server on port {self.port} did not start; see {log.name}")
            time.sleep(0.05)
        return self

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as conn:
                conn.sendall(b"PING\r\n")
                return conn.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            self.resume()
            stack.stop(self.proc)
            self.proc = None

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open, nothing answers, like a hung Redis."""
        if self.running:
            os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.running:
            os.killpg(self.proc.pid, signal.SIGCONT)


# ----- benchmark: what Redis state adds to one secondary call -------------------------------------


async def _bench(store, n: int) -> list[float]:
    """Per-call seconds of what ``_Run._attempt`` does with a store around one secondary call:
    breaker permit, reservation on two caps, settle, breaker record."""
    holds = [("spend:bench", 1e9, 0.001), ("calls:bench", 1e9, 1.0)]
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        permit = await store.breaker_acquire("bench-model", time.monotonic())
        reservation = await store.reserve(holds)
        await store.settle(reservation, {"spend:bench": 0.0005})
        await store.breaker_record("bench-model", permit, False, time.monotonic())
        samples.append(time.perf_counter() - started)
    return samples


def _summary(name: str, samples: list[float]) -> str:
    ms = sorted(s * 1000 for s in samples)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    return f"{name:<12} n={len(ms)}  p50={statistics.median(ms):.3f} ms  p99={p99:.3f} ms  mean={statistics.fmean(ms):.3f} ms"


async def bench(n: int = 1000) -> str:
    import redis.asyncio as aioredis

    import relay_plugin

    config = relay_plugin.RelayConfig.from_env({"RELAY_SECONDARY_MODEL": "bench", "RELAY_REDIS_PREFIX": f"bench{os.getpid()}"})
    lines = [_summary("LocalStore", await _bench(relay_plugin.LocalStore(config), n))]
    with_tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"relay-bench-{os.getpid()}"
    server = RedisServer(with_tmp).start()
    try:
        client = aioredis.from_url(server.url, decode_responses=True)
        store = relay_plugin.RedisStore(config, client)
        await _bench(store, 50)  # warm-up: connection and script cache
        lines.append(_summary("RedisStore", await _bench(store, n)))
        failover = relay_plugin.FailoverStore(store, relay_plugin.LocalStore(config), mode="closed", retry_s=1, bound_s=1)
        lines.append(_summary("FailoverStore", await _bench(failover, n)))
        await client.aclose()
    finally:
        server.stop()
        shutil.rmtree(with_tmp, ignore_errors=True)
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    os.environ.setdefault("RELAY_SECONDARY_MODEL", "bench")  # relay_plugin validates its environment at import
    sys.path.insert(0, str(stack.ROOT))
    print(asyncio.run(bench(int(sys.argv[1]) if sys.argv[1:] else 1000)))
