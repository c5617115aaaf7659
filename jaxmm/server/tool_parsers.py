"""Tool calls out of generated text, whole or streamed, in the formats of the models jaxmm
serves (`--tool-call-parser`, vLLM's names):

- `hermes` (Hermes, Qwen2.5/Qwen3): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`,
  repeated; text before the first tag is the message's content.
- `llama3_json` (Llama 3.x): the output is `{"name": ..., "parameters": {...}}` (optionally
  after `<|python_tag|>`), several separated by `;`.
- `mistral`: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`.
- `json_list` (no flag: what `tool_choice="required"` constrains the output to):
  `[{"name": ..., "parameters": {...}}, ...]`.

Every format is "a start marker, then JSON objects with a name and an arguments object", so
one scanner serves all: it finds the top-level objects after the marker (string-aware brace
depth), reads each one's name, and takes the arguments as the raw JSON text of their value.
Streaming emits what OpenAI emits: per call a first delta with its index, id, type and name,
then pieces of the arguments string; text that may still turn out to start a marker is held
back until it cannot.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

_NAME = re.compile(r'"name"\s*:\s*"((?:[^"\\]|\\.)*)"')
_DECODER = json.JSONDecoder()


@dataclass(frozen=True)
class ToolFormat:
    name: str
    markers: tuple[str, ...]  # any of these starts the tool calls
    args_keys: tuple[str, ...] = ("arguments", "parameters")
    starts_with_json: bool = False  # a leading "{" (or "[") starts them too
    end_marker: str | None = None  # ends one call (Hermes); objects are found inside


FORMATS = {
    "hermes": ToolFormat("hermes", ("<tool_call>",), end_marker="</tool_call>"),
    "llama3_json": ToolFormat("llama3_json", ("<|python_tag|>",), starts_with_json=True),
    "mistral": ToolFormat("mistral", ("[TOOL_CALLS]",)),
    "json_list": ToolFormat("json_list", (), starts_with_json=True),
}
# vLLM's other names for the same formats
ALIASES = {"qwen": "hermes", "qwen3": "hermes", "llama3": "llama3_json", "llama": "llama3_json"}


def get_format(name: str) -> ToolFormat:
    key = ALIASES.get(name, name)
    if key not in FORMATS:
        known = ", ".join(sorted(set(FORMATS) - {"json_list"} | set(ALIASES)))
        raise ValueError(f"unknown tool call parser {name!r}; known: {known}")
    return FORMATS[key]


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _objects(text: str, start: int) -> list[tuple[int, int | None]]:
    """Top-level JSON objects in text[start:]: (begin, end) with end None if unfinished."""
    out: list[tuple[int, int | None]] = []
    depth, in_str, esc, begin = 0, False, False, 0
    for i in range(start, len(text)):
        c = text[i]
        if in_str:
            if esc:
                esc = False
            elif c == "\\":
                esc = True
            elif c == '"':
                in_str = False
        elif c == '"':
            in_str = depth > 0
        elif c == "{":
            if depth == 0:
                begin = i
            depth += 1
        elif c == "}" and depth > 0:
            depth -= 1
            if depth == 0:
                out.append((begin, i + 1))
    if depth > 0:
        out.append((begin, None))
    return out


def _args_span(obj: str, keys: tuple[str, ...]) -> tuple[int, int | None] | None:
    """Where the arguments value sits in one call object's text (end None: unfinished)."""
    m = re.search(r'"(?:' + "|".join(keys) + r')"\s*:\s*', obj)
    if m is None:
        return None
    try:
        _, end = _DECODER.raw_decode(obj, m.end())
        return m.end(), end
    except ValueError:
        return m.end(), None


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text
    id: str = field(default_factory=new_call_id)

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


class ToolCallParser:
    """One choice's tool calls, from the whole text or as it streams."""

    def __init__(self, fmt: ToolFormat):
        self.fmt = fmt
        self.text = ""
        self.sent_content = 0  # characters of content already emitted
        self.calls: list[ToolCall] = []  # announced in the stream so far
        self.sent_args: list[int] = []  # characters of each call's arguments emitted

    def _start(self, text: str) -> int | None:
        """Where the tool calls begin (the marker's position), None if not (yet) seen."""
        found = [text.find(m) for m in self.fmt.markers if m in text]
        if found:
            return min(found)
        if self.fmt.starts_with_json:
            stripped = text.lstrip()
            if stripped[:1] in ("{", "["):
                return len(text) - len(stripped)
        return None

    def _holdback(self, text: str) -> int:
        """How many trailing characters could still grow into a marker."""
        keep = 0
        for m in self.fmt.markers:
            for k in range(min(len(m) - 1, len(text)), 0, -1):
                if text.endswith(m[:k]):
                    keep = max(keep, k)
                    break
        if self.fmt.starts_with_json and not text.strip():
            keep = len(text)  # only whitespace so far: a "{" may follow
        return keep

    def _scan(self, text: str, begin: int) -> list[tuple[str | None, str, bool]]:
        """(name, arguments text so far, complete) of each call after `begin`."""
        body = text[begin:]
        for m in self.fmt.markers:
            body = body.replace(m, " " * len(m))  # keep offsets; markers are not JSON
        if self.fmt.end_marker:
            body = body.replace(self.fmt.end_marker, " " * len(self.fmt.end_marker))
        calls = []
        for b, e in _objects(body, 0):
            obj = body[b:e] if e is not None else body[b:]
            m = _NAME.search(obj)
            name = json.loads(f'"{m.group(1)}"') if m else None
            span = _args_span(obj, self.fmt.args_keys)
            if span is None:
                # a call without arguments is complete once its object is
                calls.append((name, "{}" if e is not None else "", e is not None))
                continue
            a, z = span
            calls.append((name, obj[a:z] if z is not None else obj[a:], z is not None))
        return calls

    # -- whole text ---------------------------------------------------------------------------
    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, calls) of a finished output; no valid call: all of it is content."""
        begin = self._start(text)
        if begin is None:
            return text, []
        calls = []
        for name, args, complete in self._scan(text, begin):
            if not complete or name is None:
                return text, []
            try:
                json.loads(args)
            except ValueError:
                return text, []
            calls.append(ToolCall(name, args))
        if not calls:
            return text, []
        content = text[:begin].strip()
        return content or None, calls

    # -- streaming ----------------------------------------------------------------------------
    def feed(self, delta: str, finished: bool) -> dict:
        """The chat delta ({"content": ...} and/or {"tool_calls": [...]}) for new text."""
        self.text += delta
        text = self.text
        out: dict = {}
        begin = self._start(text)
        content_end = begin if begin is not None else len(text)
        if begin is None and not finished:
            content_end -= self._holdback(text)
        if content_end > self.sent_content:
            out["content"] = text[self.sent_content : content_end]
            self.sent_content = content_end
        if begin is None:
            return out
        deltas = []
        for i, (name, args, complete) in enumerate(self._scan(text, begin)):
            if name is None:
                break
            if i == len(self.calls):
                call = ToolCall(name, "")
                self.calls.append(call)
                self.sent_args.append(0)
                deltas.append(
                    {
                        "index": i,
                        "id": call.id,
                        "type": "function",
                        "function": {"name": name, "arguments": ""},
                    }
                )
            # an unfinished value may still end in braces of the call object: hold them
            upto = len(args) if complete or finished else len(args.rstrip().rstrip("}"))
            if complete and not args:
                args = "{}"
                upto = 2
            if upto > self.sent_args[i]:
                piece = args[self.sent_args[i] : upto]
                self.sent_args[i] = upto
                self.calls[i].arguments += piece
                if deltas and deltas[-1]["index"] == i:
                    deltas[-1]["function"]["arguments"] += piece
                else:
                    deltas.append({"index": i, "function": {"arguments": piece}})
        if deltas:
            out["tool_calls"] = deltas
        return out


def tools_schema(tools: list[dict], max_calls: int | None = None) -> dict:
    """The JSON schema `tool_choice="required"` constrains the output to: a non-empty list
    (at most `max_calls` long) of {"name": one of the tools, "parameters": its parameters}."""
    alternatives = []
    for t in tools:
        fn = t.get("function") or {}
        alternatives.append(
            {
                "type": "object",
                "properties": {
                    "name": {"const": fn.get("name")},
                    "parameters": fn.get("parameters") or {"type": "object"},
                },
                "required": ["name", "parameters"],
                "additionalProperties": False,
            }
        )
    schema = {"type": "array", "minItems": 1, "items": {"anyOf": alternatives}}
    if max_calls is not None:
        schema["maxItems"] = max_calls
    return schema


def prepare_messages(messages: list[dict]) -> list[dict]:
    """Assistant tool calls as chat templates expect them: arguments as objects, not the
    JSON strings OpenAI clients send back."""
    out = []
    for msg in messages:
        calls = msg.get("tool_calls") if isinstance(msg, dict) else None
        if isinstance(calls, list):
            fixed = []
            for c in calls:
                fn = c.get("function") if isinstance(c, dict) else None
                if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                    try:
                        fn = {**fn, "arguments": json.loads(fn["arguments"])}
                    except ValueError:
                        pass  # the template gets the string as it is
                    c = {**c, "function": fn}
                fixed.append(c)
            msg = {**msg, "tool_calls": fixed}
        out.append(msg)
    return out
