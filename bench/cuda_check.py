#!/usr/bin/env python3
"""Exactness and dtype choice on a CUDA GPU, for every family (the CPU suite cannot reach CUDA).

    python bench/cuda_check.py --images ../shared/images [--config ../shared/models/qwen3-vl-2b-instruct/config.json]

For each family's tiny random checkpoint: `--dtype auto` on the GPU (bfloat16 where supported), a state cached
on the GPU answers three questions with the token ids of transformers' generate on the GPU in the same dtype,
a batch equals the questions alone, a 3-turn conversation equals generate on the whole conversation, and the
state saved on the GPU loads on the CPU; then the decode step --compile auto chooses (compiled where the probe
holds, else CUDA graphs of the eager step) gives the same tokens alone and batched. With --config, at the 2B
size: time to first token cached vs uncached, and ms a token at batch 1, 8 and 32 with the chosen step
against generate() eager and with a static cache (compiled).
Prints one JSON line per check and a summary; exits 1 if any check failed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

SYSTEM = "You are a helpful AI assistant analyzing an image."
QUESTIONS = ["What objects are visible in this image?", "What colors dominate the scene?", "Describe the lighting and mood."]
KINDS = ["qwen3_vl", "qwen2_vl", "qwen2_5_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe", "gemma3", "llava_onevision"]
N = 16


def check_family(kind: str, image: Path, work: Path, device: str = "cuda", dtype: str = "auto") -> dict:
    from reference import reference_for_messages, reference_tokens
    from vlcache import Engine
    from vlcache.conversation import Conversation
    from vlcache.testing.families import build_family_checkpoint

    folder = build_family_checkpoint(kind, work / kind)
    engine = Engine.load(str(folder), device=device, dtype=dtype)
    result = {"kind": kind, "dtype": str(engine.dtype).removeprefix("torch."), "reason": engine.dtype_reason}
    state = engine.cache_image(image, system_prompt=SYSTEM)
    alone = [engine.ask(state, q, max_new_tokens=N, temperature=0).token_ids for q in QUESTIONS]
    expected = [reference_tokens(engine, image, SYSTEM, q, N) for q in QUESTIONS]
    result["single_exact"] = alone == expected
    result["batch_equals_alone"] = [a.token_ids for a in engine.ask_many(state, QUESTIONS, max_new_tokens=N, temperature=0)] == alone
    chat, messages, turns_ok = Conversation(engine, state), [{"role": "system", "content": SYSTEM}], True
    for i, question in enumerate(QUESTIONS):
        answer = chat.ask(question, max_new_tokens=N, temperature=0)
        messages.append({"role": "user", "content": ([{"type": "image"}] if i == 0 else []) + [{"type": "text", "text": question}]})
        turns_ok = turns_ok and answer.token_ids == reference_for_messages(engine, messages, image, N)
        messages.append({"role": "assistant", "content": answer.text})
    result["chat_exact"] = turns_ok
    path = state.save(work / f"{kind}.pt")
    cpu = Engine.load(str(folder), device="cpu", dtype=result["dtype"])
    back = cpu.load_state(path)
    result["gpu_file_loads_on_cpu"] = back.kv[-1][0].device.type == "cpu" and back.num_tokens == state.num_tokens
    # The decode step --compile auto picks (bench/decode.py's CPU stand-in shows why it matters on a GPU).
    status = engine.compile_steps("auto", buckets=[1, 2, 4])
    result["decode_step"] = f"{status['step']} ({status['reason']})"
    result["step_single_exact"] = [engine.ask(state, q, max_new_tokens=N, temperature=0).token_ids for q in QUESTIONS] == alone
    result["step_batch_exact"] = [a.token_ids for a in engine.ask_many(state, QUESTIONS, max_new_tokens=N, temperature=0)] == alone
    engine.compile_steps("off")
    result["ok"] = all(result[k] for k in ("single_exact", "batch_equals_alone", "chat_exact", "gpu_file_loads_on_cpu",
                                            "step_single_exact", "step_batch_exact"))
    if device == "cuda" and dtype == "auto":
        result["auto_is_bf16"] = engine.dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
        result["ok"] = result["ok"] and result["auto_is_bf16"]
    return result


def speed(config: Path, image: Path, work: Path) -> dict:
    from vlcache import Engine
    from vlcache.images import load_image
    from vlcache.prompt import conversation
    from vlcache.testing import build_random_checkpoint

    folder = build_random_checkpoint(config, work / "qwen3-vl-2b-random")
    engine = Engine.load(str(folder), device="cuda")
    question = QUESTIONS[1]
    messages = conversation(SYSTEM, question, with_image=True)
    messages[-1]["content"][0]["image"] = load_image(image).image

    def uncached() -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        inputs = engine.processor.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                                      return_dict=True, return_tensors="pt").to("cuda")
        with torch.inference_mode():
            engine.model.generate(**inputs, max_new_tokens=1, do_sample=False)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    uncached()  # warm-up
    uncached_s = sorted(uncached() for _ in range(5))[2]
    state = engine.cache_image(image, system_prompt=SYSTEM)
    engine.ask(state, question, max_new_tokens=1, temperature=0)
    cached_s = sorted(engine.ask(state, question, max_new_tokens=1, temperature=0).timings["ttft_s"] for _ in range(5))[2]
    eager = _per_token(engine, state, question)
    status = engine.compile_steps("auto", buckets=[1, 8, 32])
    chosen = _per_token(engine, state, question)
    from decode import generate_steps  # bench/decode.py

    ids = engine.question_ids(state.metadata.messages, question)
    baseline = {}
    for rows in (1, 8, 32):
        batch_ids = torch.cat([state.input_ids, ids], dim=1).expand(rows, -1).contiguous()
        for name, static in (("generate_eager", False), ("generate_static_compiled", True)):
            try:
                baseline[f"{name}_b{rows}_s"] = generate_steps(engine.model, batch_ids, 32, static)
            except Exception as exc:  # noqa: BLE001 - reported, not fatal
                baseline[f"{name}_b{rows}_s"] = f"{type(exc).__name__}: {exc}"[:200]
    return {"model": "Qwen3-VL-2B architecture, random weights", "dtype": str(engine.dtype).removeprefix("torch."),
            "prefix_tokens": state.num_tokens, "uncached_ttft_s": uncached_s, "cached_ttft_s": cached_s,
            "speedup": uncached_s / cached_s, "eager_s_per_token": eager, "decode_step": status,
            "chosen_s_per_token": chosen, "tokens_per_s_b32": 32 / chosen[32], **baseline}


def _per_token(engine, state, question) -> dict:
    """Median seconds of a decode step with 1, 8 and 32 rows on the state (after warm-up)."""
    from vlcache import decode

    ids = engine.question_ids(state.metadata.messages, question)[0]
    out = {}
    for rows in (1, 8, 32):
        batch = engine.batch()
        for _ in range(rows):
            batch.add(engine.state_prefix(state), decode.SamplingParams(temperature=0.0), 10**6, ids)
        batch.sample(batch.prefill([ids] * rows))
        times = []
        for _ in range(40):
            torch.cuda.synchronize()
            start = time.perf_counter()
            batch.sample(batch.step())
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        out[rows] = sorted(times[8:])[len(times[8:]) // 2]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", required=True, help="folder with rocket.jpg and hubble_deep_field.jpg")
    parser.add_argument("--config", default=None, help="Qwen3-VL-2B config.json for the speed figure")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--device", default="cuda", help="cpu: a smoke test of this script")
    parser.add_argument("--dtype", default="auto", help="auto (bfloat16 on most GPUs), float32, ...")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA GPU", file=sys.stderr)
        return 1
    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else None
    print(json.dumps({"gpu": gpu, "torch": torch.__version__}), flush=True)
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for kind in args.kinds.split(","):
            try:
                result = check_family(kind, Path(args.images) / "rocket.jpg", work, args.device, args.dtype)
            except Exception as exc:  # noqa: BLE001 - report and go on to the next family
                result = {"kind": kind, "ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
            failed += not result["ok"]
            print(json.dumps(result), flush=True)
        if args.config:
            print(json.dumps(speed(Path(args.config), Path(args.images) / "hubble_deep_field.jpg", work)), flush=True)
    print(f"{len(args.kinds.split(',')) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
