"""Decode-step benchmark (issue 19): vlcache's one decode path against transformers, per step.

(a) A Qwen3-VL as deep as the 2B (28 layers) but thin (hidden 64), with the real Qwen3-VL processor: its step
    is almost all framework overhead, as a 2B step is on a fast GPU. Milliseconds per decode step at batch 1
    and 8, one torch thread: vlcache eager and compiled, transformers' generate() eager and with a static cache
    (compiled), in one process, methods alternating, medians.
(b) The Qwen3-VL-2B architecture (random weights, real processor) in the dtype --dtype auto picks: ms per
    token at batch 1 and 8 against the floor, one bare forward of one token per row over the same cache.

Usage: python bench/decode.py --work-dir /tmp/bdecode [--skip-2b] [--json docs/benchmarks-decode.json]
Prints a Markdown report on stdout. GPU figures come from bench/cuda_check.py where a GPU is at hand.
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
REAL = REPO.parent / "shared" / "models" / "qwen3-vl-2b-instruct"
PROMPT = "Describe the picture of a rocket on its launch pad in a few sentences, please."
sys.path.insert(0, str(Path(__file__).parent))


def build_thin(folder: Path) -> Path:
    """The 2B's config made thin: 28 text layers of hidden 64 (4 heads of 16, 2 K/V heads), a 2-block vision tower."""
    from transformers import Qwen3VLConfig


    if (folder / "config.json").exists():
        return folder
    config = Qwen3VLConfig.from_pretrained(REAL)
    text = config.text_config
    text.hidden_size, text.intermediate_size, text.num_attention_heads = 64, 128, 4
    text.num_key_value_heads, text.head_dim = 2, 16
    text.rope_parameters = {**(text.rope_parameters or {}), "mrope_section": [2, 3, 3]}
    vision = config.vision_config
    vision.depth, vision.hidden_size, vision.intermediate_size, vision.num_heads = 2, 64, 128, 4
    vision.out_hidden_size, vision.deepstack_visual_indexes = 64, [0]
    return save_thin(config, folder)


def save_thin(config, folder: Path) -> Path:
    """A random float32 checkpoint of `config` in `folder`, with the real 2B's tokenizer, template and processor."""
    from vlcache.testing import build_random_checkpoint

    source = folder.with_name(folder.name + "-config")
    source.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(source)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json",
                 "video_preprocessor_config.json", "generation_config.json"):
        if (REAL / name).exists():
            (source / name).write_bytes((REAL / name).read_bytes())
    return build_random_checkpoint(source / "config.json", folder, dtype=torch.float32)


def _prompt_ids(engine, rows: int) -> torch.Tensor:
    from vlcache import prompt

    return prompt.text_only_ids(engine.processor, None, PROMPT).to(engine.device).expand(rows, -1).contiguous()


def vlcache_steps(engine, rows: int, steps: int, runner=None) -> float:
    """Median seconds of a decode step (forward + sampling + the transfer of the new ids) of `rows` rows."""
    from vlcache import decode
    from vlcache.decode.step import time_steps

    ids = _prompt_ids(engine, 1)[0]
    batch = engine.batch()
    batch.runner = runner
    for _ in range(rows):
        batch.add(decode.Prefix(engine.empty_kv(), 0), decode.SamplingParams(temperature=0.0), 10**6, ids)
    batch.sample(batch.prefill([ids] * rows))
    time_steps(batch, 2)  # warm-up
    return time_steps(batch, steps)


def generate_steps(model, ids: torch.Tensor, steps: int, static: bool) -> float:
    """Seconds a step of transformers' generate(): (steps + 1 tokens - 1 token) / steps, greedy, no early stop,
    each the best of three runs."""
    from transformers.generation.configuration_utils import CompileConfig

    kwargs = dict(do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=0)
    if static:
        config = CompileConfig()
        config._compile_all_devices = True  # transformers compiles only on accelerators unless told (a class field)
        kwargs.update(cache_implementation="static", compile_config=config)
    else:
        kwargs.update(disable_compile=True)

    def run(n):
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)
        return time.perf_counter() - start

    run(steps + 1)  # warm-up (and the compile, for the static cache)
    # The best of three of each: a difference of two single timings went negative on a busy machine.
    return (min(run(steps + 1) for _ in range(3)) - min(run(1) for _ in range(3))) / steps


def thin(work: Path, rounds: int, steps: int) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _thin(work, rounds, steps)
    finally:
        torch.set_num_threads(threads)  # (b) runs with every core, as a user would


def _thin(work: Path, rounds: int, steps: int) -> dict:
    from transformers import AutoModelForImageTextToText

    from vlcache import Engine
    from vlcache.decode.step import StepRunner

    folder = build_thin(work / "thin")
    engine = Engine.load(str(folder), device="cpu", dtype="float32")
    baseline = AutoModelForImageTextToText.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="sdpa").eval()
    out = {}
    for rows in (1, 8):
        runner = StepRunner(engine.model, "cpu", "inductor")
        started = time.perf_counter()
        vlcache_steps(engine, rows, 2, runner)  # compile this bucket
        compile_s = time.perf_counter() - started
        ids = _prompt_ids(engine, rows).cpu()
        methods = {
            "vlcache eager": lambda: vlcache_steps(engine, rows, steps),
            "vlcache compiled": lambda: vlcache_steps(engine, rows, steps, runner),
            "generate eager": lambda: generate_steps(baseline, ids, steps, static=False),
            "generate static cache, compiled": lambda: generate_steps(baseline, ids, steps, static=True),
        }
        samples: dict = {name: [] for name in methods}
        for _ in range(rounds):  # alternating, so drift on a shared machine touches every method alike
            for name, fn in methods.items():
                if not isinstance(samples[name], list):
                    continue  # failed before: reported once
                try:
                    samples[name].append(fn())
                except Exception as exc:  # noqa: BLE001 - a baseline that cannot run here is reported, not fatal
                    samples[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        out[rows] = {name: (statistics.median(v) if isinstance(v, list) else v) for name, v in samples.items()}
        out[rows]["compile_s"] = compile_s
        out[rows]["runner_failed"] = runner.failed
        out[rows]["output_projection_s"] = _head_seconds(engine.model, rows)
    return {"model": "Qwen3-VL, 28 layers, hidden 64 (real processor)", "threads": 1, "prompt_tokens": int(ids.shape[1]),
            "steps": steps, "rounds": rounds, "per_step_s": out}


def _head_seconds(model, rows: int, runs: int = 50) -> float:
    """Median seconds of the output projection alone (hidden -> 151,936 logits) for `rows` rows: compute that no
    overhead reduction removes, and on one CPU thread a large share of a thin model's step."""
    head = model.get_output_embeddings()
    x = torch.randn(rows, 1, head.weight.shape[1], dtype=head.weight.dtype)
    times = []
    with torch.inference_mode():
        for _ in range(runs):
            start = time.perf_counter()
            head(x)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def two_b(work: Path, steps: int, row_counts=(1, 8), clock=time.perf_counter) -> dict:
    from transformers import DynamicCache

    from vlcache import Engine
    from vlcache.testing import build_random_checkpoint

    folder = work / "qwen3-vl-2b"
    if not (folder / "config.json").exists():
        build_random_checkpoint(REAL / "config.json", folder)
    engine = Engine.load(str(folder), device="cpu", dtype="auto")
    state = engine.cache_image(REPO.parent / "shared" / "images" / "astronaut.png")
    question = engine.question_ids(state.metadata.messages, "What is in the picture?")
    engine.ask_many(state, ["What is in the picture?"] * 2, max_new_tokens=4, temperature=0)  # warm: weights paged in
    from vlcache import decode

    # What copying a state into a row's slot costs (the alternative, referencing it, costs in every step).
    copies = []
    for _ in range(steps):
        batch = engine.batch()
        start = time.perf_counter()
        batch.add(engine.state_prefix(state), decode.SamplingParams(temperature=0.0), 1, question[0])
        copies.append(time.perf_counter() - start)
    out = {}
    for rows in row_counts:
        batch = engine.batch()
        for _ in range(rows):
            batch.add(engine.state_prefix(state), decode.SamplingParams(temperature=0.0), 10**6, question[0])
        batch.sample(batch.prefill([question[0]] * rows))
        n = batch.cache.book.lengths[0]
        kv = batch.cache.row_state(0)
        delta = int(state.rope_deltas.view(-1)[0])

        def bare_forward() -> float:
            """The floor: one bare forward of one token per row over a plain cache of the same length."""
            cache = DynamicCache(config=engine.model.config)
            for i, (k, v) in enumerate(kv):
                cache.update(k.expand(rows, -1, -1, -1).clone(), v.expand(rows, -1, -1, -1).clone(), i)
            where = engine.family.positions(torch.full((rows, 1), n), torch.full((rows, 1), n), delta)
            start = clock()
            with torch.inference_mode():
                engine.model(input_ids=torch.full((rows, 1), 100), position_ids=where, cache=cache, use_cache=True,
                             logits_to_keep=1)
            return clock() - start

        def step() -> float:
            start = clock()
            batch.sample(batch.step())
            return clock() - start

        times, floor = [], []
        for _ in range(steps):  # alternating, so drift touches both alike
            times.append(step())
            floor.append(bare_forward())
        out[rows] = {"vlcache_s": statistics.median(times), "floor_s": statistics.median(floor)}
    return {"model": "Qwen3-VL-2B architecture, random weights", "dtype": str(engine.dtype).removeprefix("torch."),
            "dtype_reason": engine.dtype_reason, "threads": torch.get_num_threads(), "cached_tokens": state.num_tokens,
            "state_bytes": state.kv_bytes, "copy_into_slot_s": statistics.median(copies), "per_token_s": out}


def markdown(results: dict) -> str:
    machine = results["machine"]
    lines = [f"Machine: {machine['cpu']}, {machine['cores']} cores, torch capability **{machine['capability']}**, native "
             f"bfloat16: **{machine['native_bf16'] or 'none'}**; torch {machine['torch']}. Command: `{results['command']}`. "
             "No GPU in this run."]
    thin_r = results.get("thin")
    if thin_r:
        lines += ["", f"### (a) {thin_r['model']}, {thin_r['threads']} torch thread, {thin_r['prompt_tokens']}-token prompt",
                  "", f"Median ms per decode step over {thin_r['rounds']} alternating rounds of {thin_r['steps']} steps.", "",
                  "| rows | vlcache eager | vlcache compiled | generate eager | generate static cache, compiled | "
                  "vlcache compiled / generate eager (target <= 0.25) | compile (s) | of each step: the output projection |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for rows, r in thin_r["per_step_s"].items():
            def ms(v):
                return f"{v * 1e3:.1f}" if isinstance(v, float) else f"n/a ({v})"
            ratio = (r["vlcache compiled"] / r["generate eager"]) if all(isinstance(r[k], float) for k in ("vlcache compiled", "generate eager")) else None
            lines.append(f"| {rows} | {ms(r['vlcache eager'])} | {ms(r['vlcache compiled'])} | {ms(r['generate eager'])} | "
                         f"{ms(r['generate static cache, compiled'])} | {'n/a' if ratio is None else f'{ratio:.2f}'} | "
                         f"{r['compile_s']:.0f} | {ms(r.get('output_projection_s'))} |")
    two = results.get("2b")
    if two:
        lines += ["", f"### (b) {two['model']}, {two['dtype']} ({two['dtype_reason']}), {two['threads']} torch threads, "
                  f"{two['cached_tokens']} cached tokens, {two.get('clock', 'wall')} clock", "",
                  "| rows | vlcache ms a step | floor (bare forward of one token a row) | vlcache / floor (target <= 1.1) |",
                  "| --- | --- | --- | --- |"]
        for rows, r in two["per_token_s"].items():
            lines.append(f"| {rows} | {r['vlcache_s'] * 1e3:.0f} | {r['floor_s'] * 1e3:.0f} | {r['vlcache_s'] / r['floor_s']:.2f} |")
        lines += ["", f"Copying the state ({two['state_bytes'] / 2**20:.1f} MiB) into a joining row's slot: "
                  f"{two['copy_into_slot_s'] * 1e3:.1f} ms, once per row (median of {results['steps']} adds)."]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--skip-thin", action="store_true")
    parser.add_argument("--skip-2b", action="store_true")
    parser.add_argument("--rows-2b", type=int, nargs="+", default=[1, 8], help="batch sizes of part (b)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="part (b): wall seconds, or CPU seconds of the main thread (with --threads 1: every "
                             "kernel runs on it; other processes on a busy machine disturb it far less)")
    parser.add_argument("--threads", type=int, default=None, help="part (b): torch threads (default: torch's)")
    args = parser.parse_args(argv)
    from dtype import cpu_facts  # bench/dtype.py: one place for what the CPU is

    args.work_dir.mkdir(parents=True, exist_ok=True)
    results = {"machine": cpu_facts(), "command": "python bench/decode.py " + " ".join(argv or sys.argv[1:]),
               "steps": args.steps}
    if not args.skip_thin:
        results["thin"] = thin(args.work_dir, args.rounds, args.steps)
    if not args.skip_2b:
        if args.threads:
            torch.set_num_threads(args.threads)
        clock = time.thread_time if args.clock == "cpu" else time.perf_counter
        results["2b"] = two_b(args.work_dir, args.steps, args.rows_2b, clock)
        results["2b"]["clock"] = args.clock
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
