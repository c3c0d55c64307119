"""The marker language both simulators speak: what the SIM:* words of a prompt make a model answer.

``sim/providers.py`` (the simulated providers of the tests and load tests) and ``sim/emulators.py``
(the provider emulators cassettes are recorded against) both compose their answers here, so a marker
means the same in both. Standard library only.

Markers are searched in all the text of a request (system prompt and every message, one string):
    SIM:HTTP<status>   that HTTP status with the API's own error body (the first such marker wins)
    "verdict"          (with the quotes: a guard prompt) VERDICT_BLOCK if SIM:BLOCK is present,
                       else VERDICT_ALLOW
    "score"            (with the quotes: an escalate judge prompt) SCORE_LOW with SIM:LOWSCORE,
                       else SCORE_HIGH; for both judges SIM:GARBAGE answers GARBAGE_ANSWER instead
                       of JSON (even when structured output was asked for)
    SIM:ANSWER=<text>  <text>, up to the end of the line or a closing parenthesis (the last one wins)
    otherwise          "<model> says: <last user message, whitespace collapsed, first 200 characters>"
Structured output asked for in an API's own way: the answer is a JSON object that satisfies the
schema, with the judge's values above where they fit and placeholders elsewhere.
A max_tokens of the request truncates the answer to that many words (finish "length").
    SIM:USAGE=<n>      report <n> completion tokens whatever the answer (a provider that bills
                       reasoning tokens past the request's max_tokens)
Tokens: one per whitespace-separated word, at least 1.
The simulated providers know a few markers more (SIM:HANG, SIM:DROP, SIM:SLEEP=...): see sim/providers.py.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

HTTP_RE = re.compile(r"SIM:HTTP(\d{3})")
ANSWER_RE = re.compile(r"SIM:ANSWER=([^\r\n)]*)")
USAGE_RE = re.compile(r"SIM:USAGE=(\d+)")

VERDICT_BLOCK = {"verdict": "block", "reason": "simulated policy violation"}
VERDICT_ALLOW = {"verdict": "allow", "reason": "simulated: no policy issue"}
SCORE_LOW = {"score": 2, "reason": "simulated: weak answer"}
SCORE_HIGH = {"score": 9, "reason": "simulated: good answer"}
GARBAGE_ANSWER = "I think it is fine."

#: placeholder values by JSON-schema type, for the parts of a schema no judge value fits
PLACEHOLDERS: dict[str, Any] = {"string": "sim", "integer": 1, "number": 1, "boolean": True, "array": [], "object": {}}
JSON_TYPES: dict[str, Any] = {"string": str, "integer": int, "number": (int, float), "boolean": bool,
                              "array": list, "object": dict}


@dataclass
class Answer:
    """What a simulated model answers, before an API puts it in its own format."""

    kind: str = "text"  #: "text", "tool_call" or "empty"
    text: str = ""
    finish: str = "stop"  #: "stop", "length" or "tool_calls"; each API maps these to its own words
    tool_name: str = ""
    tool_arguments: dict[str, Any] = field(default_factory=dict)
    tool_call_id: str = ""
    prompt_tokens: int = 1
    completion_tokens: int = 1  #: per choice


def error_status(text: str) -> int | None:
    """The status of the first SIM:HTTP<status> marker in ``text``."""
    found = HTTP_RE.search(text)
    return int(found.group(1)) if found else None


def is_judge_prompt(text: str) -> bool:
    return '"verdict"' in text or '"score"' in text


def compose(model: str, text: str, last_user: str, *, schema: dict | None = None,
            max_tokens: int | None = None) -> Answer:
    """The text answer of ``model`` to a request whose text is ``text``: see the module docstring."""
    if '"verdict"' in text:
        verdict = VERDICT_BLOCK if "SIM:BLOCK" in text else VERDICT_ALLOW
        answer = GARBAGE_ANSWER if "SIM:GARBAGE" in text else json.dumps(verdict)
    elif '"score"' in text:
        score = SCORE_LOW if "SIM:LOWSCORE" in text else SCORE_HIGH
        answer = GARBAGE_ANSWER if "SIM:GARBAGE" in text else json.dumps(score)
    elif ANSWER_RE.search(text):
        answer = ANSWER_RE.findall(text)[-1].strip()
    else:
        answer = f"{model} says: {' '.join(last_user.split())[:200]}"
    if schema is not None and "SIM:GARBAGE" not in text:
        answer = json.dumps(schema_instance(schema, judged_values(answer)))
    finish = "stop"
    words = answer.split()
    if max_tokens is not None and len(words) > max_tokens:
        answer, finish = " ".join(words[:max_tokens]), "length"
    usage = USAGE_RE.findall(text)
    return Answer("text", text=answer, finish=finish, prompt_tokens=count_tokens(text),
                  completion_tokens=int(usage[-1]) if usage else count_tokens(answer))


# ----- structured output ---------------------------------------------------------------------------


def judged_values(text: str) -> dict[str, Any]:
    """The JSON object a composed answer is, or {} (prose)."""
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def fits(spec: Any, value: Any) -> bool:
    """Whether ``value`` satisfies one property's schema (enum and type; enough for the judges)."""
    if not isinstance(spec, dict):
        return True
    if "enum" in spec:
        return value in spec["enum"] and not (isinstance(value, bool) and True not in spec["enum"])
    kind = JSON_TYPES.get(spec.get("type")) if isinstance(spec.get("type"), str) else None
    if kind is None:
        return True
    return isinstance(value, kind) and not (isinstance(value, bool) and spec.get("type") in ("integer", "number"))


def schema_instance(schema: Any, preferred: dict[str, Any]) -> dict[str, Any]:
    """A JSON object that satisfies ``schema``'s properties, as a constrained decoder would produce:
    ``preferred``'s value for each property where it fits, a placeholder of the right kind elsewhere.
    A schema without properties (JSON mode) takes ``preferred`` as it is, or ``{"text": ...}``."""
    properties = schema.get("properties") if isinstance(schema, dict) else None
    if not isinstance(properties, dict) or not properties:
        return preferred or {"text": "sim"}
    result: dict[str, Any] = {}
    for name, spec in properties.items():
        if name in preferred and fits(spec, preferred[name]):
            result[name] = preferred[name]
        elif isinstance(spec, dict) and spec.get("enum"):
            result[name] = spec["enum"][0]
        else:
            kind = spec.get("type") if isinstance(spec, dict) else None
            result[name] = PLACEHOLDERS.get(kind, "sim") if isinstance(kind, str) else "sim"
    return result


def openai_schema(body: dict[str, Any]) -> dict[str, Any] | None:
    """OpenAI's ``response_format``: ``json_schema`` (its ``json_schema.schema``), or ``json_object``
    (any JSON object; with a ``schema`` beside it, as llama-cpp-python's server takes it)."""
    wanted = body.get("response_format")
    if not isinstance(wanted, dict):
        return None
    if wanted.get("type") == "json_schema":
        spec = wanted.get("json_schema")
        return spec.get("schema") or {} if isinstance(spec, dict) else {}
    if wanted.get("type") == "json_object":
        return wanted.get("schema") if isinstance(wanted.get("schema"), dict) else {}
    return None


def ollama_schema(body: dict[str, Any]) -> dict[str, Any] | None:
    """Ollama's ``format``: "json" (any JSON object) or a JSON schema."""
    wanted = body.get("format")
    if wanted == "json":
        return {}
    return wanted if isinstance(wanted, dict) else None


def forced_tool(choice: Any) -> str | None:
    """The tool a ``tool_choice`` insists on: OpenAI {"type": "function", "function": {"name"}},
    Anthropic {"type": "tool", "name"}."""
    if not isinstance(choice, dict):
        return None
    if choice.get("type") == "tool" and isinstance(choice.get("name"), str):
        return choice["name"]
    function = choice.get("function")
    if choice.get("type") == "function" and isinstance(function, dict) and isinstance(function.get("name"), str):
        return function["name"]
    return None


# ----- text, tokens, ids and frames --------------------------------------------------------------

#: a streamed "token": a word with the whitespace before it (trailing whitespace is a piece of its own)
PIECE_RE = re.compile(r"\s*\S+|\s+\Z")


def count_tokens(text: str) -> int:
    """One token per whitespace-separated word, at least 1."""
    return max(1, len(text.split()))


def pieces(text: str) -> list[str]:
    """The stream pieces of ``text``; they join back exactly (an empty text is one empty piece)."""
    return PIECE_RE.findall(text) or [text]


def content_text(content: Any) -> str:
    """The text of a message's content in any API's shape: a string, a list of parts or blocks (text
    kept, tool results searched, images and other parts skipped), or a block with ``parts``/``content``."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(text for text in map(content_text, content) if text)
    if isinstance(content, dict):
        if isinstance(content.get("text"), str):
            return content["text"]
        return content_text(content.get("parts") or content.get("content") or "")
    return ""


def new_id(prefix: str, size: int = 24) -> str:
    return prefix + uuid.uuid4().hex[:size]


def sse(data: Any, event: str | None = None, sep: str = "\n\n") -> bytes:
    """One server-sent event: ``data`` as JSON, under ``event`` when given."""
    prefix = f"event: {event}\n" if event else ""
    return f"{prefix}data: {json.dumps(data)}{sep}".encode()
