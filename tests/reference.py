"""The uncached reference: transformers' own generate on the whole conversation, greedy."""

import torch

from vlcache.images import load_image
from vlcache.prompt import conversation, template_messages


def reference_tokens(engine, image, system_prompt, question, max_new_tokens, max_pixels=None) -> list[int]:
    messages = conversation(system_prompt, question, with_image=image is not None)
    return reference_for_messages(engine, messages, image, max_new_tokens, max_pixels)


def reference_for_messages(engine, messages, image, max_new_tokens, max_pixels=None) -> list[int]:
    """generate() on `messages` (chat-template form; the image part, if any, is filled with `image`)."""
    messages = template_messages(engine.processor, messages)
    kwargs = {}
    if image is not None:
        part = next(p for m in messages if isinstance(m["content"], list) for p in m["content"] if p.get("type") == "image")
        part["image"] = engine.family.prepare_image(load_image(image).image, max_pixels)
    if max_pixels is not None:
        kwargs["images_kwargs"] = engine.images_kwargs(max_pixels)
    inputs = engine.processor.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, return_dict=True, return_tensors="pt", **kwargs
    ).to(engine.device)
    with torch.inference_mode():
        out = engine.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()

