"""`vlcache check`: is vlcache exact for the model at hand? Cached answers against transformers' own generate.

Greedy decoding, 16 tokens each, on a photograph shipped with the package (and a clip panned over it, where
the family takes video):
- a cached image: the state's answer equals generate() on the whole uncached conversation;
- a batch of two questions over one state: each equals its uncached generate();
- a two-turn chat continuing from the state: the second turn equals generate() on both turns;
- a video (families that take one: Qwen-VL, GLM-4.xV, InternVL, SmolVLM2): the same as the first, over a clip.

For a model type outside vlcache's families the generic adapter (plain positions, full-attention K/V) is what
runs; when every probe held, the weights' fingerprint is remembered under $VLCACHE_HOME and the model then
loads like a listed one. A failed probe forgets it.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from . import model as model_loading, prompt
from .families import family_class
from .images import load_image

PROBE_TOKENS = 16
QUESTIONS = ("What is in this picture?", "What colors do you see?")
SYSTEM = "You are a helpful assistant."


@dataclass
class Probe:
    name: str
    held: bool
    detail: str  # the token ids, or where they part


def probe_image() -> Path:
    """The photograph the probe asks about (a Falcon 9 launch, 320x213, public domain)."""
    return Path(str(resources.files("vlcache") / "data" / "probe.jpg"))


def check_engine(engine, video: bool | None = None) -> list[Probe]:
    """Run every probe on `engine`; `video` None: the video probe where the family takes video. A probe that
    raises (the adapter cannot run this model) did not hold."""
    image = probe_image()
    try:
        state = engine.cache_image(image, system_prompt=SYSTEM)
    except Exception as exc:  # noqa: BLE001 - any failure is the answer to "is vlcache exact here"
        return [Probe("cached image", False, f"caching the photograph failed: {_line(exc)}")]
    probes = [_attempt("cached image", one_question, engine, state, image),
              _attempt("batch of two", _batch, engine, state, image),
              _attempt("two-turn chat", _chat, engine, state, image)]
    if video or (video is None and engine.family.takes_video):
        probes.append(_attempt("video", _video, engine, image))
    return probes


def one_question(engine, state, image: Path) -> tuple:
    """(cached, uncached) greedy token ids of the first question about `state`, the state of `image`."""
    cached = engine.ask(state, QUESTIONS[0], max_new_tokens=PROBE_TOKENS, temperature=0).token_ids
    return cached, uncached(engine, _messages([QUESTIONS[0]]), [image])


def _batch(engine, state, image: Path) -> tuple:
    batch = engine.ask_many(state, list(QUESTIONS), max_new_tokens=PROBE_TOKENS, temperature=0)
    return [a.token_ids for a in batch], [uncached(engine, _messages([q]), [image]) for q in QUESTIONS]


def _chat(engine, state, image: Path) -> tuple:
    """The second turn continues from the first's K/V."""
    from .conversation import Conversation

    chat = Conversation(engine, state)
    first = chat.ask(QUESTIONS[0], max_new_tokens=PROBE_TOKENS, temperature=0)
    second = chat.ask(QUESTIONS[1], max_new_tokens=PROBE_TOKENS, temperature=0).token_ids
    return second, uncached(engine, _messages(list(QUESTIONS), answers=[first.text]), [image])


def _video(engine, image: Path) -> tuple:
    """A clip panning over the photograph, 2 s at 4 frames a second."""
    from .testing.clips import make_clip

    with tempfile.TemporaryDirectory(prefix="vlcache-check-") as folder:
        clip = make_clip(Path(folder) / "pan.mp4", seconds=2.0, fps=4, size=(128, 96), source=image)
        state = engine.cache([clip], system_prompt=SYSTEM)
        cached = engine.ask(state, QUESTIONS[0], max_new_tokens=PROBE_TOKENS, temperature=0).token_ids
        return cached, uncached(engine, _messages([QUESTIONS[0]], media="video"), [clip])


def _attempt(name: str, probe, *args) -> Probe:
    try:
        got, want = probe(*args)
    except Exception as exc:  # noqa: BLE001 - a probe that cannot run did not hold
        return Probe(name, False, f"failed: {_line(exc)}")
    if got == want:
        return Probe(name, True, "equal token ids")
    return Probe(name, False, f"cached {got} vs uncached {want}")


def _line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def uncached(engine, messages: list[dict], sources: list, fps: float | None = None) -> list[int]:
    """transformers' generate() on the whole conversation, greedy: its images filled from `sources` in order,
    videos decoded and sampled by transformers' own loader with the model's own video processor."""
    from transformers.video_utils import load_video

    vp = getattr(engine.processor, "video_processor", None)
    images, videos, metadata = [], [], []
    for kind, source in zip(prompt.media_kinds(messages), sources):
        if kind == "image":
            images.append(engine.family.prepare_image(load_image(source).image, None))
        else:
            frames, meta = load_video(str(source), backend="pyav", sample_indices_fn=lambda metadata, **_: vp.sample_frames(
                metadata, fps=engine.family.video_fps(fps)))
            videos.append(frames)
            metadata.append(meta)
    text = prompt.render(engine.processor, messages, add_generation_prompt=True)
    kwargs = {}
    if images:
        kwargs["images"] = images
    if videos:
        kwargs.update(videos=videos, video_metadata=metadata, do_sample_frames=False)
    bos = getattr(engine.processor.tokenizer, "bos_token", None)
    inputs = engine.processor(text=[text], return_tensors="pt", add_special_tokens=not (bos and text.startswith(bos)),
                              **kwargs).to(engine.device)
    for name, value in inputs.items():
        if torch.is_tensor(value) and value.is_floating_point():
            inputs[name] = value.to(engine.dtype)
    with torch.inference_mode():
        out = engine.model.generate(**inputs, max_new_tokens=PROBE_TOKENS, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def run(name: str | None, device: str = "auto", dtype: str = "auto", out=None, generation_config: dict | None = None) -> int:
    """Load the model, run the probes, print one line each; 0 when all held (remembered), 1 naming what differed."""
    import sys

    from .engine import Engine

    out = out or sys.stdout
    engine = Engine.load(name, device=device, dtype=dtype, unchecked=True, generation_config=generation_config)
    listed = family_class(engine.model.config.model_type) is not None
    how = f"family {engine.family.name}" if listed else "the generic adapter (plain positions, full-attention K/V)"
    print(f"checking {engine.model_name} ({engine.model.config.model_type}, {how}, "
          f"{str(engine.dtype).removeprefix('torch.')}): cached against uncached greedy, {PROBE_TOKENS} tokens", file=out)
    probes = check_engine(engine)
    for probe in probes:
        print(f"  {'held' if probe.held else 'DIFFERED'}  {probe.name}: {probe.detail}", file=out)
    failed = [p.name for p in probes if not p.held]
    if not listed:
        record = {"model": engine.model_name, "model_type": engine.model.config.model_type, "probes": [p.name for p in probes]}
        model_loading.remember_check(engine.fingerprint, None if failed else record)
    if failed:
        print(f"error: vlcache is not exact for {engine.model_name}: {', '.join(failed)} differed", file=sys.stderr)
        return 1
    note = "" if listed else "; remembered: this model now loads through the generic adapter"
    print(f"exact: every probe held{note}", file=out)
    return 0


def _messages(questions: list[str], answers: list[str] = (), media: str = "image") -> list[dict]:
    """The system turn, then user turns asking `questions` (the first with the media), `answers` between them."""
    messages = [{"role": "system", "content": SYSTEM}]
    for i, question in enumerate(questions):
        content = ([{"type": media}] if i == 0 else []) + [{"type": "text", "text": question}]
        messages.append({"role": "user", "content": content})
        if i < len(answers):
            messages.append({"role": "assistant", "content": answers[i]})
    return messages
