"""Where a bf16 decode step of the Qwen3-VL-2B architecture spends its time on this CPU (issue 33, item 1).

Loads a random-weight 2B (built once, bench/peer_llamacpp.py's checkpoint or a fresh one), caches a photograph,
puts one row on it and runs batch-1 decode steps: per-op totals from torch.profiler (linear layers, the 151,936-
token output projection, attention over the row's blocks, the host between steps), then the step's median time
with each candidate (eager, inductor, inductor with frozen prepacked weights) alternating, and whether each
candidate's greedy tokens equal the eager step's.

Usage: python bench/profile_step.py --model DIR [--steps 8] [--rounds 3] [--json out.json]
       python bench/profile_step.py --model DIR --linear-only --rounds 7   # the linear layers alone, plain vs packed
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
IMAGE = REPO.parent / "shared" / "images" / "astronaut.png"
QUESTION = "What is in the picture?"


def one_row(engine, state, runner=None):
    """A batch of one row on `state`, its question prefilled and first token sampled."""
    from vlcache import decode

    question = engine.question_ids(state.metadata.messages, QUESTION)[0]
    batch = engine.batch()
    batch.runner = runner
    batch.add(engine.state_prefix(state), decode.SamplingParams(temperature=0.0), 10**6, question)
    batch.sample(batch.prefill([question]))
    return batch


def profile(engine, state, steps: int) -> dict:
    """Per-op self CPU time of `steps` eager steps, grouped into what the issue asks about."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    from torch.profiler import record_function

    batch = one_row(engine, state)
    for _ in range(3):
        batch.sample(batch.step())
    head = engine.model.get_output_embeddings().weight
    with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            with record_function("step"):
                with record_function("forward"):
                    logits = batch.step()
                with record_function("sample"):
                    batch.sample(logits)
    groups: dict[str, float] = {}
    ops = []
    for event in prof.key_averages(group_by_input_shape=True):
        ms = event.self_cpu_time_total / 1e3 / steps
        if event.key in ("step", "forward", "sample"):
            groups[f"total: {event.key}"] = event.cpu_time_total / 1e3 / steps
            continue
        shapes = str(event.input_shapes)
        name = event.key
        if name in ("aten::addmm", "aten::mm", "aten::linear", "aten::matmul", "aten::bmm", "mkldnn::_linear_pointwise"):
            kind = "output projection" if str(head.shape[0]) in shapes else "linear/matmul"
        elif "softmax" in name or "gather" in name or "index" in name or "scatter" in name:
            kind = "attention glue (gather/index/softmax)"
        elif name in ("aten::copy_", "aten::to", "aten::_to_copy", "aten::contiguous", "aten::clone"):
            kind = "copies/casts"
        else:
            kind = "other ops"
        groups[kind] = groups.get(kind, 0.0) + ms
        ops.append((ms, name, shapes[:120]))
    ops.sort(reverse=True)
    return {"groups_ms": {k: round(v, 2) for k, v in sorted(groups.items(), key=lambda kv: -kv[1])},
            "top_ops_ms": [[round(ms, 2), name, shapes] for ms, name, shapes in ops[:25]]}


def unpacked(model):
    """The packed linear layers (decode.linear) back to their plain forward; returns how to pack them again."""
    forwards = {m: m.__dict__.pop("forward") for m in model.modules() if "forward" in m.__dict__ and type(m) is torch.nn.Linear}

    def again():
        for module, forward in forwards.items():
            module.forward = forward
    return again


def step_times(engine, state, steps: int, rounds: int) -> dict:
    """Median ms of a batch-1 eager step (forward + sampling), packed and plain linear layers alternating, and
    whether both give the same greedy tokens."""
    from vlcache.decode.step import time_steps

    out = {"packed": [], "plain": []}
    tokens = {}
    for _ in range(rounds):
        for name in ("packed", "plain"):
            again = unpacked(engine.model) if name == "plain" else None
            try:
                batch = one_row(engine, state)
                time_steps(batch, 1)
                out[name].append(time_steps(batch, steps) * 1e3)
                tokens[name] = engine.ask(state, QUESTION, max_new_tokens=8, temperature=0).token_ids
            finally:
                if again:
                    again()
    return {"step_ms": {k: {"median": round(statistics.median(v), 1), "min": round(min(v), 1), "max": round(max(v), 1)}
                        for k, v in out.items()}, "same_tokens": tokens["packed"] == tokens["plain"]}


def ttft_parts(engine, state, rounds: int) -> dict:
    """Median ms of each part of a cached first token in-process (issue 33 item 5): the question's ids, a row
    on the state (its blocks written), the prefill of the question, the first sampling; and the floor, one bare
    forward of the same tokens over a plain cache of the state (bench/measure.py's)."""
    from transformers import DynamicCache

    from vlcache import decode

    parts: dict[str, list[float]] = {k: [] for k in ("question ids", "row on the state (blocks written)",
                                                     "prefill of the question", "first sampling", "total", "floor")}
    for k in range(rounds):
        question = QUESTION + f" ({k})"
        t0 = time.perf_counter()
        ids = engine.question_ids(state.metadata.messages, question)[0]
        t1 = time.perf_counter()
        batch = engine.batch()
        batch.add(engine.state_prefix(state), decode.SamplingParams(temperature=0.0), 1, ids)
        t2 = time.perf_counter()
        logits = batch.prefill([ids])
        t3 = time.perf_counter()
        batch.sample(logits)
        t4 = time.perf_counter()
        batch.cache.close()
        for name, (a, b) in zip(parts, ((t0, t1), (t1, t2), (t2, t3), (t3, t4), (t0, t4))):
            parts[name].append((b - a) * 1e3)
        cache = DynamicCache(config=engine.model.config)
        for i, (key, value) in enumerate(state.kv):
            cache.update(key.clone(), value.clone(), i)
        n = state.num_tokens
        where = engine.family.positions(torch.arange(n, n + ids.shape[0]).unsqueeze(0),
                                        torch.arange(n, n + ids.shape[0]).unsqueeze(0), int(state.rope_deltas.view(-1)[0]))
        start = time.perf_counter()
        with torch.inference_mode():
            engine.model(input_ids=ids.unsqueeze(0), position_ids=where, cache=cache, use_cache=True,
                         logits_to_keep=1)
        parts["floor"].append((time.perf_counter() - start) * 1e3)
    return {"question_tokens": int(ids.shape[0]),
            "ttft_parts_ms": {k: {"median": round(statistics.median(v), 1), "min": round(min(v), 1), "max": round(max(v), 1)}
                              for k, v in parts.items()}}


def linear_stack(rounds: int) -> dict:
    """The 2B text model's linear layers alone (28 x q, k, v, o, gate, up, down, then the output projection),
    bfloat16, one token: plain F.linear against the same weights packed once (decode.linear), alternating; ms a
    pass and the GB/s of weights read that it implies."""
    import torch.nn.functional as F

    shapes = [(2048, 2048), (1024, 2048), (1024, 2048), (2048, 2048), (6144, 2048), (6144, 2048), (2048, 6144)] * 28
    shapes.append((151936, 2048))
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        weights = [(torch.randn(o, i, generator=generator) * 0.02).to(torch.bfloat16) for o, i in shapes]
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in weights]
        inputs = {i: torch.randn(1, i, generator=generator).to(torch.bfloat16) for i in (2048, 6144)}
        runs = {"plain": lambda: [F.linear(inputs[w.shape[1]], w) for w in weights],
                "packed": lambda: [torch.ops.mkldnn._linear_pointwise(inputs[w.shape[1]], p, None, "none", [], "")
                                   for w, p in zip(weights, packed)]}
        times: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(rounds):
            for name, fn in runs.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    size = sum(o * i * 2 for o, i in shapes)
    return {"weights_gb": round(size / 1e9, 2), **{name: {"median_ms": round(statistics.median(v) * 1e3, 1),
                                                           "min_ms": round(min(v) * 1e3, 1),
                                                           "best_gb_s": round(size / min(v) / 1e9, 1)}
                                                    for name, v in times.items()}}


def head_alone(engine, runs: int = 20) -> float:
    from decode import _head_seconds  # bench/decode.py: the output projection alone, one row

    return _head_seconds(engine.model, 1, runs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--linear-only", action="store_true", help="only the linear layers' pass, plain vs packed")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.linear_only:
        out = {"threads": torch.get_num_threads(), "linear_stack": linear_stack(args.rounds)}
        print(json.dumps(out, indent=1))
        if args.json:
            args.json.write_text(json.dumps(out, indent=1))
        return 0
    from vlcache import Engine

    engine = Engine.load(str(args.model), device="cpu", dtype="auto")
    state = engine.cache_image(IMAGE)
    out = {"dtype": str(engine.dtype), "threads": torch.get_num_threads(), "cached_tokens": state.num_tokens,
           "output_projection_alone_ms": round(head_alone(engine) * 1e3, 2)}
    out["packing"] = engine.packing
    out.update(profile(engine, state, args.steps))
    out.update(step_times(engine, state, args.steps, args.rounds))
    out.update(ttft_parts(engine, state, max(args.rounds, 5)))
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
