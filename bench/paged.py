"""Memory of many rows about one state (issue 28): Engine.ask_many's peak growth against the state's bytes.

A Qwen3-VL with the 2B's K/V geometry (28 layers, 8 K/V heads of 128: 224 KiB a token in float32) but thin
everywhere else (hidden 64, a 2-block vision tower), the real processor, random weights, float32, eager steps.
One photograph is cached (about 860 tokens), then ask_many asks R questions about it (greedy, 8 new tokens).
Each R runs in a fresh process (glibc's mmap threshold fixed at 64 KiB): peak RSS growth (VmHWM after, reset before, minus VmRSS before) during
ask_many, and the bytes of K/V the batch held (its slot tensors before the pool; the most blocks in use after).

`--server`: the same through the server instead (in this process: create_app on 127.0.0.1, a warm-up chat that
computes and keeps the state, then R concurrent chats from R threads with the openai client, each its own
question about the photograph, 8 new tokens): peak growth during the R chats against the state's bytes.

`--state-tokens N`: instead of the photograph's state, a synthetic one of N tokens (random K/V of the model's
shape in its dtype, the photograph's ids with image tokens inserted to N: a 30-second clip's size without
encoding one through the vision tower). `--dtype bfloat16`: the model and its K/V in bfloat16 (the 2B's).
`--max-new-tokens` and `--short` (one-word questions) make the rows' own tokens fewer. Each run also reports
the floor: the state once plus the K/V of every token the rows write (their question and answer tokens but the
last, which is never fed back).

Usage: python bench/paged.py --work-dir /tmp/bpaged [--rows 1 16 64] [--server] [--json docs/benchmarks-paged.json]
       [--state-tokens 11000] [--dtype bfloat16] [--max-new-tokens 8] [--short]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
REAL = REPO.parent / "shared" / "models" / "qwen3-vl-2b-instruct"
PHOTO = REPO.parent / "shared" / "images" / "hubble_deep_field.jpg"  # 1000x872: about 860 tokens
sys.path.insert(0, str(Path(__file__).parent))
from decode import save_thin  # noqa: E402 - a sibling benchmark's builder: the same thin 2B checkpoint files

QUESTIONS = ["What is in the picture?", "Describe the colours.", "Who is this?", "Where was this taken?"]
SHORT = ["Colours?", "Where?", "Who?", "What?"]


def build(folder: Path) -> Path:
    """The 2B's config with its K/V geometry kept and everything else thin."""
    from transformers import Qwen3VLConfig


    if (folder / "config.json").exists():
        return folder
    config = Qwen3VLConfig.from_pretrained(REAL)
    text = config.text_config
    text.hidden_size, text.intermediate_size, text.num_attention_heads = 64, 128, 16  # K/V: 8 heads of 128, kept
    vision = config.vision_config
    vision.depth, vision.hidden_size, vision.intermediate_size, vision.num_heads = 2, 64, 128, 4
    vision.out_hidden_size, vision.deepstack_visual_indexes = 64, [0]
    return save_thin(config, folder)


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def synthetic(engine, state, tokens: int):
    """A state of `tokens` tokens like `state` (its text, its rope delta): random K/V of the model's shape and
    dtype, image tokens inserted after the photograph's to make up the length."""
    import dataclasses

    n = state.num_tokens
    if tokens <= n:
        raise SystemExit(f"error: --state-tokens must be more than the photograph's {n}")
    types = state.mm_token_type_ids[0]
    at = int(types.nonzero()[-1]) + 1  # after the last image token
    extra = tokens - n

    def widen(t, fill):
        return torch.cat([t[:, :at], t.new_full((1, extra), fill), t[:, at:]], dim=1)

    generator = torch.Generator().manual_seed(0)
    kv = []
    for k, v in state.kv:
        shape = (1, k.shape[1], tokens, k.shape[3])
        kv.append((torch.randn(shape, generator=generator).to(engine.dtype),
                   torch.randn(shape, generator=generator).to(engine.dtype)))
    metadata = dataclasses.replace(state.metadata, prefix_tokens=tokens, image_tokens=state.metadata.image_tokens + extra)
    return dataclasses.replace(state, kv=kv, metadata=metadata, input_ids=widen(state.input_ids, int(state.input_ids[0, at - 1])),
                               attention_mask=widen(state.attention_mask, 1),
                               mm_token_type_ids=widen(state.mm_token_type_ids, 1))


def one(folder: Path, rows: int, state_tokens: int | None = None, dtype: str = "float32", max_new_tokens: int = 8,
        short: bool = False) -> dict:
    """In this process: cache the photograph (or make a synthetic state), then ask_many with `rows` questions;
    the memory figures."""
    from vlcache import Engine
    from vlcache.decode.blocks import BLOCK_SIZE, blocks_for
    from vlcache.state import kv_nbytes

    torch.set_num_threads(1)
    engine = Engine.load(str(folder), device="cpu", dtype=dtype, compile="off")
    state = engine.cache_image(str(PHOTO))
    if state_tokens:
        state = synthetic(engine, state, state_tokens)
    made = []
    real = engine.batch
    engine.batch = lambda: made.append(real()) or made[-1]
    questions = SHORT if short else QUESTIONS
    prompts = [questions[i % len(questions)] + ("" if short else f" ({i})") for i in range(rows)]
    engine.ask_many(state, prompts[:1], max_new_tokens=2, temperature=0)  # warm: allocator pools, lazy imports
    made.clear()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = _status("VmRSS")
    answers = engine.ask_many(state, prompts, max_new_tokens=max_new_tokens, temperature=0)
    peak = _status("VmHWM") - before
    held = sum(_held_bytes(batch.cache) for batch in made)
    state_bytes = kv_nbytes(state.kv)
    # The floor: the state once and every token the rows write (question, answer but its last token).
    own = [engine.question_ids(state.metadata.messages, p, state.metadata.template_time).shape[1] + len(a.token_ids) - 1
           for p, a in zip(prompts, answers)]
    written = sum(own)
    out = {"rows": rows, "state_tokens": state.num_tokens, "state_bytes": state_bytes, "peak_growth_bytes": peak,
           "batch_kv_bytes": held, "dtype": dtype, "synthetic": bool(state_tokens), "max_new_tokens": max_new_tokens,
           "short": short, "row_tokens_written": written,
           # Counted, not run: the blocks if each row's own tokens began a fresh block (no copy of the state's
           # partly filled last block), with every row at once.
           "blocks_if_rows_start_fresh": blocks_for(state.num_tokens, BLOCK_SIZE) + sum(blocks_for(n, BLOCK_SIZE) for n in own),
           "floor_bytes": state_bytes + written * state_bytes // state.num_tokens}
    out["peak_over_state"] = round(peak / state_bytes, 2)
    out["held_over_state"] = round(held / state_bytes, 2)
    out["floor_over_state"] = round(out["floor_bytes"] / state_bytes, 2)
    blocks = getattr(made[-1].cache, "block_stats", None)
    if blocks is not None:
        out["blocks"] = blocks()
    return out


def one_server(folder: Path, rows: int, work: Path) -> dict:
    """In this process: a server on the thin model; after one warm-up chat about the photograph, `rows`
    concurrent chats about it; the memory figures."""
    import base64
    import concurrent.futures
    import tempfile
    import threading
    import time

    import uvicorn
    from openai import OpenAI

    from vlcache import Engine
    from vlcache.serving.options import ServeOptions
    from vlcache.serving.server import create_app, server_config
    from vlcache.state import kv_nbytes

    torch.set_num_threads(1)
    engine = Engine.load(str(folder), device="cpu", dtype="float32", compile="off")
    app = create_app(engine, ServeOptions(cache_dir=Path(tempfile.mkdtemp(dir=work)), memory_budget=8 * 2**30,
                                          max_batch=max(rows, 1)))
    server = uvicorn.Server(server_config(app, "127.0.0.1", 0, log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/v1"
    client = OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=3600)
    image = "data:image/jpeg;base64," + base64.b64encode(PHOTO.read_bytes()).decode()

    def chat(question: str, tokens: int = 8):
        return client.chat.completions.create(model="m", max_tokens=tokens, temperature=0, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": question}]}])

    loaded = _status("VmRSS")
    chat("Warm up.", 2)  # computes and keeps the state; allocator pools, lazy imports
    service = app.state.service
    (state,) = [v for k, v in service.store._hot.items() if ":" not in k]  # the image state (not kept conversations)
    Path("/proc/self/clear_refs").write_text("5")
    before = _status("VmRSS")
    prompts = [QUESTIONS[i % len(QUESTIONS)] + f" ({i})" for i in range(rows)]
    with concurrent.futures.ThreadPoolExecutor(rows) as pool:
        answers = list(pool.map(chat, prompts))
    peak = _status("VmHWM") - before
    assert all(a.usage.prompt_tokens_details.cached_tokens > 0 for a in answers)
    stats = service.scheduler.kv_stats()["blocks"]
    server.should_exit = True
    out = {"rows": rows, "server": True, "state_tokens": state.num_tokens, "state_bytes": kv_nbytes(state.kv),
           "peak_growth_bytes": peak, "blocks": stats, "rest_after_warm_up_bytes": before - loaded,
           "rss_after_bytes": _status("VmRSS") - loaded}
    out["peak_over_state"] = round(peak / out["state_bytes"], 2)
    return out


def _held_bytes(cache) -> int:
    """Bytes of K/V a batch's cache holds: its slot tensors before issue 28; after, the most blocks in use at
    once (the pool's tensors are reserved, committed only where written)."""
    pool = getattr(cache, "pool", None)
    if pool is not None:
        return sum(blocks.peak * pool.block_bytes(kind) for kind, blocks in pool.pools.items())
    total = 0
    for _, layer in cache.attention_layers():
        for name in ("_keys", "_values"):
            tensor = getattr(layer, name, None)
            if tensor is not None:
                total += tensor.numel() * tensor.element_size()
    return total


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--server", action="store_true", help="through the server: R concurrent chats")
    parser.add_argument("--state-tokens", type=int, default=None, help="a synthetic state of this many tokens")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--short", action="store_true", help="one-word questions")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.server and (args.state_tokens or args.dtype != "float32" or args.max_new_tokens != 8 or args.short):
        parser.error("--server takes none of --state-tokens, --dtype, --max-new-tokens, --short")
    folder = build(args.work_dir / "kv2b-thin")
    if args.one is not None:
        print(json.dumps(one_server(folder, args.one, args.work_dir) if args.server else
                         one(folder, args.one, args.state_tokens, args.dtype, args.max_new_tokens, args.short)))
        return 0
    options = [] if args.server else (["--dtype", args.dtype, "--max-new-tokens", str(args.max_new_tokens)]
                                      + (["--state-tokens", str(args.state_tokens)] if args.state_tokens else [])
                                      + (["--short"] if args.short else []))
    results = []
    for rows in args.rows:
        # A fixed mmap threshold: freed tensors go back to the system, so the warm-up's memory is not reused
        # and the peak counts what ask_many itself takes.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        done = subprocess.run([sys.executable, __file__, "--work-dir", str(args.work_dir), "--one", str(rows)]
                              + (["--server"] if args.server else options), capture_output=True, text=True, env=env)
        if done.returncode:
            print(done.stderr[-3000:], file=sys.stderr)
            return done.returncode
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        r = results[-1]
        if args.server:
            print(f"{rows:>3} concurrent chats: state {r['state_tokens']} tokens, {r['state_bytes'] / 2**20:.0f} MiB; peak "
                  f"growth {r['peak_growth_bytes'] / 2**20:.0f} MiB ({r['peak_over_state']}x); resident after the "
                  f"warm-up chat {r['rest_after_warm_up_bytes'] / 2**20:.0f} MiB, after the chats "
                  f"{r['rss_after_bytes'] / 2**20:.0f} MiB (both from the model loaded) {r['blocks']}", flush=True)
            continue
        print(f"{rows:>3} rows: state {r['state_tokens']} tokens, {r['state_bytes'] / 2**20:.0f} MiB; peak growth "
              f"{r['peak_growth_bytes'] / 2**20:.0f} MiB ({r['peak_over_state']}x); batch K/V held "
              f"{r['batch_kv_bytes'] / 2**20:.0f} MiB ({r['held_over_state']}x); floor {r['floor_bytes'] / 2**20:.0f} MiB "
              f"({r['floor_over_state']}x: {r['row_tokens_written']} row tokens) {r.get('blocks', '')}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
