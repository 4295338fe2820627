"""Start-up and request-path pauses of `vlcache serve` with compiled decode steps (issues 28 item 3, 33 item 4).

(a) Start-up: `vlcache serve --compile auto` in a fresh $VLCACHE_HOME (first start: it listens with eager steps and
    decides and compiles in the background) and again in the same home (second start: the remembered decision and
    inductor's cached kernels, compiled before it listens). Seconds from the process's launch to /health answering
    and to the compiled steps (or the remembered eager ones) being in place; pairs repeated with fresh homes.
(b) A long answer (text prompt, end-of-sequence banned through logit_bias) with a question joining after 700
    tokens: the worst pause between two tokens of the long answer against their median, and the joined question's
    time to first token against the same question asked alone (solo before and after, alternating). Compiled
    steps (`--compile on`) and eager ones (`--compile off`) alternate.

The model: the thin stand-in of bench/decode.py (the 2B's config, 28 layers of hidden 64, real processor), float32.
Usage: python bench/compile_start.py --work-dir /tmp/bcompile [--json docs/benchmarks-compile.json]
Prints a Markdown report on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

LONG_PROMPT = "Write a very long story about a rocket, its crew and their journey."
JOIN_PROMPT = "What is a rocket?"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _health(url: str) -> dict | None:
    try:
        with urllib.request.urlopen(url + "/health", timeout=5) as response:
            return json.loads(response.read())
    except OSError:
        return None


class Server:
    def __init__(self, model: Path, home: Path, flags: list[str], log: Path):
        self.port = _port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "VLCACHE_HOME": str(home), "HF_HUB_OFFLINE": "1"}
        env.pop("VLCACHE_SERVER", None)
        self.log = open(log, "w")
        self.started = time.perf_counter()
        self.process = subprocess.Popen([sys.executable, "-m", "vlcache", "serve", "--model", str(model), "--port",
                                         str(self.port), "--no-web", "--cache-dir", str(home / "states"), *flags],
                                        stdout=self.log, stderr=self.log, env=env)

    def wait(self, ready, limit: float = 1800) -> tuple[float, dict]:
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited: see {self.log.name}")
            health = _health(self.url)
            if health is not None and ready(health):
                return time.perf_counter() - self.started, health
            if time.perf_counter() - self.started > limit:
                raise RuntimeError("the server did not get ready in time")
            time.sleep(0.1)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(60)
        self.log.close()


def start_pair(model: Path, work: Path, i: int, max_batch: int) -> dict:
    home = work / f"home-{i}"
    shutil.rmtree(home, ignore_errors=True)
    out = {}
    for name in ("first", "second"):
        server = Server(model, home, ["--compile", "auto", "--max-batch", str(max_batch)], work / f"start-{i}-{name}.log")
        try:
            listening, _ = server.wait(lambda h: True)
            decided, health = server.wait(lambda h: not h["decode"]["reason"].startswith("deciding"))
            out[name] = {"listening_s": round(listening, 2), "steps_ready_s": round(decided, 2),
                         "step": health["decode"]["step"], "reason": health["decode"]["reason"]}
        finally:
            server.stop()
    return out


def _stream(url: str, prompt: str, max_tokens: int, banned: dict, times: list, joined_at: threading.Event | None = None,
            join_after: int = 0) -> None:
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                       "temperature": 0, "stream": True, "logit_bias": banned}).encode()
    request = urllib.request.Request(url + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=1800) as response:
        for line in response:
            if not line.startswith(b"data: {"):
                continue
            choices = json.loads(line[6:]).get("choices") or [{}]
            if choices[0].get("delta", {}).get("content"):  # a piece of text (the first chunk is the role alone)
                times.append(time.perf_counter())
                if joined_at is not None and len(times) == join_after:
                    joined_at.set()


def ttft(url: str, prompt: str, banned: dict) -> float:
    times: list[float] = []
    started = time.perf_counter()
    _stream(url, prompt, 8, banned, times)
    return times[0] - started


def long_with_join(model: Path, work: Path, flags: list[str], banned: dict, long_tokens: int, join_after: int,
                   name: str) -> dict:
    home = work / "home-join"
    server = Server(model, home, flags + ["--max-context", "2048", "--max-batch", "2"], work / f"join-{name}.log")
    try:
        server.wait(lambda h: True)
        _, health = server.wait(lambda h: not h["decode"]["reason"].startswith("deciding"))
        solo_before = ttft(server.url, JOIN_PROMPT, banned)
        times: list[float] = []
        halfway = threading.Event()
        worker = threading.Thread(target=_stream, args=(server.url, LONG_PROMPT, long_tokens, banned, times, halfway,
                                                        join_after))
        worker.start()
        halfway.wait(1800)
        joined = ttft(server.url, JOIN_PROMPT, banned)
        worker.join()
        solo_after = ttft(server.url, JOIN_PROMPT, banned)
        gaps = [b - a for a, b in zip(times, times[1:])]
        median = statistics.median(gaps)
        end = _health(server.url)["decode"]
        solo = statistics.mean([solo_before, solo_after])
        return {"mode": name, "step": health["decode"]["step"], "pieces": len(times),
                "median_gap_ms": round(median * 1e3, 2), "worst_gap_ms": round(max(gaps) * 1e3, 2),
                "worst_over_median": round(max(gaps) / median, 2),
                "worst_gap_after_token": gaps.index(max(gaps)) + 1,
                "joined_ttft_s": round(joined, 3), "solo_ttft_s": [round(solo_before, 3), round(solo_after, 3)],
                "joined_over_solo": round(joined / solo, 2),
                "graphs_compiled_start_end": [health["decode"].get("graphs_compiled"), end.get("graphs_compiled")],
                "compiled_steps": end.get("compiled_steps"), "eager_steps_beyond_span": end.get("eager_steps_beyond_span")}
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--starts", type=int, default=2, help="first/second start pairs")
    parser.add_argument("--start-max-batch", type=int, default=4, help="--max-batch of the start-up servers")
    parser.add_argument("--joins", type=int, default=2, help="rounds of (compiled, eager) long answers")
    parser.add_argument("--modes", nargs="+", default=["compiled", "eager"], help="which servers the joins run")
    parser.add_argument("--long-tokens", type=int, default=1000)
    parser.add_argument("--join-after", type=int, default=700)
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    from decode import build_thin  # bench/decode.py

    model = build_thin(args.work_dir / "thin")
    config = json.loads((model / "generation_config.json").read_text()) if (model / "generation_config.json").exists() else {}
    eos = config.get("eos_token_id", [])
    banned = {str(t): -100 for t in (eos if isinstance(eos, list) else [eos])}
    result = {"machine": _machine(), "model": "thin stand-in of bench/decode.py (Qwen3-VL-2B config, hidden 64), float32",
              "command": " ".join(["python", "bench/compile_start.py", *sys.argv[1:]]), "starts": [], "joins": []}
    for i in range(args.joins):  # first: a long first start would otherwise leave no result
        order = [(name, flags) for name, flags in (("compiled", ["--compile", "on"]), ("eager", ["--compile", "off"]))
                 if name in args.modes]
        for name, flags in (order if i % 2 == 0 else order[::-1]):
            result["joins"].append(long_with_join(model, args.work_dir, flags, banned, args.long_tokens,
                                                  args.join_after, name))
            print(json.dumps(result["joins"][-1]), file=sys.stderr)
    for i in range(args.starts):
        result["starts"].append(start_pair(model, args.work_dir, i, args.start_max_batch))
        print(json.dumps(result["starts"][-1]), file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


def _machine() -> str:
    import platform

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return f"{model}, {os.cpu_count()} cores, shared with other work (load average {os.getloadavg()[0]:.1f} at start)"


if __name__ == "__main__":
    main()
