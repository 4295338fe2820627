"""Structured outputs (issue 30): what a JSON-schema grammar costs per decode step, xgrammar against llguidance.

Per step and per batch of B rows, each row under its own matcher of one schema: filling the packed token
bitmask [B, ceil(V/32)] on the host (each library's batched call: xgrammar's BatchGrammarMatcher, llguidance's
fill_next_token_bitmask_par), then accepting each row's token. Tokens are drawn at random among the allowed
ones (seeded), so the rows walk different paths through the schema, as sampled answers do. One torch thread.
With the tiny test checkpoint's tokenizer (a few hundred tokens) and the real Qwen3-VL-2B tokenizer (151,936
logits). Compile time per schema is reported apart (it is paid once per schema and cached).

(b) With --thin and --two-b: the decode step of bench/decode.py's thin stand-in (28 layers, hidden 64, real
processor) and of the Qwen3-VL-2B architecture (random weights) through vlcache's own batch, every row free or
every row under the schema, batch 1 and 16: the whole price of a grammar in a step (bitmask, the transfer to
the device, the masking in sampling, accepting the token).

Usage: python bench/grammar.py [--work-dir /tmp/bgrammar] [--thin] [--two-b] [--threads 2] [--json docs/benchmarks-grammar.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
REAL = REPO.parent / "shared" / "models" / "qwen3-vl-2b-instruct"
sys.path.insert(0, str(Path(__file__).parent))

SCHEMA = {
    "type": "object",
    "properties": {
        "colour": {"type": "string", "enum": ["red", "green", "blue", "black", "white", "other"]},
        "has_text": {"type": "boolean"},
        "setting": {"type": "string", "enum": ["indoor", "outdoor", "space", "unknown"]},
        "people": {"type": "integer", "minimum": 0, "maximum": 20},
        "caption": {"type": "string", "maxLength": 40},
    },
    "required": ["colour", "has_text", "setting", "people", "caption"],
    "additionalProperties": False,
}


def _allowed(row: torch.Tensor, vocab: int) -> list[int]:
    bits = ((row.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1).flatten()[:vocab]
    return bits.nonzero().flatten().tolist()


def _walk(fill, accept, terminated, bitmask, rows: int, vocab: int, steps: int, seed: int):
    """Run up to `steps` steps; returns per-step seconds of (fill, accept)."""
    rng = random.Random(seed)
    fills, accepts = [], []
    for _ in range(steps):
        live = [i for i in range(rows) if not terminated(i)]
        if not live:
            break
        start = time.perf_counter()
        fill(live)
        fills.append(time.perf_counter() - start)
        tokens = {}
        for i in live:
            allowed = _allowed(bitmask[i], vocab)
            tokens[i] = rng.choice(allowed)
        start = time.perf_counter()
        for i in live:
            if not accept(i, tokens[i]):
                raise RuntimeError(f"row {i}: the matcher refused a token its own mask allowed ({tokens[i]})")
        accepts.append(time.perf_counter() - start)
    return fills, accepts


def bench_xgrammar(tokenizer, vocab: int, eos: list[int], rows: int, steps: int, seed: int) -> dict:
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab, stop_token_ids=eos)
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    start = time.perf_counter()
    grammar = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)
    compile_s = time.perf_counter() - start
    matchers = [xgr.GrammarMatcher(grammar) for _ in range(rows)]
    bitmask = xgr.allocate_token_bitmask(rows, vocab)
    batch = xgr.BatchGrammarMatcher(max_threads=1)

    def fill(live):
        if rows == 1:
            matchers[0].fill_next_token_bitmask(bitmask, 0)
        else:
            batch.batch_fill_next_token_bitmask([matchers[i] for i in live], bitmask, live)

    fills, accepts = _walk(fill, lambda i, t: matchers[i].accept_token(t), lambda i: matchers[i].is_terminated(),
                           bitmask, rows, vocab, steps, seed)
    return _summary(compile_s, fills, accepts)


def bench_llguidance(tokenizer, vocab: int, eos: list[int], rows: int, steps: int, seed: int) -> dict:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab, eos_token=eos[0])
    start = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA), defaults={"whitespace_flexible": False})
    matchers = [llguidance.LLMatcher(lltok, grammar) for _ in range(rows)]
    compile_s = time.perf_counter() - start
    if matchers[0].is_error():
        raise RuntimeError(matchers[0].get_error())
    bitmask = llguidance.torch.allocate_token_bitmask(rows, vocab)
    executor = llguidance.LLExecutor(1)

    def fill(live):
        if rows == 1:
            llguidance.torch.fill_next_token_bitmask(matchers[0], bitmask, 0)
        else:
            llguidance.torch.fill_next_token_bitmask_par(executor, [(matchers[i], i) for i in live], bitmask)

    fills, accepts = _walk(fill, lambda i, t: matchers[i].consume_token(t), lambda i: matchers[i].is_stopped(),
                           bitmask, rows, vocab, steps, seed)
    return _summary(compile_s, fills, accepts)


def _summary(compile_s: float, fills: list[float], accepts: list[float]) -> dict:
    return {"compile_s": compile_s, "steps": len(fills), "fill_ms": 1000 * statistics.median(fills),
            "fill_ms_mean": 1000 * statistics.mean(fills), "fill_ms_max": 1000 * max(fills),
            "accept_ms": 1000 * statistics.median(accepts), "accept_ms_mean": 1000 * statistics.mean(accepts)}


def step_costs(engine, steps: int) -> dict:
    """ms per decode step through vlcache's batch at 1 and 16 rows, all rows free or all under the schema (each row
    its own matcher; temperature 1, seeds 0..B-1, the model's own top-k and top-p, as a served request), the two batches stepping alternately so drift touches both
    alike; only the steps where every schema row is still inside its grammar count (a finished matcher masks
    nothing). The difference is the grammar's whole price in a step: filling the bitmask on the host, its
    transfer, the masking, accepting the token."""
    from vlcache import decode, prompt
    from vlcache.engine import GenerationOptions

    ids = prompt.text_only_ids(engine.processor, None, "Describe the picture as JSON.").to(engine.device)[0]
    out = {}
    for rows in (1, 16):
        batches = {}
        for mode in ("free", "schema"):
            batch = engine.batch()
            for i in range(rows):
                constraint = engine.grammars.constraint(SCHEMA, True) if mode == "schema" else None
                batch.add(decode.Prefix(engine.empty_kv(), 0), engine.sampling(GenerationOptions(temperature=1.0, seed=i)), 10**6, ids,
                          constraint)
            batch.sample(batch.prefill([ids] * rows))
            batches[mode] = batch
        times: dict = {"free": [], "schema": []}
        for _ in range(steps):
            took = {}
            for mode, batch in batches.items():
                start = time.perf_counter()
                batch.sample(batch.step())
                took[mode] = time.perf_counter() - start
            if any(batches["schema"].ended):
                break
            for mode in took:
                times[mode].append(took[mode])
        free, schema = (1000 * statistics.median(times[m]) for m in ("free", "schema"))
        out[rows] = {"steps": len(times["free"]), "free_ms": free, "schema_ms": schema, "grammar_ms": schema - free,
                     "grammar_share": (schema - free) / free}
    return out


def sampling_costs(tokenizer, vocab: int, eos: list[int], steps: int) -> dict:
    """ms of vlcache's sampling step alone (decode.RowSampling.sample, then accept) over random logits of the
    real vocabulary, every row free or every row under the schema (its own matcher), temperature 1 with
    Qwen3-VL's top-k 20 and top-p 0.8, the two alternating: the grammar's price without a forward (which it does
    not touch), so a loaded machine's noise in the forward does not hide it."""
    from vlcache.decode.sampling import RowSampling, SamplingParams
    from vlcache.structured import JsonGrammars

    grammars = JsonGrammars(tokenizer, vocab, eos)
    out = {}
    for rows in (1, 16):
        samplers = {}
        for mode in ("free", "schema"):
            sampling = RowSampling(vocab, frozenset(eos), "cpu")
            for i in range(rows):
                sampling.add(SamplingParams(1.0, top_k=20, top_p=0.8, seed=i), 10**6, torch.tensor([0]),
                             grammars.constraint(SCHEMA, True) if mode == "schema" else None)
            samplers[mode] = sampling
        generator = torch.Generator().manual_seed(rows)
        times: dict = {"free": [], "schema": []}
        for _ in range(steps):
            logits = torch.randn(rows, vocab, generator=generator) * 4
            took, ended = {}, False
            for mode, sampling in samplers.items():
                start = time.perf_counter()
                tokens, _ = sampling.sample(logits)
                ended |= any(sampling.accept(tokens.tolist()))
                took[mode] = time.perf_counter() - start
            if ended:
                break
            for mode in took:
                times[mode].append(took[mode])
        free, schema = (1000 * statistics.median(times[m]) for m in ("free", "schema"))
        out[rows] = {"steps": len(times["free"]), "free_ms": free, "schema_ms": schema, "grammar_ms": schema - free}
    return out


def _thin(work: Path):
    from decode import build_thin

    from vlcache import Engine

    return Engine.load(str(build_thin(work / "thin")), device="cpu", dtype="float32")


def _two_b(work: Path):
    """The Qwen3-VL-2B architecture, random weights (as bench/decode.py), in the dtype --dtype auto picks."""
    from vlcache import Engine
    from vlcache.testing import build_random_checkpoint

    folder = work / "qwen3-vl-2b"
    if not (folder / "config.json").exists():
        build_random_checkpoint(REAL / "config.json", folder)
    return Engine.load(str(folder), device="cpu", dtype="auto")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", default="/tmp/bgrammar")
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--thin", action="store_true", help="also the thin stand-in's decode step, free and under the schema")
    parser.add_argument("--two-b", action="store_true", help="also the 2B architecture's decode step (random weights)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the 2B's decode steps (the masks and the thin stand-in: one)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from transformers import AutoTokenizer

    from vlcache.testing import build_tiny_checkpoint

    work = Path(args.work_dir)
    tiny = build_tiny_checkpoint(work / "tiny") if not (work / "tiny" / "config.json").exists() else work / "tiny"
    tokenizers = {"tiny": (AutoTokenizer.from_pretrained(tiny), None), "qwen3-vl-2b": (AutoTokenizer.from_pretrained(REAL), 151936)}
    results: dict = {"command": "python " + " ".join(sys.argv), "machine": _machine(), "schema": SCHEMA, "mask": {}}

    def save() -> None:  # after each part: a later part that fails (the 2B needs 4 GiB free) keeps the earlier ones
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1) + "\n")

    for name, (tokenizer, vocab) in tokenizers.items():
        vocab = vocab or len(tokenizer)
        eos = [tokenizer.convert_tokens_to_ids("<|im_end|>")]
        for library, bench in (("xgrammar", bench_xgrammar), ("llguidance", bench_llguidance)):
            for rows in (1, 16):
                r = bench(tokenizer, vocab, eos, rows, args.steps, seed=rows)
                results["mask"][f"{name} {library} {rows}"] = r
                print(f"| {name} (V={vocab:,}) | {library} | {rows} | {r['fill_ms']:.3f} / {r['fill_ms_mean']:.3f} / "
                      f"{r['fill_ms_max']:.3f} | {r['accept_ms']:.3f} / {r['accept_ms_mean']:.3f} | "
                      f"{r['compile_s'] * 1000:.1f} | {r['steps']} |", flush=True)
    save()
    torch.set_num_threads(1)
    results["sampling"] = sampling_costs(tokenizers["qwen3-vl-2b"][0], 151936,
                                         [tokenizers["qwen3-vl-2b"][0].convert_tokens_to_ids("<|im_end|>")], args.steps)
    for rows, r in results["sampling"].items():
        print(f"| sampling alone (V=151,936) | {rows} | {r['free_ms']:.2f} | {r['schema_ms']:.2f} | {r['grammar_ms']:+.2f} | "
              f"{r['steps']} |", flush=True)
    save()
    # The thin stand-in on one thread (as bench/decode.py: its step is overhead), the 2B on --threads.
    for name, wanted, load, threads in (("thin", args.thin, _thin, 1), ("2b", args.two_b, _two_b, args.threads)):
        if wanted:
            torch.set_num_threads(threads)
            engine = load(work)
            config = engine.model.generation_config
            results[name] = {"dtype": str(engine.dtype).removeprefix("torch."), "threads": torch.get_num_threads(),
                             "top_k": config.top_k, "top_p": config.top_p,
                             "steps": step_costs(engine, args.steps if name == "thin" else min(args.steps, 16))}
            for rows, r in results[name]["steps"].items():
                print(f"| {name} ({results[name]['dtype']}) | {rows} | {r['free_ms']:.2f} | {r['schema_ms']:.2f} | "
                      f"{r['grammar_ms']:+.2f} ({100 * r['grammar_share']:+.1f}%) | {r['steps']} |", flush=True)
            del engine
            save()
    return 0


def _machine() -> dict:
    import importlib.metadata as md

    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return {"cpu": platform.processor() or "x86_64", "avx512_bf16": "avx512_bf16" in flags, "cores": os.cpu_count(),
            "load_average_at_start": os.getloadavg(),
            "torch": torch.__version__, "xgrammar": md.version("xgrammar"), "llguidance": md.version("llguidance")}


if __name__ == "__main__":
    raise SystemExit(main())
