"""Which decode step an engine uses: the exactness probe and the speed check behind --compile auto.

The probe is `vlcache check`'s first one: a question about the photograph shipped with the package, asked from
its cached state, against transformers' generate() on the whole uncached conversation (greedy, 16 tokens). A
compiled step is kept only where they are equal for the loaded model (fused kernels round differently, which can
change a token) and, on a CPU, where it is faster than the eager step; otherwise the eager step stays (on CUDA,
captured as CUDA graphs where that holds). One line says what was chosen and why.
"""

from __future__ import annotations

import logging
import time

from . import decision
from .step import StepRunner, default_span, time_steps

log = logging.getLogger("vlcache")  # the CLI shows these progress lines on stderr; a library user opts in

WARM_TEXT = "Describe this."  # what the warm-up rows prefill (text only: no state needed)


def choose(engine, mode: str, buckets: list[int], backend: str | None = None, span: int | None = None) -> dict:
    """Set engine.runner as `mode` asks; return {step, reason, buckets, ...} for logs and /health. `span`: the
    positions every compiled step attends over (the server's --max-context in whole blocks; default the model's)."""
    engine.runner = None
    if mode == "off":
        return {"step": "eager", "reason": "compile off", "buckets": []}
    cuda = engine.device.type == "cuda"
    backends = [backend] if backend else (["inductor", "cudagraphs"] if cuda and mode == "auto" else ["inductor"])
    span = span or default_span(engine.model)
    fields = decision.key(engine, span, backends) if mode == "auto" else None
    remembered = decision.read(fields) if fields else None
    if remembered is not None:
        return _remembered(engine, remembered, buckets, span)
    from .. import uncached

    image = uncached.probe_image()
    state = engine.cache_image(image, system_prompt=uncached.SYSTEM)
    reasons, measured, decided = [], {}, False
    for name in backends:
        # 1. Compile (or capture) the step for each bucket, timing the first (which pays for the compile).
        runner = StepRunner(engine.model, engine.device, name, span)
        engine.runner = runner
        doing = _DOING.get(name, f"tracing the step ({name} backend)")
        later = [rows for rows in buckets if rows != 1]  # the probe's own question compiles batch size 1
        total = len(later) + 1
        log.info(f"decode steps: {doing} for batch size 1 (1 of {total})...")
        started = time.perf_counter()
        engine.ask(state, uncached.QUESTIONS[0], max_new_tokens=2, temperature=0)
        compile_s = time.perf_counter() - started
        if 1 in buckets:
            warm(engine, 1)
        _compile_later(engine, doing, later, total, started)
        if runner.failed:
            reasons.append(f"{name} failed to compile: {runner.failed}")
            continue
        label = _LABELS.get(name, f"traced ({name} backend)")
        if mode == "on":
            return _status(label, "--compile on", runner, compile_s)
        # 2. Exactness: the probe's greedy tokens against generate() on the uncached conversation.
        log.info("decode steps: checking the step's tokens against generate() on the probe...")
        tokens, expected = uncached.one_question(engine, state, image)
        if tokens != expected:
            where = next((i for i, (a, b) in enumerate(zip(tokens, expected)) if a != b), min(len(tokens), len(expected)))
            reasons.append(f"{name} step differs from generate() at token {where} of the probe")
            decided = True
            continue
        # 3. Speed, on a CPU (on CUDA a graph only removes launch overhead): against the eager step, batch 1,
        # alternating, and kept only with a margin (a busy machine's noise must not decide).
        if not cuda:
            log.info("decode steps: timing the step against the eager one...")
            fast, slow = _speed(engine, runner)
            measured[name] = {"compiled_ms": round(fast * 1e3, 3), "eager_ms": round(slow * 1e3, 3)}
            if fast > slow * (1 - MARGIN):
                reasons.append(f"{name} step not faster on this CPU by {MARGIN:.0%} ({fast * 1e3:.1f} ms vs eager "
                               f"{slow * 1e3:.1f} ms)")
                decided = True
                continue
            return _decided(fields, _status(label, f"exact on the probe; {fast * 1e3:.1f} ms a step vs eager "
                                            f"{slow * 1e3:.1f} ms", runner, compile_s), name, measured)
        return _decided(fields, _status(label, "exact on the probe", runner, compile_s), name, measured)
    engine.runner = None
    status = {"step": "eager", "reason": "; ".join(reasons) or "no compiled step", "buckets": []}
    # Remembered only where a probe or a timing said eager; a compile that failed may work at the next start.
    return _decided(fields, status, None, measured) if decided else status


MARGIN = 0.10  # a compiled step is kept only if at least this much faster than the eager one
MEASUREMENTS = [0]  # how many times this process timed steps to decide (tests: a remembered decision measures nothing)


def _compile_later(engine, doing: str, later: list[int], total: int, started: float) -> None:
    for k, rows in enumerate(later, start=1):
        left = (total - k) * (time.perf_counter() - started) / k  # each batch size costs about what the done ones did
        log.info(f"decode steps: {doing} for batch size {rows} ({k + 1} of {total}; about {_duration(left)} left)...")
        warm(engine, rows)


def _decided(fields: dict | None, status: dict, backend: str | None, measured: dict) -> dict:
    """Remember auto's decision (fields None: not auto, nothing to remember)."""
    if fields is not None:
        where = decision.write(fields, status["step"], backend, status["reason"], measured)
        status["remembered"] = False
        if where is not None:
            status["decision_file"] = str(where)
    return status


def _remembered(engine, remembered: dict, buckets: list[int], span: int) -> dict:
    """Apply a remembered decision: eager at once, or the remembered backend's steps compiled for every bucket
    (from the compile cache beside the decision) with no probe and no timing."""
    when, reason = remembered.get("decided_at", "?"), remembered["reason"]
    name = remembered.get("backend")
    if remembered["step"] == "eager" or not name:
        log.info(f"decode steps: eager, as decided on {when} ({reason}); delete {decision.path_for(remembered['key'])} "
                 "to decide again")
        return {"step": "eager", "reason": f"remembered: {reason}", "buckets": [], "remembered": True}
    buckets = buckets or [1]
    runner = StepRunner(engine.model, engine.device, name, span)
    engine.runner = runner
    log.info(f"decode steps: {remembered['step']}, as decided on {when} ({reason})")
    doing = _DOING.get(name, f"tracing the step ({name} backend)")
    started = time.perf_counter()
    total = len(buckets)
    log.info(f"decode steps: {doing} for batch size {buckets[0]} (1 of {total})...")
    warm(engine, buckets[0])
    _compile_later(engine, doing, buckets[1:], total, started)
    if runner.failed:
        engine.runner = None
        return {"step": "eager", "reason": f"{name} failed to compile: {runner.failed}", "buckets": []}
    status = _status(remembered["step"], f"remembered: {reason}", runner, time.perf_counter() - started)
    status["remembered"] = True
    return status


_LABELS = {"inductor": "compiled", "cudagraphs": "CUDA graphs of the eager step"}
_DOING = {"inductor": "compiling the step", "cudagraphs": "capturing CUDA graphs of the eager step"}


def _duration(seconds: float) -> str:
    return f"{seconds:.0f}s" if seconds < 90 else f"{seconds / 60:.0f} min"


def warm(engine, rows: int, steps: int = 2) -> None:
    """Run a few steps of `rows` text-only rows, so that their bucket is compiled before a request needs it."""
    from . import Prefix, SamplingParams, generate

    ids = engine.processor.tokenizer(WARM_TEXT, return_tensors="pt")["input_ids"][0].to(engine.device)
    batch = engine.batch()
    for _ in range(rows):
        batch.add(Prefix(kv=engine.empty_kv(), tokens=0), SamplingParams(temperature=0.0), steps, ids)
    for _ in generate(batch, [ids] * rows):
        pass


def _status(step: str, reason: str, runner: StepRunner, compile_s: float) -> dict:
    return {"step": step, "reason": reason, "buckets": sorted({b for b, _ in runner.shapes}),
            "shapes": sorted(runner.shapes), "compile_s": round(compile_s, 2)}


def _speed(engine, runner: StepRunner) -> tuple[float, float]:
    """Median seconds of a batch-1 decode step, compiled and eager, alternating (same rows, same lengths)."""
    from . import Prefix, SamplingParams

    ids = engine.processor.tokenizer(WARM_TEXT, return_tensors="pt")["input_ids"][0].to(engine.device)
    batch = engine.batch()
    batch.add(Prefix(kv=engine.empty_kv(), tokens=0), SamplingParams(temperature=0.0), 10**6, ids)
    batch.sample(batch.prefill([ids]))
    MEASUREMENTS[0] += 1
    compiled, eager = [], []
    for i in range(ROUNDS):  # alternating, first one then the other: a load that comes and goes hits both
        for name in (("compiled", "eager") if i % 2 == 0 else ("eager", "compiled")):
            batch.runner = runner if name == "compiled" else None
            (compiled if name == "compiled" else eager).append(time_steps(batch, 3))
    batch.runner = None
    batch.cache.close()
    compiled.sort(), eager.sort()
    return compiled[ROUNDS // 2], eager[ROUNDS // 2]


ROUNDS = 7
