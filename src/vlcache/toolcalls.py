"""Tool calls through the chat template's own tool support, and the calls parsed back out of an answer.

The tools of a request travel inside its conversation, as a leading pseudo-message {"role": TOOLS_ROLE,
"content": their JSON}: everything that renders, splits, keys or checks a conversation (prompt.render, the
server's state keys, the control-token check) then sees them with no new argument. prompt.render takes the entry
out and hands the tools to the template, which puts them where the model was trained to find them (Qwen3-VL: in
the system turn, so a state made with tools is another state than one without).

Calls come back in the Hermes form Qwen's templates ask for: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n
</tool_call>`. A template that takes tools but asks for another form is refused (unsupported) rather than answered
with calls left unparsed in the text.
"""

from __future__ import annotations

import json
import re
import uuid

from .errors import PromptError

TOOLS_ROLE = "vlcache.tools"
OPEN, CLOSE = "<tool_call>", "</tool_call>"
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def tools_entry(tools: list[dict]) -> dict:
    """The pseudo-message that carries a request's tools (OpenAI's [{"type": "function", "function": {...}}])."""
    return {"role": TOOLS_ROLE, "content": json.dumps(tools)}  # key order kept: the template shows it


def split(messages: list[dict]) -> tuple[list[dict] | None, list[dict]]:
    """(the tools or None, the conversation without their entry)."""
    if messages and messages[0].get("role") == TOOLS_ROLE:
        return json.loads(messages[0]["content"]), messages[1:]
    return None, messages


_support: dict[str, str | None] = {}


def template_problem(processor) -> str | None:
    """Why this model's chat template cannot take tools (None: it can): it must write a tool it is given into
    the prompt, and ask for calls in the <tool_call> form this module parses. Probed once per template."""
    template = processor.chat_template or ""
    if template not in _support:
        from transformers.utils.chat_template_utils import render_jinja_template

        probe = {"type": "function", "function": {"name": "vlcache_probe_tool", "parameters": {"type": "object"}}}
        try:
            rendered, _ = render_jinja_template(conversations=[[{"role": "user", "content": "hi"}]], tools=[probe],
                                                chat_template=template, add_generation_prompt=True)
            text = rendered[0]
        except Exception:  # noqa: BLE001 - a template that fails with tools does not take them
            text = ""
        if "vlcache_probe_tool" not in text:
            _support[template] = "this model's chat template does not take tools"
        elif OPEN not in text:
            _support[template] = "this model's chat template asks for tool calls in a form vlcache does not parse (only <tool_call> JSON)"
        else:
            _support[template] = None
    return _support[template]


def check_tool(tool: object, where: str) -> dict:
    """An OpenAI function tool, checked: {"type": "function", "function": {"name", "description"?, "parameters"?}}."""
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
        raise PromptError(f"{where} must be {{'type': 'function', 'function': {{...}}}} (vlcache takes function tools only)")
    function = tool["function"]
    unknown = set(function) - {"name", "description", "parameters", "strict"}
    if unknown:
        raise PromptError(f"{where}.function has unsupported fields: {', '.join(sorted(unknown))}")
    if not isinstance(function.get("name"), str) or not _NAME.match(function["name"]):
        raise PromptError(f"{where}.function.name must be 1 to 64 letters, digits, _ or -")
    if "description" in function and not isinstance(function["description"], str):
        raise PromptError(f"{where}.function.description must be a string")
    if not isinstance(function.get("parameters", {}), dict):
        raise PromptError(f"{where}.function.parameters must be a JSON schema object")
    return {"type": "function", "function": function}


def call_schema(tools: list[dict], name: str | None = None) -> dict:
    """The JSON schema of one call's object {"name": ..., "arguments": {...}} for the named tool, or any of them."""
    options = []
    for tool in tools:
        function = tool["function"]
        if name is not None and function["name"] != name:
            continue
        parameters = function.get("parameters") or {"type": "object"}
        options.append({"type": "object", "properties": {"name": {"const": function["name"]}, "arguments": parameters},
                        "required": ["name", "arguments"], "additionalProperties": False})
    return options[0] if len(options) == 1 else {"anyOf": options}


def parse(text: str) -> tuple[str | None, list[dict]]:
    """(the text outside the calls or None when empty, OpenAI tool_calls) from an answer. A block that is not
    a JSON object with a name stays in the text (it was not a call)."""
    calls, rest, at = [], [], 0
    while True:
        start = text.find(OPEN, at)
        end = text.find(CLOSE, start + len(OPEN)) if start != -1 else -1
        if start == -1 or end == -1:
            rest.append(text[at:])
            break
        call = _call(text[start + len(OPEN): end])
        if call is None:
            rest.append(text[at: end + len(CLOSE)])
        else:
            rest.append(text[at:start])
            calls.append(call)
        at = end + len(CLOSE)
    content = "".join(rest).strip()
    return (content or None), calls


def _call(body: str) -> dict | None:
    try:
        value = json.loads(body)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", {})
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": value["name"],
                         "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)}}


class CallStream:
    """Splits streamed text into content pieces and whole tool calls: text that may begin a call is held back
    until the call closes (then it is one tool_calls delta) or turns out to be text."""

    def __init__(self):
        self.buffer = ""
        self.calls = 0

    def feed(self, piece: str) -> list[tuple[str, object]]:
        self.buffer += piece
        out: list[tuple[str, object]] = []
        while self.buffer:
            start = self.buffer.find(OPEN)
            if start == -1:
                keep = _partial_open(self.buffer)  # the end may be the start of "<tool_call>"
                if len(self.buffer) > keep:
                    out.append(("text", self.buffer[: len(self.buffer) - keep]))
                    self.buffer = self.buffer[len(self.buffer) - keep:]
                break
            if start:
                out.append(("text", self.buffer[:start]))
                self.buffer = self.buffer[start:]
            end = self.buffer.find(CLOSE)
            if end == -1:
                break  # a call still being written
            block = self.buffer[: end + len(CLOSE)]
            self.buffer = self.buffer[end + len(CLOSE):]
            call = _call(block[len(OPEN): -len(CLOSE)])
            if call is None:
                out.append(("text", block))
            else:
                out.append(("call", {"index": self.calls, **call}))
                self.calls += 1
        return out

    def flush(self) -> list[tuple[str, object]]:
        """What is left at the end (an unclosed call is text)."""
        rest, self.buffer = self.buffer, ""
        return [("text", rest)] if rest else []


def _partial_open(text: str) -> int:
    for n in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-n:]):
            return n
    return 0
