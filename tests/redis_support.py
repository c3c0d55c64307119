"""Real redis-server processes for the tests, and a micro-benchmark of the store (``python -m tests.redis_support``).

The tests start their own servers on free loopback ports, without persistence, and stop them; the
outage tests stop, pause and restart theirs on the same port. Three topologies: one server
(:class:`RedisServer`), a Redis Cluster of 3 masters with one replica each (:class:`RedisClusterNodes`,
built with ``redis-cli --cluster create``) and a primary/replica pair watched by 3 sentinels
(:class:`RedisSentinelSet`, ``redis-server --sentinel``). The server and ``redis-cli`` come from the
Debian packages ``redis-server`` and ``redis-tools``, which ``make test`` installs when missing.
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


def redis_cli_binary() -> str:
    found = shutil.which("redis-cli") or ("/usr/bin/redis-cli" if os.path.exists("/usr/bin/redis-cli") else None)
    if found is None:
        raise RuntimeError("redis-cli is not installed: `make test` installs it (apt-get install -y redis-tools)")
    return found


class RedisServer:
    """One ``redis-server`` on 127.0.0.1: no snapshots, no append-only file, its own directory.
    ``extra`` are more command-line settings (cluster mode, ``--replicaof``)."""

    def __init__(self, directory: Path, port: int = 0, extra: tuple[str, ...] = ()):
        self.directory = Path(directory)
        self.port = port or stack.free_port()
        self.extra = tuple(extra)
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
        log = self.directory / f"redis-{self.port}.log"
        with log.open("a") as out:
            self.proc = subprocess.Popen(
                [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(self.directory), *self.extra],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self.ping():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server on port {self.port} did not start; see {log}")
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

    def kill(self) -> None:
        """A crash: SIGKILL, no shutdown (a cluster or Sentinel then promotes a replica)."""
        if self.running:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def command(self, *args: str) -> str:
        """One command through ``redis-cli`` (what an operator would type); its output."""
        done = subprocess.run([redis_cli_binary(), "-p", str(self.port), *args], capture_output=True, text=True, timeout=10)
        return done.stdout.strip()

    def info(self, section: str) -> dict[str, str]:
        lines = self.command("INFO", section).splitlines()
        return dict(line.split(":", 1) for line in lines if ":" in line and not line.startswith("#"))

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open, nothing answers, like a hung Redis."""
        if self.running:
            os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.running:
            os.killpg(self.proc.pid, signal.SIGCONT)


#: tries to start a topology, each on newly picked ports: a port that was free when it was picked may be
#: taken by another process (a test's proxy, another suite on the machine) before redis-server binds it
START_ATTEMPTS = 3


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports (held together while they are picked, so none repeats)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def wait_until(check, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


class RedisClusterNodes:
    """A Redis Cluster on 127.0.0.1: ``masters`` masters with one replica each. A replica takes over
    ``node_timeout_ms`` after its master stops answering (``cluster-replica-validity-factor 0``: always)."""

    def __init__(self, directory: Path, masters: int = 3, node_timeout_ms: int = 1000):
        self.directory = Path(directory)
        self.masters, self.node_timeout_ms = masters, node_timeout_ms
        self.servers = self._servers()

    def _servers(self) -> list[RedisServer]:
        """A server per node, each on two free ports of its own: clients', and the cluster bus's (by
        default port + 10000, which may not exist)."""
        cluster = ("--cluster-enabled", "yes", "--cluster-node-timeout", str(self.node_timeout_ms),
                   "--cluster-replica-validity-factor", "0")
        ports = free_ports(4 * self.masters)
        return [RedisServer(self.directory / f"node-{i}", port,
                            (*cluster, "--cluster-port", str(bus), "--cluster-config-file", f"nodes-{port}.conf"))
                for i, (port, bus) in enumerate(zip(ports[0::2], ports[1::2], strict=True))]

    def __repr__(self) -> str:
        return f"<RedisClusterNodes {self.nodes_setting}>"

    @property
    def nodes_setting(self) -> str:
        """The value of RELAY_REDIS_CLUSTER_NODES: every node (a client needs only one that answers)."""
        return ",".join(f"127.0.0.1:{s.port}" for s in self.servers)

    @property
    def running(self) -> list[RedisServer]:
        return [s for s in self.servers if s.running]

    def start(self) -> "RedisClusterNodes":
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                for server in self.servers:
                    server.start()
                break
            except RuntimeError:  # a port taken by another process since it was picked
                self.stop()
                if attempt == START_ATTEMPTS:
                    raise
                self.servers = self._servers()
        done = subprocess.run([redis_cli_binary(), "--cluster", "create", *[f"127.0.0.1:{s.port}" for s in self.servers],
                               "--cluster-replicas", "1", "--cluster-yes"], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            self.stop()
            raise RuntimeError(f"redis-cli --cluster create failed: {done.stdout[-2000:]} {done.stderr[-2000:]}")
        try:
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_healthy(self, timeout: float = 60) -> None:
        """Every running node says cluster_state:ok, and every master has a replica in sync."""
        def healthy():
            if any(s.command("CLUSTER", "INFO").find("cluster_state:ok") < 0 for s in self.running):
                return False
            masters = [s for s in self.running if s.info("replication").get("role") == "master"]
            return len(masters) == self.masters and all(
                s.info("replication").get("master_link_status") == "up" for s in self.running if s not in masters)
        wait_until(healthy, timeout, "the cluster to be healthy")

    def slot_of(self, key: str) -> int:
        return int(self.running[0].command("CLUSTER", "KEYSLOT", key))

    def master_of(self, key: str) -> RedisServer:
        """The running server that serves ``key``'s slot now."""
        slot = self.slot_of(key)
        for server in self.running:
            if server.info("replication").get("role") != "master":
                continue
            ranges = server.command("CLUSTER", "NODES").splitlines()
            mine = next(line for line in ranges if "myself" in line).split()[8:]
            for part in mine:
                low, _, high = part.partition("-")
                if low.isdigit() and int(low) <= slot <= int(high or low):
                    return server
        raise RuntimeError(f"no running master serves slot {slot}")

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


class RedisSentinelSet:
    """A primary and its replica on 127.0.0.1, watched by ``sentinels`` sentinels (quorum: a majority)
    under the service name ``service``; they promote the replica ``down_after_ms`` after the primary
    stops answering."""

    def __init__(self, directory: Path, service: str = "relay-primary", sentinels: int = 3, down_after_ms: int = 1000):
        self.directory = Path(directory)
        self.service, self.down_after_ms, self.sentinel_count = service, down_after_ms, sentinels
        self.sentinel_procs: list[subprocess.Popen] = []
        self._pick_ports()

    def _pick_ports(self) -> None:
        primary, replica, *self.sentinel_ports = free_ports(2 + self.sentinel_count)
        self.primary = RedisServer(self.directory / "primary", primary)
        self.replica = RedisServer(self.directory / "replica", replica, ("--replicaof", "127.0.0.1", str(primary)))

    def __repr__(self) -> str:
        return f"<RedisSentinelSet {self.sentinels_setting} service={self.service}>"

    @property
    def sentinels_setting(self) -> str:
        """The value of RELAY_REDIS_SENTINELS."""
        return ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)

    @property
    def servers(self) -> list[RedisServer]:
        return [self.primary, self.replica]

    def start(self) -> "RedisSentinelSet":
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                self.primary.start()
                self.replica.start()
                break
            except RuntimeError:  # as in RedisClusterNodes.start
                self.stop()
                if attempt == START_ATTEMPTS:
                    raise
                self._pick_ports()
        quorum = len(self.sentinel_ports) // 2 + 1
        for port in self.sentinel_ports:
            directory = self.directory / f"sentinel-{port}"
            directory.mkdir(parents=True, exist_ok=True)
            conf = directory / "sentinel.conf"
            conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {directory}\n"
                            f"sentinel monitor {self.service} 127.0.0.1 {self.primary.port} {quorum}\n"
                            f"sentinel down-after-milliseconds {self.service} {self.down_after_ms}\n"
                            f"sentinel failover-timeout {self.service} 10000\n")
            with open(directory / "sentinel.log", "a") as log:
                self.sentinel_procs.append(subprocess.Popen([redis_server_binary(), str(conf), "--sentinel"],
                                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        try:
            self.wait_healthy(expect_replica=True)
        except BaseException:
            self.stop()
            raise
        return self

    def sentinel(self, *args: str, index: int = 0) -> str:
        done = subprocess.run([redis_cli_binary(), "-p", str(self.sentinel_ports[index]), "SENTINEL", *args],
                              capture_output=True, text=True, timeout=10)
        return done.stdout.strip()

    def primary_port(self) -> int | None:
        """The port every sentinel names as the primary now, None while they disagree."""
        named = set()
        for i in range(len(self.sentinel_ports)):
            lines = self.sentinel("get-master-addr-by-name", self.service, index=i).splitlines()
            named.add(lines[-1] if lines else "")  # host, then port; nothing while it starts
        return int(named.pop()) if len(named) == 1 and next(iter(named)).isdigit() else None

    def current_primary(self) -> RedisServer:
        port = self.primary_port()
        return next(s for s in self.servers if s.port == port)

    def wait_healthy(self, timeout: float = 60, expect_replica: bool = False) -> None:
        """The sentinels agree on a running primary, know each other, and (``expect_replica``) its replica syncs."""
        def healthy():
            port = self.primary_port()
            server = next((s for s in self.servers if s.port == port and s.running), None)
            if server is None or server.info("replication").get("role") != "master":
                return False
            others = len(self.sentinel_ports) - 1
            if any(self.sentinel("sentinels", self.service, index=i).count("name") < others
                   for i in range(len(self.sentinel_ports))):
                return False
            return not expect_replica or int(server.info("replication").get("connected_slaves", "0")) >= 1
        wait_until(healthy, timeout, "the sentinels to agree on a primary")

    def stop(self) -> None:
        for proc in self.sentinel_procs:
            stack.stop(proc)
        self.sentinel_procs = []
        for server in self.servers:
            server.stop()


# ----- benchmark: what Redis state adds to one secondary call -------------------------------------


async def _bench(store, n: int) -> list[float]:
    """Per-call seconds of what ``RelayRun._attempt`` does with a store around one secondary call:
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
        failover = relay_plugin.FailoverStore(store, relay_plugin.LocalStore(config), on_failure="closed", retry_s=1,
                                              bound_s=1)
        lines.append(_summary("FailoverStore", await _bench(failover, n)))
        await client.aclose()
    finally:
        server.stop()
        shutil.rmtree(with_tmp, ignore_errors=True)
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    sys.path.insert(0, str(stack.ROOT))
    print(asyncio.run(bench(int(sys.argv[1]) if sys.argv[1:] else 1000)))
