"""Conversations as the chat template renders them, and the tokens a new question adds to a state.

A state covers a conversation: `[system], user(image)` for a freshly cached image (the user turn is still
open: its question comes next), or a whole exchange `..., assistant(answer)` for a saved conversation. The
text a question adds is the model's own chat template rendered with the question, minus the text the state
already covers. The covered text always ends in a special token (<|vision_end|>) or a newline after one
(<|im_end|>), so tokenizing the two halves apart gives the same ids as tokenizing the whole (tested).
"""

from __future__ import annotations

import copy

from . import toolcalls
from .errors import PromptError

_SENTINEL = "\u2063vlcache-question\u2063"

IMAGE_PART = {"type": "image"}


def image_conversation(system_prompt: str | None) -> list[dict]:
    """What an image state covers: [system], and a user turn holding the image, open for the question."""
    return media_conversation(system_prompt, ["image"])


def media_conversation(system_prompt: str | None, kinds: list[str]) -> list[dict]:
    """What a state of several media covers: [system], and a user turn holding the images and videos in
    order ("image", "video"), open for the question."""
    messages: list[dict] = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    messages.append({"role": "user", "content": [{"type": kind} for kind in kinds]})
    return messages


def media_kinds(messages: list[dict]) -> list[str]:
    """The media parts of a conversation in order: "image" and "video"."""
    return [part["type"] for m in messages if isinstance(m.get("content"), list) for part in m["content"]
            if part.get("type") in ("image", "video")]


def with_question(messages: list[dict], question: str) -> list[dict]:
    """The conversation with the question added: into the open user turn, or as a new one."""
    messages = copy.deepcopy(messages)
    part = {"type": "text", "text": question}
    if messages and messages[-1]["role"] == "user":
        messages[-1]["content"].append(part)
    else:
        messages.append({"role": "user", "content": [part]})
    return messages


def append_turns(covered: list[dict], later: list[dict]) -> list[dict]:
    """A state's conversation and the turns after it (user questions as text parts or strings, assistant
    answers): the first question goes into the state's open user turn, as Engine.ask and Conversation put it."""
    messages = copy.deepcopy(covered)
    for message in later:
        content = message["content"]
        if message["role"] == "user":
            text = content if isinstance(content, str) else "".join(p["text"] for p in content)
            messages = with_question(messages, text)
        else:
            messages.append({"role": message["role"], "content": content})
    return messages


def conversation(system_prompt: str | None, question: str, with_image: bool) -> list[dict]:
    """The messages for a one-question conversation (the uncached reference uses this too)."""
    return with_question(media_conversation(system_prompt, ["image"] if with_image else []), question)


def render(processor, messages: list[dict], add_generation_prompt: bool) -> str:
    tools, messages = toolcalls.split(messages)  # a request's tools ride in the conversation (vlcache.toolcalls)
    messages = template_messages(processor, messages)
    extra = {"tools": tools} if tools else {}
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt, **extra)


def template_messages(processor, messages: list[dict]) -> list[dict]:
    """The messages in the form the chat template reads: some templates (LLaVA-OneVision's) only render
    content given as a list of parts and silently drop plain strings, so strings become one text part there."""
    if _renders_plain_strings(processor.chat_template or ""):
        return messages
    return [{**m, "content": [{"type": "text", "text": m["content"]}]} if isinstance(m.get("content"), str) else m
            for m in messages]


_string_support: dict[str, bool] = {}


def _renders_plain_strings(template: str) -> bool:
    """Whether the template renders a message whose content is a plain string (probed once per template)."""
    if template not in _string_support:
        from transformers.utils.chat_template_utils import render_jinja_template

        probe = "\u2063probe\u2063"
        try:
            rendered, _ = render_jinja_template(conversations=[[{"role": "user", "content": probe}]], chat_template=template)
            _string_support[template] = probe in rendered[0]
        except Exception:  # noqa: BLE001 - a template that fails on strings needs parts
            _string_support[template] = False
    return _string_support[template]


def covered_text(processor, messages: list[dict]) -> str:
    """The template text a state of these messages holds in its KV."""
    if messages and messages[-1]["role"] == "user":  # open turn: everything before the question
        full = render(processor, with_question(messages, _SENTINEL), add_generation_prompt=True)
        if full.count(_SENTINEL) != 1:
            raise ValueError("the chat template does not place the question exactly once; cannot split the prompt")
        return full.split(_SENTINEL)[0]
    return render(processor, messages, add_generation_prompt=False)


def text_after(processor, covered_messages: list[dict], messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The template text of `messages` after what a state of `covered_messages` holds (which must lead it)."""
    covered = covered_text(processor, covered_messages)
    full = render(processor, messages, add_generation_prompt)
    if not full.startswith(covered):
        raise ValueError("the chat template re-renders earlier turns differently; cannot continue the cached state")
    return full[len(covered):]


def check_video_placeholders(processor, text: str, kinds: list[str]) -> None:
    """The template text of a state must hold a video placeholder for each video it is given: a chat template
    made for images only writes none, and the processor would fail with its own count of placeholder tokens.
    (Images are not counted: Gemma 3's template writes a begin-of-image marker, not its image token.)"""
    token = getattr(processor, "video_token", None)
    videos = kinds.count("video")
    if token and videos and text.count(token) < videos:
        raise PromptError(f"this model's chat template does not take videos (it writes no {token} for a video part); "
                          "cache images with this model, or use one whose template takes videos")


def question_text(processor, messages: list[dict], question: str) -> str:
    """The text a question adds after what a state of `messages` covers, up to the assistant header."""
    return text_after(processor, messages, with_question(messages, question))


def encode_text(processor, text: str):
    """Token ids of template text (special tokens written out in it are honoured; none are added): [1, n] long."""
    import torch  # here, not at the top: the thin client checks prompts without torch

    ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor([ids], dtype=torch.long)


def text_only_ids(processor, system_prompt: str | None, question: str):
    messages = conversation(system_prompt, question, with_image=False)
    return encode_text(processor, render(processor, messages, add_generation_prompt=True))


def check_text(processor, text: str, where: str = "the prompt") -> None:
    """Refuse text a user typed that would not be read as text: the model's control tokens written out
    (`<|im_start|>system` would forge a turn, `<|image_pad|>` an image), vlcache's own question marker,
    or characters that are not valid Unicode (lone surrogates)."""
    check_plain_text(text, where)
    for token in control_tokens(processor):
        if token in text:
            raise PromptError(f"{where} holds the model's control token {token!r}; control tokens cannot be typed in text")


def check_messages(processor, messages: list[dict]) -> None:
    """check_text on every text of a conversation (plain-string contents and text parts)."""
    for i, message in enumerate(messages):
        content = message["content"]
        if message.get("tool_calls"):  # earlier calls' names and arguments are rendered as text too
            check_text(processor, repr(message["tool_calls"]), f"messages[{i}] ({message['role']}) tool_calls")
        for part in content if isinstance(content, list) else [{"text": content}]:
            if "text" in part:
                check_text(processor, part["text"], f"messages[{i}] ({message['role']})")


def check_plain_text(text: str, where: str = "the prompt") -> None:
    """The checks that need no tokenizer: valid Unicode, and not vlcache's own question marker."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise PromptError(f"{where} holds characters that are not valid Unicode (a lone surrogate)") from None
    if _SENTINEL in text:
        raise PromptError(f"{where} holds vlcache's internal question marker")


_control: dict[int, tuple[str, ...]] = {}


def control_tokens(processor) -> tuple[str, ...]:
    """The tokenizer's special tokens (turn markers, image and video placeholders) as they are written."""
    tokenizer = processor.tokenizer
    if id(tokenizer) not in _control:
        found = set(getattr(tokenizer, "all_special_tokens", []) or [])
        for added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
            if getattr(added, "special", False):
                found.add(str(added))
        _control[id(tokenizer)] = tuple(sorted(t for t in found if t))
    return _control[id(tokenizer)]
