"""Requests to the server, parsed and checked: the OpenAI chat body, vlcache's own ask and cache bodies, and the
error every refusal becomes (OpenAI's error JSON)."""

from __future__ import annotations

import base64
import binascii
import math
from dataclasses import dataclass

from fastapi.responses import JSONResponse

from ..engine import GenerationOptions
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


def parse_chat(body: object, default_max_tokens: int) -> ChatRequest:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise APIError(400, "'messages' must be a non-empty list", "messages")
    _check_counts(raw)
    messages, found = [], []
    for i, message in enumerate(raw):
        messages.append(parse_message(message, i, found))
    if len(found) > MAX_MEDIA_PARTS:
        raise APIError(400, f"at most {MAX_MEDIA_PARTS} images and videos per conversation, got {len(found)}", "messages")
    n = body.get("n", 1)
    if type(n) is not int or n != 1:
        raise APIError(400, "only n=1 is supported", "n")
    max_tokens = body.get("max_completion_tokens")
    max_tokens = body.get("max_tokens") if max_tokens is None else max_tokens
    given = max_tokens is not None
    max_tokens = default_max_tokens if max_tokens is None else max_tokens
    options = GenerationOptions(
        max_new_tokens=number(max_tokens, "max_tokens", int, 1, MAX_TOKENS_CAP),
        temperature=number(body.get("temperature"), "temperature", float, 0, 2),
        top_p=number(body.get("top_p"), "top_p", float, 0, 1),
        seed=number(body.get("seed"), "seed", int, -(2**63), 2**63 - 1),
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
    stream = body.get("stream", False)
    include_usage = stream_options.get("include_usage", False)
    if not isinstance(stream, bool) or not isinstance(include_usage, bool):  # "false" is a string, not false
        raise APIError(400, "'stream' and 'stream_options.include_usage' must be true or false", "stream")
    salt = body.get("cache_salt", body.get("user"))
    if salt is not None and (not isinstance(salt, str) or not salt or len(salt) > 256):
        raise APIError(400, "'cache_salt' and 'user' must be strings of 1 to 256 characters", "cache_salt")
    return ChatRequest(
        messages=messages,
        media=found,
        options=options,
        stop=stop,
        stream=stream,
        include_usage=include_usage,
        max_tokens_given=given,
        salt=salt,
    )


def _check_counts(raw: list) -> None:
    """Refuse, before any message is parsed, conversations of more messages or parts than any chat needs: a body
    of a million tiny parts would otherwise cost seconds of parsing before its 400."""
    if len(raw) > MAX_MESSAGES:
        raise APIError(400, f"at most {MAX_MESSAGES} messages per conversation, got {len(raw)}", "messages")
    parts = sum(len(m["content"]) for m in raw if isinstance(m, dict) and isinstance(m.get("content"), list))
    if parts > MAX_PARTS:
        raise APIError(400, f"at most {MAX_PARTS} content parts per conversation, got {parts}", "messages")


def parse_message(message: object, index: int, found: list) -> dict:
    if not isinstance(message, dict) or message.get("role") not in ("system", "developer", "user", "assistant"):
        raise APIError(400, f"messages[{index}] needs a role of system, user or assistant", f"messages[{index}]")
    role = "system" if message["role"] == "developer" else message["role"]
    content = message.get("content")
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



def parse_ask(body: object, default_max_tokens: int) -> ChatRequest:
    """{"state": id or null, "messages": [...], "max_new_tokens", "temperature", "top_p", "seed", "stream"}.
    With a state, `messages` are what follows it (user questions, and earlier answers of a chat); without,
    a whole text-only conversation."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
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
