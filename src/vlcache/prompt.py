"""Split a conversation into the cached prefix (system + image) and the per-question suffix.

The split comes from the model's own chat template: the conversation is rendered with a sentinel in place of
the question, and everything before the sentinel is the prefix. The prefix ends in <|vision_end|>, a special
token, so tokenizing the two halves apart gives the same ids as tokenizing the whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_SENTINEL = "\u2063vlcache-question\u2063"


def conversation(system_prompt: str | None, question: str, with_image: bool) -> list[dict]:
    """The messages transformers' chat template expects: [system], user(image?, text)."""
    messages: list[dict] = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    content: list[dict] = [{"type": "image"}] if with_image else []
    content.append({"type": "text", "text": question})
    messages.append({"role": "user", "content": content})
    return messages


@dataclass(frozen=True)
class PromptSplit:
    prefix_text: str  # system turn and user turn up to and including the image
    suffix_template: str  # what follows the question: end of user turn and the assistant header

    def suffix_text(self, question: str) -> str:
        return question + self.suffix_template


def split_image_prompt(processor, system_prompt: str | None) -> PromptSplit:
    full = processor.apply_chat_template(
        conversation(system_prompt, _SENTINEL, with_image=True), tokenize=False, add_generation_prompt=True
    )
    if full.count(_SENTINEL) != 1:
        raise ValueError("the chat template does not place the question exactly once; cannot split the prompt")
    prefix, suffix = full.split(_SENTINEL)
    return PromptSplit(prefix_text=prefix, suffix_template=suffix)


def encode_text(processor, text: str) -> torch.Tensor:
    """Token ids of template text (special tokens written out in it are honoured; none are added)."""
    ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor([ids], dtype=torch.long)


def text_only_ids(processor, system_prompt: str | None, question: str) -> torch.Tensor:
    text = processor.apply_chat_template(
        conversation(system_prompt, question, with_image=False), tokenize=False, add_generation_prompt=True
    )
    return encode_text(processor, text)
