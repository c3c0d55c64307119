"""``make test-compat``: the operator-relevant proxy tests against a real proxy of every supported LiteLLM.

For each ``compat/litellm-<version>.lock`` (newest first) this builds ``.venv-compat/<version>`` from
the lock (hash-checked, once; rebuilt when the lock changes), then runs the tests marked ``compat``
with ``PROXY_VENV`` pointing at it: pytest, the SDKs and the simulator keep running from the main
venv, only the proxy process (and so relay_plugin.py inside it) runs on that LiteLLM.

The results go to ``compat/results.json`` (committed); ``--table`` renders them as the README's
compatibility table, and ``make readme`` writes that table into README.md. The exit status is 1 when
any version failed, so a change that breaks an older line fails CI.

    python scripts/compat.py [VERSION ...]   run the matrix (all locks, or the versions named)
    python scripts/compat.py --table         print the compatibility table of the last results
    python scripts/compat.py --readme        write that table into README.md (`make readme`)
"""

import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMPAT = ROOT / "compat"
#: where the per-version venvs live; COMPAT_VENV_DIR puts them outside the clone, to reuse across CI runs
VENVS = Path(os.environ.get("COMPAT_VENV_DIR") or ROOT / ".venv-compat").resolve()
RESULTS = COMPAT / "results.json"
#: the words relay_plugin.py starts each of its startup lines about a missing LiteLLM feature with
DEGRADED_MARK = "relay degraded on this LiteLLM: "
#: the order of the areas in the table (the `compat("<area>")` markers in tests/)
AREAS = ["modes", "streaming", "headers", "fail policy", "recursion guard", "budget cap", "breaker",
         "startup checks", "secrets"]


def version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version))


def locked_versions() -> list[str]:
    """Every version with a lock in compat/, newest first."""
    found = [p.name[len("litellm-"):-len(".lock")] for p in COMPAT.glob("litellm-*.lock")]
    return sorted(found, key=version_key, reverse=True)


def ensure_venv(version: str) -> float:
    """Build ``.venv-compat/<version>`` from its lock unless it is current; the seconds spent."""
    lock = COMPAT / f"litellm-{version}.lock"
    venv = VENVS / version
    stamp = venv / ".installed"
    if stamp.exists() and stamp.stat().st_mtime >= lock.stat().st_mtime:
        return 0.0
    started = time.monotonic()
    shutil.rmtree(venv, ignore_errors=True)  # never build on top of a half-installed or stale venv
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(venv)], check=True)
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                          "--require-hashes", "--no-deps", "-r", str(lock)], capture_output=True, text=True)
    if pip.returncode != 0:  # only then: pip's chatter about this machine's extra indexes is noise
        sys.stderr.write(pip.stdout + pip.stderr)
        raise SystemExit(f"compat: installing {lock.name} failed")
    installed = installed_version(venv)
    if installed != version:
        raise SystemExit(f"compat: {lock.name} installed litellm {installed}, not {version}")
    stamp.touch()
    return time.monotonic() - started


def installed_version(venv: Path) -> str:
    return subprocess.run([str(venv / "bin" / "python"), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
                          check=True, capture_output=True, text=True).stdout.strip()


def degraded_lines(root: Path) -> list[str]:
    """The distinct lines in which the plugin, inside the proxies of one run, said what it cannot do."""
    seen: dict[str, None] = {}
    for log in sorted(root.rglob("proxy-*.log")):
        for line in log.read_text(errors="replace").splitlines():
            if DEGRADED_MARK in line:
                seen[line.split(DEGRADED_MARK, 1)[1].strip()] = None
    return list(seen)


def run_version(version: str) -> dict:
    """Install (if needed) and test one version; its row of the results."""
    print(f"compat: litellm {version}: installing ...", flush=True)
    install_s = ensure_venv(version)
    print(f"compat: litellm {version}: testing (install {install_s:.0f} s) ...", flush=True)
    basetemp = Path(tempfile.mkdtemp(prefix=f"relay-compat-{version}-"))
    report = basetemp / "report.json"
    env = {**os.environ, "PROXY_VENV": str(VENVS / version), "COMPAT_REPORT": str(report)}
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "compat", "-p", "tests.compat_report",
                           "-p", "no:cacheprovider", "-q", f"--basetemp={basetemp / 'pytest'}"], cwd=ROOT, env=env)
    run_s = time.monotonic() - started
    tests = json.loads(report.read_text())["tests"] if report.exists() else {}
    degraded = degraded_lines(basetemp)
    shutil.rmtree(basetemp, ignore_errors=True)
    areas: dict[str, dict[str, int]] = {}
    for entry in tests.values():
        counts = areas.setdefault(entry["area"], {"passed": 0, "failed": 0})
        counts["passed" if entry["outcome"] == "passed" else "failed"] += 1
    failed = sorted(nodeid for nodeid, entry in tests.items() if entry["outcome"] != "passed")
    ok = proc.returncode == 0 and bool(tests) and not failed
    print(f"compat: litellm {version}: {'passed' if ok else 'FAILED'} ({len(tests) - len(failed)} of {len(tests)} "
          f"tests; install {install_s:.0f} s, tests {run_s:.0f} s)", flush=True)
    return {
        "litellm": version,
        "tested": datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
        "ok": ok,
        "pytest_exit": proc.returncode,
        "passed": len(tests) - len(failed),
        "total": len(tests),
        "areas": {area: areas[area] for area in sorted(areas, key=lambda a: AREAS.index(a) if a in AREAS else len(AREAS))},
        "failed": failed,
        "degraded": degraded,
        "install_s": round(install_s, 1),
        "run_s": round(run_s, 1),
    }


def load_results() -> list[dict]:
    return json.loads(RESULTS.read_text())["versions"] if RESULTS.exists() else []


def save_results(rows: list[dict]) -> None:
    """Merge ``rows`` into the results file; versions whose lock is gone drop out of it."""
    merged = {row["litellm"]: row for row in load_results()}
    for row in rows:  # a cached venv installs in 0 s: keep the time of the last fresh install beside it
        row["fresh_install_s"] = row["install_s"] or merged.get(row["litellm"], {}).get("fresh_install_s")
    merged.update({row["litellm"]: row for row in rows})
    keep = [merged[v] for v in locked_versions() if v in merged]
    RESULTS.write_text(json.dumps({"versions": keep}, indent=2) + "\n")


def render_table(rows: list[dict]) -> str:
    """The README's compatibility table: one row per LiteLLM line, from the results of the last run."""
    lines = ["| LiteLLM | Result | What works | What degrades | Last tested |", "| --- | --- | --- | --- | --- |"]
    for row in rows:
        works = [area for area, counts in row["areas"].items() if counts["failed"] == 0]
        broken = [area for area, counts in row["areas"].items() if counts["failed"]]
        result = (
            f"pass ({row['passed']}/{row['total']} tests)"
            if row["ok"]
            else f"**FAIL** ({row['total'] - row['passed']} of {row['total']} tests failed: {', '.join(broken) or 'see log'})"
        )
        degrades = "; ".join(row["degraded"]) or "nothing"
        lines.append(f"| `{row['litellm']}` | {result} | {', '.join(works) or 'nothing'} | {degrades} | {row['tested']} |")
    return "\n".join(lines) + "\n"


README = ROOT / "README.md"
TABLE_START, TABLE_END = "<!-- compat-table -->\n", "<!-- /compat-table -->"


def readme_with_table(readme: str, table: str) -> str:
    """``readme`` with the text between the compat-table markers replaced by ``table``."""
    start = readme.index(TABLE_START) + len(TABLE_START)
    return readme[:start] + table + readme[readme.index(TABLE_END, start):]


def main(argv: list[str]) -> int:
    if argv == ["--table"]:
        sys.stdout.write(render_table(load_results()))
        return 0
    if argv == ["--readme"]:
        README.write_text(readme_with_table(README.read_text(), render_table(load_results())))
        return 0
    versions = argv or locked_versions()
    unknown = [v for v in versions if v not in locked_versions()]
    if unknown or not versions:
        print(f"compat: no lock for {', '.join(unknown) or 'any version'} in compat/ (have: {', '.join(locked_versions())})",
              file=sys.stderr)
        return 2
    rows = []
    for version in versions:  # one after another: the machine is small, and the installs are the slow part
        rows.append(run_version(version))
    save_results(rows)
    print("\ncompat summary (install s / tests s):")
    for row in rows:
        print(f"  litellm {row['litellm']:<10} {'ok  ' if row['ok'] else 'FAIL'} {row['passed']}/{row['total']}"
              f"  {row['install_s']:>6.0f} / {row['run_s']:.0f}")
    return 0 if all(row["ok"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
