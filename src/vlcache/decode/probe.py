"""Which decode step an engine uses: the exactness probe and the speed check behind --compile auto.

The probe is `vlcache check`'s first one: a question about the photograph shipped with the package, asked from
its cached state, against transformers' generate() on the whole uncached conversation (greedy, 16 tokens). A
compiled step is kept only where they are equal for the loaded model (fused kernels round differently, which can
change a token) and, on a CPU, where it is faster than the eager step by a margin, timed alternating with it;
otherwise the eager step stays (on CUDA, captured as CUDA graphs where that holds). One line says what was
chosen and why. auto's decision is remembered (decode.decision): a later start compiles the chosen step from the
compile cache and measures nothing. A server's first start may decide in the background (`decide_aside`) while
it serves eager steps, and switch when the compiled ones are ready. Its timing rounds run only while the server
has no work (`Quiet`): a round that overlapped serving work is discarded and tried again later, and when too many
were, the server stays eager and nothing is remembered (a timing under load must not decide later starts).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from . import decision
from .step import StepRunner, default_span, time_steps

log = logging.getLogger("vlcache")  # the CLI shows these progress lines on stderr; a library user opts in

WARM_TEXT = "Describe this."  # what the warm-up rows prefill (text only: no state needed)
MARGIN = 0.10  # a compiled step is kept only if at least this much faster than the eager one (CPU)
ROUNDS = 7  # alternating timing rounds, compiled and eager (their medians are compared)
MEASUREMENTS = [0]  # how many times this process timed steps to decide (tests: a remembered decision measures nothing)
# Background timing (a server's first `auto` start): rounds that overlapped serving work are discarded; after this
# many discarded, or this long spent waiting for a quiet server, the decision is given up (eager, not remembered).
MAX_DISCARDED = 3 * ROUNDS
QUIET_WAIT_S = 600.0
DISCARDED = [0]  # rounds this process discarded because the server worked during them (tests read it)


@dataclass(frozen=True)
class Quiet:
    """How a background timing knows it ran undisturbed: `idle()` the server has no running row and no queued
    request or task; `activity()` a count of the model thread's units of work and of arrived requests."""

    idle: Callable[[], bool]
    activity: Callable[[], int]


class Disturbed(Exception):
    """Not enough timing rounds ran while the server was idle: nothing to decide from."""

_LABELS = {"inductor": "compiled", "cudagraphs": "CUDA graphs of the eager step"}
_DOING = {"inductor": "compiling the step", "cudagraphs": "capturing CUDA graphs of the eager step"}


def _direct(fn: Callable):
    return fn()


def choose(engine, mode: str, buckets: list[int], backend: str | None = None, span: int | None = None) -> dict:
    """Set engine.runner as `mode` asks; return {step, reason, buckets, ...} for logs and /health. `span`: the
    positions every compiled step attends over (the server's --max-context in whole blocks; default the model's)."""
    engine.runner = None
    if mode == "off":
        return {"step": "eager", "reason": "compile off", "buckets": []}
    backends, span, fields = _plan(engine, mode, backend, span)
    remembered = decision.read(fields) if fields else None
    if remembered is not None:
        return _remembered(engine, remembered, buckets, span)
    status, runner = _decide(engine, mode, backends, buckets, span, fields, _direct)
    engine.runner = runner
    return status


def remembered(engine, backend: str | None = None, span: int | None = None) -> dict | None:
    """auto's remembered decision for this engine, or None (then a server may decide in the background)."""
    _, _, fields = _plan(engine, "auto", backend, span)
    return decision.read(fields)


def decide_aside(engine, buckets: list[int], on_model_thread: Callable, switch: Callable, backend: str | None = None,
                 span: int | None = None, quiet: Quiet | None = None) -> threading.Thread:
    """auto's decision in a thread of its own, while the caller serves eager steps. The steps compile here (own
    batches, own K/V pool: nothing the serving rows use); the probe's prefill and generate() run through
    `on_model_thread(fn)` (the model's owner: they set state on the model that its forwards read); timing runs
    here, in rounds taken only while `quiet` says the server has no work. When a compiled step is chosen,
    `switch(runner, status)` runs on the model thread: it starts using it."""
    backends, span, fields = _plan(engine, "auto", backend, span)
    engine.compile_status = {"step": "eager", "reason": "deciding in the background; eager steps until then", "buckets": []}

    def work():
        try:
            status, runner = _decide(engine, "auto", backends, buckets, span, fields, on_model_thread, quiet)
        except Exception as exc:  # noqa: BLE001 - the server goes on with eager steps, with one note
            log.warning(f"note: deciding the decode step in the background failed ({type(exc).__name__}: {exc}); "
                        "eager steps stay")
            engine.compile_status = {"step": "eager", "reason": f"background decision failed: {type(exc).__name__}",
                                     "buckets": []}
            return
        if runner is None:
            engine.compile_status = status
            if status.get("decided") is False:  # not timed undisturbed: nothing remembered
                log.warning(f"note: decode steps stay eager: {status['reason']}")  # the one stderr line
            else:
                log.info(f"decode steps: {status['step']} ({status['reason']})")
            return

        def apply():
            switch(runner, status)
            engine.runner, engine.compile_status = runner, status
            log.info(f"decode steps: switched to {status['step']} steps ({status['reason']})")

        on_model_thread(apply)

    thread = threading.Thread(target=work, name="vlcache-compile", daemon=True)
    thread.start()
    return thread


def _plan(engine, mode: str, backend: str | None, span: int | None) -> tuple[list[str], int, dict | None]:
    cuda = engine.device.type == "cuda"
    backends = [backend] if backend else (["inductor", "cudagraphs"] if cuda and mode == "auto" else ["inductor"])
    span = span or default_span(engine.model)
    return backends, span, decision.key(engine, span, backends) if mode == "auto" else None


def _decide(engine, mode: str, backends: list[str], buckets: list[int], span: int, fields: dict | None,
            on_model_thread: Callable, quiet: Quiet | None = None) -> tuple[dict, StepRunner | None]:
    """Compile each backend's step for every bucket; with auto, probe and time it. (status, runner or None)."""
    from .. import uncached

    cuda = engine.device.type == "cuda"
    image = state = None
    reasons, measured, decided, untimed, disturbed = [], {}, False, False, 0
    for name in backends:
        # 1. Compile (or capture) the step for each bucket, timing the first (which pays for the compile).
        runner = StepRunner(engine.model, engine.device, name, span)
        started = time.perf_counter()
        compile_s = _compile(runner, engine, buckets or [1], _DOING.get(name, f"tracing the step ({name} backend)"))
        if runner.failed:
            reasons.append(f"{name} failed to compile: {runner.failed}")
            continue
        label = _LABELS.get(name, f"traced ({name} backend)")
        if mode == "on":
            return _status(label, "--compile on", runner, time.perf_counter() - started), runner
        # 2. Exactness: the probe's greedy tokens against generate() on the uncached conversation.
        log.info("decode steps: checking the step's tokens against generate() on the probe...")
        if state is None:
            image = uncached.probe_image()
            state = on_model_thread(lambda: engine.cache_image(image, system_prompt=uncached.SYSTEM))
        tokens, expected = on_model_thread(lambda: _probe(engine, runner, state, image))
        if tokens != expected:
            where = next((i for i, (a, b) in enumerate(zip(tokens, expected)) if a != b), min(len(tokens), len(expected)))
            reasons.append(f"{name} step differs from generate() at token {where} of the probe")
            decided = True
            continue
        # 3. Speed, on a CPU (on CUDA a graph only removes launch overhead): against the eager step, batch 1,
        # alternating, and kept only with a margin (a busy machine's noise must not decide).
        if not cuda:
            log.info("decode steps: timing the step against the eager one...")
            try:
                fast, slow, discarded = _speed(engine, runner, quiet)
            except Disturbed as exc:
                reasons.append(f"{name} step not timed: {exc}")
                untimed, disturbed = True, disturbed + exc.args[1]
                continue
            measured[name] = {"compiled_ms": round(fast * 1e3, 3), "eager_ms": round(slow * 1e3, 3)}
            if quiet is not None:
                measured[name]["discarded_rounds"] = discarded
            if fast > slow * (1 - MARGIN):
                reasons.append(f"{name} step not faster on this CPU by {MARGIN:.0%} ({fast * 1e3:.1f} ms vs eager "
                               f"{slow * 1e3:.1f} ms)")
                decided = True
                continue
            status = _status(label, f"exact on the probe; {fast * 1e3:.1f} ms a step vs eager {slow * 1e3:.1f} ms",
                             runner, compile_s)
            if quiet is not None:
                status["discarded_rounds"] = disturbed + discarded
            return _decided(fields, status, name, measured), runner
        return _decided(fields, _status(label, "exact on the probe", runner, compile_s), name, measured), runner
    status = {"step": "eager", "reason": "; ".join(reasons) or "no compiled step", "buckets": []}
    if untimed:  # a step not timed undisturbed might have been faster: the next start decides again
        status.update(reason=status["reason"] + "; eager steps, nothing remembered (the next start decides again)",
                      discarded_rounds=disturbed, decided=False)
        return status, None
    # Remembered only where a probe or a timing said eager; a compile that failed may work at the next start.
    return (_decided(fields, status, None, measured) if decided else status), None


def _probe(engine, runner: StepRunner, state, image) -> tuple[list[int], list[int]]:
    from .. import uncached

    engine.runner = runner  # for this question's batch only: the caller owns the model meanwhile
    try:
        return uncached.one_question(engine, state, image)
    finally:
        engine.runner = None


def _compile(runner: StepRunner, engine, buckets: list[int], doing: str) -> float:
    """Compile the step for every bucket with a progress line each; the seconds the first took."""
    started = time.perf_counter()
    first = 0.0
    for k, rows in enumerate(buckets):
        left = "" if k == 0 else f"; about {_duration((len(buckets) - k) * (time.perf_counter() - started) / k)} left"
        log.info(f"decode steps: {doing} for batch size {rows} ({k + 1} of {len(buckets)}{left})...")
        warm(engine, rows, runner=runner)
        if k == 0:
            first = time.perf_counter() - started
        if runner.failed:
            break
    return first


def _decided(fields: dict | None, status: dict, backend: str | None, measured: dict) -> dict:
    """Remember auto's decision (fields None: not auto, nothing to remember)."""
    if fields is not None:  # (the file's path stays out of the status: /health shows it to every client)
        decision.write(fields, status["step"], backend, status["reason"], measured)
        status["remembered"] = False
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
    runner = StepRunner(engine.model, engine.device, name, span)
    log.info(f"decode steps: {remembered['step']}, as decided on {when} ({reason})")
    started = time.perf_counter()
    _compile(runner, engine, buckets or [1], _DOING.get(name, f"tracing the step ({name} backend)"))
    if runner.failed:
        return {"step": "eager", "reason": f"{name} failed to compile: {runner.failed}", "buckets": []}
    engine.runner = runner
    status = _status(remembered["step"], f"remembered: {reason}", runner, time.perf_counter() - started)
    status["remembered"] = True
    return status


def _duration(seconds: float) -> str:
    return f"{seconds:.0f}s" if seconds < 90 else f"{seconds / 60:.0f} min"


def warm(engine, rows: int, steps: int = 2, runner: StepRunner | None = None) -> None:
    """Run a few steps of `rows` text-only rows (through `runner`, else the engine's), so that their bucket is
    compiled before a request needs it. Its own batch and K/V pool: a server's rows are not touched."""
    from . import Prefix, SamplingParams, generate

    ids = engine.processor.tokenizer(WARM_TEXT, return_tensors="pt")["input_ids"][0].to(engine.device)
    batch = engine.batch()
    if runner is not None:
        batch.runner = runner
    for _ in range(rows):
        batch.add(Prefix(kv=engine.empty_kv(), tokens=0), SamplingParams(temperature=0.0), steps, ids)
    for _ in generate(batch, [ids] * rows):
        pass
    batch.cache.close()


def _status(step: str, reason: str, runner: StepRunner, compile_s: float) -> dict:
    return {"step": step, "reason": reason, "buckets": sorted({b for b, _ in runner.shapes}),
            "shapes": sorted(runner.shapes), "compile_s": round(compile_s, 2)}


def _speed(engine, runner: StepRunner, quiet: Quiet | None = None) -> tuple[float, float, int]:
    """Median seconds of a batch-1 decode step, compiled and eager, alternating (same rows, same lengths), and
    the rounds discarded. With `quiet` (a serving server), a round starts only when the server is idle and counts
    only if it still is and did no work meanwhile; Disturbed when MAX_DISCARDED rounds were discarded or the
    server was not idle for QUIET_WAIT_S."""
    from . import Prefix, SamplingParams

    ids = engine.processor.tokenizer(WARM_TEXT, return_tensors="pt")["input_ids"][0].to(engine.device)
    batch = engine.batch()
    batch.add(Prefix(kv=engine.empty_kv(), tokens=0), SamplingParams(temperature=0.0), 10**6, ids)
    batch.sample(batch.prefill([ids]))
    MEASUREMENTS[0] += 1
    compiled, eager = [], []
    discarded, deadline = 0, time.monotonic() + QUIET_WAIT_S
    try:
        while len(compiled) < ROUNDS:  # alternating, one first then the other: a load that comes and goes hits both
            before = _await_quiet(quiet, deadline, discarded)
            pair = {}
            for name in (("compiled", "eager") if len(compiled) % 2 == 0 else ("eager", "compiled")):
                batch.runner = runner if name == "compiled" else None
                pair[name] = time_steps(batch, 3)
            if quiet is not None and not (quiet.idle() and quiet.activity() == before):
                discarded += 1  # the model thread worked, or a request came, during the round: its times are not quiet
                DISCARDED[0] += 1
                if discarded >= MAX_DISCARDED:
                    raise Disturbed(f"{discarded} timing rounds overlapped serving work and were discarded "
                                    f"({len(compiled)} of {ROUNDS} undisturbed)", discarded)
                continue
            compiled.append(pair["compiled"]), eager.append(pair["eager"])
    finally:
        batch.runner = None
        batch.cache.close()
    compiled.sort(), eager.sort()
    return compiled[ROUNDS // 2], eager[ROUNDS // 2], discarded


def _await_quiet(quiet: Quiet | None, deadline: float, discarded: int) -> int:
    """Wait until the server is idle (polling: it has no event for that); its activity count then."""
    if quiet is None:
        return 0
    while True:
        before = quiet.activity()  # read first: work that starts after it changes it
        if quiet.idle():
            return before
        if time.monotonic() > deadline:
            raise Disturbed(f"the server was not idle for {QUIET_WAIT_S:.0f} s of timing ({discarded} rounds "
                            "discarded)", discarded)
        time.sleep(0.05)
