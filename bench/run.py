#!/usr/bin/env python3
"""vlcache benchmarks: every speed and size figure side by side with the uncached path, in one run.

    python bench/run.py                  # full size: Qwen3-VL-2B architecture, random weights (tens of minutes on a CPU)
    python bench/run.py --config small   # the tiny test model: checks that everything runs (used by the tests)

Writes docs/benchmarks.md (tables), docs/benchmarks.json (raw numbers) and docs/ttft.png (unless --out-dir).
Each figure is the median of --runs runs (at least 3 for the full config) with min and max.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
QUESTION = "What colors dominate the scene?"
QUESTIONS = [
    "What objects are visible in this image?", "What colors dominate the scene?", "Describe the lighting and mood.",
    "Is it day or night?", "How many people are there?", "What is written on the sign?",
    "Describe this image in one sentence.", "Tell me more about the picture, please.",
]
SYSTEM = "You are a helpful AI assistant analyzing an image."
PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "camera.png", "hubble_deep_field.jpg"]


def stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": len(values)}


def fmt(s: dict, unit: str = "s", digits: int = 3) -> str:
    return f"{s['median']:.{digits}f} {unit} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def ratio(a: dict, b: dict) -> float:
    return a["median"] / b["median"]


class Bench:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out_dir)
        self.work = Path(args.work_dir)
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src")}

    # -- plumbing --------------------------------------------------------------------------------------------

    def measure(self, kind: str, **kwargs) -> dict:
        cmd = [sys.executable, str(REPO / "bench" / "measure.py"), kind, json.dumps(kwargs)]
        done = subprocess.run(cmd, capture_output=True, text=True, env=self.env)
        if done.returncode != 0:
            raise SystemExit(f"error: bench worker {kind} failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    def cli(self, *args: str) -> tuple[float, int, str]:
        """Run the vlcache CLI in a fresh process: wall seconds, peak RSS bytes, stdout."""
        cmd = ["/usr/bin/time", "-f", "%e %M", sys.executable, "-m", "vlcache", *args]
        done = subprocess.run(cmd, capture_output=True, text=True, env=self.env)
        if done.returncode != 0:
            raise SystemExit(f"error: {' '.join(args[:2])} failed:\n{done.stderr[-3000:]}")
        wall, rss_kb = done.stderr.strip().splitlines()[-1].split()
        return float(wall), int(rss_kb) * 1024, done.stdout

    def model_dir(self) -> Path:
        from vlcache.testing import build_random_checkpoint, build_tiny_checkpoint

        folder = self.work / ("qwen3-vl-2b-random" if self.args.config == "full" else "tiny-qwen3-vl")
        if not (folder / "model.safetensors").exists():
            print(f"building {folder} ...", file=sys.stderr)
            if self.args.config == "full":
                build_random_checkpoint(SHARED / "models" / "qwen3-vl-2b-instruct" / "config.json", folder)
            else:
                build_tiny_checkpoint(folder)
        return folder

    def images(self) -> list[Path]:
        """Photographs of about 256, 840 and 1,600 image tokens (the largest an upscaled photograph)."""
        from PIL import Image

        big = self.work / "hubble_deep_field_x1.37.png"
        if not big.exists():
            with Image.open(SHARED / "images" / "hubble_deep_field.jpg") as img:
                img.convert("RGB").resize((1376, 1198), Image.LANCZOS).save(big)
        chosen = [SHARED / "images" / "astronaut.png", SHARED / "images" / "hubble_deep_field.jpg", big]
        return chosen if self.args.config == "full" else chosen[:2]

    # -- sections --------------------------------------------------------------------------------------------

    def run(self) -> dict:
        model = str(self.model_dir())
        runs = self.args.runs
        results = {"machine": machine(), "config": self.args.config, "runs": runs,
                   "command": "python bench/run.py " + " ".join(sys.argv[1:])}
        print("1/6 warm time to first token, cache size and load time ...", file=sys.stderr)
        warm = self.measure("warm", model=model, device=self.args.device, images=[str(p) for p in self.images()],
                            question=QUESTION, runs=runs, out_dir=str(self.work), system_prompt=SYSTEM)
        results["warm"] = warm
        print("2/6 model load ...", file=sys.stderr)
        loads = [self.measure("model_load", model=model) for _ in range(runs)]
        weights = [p for p in Path(model).iterdir() if p.suffix == ".safetensors"]
        cat = [timed_cat(weights) for _ in range(runs)]
        results["model_load"] = {k: stats([l[k] for l in loads]) for k in loads[0]}
        results["model_load"]["cat_weights_s"] = stats(cat)
        results["model_load"]["weights_bytes"] = sum(p.stat().st_size for p in weights)
        print("3/6 fresh process per prompt (the guide's flow) ...", file=sys.stderr)
        results["fresh"] = self.fresh_process(model, warm["images"][1], runs)
        print("4/6 many questions: batch vs one by one ...", file=sys.stderr)
        results["many"] = self.many_questions(model, warm["images"][1]["cache_path"], runs)
        print("5/6 caching the photographs: one call vs one call each ...", file=sys.stderr)
        results["cache_many"] = self.cache_many(model, runs)
        print("6/6 servers: vlcache serve vs transformers serve ...", file=sys.stderr)
        results["serve"] = ServeBench(self, model).run(runs)
        return results

    def fresh_process(self, model: str, image_result: dict, runs: int) -> dict:
        image = next(p for p in self.images() if p.name == image_result["image"])
        flows = {}
        for name, source in (("cached", ["--cache", image_result["cache_path"]]), ("uncached", ["--image", str(image)])):
            rows = []
            for _ in range(runs):
                wall, rss, out = self.cli("ask", *source, "--prompt", QUESTION, "--max-new-tokens", "16",
                                          "--temperature", "0", "--json", "--model", model, "--device", self.args.device)
                t = json.loads(out)["timings"]
                restore = t.get("state_load_s", 0.0) + t.get("image_prefill_s", 0.0)
                rows.append({"wall_s": wall, "peak_rss_bytes": rss, "model_load_s": t["model_load_s"], "restore_s": restore,
                             "ttft_s": t["ttft_s"], "decode_s": t["decode_s"],
                             "startup_s": wall - t["model_load_s"] - restore - t["total_s"]})
            flows[name] = {k: stats([r[k] for r in rows]) for k in rows[0]}
        wall, rss, _ = self.cli("cache", str(image), "--output", str(self.work / "fresh_cache.pt"), "--model", model,
                                "--device", self.args.device)
        flows["cache_command"] = {"wall_s": wall, "peak_rss_bytes": rss}
        return flows

    def many_questions(self, model: str, cache: str, runs: int) -> dict:
        out = {}
        for mode in ("batch", "sequential"):
            out[mode] = self.measure("answer_many", model=model, device=self.args.device, cache=cache, questions=QUESTIONS,
                                     max_new_tokens=self.args.max_new_tokens, mode=mode, runs=runs)
        return out

    def cache_many(self, model: str, runs: int) -> dict:
        photos = [str(SHARED / "images" / p) for p in (PHOTOS if self.args.config == "full" else PHOTOS[:2])]
        one_call, separate = [], []
        for _ in range(runs):
            target = self.work / "many"
            shutil.rmtree(target, ignore_errors=True)
            one_call.append(self.cli("cache", *photos, "--output-dir", str(target), "--model", model, "--device", self.args.device)[0])
            start = time.perf_counter()
            for p in photos:
                self.cli("cache", p, "--output", str(target / (Path(p).stem + "_single.pt")), "--model", model, "--device", self.args.device)
            separate.append(time.perf_counter() - start)
        return {"photos": len(photos), "one_call_s": stats(one_call), "separate_calls_s": stats(separate)}


class ServeBench:
    """Time to first token of repeat questions and requests per second: vlcache serve vs transformers serve."""

    def __init__(self, bench: Bench, model: str):
        self.bench, self.model = bench, model
        self.image = SHARED / "images" / ("hubble_deep_field.jpg" if bench.args.config == "full" else "astronaut.png")
        self.small = SHARED / "images" / "astronaut.png"

    def run(self, runs: int) -> dict:
        out = {"image": self.image.name, "rps_image": self.small.name}
        servers = {"vlcache serve": self._vlcache_cmd()}
        transformers_cli = Path(sys.executable).with_name("transformers")
        if transformers_cli.exists() and not self.bench.args.skip_transformers_serve:
            servers["transformers serve"] = [str(transformers_cli), "serve", self.model, "--port", "{port}"]
        for name, cmd in servers.items():
            with _Process(cmd, self.bench.env) as server:
                out[name] = {"ttft": self._ttft(server.url, runs), "rps": self._rps(server.url)}
        return out

    def _vlcache_cmd(self) -> list[str]:
        states = tempfile.mkdtemp(dir=self.bench.work)
        return [sys.executable, "-m", "vlcache", "serve", "--model", self.model, "--port", "{port}", "--cache-dir", states,
                "--device", self.bench.args.device]

    def _request(self, url: str, image: Path, question: str, max_tokens: int) -> float:
        import base64
        import urllib.request

        data = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
        body = {"model": self.model, "max_tokens": max_tokens, "temperature": 0, "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data}}, {"type": "text", "text": question}]}]}
        request = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        start = time.perf_counter()
        with urllib.request.urlopen(request, timeout=1800) as response:
            json.loads(response.read())
        return time.perf_counter() - start

    def _ttft(self, url: str, runs: int) -> dict:
        """One-token answers: the first question (the image is new) and then two more, `runs` times."""
        first = self._request(url, self.image, QUESTIONS[0], 1)
        second = [self._request(url, self.image, QUESTIONS[1 + 2 * i], 1) for i in range(runs)]
        third = [self._request(url, self.image, QUESTIONS[2 + 2 * i], 1) for i in range(runs)]
        return {"first_s": first, "second_s": stats(second), "third_s": stats(third)}

    def _rps(self, url: str) -> dict:
        import concurrent.futures

        out = {}
        self._request(url, self.small, QUESTIONS[0], 1)  # the image state exists before the clock starts
        for clients in (1, 4, 16):
            n = max(4, clients) if self.bench.args.config == "full" else clients
            questions = [QUESTIONS[i % len(QUESTIONS)] + f" ({i})" for i in range(n)]
            start = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(max_workers=clients) as pool:
                list(pool.map(lambda q: self._request(url, self.small, q, 8), questions))
            wall = time.perf_counter() - start
            out[str(clients)] = {"requests": n, "wall_s": wall, "rps": n / wall}
        return out


class _Process:
    """A server subprocess on a free loopback port, up when /health answers, stopped on exit."""

    def __init__(self, cmd: list[str], env: dict):
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.cmd = [part.replace("{port}", str(self.port)) for part in cmd]
        self.env, self.url = env, f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        import urllib.request

        self.process = subprocess.Popen(self.cmd, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 600
        while True:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5):
                    return self
            except OSError:
                if self.process.poll() is not None or time.time() > deadline:
                    raise SystemExit(f"error: {' '.join(self.cmd[:3])} did not start:\n{self.process.stderr.read()[-2000:]}")
                time.sleep(0.5)

    def __exit__(self, *exc):
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()


def timed_cat(paths: list[Path]) -> float:
    for p in paths:  # warm
        subprocess.run(["cat", str(p)], stdout=subprocess.DEVNULL, check=True)
    start = time.perf_counter()
    for p in paths:
        subprocess.run(["cat", str(p)], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def machine() -> dict:
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from vlcache.model import cpu_bf16_support

    return {
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "native_bf16": cpu_bf16_support(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
    }


# -- report ------------------------------------------------------------------------------------------------

def summarize(r: dict) -> dict:
    """Headline ratios (medians) for the report and for checking targets."""
    out = {"images": []}
    for row in r["warm"]["images"]:
        u, c, f = stats(row["uncached_ttft_s"]), stats(row["cached_ttft_s"]), stats(row["floor_s"])
        load, cat, read = stats(row["cache_load_s"]), stats(row["cat_s"]), stats(row["cache_load_read_s"])
        out["images"].append({
            "image": row["image"], "prefix_tokens": row["prefix_tokens"], "uncached": u, "cached": c, "floor": f,
            "speedup": ratio(u, c), "cached_over_floor": ratio(c, f), "size_ratio": row["file_bytes"] / row["kv_bytes"],
            "load": load, "cat": cat, "load_over_cat": ratio(load, cat), "load_read": read, "load_read_over_cat": ratio(read, cat),
        })
    ml = r["model_load"]
    out["model_load_over_cat"] = ml["from_pretrained_s"]["median"] / ml["cat_weights_s"]["median"]
    fresh = r["fresh"]
    out["fresh_speedup"] = fresh["uncached"]["wall_s"]["median"] / fresh["cached"]["wall_s"]["median"]
    many = r["many"]
    out["batch_speedup"] = statistics.median(many["batch"]["tokens_per_s"]) / statistics.median(many["sequential"]["tokens_per_s"])
    cm = r["cache_many"]
    out["cache_many_speedup"] = ratio(cm["separate_calls_s"], cm["one_call_s"])
    return out


def markdown(r: dict, s: dict, png: str | None) -> str:
    m = r["machine"]
    where = f"{m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads)" + (f", GPU {m['gpu']}" if m["gpu"] else ", no GPU")
    if "cpu_capability" in m:  # runs before this field existed did not record it
        where += f", CPU capability {m['cpu_capability']}, native bfloat16: {m['native_bf16'] or 'none'}"
    bpt = r["warm"]["kv_bytes_per_token"]
    lines = [
        f"## {'Qwen3-VL-2B architecture, random weights' if r['config'] == 'full' else 'tiny test model'} ({r['warm']['dtype'].removeprefix('torch.')}) on {where}",
        "",
        f"Command: `{r['command']}`. Versions: Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}. "
        f"Each figure: median (min-max) of {r['runs']} runs. KV: {bpt:,} bytes a token.",
        "",
        "### Time to first token of a new question, warm process",
        "",
        "Uncached: transformers' `generate` on the whole conversation (image processing, vision encoder, full prefill). "
        "Cached: `engine.ask` on a state (restore + question prefill + first token). Floor: one bare model forward "
        "over the same question tokens on the same KV.",
        "",
        "| image | prompt tokens (cached + new) | uncached | cached | floor | uncached / cached | cached / floor (target <= 1.3) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row, raw in zip(s["images"], r["warm"]["images"]):
        lines.append(f"| {row['image']} | {row['prefix_tokens']} + {raw['suffix_tokens']} | {fmt(row['uncached'])} | {fmt(row['cached'])} | "
                     f"{fmt(row['floor'])} | {row['speedup']:.1f}x | {row['cached_over_floor']:.2f} |")
    if png:
        lines += ["", f"![time to first token against image tokens]({png})"]
    lines += ["", "### Cache file size and load time", "",
              "Load: `load_state` (memory-mapped; pages are read when the first question uses them). Load + read: the "
              "same, then a copy of every tensor, so every byte is read, as `cat` does.", "",
              "| image | file bytes | raw KV bytes | file / KV (target <= 1.01) | load | load + read | `cat` (warm page cache) | load + read / cat (target <= 1.5) |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row, raw in zip(s["images"], r["warm"]["images"]):
        lines.append(f"| {row['image']} | {raw['file_bytes']:,} | {raw['kv_bytes']:,} | {row['size_ratio']:.4f} | {fmt(row['load'])} | "
                     f"{fmt(row['load_read'])} | {fmt(row['cat'])} | {row['load_read_over_cat']:.2f} |")
    ml = r["model_load"]
    lines += ["", "### Model load", "",
              f"Weights: {ml['weights_bytes'] / 2**30:.2f} GiB. `cat` of the weight files (warm page cache): {fmt(ml['cat_weights_s'])}.",
              "", "| step | time |", "| --- | --- |",
              f"| import torch + transformers | {fmt(ml['imports_s'])} |",
              f"| processor (tokenizer, image processor) | {fmt(ml['processor_s'])} |",
              f"| `from_pretrained` (weights) | {fmt(ml['from_pretrained_s'])} |",
              f"| vlcache fingerprint | {fmt(ml['fingerprint_s'])} |",
              "", f"`from_pretrained` / `cat`: {s['model_load_over_cat']:.1f}x."]
    fresh = r["fresh"]
    lines += ["", "### The guide's flow: a fresh process per prompt (`vlcache ask`, 16 new tokens)", "",
              f"Image: {r['warm']['images'][1]['image']}. Uncached is `vlcache ask --image`, cached is `vlcache ask --cache`.",
              "", "| step | uncached | cached |", "| --- | --- | --- |"]
    for key, label in (("startup_s", "interpreter + imports"), ("model_load_s", "model load"),
                       ("restore_s", "image + prefill (uncached) / cache load (cached)"), ("ttft_s", "question prefill + first token"),
                       ("decode_s", "decode (15 tokens)"), ("wall_s", "**total (wall)**")):
        lines.append(f"| {label} | {fmt(fresh['uncached'][key])} | {fmt(fresh['cached'][key])} |")
    lines.append(f"| peak RSS | {fresh['uncached']['peak_rss_bytes']['median'] / 2**30:.2f} GiB | {fresh['cached']['peak_rss_bytes']['median'] / 2**30:.2f} GiB |")
    lines += ["", f"Cached / uncached speedup, whole process: {s['fresh_speedup']:.2f}x. "
              f"`vlcache cache` of the same image: {fresh['cache_command']['wall_s']:.1f} s wall, "
              f"{fresh['cache_command']['peak_rss_bytes'] / 2**30:.2f} GiB peak RSS."]
    many = r["many"]
    b, q = many["batch"], many["sequential"]
    lines += ["", f"### {len(QUESTIONS)} questions on one cache: one batch vs one after another", "",
              f"Cache: {r['warm']['images'][1]['image']} ({b['prefix_tokens']} tokens), {r['many']['batch']['tokens'][0] // len(QUESTIONS)} new tokens each, greedy.",
              "", "| mode | generated tokens / s | wall | peak RSS |", "| --- | --- | --- | --- |",
              f"| batch (`ask_many`) | {fmt(stats(b['tokens_per_s']), 'tok/s', 2)} | {fmt(stats(b['wall_s']))} | {b['peak_rss_bytes'] / 2**30:.2f} GiB |",
              f"| one by one (`ask`) | {fmt(stats(q['tokens_per_s']), 'tok/s', 2)} | {fmt(stats(q['wall_s']))} | {q['peak_rss_bytes'] / 2**30:.2f} GiB |",
              "", f"Batch / one by one throughput: {s['batch_speedup']:.1f}x (target >= 5x)."]
    cm = r["cache_many"]
    lines += ["", f"### Caching {cm['photos']} photographs", "",
              f"One `vlcache cache ... --output-dir` call: {fmt(cm['one_call_s'])}; {cm['photos']} separate `vlcache cache` calls: "
              f"{fmt(cm['separate_calls_s'])} ({s['cache_many_speedup']:.1f}x)."]
    lines += serve_markdown(r["serve"], fresh)
    return "\n".join(lines) + "\n"


def serve_markdown(sv: dict, fresh: dict) -> list[str]:
    names = [n for n in ("vlcache serve", "transformers serve") if n in sv]
    lines = ["", "### Servers: a second and third question about the same image", "",
             f"Image: {sv['image']}. One-token answers (time to first token, through HTTP), temperature 0. The first "
             "question is the uncached path on both servers (the image is new); transformers serve runs the vision "
             "encoder and the whole prefill again for every request.", "",
             "| | first question (uncached) | second question | third question |", "| --- | --- | --- | --- |"]
    for name in names:
        t = sv[name]["ttft"]
        lines.append(f"| `{name}` | {t['first_s']:.3f} s | {fmt(t['second_s'])} | {fmt(t['third_s'])} |")
    c = fresh["cached"]
    to_first = c["startup_s"]["median"] + c["model_load_s"]["median"] + c["restore_s"]["median"] + c["ttft_s"]["median"]
    lines.append(f"| `vlcache ask --cache` (fresh process, each question) | | {to_first:.3f} s | {to_first:.3f} s |")
    lines += ["", f"Requests per second (image {sv['rps_image']}, 8 new tokens, each client a different question):", "",
              "| clients | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    for clients in ("1", "4", "16"):
        cells = [f"{sv[n]['rps'][clients]['rps']:.3f} req/s ({sv[n]['rps'][clients]['requests']} requests)" for n in names]
        lines.append(f"| {clients} | " + " | ".join(cells) + " |")
    return lines


def plot(r: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return False
    rows = r["warm"]["images"]
    x = [row["image_tokens"] for row in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("uncached_ttft_s", "uncached"), ("cached_ttft_s", "cached (vlcache)"), ("floor_s", "floor (bare forward)")):
        ax.plot(x, [statistics.median(row[key]) for row in rows], marker="o", label=label)
    ax.set_xlabel("image tokens")
    ax.set_ylabel("time to first token (s)")
    ax.set_yscale("log")
    ax.set_title("Time to first token of a new question")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=("full", "small"), default="full")
    parser.add_argument("--runs", type=int, default=None, help="runs per figure (default: 3 full, 1 small)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="tokens per question in the batch test (default: 16 full, 4 small)")
    parser.add_argument("--skip-transformers-serve", action="store_true", help="measure vlcache serve alone")
    parser.add_argument("--out-dir", default=str(REPO / "docs"), help="where benchmarks.md/.json and ttft.png go")
    parser.add_argument("--work-dir", default=None, help="checkpoints and caches (default: ~/.cache/vlcache-bench, or a temp dir for small)")
    args = parser.parse_args(argv)
    args.runs = args.runs or (3 if args.config == "full" else 1)
    args.max_new_tokens = args.max_new_tokens or (16 if args.config == "full" else 4)
    args.work_dir = args.work_dir or (str(Path.home() / ".cache" / "vlcache-bench") if args.config == "full" else tempfile.mkdtemp())
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(REPO / "src"))

    results = Bench(args).run()
    results["summary"] = summary = summarize(results)
    out = Path(args.out_dir)
    suffix = "" if args.config == "full" else "-small"
    (out / f"benchmarks{suffix}.json").write_text(json.dumps(results, indent=1))
    png = f"ttft{suffix}.png" if plot(results, out / f"ttft{suffix}.png") else None
    (out / f"benchmarks{suffix}.md").write_text("# vlcache benchmarks\n\n" + markdown(results, summary, png))
    print(f"wrote {out / f'benchmarks{suffix}.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
