"""Conversations as the chat template renders them, and the tokens a new question adds to a state.

A state covers a conversation: `[system], user(image)` for a freshly cached image (the user turn is still
open: its question comes next), or a whole exchange `..., assistant(answer)` for a saved conversation. The
text a question adds is the model's own chat template rendered with the question, minus the text the state
already covers. The covered text always ends in a special token (<|vision_end|>) or a newline after one
(<|im_end|>), so tokenizing the two halves apart gives the same ids as tokenizing the whole (tested).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime

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


def render(processor, messages: list[dict], add_generation_prompt: bool, at: str | None = None) -> str:
    """The chat template's text of `messages`; `at` (an ISO instant) pins the clock of a template that stamps
    the date or time (None: now, as transformers renders it)."""
    tools, messages = toolcalls.split(messages)  # a request's tools ride in the conversation (vlcache.toolcalls)
    messages = template_messages(processor, messages)
    extra = {"tools": tools} if tools else {}
    with pinned_clock(processor.chat_template, at):
        return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             **extra)


# -- templates that stamp the date or time ---------------------------------------------------------------------
# transformers gives a chat template one clock, `strftime_now(format)` (Llama 3.x writes "Today Date: ..." with
# it). A state's text is rendered once, its questions later: they must see the same instant, or the cached
# answer is generate()'s on another prompt. The instant a state is made is pinned (its metadata's
# template_time) and every later question about it is rendered at that instant.

_clock_users: dict[str, bool] = {}
_pinned: ContextVar[datetime | None] = ContextVar("vlcache_template_instant", default=None)


def stamps_time(template) -> bool:
    """Whether the template reads transformers' clock (`strftime_now`), in its parsed source. A branch that one
    conversation does not reach may be reached by another, so any use counts (pinning costs nothing where the
    text does not move); tests render such a template at two instants to see it move."""
    if not isinstance(template, str) or not template:
        return False
    if template not in _clock_users:
        try:
            from jinja2 import nodes
            from transformers.utils.chat_template_utils import _compile_jinja_template

            parsed = _compile_jinja_template(template).environment.parse(template)
            names = {node.name for node in parsed.find_all(nodes.Name)}
        except Exception:  # noqa: BLE001 - a template transformers cannot parse either: its text decides
            names = {"strftime_now"} if "strftime_now" in template else set()
        _clock_users[template] = "strftime_now" in names
    return _clock_users[template]


def now() -> str:
    """The instant a state's template text is rendered at: local time with its offset, to the second (transformers'
    strftime_now reads the local clock)."""
    return datetime.now().astimezone().isoformat(timespec="seconds")


@contextmanager
def pinned_clock(template, at: str | None):
    """Within it, in this thread or task only, the template's `strftime_now` reads the instant `at` (local wall
    clock, as transformers' own). transformers hands templates plain data only (a function passed as a
    template variable arrives as a placeholder string), so the clock in the compiled template's environment is
    wrapped: it reads a context variable that only a pinned render sets, and otherwise calls the original."""
    if at is None or not stamps_time(template):
        yield
        return
    _make_pinnable(template)
    token = _pinned.set(datetime.fromisoformat(at).replace(tzinfo=None))
    try:
        yield
    finally:
        _pinned.reset(token)


def _make_pinnable(template: str) -> None:
    from transformers.utils.chat_template_utils import _compile_jinja_template

    env = _compile_jinja_template(template).environment  # the one render_jinja_template uses (cached per template)
    original = env.globals.get("strftime_now")
    if getattr(original, "vlcache_pinnable", False):
        return

    def strftime_now(format: str) -> str:
        instant = _pinned.get()
        return instant.strftime(format) if instant is not None else original(format)

    strftime_now.vlcache_pinnable = True
    env.globals["strftime_now"] = strftime_now


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


def covered_text(processor, messages: list[dict], at: str | None = None) -> str:
    """The template text a state of these messages holds in its KV (rendered at the instant `at`)."""
    if messages and messages[-1]["role"] == "user":  # open turn: everything before the question
        full = render(processor, with_question(messages, _SENTINEL), add_generation_prompt=True, at=at)
        if full.count(_SENTINEL) != 1:
            raise ValueError("the chat template does not place the question exactly once; cannot split the prompt")
        return full.split(_SENTINEL)[0]
    return render(processor, messages, add_generation_prompt=False, at=at)


def text_after(processor, covered_messages: list[dict], messages: list[dict], add_generation_prompt: bool = True,
               at: str | None = None) -> str:
    """The template text of `messages` after what a state of `covered_messages` holds (which must lead it)."""
    return split_after(processor, covered_messages, messages, add_generation_prompt, at)[1]


def split_after(processor, covered_messages: list[dict], messages: list[dict], add_generation_prompt: bool = True,
                at: str | None = None) -> tuple[str, str]:
    """(the text a state of `covered_messages` holds, the text of `messages` after it), both rendered at `at`."""
    covered = covered_text(processor, covered_messages, at)
    full = render(processor, messages, add_generation_prompt, at)
    if not full.startswith(covered):
        raise ValueError("the chat template re-renders earlier turns differently; cannot continue the cached state")
    return covered, full[len(covered):]


def check_video_placeholders(processor, text: str, kinds: list[str]) -> None:
    """The template text of a state must hold a video placeholder for each video it is given: a chat template
    made for images only writes none, and the processor would fail with its own count of placeholder tokens.
    (Images are not counted: Gemma 3's template writes a begin-of-image marker, not its image token.)"""
    token = getattr(processor, "video_token", None)
    videos = kinds.count("video")
    if token and videos and text.count(token) < videos:
        raise PromptError(f"this model's chat template does not take videos (it writes no {token} for a video part); "
                          "cache images with this model, or use one whose template takes videos")


def question_text(processor, messages: list[dict], question: str, at: str | None = None) -> str:
    """The text a question adds after what a state of `messages` covers, up to the assistant header."""
    return text_after(processor, messages, with_question(messages, question), at=at)


def encode_text(processor, text: str):
    """Token ids of template text (special tokens written out in it are honoured; none are added): [1, n] long."""
    import torch  # here, not at the top: the thin client checks prompts without torch

    ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor([ids], dtype=torch.long)


def encode_in_context(processor, before: str, text: str):
    """Token ids of `text` as the processor tokenizes it after `before` (the text a state covers): [1, n] long.

    Tokenized alone, text can get other ids than within the whole conversation: a tokenizer that marks the
    start of a string (Llama/Mistral's Metaspace "first": `▁What` alone, `What` after <image>; byte-level
    BPEs with a prefix space) would feed the model another prompt than generate() gets. So the whole is
    tokenized and the covered text's ids cut off. Where they do not lead the whole's (a merge across the
    boundary), the text alone is what is left; `vlcache check` compares the ids and says so."""
    import torch

    tokenizer = processor.tokenizer
    head = tokenizer(before, add_special_tokens=False)["input_ids"]
    whole = tokenizer(before + text, add_special_tokens=False)["input_ids"]
    if whole[: len(head)] != head:
        return encode_text(processor, text)
    return torch.tensor([whole[len(head):]], dtype=torch.long)


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
    """check_text on every text of a conversation (plain-string contents and text parts), text parts that follow
    one another joined as a template writes them: "<|im_" and "start|>" in two parts make the token together."""
    for i, message in enumerate(messages):
        content = message["content"]
        if message.get("tool_calls"):  # earlier calls' names and arguments are rendered as text too
            check_text(processor, repr(message["tool_calls"]), f"messages[{i}] ({message['role']}) tool_calls")
        run: list[str] = []
        for part in [*(content if isinstance(content, list) else [{"text": content}]), {}]:  # {}: ends the last run
            if "text" in part:
                run.append(part["text"])
                continue
            if run:
                check_text(processor, "".join(run), f"messages[{i}] ({message['role']})")
            run = []


def control_ids(processor) -> frozenset[int]:
    """The ids of the tokenizer's control tokens."""
    ids = processor.tokenizer.convert_tokens_to_ids(list(control_tokens(processor)))
    return frozenset(i for i in ids if isinstance(i, int))


def without_texts(messages: list[dict]) -> list[dict]:
    """The conversation with every text a user wrote replaced by a plain letter: what the template alone writes.
    Its control tokens are all the rendered conversation may have; one more came from the texts."""
    def part(p):
        return {**p, "text": "x"} if "text" in p else p

    # A request's tools entry (toolcalls.TOOLS_ROLE) is kept: the template renders it, and its text was checked.
    return [m if m.get("role") == toolcalls.TOOLS_ROLE else
            {**m, "content": [part(p) for p in m["content"]] if isinstance(m["content"], list) else "x"} for m in messages]


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
