"""The README tells the truth: its variable table is the code's, and `make run` does what it says."""

import ast
import inspect
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

import relay_plugin
from sim import stack

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_the_readme_variable_table_is_exactly_the_one_the_code_prints():
    table = re.search(r"<!-- env-table -->\n(.*?)<!-- /env-table -->", README, re.S).group(1)
    assert table.strip() == relay_plugin.env_table().strip()


def test_every_variable_the_code_reads_is_in_the_readme():
    source = (ROOT / "relay_plugin.py").read_text()
    for name in {v.name for v in relay_plugin.VARIABLES}:
        assert f"`RELAY_{name}`" in README
    assert len(relay_plugin.VARIABLES) == len({v.name for v in relay_plugin.VARIABLES})
    assert "os.environ[\"RELAY_" not in source and "getenv(\"RELAY_" not in source  # one parser, one place


def test_the_public_names_are_what_the_module_says():
    # in a process of its own: the names built on first access read RELAY_* (and stop at a bad value)
    probe = "import relay_plugin as r; print(len(r.__all__), [n for n in r.__all__ if not hasattr(r, n)])"
    env = {"PATH": os.environ.get("PATH", ""), "LITELLM_LOCAL_MODEL_COST_MAP": "True", "RELAY_SECONDARY_MODEL": "sec"}
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.stdout.split("\n")[-2:] == [f"{len(relay_plugin.__all__)} []", ""], done.stderr[-2000:]
    assert len(relay_plugin.__all__) == len(set(relay_plugin.__all__))


def module_level_imports(tree: ast.Module) -> set[str]:
    """The names the module's own top-level ``import`` statements bind (also inside top-level if/try)."""
    names, statements = set(), list(tree.body)
    while statements:
        node = statements.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, (ast.If, ast.Try)):
            statements.extend([*node.body, *node.orelse, *getattr(node, "finalbody", []),
                               *(s for handler in getattr(node, "handlers", []) for s in handler.body)])
    return names


def test_every_public_name_the_module_defines_is_in_all():
    # like httpx's test_all_imports_are_exported: a public name is either exported or made private
    imported = module_level_imports(ast.parse((ROOT / "relay_plugin.py").read_text()))
    public = {name for name, value in vars(relay_plugin).items()
              if not name.startswith("_") and name not in imported and not inspect.ismodule(value)}
    assert "RelayHandler" in public and "TYPE_CHECKING" not in public  # what the sieve keeps and drops
    assert sorted(public - set(relay_plugin.__all__)) == []


@pytest.mark.proxy
def test_make_run_serves_the_relay_and_the_readme_curl_line_shows_modified(tmp_path):
    port = stack.free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RELAY_", "OLLAMA_", "OPENAI_", "ANTHROPIC_"))}
    env["PORT"] = str(port)
    proc = subprocess.Popen([sys.executable, "-m", "sim.stack", "run"], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    printed = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any("Ctrl-C stops" in line for line in printed):
            line = proc.stdout.readline()
            if not line:
                break
            printed.append(line)
        output = "".join(printed)
        assert "Ctrl-C stops" in output, output
        curl = output[output.index("curl -si"):output.index("| grep")].replace("\\\n", " ")
        words = shlex.split(curl)
        url = words[2]
        headers = dict(h.split(": ", 1) for h in (words[i + 1] for i, w in enumerate(words) if w == "-H"))
        body = words[words.index("-d") + 1]
        response = httpx.post(url, headers=headers, content=body, timeout=60)
        assert response.status_code == 200
        assert response.headers["x-relay-outcome"] == "modified"
        assert url == f"http://127.0.0.1:{port}/v1/chat/completions"
        # it says where to scrape the relay's metrics, and the relay's request is counted there
        scrape = re.search(r"curl -s (\S+/metrics/) -H 'Authorization: Bearer (\S+)'", output)
        assert scrape, output
        metrics = httpx.get(scrape.group(1), headers={"Authorization": f"Bearer {scrape.group(2)}"}, timeout=30).text
        assert re.search(r'^relay_requests_total\{.*outcome="modified".*\} 1\.0$', metrics, re.M), metrics[-3000:]
        assert "x-relay-outcome: modified" in README and "127.0.0.1:4000" in README
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:  # make run stops the proxy, then the simulator, each given 10 s before SIGKILL: wait for both
            proc.wait(45)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stdout.close()
