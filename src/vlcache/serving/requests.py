"""Requests to the server, parsed and checked: the OpenAI chat body, vlcache's own ask and cache bodies, and the
error every refusal becomes (OpenAI's error JSON)."""

from __future__ import annotations

import base64
import binascii
import math
from dataclasses import dataclass

from fastapi.responses import JSONResponse

from .. import toolcalls
from ..engine import GenerationOptions
from ..errors import VlcacheError
from ..media import IMAGE, VIDEO
from .store import KEY_PATTERN

MAX_TOKENS_CAP = 8192
MAX_MEDIA_PARTS = 32  # images and videos in one conversation
MAX_MESSAGES = 1024  # messages in one conversation
MAX_PARTS = 4096  # content parts in one conversation, of every kind


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers


def error_response(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                   headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return JSONResponse(body, status_code=status, headers=headers)



@dataclass(frozen=True)
class MediaRef:
    kind: str  # IMAGE or VIDEO
    url: str
    at: tuple[int, int]  # (message, part)


@dataclass
class ChatRequest:
    messages: list[dict]  # the chat template's form; images as {"type": "image"}, videos as {"type": "video"}
    media: list[MediaRef]  # in conversation order
    options: GenerationOptions
    stop: list[str]
    stream: bool
    include_usage: bool
    max_tokens_given: bool = True  # False: the server's default, shortened to fit the context
    salt: str | None = None  # cache_salt or user: states and conversations kept apart from other tenants
    state: str | None = None  # a stored state's id the messages continue (vlcache's own /v1/vlcache/ask)
    n: int = 1  # choices: rows sharing the prompt, seeds seed + i
    tools: bool = False  # the template was given tools: <tool_call> blocks in the answer become tool_calls
    parallel_tool_calls: bool = True  # False: only an answer's first call is returned


# Every top-level key of OpenAI's chat completion body (and vLLM's common extras), and what vlcache does with it.
# A key that is neither read nor listed as having no effect is refused with a 400 naming it (README: API).
CHAT_KEYS = {
    "messages", "model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop", "stream",
    "stream_options", "n", "logprobs", "top_logprobs", "logit_bias", "frequency_penalty", "presence_penalty",
    "response_format", "tools", "tool_choice", "parallel_tool_calls", "user", "cache_salt",
    "top_k", "min_p", "repetition_penalty",  # vLLM's extras
    "store", "service_tier", "modalities", "prompt_cache_key",  # accepted where they ask for nothing vlcache lacks
}
MAX_N = 8  # choices of one request (each a row of the batch)
MAX_LOGPROBS = 20  # OpenAI's top_logprobs limit


def refuse_unknown(body: dict, known: set[str]) -> None:
    """A 400 naming the first key vlcache does not honour: never a silent drop. A key sent as null asks for
    nothing and passes."""
    for key, value in body.items():
        if key not in known and value is not None:
            raise APIError(400, f"unsupported parameter '{key}': vlcache does not implement it (README: API lists "
                                "every parameter and how it is handled)", key)


def parse_chat(body: object, default_max_tokens: int) -> ChatRequest:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    refuse_unknown(body, CHAT_KEYS)
    _accepted_as_no_op(body)
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise APIError(400, "'messages' must be a non-empty list", "messages")
    _check_counts(raw)
    messages, found = [], []
    for i, message in enumerate(raw):
        messages.append(parse_message(message, i, found))
    if len(found) > MAX_MEDIA_PARTS:
        raise APIError(400, f"at most {MAX_MEDIA_PARTS} images and videos per conversation, got {len(found)}", "messages")
    n = body.get("n")
    n = 1 if n is None else number(n, "n", int, 1, MAX_N)
    max_tokens = body.get("max_completion_tokens")
    max_tokens = body.get("max_tokens") if max_tokens is None else max_tokens
    given = max_tokens is not None
    max_tokens = default_max_tokens if max_tokens is None else max_tokens
    options = GenerationOptions(
        max_new_tokens=number(max_tokens, "max_tokens", int, 1, MAX_TOKENS_CAP),
        temperature=number(body.get("temperature"), "temperature", float, 0, 2),
        top_p=number(body.get("top_p"), "top_p", float, 0, 1),
        seed=number(body.get("seed"), "seed", int, -(2**63), 2**63 - 1),
        **sampling_extras(body),
        **response_format(body.get("response_format")),
    )
    if options.top_p == 0:
        raise APIError(400, "top_p must be greater than 0", "top_p")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, "'stop' must be a string or a list of up to 4 non-empty strings", "stop")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise APIError(400, "'stream_options' must be an object", "stream_options")
    refuse_unknown(stream_options, {"include_usage"})
    stream = body.get("stream", False)
    include_usage = stream_options.get("include_usage", False)
    if not isinstance(stream, bool) or not isinstance(include_usage, bool):  # "false" is a string, not false
        raise APIError(400, "'stream' and 'stream_options.include_usage' must be true or false", "stream")
    salt = body.get("cache_salt", body.get("user"))
    if salt is not None and (not isinstance(salt, str) or not salt or len(salt) > 256):
        raise APIError(400, "'cache_salt' and 'user' must be strings of 1 to 256 characters", "cache_salt")
    logprobs = body.get("logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise APIError(400, "'logprobs' must be true or false", "logprobs")
    top = number(body.get("top_logprobs"), "top_logprobs", int, 0, MAX_LOGPROBS)
    if top is not None and top > 0 and not logprobs:
        raise APIError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
    if logprobs:
        options.logprobs = top or 0
    messages, found, call = parse_tools(body, messages, found)
    if call is not None and call.get("schema") is not None:
        if options.json_schema is not None:
            raise APIError(400, "a forced tool call and 'response_format' JSON cannot both shape one answer", "tool_choice")
        options.json_schema, options.json_strict, options.json_wrap = call["schema"], True, (toolcalls.OPEN + "\n", "\n" + toolcalls.CLOSE)
    return ChatRequest(
        messages=messages,
        media=found,
        options=options,
        stop=stop,
        stream=stream,
        include_usage=include_usage,
        max_tokens_given=given,
        salt=salt,
        n=n,
        tools=call is not None,
        parallel_tool_calls=body.get("parallel_tool_calls") is not False,
    )


def _check_counts(raw: list) -> None:
    """Refuse, before any message is parsed, conversations of more messages or parts than any chat needs: a body
    of a million tiny parts would otherwise cost seconds of parsing before its 400."""
    if len(raw) > MAX_MESSAGES:
        raise APIError(400, f"at most {MAX_MESSAGES} messages per conversation, got {len(raw)}", "messages")
    parts = sum(len(m["content"]) for m in raw if isinstance(m, dict) and isinstance(m.get("content"), list))
    if parts > MAX_PARTS:
        raise APIError(400, f"at most {MAX_PARTS} content parts per conversation, got {parts}", "messages")


def _accepted_as_no_op(body: dict) -> None:
    """Keys that are accepted only with the value that asks for nothing vlcache lacks."""
    if body.get("store"):
        raise APIError(400, "unsupported parameter 'store': vlcache keeps no completions (send false or leave it out)", "store")
    if body.get("service_tier") not in (None, "auto", "default"):
        raise APIError(400, "unsupported parameter 'service_tier': vlcache has one tier ('auto' or 'default')", "service_tier")
    modalities = body.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise APIError(400, "unsupported parameter 'modalities': vlcache answers in text only (['text'])", "modalities")
    key = body.get("prompt_cache_key")
    if key is not None and not isinstance(key, str):
        raise APIError(400, "'prompt_cache_key' must be a string", "prompt_cache_key")


def sampling_extras(body: dict) -> dict:
    """logit_bias, the penalties and vLLM's top_k, min_p, repetition_penalty, checked, as GenerationOptions fields."""
    out = {
        "frequency_penalty": number(body.get("frequency_penalty"), "frequency_penalty", float, -2, 2),
        "presence_penalty": number(body.get("presence_penalty"), "presence_penalty", float, -2, 2),
        "min_p": number(body.get("min_p"), "min_p", float, 0, 1),
        "repetition_penalty": number(body.get("repetition_penalty"), "repetition_penalty", float, 0, 100),
    }
    if out["repetition_penalty"] == 0:
        raise APIError(400, "'repetition_penalty' must be greater than 0", "repetition_penalty")
    top_k = body.get("top_k")
    if top_k is not None and top_k != -1:  # vLLM's -1: no top-k
        out["top_k"] = number(top_k, "top_k", int, 1, 2**31 - 1)
    bias = body.get("logit_bias")
    if bias is not None:
        if not isinstance(bias, dict) or len(bias) > 1024:
            raise APIError(400, "'logit_bias' must map token ids to numbers (at most 1024 of them)", "logit_bias")
        checked = {}
        for token, value in bias.items():
            if not (isinstance(token, str) and token.isdigit() and len(token) <= 9):
                raise APIError(400, f"'logit_bias' keys are token ids, got {token!r}", "logit_bias")
            checked[int(token)] = number(value, "logit_bias", float, -100, 100)
        out["logit_bias"] = checked or None
    return {k: v for k, v in out.items() if v is not None}


def response_format(spec: object) -> dict:
    """OpenAI's response_format as GenerationOptions fields: {"type": "text"} (nothing), {"type": "json_object"}
    (any JSON object), {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}."""
    if spec is None:
        return {}
    if not isinstance(spec, dict) or spec.get("type") not in ("text", "json_object", "json_schema"):
        raise APIError(400, "'response_format' must be {'type': 'text'}, {'type': 'json_object'} or {'type': "
                            "'json_schema', 'json_schema': {...}}", "response_format")
    kind = spec["type"]
    refuse_unknown({k: v for k, v in spec.items() if k != "type"}, {"json_schema"} if kind == "json_schema" else set())
    if kind == "text":
        return {}
    if kind == "json_object":
        return {"json_schema": {"type": "object"}, "json_strict": False}
    inner = spec.get("json_schema")
    if not isinstance(inner, dict) or not isinstance(inner.get("name"), str) or not inner["name"]:
        raise APIError(400, "'response_format.json_schema' needs a 'name' and a 'schema'", "response_format")
    refuse_unknown(inner, {"name", "description", "schema", "strict"})
    schema = inner.get("schema", {})
    strict = inner.get("strict")
    if not isinstance(schema, dict) or (strict is not None and not isinstance(strict, bool)):
        raise APIError(400, "'response_format.json_schema.schema' must be an object and 'strict' true or false",
                       "response_format")
    return {"json_schema": schema, "json_strict": bool(strict)}


def parse_message(message: object, index: int, found: list) -> dict:
    if not isinstance(message, dict) or message.get("role") not in ("system", "developer", "user", "assistant", "tool"):
        raise APIError(400, f"messages[{index}] needs a role of system, user, assistant or tool", f"messages[{index}]")
    role = "system" if message["role"] == "developer" else message["role"]
    content = message.get("content")
    if role == "assistant" and message.get("tool_calls") is not None:
        calls = _tool_calls(message["tool_calls"], index)
        text = "" if content is None else parse_message({"role": "assistant", "content": content}, index, found)["content"]
        return {"role": role, "content": text, "tool_calls": calls}
    if role == "tool" and not isinstance(message.get("tool_call_id", ""), str):
        raise APIError(400, f"messages[{index}].tool_call_id must be a string", f"messages[{index}]")
    if isinstance(content, str):
        return {"role": role, "content": content if role != "user" else [{"type": "text", "text": content}]}
    if not isinstance(content, list):
        raise APIError(400, f"messages[{index}].content must be a string or a list of parts", f"messages[{index}].content")
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind in ("image_url", "video_url") and role == "user":
            url = part.get(kind)
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str) or not url:
                raise APIError(400, f"messages[{index}].content[{j}].{kind}.url is missing", f"messages[{index}].content")
            media = IMAGE if kind == "image_url" else VIDEO
            found.append(MediaRef(media, url, (index, j)))
            parts.append({"type": media})
        else:
            raise APIError(400, f"messages[{index}].content[{j}] is not a supported part (text, or image_url and "
                                "video_url in a user message)", f"messages[{index}].content")
    if role == "user":
        return {"role": role, "content": parts}
    return {"role": role, "content": "".join(p["text"] for p in parts)}


def _tool_calls(calls: object, index: int) -> list[dict]:
    """An assistant message's earlier calls, as the chat template renders them (arguments as the JSON text sent)."""
    where = f"messages[{index}].tool_calls"
    if not isinstance(calls, list) or not calls:
        raise APIError(400, f"{where} must be a non-empty list", where)
    out = []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if (not isinstance(function, dict) or not isinstance(function.get("name"), str)
                or not isinstance(function.get("arguments"), str) or call.get("type", "function") != "function"):
            raise APIError(400, f"{where} entries must be {{'type': 'function', 'function': {{'name', 'arguments'}}}}", where)
        out.append({"id": str(call.get("id", "")), "type": "function",
                    "function": {"name": function["name"], "arguments": function["arguments"]}})
    return out


def parse_tools(body: dict, messages: list[dict], found: list) -> tuple[list[dict], list, dict | None]:
    """`tools` and `tool_choice`: the messages with the tools' entry in front (vlcache.toolcalls), the media
    references moved with them, and the call the answer must be (None: the model chooses)."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise APIError(400, "'parallel_tool_calls' must be true or false", "parallel_tool_calls")
    if tools is None or tools == []:
        if choice not in (None, "none"):
            raise APIError(400, "'tool_choice' needs 'tools'", "tool_choice")
        return messages, found, None
    if not isinstance(tools, list) or len(tools) > 128:
        raise APIError(400, "'tools' must be a list of at most 128 function tools", "tools")
    try:
        checked = [toolcalls.check_tool(tool, f"tools[{i}]") for i, tool in enumerate(tools)]
    except VlcacheError as exc:
        raise APIError(400, str(exc), "tools") from None
    names = [t["function"]["name"] for t in checked]
    if len(set(names)) != len(names):
        raise APIError(400, "'tools' names a function twice", "tools")
    forced = None
    if choice == "required":
        forced = {"schema": toolcalls.call_schema(checked)}
    elif isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
        if name not in names:
            raise APIError(400, "'tool_choice' must be 'none', 'auto', 'required' or {'type': 'function', 'function': "
                                "{'name': one of the tools}}", "tool_choice")
        forced = {"schema": toolcalls.call_schema(checked, name)}
    elif choice not in (None, "auto", "none"):
        raise APIError(400, "'tool_choice' must be 'none', 'auto', 'required' or {'type': 'function', ...}", "tool_choice")
    moved = [MediaRef(ref.kind, ref.url, (ref.at[0] + 1, ref.at[1])) for ref in found]
    if choice == "none":  # as OpenAI and vLLM: the template still shows the tools; the answer is text, not parsed
        return [toolcalls.tools_entry(checked), *messages], moved, None
    return [toolcalls.tools_entry(checked), *messages], moved, forced or {}


def number(value, name: str, kind, low, high):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise APIError(400, f"'{name}' must be a number", name)
    if isinstance(value, float) and not math.isfinite(value):
        raise APIError(400, f"'{name}' must be a finite number", name)
    if kind is int and isinstance(value, float) and not value.is_integer():
        raise APIError(400, f"'{name}' must be a whole number", name)
    if not low <= value <= high:  # exact for any size of int: no float conversion that could overflow
        raise APIError(400, f"'{name}' must be between {low} and {high}", name)
    return kind(value)



def valid_id(image_id: object, param: str = "image_id") -> str:
    if not isinstance(image_id, str) or not KEY_PATTERN.fullmatch(image_id):
        raise APIError(400, "state ids are 64 lowercase hex digits", param)
    return image_id



ASK_KEYS = {"state", "messages", "max_new_tokens", "temperature", "top_p", "seed", "stream", "response_format",
            "logit_bias", "frequency_penalty", "presence_penalty", "top_k", "min_p", "repetition_penalty"}


def parse_ask(body: object, default_max_tokens: int) -> ChatRequest:
    """{"state": id or null, "messages": [...], "max_new_tokens", "temperature", "top_p", "seed", "stream", and
    the chat body's response_format, logit_bias, penalties, top_k, min_p}.
    With a state, `messages` are what follows it (user questions, and earlier answers of a chat); without,
    a whole text-only conversation."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    refuse_unknown(body, ASK_KEYS)
    state = body.get("state")
    if state is not None:
        valid_id(state, "state")
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise APIError(400, "'messages' must be a non-empty list", "messages")
    _check_counts(raw)
    found: list = []
    messages = [parse_message(m, i, found) for i, m in enumerate(raw)]
    if found:
        raise APIError(400, "send images and videos to /v1/vlcache/cache or /v1/chat/completions, not here", "messages")
    if any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
        raise APIError(400, "tool calls go through /v1/chat/completions with 'tools', not here", "messages")
    if messages[-1]["role"] != "user":
        raise APIError(400, "the last message must be the user's question", "messages")
    if state is not None and any(m["role"] == "system" for m in messages):
        raise APIError(400, "a state holds its own system prompt; send only the turns after it", "messages")
    max_tokens = body.get("max_new_tokens")
    options = GenerationOptions(
        max_new_tokens=number(default_max_tokens if max_tokens is None else max_tokens, "max_new_tokens", int, 1, MAX_TOKENS_CAP),
        temperature=number(body.get("temperature"), "temperature", float, 0, 2),
        top_p=number(body.get("top_p"), "top_p", float, 0, 1),
        seed=number(body.get("seed"), "seed", int, -(2**63), 2**63 - 1),
        **sampling_extras(body),
        **response_format(body.get("response_format")),
    )
    if options.top_p == 0:
        raise APIError(400, "top_p must be greater than 0", "top_p")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, "'stream' must be true or false", "stream")
    return ChatRequest(messages=messages, media=[], options=options, stop=[], stream=stream, include_usage=False,
                       max_tokens_given=max_tokens is not None, state=state)


def parse_cache(body: object) -> tuple[list[bytes], list[str], str | None]:
    if not isinstance(body, dict) or not isinstance(body.get("parts"), list) or not body["parts"]:
        raise APIError(400, "send {'parts': [{'type': 'image' or 'video', 'data': base64}], 'system_prompt': optional}", "parts")
    if len(body["parts"]) > MAX_MEDIA_PARTS:
        raise APIError(400, f"at most {MAX_MEDIA_PARTS} images and videos per state", "parts")
    system_prompt = body.get("system_prompt")
    if system_prompt is not None and not isinstance(system_prompt, str):
        raise APIError(400, "'system_prompt' must be a string", "system_prompt")
    sources, kinds = [], []
    for i, part in enumerate(body["parts"]):
        if not isinstance(part, dict) or part.get("type") not in (IMAGE, VIDEO) or not isinstance(part.get("data"), str):
            raise APIError(400, f"parts[{i}] needs a type of image or video and base64 data", "parts")
        try:
            sources.append(base64.b64decode(part["data"], validate=True))
        except (binascii.Error, ValueError):
            raise APIError(400, f"parts[{i}].data is not valid base64", "parts") from None
        kinds.append(part["type"])
    return sources, kinds, system_prompt
