"""Shared fixtures. Environment first: litellm reads LITELLM_LOCAL_MODEL_COST_MAP at import."""

import os

os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
for _name in [n for n in os.environ if n.startswith("RELAY_")]:
    del os.environ[_name]

import asyncio
import json
import uuid
from pathlib import Path

import httpx
import pytest

from sim import stack
from tests.proxy_support import BASE_RELAY_ENV, ProxyHandle, start_test_proxy


class SimControl:
    """The running simulator, as tests see it: what it received, and its knobs."""

    def __init__(self, url: str):
        self.url = url
        self.http = httpx.Client(base_url=url, timeout=10)

    def requests(self, token: str | None = None, path: str | None = None) -> list[dict]:
        """Recorded requests, optionally only those whose body mentions ``token``."""
        params = {"path": path} if path else {}
        records = self.http.get("/_sim/requests", params=params).json()
        records = records["requests"] if isinstance(records, dict) else records
        return [r for r in records if token is None or token in json.dumps(r.get("body"))]

    def configure(self, **knobs) -> dict:
        response = self.http.post("/_sim/config", json=knobs)
        response.raise_for_status()
        return response.json()

    def stats(self) -> dict:
        return self.http.get("/_sim/stats").json()

    def close(self) -> None:
        self.http.close()


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("relay")


@pytest.fixture(scope="session")
def sim_server(workdir):
    server = stack.start_simulator(workdir / "simulator.log")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def sim(sim_server) -> SimControl:
    control = SimControl(sim_server.url)
    yield control
    control.close()


@pytest.fixture(autouse=True)
async def close_the_relays_http_session():
    """The plugin's fast path keeps one aiohttp session per event loop and never closes it (a proxy has one
    loop); each test has a loop of its own, so its session is closed with it.
    FIXME(relay_plugin.py): close the session with its loop, then drop this fixture."""
    await _close_relay_sessions()
    yield
    await _close_relay_sessions()


async def _close_relay_sessions() -> None:
    import relay_plugin

    for loop, session in relay_plugin._SESSION:
        if session.closed:
            continue
        if loop is asyncio.get_running_loop():
            await session.close()
        elif loop.is_closed():  # a test that ran a loop of its own (asyncio.run): nothing can await on it now
            connector = session.connector
            session.detach()
            connector._close()  # its loop is closed: this only marks it closed


@pytest.fixture
def token() -> str:
    """A unique word to put in a prompt, so a test finds its own requests in the simulator."""
    return "tok" + uuid.uuid4().hex[:12]


@pytest.fixture(scope="session")
def proxy(workdir, sim) -> ProxyHandle:
    """The main test proxy: every mode by model, client overrides `opt_in`, secondaries via the router."""
    handle = start_test_proxy(workdir, "main", sim.url, {**BASE_RELAY_ENV, "RELAY_CLIENT_OVERRIDE": "opt_in"})
    yield handle
    handle.stop()


# ----- Redis: real redis-server processes for the shared state (tests/redis_support.py) ------------


@pytest.fixture(scope="session")
def redis_server(workdir):
    """One redis-server for the session; tests that stop or pause a server start their own."""
    from tests.redis_support import RedisServer

    server = RedisServer(workdir / "redis").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster(workdir):
    """One Redis Cluster (3 masters, 3 replicas) for the session; fault tests start their own."""
    from tests.redis_support import RedisClusterNodes

    cluster = RedisClusterNodes(workdir / "redis-cluster").start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def redis_sentinel(workdir):
    """One Sentinel-managed primary/replica pair for the session; fault tests start their own."""
    from tests.redis_support import RedisSentinelSet

    sentinels = RedisSentinelSet(workdir / "redis-sentinel").start()
    yield sentinels
    sentinels.stop()


@pytest.fixture
def no_http_proxy(monkeypatch):
    """No HTTP proxy in the environment (the fast path leaves a call to litellm when one is set)."""
    import relay_plugin

    for name in relay_plugin._PROXY_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def cost_map(monkeypatch, no_http_proxy):
    """A private copy of litellm's cost map (registrations do not leak) and an empty key memo."""
    import litellm

    import relay_plugin

    monkeypatch.setattr(litellm, "model_cost", dict(litellm.model_cost))
    relay_plugin._COST_KEYS.clear()
    yield litellm.model_cost
    relay_plugin._COST_KEYS.clear()
