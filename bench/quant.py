"""int8 weights (--quantize int8) against bfloat16 on the Qwen3-VL-2B architecture with random weights.

(a) Kernels: one of the 2B's MLP projections (2048 -> 6144) and its output projection (2048 -> 151,936) at 1 to
    280 rows: the bfloat16 matmul, the packed weight-only int8 kernel vlcache uses for few rows
    (torch._weight_int8pack_mm), converting int8 weights and multiplying (vlcache's path for more rows), and
    torchao's own eager paths (Int8WeightOnlyConfig, Int8DynamicActivationInt8WeightConfig). Milliseconds, best
    and median of the runs.
(b) Decode: ms a token at batch 1 (greedy, text-only prompt of ~280 tokens, `--tokens` new tokens), bfloat16
    engine and int8 engine loaded side by side, runs alternating; median and spread (min..max) of the rounds;
    also the time to first token (the prompt's prefill).
(c) Quality: KL(bf16 || int8) of next-token distributions at every position of a fixed set of prompts (teacher
    forcing through both models), mean and max, and how often the two models' top tokens agree.

Random weights: the speed is the architecture's; the KL of a random model is not the trained 2B's quality cost
(its logits are flatter), so (c) says how far int8 moves this model's distributions, not a trained one's.

Usage: python bench/quant.py --work-dir /tmp/bquant [--threads 2] [--rounds 5] [--tokens 32]
       [--json docs/benchmarks-quant.json]  (prints a Markdown report on stdout)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
REAL = REPO.parent / "shared" / "models" / "qwen3-vl-2b-instruct"
sys.path.insert(0, str(REPO / "src"))

# A ~280-token prompt (the llama.cpp comparison used a 280-token prefix).
LONG_PROMPT = " ".join([
    "A photograph shows a rocket standing on its launch pad at dawn, with the service tower beside it, vapour",
    "rising from the fuel lines, floodlights still on, a crowd of people behind a fence far away, and clouds low",
    "over the sea behind the pad.",
] * 6) + " Describe what is happening and what will happen next, step by step, in detail."
KL_PROMPTS = [
    "What is artificial intelligence?",
    "Write a short poem about the sea at night.",
    "Explain how a rocket reaches orbit.",
    "List three uses of a camera in science.",
    "Translate 'good morning' into French, German and Spanish.",
    "What is the capital of Australia, and why was it chosen?",
    "Summarize the plot of a detective story in two sentences.",
    "How does a refrigerator keep food cold?",
]


def timed(fn, runs: int) -> list[float]:
    """[best, median] milliseconds of `runs` calls: on a shared machine the best is the op's own cost, the median
    what it costs among the other processes."""
    fn()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return [round(min(samples) * 1000, 3), round(statistics.median(samples) * 1000, 3)]


def kernels(runs: int) -> dict:
    """Milliseconds of one projection per path and row count (2B shapes, bfloat16 activations)."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_

    from vlcache.quantize import Int8Linear

    out = {}
    for name, (n, k), rows_list in (("mlp 2048->6144", (6144, 2048), (1, 4, 8, 16, 32, 64, 280)),
                                    ("output 2048->151936", (151936, 2048), (1, 4))):
        torch.manual_seed(0)
        plain = torch.nn.Linear(k, n, bias=False).to(torch.bfloat16).eval()
        weight_only = torch.nn.Linear(k, n, bias=False).to(torch.bfloat16)
        weight_only.load_state_dict(plain.state_dict())
        dynamic = torch.nn.Linear(k, n, bias=False).to(torch.bfloat16)
        dynamic.load_state_dict(plain.state_dict())
        quantize_(weight_only, Int8WeightOnlyConfig(set_inductor_config=False))
        quantize_(dynamic, Int8DynamicActivationInt8WeightConfig(set_inductor_config=False))
        q, scale = weight_only.weight.qdata, weight_only.weight.scale.to(torch.bfloat16).reshape(-1)
        ours = Int8Linear(q, scale, None)
        for rows in rows_list:
            x = torch.randn(rows, k, dtype=torch.bfloat16)
            paths = {
                "bfloat16": lambda: plain(x),
                "int8 packed kernel": lambda: torch._weight_int8pack_mm(x, q, scale),
                "int8 converted + mm": lambda: torch.mm(x, q.t().to(torch.bfloat16)) * scale,
                "vlcache Int8Linear": lambda: ours(x),
                "torchao weight-only (eager)": lambda: weight_only(x),
                "torchao dynamic int8 (eager)": lambda: dynamic(x),
            }
            with torch.inference_mode():
                slow = rows >= 100 or n > 100_000  # prefill-sized or the output projection: fewer runs
                out[f"{name}, {rows} rows"] = {p: timed(fn, max(3, runs // 4) if slow else runs)
                                               for p, fn in paths.items()}
        del plain, weight_only, dynamic, ours
    return out


def build(work: Path) -> Path:
    from vlcache.testing import build_random_checkpoint

    folder = work / "qwen3-vl-2b"
    if not (folder / "config.json").exists():
        build_random_checkpoint(REAL / "config.json", folder)  # bfloat16, as the real checkpoint
    return folder


def decode(engines: dict, rounds: int, tokens: int) -> dict:
    """Alternating rounds of one greedy text-only answer per engine: ms a token and time to first token."""
    samples = {name: {"ms_per_token": [], "ttft_s": []} for name in engines}
    for engine in engines.values():  # warm-up: weights paged in, first-call allocations
        engine.ask(None, LONG_PROMPT, max_new_tokens=4, temperature=0)
    prompt_tokens = None
    for _ in range(rounds):
        for name, engine in engines.items():
            answer = engine.ask(None, LONG_PROMPT, max_new_tokens=tokens, temperature=0)
            steps = len(answer.token_ids) - 1
            samples[name]["ms_per_token"].append(answer.timings["decode_s"] / steps * 1000)
            samples[name]["ttft_s"].append(answer.timings["ttft_s"])
            print(f"  {name}: {samples[name]['ms_per_token'][-1]:.1f} ms a token, ttft {answer.timings['ttft_s']:.2f} s",
                  file=sys.stderr, flush=True)
            prompt_tokens = answer.prompt_tokens
    out = {}
    for name, s in samples.items():
        out[name] = {key: {"median": statistics.median(v), "min": min(v), "max": max(v), "runs": [round(x, 3) for x in v]}
                     for key, v in s.items()}
    out["prompt_tokens"] = prompt_tokens
    return out


def quality(plain, quantized) -> dict:
    """KL(bf16 || int8) in nats at every position of each prompt, and top-1 agreement."""
    from vlcache import prompt

    kls, agree, total = [], 0, 0
    per_prompt = []
    with torch.inference_mode():
        for text in KL_PROMPTS:
            ids = prompt.text_only_ids(plain.processor, None, text).to(plain.device)
            p = torch.log_softmax(plain.model(input_ids=ids).logits[0].float(), dim=-1)
            q = torch.log_softmax(quantized.model(input_ids=ids).logits[0].float(), dim=-1)
            kl = (p.exp() * (p - q)).sum(-1)  # one value a position
            kls.extend(kl.tolist())
            agree += int((p.argmax(-1) == q.argmax(-1)).sum())
            total += kl.numel()
            per_prompt.append({"prompt": text, "positions": kl.numel(), "mean_kl": kl.mean().item(), "max_kl": kl.max().item()})
    return {"positions": total, "mean_kl": statistics.fmean(kls), "max_kl": max(kls),
            "median_kl": statistics.median(kls), "top1_agreement": agree / total, "per_prompt": per_prompt}


def machine() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return platform.processor()
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    name, cpus = fields.get("Model name", "?").strip(), fields.get("CPU(s)", "?").strip()
    flags = fields.get("Flags", "")
    isa = "AVX-512 BF16" if "avx512_bf16" in flags else ("AVX-512" if "avx512f" in flags else "AVX2")
    return f"{cpus}-core {name} ({isa}), torch {torch.__version__}"


def markdown(r: dict) -> str:
    lines = [f"Machine: {r['machine']}; {r['threads']} torch threads; torchao {r['torchao']}.", ""]
    if r.get("kernels"):
        paths = list(next(iter(r["kernels"].values())))
        lines += ["### (a) One projection, ms: best / median of the runs", "", "| shape, rows | " + " | ".join(paths) + " |",
                  "| --- |" + " ---: |" * len(paths)]
        for shape, row in r["kernels"].items():
            lines.append(f"| {shape} | " + " | ".join(f"{row[p][0]:.2f} / {row[p][1]:.2f}" for p in paths) + " |")
        lines.append("")
    if r.get("decode"):
        d = r["decode"]
        lines += [f"### (b) Decode at batch 1, {r['tokens']} tokens after a {d['prompt_tokens']}-token prompt, "
                  f"{r['rounds']} alternating rounds", "",
                  "| model | ms a token, median (min..max) | time to first token s, median (min..max) |", "| --- | ---: | ---: |"]
        for name in ("bfloat16", "int8"):
            m, t = d[name]["ms_per_token"], d[name]["ttft_s"]
            lines.append(f"| {name} | {m['median']:.1f} ({m['min']:.1f}..{m['max']:.1f}) | "
                         f"{t['median']:.2f} ({t['min']:.2f}..{t['max']:.2f}) |")
        ratio = d["bfloat16"]["ms_per_token"]["median"] / d["int8"]["ms_per_token"]["median"]
        lines += ["", f"int8 decodes {ratio:.2f}x as fast as bfloat16 (medians).", ""]
    if r.get("quality"):
        q = r["quality"]
        lines += [f"### (c) KL(bf16 || int8) over {len(KL_PROMPTS)} prompts, {q['positions']} positions", "",
                  f"mean {q['mean_kl']:.5f} nats, median {q['median_kl']:.5f}, max {q['max_kl']:.5f}; "
                  f"top-1 token agreement {q['top1_agreement'] * 100:.1f}%", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--kernel-runs", type=int, default=20)
    parser.add_argument("--skip-kernels", action="store_true")
    parser.add_argument("--skip-2b", action="store_true")
    parser.add_argument("--skip-quality", action="store_true", help="(c) not measured")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    import torchao

    torch.set_num_threads(args.threads)
    results = {"machine": machine(), "threads": args.threads, "torchao": torchao.__version__, "rounds": args.rounds,
               "tokens": args.tokens, "command": "python bench/quant.py " + " ".join(argv or sys.argv[1:])}
    if not args.skip_kernels:
        results["kernels"] = kernels(args.kernel_runs)
        print(markdown(results), flush=True, file=sys.stderr)
    if not args.skip_2b:
        from vlcache import Engine

        folder = build(args.work_dir)
        engines = {"bfloat16": Engine.load(str(folder), device="cpu", dtype="bfloat16"),
                   "int8": Engine.load(str(folder), device="cpu", dtype="bfloat16", quantize="int8")}
        results["decode"] = decode(engines, args.rounds, args.tokens)
        print(markdown(results), flush=True, file=sys.stderr)
        if not args.skip_quality:
            results["quality"] = quality(engines["bfloat16"], engines["int8"])
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
