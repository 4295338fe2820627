#!/usr/bin/env python3
"""Per family at a real size (random weights, CPU): bytes of state per token, file size for one photograph,
and time to first token cached vs uncached.

    python bench/families.py                                  # every family below
    python bench/families.py --only gemma3_4b                 # one (repeatable); rewrites the report with it alone
    python bench/families.py --only llama4_scout --merge      # replaces just that row of the report in --out-dir

Architectures are the real ones where the config is known here (Qwen3-VL-2B from ../shared; Qwen2-VL-2B,
Qwen2.5-VL-3B, Gemma 3 4B, LLaVA-OneVision-0.5B and the newer families as published; written out below, with
each newer family's sources in NOTES, printed under the table), with the real image processor settings; the
tokenizer is a small test tokenizer (text token counts differ a little from the real tokenizers, image token
counts do not). The newer families are vlcache.testing.more_families' tiny builders given real sizes.

Reduced, and said so in the row's label: Qwen3.5 has no small published vision size known here, so it is
Qwen3-VL-2B's text size with Qwen3.5's layer pattern (3 Gated DeltaNet : 1 full attention) and transformers'
default DeltaNet head sizes. GLM-4.1V-9B (~10B parameters) is built with 10 of its 40 text layers, Llama 4 Scout
(109B) with 4 of 48 (one period: 3 chunked, 1 global) and 1 of 16 routed experts, so each fits in 8 GiB of
bfloat16; every layer's own sizes are real, so bytes per token per layer are, and the report scales them to the
full depth (time to first token it cannot scale). Everything else is built whole (Gemma 4 E2B: 5.1B parameters
with its per-layer embeddings and audio tower, 9.5 GiB).

Each model is built once (bfloat16, into --work-dir: about 75 GB for all fourteen) and measured in its own
process in the dtype --dtype auto picks. On the 2-core CPU this was written on, shared with other work, the
newer families took 1 to 5 minutes each (build and measure; SmolVLM2's 1,377 image tokens the longest) and all
fourteen about 45 minutes. Writes docs/benchmarks-families.md and .json (or --out-dir).
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
FAMILIES = ["qwen2_vl_2b", "qwen2_5_vl_3b", "qwen3_vl_2b", "qwen3_5_hybrid_2b", "gemma3_4b", "llava_onevision_0_5b",
            "glm4v_9b", "internvl3_5_1b", "smolvlm2_2_2b", "ministral3_3b", "paddleocr_vl_0_9b", "lfm2_vl_1_6b",
            "llama4_scout", "gemma4_e2b"]
LABELS = {
    "qwen2_vl_2b": "Qwen2-VL-2B", "qwen2_5_vl_3b": "Qwen2.5-VL-3B", "qwen3_vl_2b": "Qwen3-VL-2B",
    "qwen3_5_hybrid_2b": "Qwen3.5 hybrid (2B text size)", "gemma3_4b": "Gemma 3 4B",
    "llava_onevision_0_5b": "LLaVA-OneVision-0.5B", "glm4v_9b": "GLM-4.1V-9B (10 of 40 text layers)",
    "internvl3_5_1b": "InternVL3.5-1B", "smolvlm2_2_2b": "SmolVLM2-2.2B", "ministral3_3b": "Ministral 3 3B (Mistral 3)",
    "paddleocr_vl_0_9b": "PaddleOCR-VL 0.9B", "lfm2_vl_1_6b": "LFM2-VL-1.6B",
    "llama4_scout": "Llama 4 Scout (4 of 48 text layers, 1 of 16 experts)", "gemma4_e2b": "Gemma 4 E2B",
}
# Where each newer family's numbers come from, and what was reduced (printed under the table).
NOTES = {
    "glm4v_9b": "zai-org/GLM-4.1V-9B-Thinking (transformers' Glm4vConfig defaults; processor pixels as published). "
                "~10B parameters (20 GB in bfloat16) are too many for a 24 GiB machine shared with other work: 10 of "
                "the 40 text layers; vision tower, embeddings and every layer's sizes real. Bytes per token scale "
                "exactly with the layers (the full-depth column); time to first token does not.",
    "internvl3_5_1b": "OpenGVLab/InternVL3_5-1B: Qwen3-0.6B text (its published config.json), InternViT-300M-448px "
                      "(1024 wide, 24 layers), 448-pixel tiles, up to 12 and a thumbnail, 256 tokens a tile. Output "
                      "embeddings untied (1.06B parameters, as the published 1.1B total implies; Qwen3-0.6B alone ties them).",
    "smolvlm2_2_2b": "HuggingFaceTB/SmolVLM2-2.2B-Instruct: SmolLM2-1.7B text (its published config.json; vocabulary "
                     "49,280 with the image tokens), SigLIP so400m at 384 pixels, pixel shuffle 3 (81 tokens a tile), "
                     "images resized to 1,536 pixels at most and cut into 384-pixel tiles.",
    "ministral3_3b": "mistralai/Ministral-3-3B-Instruct-2512, the smallest Mistral 3 with Pixtral vision: ministral3 "
                     "text 3072 wide, 26 layers, 32 heads / 8 K/V heads of 128, MLP 9216 (published config); Pixtral "
                     "tower as transformers' Mistral3Config default (1024 wide, 24 layers, 1540 pixels, patch 14). Embeddings "
                     "tied (3.43B text parameters, the published 3.4B); the YaRN settings are transformers' Ministral3Config "
                     "defaults, not read from the 3B's own file.",
    "paddleocr_vl_0_9b": "PaddlePaddle/PaddleOCR-VL (transformers' PaddleOCRVLConfig and image processor defaults): "
                         "ERNIE-4.5-0.3B text, 1152-wide NaViT vision of 27 layers, M-RoPE.",
    "lfm2_vl_1_6b": "LiquidAI/LFM2-VL-1.6B: LFM2-1.2B text (16 layers: 10 short-convolution, 6 attention), SigLIP2 "
                    "NaFlex 400M read at its second-to-last layer (26 of 27 layers run), 512-pixel tiles, 64 to 256 "
                    "tokens an image (transformers' Lfm2VlImageProcessor defaults).",
    "llama4_scout": "meta-llama/Llama-4-Scout-17B-16E (published config.json). 109B parameters cannot be built here: "
                    "4 of the 48 text layers (3 chunked, 1 global without RoPE: one period of the real pattern) and 1 "
                    "of the 16 routed experts per layer (the shared expert stays). Attention, embeddings and the 34-layer "
                    "vision tower are real, so bytes per token per layer are; the full-depth column scales them to 36 "
                    "chunked + 12 global layers. Chunked layers hold at most one 8,192-token chunk. transformers runs "
                    "every expert on every token, so the real model's prefill would be slower than measured here.",
    "gemma4_e2b": "google/gemma-4-E2B-it (its published text config; vision 768 wide as transformers' Gemma4VisionConfig "
                  "defaults for E2B, clipped linears; the audio tower at transformers' E2B defaults): 35 layers, 28 "
                  "sliding (512) and 7 full, the last 20 reading the K/V of earlier layers (num_kv_shared_layers: they "
                  "store nothing), per-layer embeddings, a budget of 280 tokens an image. The tiny builder's MoE, keys "
                  "as values and bidirectional image tokens are off, as in E2B.",
}
# Reduced-depth models: the real layer kinds, to scale bytes per token from the layers built to the full model.
FULL_DEPTH = {
    "glm4v_9b": ["full_attention"] * 40,
    "llama4_scout": (["chunked_attention"] * 3 + ["full_attention"]) * 12,
}


# -- checkpoints ------------------------------------------------------------------------------------------------

# The newer families: vlcache.testing.more_families' tiny builders (tokenizer, template, processor classes) with
# these real sizes in place of the tiny ones (see NOTES for the sources and what was reduced).
_LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
_MINISTRAL3_ROPE = {"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 16.0, "original_max_position_embeddings": 16384,
                    "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.1}
_LFM2_LAYERS = ["full_attention" if i in (2, 5, 8, 10, 12, 14) else "conv" for i in range(16)]
REAL_SIZES = {
    "glm4v_9b": ("glm4v", {
        "text": dict(vocab_size=151552, hidden_size=4096, intermediate_size=13696, num_hidden_layers=10,
                     num_attention_heads=32, num_key_value_heads=2, max_position_embeddings=65536,
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12],
                                      "partial_rotary_factor": 0.5}),
        "vision": dict(depth=24, hidden_size=1536, intermediate_size=13696, num_heads=12, out_hidden_size=4096,
                       patch_size=14, spatial_merge_size=2, temporal_patch_size=2, image_size=336),
        "image": dict(size={"shortest_edge": 12544, "longest_edge": 9633792}),
        "video": dict(size={"shortest_edge": 12544, "longest_edge": 47040000}),
    }),
    "internvl3_5_1b": ("internvl", {
        "text": dict(model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                     num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                     rope_theta=1000000.0, tie_word_embeddings=False),
        "vision": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       image_size=[448, 448], patch_size=[14, 14], attention_bias=True),
        "config": dict(image_seq_length=256, tie_word_embeddings=False),
        "image": dict(size={"height": 448, "width": 448}, max_patches=12),
        "video": dict(size={"height": 448, "width": 448}),
        "processor": dict(image_seq_length=256),
    }),
    "smolvlm2_2_2b": ("smolvlm", {
        "text": dict(vocab_size=49280, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                     num_attention_heads=32, num_key_value_heads=32, head_dim=64, rope_theta=130000.0,
                     max_position_embeddings=8192),
        "vision": dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                       image_size=384, patch_size=14),
        "config": dict(scale_factor=3),
        "image": dict(size={"longest_edge": 1536}, max_image_size={"longest_edge": 384}),
        "video": dict(video_sampling={"fps": 1, "max_frames": 64, "video_size": {"longest_edge": 384}},
                      max_image_size={"longest_edge": 384}),
        "processor": dict(image_seq_len=81),
    }),
    "ministral3_3b": ("mistral3", {
        "text": dict(model_type="ministral3", vocab_size=131072, hidden_size=3072, intermediate_size=9216,
                     num_hidden_layers=26, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     max_position_embeddings=262144, rope_theta=1000000.0, rope_parameters=_MINISTRAL3_ROPE,
                     tie_word_embeddings=True),
        "vision": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       image_size=1540, patch_size=14),
        "config": dict(tie_word_embeddings=True, multimodal_projector_bias=False),
        "image": dict(size={"longest_edge": 1540}, patch_size=14),
        "processor": dict(patch_size=14, spatial_merge_size=2),
    }),
    "paddleocr_vl_0_9b": ("paddleocr_vl", {
        "text": dict(vocab_size=103424, hidden_size=1024, intermediate_size=3072, num_hidden_layers=18,
                     num_attention_heads=16, num_key_value_heads=2, head_dim=128, max_position_embeddings=131072,
                     rope_parameters={"rope_type": "default", "rope_theta": 500000.0, "mrope_section": [16, 24, 24]},
                     tie_word_embeddings=True),
        "vision": dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                       image_size=384, patch_size=14, spatial_merge_size=2),
        "config": dict(tie_word_embeddings=True),
        "image": dict(size={"shortest_edge": 147456, "longest_edge": 2359296}),
    }),
    "lfm2_vl_1_6b": ("lfm2_vl", {
        "text": dict(vocab_size=65536, hidden_size=2048, intermediate_size=12288, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, layer_types=_LFM2_LAYERS, conv_L_cache=3,
                     block_auto_adjust_ff_dim=True, block_multiple_of=256, block_ffn_dim_multiplier=1.0,
                     max_position_embeddings=128000, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                     tie_word_embeddings=True),
        "vision": dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16,
                       patch_size=16, num_patches=256),
        "config": dict(projector_hidden_size=2560, tie_word_embeddings=True),
        "image": dict(encoder_patch_size=16, tile_size=512, min_image_tokens=64, max_image_tokens=256,
                      do_image_splitting=True),  # max_num_patches follows from these: 1,024
    }),
    "llama4_scout": ("llama4", {
        "text": dict(vocab_size=202048, hidden_size=5120, intermediate_size=8192, intermediate_size_mlp=16384,
                     num_hidden_layers=4, num_attention_heads=40, num_key_value_heads=8, head_dim=128,
                     num_local_experts=1, num_experts_per_tok=1, interleave_moe_layer_step=1, attention_chunk_size=8192,
                     floor_scale=8192, attn_scale=0.1, max_position_embeddings=262144, rope_parameters=_LLAMA3_ROPE),
        "vision": dict(hidden_size=1408, intermediate_size=5632, num_hidden_layers=34, num_attention_heads=16,
                       image_size=336, patch_size=14, vision_output_dim=4096, projector_input_dim=4096,
                       projector_output_dim=4096, multi_modal_projector_bias=False),
        "image": dict(size={"height": 336, "width": 336}, max_patches=16),
    }),
}

# google/gemma-4-E2B-it's text config as published; vision at transformers' E2B defaults (clipped linears, 768 wide).
GEMMA4_E2B_TEXT = dict(
    vocab_size=262144, hidden_size=1536, intermediate_size=6144, num_hidden_layers=35, num_attention_heads=8,
    num_key_value_heads=1, head_dim=256, global_head_dim=512, sliding_window=512, max_position_embeddings=131072,
    layer_types=(["sliding_attention"] * 4 + ["full_attention"]) * 7, num_kv_shared_layers=20,
    hidden_size_per_layer_input=256, vocab_size_per_layer_input=262144, use_double_wide_mlp=True,
    final_logit_softcapping=30.0, hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
    rope_parameters={"full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0},
                     "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})
GEMMA4_E2B_VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=16, num_attention_heads=12,
                         num_key_value_heads=12, head_dim=64, patch_size=16, pooling_kernel_size=3,
                         position_embedding_size=10240, use_clipped_linears=True, standardize=False)
REAL_SIZES["gemma4_e2b"] = ("gemma4", {
    # the tiny model's other kinds of state off: E2B has no MoE, no keys-as-values, no bidirectional image tokens
    "text": dict(GEMMA4_E2B_TEXT, num_global_key_value_heads=None, attention_k_eq_v=False, use_bidirectional_attention=None,
                 enable_moe_block=False, num_experts=None, top_k_experts=None, moe_intermediate_size=None),
    "vision": GEMMA4_E2B_VISION,
    "config": dict(audio_config={}),  # the audio tower at transformers' E2B defaults
    "image": dict(patch_size=16, max_soft_tokens=280, pooling_kernel_size=3),
    "video": dict(patch_size=16, max_soft_tokens=70, pooling_kernel_size=3, num_frames=32),
})


def build(kind: str, folder: Path) -> None:
    import torch

    from vlcache.testing import SPECIAL_TOKENS, _save_processor, _train_tokenizer, build_random_checkpoint
    from vlcache.testing import families as fam

    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # initialise in bf16: a 4B model in float32 would need 17 GB to build
    if kind in REAL_SIZES:
        from vlcache.testing.more_families import build as build_more

        tiny_kind, sizes = REAL_SIZES[kind]
        folder.mkdir(parents=True, exist_ok=True)
        build_more(tiny_kind, folder, seed=0, init_std=0.02, sizes=sizes)  # the usual 0.02: real sizes need no widening
        return
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
        from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessor, Gemma3Processor

        from vlcache.testing import gemma_tokenizer

        tokenizer, vocab = gemma_tokenizer(fam.GEMMA3_SPECIALS, fam.GEMMA3_NAMED, ["<start_of_turn>", "<end_of_turn>"])
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
    # pixels in the model's dtype, as vlcache passes them (some vision towers do not cast them themselves)
    inputs = {k: v.to(engine.dtype) if torch.is_floating_point(v) else v for k, v in inputs.items()}
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
    # The kinds the file records beside each stored layer (a layer that reads another's K/V may store nothing).
    kinds = state.metadata.layer_kinds or ["full_attention"] * len(state.kv)
    by_kind: dict[str, int] = {}
    for (k, v), kind in zip(state.kv, kinds, strict=True):
        kind = _grouped(kind)
        by_kind[kind] = by_kind.get(kind, 0) + sum(t.numel() * t.element_size() for t in (k, v) if t is not None)
    out["bytes_by_kind"] = by_kind
    growing = by_kind.get("full_attention", 0)
    out["bytes_per_token_full_layers"] = growing / state.num_tokens
    out["fixed_bytes"] = state.kv_bytes - growing  # sliding windows, chunks, conv and linear-attention states: bounded
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
        "linear-attention layers' conv and recurrent states and LFM2's short-convolution windows (a fixed size whatever "
        "the length), sliding-window layers' K/V (which grow until the window, 1,024 tokens for Gemma 3, 512 for "
        "Gemma 4, then stay) and Llama 4's chunked layers (at most one 8,192-token chunk; a prompt this short is all "
        "in its first chunk). Layers that read another layer's K/V (Gemma 4's last 20) store nothing. Full depth, for "
        "a model built with fewer layers: both state columns with each layer kind's measured bytes per layer times "
        "the real model's count of that kind.",
        "",
        "Commands: " + ", ".join(f"`{c}`" for c in _commands(results)),
        "",
        "| family | dtype | layers | image / prompt tokens | state bytes per token (full-attention layers) | "
        "bounded state bytes | full depth: per token / bounded | file bytes | uncached TTFT | cached TTFT | speed-up |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for kind, r in results["families"].items():
        if "error" in r:
            lines.append(f"| {LABELS.get(kind, kind)} | | | | | | | | not measured: {r['error']} | | |")
            continue
        kinds = [_grouped(k) for k in r["layer_kinds"]]
        counts = {k: kinds.count(k) for k in dict.fromkeys(kinds)}
        layers = ", ".join(f"{n} {k.removesuffix('_attention')}" for k, n in counts.items())
        lines.append(
            f"| {LABELS.get(kind, kind)} | {r['dtype']} | {layers} | {r['image_tokens']} / {r['prompt_tokens']} | "
            f"{r['bytes_per_token_full_layers']:,.0f} | {r['fixed_bytes']:,} | {_full_depth(kind, r)} | "
            f"{r['file_bytes']:,} | {r['uncached_ttft_s']:.2f} s | {r['cached_ttft_s']:.3f} s | "
            f"{r['uncached_ttft_s'] / r['cached_ttft_s']:.0f}x |")
    notes = [f"- {LABELS.get(kind, kind)}: {NOTES[kind]}" for kind in results["families"] if kind in NOTES]
    if notes:
        lines += ["", "Sources and reductions:", "", *notes]
    return "\n".join(lines) + "\n"


def _commands(results: dict) -> list[str]:
    return results.get("commands") or [results["command"]]


def _full_depth(kind: str, r: dict) -> str:
    """The two state columns at the real depth: each layer kind's bytes per layer as measured, times the real
    model's count of that kind (exact: a layer's state depends on its own sizes only)."""
    if kind not in FULL_DEPTH or "bytes_by_kind" not in r:
        return "as measured"
    scaled = {k: b / r["layer_kinds"].count(k) * FULL_DEPTH[kind].count(k) for k, b in r["bytes_by_kind"].items()}
    growing = scaled.pop("full_attention", 0) / r["prefix_tokens"]
    return f"{growing:,.0f} / {sum(scaled.values()):,.0f} ({len(FULL_DEPTH[kind])} layers)"


def _grouped(kind: str) -> str:
    """A layer's kind, shared layers together whatever layer they read ("shared_attention:<source>")."""
    from vlcache.header import SHARED, shared_source

    return SHARED if shared_source(kind) is not None else kind


def _merged(old: dict, new: dict) -> dict:
    """The old report with the rows measured now in place of its own (in FAMILIES' order) and both commands."""
    if old.get("machine") != new["machine"]:
        print("warning: the kept rows were measured on another machine or software version than the new ones "
              f"({old.get('machine')})", file=sys.stderr)
    rows = {**old["families"], **new["families"]}
    order = [k for k in FAMILIES if k in rows] + [k for k in rows if k not in FAMILIES]
    return {"machine": new["machine"], "families": {k: rows[k] for k in order},
            "commands": [*_commands(old), new["command"]], "command": new["command"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", choices=FAMILIES, help="measure only these (repeatable)")
    parser.add_argument("--work-dir", default=str(Path.home() / ".cache" / "vlcache-bench"))
    parser.add_argument("--out-dir", default=str(REPO / "docs"))
    parser.add_argument("--merge", action="store_true",
                        help="keep the other families' rows of the report already in --out-dir; replace only those measured now")
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
    if args.merge and (out / "benchmarks-families.json").exists():
        results = _merged(json.loads((out / "benchmarks-families.json").read_text()), results)
    (out / "benchmarks-families.json").write_text(json.dumps(results, indent=2))
    (out / "benchmarks-families.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
