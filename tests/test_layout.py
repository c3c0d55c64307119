"""relay_plugin.py reads top to bottom: its sections are where its docstring and the README say, and no
section needs a name that a later section defines."""

import ast
import dataclasses
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = (ROOT / "relay_plugin.py").read_text()
BAR = "# " + "=" * 97

#: the one dependency that runs against the reading order, on purpose: the callback hands a stream to the
#: stream relay, and the streams come after the callback (a reader meets the hooks before their streams)
LATER_BY_DESIGN = {("RelayHandler", "StreamRelay")}


def banners() -> list[tuple[int, str]]:
    lines = SOURCE.split("\n")
    return [(i + 2, lines[i + 1][2:]) for i in range(len(lines) - 2) if lines[i] == BAR and lines[i + 2] == BAR]


def short(title: str) -> str:
    return re.split(r": | \(", title)[0]


def test_the_docstring_maps_every_section_by_its_banner_name_in_file_order():
    docstring = ast.get_docstring(ast.parse(SOURCE))
    listed = re.findall(r"^ ?\d+\. (.+)$", docstring.split("Sections, in order")[1], re.M)
    assert listed == [title for _, title in banners()]


def test_the_readme_names_the_sections_in_the_same_order():
    readme = (ROOT / "README.md").read_text()
    line = next(row for row in readme.split("\n") if row.startswith("| `relay_plugin.py` |"))
    named = line.split("dependency order: ")[1].split(" (its docstring")[0].split(", ")
    assert named == [short(title) for _, title in banners()]


def _defined_names(tree: ast.Module) -> dict[str, int]:
    defined: dict[str, int] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.setdefault(node.name, node.lineno)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name):
                    defined.setdefault(target.id, node.lineno)
    return defined


def test_no_section_uses_a_name_a_later_section_defines():
    tree = ast.parse(SOURCE)
    starts = [line for line, _ in banners()]
    section = lambda line: sum(1 for start in starts if start <= line)  # noqa: E731 - a one-line lookup
    defined = _defined_names(tree)
    ahead = set()
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        for used in ast.walk(node):
            if isinstance(used, ast.Name) and isinstance(used.ctx, ast.Load) and used.id in defined:
                if section(defined[used.id]) > section(node.lineno):
                    ahead.add((node.name, used.id))
    assert ahead == LATER_BY_DESIGN


def test_every_mode_is_one_row_of_the_mode_table():
    import relay_plugin

    assert tuple(relay_plugin.MODES) == relay_plugin.MODE_NAMES
    for name, row in relay_plugin.MODES.items():
        assert row.stream in ("pass", "buffer", "guard"), name
        assert row.fails_closed in ("refuse", "reject", "never"), name
        assert (row.fails_closed == "never") == row.background, name  # only work after the answer cannot fail it
    config = relay_plugin.RelayConfig.from_env({"RELAY_SECONDARY_MODEL": "s", "RELAY_ESCALATE_MODEL": "e",
                                                "RELAY_CONSENSUS_MODELS": "a,b"})
    called = {name: row.models(dataclasses.replace(config.plan, mode=name)) for name, row in relay_plugin.MODES.items()}
    assert called == {"refine": ["s"], "guard": ["s"], "annotate": ["s"], "escalate": ["s", "e"],
                      "consensus": ["a", "b", "s"], "shadow": ["s"]}


#: the only places besides the table that name a mode: a plan's required settings (configuration comes
#: before the table) and the metric that leaves background work out of the added latency
MODE_NAMED_OUTSIDE_THE_TABLE = {
    'if self.mode == "escalate" and not self.escalate_model:',
    'if self.mode == "consensus" and not self.consensus_models:',
    'if outcome.models and outcome.mode != "shadow":',
}


def test_no_code_outside_the_mode_table_switches_on_a_mode_name():
    modes = "|".join(("refine", "guard", "annotate", "escalate", "consensus", "shadow"))
    switches = {line.strip() for line in SOURCE.split("\n")
                if re.search(rf'mode\s*(?:==|!=|in)\s*[(\[{{]?\s*"(?:{modes})"', line)}
    assert switches == MODE_NAMED_OUTSIDE_THE_TABLE
