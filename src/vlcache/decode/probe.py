"""Which decode step an engine uses: the exactness probe and the speed check behind --compile auto.

The probe is `vlcache check`'s first one: a question about the photograph shipped with the package, asked from
its cached state, against transformers' generate() on the whole uncached conversation (greedy, 16 tokens). A
compiled step is kept only where they are equal for the loaded model (fused kernels round differently, which can
change a token) and, on a CPU, where it is faster than the eager step; otherwise the eager step stays (on CUDA,
captured as CUDA graphs where that holds). One line says what was chosen and why.
"""

from __future__ import annotations

import time

from .step import StepRunner, time_steps

WARM_TEXT = "Describe this."  # what the warm-up rows prefill (text only: no state needed)


def choose(engine, mode: str, buckets: list[int], backend: str | None = None) -> dict:
    """Set engine.runner as `mode` asks; return {step, reason, buckets, ...} for logs and /health."""
    engine.runner = None
    if mode == "off":
        return {"step": "eager", "reason": "compile off", "buckets": []}
    cuda = engine.device.type == "cuda"
    backends = [backend] if backend else (["inductor", "cudagraphs"] if cuda and mode == "auto" else ["inductor"])
    from .. import uncached

    image = uncached.probe_image()
    state = engine.cache_image(image, system_prompt=uncached.SYSTEM)
    reasons = []
    for name in backends:
        # 1. Compile (or capture) the step for each bucket, timing the first (which pays for the compile).
        runner = StepRunner(engine.model, engine.device, name)
        engine.runner = runner
        started = time.perf_counter()
        engine.ask(state, uncached.QUESTIONS[0], max_new_tokens=2, temperature=0)
        compile_s = time.perf_counter() - started
        for rows in buckets:
            warm(engine, rows)
        if runner.failed:
            reasons.append(f"{name} failed to compile: {runner.failed}")
            continue
        label = _LABELS.get(name, f"traced ({name} backend)")
        if mode == "on":
            return _status(label, "--compile on", runner, compile_s)
        # 2. Exactness: the probe's greedy tokens against generate() on the uncached conversation.
        tokens, expected = uncached.one_question(engine, state, image)
        if tokens != expected:
            where = next((i for i, (a, b) in enumerate(zip(tokens, expected)) if a != b), min(len(tokens), len(expected)))
            reasons.append(f"{name} step differs from generate() at token {where} of the probe")
            continue
        # 3. Speed, on a CPU (on CUDA a graph only removes launch overhead): against the eager step, batch 1.
        if not cuda:
            fast, slow = _speed(engine, runner)
            if fast >= slow:
                reasons.append(f"{name} step not faster on this CPU ({fast * 1e3:.1f} ms vs eager {slow * 1e3:.1f} ms)")
                continue
            return _status(label, f"exact on the probe; {fast * 1e3:.1f} ms a step vs eager "
                           f"{slow * 1e3:.1f} ms", runner, compile_s)
        return _status(label, "exact on the probe", runner, compile_s)
    engine.runner = None
    return {"step": "eager", "reason": "; ".join(reasons) or "no compiled step", "buckets": []}


_LABELS = {"inductor": "compiled", "cudagraphs": "CUDA graphs of the eager step"}


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
    compiled, eager = [], []
    for _ in range(5):
        batch.runner = runner
        compiled.append(time_steps(batch, 3))
        batch.runner = None
        eager.append(time_steps(batch, 3))
    compiled.sort(), eager.sort()
    return compiled[2], eager[2]
