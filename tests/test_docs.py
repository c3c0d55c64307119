"""The README tells the truth: its variable table is the code's, and `make run` does what it says."""

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
    for name in relay_plugin.__all__:
        assert hasattr(relay_plugin, name), name


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
        assert "x-relay-outcome: modified" in README and f"127.0.0.1:4000" in README
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
