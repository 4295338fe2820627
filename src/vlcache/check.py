"""`vlcache check`: is vlcache exact for the model at hand? Cached answers against transformers' own generate.

On a photograph shipped with the package (and a clip panned over it, where the family takes video):
- a cached image: one question asked from the state;
- a batch of two questions over one state;
- a two-turn chat continuing from the state;
- a video (families that take one: Qwen-VL, GLM-4.xV, InternVL, SmolVLM2): the first, over a clip.

Each probe compares, in this order: the prompt ids vlcache feeds the model (the state's ids, then each turn's,
tokenized as vlcache does) against the processor's ids of the whole conversation, which needs no weights
to be right; the greedy tokens (16); and the logits of the first step, within a tolerance stated per dtype. It
says which held. A probe that raises is a bug (its type is named), never a verdict on the model; a model
vlcache cannot run at all (cross-attention to the image, no chat template) is refused before any probe.

For a model type outside vlcache's families the generic adapter (plain positions, full-attention K/V) is what
runs; when every probe held, the pass is remembered under $VLCACHE_HOME for the weights, the generation
config, the chat template, the processor's settings and transformers' version (model.check_identity), and the
model then loads like a listed one. Anything else forgets it.
"""

from __future__ import annotations

import sys
import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import model as model_loading
from .errors import VlcacheError
from .families import family_class
from .uncached import PROBE_TOKENS, QUESTIONS, SYSTEM, Reference, messages, probe_image, reference

# The first step's logits, cached against uncached: the largest difference may be this fraction of the largest
# uncached logit (at least 1). float32 differs in the last bits only (summation order); 16-bit formats keep
# 8 (bfloat16) or 11 (float16) bits of mantissa, and the cached and uncached attention round at other places.
LOGITS_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6, torch.bfloat16: 5e-2, torch.float16: 2e-2}

HELD, DIFFERED, CANNOT, BUG = "held", "DIFFERED", "CANNOT RUN", "BUG"


@dataclass
class Row:
    """One answer of a probe: what vlcache fed and did, and what generate() did on the whole conversation."""

    fed: list[int]
    tokens: list[int]
    logits: torch.Tensor  # [V] float32, the first step's
    want: Reference


@dataclass
class Probe:
    name: str
    status: str  # HELD, DIFFERED, CANNOT (vlcache refused something), BUG (an exception it did not mean)
    detail: str
    failed: list[str] = field(default_factory=list)  # what differed: "prompt ids", "tokens", "logits"
    trace: str = ""  # the traceback of a BUG

    @property
    def held(self) -> bool:
        return self.status == HELD


def check_engine(engine, video: bool | None = None) -> list[Probe]:
    """Run every probe on `engine`; `video` None: the video probe where the family takes video."""
    image = probe_image()
    tolerance = LOGITS_TOLERANCE.get(engine.dtype, 5e-2)
    state = None

    def cached_image():
        nonlocal state
        state = engine.cache_image(image, system_prompt=SYSTEM)
        return _one(engine, state, image)

    probes = [_attempt("cached image", cached_image, tolerance)]
    if state is None:  # caching the photograph failed: nothing else can run
        return probes
    probes += [_attempt("batch of two", lambda: _batch(engine, state, image), tolerance),
               _attempt("two-turn chat", lambda: _chat(engine, state, image), tolerance)]
    if video or (video is None and engine.family.takes_video):
        probes.append(_attempt("video", lambda: _video(engine, image), tolerance))
    return probes


def _one(engine, state, image: Path) -> list[Row]:
    ids = engine.question_ids(state.metadata.messages, QUESTIONS[0], state.metadata.template_time)
    tokens = engine.ask(state, QUESTIONS[0], max_new_tokens=PROBE_TOKENS, temperature=0).token_ids
    want = reference(engine, messages([QUESTIONS[0]]), [image], at=state.metadata.template_time)
    return [_row(engine, state, ids, tokens, want)]


def _batch(engine, state, image: Path) -> list[Row]:
    ids = [engine.question_ids(state.metadata.messages, q, state.metadata.template_time) for q in QUESTIONS]
    answers = engine.ask_many(state, list(QUESTIONS), max_new_tokens=PROBE_TOKENS, temperature=0)
    logits = first_logits(engine, state, ids)  # the two rows padded together, as the batch ran them
    at = state.metadata.template_time
    return [Row(_fed(state, i), a.token_ids, row_logits, reference(engine, messages([q]), [image], at=at))
            for i, a, row_logits, q in zip(ids, answers, logits, QUESTIONS)]


def _chat(engine, state, image: Path) -> list[Row]:
    """The second turn continues from the first's K/V; its ids are the whole conversation's as vlcache feeds them."""
    from .conversation import Conversation

    chat = Conversation(engine, state)
    first = chat.ask(QUESTIONS[0], max_new_tokens=PROBE_TOKENS, temperature=0)
    fed = chat.prompt_ids(QUESTIONS[1])
    second = chat.ask(QUESTIONS[1], max_new_tokens=PROBE_TOKENS, temperature=0).token_ids
    want = reference(engine, messages(list(QUESTIONS), answers=[first.text]), [image], at=state.metadata.template_time)
    return [_row(engine, state, fed[:, state.num_tokens:], second, want)]


def _video(engine, image: Path) -> list[Row]:
    """A clip panning over the photograph, 2 s at 4 frames a second."""
    from .testing.clips import make_clip

    with tempfile.TemporaryDirectory(prefix="vlcache-check-") as folder:
        clip = make_clip(Path(folder) / "pan.mp4", seconds=2.0, fps=4, size=(128, 96), source=image)
        state = engine.cache([clip], system_prompt=SYSTEM)
        ids = engine.question_ids(state.metadata.messages, QUESTIONS[0], state.metadata.template_time)
        tokens = engine.ask(state, QUESTIONS[0], max_new_tokens=PROBE_TOKENS, temperature=0).token_ids
        want = reference(engine, messages([QUESTIONS[0]], media="video"), [clip], at=state.metadata.template_time)
        return [_row(engine, state, ids, tokens, want)]


def _row(engine, state, new_ids: torch.Tensor, tokens: list[int], want: Reference) -> Row:
    return Row(_fed(state, new_ids), tokens, first_logits(engine, state, [new_ids])[0], want)


def _fed(state, new_ids: torch.Tensor) -> list[int]:
    return state.input_ids[0].tolist() + new_ids[0].tolist()


def first_logits(engine, state, new_ids: list[torch.Tensor]) -> torch.Tensor:
    """[rows, V] float32: the logits after each row's new ids [1, m], prefilled from `state` in one batch (padded;
    rows by themselves where linear-attention layers cannot be padded into, as ask_many runs them)."""
    from .engine import GenerationOptions

    if engine.family.has_linear_layers and len(new_ids) > 1:
        return torch.cat([first_logits(engine, state, [ids]) for ids in new_ids])
    batch = engine.batch()
    params = engine.sampling(GenerationOptions(max_new_tokens=1, temperature=0))
    prefix = engine.state_prefix(engine.adopt(state))
    for ids in new_ids:
        batch.add(prefix, params, 1, torch.cat([state.input_ids[0], ids[0]]))
    return batch.prefill([ids[0] for ids in new_ids]).float()


def _attempt(name: str, probe, tolerance: float) -> Probe:
    try:
        rows = probe()
    except VlcacheError as exc:  # vlcache refused on purpose: it cannot run this (the message says why)
        return Probe(name, CANNOT, _line(exc, with_type=False))
    except Exception as exc:  # noqa: BLE001 - an exception vlcache did not mean is a bug, not a verdict
        return Probe(name, BUG, _line(exc), trace=traceback.format_exc())
    return judge(name, rows, tolerance)


def judge(name: str, rows: list[Row], tolerance: float) -> Probe:
    """Prompt ids first, then tokens, then the first step's logits; each row of a probe must hold all three."""
    failed, notes = [], []
    bad = next((r for r in rows if r.fed != r.want.prompt_ids), None)
    if bad is None:
        notes.append(f"prompt ids equal ({', '.join(str(len(r.fed)) for r in rows)} tokens)")
    else:
        i = _parting(bad.fed, bad.want.prompt_ids)
        failed.append("prompt ids")
        notes.append(f"prompt ids differ at {i} of {len(bad.want.prompt_ids)}: fed {bad.fed[i:i + 4]}, processor "
                     f"{bad.want.prompt_ids[i:i + 4]}")
    bad = next((r for r in rows if r.tokens != r.want.tokens), None)
    if bad is None:
        notes.append(f"tokens equal ({', '.join(str(len(r.tokens)) for r in rows)})")
    else:
        failed.append("tokens")
        notes.append(f"tokens differ at {_parting(bad.tokens, bad.want.tokens)}: cached {bad.tokens} vs uncached "
                     f"{bad.want.tokens}")
    errors = [_logits_error(r) for r in rows]
    worst = max(errors)
    allowed = tolerance * max(1.0, max(float(r.want.first_logits.abs().max()) for r in rows))
    if worst <= allowed:
        notes.append(f"first-step logits within {worst:.1e} (tolerance {allowed:.1e})")
    else:
        failed.append("logits")
        notes.append(f"first-step logits off by {worst:.3g} (tolerance {allowed:.1e})")
    return Probe(name, DIFFERED if failed else HELD, "; ".join(notes), failed)


def _parting(got: list[int], want: list[int]) -> int:
    """Where two different id lists part (the shorter one's length when one leads the other)."""
    return next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))


def _logits_error(row: Row) -> float:
    got, want = row.logits.to(row.want.first_logits.device), row.want.first_logits
    if got.shape != want.shape:
        return float("inf")
    return float((got - want).abs().max())


def _line(exc: BaseException, with_type: bool = True) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else ""
    if not with_type:
        return line or type(exc).__name__
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def run(name: str | None, device: str = "auto", dtype: str = "auto", out=None, debug: bool = False,
        generation_config: dict | None = None, quantize: str = "none") -> int:
    """Load the model, run the probes, print one line each; 0 when all held (remembered), 1 naming what differed,
    what vlcache cannot run, or the bug. With `debug`, a probe's traceback goes to stderr. `generation_config`:
    settings that replace the model's (Engine.load's); `quantize`: the quantized model is checked (its pass is its own)."""
    from .engine import Engine

    out = out or sys.stdout
    name = name or model_loading.default_model()
    why = _refusal(name)
    if why:
        raise VlcacheError(f"cannot run: {why}")
    engine = Engine.load(name, device=device, dtype=dtype, unchecked=True, generation_config=generation_config,
                         quantize=quantize)
    if not getattr(engine.processor, "chat_template", None):
        raise VlcacheError("cannot run: the processor has no chat template (vlcache renders every prompt with it); "
                           "give the model folder a chat_template.jinja")
    model_type = engine.model.config.model_type
    listed = family_class(model_type) is not None
    how = f"family {engine.family.name}" if listed else "the generic adapter (plain positions, full-attention K/V)"
    tolerance = LOGITS_TOLERANCE.get(engine.dtype, 5e-2)
    weights = "" if engine.quantization == "none" else f", {engine.quantization} weights"
    print(f"checking {engine.model_name} ({model_type}, {how}, {str(engine.dtype).removeprefix('torch.')}{weights}): cached "
          f"against uncached generate(): prompt ids, {PROBE_TOKENS} greedy tokens, first-step logits within "
          f"{tolerance:g} x the largest logit", file=out)
    if engine.pin_time():
        print("  the chat template stamps the time: each state's instant is pinned, its questions rendered at it", file=out)
    probes = check_engine(engine)
    for probe in probes:
        print(f"  {probe.status:<10}{probe.name}: {probe.detail}", file=out)
        if probe.trace and debug:
            print(probe.trace, file=sys.stderr, end="")
    if not listed:
        identity = model_loading.check_identity(engine.model, engine.processor, engine.fingerprint)
        record = {"model": engine.model_name, "model_type": model_type, "probes": [p.name for p in probes]}
        model_loading.remember_check(identity, record if all(p.held for p in probes) else None)
    return _verdict(engine, probes, out, debug)


def _verdict(engine, probes: list[Probe], out, debug: bool) -> int:
    bugs = [p for p in probes if p.status == BUG]
    if bugs:
        listed = family_class(engine.model.config.model_type) is not None
        who = f"vlcache's {engine.family.name} family" if listed else "vlcache's generic adapter"
        print(f"error: a bug in {who} on {engine.model_name}, not a verdict on the model: the {bugs[0].name} probe "
              f"raised {bugs[0].detail}" + ("" if debug else " (rerun with --debug for the traceback)"), file=sys.stderr)
        return 1
    differed = [p for p in probes if p.status == DIFFERED]
    if differed:
        what = ", ".join(f"{p.name} ({' and '.join(p.failed)})" for p in differed)
        print(f"error: vlcache is not exact for {engine.model_name}: {what} differed", file=sys.stderr)
        return 1
    refused = [p for p in probes if p.status == CANNOT]
    if refused:
        print(f"error: cannot run: {refused[0].detail} (the {refused[0].name} probe)", file=sys.stderr)
        return 1
    note = "" if family_class(engine.model.config.model_type) else "; remembered: this model now loads through the generic adapter"
    print(f"exact: every probe held{note}", file=out)
    return 0


def _refusal(name: str) -> str | None:
    """Why vlcache cannot run the model, from its config alone (before any weight is read); None: it may."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name)
    except Exception:  # noqa: BLE001 - loading the model says what is wrong with it
        return None
    return model_loading.refusal(config)

