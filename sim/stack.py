"""Start and stop the local stack: the simulated providers and a LiteLLM proxy with the relay plugin.

Used by ``make run`` (``python -m sim.stack run``), by the pytest fixtures and by the load tests, so
the three bring servers up the same way: on loopback, on free ports, and stopped afterwards.
"""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PLUGIN = ROOT / "relay_plugin.py"
DEV_MASTER_KEY = "sk-relay-dev-master-key"


def litellm_executable() -> Path:
    """The ``litellm`` the proxy process runs. ``PROXY_VENV`` names another virtual environment (``make
    test-compat`` points it at one venv per supported LiteLLM line); by default it is this Python's own."""
    venv = os.environ.get("PROXY_VENV")
    return Path(venv).resolve() / "bin" / "litellm" if venv else Path(sys.executable).parent / "litellm"


LITELLM = litellm_executable()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float, log_path: Path | None = None) -> None:
    """Poll ``url`` until it answers 200; fail early, with the log's tail, if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text()[-3000:] if log_path and log_path.exists() else ""
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout:g}s")


def stop(proc: subprocess.Popen, timeout: float = 10) -> None:
    """Stop a process started by this module (its whole process group)."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@dataclass
class Simulator:
    proc: subprocess.Popen
    url: str
    log_path: Path

    def stop(self) -> None:
        stop(self.proc)


def start_simulator(log_path: Path, port: int = 0, *args: str) -> Simulator:
    """Run ``python -m sim.providers`` and wait for its ``SIM_READY <url>`` line."""
    port = port or free_port()
    with open(log_path, "w") as log:  # the process writes to its own copy of the file descriptor
        proc = subprocess.Popen(
            [sys.executable, "-m", "sim.providers", "--host", "127.0.0.1", "--port", str(port), *args],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/_sim/health", proc, timeout=30, log_path=log_path)
    return Simulator(proc, url, log_path)


def simulated_provider_env(sim_url: str) -> dict[str, str]:
    """Provider settings that point every entry of proxy_config.yaml at the simulator."""
    return {
        "OLLAMA_API_BASE": sim_url,
        "OPENAI_API_BASE": sim_url + "/v1",
        "OPENAI_API_KEY": "sk-sim-not-a-real-key",
        "ANTHROPIC_API_BASE": sim_url,
        "ANTHROPIC_API_KEY": "sk-ant-sim-not-a-real-key",
    }


@dataclass
class Proxy:
    proc: subprocess.Popen
    url: str
    master_key: str
    log_path: Path
    workdir: Path
    env: dict = field(default_factory=dict)

    def stop(self) -> None:
        stop(self.proc)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


def proxy_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env.update(LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS="True",
               LITELLM_MASTER_KEY=DEV_MASTER_KEY, PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def start_proxy(config_path: Path, env: dict[str, str], *, port: int = 0, workdir: Path | None = None,
                log_dir: Path | None = None, timeout: float = 90, args: tuple[str, ...] = (),
                launcher: tuple[str, ...] = ()) -> Proxy:
    """Run ``litellm --config`` with ``env`` (on top of a clean environment) and wait until it is live.

    With ``workdir`` the config and relay_plugin.py are copied there first, so the plugin is loaded
    from the config's directory exactly as an operator's drop-in is. ``args`` go to ``litellm`` as they
    are (e.g. ``("--num_workers", "2")``); ``launcher`` runs it (e.g. valgrind and a Python interpreter).
    """
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        shutil.copy(PLUGIN, workdir / PLUGIN.name)
        if config_path.parent != workdir:
            shutil.copy(config_path, workdir / config_path.name)
        config_path = workdir / config_path.name
    port = port or free_port()
    full_env = proxy_env(env)
    log_path = (log_dir or config_path.parent) / f"proxy-{port}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [*launcher, str(LITELLM), "--config", str(config_path), "--host", "127.0.0.1", "--port", str(port), *args],
            cwd=config_path.parent, env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/health/liveliness", proc, timeout=timeout, log_path=log_path)
    except Exception:
        stop(proc)
        raise
    return Proxy(proc, url, full_env["LITELLM_MASTER_KEY"], log_path, config_path.parent, full_env)


def model_entry(name: str, model: str, api_base: str | None = None, relay: dict | None = None, **params) -> dict:
    """One ``model_list`` entry: ``model`` (a litellm model) at ``api_base``, with ``relay`` as its
    ``model_info.relay`` block; ``params`` are further ``litellm_params`` (``api_key``, ``mock_response``...)."""
    litellm_params = {"model": model, **({"api_base": api_base} if api_base else {}), **params}
    entry: dict = {"model_name": name, "litellm_params": litellm_params}
    if relay is not None:
        entry["model_info"] = {"relay": relay}
    return entry


def write_config(directory: Path, model_list: list[dict], *, plugin: bool = True, callbacks: tuple[str, ...] = (),
                 litellm_settings: dict | None = None, name: str = "config.yaml") -> Path:
    """A proxy config serving ``model_list``, written into ``directory``; ``plugin=False`` is the same file
    without the relay's callbacks entry (a load test's baseline). ``callbacks`` are listed first, the relay
    after them; ``litellm_settings`` go beside ``drop_params: true``."""
    import yaml

    settings = {"drop_params": True, **(litellm_settings or {})}
    listed = [*callbacks, *(["relay_plugin.proxy_handler_instance"] if plugin else [])]
    if listed:
        settings = {"callbacks": listed[0] if len(listed) == 1 else listed, **settings}
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(yaml.safe_dump({
        "model_list": model_list,
        "litellm_settings": settings,
        "general_settings": {"master_key": "os.environ/LITELLM_MASTER_KEY"},
    }, sort_keys=False))
    return path


def metrics_config(directory: Path) -> Path:
    """proxy_config.yaml plus LiteLLM's `prometheus` callback, which serves /metrics (the relay's
    metrics included), written into ``directory``; the plain file stays a minimal drop-in example."""
    import yaml

    config = yaml.safe_load((ROOT / "proxy_config.yaml").read_text())
    callbacks = config["litellm_settings"]["callbacks"]
    callbacks = [callbacks] if isinstance(callbacks, str) else list(callbacks)
    config["litellm_settings"]["callbacks"] = callbacks + ["prometheus"]
    path = directory / "proxy_config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run() -> None:
    """``make run``: the whole thing locally on simulated models, until Ctrl-C."""
    state = ROOT / ".run"
    state.mkdir(exist_ok=True)
    sim = start_simulator(state / "simulator.log", int(os.environ.get("SIM_PORT", "0")))
    env = {k: v for k, v in simulated_provider_env(sim.url).items() if not os.environ.get(k)}
    if os.environ.get("OPENAI_API_KEY") and not os.environ.get("OPENAI_API_BASE"):
        env["OPENAI_API_BASE"] = "https://api.openai.com/v1"
    if os.environ.get("ANTHROPIC_API_KEY") and not os.environ.get("ANTHROPIC_API_BASE"):
        env["ANTHROPIC_API_BASE"] = "https://api.anthropic.com"
    relay_defaults = {
        "RELAY_MODE": "refine",
        "RELAY_SECONDARY_MODEL": "gpt-4o-mini",
        "RELAY_APPLY_TO": "local-*,mock-*",
        "RELAY_ESCALATE_MODEL": "claude-haiku",
        "RELAY_CONSENSUS_MODELS": "gpt-4o-mini,claude-haiku",
        "RELAY_LOG_LEVEL": "info",
    }
    env.update({k: os.environ.get(k, v) for k, v in relay_defaults.items()})
    env.update({k: v for k, v in os.environ.items() if k.startswith("RELAY_")})
    env["LITELLM_MASTER_KEY"] = os.environ.get("LITELLM_MASTER_KEY", DEV_MASTER_KEY)
    port = int(os.environ.get("PORT", "4000"))
    print(f"starting the LiteLLM proxy with the relay on 127.0.0.1:{port} (simulated providers at {sim.url}) ...", flush=True)
    try:
        proxy = start_proxy(metrics_config(state), env, port=port, workdir=state)
    except Exception:
        sim.stop()
        raise
    key = proxy.master_key
    print(f"""
relay is running.
  URL          {proxy.url}
  master key   {key}
  proxy log    {proxy.log_path}
  metrics      {proxy.url}/metrics/ (Prometheus scrape target; bearer token: the master key)
  mode         {env['RELAY_MODE']} (secondary {env['RELAY_SECONDARY_MODEL']}; set RELAY_* to change)

try it:
  curl -si {proxy.url}/v1/chat/completions -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' \\
    -d '{{"model": "local-llama", "messages": [{{"role": "user", "content": "Why is the sky blue?"}}]}}' | grep -i '^x-relay'

scrape the relay's metrics (relay_*, beside LiteLLM's litellm_*; dashboard: docs/grafana-relay.json):
  curl -s {proxy.url}/metrics/ -H 'Authorization: Bearer {key}' | grep '^relay_'

Ctrl-C stops the proxy and the simulator.""", flush=True)
    try:
        proxy.proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        proxy.stop()
        sim.stop()


if __name__ == "__main__":
    if sys.argv[1:] == ["run"]:
        run()
    else:
        sys.exit("usage: python -m sim.stack run")
