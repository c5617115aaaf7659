"""A chat request's generated text -> the assistant message OpenAI clients expect: reasoning
(`reasoning.py`), content and tool calls (`tool_parsers.py`), whole or as stream deltas.

How `tool_choice` is honoured:
- "none" (or no tools): plain content; the tools still reach the template.
- "auto" (the default with tools when the server runs with `--enable-auto-tool-choice`):
  calls are parsed from the model's own format (`--tool-call-parser`); without those flags
  an explicit "auto" is a 400, as in vLLM.
- "required": the output is constrained (structured outputs) to a non-empty JSON list of
  {"name", "parameters"} over the given tools, each item one call.
- a named function: the output is constrained to that function's parameters schema and is
  the call's arguments.
Reasoning is split off first; tool calls are parsed from what follows it.
"""

from __future__ import annotations

from typing import Any

from jaxmm.sampling_params import StructuredOutputsParams
from jaxmm.server import reasoning
from jaxmm.server.errors import APIError
from jaxmm.server.tool_parsers import (
    ToolCall,
    ToolCallParser,
    get_format,
    new_call_id,
    tools_schema,
)


def _tool_names(tools: list[dict]) -> list[str]:
    names = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if t.get("type", "function") != "function" or not isinstance(fn, dict):
            raise APIError(400, f"tools[{i}] must be a function tool", param="tools")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise APIError(400, f"tools[{i}].function.name must be a string", param="tools")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise APIError(
                400, f"tools[{i}].function.parameters must be a JSON schema", param="tools"
            )
        names.append(fn["name"])
    return names


class ChatOutput:
    """Per request: the tool mode, the reasoning parser, and how to shape the output."""

    def __init__(self, req: Any, state: Any):
        self.reasoning = getattr(state, "reasoning_parser", None)
        tools = req.tools or []
        names = _tool_names(tools)
        choice = req.tool_choice
        auto_ok = bool(getattr(state, "enable_auto_tool_choice", False))
        parser = getattr(state, "tool_call_parser", None)
        self.mode = "none"  # none | auto | required | named
        self.named: str | None = None
        self.constraint: StructuredOutputsParams | None = None
        if choice is None:
            choice = "auto" if tools and auto_ok and parser else "none"
        if isinstance(choice, dict):
            fn = choice.get("function") if choice.get("type", "function") == "function" else None
            name = fn.get("name") if isinstance(fn, dict) else None
            if name not in names:
                raise APIError(
                    400,
                    f"tool_choice names {str(name)[:100]!r}, which is not among the tools",
                    param="tool_choice",
                )
            self.mode, self.named = "named", name
            fns = [t["function"] for t in tools]
            params = next(f.get("parameters") for f in fns if f["name"] == name)
            self.constraint = StructuredOutputsParams(json=params or {"type": "object"})
        elif choice == "required":
            if not tools:
                raise APIError(400, "tool_choice 'required' needs tools", param="tool_choice")
            self.mode = "required"
            # parallel_tool_calls=false: one call
            one = getattr(req, "parallel_tool_calls", None) is False
            self.constraint = StructuredOutputsParams(json=tools_schema(tools, 1 if one else None))
        elif choice == "auto":
            if not (auto_ok and parser):
                raise APIError(
                    400,
                    '"auto" tool choice requires --enable-auto-tool-choice and '
                    "--tool-call-parser to be set",
                    param="tool_choice",
                )
            if tools:
                self.mode = "auto"
        elif choice != "none":
            raise APIError(
                400,
                "tool_choice must be 'none', 'auto', 'required' or a named function",
                param="tool_choice",
            )
        fmt = {"auto": parser, "required": "json_list"}.get(self.mode)
        self.format = get_format(fmt) if fmt else None

    def constrain(
        self, so: StructuredOutputsParams | None, field: str | None
    ) -> tuple[StructuredOutputsParams | None, str | None]:
        """The request's output constraint, with the one tool_choice needs."""
        if self.constraint is None:
            return so, field
        if so is not None:
            raise APIError(
                400,
                f"tool_choice {self.mode!r} constrains the output; {field} cannot be used with it",
                param=field,
            )
        return self.constraint, "tool_choice"

    # -- whole message ------------------------------------------------------------------------
    def message(self, role: str, text: str, finish_reason: str | None) -> tuple[dict, str | None]:
        """(message, finish_reason) for a finished choice."""
        msg: dict = {"role": role, "content": text}
        if self.reasoning:
            r, text = reasoning.split(self.reasoning, text)
            msg["reasoning_content"] = r
            msg["content"] = text
        text = text or ""
        if self.mode == "named":
            msg["content"] = None
            msg["tool_calls"] = [ToolCall(self.named, text).to_json()]
        elif self.format is not None:
            content, calls = ToolCallParser(self.format).extract(text)
            if calls:
                msg["content"] = content
                msg["tool_calls"] = [c.to_json() for c in calls]
                if finish_reason == "stop":
                    finish_reason = "tool_calls"
        return msg, finish_reason

    def stream(self) -> ChoiceStream:
        return ChoiceStream(self)


class ChoiceStream:
    """One choice's deltas: reasoning, then content or tool-call pieces."""

    def __init__(self, out: ChatOutput):
        self.out = out
        self.reasoning = reasoning.ReasoningStream(out.reasoning) if out.reasoning else None
        self.tools = ToolCallParser(out.format) if out.format is not None else None
        self.named_id = new_call_id() if out.mode == "named" else None
        self.named_sent = False
        self.called = False

    def feed(self, text: str, finished: bool) -> dict:
        delta: dict = {}
        if self.reasoning is not None:
            d = self.reasoning.feed(text, finished)
            if "reasoning_content" in d:
                delta["reasoning_content"] = d["reasoning_content"]
            text = d.get("content", "")
        if self.out.mode == "named":
            call: dict = {"index": 0, "function": {"arguments": text}}
            if not self.named_sent:
                call.update(id=self.named_id, type="function")
                call["function"]["name"] = self.out.named
                self.named_sent = True
            elif not text:
                return delta
            delta["tool_calls"] = [call]
            return delta
        if self.tools is not None:
            d = self.tools.feed(text, finished)
            if "tool_calls" in d:
                self.called = True
            delta.update(d)
            return delta
        if text:
            delta["content"] = text
        return delta

    def finish_reason(self, reason: str | None) -> str | None:
        return "tool_calls" if reason == "stop" and self.called else reason


def check_flags(
    tool_call_parser: str | None, reasoning_parser: str | None, enable_auto_tool_choice: bool
) -> None:
    """Server start-up: the parser names must be known (ValueError otherwise)."""
    if enable_auto_tool_choice and tool_call_parser is None:
        raise ValueError("--enable-auto-tool-choice needs --tool-call-parser")
    if tool_call_parser is not None:
        get_format(tool_call_parser)
    if reasoning_parser is not None:
        reasoning.check_parser(reasoning_parser)
