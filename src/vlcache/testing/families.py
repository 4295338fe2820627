"""Tiny random checkpoints of every supported family, each with that family's real processor classes and a
chat template shaped like the real one, saved with save_pretrained so tests load them as users load models.

    build_family_checkpoint("qwen2_5_vl", folder)

Kinds: qwen2_vl, qwen2_5_vl, qwen3_vl, qwen3_vl_moe, qwen3_vl_real (Qwen3-VL-2B-Instruct's real tokenizer,
template and processor settings from ../shared), llava_onevision.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from . import CHAT_TEMPLATE, CORPUS, SPECIAL_TOKENS, _train_tokenizer, build_tiny_checkpoint, builder, gemma_tokenizer
from .more_families import MORE_KINDS
from .more_families import build as build_more

REAL_QWEN3_VL = Path(__file__).resolve().parents[4] / "shared" / "models" / "qwen3-vl-2b-instruct"

# Qwen2-VL-*-Instruct and Qwen2.5-VL-*-Instruct: a default system turn when the conversation has none.
QWEN2_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# llava-hf/llava-onevision-qwen2-*-hf (as in transformers' own processor tests): images of a message first,
# then its texts, each after a newline; answers re-render as "assistant \n" (a space), prompts as "assistant\n".
LLAVA_OV_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\\n' + content['text'] }}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ '\\n' + content['text'] }}{% endgeneration %}{% endfor %}{% endif %}"
    "{{'<|im_end|>'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# google/gemma-3-*-it: the system prompt joins the first user turn; images are <start_of_image>, which the
# processor expands to "\n\n<start_of_image>" + soft tokens + "<end_of_image>\n\n".
GEMMA3_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}"""

# Qwen3.5 thinks: its generation prompt opens a <think> block; earlier answers re-render without it.
QWEN3_5_TEMPLATE = CHAT_TEMPLATE.replace("{{ '<|im_start|>assistant\\n' }}", "{{ '<|im_start|>assistant\\n<think>\\n' }}")

KINDS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_vl_real", "llava_onevision", "gemma3", "qwen3_5",
         "qwen3_5_moe", *MORE_KINDS)


def build_family_checkpoint(kind: str, folder: Path, seed: int = 0, init_std: float = 0.2) -> Path:
    """Write a tiny random checkpoint of `kind` to `folder` (loadable with from_pretrained) and return it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "qwen3_vl":
        return build_tiny_checkpoint(folder, seed=seed, init_std=init_std)
    builders = {
        "qwen2_vl": _qwen2_vl, "qwen2_5_vl": _qwen2_5_vl, "qwen3_vl_moe": _qwen3_vl_moe,
        "qwen3_vl_real": _qwen3_vl_real, "llava_onevision": _llava_onevision, "gemma3": _gemma3,
        "qwen3_5": _qwen3_5, "qwen3_5_moe": _qwen3_5,
    }
    if kind in MORE_KINDS:
        build_more(kind, folder, seed, init_std)
        return folder
    if kind not in builders:
        raise ValueError(f"unknown kind {kind!r}; one of {', '.join(KINDS)}")
    if kind == "qwen3_5_moe":
        _qwen3_5(folder, seed, init_std, moe=True)
    else:
        builders[kind](folder, seed, init_std)
    return folder


# -- shared pieces ---------------------------------------------------------------------------------------------

def _text(tokenizer, ids: dict, init_std: float, **extra) -> dict:
    config = dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, rope_theta=10000.0,
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        initializer_range=init_std, tie_word_embeddings=False,
    )
    config.update(extra)
    return config


def _vision_ids(ids: dict) -> dict:
    return dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])


def _qwen_tokenizer():
    tokenizer = _train_tokenizer(vocab_size=400)
    return tokenizer, {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}


# -- the families ----------------------------------------------------------------------------------------------

def _qwen2_family(folder: Path, seed: int, init_std: float, config_class, model_class, processor_class, vision: dict) -> None:
    """Qwen2-VL and Qwen2.5-VL: the same text model, tokenizer, template and image processor; their own vision."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    tokenizer, ids = _qwen_tokenizer()
    config = config_class(
        text_config=_text(tokenizer, ids, init_std, rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3]}),
        vision_config={**vision, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
                       "initializer_range": init_std},
        tie_word_embeddings=False, **_vision_ids(ids),
    )
    builder.save_model(model_class, config, folder, seed, init_std, ids["<|im_end|>"], ids["<|endoftext|>"])
    image = Qwen2VLImageProcessor(patch_size=14, merge_size=2, temporal_patch_size=2,
                                  size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280})
    processor_class(image_processor=image, tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor(),
                    chat_template=QWEN2_VL_TEMPLATE).save_pretrained(folder)


def _qwen2_vl(folder: Path, seed: int, init_std: float) -> None:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    _qwen2_family(folder, seed, init_std, Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor,
                  dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2))


def _qwen2_5_vl(folder: Path, seed: int, init_std: float) -> None:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    _qwen2_family(folder, seed, init_std, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                  dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, window_size=56,
                       fullatt_block_indexes=[1], tokens_per_second=2))


def _qwen3_vision(init_std: float) -> dict:
    return dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=16,
                spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=256, deepstack_visual_indexes=[0],
                initializer_range=init_std)


def _qwen3_vl_moe(folder: Path, seed: int, init_std: float) -> None:
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    from . import _save_processor

    tokenizer, ids = _qwen_tokenizer()
    config = Qwen3VLMoeConfig(
        text_config=_text(tokenizer, ids, init_std, head_dim=16, moe_intermediate_size=32, num_experts=4,
                          num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[],
                          rope_scaling={"rope_type": "default", "mrope_section": [4, 2, 2], "mrope_interleaved": True}),
        vision_config=_qwen3_vision(init_std), tie_word_embeddings=False, **_vision_ids(ids),
    )
    builder.save_model(Qwen3VLMoeForConditionalGeneration, config, folder, seed, init_std, ids["<|im_end|>"], ids["<|endoftext|>"],
                       randomize=("language_model", "lm_head", "experts", "gate"))
    _save_processor(tokenizer, folder)


def _qwen3_vl_real(folder: Path, seed: int, init_std: float) -> None:
    """Qwen3-VL-2B-Instruct's real tokenizer (151,669 tokens), chat template and processor, tiny random weights."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    if not REAL_QWEN3_VL.is_dir():
        raise FileNotFoundError(f"the real Qwen3-VL processor files are missing: {REAL_QWEN3_VL}")
    real = json.loads((REAL_QWEN3_VL / "config.json").read_text())
    special = {k: real[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")}
    text = real["text_config"]
    config = Qwen3VLConfig(
        text_config=dict(
            vocab_size=text["vocab_size"], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, rope_theta=10000.0,
            rope_scaling={"rope_type": "default", "mrope_section": [4, 2, 2], "mrope_interleaved": True},
            bos_token_id=text["bos_token_id"], eos_token_id=text["eos_token_id"], initializer_range=init_std,
            tie_word_embeddings=False,
        ),
        vision_config=_qwen3_vision(init_std), tie_word_embeddings=False, **special,
    )
    builder.save_model(Qwen3VLForConditionalGeneration, config, folder, seed, init_std, 151645, 151643)
    for name in ("chat_template.jinja", "merges.txt", "vocab.json", "tokenizer.json", "tokenizer_config.json",
                 "preprocessor_config.json", "video_preprocessor_config.json"):
        shutil.copy(REAL_QWEN3_VL / name, folder / name)
    generation = json.loads((REAL_QWEN3_VL / "generation_config.json").read_text())  # samples by default, as real
    (folder / "generation_config.json").write_text(json.dumps(generation))


def _llava_onevision(folder: Path, seed: int, init_std: float) -> None:
    """SigLIP on 32-pixel crops (16 tokens each), tiles up to 2x2, a Qwen2 text model: plain 1D RoPE."""
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionImageProcessor,
                              LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor, Qwen2Tokenizer)

    del Qwen2Tokenizer
    crop, patch = 32, 8
    pinpoints = [[a * crop, b * crop] for a in (1, 2) for b in (1, 2)]
    tokenizer = _train_tokenizer(vocab_size=400, extra_special=["<image>", "<video>"])
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>", "<image>", "<video>")}
    config = LlavaOnevisionConfig(
        text_config=dict(model_type="qwen2", **_text(tokenizer, ids, init_std, rope_theta=1000000.0)),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=crop, patch_size=patch, vision_use_head=False),
        image_token_index=ids["<image>"], video_token_index=ids["<video>"], vision_feature_select_strategy="full",
        vision_feature_layer=-1, image_grid_pinpoints=pinpoints, vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=False, initializer_range=init_std,
    )
    builder.save_model(LlavaOnevisionForConditionalGeneration, config, folder, seed, init_std, ids["<|im_end|>"], ids["<|endoftext|>"])
    LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size={"height": crop, "width": crop}, image_grid_pinpoints=pinpoints,
                                                     image_mean=[0.5] * 3, image_std=[0.5] * 3),
        tokenizer=tokenizer,
        video_processor=LlavaOnevisionVideoProcessor(size={"height": crop, "width": crop}, image_mean=[0.5] * 3, image_std=[0.5] * 3),
        num_image_tokens=(crop // patch) ** 2, vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
        chat_template=LLAVA_OV_TEMPLATE,
    ).save_pretrained(folder)


GEMMA3_SLIDING_WINDOW = 8  # tiny, so that every cached prefix is longer than the window
GEMMA3_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                   "<end_of_image>", "<image_soft_token>"]
GEMMA3_NAMED = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}


def _gemma3(folder: Path, seed: int, init_std: float) -> None:
    """Gemma 3: 3 sliding-window layers (window 8) and 1 full layer, 4 image tokens from 32-pixel images."""
    init_std = 0.02  # Gemma's scaled embeddings and (1 + w) norms saturate into one repeated token above this
    seed += 2  # at this size seed 0 repeats a few tokens; 2 gives 6-11 distinct tokens in 12 (checked on 4 photos)

    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessor, Gemma3Processor

    tokenizer, vocab = gemma_tokenizer(GEMMA3_SPECIALS, GEMMA3_NAMED, ["<start_of_turn>", "<end_of_turn>"])
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    config = Gemma3Config(
        text_config=dict(
            vocab_size=((len(vocab) + 63) // 64) * 64, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=2, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32,
            sliding_window=GEMMA3_SLIDING_WINDOW, max_position_embeddings=4096,
            layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
            pad_token_id=0, eos_token_id=[1, end_of_turn], bos_token_id=2, initializer_range=init_std,
        ),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=32, patch_size=8),
        mm_tokens_per_image=4, boi_token_index=vocab["<start_of_image>"], eoi_token_index=vocab["<end_of_image>"],
        image_token_index=vocab["<image_soft_token>"], initializer_range=init_std,
    )
    builder.save_model(Gemma3ForConditionalGeneration, config, folder, seed, init_std, [1, end_of_turn], 0,
                       randomize=("language_model", "lm_head", "multi_modal_projector", "mm_input_projection"))
    Gemma3Processor(image_processor=Gemma3ImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer,
                    chat_template=GEMMA3_TEMPLATE, image_seq_length=4).save_pretrained(folder)


def _qwen3_5(folder: Path, seed: int, init_std: float, moe: bool = False) -> None:
    """Qwen3.5: 3 Gated DeltaNet (linear-attention) layers then 1 full-attention layer, M-RoPE on a quarter of
    each head; Qwen3-VL's processor classes (as transformers maps qwen3_5 to them)."""
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration, Qwen3_5MoeConfig
    from transformers import Qwen3_5MoeForConditionalGeneration

    from . import _save_processor

    tokenizer, ids = _qwen_tokenizer()
    text = _text(tokenizer, ids, init_std, num_hidden_layers=4, head_dim=32,
                 layer_types=["linear_attention"] * 3 + ["full_attention"], linear_conv_kernel_dim=4,
                 linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                                  "mrope_section": [2, 1, 1], "mrope_interleaved": True})
    del text["rope_theta"]
    if moe:
        text.update(moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2)
    config_class, model_class = ((Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration) if moe
                                 else (Qwen3_5Config, Qwen3_5ForConditionalGeneration))
    vision = _qwen3_vision(init_std)
    del vision["deepstack_visual_indexes"]
    config = config_class(text_config=text, vision_config=vision, tie_word_embeddings=False, **_vision_ids(ids))
    builder.save_model(model_class, config, folder, seed, init_std, ids["<|im_end|>"], ids["<|endoftext|>"], randomize=(),
                       adjust=_long_memory)
    _save_processor(tokenizer, folder, chat_template=QWEN3_5_TEMPLATE)


def _long_memory(model) -> None:
    """Slow decays (per-token factors of about 0.9-0.999), as trained DeltaNet heads have: with the default
    initialisation the recurrent state forgets within a token and a lost state would go unnoticed."""
    generator = torch.Generator().manual_seed(0)
    for name, param in model.named_parameters():
        if name.endswith("linear_attn.A_log"):
            param.copy_(torch.empty(param.shape).uniform_(-7, -2.5, generator=generator))
        elif name.endswith("linear_attn.dt_bias"):
            param.zero_()


__all__ = ["CORPUS", "KINDS", "build_family_checkpoint"]
