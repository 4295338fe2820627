"""The uncached reference: transformers' own generate on the whole conversation, greedy."""

import torch

from vlcache.images import load_image
from vlcache.prompt import conversation


def reference_tokens(engine, image, system_prompt, question, max_new_tokens, max_pixels=None) -> list[int]:
    messages = conversation(system_prompt, question, with_image=image is not None)
    kwargs = {}
    if image is not None:
        messages[-1]["content"][0]["image"] = load_image(image).image
    if max_pixels is not None:
        kwargs["images_kwargs"] = engine.images_kwargs(max_pixels)
    inputs = engine.processor.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, return_dict=True, return_tensors="pt", **kwargs
    )
    with torch.inference_mode():
        out = engine.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()
