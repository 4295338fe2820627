#!/usr/bin/env python3
"""Open-loop load test against `vlcache serve`: Poisson arrivals, a mix of 4 photographs, answers of 16 to 256
tokens; throughput, time to first token and time per output token at several arrival rates.

    python bench/load.py --label after                                # this checkout's server
    python bench/load.py --label before --src /tmp/vlcache-before/src # another checkout (git worktree) to compare
    python bench/load.py --config small --out-dir /tmp/x              # tiny model, seconds (used by the tests)

Full config: the Qwen3-VL-2B architecture with random weights and the real processor (images keep their real
token counts; random weights rarely stop early, so answers run to max_tokens). Every request streams; the
image states are computed before the clock starts (a warm server), so the figures are about scheduling.
Arrival times and requests come from a fixed seed: every label gets the same workload. Results are merged
into docs/benchmarks-load.json by label and docs/benchmarks-load.md is written from all labels present.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from run import REPO, SHARED, SYSTEM, QUESTIONS, _Process, machine

PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg"]
CONFIGS = {
    "full": {"rates": [0.05, 0.1, 0.2], "duration": 90.0, "tokens": (16, 256), "drain": 600.0},
    "small": {"rates": [4.0], "duration": 2.0, "tokens": (2, 12), "drain": 60.0},
}


def data_url(path: Path) -> str:
    kind = "jpeg" if path.suffix == ".jpg" else "png"
    return f"data:image/{kind};base64," + base64.b64encode(path.read_bytes()).decode()


def workload(rate: float, duration: float, tokens: tuple[int, int], seed: int) -> list[dict]:
    rng = random.Random(seed)
    at, out = 0.0, []
    while True:
        at += rng.expovariate(rate)
        if at > duration:
            return out
        out.append({"at": at, "photo": rng.choice(PHOTOS), "question": rng.choice(QUESTIONS),
                    "max_tokens": rng.randint(*tokens)})


def one_request(client, urls: dict, request: dict, start: float, record: dict) -> None:
    from openai import OpenAIError

    delay = start + request["at"] - time.perf_counter()
    if delay > 0:
        time.sleep(delay)
    sent = time.perf_counter()
    messages = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": urls[request["photo"]]}},
                                             {"type": "text", "text": request["question"]}]}]
    first = usage = None
    try:
        stream = client.chat.completions.create(model="m", messages=messages, max_tokens=request["max_tokens"], temperature=0,
                                                stream=True, stream_options={"include_usage": True})
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content and first is None:
                first = time.perf_counter()
            if chunk.usage is not None:
                usage = chunk.usage
    except OpenAIError as exc:
        record.update(error=f"{type(exc).__name__}: {exc}")
        return
    end = time.perf_counter()
    tokens = usage.completion_tokens if usage else 0
    record.update(sent=sent - start, ttft=(first or end) - sent, end=end - start, tokens=tokens,
                  tpot=(end - first) / (tokens - 1) if first and tokens > 1 else None)


def run_rate(url: str, rate: float, config: dict, seed: int) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=3600)
    urls = {name: data_url(SHARED / "images" / name) for name in PHOTOS}
    requests = workload(rate, config["duration"], config["tokens"], seed)
    records = [{} for _ in requests]
    start = time.perf_counter()
    threads = [threading.Thread(target=one_request, args=(client, urls, r, start, rec), daemon=True)
               for r, rec in zip(requests, records)]
    for thread in threads:
        thread.start()
    deadline = time.perf_counter() + config["duration"] + config["drain"]
    for thread in threads:
        thread.join(timeout=max(0.0, deadline - time.perf_counter()))
    done = [r for r in records if "end" in r]
    failed = [r["error"] for r in records if "error" in r]
    unfinished = len(records) - len(done) - len(failed)
    tokens = sum(r["tokens"] for r in done)
    span = max((r["end"] for r in done), default=0.0)
    return {
        "rate": rate, "requests": len(requests), "completed": len(done), "failed": len(failed), "unfinished": unfinished,
        "errors": failed[:3], "output_tokens": tokens, "span_s": span,
        "throughput_tok_s": tokens / span if span else 0.0,
        "ttft_s": _percentiles([r["ttft"] for r in done]),
        "tpot_s": _percentiles([r["tpot"] for r in done if r["tpot"] is not None]),
        "records": records,
    }


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p95": None}
    ordered = sorted(values)
    return {"p50": statistics.median(ordered), "p95": ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]}


def warm(url: str) -> None:
    """Compute the four image states before the clock starts."""
    import urllib.request

    for name in PHOTOS:
        body = json.dumps({"image": data_url(SHARED / "images" / name), "system_prompt": SYSTEM}).encode()
        request = urllib.request.Request(url + "/v1/images", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=3600) as response:
            json.loads(response.read())


def model_dir(config: str, work: Path) -> Path:
    from vlcache.testing import build_random_checkpoint, build_tiny_checkpoint

    folder = work / ("qwen3-vl-2b-random" if config == "full" else "tiny-qwen3-vl")
    if not (folder / "model.safetensors").exists():
        print(f"building {folder} ...", file=sys.stderr)
        if config == "full":
            build_random_checkpoint(SHARED / "models" / "qwen3-vl-2b-instruct" / "config.json", folder)
        else:
            build_tiny_checkpoint(folder)
    return folder


def report(results: dict) -> str:
    labels = list(results["labels"])
    any_label = results["labels"][labels[0]]
    m = any_label["machine"]
    lines = [
        "# Open-loop load test of `vlcache serve`",
        "",
        "Commands: " + "; ".join(f"`{results['labels'][label]['command']}` ({label})" for label in labels)
        + " (a label with `--src` ran that checkout's server, e.g. a git worktree of an earlier commit).",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, CPU capability {m['cpu_capability']}, native bf16: {m['native_bf16']}; "
        f"torch {m['torch']}, transformers {m['transformers']}. Model: {any_label['model']} (random weights, "
        f"{any_label['dtype']}), server `--max-batch 16`. Poisson arrivals for {any_label['duration']:.0f} s per rate, "
        f"4 photographs with their states already computed, answers of {any_label['tokens'][0]}-{any_label['tokens'][1]} "
        "tokens (uniform), every request streamed. TTFT: request sent to first content; TPOT: time per output "
        "token after the first, per request. Throughput: output tokens / (first arrival to last answer).",
        "",
        "| label | rate (req/s) | requests | done | throughput (tok/s) | TTFT p50 | TTFT p95 | TPOT p50 | TPOT p95 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label in labels:
        for row in results["labels"][label]["rates"]:
            lines.append(
                f"| {label} | {row['rate']:g} | {row['requests']} | {row['completed']} | {row['throughput_tok_s']:.2f} | "
                f"{_s(row['ttft_s']['p50'])} | {_s(row['ttft_s']['p95'])} | {_s(row['tpot_s']['p50'])} | {_s(row['tpot_s']['p95'])} |")
    return "\n".join(lines) + "\n"


def _checkpoint_dtype(model: Path):
    import torch

    name = json.loads((model / "config.json").read_text()).get("dtype") or "float32"
    return getattr(torch, name, torch.float32)


def _s(value) -> str:
    return "-" if value is None else f"{value:.2f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="full")
    parser.add_argument("--label", default="after")
    parser.add_argument("--src", default=str(REPO / "src"), help="the vlcache source folder whose server to run")
    parser.add_argument("--rates", type=float, nargs="+", help="arrival rates, requests a second")
    parser.add_argument("--duration", type=float, help="seconds of arrivals per rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default=str(REPO / "docs"))
    parser.add_argument("--work-dir", default=str(Path.home() / ".cache" / "vlcache-bench"))
    parser.add_argument("--report-only", action="store_true", help="rewrite the .md from the .json and stop")
    args = parser.parse_args()
    if args.report_only:
        out = Path(args.out_dir)
        (out / "benchmarks-load.md").write_text(report(json.loads((out / "benchmarks-load.json").read_text())))
        return
    config = dict(CONFIGS[args.config])
    config["rates"] = args.rates or config["rates"]
    config["duration"] = args.duration or config["duration"]
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    model = model_dir(args.config, work)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": args.src}
    rates = []
    with tempfile.TemporaryDirectory() as states:
        cmd = [sys.executable, "-m", "vlcache", "serve", "--model", str(model), "--port", "{port}", "--cache-dir", states,
               "--max-batch", "16"]
        with _Process(cmd, env) as server:
            warm(server.url)
            for i, rate in enumerate(config["rates"]):
                print(f"{args.label}: {rate:g} requests/s for {config['duration']:g} s ...", file=sys.stderr)
                row = run_rate(server.url, rate, config, args.seed + i)
                print(f"  {row['completed']}/{row['requests']} done, {row['throughput_tok_s']:.2f} tok/s, "
                      f"TTFT p50 {_s(row['ttft_s']['p50'])} p95 {_s(row['ttft_s']['p95'])}", file=sys.stderr)
                rates.append(row)
    import torch

    from vlcache.model import choose_dtype

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "benchmarks-load.json"
    results = json.loads(path.read_text()) if path.exists() else {"labels": {}}
    results["labels"][args.label] = {
        "command": "python bench/load.py " + " ".join(sys.argv[1:]), "machine": machine(), "model": model.name,
        "dtype": str(choose_dtype(torch.device("cpu"), _checkpoint_dtype(model))[0]).removeprefix("torch."),
        "duration": config["duration"], "tokens": list(config["tokens"]), "rates": rates,
    }
    path.write_text(json.dumps(results, indent=1) + "\n")
    (out / "benchmarks-load.md").write_text(report(results))
    print(f"wrote {path} and {out / 'benchmarks-load.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
