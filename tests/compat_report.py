"""A pytest plugin for ``make test-compat`` (scripts/compat.py loads it with ``-p tests.compat_report``).

It writes, to the JSON file named by ``COMPAT_REPORT``, the outcome of every test marked ``compat``
together with the area its marker names (``@pytest.mark.compat("breaker")``), so the compatibility
table can say per area what works on a LiteLLM line.
"""

import json
import os
from pathlib import Path

import pytest

_results: dict[str, dict] = {}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    marker = item.get_closest_marker("compat")
    if marker is None:
        return
    entry = _results.setdefault(item.nodeid, {"area": marker.args[0] if marker.args else "other", "outcome": "passed"})
    if report.failed:
        entry["outcome"] = "failed" if report.when == "call" else "error"
    elif report.skipped and entry["outcome"] == "passed":
        entry["outcome"] = "skipped"


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("COMPAT_REPORT")
    if path:
        Path(path).write_text(json.dumps({"exitstatus": int(exitstatus), "tests": _results}, indent=2))
