"""The uncached reference: transformers' own generate on the whole conversation, greedy."""

import torch

from vlcache.images import load_image
from vlcache.prompt import conversation, template_messages


def reference_tokens(engine, image, system_prompt, question, max_new_tokens, max_pixels=None) -> list[int]:
    messages = conversation(system_prompt, question, with_image=image is not None)
    return reference_for_messages(engine, messages, image, max_new_tokens, max_pixels)


def reference_for_messages(engine, messages, image, max_new_tokens, max_pixels=None) -> list[int]:
    """generate() on `messages` (chat-template form; the image part, if any, is filled with `image`)."""
    inputs = _inputs(engine, messages, image, max_pixels)
    with torch.inference_mode():
        out = engine.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def reference_first_logits(engine, image, system_prompt, question, max_pixels=None) -> torch.Tensor:
    """The logits [V] of the first answer token: one uncached forward over the whole prompt."""
    inputs = _inputs(engine, conversation(system_prompt, question, with_image=image is not None), image, max_pixels)
    with torch.inference_mode():
        return engine.model(**inputs).logits[0, -1].float()


def _inputs(engine, messages, image, max_pixels):
    messages = template_messages(engine.processor, messages)
    kwargs = {}
    if image is not None:
        part = next(p for m in messages if isinstance(m["content"], list) for p in m["content"] if p.get("type") == "image")
        part["image"] = engine.family.prepare_image(load_image(image).image, max_pixels)
    if max_pixels is not None:
        kwargs["images_kwargs"] = engine.images_kwargs(max_pixels)
    return engine.processor.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, return_dict=True, return_tensors="pt", **kwargs
    ).to(engine.device).to(engine.dtype)  # floating inputs only (Llama 4's processor gives bfloat16 pixels)



def reference_for_parts(engine, messages, sources, max_new_tokens, fps=None, max_pixels=None) -> list[int]:
    """generate() on `messages` whose image and video parts are `sources` (paths), in order. Videos are decoded
    and sampled by transformers' own loader (PyAV backend) with the video processor's own sample_frames, not
    by vlcache's: a difference in decoding, sampling or timestamps shows as a different answer."""
    from transformers.video_utils import load_video

    from vlcache.prompt import media_kinds, render

    vp = getattr(engine.processor, "video_processor", None)
    images, videos, metadata = [], [], []
    for kind, source in zip(media_kinds(messages), sources):
        if kind == "image":
            images.append(engine.family.prepare_image(load_image(source).image, max_pixels))
            continue
        frames, meta = load_video(str(source), backend="pyav",
                                  sample_indices_fn=lambda metadata, **_: vp.sample_frames(metadata, fps=fps or vp.fps or 2))
        videos.append(frames)
        metadata.append(meta)
    text = render(engine.processor, messages, add_generation_prompt=True)
    kwargs = {"images_kwargs": engine.images_kwargs(max_pixels)}
    if images:
        kwargs["images"] = images
    if videos:
        kwargs.update(videos=videos, video_metadata=metadata, do_sample_frames=False, cap_pixels_per_frame=False)
    bos = engine.processor.tokenizer.bos_token
    inputs = engine.processor(text=[text], return_tensors="pt", add_special_tokens=not (bos and text.startswith(bos)),
                              **kwargs).to(engine.device).to(engine.dtype)
    with torch.inference_mode():
        out = engine.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()
