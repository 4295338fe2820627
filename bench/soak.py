"""Soak test (not in CI): an open-loop mixed load against one `vlcache serve` for a long time, sampling the
server's memory, open files, threads and time to first token every interval.

Requests arrive as a Poisson process at --rate a second, whatever the server's speed (open loop), each one of:
image chats (the sample photographs, so most states are found), video chats (short clips), text-only chats,
cancellations (a streamed chat dropped after its first piece), uploads of cache files (distinct files, so the
upload quota is exercised), and broken images (an intended 400). Every other 4xx or any 5xx is an error.

    python bench/soak.py --minutes 30 --rate 0.5 --json docs/benchmarks-soak.json

With no --model a tiny random checkpoint is built (the server's own machinery under load, not a model's speed).
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PHOTOS = REPO.parent / "shared" / "images"
KINDS = {"image": 0.4, "video": 0.1, "text": 0.2, "cancel": 0.15, "upload": 0.1, "broken": 0.05}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: a tiny random checkpoint)")
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--rate", type=float, default=0.5, help="requests a second (Poisson arrivals)")
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--json", default=None, help="write the samples and the summary here")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vlcache-soak-"))
    model = args.model or str(_tiny(work / "model"))
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "vlcache", "serve", "--model", model, "--port", str(port),
                               "--cache-dir", str(work / "states"), "--dtype", "float32", "--upload-quota", "2MiB"],
                              stdout=subprocess.DEVNULL, stderr=open(work / "serve.log", "wb"))
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_up(url, server)
        load = Load(url, work, args.max_tokens)
        samples = load.run(server.pid, args.minutes * 60, args.rate, args.interval)
    finally:
        server.terminate()
        server.wait(timeout=120)
    summary = _summary(samples, load)
    print(json.dumps(summary, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), "summary": summary, "samples": samples},
                                              indent=1) + "\n")
    return 0 if summary["errors"] == 0 else 1


class Load:
    def __init__(self, url: str, work: Path, max_tokens: int):
        self.url, self.work, self.max_tokens = url, work, max_tokens
        self.photos = [p.read_bytes() for p in sorted(PHOTOS.glob("*")) if p.suffix in (".png", ".jpg")]
        self.videos = [self._clip(i) for i in range(3)]
        self.lock = threading.Lock()
        self.ttft: list[float] = []  # of the current window
        self.counts: dict[str, int] = {}
        self.errors: list[str] = []
        self.uploads = 0
        self.upload_file = None

    def run(self, pid: int, seconds: float, rate: float, interval: float) -> list[dict]:
        rng = random.Random(0)
        samples, start = [], time.monotonic()
        next_sample = start + interval
        with ThreadPoolExecutor(64) as pool:
            arrival = start
            while arrival < start + seconds:
                arrival += rng.expovariate(rate)
                while time.monotonic() < arrival:
                    if time.monotonic() >= next_sample:
                        samples.append(self._sample(pid, next_sample - start))
                        print(json.dumps(samples[-1]), flush=True)
                        next_sample += interval
                    time.sleep(min(0.05, max(0.0, arrival - time.monotonic())))
                kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
                pool.submit(self._one, kind, rng.random())
        samples.append(self._sample(pid, time.monotonic() - start))
        return samples

    # -- requests ------------------------------------------------------------------------------------------------

    def _one(self, kind: str, pick: float) -> None:
        try:
            status = getattr(self, f"_{kind}")(pick)
        except Exception as exc:  # noqa: BLE001 - a soak counts every failure, whatever it is
            status = f"{type(exc).__name__}: {exc}"
        with self.lock:
            key = f"{kind}:{status}"
            self.counts[key] = self.counts.get(key, 0) + 1
            intended = (kind == "broken" and status == 400) or status in (200, 429)  # 429: a bound, intended
            if not intended:
                self.errors.append(key)

    def _image(self, pick: float):
        data = self.photos[int(pick * len(self.photos))]
        return self._chat([{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(data).decode()}},
                           {"type": "text", "text": random.choice(["What is this?", "Describe it.", "Colours?"])}])

    def _video(self, pick: float):
        data = self.videos[int(pick * len(self.videos))]
        return self._chat([{"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + base64.b64encode(data).decode()}},
                           {"type": "text", "text": "What happens?"}])

    def _text(self, pick: float):
        return self._chat([{"type": "text", "text": f"Count to {int(pick * 100)}."}])

    def _broken(self, pick: float):
        return self._chat([{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"\x89PNG junk").decode()}},
                           {"type": "text", "text": "What is this?"}])

    def _cancel(self, pick: float):
        return self._chat([{"type": "text", "text": "Tell a long story."}], cancel=True)

    def _upload(self, pick: float):
        with self.lock:
            self.uploads += 1
            n = self.uploads
        data = self._cache_file(n)
        request = urllib.request.Request(self.url + "/v1/vlcache/states", data=data, method="POST",
                                         headers={"Content-Type": "application/octet-stream"})
        return _status(request)

    def _chat(self, content: list, cancel: bool = False):
        body = {"model": "m", "stream": True, "max_tokens": self.max_tokens, "temperature": 0,
                "messages": [{"role": "user", "content": content}]}
        request = urllib.request.Request(self.url + "/v1/chat/completions", data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        started = time.perf_counter()
        try:
            with urllib.request.urlopen(request, timeout=300) as response:
                for line in response:
                    if line.startswith(b"data: ") and b'"content": "' in line and b'"content": ""' not in line:
                        with self.lock:
                            self.ttft.append(time.perf_counter() - started)
                        if cancel:
                            return 200  # hung up after the first piece
                        break
                response.read()
                return response.status
        except urllib.error.HTTPError as exc:
            exc.read()
            return exc.code

    # -- inputs --------------------------------------------------------------------------------------------------

    def _clip(self, i: int) -> bytes:
        from vlcache.testing import clips

        path = clips.make_clip(self.work / f"clip{i}.mp4", seconds=1 + i, fps=4, size=(96 + 32 * i, 64))
        return path.read_bytes()

    def _cache_file(self, n: int) -> bytes:
        """A distinct valid cache file of the server's model: the first one made by the server, re-saved with
        another creation time."""
        from vlcache.state import load_state

        with self.lock:
            if self.upload_file is None:
                made = _json(urllib.request.Request(self.url + "/v1/vlcache/cache", method="POST",
                                                    data=json.dumps({"parts": [{"type": "image", "data": base64.b64encode(self.photos[0]).decode()}]}).encode(),
                                                    headers={"Content-Type": "application/json"}))
                path = self.work / "upload.pt"
                path.write_bytes(urllib.request.urlopen(self.url + f"/v1/vlcache/states/{made['id']}", timeout=60).read())
                self.upload_file = load_state(path)
            state = self.upload_file
        state = dataclasses.replace(state, metadata=dataclasses.replace(state.metadata, created=f"soak-{n}"))
        return state.to_bytes()

    # -- samples -------------------------------------------------------------------------------------------------

    def _sample(self, pid: int, at: float) -> dict:
        with self.lock:
            ttft, self.ttft = sorted(self.ttft), []
            errors = len(self.errors)
        status = Path(f"/proc/{pid}/status").read_text()
        field = {line.split(":")[0]: line.split(":")[1].strip() for line in status.splitlines() if ":" in line}
        return {"t_s": round(at, 1), "rss_mib": round(int(field["VmRSS"].split()[0]) / 1024, 1),
                "open_files": len(os.listdir(f"/proc/{pid}/fd")), "threads": int(field["Threads"]),
                "answers": len(ttft), "ttft_p50_s": _quantile(ttft, 0.5), "ttft_p95_s": _quantile(ttft, 0.95),
                "errors_so_far": errors}


def _summary(samples: list[dict], load: Load) -> dict:
    rss = [s["rss_mib"] for s in samples]
    settled = rss[len(rss) // 4:] or rss  # after the first quarter: caches and pools warmed up
    return {"samples": len(samples), "seconds": samples[-1]["t_s"] if samples else 0, "requests": load.counts,
            "errors": len(load.errors), "error_kinds": sorted(set(load.errors)),
            "rss_mib_first_last_max": [rss[0], rss[-1], max(rss)] if rss else [],
            "rss_mib_settled_min_max": [min(settled), max(settled)] if settled else [],
            "open_files_max": max(s["open_files"] for s in samples) if samples else 0,
            "threads_max": max(s["threads"] for s in samples) if samples else 0,
            "ttft_p50_s_median": statistics.median([s["ttft_p50_s"] for s in samples if s["ttft_p50_s"] is not None] or [0]),
            "ttft_p95_s_max": max([s["ttft_p95_s"] for s in samples if s["ttft_p95_s"] is not None] or [0])}


def _quantile(values: list[float], q: float):
    if not values:
        return None
    return round(values[min(len(values) - 1, int(q * len(values)))], 3)


def _status(request) -> int:
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as exc:
        exc.read()
        return exc.code


def _json(request) -> dict:
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())


def _tiny(folder: Path) -> Path:
    from vlcache.testing import build_tiny_checkpoint

    return build_tiny_checkpoint(folder)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_up(url: str, server: subprocess.Popen) -> None:
    deadline = time.time() + 300
    while time.time() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode}")
        try:
            urllib.request.urlopen(url + "/health", timeout=2).read()
            return
        except OSError:
            time.sleep(0.5)
    raise SystemExit("the server did not start")


if __name__ == "__main__":
    sys.exit(main())
