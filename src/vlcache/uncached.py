"""The exactness probe's questions and the uncached reference they are held against: transformers' own
generate() on the whole conversation, greedy. `vlcache check` and the compile probe (decode/probe.py) both use
this module; it imports neither of them, nor the engine (it is handed one)."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from . import prompt
from .images import load_image

PROBE_TOKENS = 16
QUESTIONS = ("What is in this picture?", "What colors do you see?")
SYSTEM = "You are a helpful assistant."
# What a processor returns that is no input of the model's forward: training targets (PaliGemma's processor
# returns `labels` with every prompt; passed on, the model computes a loss against the wrong length).
NOT_INPUTS = ("labels",)


def probe_image() -> Path:
    """The photograph the probe asks about (a Falcon 9 launch, 320x213, public domain)."""
    return Path(str(resources.files("vlcache") / "data" / "probe.jpg"))


def messages(questions: list[str], answers: list[str] = (), media: str = "image") -> list[dict]:
    """The system turn, then user turns asking `questions` (the first with the media), `answers` between them."""
    out = [{"role": "system", "content": SYSTEM}]
    for i, question in enumerate(questions):
        content = ([{"type": media}] if i == 0 else []) + [{"type": "text", "text": question}]
        out.append({"role": "user", "content": content})
        if i < len(answers):
            out.append({"role": "assistant", "content": answers[i]})
    return out


@dataclass
class Reference:
    """What generate() saw and did on the whole uncached conversation."""

    prompt_ids: list[int]  # the processor's ids of the whole conversation
    tokens: list[int]  # its greedy answer
    first_logits: torch.Tensor  # [V] float32: the raw logits of its first step (before any logits processor)


def reference(engine, conversation: list[dict], sources: list, fps: float | None = None, at: str | None = None,
              max_new_tokens: int = PROBE_TOKENS) -> Reference:
    """transformers' generate() on `conversation`, greedy: its images filled from `sources` in order, videos
    decoded and sampled by transformers' own loader with the model's own video processor; a template that stamps
    the time rendered at the instant `at` (the state's pinned one)."""
    from transformers.video_utils import load_video

    vp = getattr(engine.processor, "video_processor", None)
    images, videos, metadata = [], [], []
    for kind, source in zip(prompt.media_kinds(conversation), sources):
        if kind == "image":
            images.append(engine.family.prepare_image(load_image(source).image, None))
        else:
            frames, meta = load_video(str(source), backend="pyav", sample_indices_fn=lambda metadata, **_: vp.sample_frames(
                metadata, fps=engine.family.video_fps(fps)))
            videos.append(frames)
            metadata.append(meta)
    text = prompt.render(engine.processor, conversation, add_generation_prompt=True, at=at)
    kwargs = {}
    if images:
        kwargs["images"] = images
    if videos:
        kwargs.update(videos=videos, video_metadata=metadata, do_sample_frames=False)
    bos = getattr(engine.processor.tokenizer, "bos_token", None)
    inputs = engine.processor(text=[text], return_tensors="pt", add_special_tokens=not (bos and text.startswith(bos)),
                              **kwargs).to(engine.device)
    for name in NOT_INPUTS:
        inputs.pop(name, None)
    for name, value in inputs.items():
        if torch.is_tensor(value) and value.is_floating_point():
            inputs[name] = value.to(engine.dtype)
    with torch.inference_mode():
        out = engine.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, output_logits=True,
                                    return_dict_in_generate=True)
    n = inputs["input_ids"].shape[1]
    return Reference(prompt_ids=inputs["input_ids"][0].tolist(), tokens=out.sequences[0, n:].tolist(),
                     first_logits=out.logits[0][0].float())


def one_question(engine, state, image: Path) -> tuple[list[int], list[int]]:
    """(cached, uncached) greedy token ids of the first question about `state`, the state of `image`."""
    cached = engine.ask(state, QUESTIONS[0], max_new_tokens=PROBE_TOKENS, temperature=0).token_ids
    return cached, reference(engine, messages([QUESTIONS[0]]), [image], at=state.metadata.template_time).tokens
