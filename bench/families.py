#!/usr/bin/env python3
"""Per family at a real size (random weights, CPU): bytes of state per token, file size for one photograph,
and time to first token cached vs uncached.

    python bench/families.py                    # every family below (about 20 minutes on a 2-core CPU)
    python bench/families.py --only gemma3      # one

Architectures are the real ones where the config is known here (Qwen3-VL-2B from ../shared; Qwen2-VL-2B,
Qwen2.5-VL-3B, Gemma 3 4B and LLaVA-OneVision-0.5B as published; written out below), with the real image
processor settings; the tokenizer is vlcache's small test BPE (text token counts differ a little from the real
tokenizers, image token counts do not). Qwen3.5 has no small published vision size known here: it is measured
as Qwen3-VL-2B's text size with Qwen3.5's layer pattern (3 Gated DeltaNet : 1 full attention) and transformers'
default DeltaNet head sizes. Each model runs in its own process in the dtype --dtype auto picks. Writes
docs/benchmarks-families.md and .json (or --out-dir).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
SYSTEM = "You are a helpful AI assistant analyzing an image."
QUESTION = "What colors dominate the scene?"
PHOTO = SHARED / "images" / "astronaut.png"
FAMILIES = ["qwen2_vl_2b", "qwen2_5_vl_3b", "qwen3_vl_2b", "qwen3_5_hybrid_2b", "gemma3_4b", "llava_onevision_0_5b"]
LABELS = {
    "qwen2_vl_2b": "Qwen2-VL-2B", "qwen2_5_vl_3b": "Qwen2.5-VL-3B", "qwen3_vl_2b": "Qwen3-VL-2B",
    "qwen3_5_hybrid_2b": "Qwen3.5 hybrid (2B text size)", "gemma3_4b": "Gemma 3 4B",
    "llava_onevision_0_5b": "LLaVA-OneVision-0.5B",
}


# -- checkpoints ------------------------------------------------------------------------------------------------

def build(kind: str, folder: Path) -> None:
    import torch

    from vlcache.testing import SPECIAL_TOKENS, _save_processor, _train_tokenizer, build_random_checkpoint
    from vlcache.testing import families as fam

    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # initialise in bf16: a 4B model in float32 would need 17 GB to build
    if kind == "qwen3_vl_2b":
        build_random_checkpoint(SHARED / "models" / "qwen3-vl-2b-instruct" / "config.json", folder)
        return
    if kind in ("qwen2_vl_2b", "qwen2_5_vl_3b", "qwen3_5_hybrid_2b"):
        tokenizer = _train_tokenizer(vocab_size=400)
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
        special = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                       vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
        eos, pad = ids["<|im_end|>"], ids["<|endoftext|>"]
    if kind == "qwen2_vl_2b":
        from transformers import (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor,
                                  Qwen2VLProcessor, Qwen2VLVideoProcessor)

        config = Qwen2VLConfig(
            text_config=dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                             num_attention_heads=12, num_key_value_heads=2, rope_theta=1000000.0,
                             rope_scaling={"rope_type": "default", "mrope_section": [16, 24, 24]},
                             bos_token_id=pad, eos_token_id=eos, tie_word_embeddings=True),
            vision_config=dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, patch_size=14,
                               spatial_merge_size=2, temporal_patch_size=2),
            tie_word_embeddings=True, **special)
        model = Qwen2VLForConditionalGeneration(config)
        processor = Qwen2VLProcessor(
            image_processor=Qwen2VLImageProcessor(patch_size=14, merge_size=2, temporal_patch_size=2,
                                                  size={"shortest_edge": 3136, "longest_edge": 12845056}),
            tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor(), chat_template=fam.QWEN2_VL_TEMPLATE)
    elif kind == "qwen2_5_vl_3b":
        from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                                  Qwen2VLImageProcessor, Qwen2VLVideoProcessor)

        config = Qwen2_5_VLConfig(
            text_config=dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                             num_attention_heads=16, num_key_value_heads=2, rope_theta=1000000.0,
                             rope_scaling={"rope_type": "default", "mrope_section": [16, 24, 24]},
                             bos_token_id=pad, eos_token_id=eos, tie_word_embeddings=True),
            vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                               patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                               fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2),
            tie_word_embeddings=True, **special)
        model = Qwen2_5_VLForConditionalGeneration(config)
        processor = Qwen2_5_VLProcessor(
            image_processor=Qwen2VLImageProcessor(patch_size=14, merge_size=2, temporal_patch_size=2,
                                                  size={"shortest_edge": 3136, "longest_edge": 12845056}),
            tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor(), chat_template=fam.QWEN2_VL_TEMPLATE)
    elif kind == "qwen3_5_hybrid_2b":
        from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

        real = json.loads((SHARED / "models" / "qwen3-vl-2b-instruct" / "config.json").read_text())
        text, vision = real["text_config"], real["vision_config"]
        config = Qwen3_5Config(
            text_config=dict(vocab_size=151936, hidden_size=text["hidden_size"], intermediate_size=text["intermediate_size"],
                             num_hidden_layers=text["num_hidden_layers"], num_attention_heads=text["num_attention_heads"],
                             num_key_value_heads=text["num_key_value_heads"], head_dim=text["head_dim"],
                             rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "partial_rotary_factor": 0.25,
                                              "mrope_section": [11, 11, 10], "mrope_interleaved": True},
                             bos_token_id=pad, eos_token_id=eos, tie_word_embeddings=True),
            vision_config=dict(depth=vision["depth"], hidden_size=vision["hidden_size"],
                               intermediate_size=vision["intermediate_size"], num_heads=vision["num_heads"],
                               out_hidden_size=text["hidden_size"], patch_size=16, spatial_merge_size=2,
                               temporal_patch_size=2, num_position_embeddings=vision["num_position_embeddings"]),
            tie_word_embeddings=True, **special)
        config.text_config.head_dim = text["head_dim"]
        model = Qwen3_5ForConditionalGeneration(config)
        _save_processor(tokenizer, folder, chat_template=fam.QWEN3_5_TEMPLATE)
        processor = None
    elif kind == "gemma3_4b":
        import string

        from transformers import (Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessor, Gemma3Processor,
                                  GemmaTokenizer)

        specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                    "<end_of_image>", "<image_soft_token>"]
        vocab = {token: i for i, token in enumerate(specials)}
        for byte in range(256):
            vocab[f"<0x{byte:02X}>"] = len(vocab)
        for char in ["\u2581"] + [c for c in string.printable if c not in " \t\r\x0b\x0c"]:
            vocab.setdefault(char, len(vocab))
        tokenizer = GemmaTokenizer(vocab=vocab, merges=[], add_bos_token=True, extra_special_tokens={
            "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"})
        tokenizer.add_special_tokens({"extra_special_tokens": ["<start_of_turn>", "<end_of_turn>"]},
                                     replace_extra_special_tokens=False)
        config = Gemma3Config(
            text_config=dict(vocab_size=262208, hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
                             num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
                             sliding_window=1024, rope_theta=1000000.0, rope_local_base_freq=10000.0,
                             rope_scaling={"rope_type": "linear", "factor": 8.0},
                             pad_token_id=0, eos_token_id=[1, vocab["<end_of_turn>"]], bos_token_id=2),
            vision_config=dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304,
                               num_hidden_layers=27, num_attention_heads=16, image_size=896, patch_size=14,
                               vision_use_head=False),
            mm_tokens_per_image=256, boi_token_index=vocab["<start_of_image>"], eoi_token_index=vocab["<end_of_image>"],
            image_token_index=vocab["<image_soft_token>"])
        model = Gemma3ForConditionalGeneration(config)
        processor = Gemma3Processor(image_processor=Gemma3ImageProcessor(size={"height": 896, "width": 896}),
                                    tokenizer=tokenizer, chat_template=fam.GEMMA3_TEMPLATE, image_seq_length=256)
        eos, pad = [1, vocab["<end_of_turn>"]], 0
    elif kind == "llava_onevision_0_5b":
        from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                                  LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor)

        tokenizer = _train_tokenizer(vocab_size=400, extra_special=["<image>", "<video>"])
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>", "<image>", "<video>")}
        pinpoints = [[a * 384, b * 384] for a in range(1, 7) for b in range(1, 7)]
        config = LlavaOnevisionConfig(
            text_config=dict(model_type="qwen2", vocab_size=151647, hidden_size=896, intermediate_size=4864,
                             num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, rope_theta=1000000.0,
                             tie_word_embeddings=True),
            vision_config=dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304,
                               num_hidden_layers=26, num_attention_heads=16, image_size=384, patch_size=14,
                               vision_use_head=False),
            image_token_index=ids["<image>"], video_token_index=ids["<video>"], vision_feature_select_strategy="full",
            vision_feature_layer=-1, image_grid_pinpoints=pinpoints, vision_aspect_ratio="anyres_max_9",
            tie_word_embeddings=True)
        model = LlavaOnevisionForConditionalGeneration(config)
        processor = LlavaOnevisionProcessor(
            image_processor=LlavaOnevisionImageProcessor(size={"height": 384, "width": 384}, image_grid_pinpoints=pinpoints,
                                                         image_mean=[0.5] * 3, image_std=[0.5] * 3),
            tokenizer=tokenizer, video_processor=LlavaOnevisionVideoProcessor(), num_image_tokens=729,
            vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9", chat_template=fam.LLAVA_OV_TEMPLATE)
        eos, pad = ids["<|im_end|>"], ids["<|endoftext|>"]
    model = model.to(torch.bfloat16).eval()
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = pad
    model.save_pretrained(folder)
    if processor is not None:
        processor.save_pretrained(folder)


# -- one family, in its own process -------------------------------------------------------------------------

def measure(args: dict) -> dict:
    import torch

    from vlcache import Engine
    from vlcache.images import load_image
    from vlcache.prompt import conversation, template_messages

    engine = Engine.load(args["model"], device="cpu")
    out = {"dtype": str(engine.dtype).removeprefix("torch."), "dtype_reason": engine.dtype_reason,
           "layer_kinds": engine.family.layer_kinds()}
    # 1. Uncached: transformers' generate on the whole conversation, first token only (image processing included).
    messages = template_messages(engine.processor, conversation(SYSTEM, QUESTION, with_image=True))
    messages[-1]["content"][0]["image"] = load_image(args["photo"]).image
    start = time.perf_counter()
    inputs = engine.processor.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                                  return_dict=True, return_tensors="pt")
    with torch.inference_mode():
        engine.model.generate(**inputs, max_new_tokens=1, do_sample=False)
    out["uncached_ttft_s"] = time.perf_counter() - start
    out["prompt_tokens"] = int(inputs["input_ids"].shape[1])
    # 2. The state: caching time, bytes, file.
    start = time.perf_counter()
    state = engine.cache_image(args["photo"], system_prompt=SYSTEM)
    out["cache_s"] = time.perf_counter() - start
    path = state.save(Path(args["out"]) / f"{args['kind']}.safetensors")
    out.update(prefix_tokens=state.num_tokens, image_tokens=state.metadata.image_tokens, state_bytes=state.kv_bytes,
               file_bytes=path.stat().st_size)
    kinds = engine.family.layer_kinds()
    growing = sum(k.numel() * k.element_size() + v.numel() * v.element_size()
                  for (k, v), kind in zip(state.kv, kinds) if kind == "full_attention")
    out["bytes_per_token_full_layers"] = growing / state.num_tokens
    out["fixed_bytes"] = state.kv_bytes - growing  # sliding windows and linear-attention states: bounded
    # 3. Cached: a fresh load of the file, then the question.
    loaded = engine.load_state(path)
    engine.ask(loaded, QUESTION, max_new_tokens=1, temperature=0)  # warm-up
    out["cached_ttft_s"] = statistics.median(
        engine.ask(loaded, QUESTION, max_new_tokens=1, temperature=0).timings["ttft_s"] for _ in range(3))
    path.unlink()
    return out


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        "# Families at a real size (random weights, CPU)",
        "",
        f"CPU: {m['cpu']}, {m['cores']} cores, torch capability {m['capability']}, native bfloat16: {m['native_bf16'] or 'none'}; "
        f"torch {m['torch']}, transformers {m['transformers']}. Photograph: {PHOTO.name} ({SYSTEM!r} as system prompt), "
        f"question {QUESTION!r}. Uncached: one run of transformers' `generate` (first token, image processing "
        "included); cached: median of 3 `engine.ask` from a state loaded from its file. Each model in the dtype "
        "`--dtype auto` chose.",
        "",
        "State bytes per token count the full-attention layers' K/V, which grow with every token. Bounded state: "
        "linear-attention layers' conv and recurrent states (a fixed size whatever the length) and sliding-window "
        "layers' K/V (which grow until the window, 1,024 tokens for Gemma 3, then stay).",
        "",
        f"Command: `{results['command']}`",
        "",
        "| family | dtype | layers | image / prompt tokens | state bytes per token (full-attention layers) | "
        "bounded state bytes | file bytes | uncached TTFT | cached TTFT | speed-up |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for kind, r in results["families"].items():
        if "error" in r:
            lines.append(f"| {LABELS[kind]} | | | | | | | not measured: {r['error']} | | |")
            continue
        counts = {k: r["layer_kinds"].count(k) for k in dict.fromkeys(r["layer_kinds"])}
        layers = ", ".join(f"{n} {k.removesuffix('_attention')}" for k, n in counts.items())
        lines.append(
            f"| {LABELS[kind]} | {r['dtype']} | {layers} | {r['image_tokens']} / {r['prompt_tokens']} | "
            f"{r['bytes_per_token_full_layers']:,.0f} | {r['fixed_bytes']:,} | {r['file_bytes']:,} | "
            f"{r['uncached_ttft_s']:.2f} s | {r['cached_ttft_s']:.3f} s | {r['uncached_ttft_s'] / r['cached_ttft_s']:.0f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", choices=FAMILIES, help="measure only these (repeatable)")
    parser.add_argument("--work-dir", default=str(Path.home() / ".cache" / "vlcache-bench"))
    parser.add_argument("--out-dir", default=str(REPO / "docs"))
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # internal: one family, JSON args
    parser.add_argument("--build", default=None, help=argparse.SUPPRESS)  # internal: KIND=FOLDER
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(json.loads(args.measure))))
        return 0
    if args.build:
        kind, folder = args.build.split("=", 1)
        build(kind, Path(folder))
        return 0
    sys.path.insert(0, str(REPO / "src"))
    sys.path.insert(0, str(REPO / "bench"))
    from dtype import cpu_facts  # noqa: E402 - bench/dtype.py

    import transformers

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src")}
    work = Path(args.work_dir)
    results = {"machine": {**cpu_facts(), "transformers": transformers.__version__}, "families": {},
               "command": "python bench/families.py " + " ".join(argv or sys.argv[1:])}
    for kind in args.only or FAMILIES:
        folder = work / ("qwen3-vl-2b-random" if kind == "qwen3_vl_2b" else f"family-{kind}")  # bench/run.py's too
        if not (folder / "config.json").exists():
            print(f"building {kind} ...", file=sys.stderr)
            done = subprocess.run([sys.executable, __file__, "--build", f"{kind}={folder}"], capture_output=True, text=True, env=env)
            if done.returncode != 0:
                results["families"][kind] = {"error": done.stderr.strip().splitlines()[-1][:200]}
                continue
        print(f"measuring {kind} ...", file=sys.stderr)
        job = {"kind": kind, "model": str(folder), "photo": str(PHOTO), "out": str(work)}
        done = subprocess.run([sys.executable, __file__, "--measure", json.dumps(job)], capture_output=True, text=True, env=env)
        if done.returncode != 0:
            results["families"][kind] = {"error": (done.stderr.strip().splitlines() or ["killed"])[-1][:200]}
            continue
        results["families"][kind] = json.loads(done.stdout.strip().splitlines()[-1])
        print(json.dumps(results["families"][kind]), file=sys.stderr)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmarks-families.json").write_text(json.dumps(results, indent=2))
    (out / "benchmarks-families.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
