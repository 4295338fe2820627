"""In-process measurements, one kind per process so that each peak memory figure is its own.

Run by bench/run.py as `python bench/measure.py KIND JSON_ARGS`; prints one JSON object on stdout.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch


def _timed(fn, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def _cat_seconds(path: Path, runs: int) -> list[float]:
    subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)  # warm the page cache
    return _timed(lambda: subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True), runs)


def warm(args: dict) -> dict:
    """Time to first token of a new question in a warm process: uncached vs cached vs the bare forward."""
    from transformers import DynamicCache

    from vlcache import Engine, generate
    from vlcache.images import load_image
    from vlcache.prompt import conversation
    from vlcache.state import load_state

    engine = Engine.load(args["model"], device=args["device"])
    question, runs, out_dir = args["question"], args["runs"], Path(args["out_dir"])
    results = []
    for image in args["images"]:
        # 1. Uncached: transformers' generate on the whole conversation, first token only.
        messages = conversation(args["system_prompt"], question, with_image=True)
        messages[-1]["content"][0]["image"] = load_image(image).image

        def uncached():
            inputs = engine.processor.apply_chat_template(
                messages, tokenize=True, add_generation_prompt=True, return_dict=True, return_tensors="pt"
            ).to(engine.device)
            with torch.inference_mode():
                engine.model.generate(**inputs, max_new_tokens=1, do_sample=False)

        uncached_s = _timed(uncached, runs)
        # 2. Cached: restore the state and prefill the question; vlcache's own first-token time.
        state = engine.cache_image(image, system_prompt=args["system_prompt"])
        engine.ask(state, question, max_new_tokens=1, temperature=0)  # warm-up
        cached_s = [engine.ask(state, question, max_new_tokens=1, temperature=0).timings["ttft_s"] for _ in range(runs)]
        # 3. The floor: one bare forward over the same suffix tokens on the same KV (cache built untimed).
        new_ids = engine.question_ids(state.metadata.messages, question)
        delta = int(state.rope_deltas.view(-1)[0])
        floor_s = []
        for _ in range(runs):
            cache = DynamicCache(ddp_cache_data=[(k.clone(), v.clone()) for k, v in state.kv], config=engine.model.config)
            positions = generate.text_positions(engine.family.positions, state.num_tokens, new_ids.shape[1], delta, engine.device)
            start = time.perf_counter()
            with torch.inference_mode():
                engine.model(input_ids=new_ids, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1)
            floor_s.append(time.perf_counter() - start)
        # 4. The file: size against raw KV, load time against reading the same bytes.
        path = state.save(out_dir / f"{Path(image).stem}_cache.pt")
        load_s = _timed(lambda: load_state(path, device=engine.device), runs)
        # load_state maps the file (safetensors): pages are read when first used. Also time a load that reads
        # every byte, so the comparison with `cat` is like for like.
        load_read_s = _timed(lambda: [t.clone() for pair in load_state(path, device=engine.device).kv for t in pair], runs)
        results.append({
            "image": Path(image).name,
            "prefix_tokens": state.num_tokens,
            "image_tokens": state.metadata.image_tokens,
            "suffix_tokens": int(new_ids.shape[1]),
            "uncached_ttft_s": uncached_s,
            "cached_ttft_s": cached_s,
            "floor_s": floor_s,
            "file_bytes": path.stat().st_size,
            "kv_bytes": state.kv_bytes,
            "cache_load_s": load_s,
            "cache_load_read_s": load_read_s,
            "cat_s": _cat_seconds(path, runs),
            "cache_path": str(path),
        })
    return {"images": results, "kv_bytes_per_token": engine.kv_bytes_per_token(), "dtype": str(engine.dtype)}


def model_load(args: dict) -> dict:
    """Where loading the model goes: processor, weights (from_pretrained), fingerprint."""
    start = time.perf_counter()
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlcache.model import fingerprint

    imports = time.perf_counter() - start
    start = time.perf_counter()
    AutoProcessor.from_pretrained(args["model"])
    processor_s = time.perf_counter() - start
    start = time.perf_counter()
    model = AutoModelForImageTextToText.from_pretrained(args["model"], dtype="auto")
    weights_s = time.perf_counter() - start
    start = time.perf_counter()
    fingerprint(model)
    fingerprint_s = time.perf_counter() - start
    return {"imports_s": imports, "processor_s": processor_s, "from_pretrained_s": weights_s, "fingerprint_s": fingerprint_s}


def answer_many(args: dict) -> dict:
    """Aggregate generated tokens per second for several questions on one cache: batched or one by one."""
    from vlcache import Engine

    engine = Engine.load(args["model"], device=args["device"])
    state = engine.load_state(args["cache"])
    questions, n = args["questions"], args["max_new_tokens"]
    engine.ask(state, questions[0], max_new_tokens=2, temperature=0)  # warm-up
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    walls, tokens = [], []
    for _ in range(args["runs"]):
        start = time.perf_counter()
        if args["mode"] == "batch":
            answers = engine.ask_many(state, questions, max_new_tokens=n, temperature=0)
        else:
            answers = [engine.ask(state, q, max_new_tokens=n, temperature=0) for q in questions]
        walls.append(time.perf_counter() - start)
        tokens.append(sum(len(a.token_ids) for a in answers))
    return {
        "wall_s": walls,
        "tokens": tokens,
        "tokens_per_s": [t / w for t, w in zip(tokens, walls)],
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_before_bytes": rss_before * 1024,
        "prefix_tokens": state.num_tokens,
    }


if __name__ == "__main__":
    kind, raw = sys.argv[1], sys.argv[2]
    print(json.dumps({"warm": warm, "model_load": model_load, "answer_many": answer_many}[kind](json.loads(raw))))
