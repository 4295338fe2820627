#!/usr/bin/env python3
"""vlcache against llama.cpp on this CPU, side by side and alternating (issue 33's "Measure").

llama.cpp is built from its source release on PyPI (llama-cpp-python's sdist vendors it with
convert_hf_to_gguf.py and its gguf-py): CPU only, -DLLAMA_CURL=OFF, once, into --cache (later runs reuse it).
The same random-weight Qwen3-VL-2B (the real 2B's config, seed 0, bench/*.py's build_random_checkpoint) is
written once as safetensors (bfloat16) for vlcache and converted to GGUF BF16 and Q8_0, with the vision
tower's mmproj, for llama.cpp. Both tools run as their own OpenAI-compatible servers with 2 threads, one
request at a time, the tools alternating in every round:

- decode: ms a token at batch 1 over 64 tokens (streamed; the first token's time excluded), a cached image;
  vlcache bf16 vs llama.cpp BF16, and vlcache `--quantize int8` vs Q8_0 where the tree has that flag;
- warm server, time to first token: a new question about an image already asked about (cached), and a new
  image (vision encoder + prefill);
- fresh process, cached: `vlcache ask --cache FILE` vs llama-server start + slot restore + one question;
- start-up: process start until /health answers.

Usage: python bench/peer_llamacpp.py [--cache DIR] [--rounds 3] [--json docs/benchmarks-peer.json]
Prints a Markdown report on stdout. Never part of the test suite (it builds llama.cpp and loads a 2B twice).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
REAL = SHARED / "models" / "qwen3-vl-2b-instruct"
SYSTEM = "You are a helpful AI assistant analyzing an image."
PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "camera.png", "hubble_deep_field.jpg"]
QUESTIONS = ["What objects are visible in this image?", "What colors dominate the scene?", "Describe the lighting and mood.",
             "Is it day or night?", "How many people are there?", "What is written on the sign?",
             "Describe this image in one sentence.", "Tell me more about the picture, please."]
DECODE_TOKENS = 64
THREADS = 2
BINARIES = ("llama-server", "llama-quantize")
sys.path.insert(0, str(Path(__file__).parent))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "vlcache-bench" / "llamacpp",
                        help="where the llama.cpp build, the checkpoint and the GGUF files are kept between runs")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (each tool once a round)")
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--vlcache-arg", action="append", default=[], metavar="ARG",
                        help="one more argument for `vlcache serve` (repeatable), e.g. --vlcache-arg=--compile=off")
    parser.add_argument("--llama-arg", action="append", default=[], metavar="ARG",
                        help="one more argument for llama-server (repeatable), e.g. --llama-arg=--poll=0")
    parser.add_argument("--skip-int8", action="store_true", help="leave out vlcache --quantize int8 vs Q8_0")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.threads < 1:
        parser.error("--rounds and --threads take a positive number")
    return args


# -- building ----------------------------------------------------------------------------------------------------

def run(cmd: list, log: Path, **kwargs) -> None:
    with open(log, "a") as fh:
        fh.write("$ " + " ".join(map(str, cmd)) + "\n")
        fh.flush()
        done = subprocess.run([str(c) for c in cmd], stdout=fh, stderr=subprocess.STDOUT, **kwargs)
    if done.returncode:
        raise SystemExit(f"error: {' '.join(map(str, cmd[:3]))} failed (exit {done.returncode}); see {log}")


def llamacpp_source(cache: Path) -> Path:
    """llama.cpp's source as vendored by llama-cpp-python's sdist (downloaded once)."""
    tarballs = sorted(cache.glob("llama_cpp_python-*.tar.gz"))
    if not tarballs:
        run([sys.executable, "-m", "pip", "download", "llama-cpp-python", "--no-binary", ":all:", "--no-deps", "-d", cache],
            cache / "build.log")
        tarballs = sorted(cache.glob("llama_cpp_python-*.tar.gz"))
    tarball = tarballs[-1]
    root = cache / tarball.name.removesuffix(".tar.gz")
    if not root.exists():
        with tarfile.open(tarball) as tar:
            tar.extractall(cache, filter="data")
    return root / "vendor" / "llama.cpp"


def build_llamacpp(cache: Path) -> tuple[Path, Path, str]:
    """(binaries folder, source folder, version): built once, CPU only, without curl."""
    source = llamacpp_source(cache)
    build = cache / "build"
    bin_dir = build / "bin"
    if not all((bin_dir / name).exists() for name in BINARIES):
        run(["cmake", "-S", source, "-B", build, "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DGGML_NATIVE=ON",
             "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF"], cache / "build.log")
        run(["cmake", "--build", build, "-j", str(os.cpu_count() or 2), "--target", *BINARIES], cache / "build.log")
    return bin_dir, source, source.parent.parent.name


def checkpoint(cache: Path) -> Path:
    from vlcache.testing import build_random_checkpoint

    folder = cache / "qwen3-vl-2b-random"
    if not (folder / "model.safetensors").exists():
        build_random_checkpoint(REAL / "config.json", folder, seed=0)
    return folder


def gguf_files(cache: Path, folder: Path, source: Path, bin_dir: Path) -> dict:
    """BF16 and Q8_0 GGUF of the text model, and the vision tower's mmproj (BF16), converted once."""
    out = {"bf16": cache / "gguf-bf16.gguf", "q8_0": cache / "gguf-q8_0.gguf", "mmproj": cache / "mmproj-bf16.gguf"}
    convert = source / "convert_hf_to_gguf.py"  # with the gguf-py it vendors (PyPI's gguf 0.19.0 lacks names it uses)
    deps = cache / "pydeps"  # the converter's one dependency vlcache's environment lacks, kept out of it
    if not (deps / "sentencepiece").exists():
        run([sys.executable, "-m", "pip", "install", "--target", deps, "--no-deps", "sentencepiece>=0.2,<0.3"], cache / "build.log")
    env = {**os.environ, "PYTHONPATH": str(deps)}
    if not out["bf16"].exists():
        run([sys.executable, convert, folder, "--outtype", "bf16", "--outfile", out["bf16"]], cache / "convert.log", env=env)
    if not out["mmproj"].exists():
        run([sys.executable, convert, folder, "--outtype", "bf16", "--mmproj", "--outfile", out["mmproj"]], cache / "convert.log",
            env=env)
    if not out["q8_0"].exists():
        run([bin_dir / "llama-quantize", out["bf16"], out["q8_0"], "Q8_0"], cache / "convert.log")
    return out


# -- servers and requests ------------------------------------------------------------------------------------------

class Server:
    """A server subprocess on a free loopback port; `started_s`: until /health answered (200)."""

    def __init__(self, cmd: list, env: dict, log: Path):
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.cmd = [str(part).replace("{port}", str(self.port)) for part in cmd]
        self.env, self.log, self.url = env, log, f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self.fh = open(self.log, "a")
        self.fh.write("$ " + " ".join(self.cmd) + "\n")
        self.fh.flush()
        start = time.perf_counter()
        self.process = subprocess.Popen(self.cmd, env=self.env, stdout=self.fh, stderr=subprocess.STDOUT)
        while True:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                if self.process.poll() is not None or time.perf_counter() - start > 1800:
                    self.stop()
                    raise SystemExit(f"error: {self.cmd[0]} did not start; see {self.log}")
                time.sleep(0.1)
        self.started_s = time.perf_counter() - start
        return self

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.fh.close()

    def __exit__(self, *exc):
        self.stop()


def _image_url(image: Path) -> str:
    kind = "jpeg" if image.suffix.lower() in (".jpg", ".jpeg") else "png"
    return f"data:image/{kind};base64," + base64.b64encode(image.read_bytes()).decode()


def ask(url: str, image: Path, question: str, max_tokens: int, extra: dict | None = None) -> dict:
    """One streamed chat request: seconds to the first content, to the end, and the tokens generated."""
    body = {"model": "m", "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": _image_url(image)}},
                                             {"type": "text", "text": question}]}], **(extra or {})}
    request = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    first = None
    tokens = None
    with urllib.request.urlopen(request, timeout=1800) as response:
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if chunk.get("usage"):
                tokens = chunk["usage"].get("completion_tokens")
            for choice in chunk.get("choices") or []:
                delta = choice.get("delta") or {}
                if first is None and (delta.get("content") or delta.get("reasoning_content")):
                    first = time.perf_counter() - start
    end = time.perf_counter() - start
    return {"first_s": first if first is not None else end, "total_s": end, "tokens": tokens}


class Tool:
    """One side of the comparison: how to start its server, what its requests add."""

    def __init__(self, name: str, cmd: list, env: dict, log: Path, extra: dict | None = None):
        self.name, self.cmd, self.env, self.log, self.extra = name, cmd, env, log, extra or {}

    def ask(self, server: Server, image: Path, question: str, max_tokens: int) -> dict:
        return ask(server.url, image, question, max_tokens, self.extra)


def warm_round(tool: Tool, server: Server, image: Path, k: int) -> dict:
    """One round on a running server: a new image (first token), then a new question about it (first token),
    then a 1+64-token answer about it (decode ms a token)."""
    new = tool.ask(server, image, QUESTIONS[k % len(QUESTIONS)], 1)
    cached = tool.ask(server, image, QUESTIONS[(k + 1) % len(QUESTIONS)], 1)
    long = tool.ask(server, image, QUESTIONS[(k + 2) % len(QUESTIONS)], DECODE_TOKENS + 1)
    tokens = long["tokens"] or 0
    per_token = (long["total_s"] - long["first_s"]) / (tokens - 1) if tokens > 1 else None
    return {"new_image_ttft_s": new["first_s"], "cached_ttft_s": cached["first_s"], "decode_ms": per_token and per_token * 1e3,
            "decode_tokens": tokens}


def vlcache_cmd(model: Path, cache_dir: Path, threads: int, quantize: str | None, extra: list[str]) -> list:
    cmd = [sys.executable, "-m", "vlcache", "serve", "--model", model, "--port", "{port}", "--cache-dir", cache_dir,
           "--device", "cpu", "--no-web", *extra]
    if has_flag("--threads"):
        cmd += ["--threads", str(threads)]
    if quantize:
        cmd += ["--quantize", quantize]
    return cmd


def has_flag(flag: str) -> bool:
    """Whether this tree's `vlcache serve` takes `flag` (--quantize and --threads arrive with issue 33)."""
    done = subprocess.run([sys.executable, "-m", "vlcache", "serve", "--help"], capture_output=True, text=True, env=_env(2))
    return flag in done.stdout


def _env(threads: int) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": str(threads)}


def llama_cmd(bin_dir: Path, gguf: Path, mmproj: Path, threads: int, slots: Path | None = None,
              extra: tuple = ()) -> list:
    cmd = [bin_dir / "llama-server", "-m", gguf, "--mmproj", mmproj, "-t", str(threads), "-tb", str(threads),
           "--host", "127.0.0.1", "--port", "{port}", "-c", "4096", "-np", "1", "--no-webui"]
    for arg in extra:  # llama-server takes "--poll 0", not "--poll=0"
        cmd += arg.split("=", 1) if arg.startswith("--") else [arg]
    if slots:
        cmd += ["--slot-save-path", slots]
    return cmd


def compare_warm(pairs: list[tuple[Tool, Tool]], rounds: int) -> dict:
    """For each (vlcache, llama.cpp) pair: both servers up (start-up timed), then rounds alternating between them."""
    out = {}
    for mine, theirs in pairs:
        key = f"{mine.name} vs {theirs.name}"
        samples = {mine.name: [], theirs.name: []}
        started = {}
        with Server(mine.cmd, mine.env, mine.log) as a, Server(theirs.cmd, theirs.env, theirs.log) as b:
            started = {mine.name: a.started_s, theirs.name: b.started_s}
            for tool, server in ((mine, a), (theirs, b)):  # untimed: pages in weights, compiles what is compiled lazily
                tool.ask(server, SHARED / "images" / PHOTOS[-1], QUESTIONS[0], 2)
            for k in range(rounds):
                image = SHARED / "images" / PHOTOS[k % (len(PHOTOS) - 1)]
                order = ((mine, a), (theirs, b)) if k % 2 == 0 else ((theirs, b), (mine, a))
                for tool, server in order:
                    samples[tool.name].append(warm_round(tool, server, image, k))
        out[key] = {"start_s": started, "rounds": samples}
    return out


def fresh_cached(bin_dir: Path, files: dict, model: Path, cache: Path, threads: int, rounds: int, extra: list[str],
                 llama_extra: list[str]) -> dict:
    """A fresh process answering about an image cached before: `vlcache ask --cache` against llama-server
    start + slot restore + the same kind of question (one token each)."""
    env = _env(threads)
    image = SHARED / "images" / PHOTOS[0]
    state = cache / "state-astronaut.pt"
    slots = cache / "slots"
    slots.mkdir(exist_ok=True)
    log = cache / "fresh.log"
    run([sys.executable, "-m", "vlcache", "cache", image, "--output", state, "--model", model, "--device", "cpu"], log, env=env)
    llama = llama_cmd(bin_dir, files["bf16"], files["mmproj"], threads, slots, llama_extra)
    errors = {}
    try:
        with Server(llama, env, log) as server:  # the slot's state after one question about the image, saved once
            ask(server.url, image, QUESTIONS[0], 1)
            _post(server.url + "/slots/0?action=save", {"filename": "astronaut.bin"})
    except (OSError, SystemExit) as exc:
        errors["llama-server slot save"] = str(exc)[:200]
    times = {"vlcache ask --cache": [], "llama-server start + slot restore + ask": []}
    for k in range(rounds):
        question = QUESTIONS[(k + 1) % len(QUESTIONS)]
        start = time.perf_counter()
        run([sys.executable, "-m", "vlcache", "ask", "--cache", state, "--prompt", question, "--max-new-tokens", "1",
             "--model", model, "--device", "cpu", *[a for a in extra if a.startswith("--compile")]], log, env=env)
        times["vlcache ask --cache"].append(time.perf_counter() - start)
        start = time.perf_counter()
        try:
            with Server(llama, env, log) as server:
                _post(server.url + "/slots/0?action=restore", {"filename": "astronaut.bin"})
                ask(server.url, image, question, 1)
            times["llama-server start + slot restore + ask"].append(time.perf_counter() - start)
        except (OSError, SystemExit) as exc:
            errors["llama-server start + slot restore + ask"] = str(exc)[:200]
    return {"seconds": times, "errors": errors}


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())


# -- report --------------------------------------------------------------------------------------------------------

def spread(values: list) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def summarize(results: dict) -> list[dict]:
    """Rows of (measure, vlcache, llama.cpp, ratio of medians, target)."""
    rows = []
    for key, pair in results["warm"].items():
        mine, theirs = key.split(" vs ")
        for field, label, target in (("decode_ms", f"decode ms a token, batch 1, {DECODE_TOKENS} tokens", 1.0),
                                     ("cached_ttft_s", "warm server, new question about a cached image, first token (s)", 1.0),
                                     ("new_image_ttft_s", "warm server, new image, first token (s)", None)):
            a = spread([r[field] for r in pair["rounds"][mine]])
            b = spread([r[field] for r in pair["rounds"][theirs]])
            rows.append({"pair": key, "measure": label, "vlcache": a, "llama.cpp": b, "target": target,
                         "ratio": a["median"] / b["median"] if a and b else None})
        rows.append({"pair": key, "measure": "server start, until /health answers (s)", "target": 30.0, "absolute": True,
                     "vlcache": spread([pair["start_s"][mine]]), "llama.cpp": spread([pair["start_s"][theirs]]),
                     "ratio": pair["start_s"][mine] / pair["start_s"][theirs]})
    fresh = results.get("fresh")
    if fresh:
        a, b = (spread(v) for v in fresh["seconds"].values())
        rows.append({"pair": "fresh process", "measure": "fresh process, cached image, one-token answer (s)", "vlcache": a,
                     "llama.cpp": b, "target": None, "ratio": a["median"] / b["median"] if a and b else None})
    return rows


def markdown(results: dict) -> str:
    def cell(s, digits=3):
        return "n/a" if not s else f"{s['median']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f}, n={s['n']})"

    m = results["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, native bfloat16: {m.get('native_bf16') or 'none'}; torch {m['torch']}; "
             f"llama.cpp from {results['llamacpp']} (CPU, {results['threads']} threads). Command: `{results['command']}`. "
             "Cells: median (min-max, runs); the tools alternate within each round. No GPU in this run.", "",
             "| pair | measure | vlcache | llama.cpp | vlcache / llama.cpp | target |", "| --- | --- | --- | --- | --- | --- |"]
    for row in results["summary"]:
        digits = 1 if row["measure"].startswith("decode") else 3
        ratio = "n/a" if row["ratio"] is None else f"{row['ratio']:.2f}"
        if row.get("absolute"):
            target = f"vlcache <= {row['target']:.0f} s: {'met' if row['vlcache']['median'] <= row['target'] else 'missed'}"
        elif row["target"] is None or row["ratio"] is None:
            target = ""
        else:
            target = f"<= {row['target']:.1f}x: {'met' if row['ratio'] <= row['target'] else 'missed'}"
        lines.append(f"| {row['pair']} | {row['measure']} | {cell(row['vlcache'], digits)} | {cell(row['llama.cpp'], digits)} | "
                     f"{ratio} | {target} |")
    for note in results.get("notes", []):
        lines += ["", note]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    from dtype import cpu_facts  # bench/dtype.py: one place for what the CPU is

    args.cache.mkdir(parents=True, exist_ok=True)
    if not shutil.which("cmake"):
        raise SystemExit("error: cmake is needed to build llama.cpp")
    bin_dir, source, version = build_llamacpp(args.cache)
    model = checkpoint(args.cache)
    files = gguf_files(args.cache, model, source, bin_dir)
    env = _env(args.threads)
    log = args.cache / "servers.log"
    notes = []
    states = args.cache / "states"
    shutil.rmtree(states, ignore_errors=True)
    pairs = [(Tool("vlcache bf16", vlcache_cmd(model, states / "bf16", args.threads, None, args.vlcache_arg), env, log),
              Tool("llama.cpp BF16", llama_cmd(bin_dir, files["bf16"], files["mmproj"], args.threads, extra=args.llama_arg), env, log,
                   {"ignore_eos": True}))]
    if args.skip_int8:
        notes.append("vlcache int8 vs Q8_0: left out (--skip-int8).")
    elif not has_flag("--quantize"):
        notes.append("vlcache int8 vs Q8_0: not measured, this tree's `vlcache serve` has no --quantize flag.")
    else:
        pairs.append((Tool("vlcache int8", vlcache_cmd(model, states / "int8", args.threads, "int8", args.vlcache_arg), env, log),
                      Tool("llama.cpp Q8_0", llama_cmd(bin_dir, files["q8_0"], files["mmproj"], args.threads, extra=args.llama_arg), env, log,
                           {"ignore_eos": True})))
    if not has_flag("--threads"):
        notes.append(f"This tree's vlcache has no --threads flag: its servers ran with OMP_NUM_THREADS={args.threads} "
                     "(torch's default on this machine is the same).")
    results = {"machine": cpu_facts(), "command": "python bench/peer_llamacpp.py " + " ".join(argv or sys.argv[1:]),
               "llamacpp": version, "threads": args.threads, "rounds": args.rounds}
    results["warm"] = compare_warm(pairs, args.rounds)
    if args.json:  # what is measured so far, should the rest not finish
        args.json.write_text(json.dumps(results, indent=1, default=str))
    results["fresh"] = fresh_cached(bin_dir, files, model, args.cache, args.threads, args.rounds, args.vlcache_arg, args.llama_arg)
    if results["fresh"]["errors"]:
        notes += [f"{name}: {error}" for name, error in results["fresh"]["errors"].items()]
    results["notes"] = notes
    results["summary"] = summarize(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
