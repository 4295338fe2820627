"""Tiny random checkpoints of the families added after the first eight (GLM-4.xV, PaddleOCR-VL, InternVL,
SmolVLM/Idefics3, Mistral 3, and LLaVA-NeXT as an unlisted model for `vlcache check`), each with the family's
real processor classes and a chat template shaped like the real one, saved with save_pretrained.

    build_family_checkpoint("glm4v", folder)   # from vlcache.testing.families

bench/families.py builds the same families at their real published sizes through `build(..., sizes=...)`.
"""

from __future__ import annotations

from pathlib import Path

from . import _train_tokenizer, builder

# zai-org/GLM-4.1V-9B-Thinking, reduced: [gMASK]<sop>, role headers, media as begin/end-marked placeholders.
GLM4V_TEMPLATE = (
    "[gMASK]<sop>{% for m in messages %}"
    "{% if m['role'] == 'system' %}<|system|>\n{{ m['content'] if m['content'] is string else m['content'][0]['text'] }}"
    "{% elif m['role'] == 'user' %}<|user|>\n{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for item in m['content'] %}{% if item['type'] == 'video' %}<|begin_of_video|><|video|><|end_of_video|>"
    "{% elif item['type'] == 'image' %}<|begin_of_image|><|image|><|end_of_image|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% elif m['role'] == 'assistant' %}<|assistant|>\n{{ m['content'] if m['content'] is string else m['content'][0]['text'] }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# ChatML with the family's image placeholder (InternVL: <IMG_CONTEXT>, PaddleOCR-VL: <|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>).
def _chatml(image: str, video: str | None = None) -> str:
    media = f"{{% if item['type'] == 'image' %}}{image}"
    if video:
        media += f"{{% elif item['type'] == 'video' %}}{video}"
    return (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}{% else %}"
        "{% for item in m['content'] %}" + media + "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
        "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


# HuggingFaceTB/SmolVLM2-*-Instruct, reduced: "<|im_start|>User:<image>question<end_of_utterance>\nAssistant:".
SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for m in messages %}{{ m['role'] | capitalize }}"
    "{% if m['content'] is string %}: {{ m['content'] }}{% else %}"
    "{% if m['content'][0]['type'] in ['image', 'video'] %}:{% else %}: {% endif %}"
    "{% for item in m['content'] %}{% if item['type'] == 'image' %}<image>{% elif item['type'] == 'video' %}<video>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)

# mistralai/Mistral-Small-3.1-24B-Instruct-2503, reduced: <s>[SYSTEM_PROMPT]...[/SYSTEM_PROMPT][INST]...[/INST]answer</s>.
MISTRAL3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}[SYSTEM_PROMPT]{{ m['content'] if m['content'] is string else m['content'][0]['text'] }}[/SYSTEM_PROMPT]"
    "{% elif m['role'] == 'user' %}[INST]{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for item in m['content'] %}{% if item['type'] == 'image' %}[IMG]{% elif item['type'] == 'text' %}{{ item['text'] }}"
    "{% endif %}{% endfor %}{% endif %}[/INST]"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] if m['content'] is string else m['content'][0]['text'] }}{{ eos_token }}"
    "{% endif %}{% endfor %}"
)

MORE_KINDS = ("glm4v", "glm4v_moe", "glm46v", "paddleocr_vl", "internvl", "smolvlm", "idefics3", "mistral3", "mistral3_sliding", "llava_next", "lfm2_vl",
              "llama4", "gemma4")


def build(kind: str, folder: Path, seed: int, init_std: float, sizes: dict | None = None) -> None:
    """`sizes` replaces the tiny sizes (bench/families.py: a real published architecture). Its entries update
    what a builder passes: "text" and "vision" (the sub-configs), "config" (the top config's own fields),
    "image", "video" (the image and video processors' arguments) and "processor" (the processor's)."""
    builders = {"glm4v": _glm4v, "glm4v_moe": _glm4v, "glm46v": _glm4v, "paddleocr_vl": _paddleocr_vl, "internvl": _internvl,
                "smolvlm": _smolvlm, "idefics3": _smolvlm, "mistral3": _mistral3, "mistral3_sliding": _mistral3, "llava_next": _llava_next, "lfm2_vl": _lfm2_vl,
                "llama4": _llama4, "gemma4": _gemma4}
    builders[kind](folder, seed, init_std, kind, sizes or {})


def _sized(sizes: dict, part: str, tiny: dict) -> dict:
    """The tiny builder's arguments for `part`, with the real ones from `sizes` in their place."""
    return {**tiny, **sizes.get(part, {})}


def _tokenizer(special: list[str], named: dict[str, str] | None = None):
    tokenizer = _train_tokenizer(vocab_size=400, extra_special=special, named=named)
    return tokenizer, {t: tokenizer.convert_tokens_to_ids(t) for t in ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *special]}


def _text(tokenizer, ids: dict, init_std: float, eos: str = "<|im_end|>", **extra) -> dict:
    config = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                  bos_token_id=ids["<|endoftext|>"], eos_token_id=ids[eos], pad_token_id=ids["<|endoftext|>"],
                  initializer_range=init_std, tie_word_embeddings=False)
    config.update(extra)
    return config


def _save(model_class, config, folder, seed, init_std, ids, eos="<|im_end|>", randomize=("language_model", "lm_head", "projector")):
    builder.save_model(model_class, config, folder, seed, init_std, ids[eos], ids["<|endoftext|>"], randomize=randomize)


# -- GLM-4.1V, GLM-4.5V and GLM-4.6V ------------------------------------------------------------------------------------

def _glm4v(folder: Path, seed: int, init_std: float, kind: str, sizes: dict) -> None:
    from transformers import Glm4vImageProcessor, Glm4vProcessor, Glm4vVideoProcessor

    special = ["<|image|>", "<|video|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>",
               "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>"]
    tokenizer, ids = _tokenizer(special)
    text = _text(tokenizer, ids, init_std, eos="<|user|>",
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1],
                                  "partial_rotary_factor": 0.5})
    del text["head_dim"]
    text = _sized(sizes, "text", text)
    vision = _sized(sizes, "vision", dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                                          patch_size=14, spatial_merge_size=2, temporal_patch_size=2, image_size=56,
                                          initializer_range=init_std))
    media = dict(image_token_id=ids["<|image|>"], video_token_id=ids["<|video|>"],
                 image_start_token_id=ids["<|begin_of_image|>"], image_end_token_id=ids["<|end_of_image|>"],
                 video_start_token_id=ids["<|begin_of_video|>"], video_end_token_id=ids["<|end_of_video|>"])
    if kind == "glm4v_moe":
        from transformers import Glm4vMoeConfig as Config, Glm4vMoeForConditionalGeneration as Model

        text.update(moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
                    first_k_dense_replace=1)
    elif kind == "glm46v":  # GLM-4.6V: GLM-4.1V's model, timestamps written "1.5 seconds"
        from transformers import Glm46VConfig as Config, Glm46VForConditionalGeneration as Model
        from transformers import Glm46VImageProcessor as Glm4vImageProcessor, Glm46VProcessor as Glm4vProcessor
        from transformers import Glm46VVideoProcessor as Glm4vVideoProcessor
    else:
        from transformers import Glm4vConfig as Config, Glm4vForConditionalGeneration as Model
    config = Config(text_config=text, vision_config=vision, **_sized(sizes, "config", dict(tie_word_embeddings=False, **media)))
    _save(Model, config, folder, seed, init_std, ids, eos="<|user|>", randomize=("language_model", "lm_head", "experts", "gate"))
    image = _sized(sizes, "image", dict(size={"shortest_edge": 28 * 28 * 4, "longest_edge": 28 * 28 * 64}, patch_size=14,
                                        merge_size=2, temporal_patch_size=2))
    video = _sized(sizes, "video", dict(size={"shortest_edge": 28 * 28 * 2, "longest_edge": 28 * 28 * 16 * 2}))
    Glm4vProcessor(image_processor=Glm4vImageProcessor(**image), tokenizer=tokenizer, chat_template=GLM4V_TEMPLATE,
                   video_processor=Glm4vVideoProcessor(**video)).save_pretrained(folder)


# -- PaddleOCR-VL ------------------------------------------------------------------------------------------------

def _paddleocr_vl(folder: Path, seed: int, init_std: float, kind: str, sizes: dict) -> None:
    from transformers import (PaddleOCRVLConfig, PaddleOCRVLForConditionalGeneration, PaddleOCRVLImageProcessor,
                              PaddleOCRVLProcessor)

    special = ["<|IMAGE_START|>", "<|IMAGE_PLACEHOLDER|>", "<|IMAGE_END|>", "<|video_pad|>"]
    tokenizer, ids = _tokenizer(special, named={"image_token": "<|IMAGE_PLACEHOLDER|>"})
    text = _sized(sizes, "text", _text(tokenizer, ids, init_std, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                                                 "mrope_section": [2, 3, 3]}))
    vision = _sized(sizes, "vision", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                          image_size=56, patch_size=14, spatial_merge_size=2))
    config = PaddleOCRVLConfig(text_config=text, vision_config=vision, **_sized(sizes, "config", dict(
        tie_word_embeddings=False, image_token_id=ids["<|IMAGE_PLACEHOLDER|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|IMAGE_START|>"], vision_end_token_id=ids["<|IMAGE_END|>"])))
    _save(PaddleOCRVLForConditionalGeneration, config, folder, seed, init_std, ids)
    image = PaddleOCRVLImageProcessor(**_sized(sizes, "image", dict(
        size={"shortest_edge": 28 * 28 * 4, "longest_edge": 28 * 28 * 64}, patch_size=14, merge_size=2)))
    PaddleOCRVLProcessor(image_processor=image, tokenizer=tokenizer,
                         chat_template=_chatml("<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>")).save_pretrained(folder)


# -- InternVL ------------------------------------------------------------------------------------------------------

def _internvl(folder: Path, seed: int, init_std: float, kind: str, sizes: dict) -> None:
    """56-pixel crops of 14-pixel patches, pixel shuffle by 2: 4 tokens a crop, up to 4 crops and a thumbnail."""
    from transformers import GotOcr2ImageProcessor, InternVLConfig, InternVLForConditionalGeneration, InternVLProcessor
    from transformers import InternVLVideoProcessor

    named = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
             "video_token": "<video>"}
    tokenizer, ids = _tokenizer(list(named.values()), named=named)
    config = InternVLConfig(
        text_config=_sized(sizes, "text", dict(model_type="qwen2", **_text(tokenizer, ids, init_std, rope_theta=10000.0))),
        vision_config=_sized(sizes, "vision", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                   num_attention_heads=2, image_size=[56, 56], patch_size=[14, 14],
                                                   initializer_range=init_std)),
        **_sized(sizes, "config", dict(image_token_id=ids["<IMG_CONTEXT>"], image_seq_length=4, downsample_ratio=0.5,
                                       tie_word_embeddings=False)),
    )
    _save(InternVLForConditionalGeneration, config, folder, seed, init_std, ids,
          randomize=("language_model", "lm_head", "multi_modal_projector"))
    image = GotOcr2ImageProcessor(**_sized(sizes, "image", dict(size={"height": 56, "width": 56}, crop_to_patches=True,
                                                                min_patches=1, max_patches=4)))
    InternVLProcessor(image_processor=image, tokenizer=tokenizer,
                      video_processor=InternVLVideoProcessor(**_sized(sizes, "video", dict(size={"height": 56, "width": 56}))),
                      chat_template=_chatml("<IMG_CONTEXT>\n", "<video>\n"),
                      **_sized(sizes, "processor", dict(image_seq_length=4))).save_pretrained(folder)


# -- SmolVLM and Idefics3 ---------------------------------------------------------------------------------------

def _smolvlm(folder: Path, seed: int, init_std: float, kind: str, sizes: dict) -> None:
    """32-pixel tiles of 8-pixel patches, pixel shuffle by 2: 4 tokens a tile; images resized to 64 pixels at
    most, so up to 2x2 tiles and the global image."""
    special = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>", "<video>"]
    special += [f"<row_{r}_col_{c}>" for r in range(1, 4) for c in range(1, 4)]
    tokenizer, ids = _tokenizer(special)
    text = _sized(sizes, "text", dict(model_type="llama", **_text(tokenizer, ids, init_std, eos="<end_of_utterance>",
                                                                  rope_theta=10000.0)))
    vision = _sized(sizes, "vision", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                          image_size=32, patch_size=8, initializer_range=init_std))
    image = _sized(sizes, "image", dict(size={"longest_edge": 64}, max_image_size={"longest_edge": 32}, do_image_splitting=True))
    processing = _sized(sizes, "processor", dict(image_seq_len=4))
    if kind == "smolvlm":
        from transformers import SmolVLMConfig as Config, SmolVLMForConditionalGeneration as Model
        from transformers import SmolVLMImageProcessor, SmolVLMProcessor, SmolVLMVideoProcessor

        video = _sized(sizes, "video", dict(video_sampling={"fps": 1, "max_frames": 8, "video_size": {"longest_edge": 32}},
                                            max_image_size={"longest_edge": 32}))
        processor = SmolVLMProcessor(image_processor=SmolVLMImageProcessor(**image), tokenizer=tokenizer,
                                     video_processor=SmolVLMVideoProcessor(**video), chat_template=SMOLVLM_TEMPLATE,
                                     **processing)
    else:
        from transformers import Idefics3Config as Config, Idefics3ForConditionalGeneration as Model
        from transformers import Idefics3ImageProcessor, Idefics3Processor

        processor = Idefics3Processor(image_processor=Idefics3ImageProcessor(**image), tokenizer=tokenizer,
                                      chat_template=SMOLVLM_TEMPLATE, **processing)
    config = Config(text_config=text, vision_config=vision, **_sized(sizes, "config", dict(
        image_token_id=ids["<image>"], scale_factor=2, tie_word_embeddings=False)))
    _save(Model, config, folder, seed, init_std, ids, eos="<end_of_utterance>", randomize=("text_model", "lm_head", "connector"))
    processor.save_pretrained(folder)


# -- Mistral 3 (Pixtral vision) ---------------------------------------------------------------------------------

def _mistral3(folder: Path, seed: int, init_std: float, kind: str, sizes: dict) -> None:
    """Pixtral on 8-pixel patches merged 2x2, images resized to 64 pixels at most: up to 4x4 [IMG] tokens.
    mistral3_sliding: every layer with a sliding window of 8 (a Mistral config with `sliding_window` and no
    layer types)."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, PixtralImageProcessor, PixtralProcessor

    special = ["<s>", "</s>", "[IMG]", "[IMG_BREAK]", "[IMG_END]", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"]
    tokenizer, ids = _tokenizer(special)
    tokenizer.bos_token, tokenizer.eos_token = "<s>", "</s>"
    text = dict(model_type="mistral", **_text(tokenizer, ids, init_std, eos="</s>", rope_theta=10000.0,
                                                            sliding_window=8 if kind == "mistral3_sliding" else None))
    text["bos_token_id"] = ids["<s>"]
    text = _sized(sizes, "text", text)
    # Pixtral's head size is derived (hidden_size / heads): a fixed one would outlive real sizes given in `sizes`.
    vision = _sized(sizes, "vision", dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=2, image_size=64, patch_size=8,
                                          initializer_range=init_std))
    config = Mistral3Config(text_config=text, vision_config=vision, **_sized(sizes, "config", dict(
        image_token_index=ids["[IMG]"], spatial_merge_size=2, tie_word_embeddings=False)))
    _save(Mistral3ForConditionalGeneration, config, folder, seed, init_std, ids, eos="</s>")
    image = _sized(sizes, "image", dict(size={"longest_edge": 64}, patch_size=8))
    PixtralProcessor(image_processor=PixtralImageProcessor(**image), tokenizer=tokenizer, chat_template=MISTRAL3_TEMPLATE,
                     **_sized(sizes, "processor", dict(patch_size=8, spatial_merge_size=2))).save_pretrained(folder)


# -- LLaVA-NeXT: a model type vlcache does not list (for `vlcache check`) ------------------------------------

def _llava_next(folder: Path, seed: int, init_std: float, kind: str, sizes: dict) -> None:
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextImageProcessor, LlavaNextProcessor

    tokenizer, ids = _tokenizer(["<image>"])
    pinpoints = [[32, 64], [64, 32], [64, 64]]
    config = LlavaNextConfig(
        text_config=dict(model_type="qwen2", **_text(tokenizer, ids, init_std, rope_theta=10000.0)),
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=32, patch_size=8, projection_dim=32),
        image_token_index=ids["<image>"], image_grid_pinpoints=pinpoints, vision_feature_select_strategy="default",
        vision_feature_layer=-1, tie_word_embeddings=False,
    )
    _save(LlavaNextForConditionalGeneration, config, folder, seed, init_std, ids)
    image = LlavaNextImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                    image_grid_pinpoints=pinpoints, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    LlavaNextProcessor(image_processor=image, tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default",
                       num_additional_image_tokens=1, chat_template=_chatml("<image>\n")).save_pretrained(folder)


# -- LFM2-VL: short-convolution layers (no family yet: the decode path has no conv-only state) ----------------

def _lfm2_vl(folder: Path, seed: int, init_std: float, kind: str, sizes: dict) -> None:
    """SigLIP2 NaFlex on 8-pixel patches, pixel unshuffle by 2: 4 to 16 tokens an image; an LFM2 text model of
    3 short-convolution layers (kernel 3) and 1 attention layer."""
    from transformers import Lfm2VlConfig, Lfm2VlForConditionalGeneration, Lfm2VlImageProcessor, Lfm2VlProcessor

    named = {"image_token": "<image>", "image_start_token": "<|image_start|>", "image_end_token": "<|image_end|>",
             "image_thumbnail_token": "<|img_thumbnail|>"}
    tokenizer, ids = _tokenizer(list(named.values()), named=named)
    text = dict(model_type="lfm2", **_text(tokenizer, ids, init_std, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                                            layer_types=["conv", "conv", "full_attention", "conv"], num_hidden_layers=4,
                                            conv_L_cache=3, block_auto_adjust_ff_dim=False))
    del text["head_dim"]
    text = _sized(sizes, "text", text)
    vision = _sized(sizes, "vision", dict(model_type="siglip2_vision_model", hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=2, num_attention_heads=2, patch_size=8, num_patches=64,
                                          vision_use_head=False))
    config = Lfm2VlConfig(text_config=text, vision_config=vision, **_sized(sizes, "config", dict(
        image_token_id=ids["<image>"], projector_hidden_size=64, downsample_factor=2, tie_word_embeddings=False)))
    _save(Lfm2VlForConditionalGeneration, config, folder, seed, init_std, ids, randomize=("language_model", "lm_head", "projector", "conv"))
    image = Lfm2VlImageProcessor(**_sized(sizes, "image", dict(
        encoder_patch_size=8, tile_size=32, min_image_tokens=4, max_image_tokens=16, downsample_factor=2,
        do_image_splitting=False, max_num_patches=64)))
    Lfm2VlProcessor(image_processor=image, tokenizer=tokenizer, chat_template=_chatml("<image>")).save_pretrained(folder)


# -- Llama 4: chunked local attention, layers without RoPE, MoE ------------------------------------------------

LLAMA4_CHUNK = 16  # tokens per attention chunk: every cached prefix spans several


def _llama4(folder: Path, seed: int, init_std: float, kind: str, sizes: dict) -> None:
    """56-pixel tiles of 14-pixel patches, pixel shuffle 0.5: 4 tokens a tile, up to 4 tiles and the global
    image; a text model of 4 layers (chunked attention in chunks of 16 tokens, every 4th layer full and without
    RoPE), MoE on every other layer. The NoPE layer's query temperature changes every 8 positions by 0.5 (not
    every 8192 by 0.1), so that a prompt's positions reach it and a wrong position changes an answer."""
    from transformers import Llama4Config, Llama4ForConditionalGeneration, Llama4ImageProcessor, Llama4Processor

    special = ["<|image|>", "<|image_start|>", "<|image_end|>", "<|patch|>", "<|tile_x_separator|>", "<|tile_y_separator|>"]
    tokenizer, ids = _tokenizer(special)
    text = _text(tokenizer, ids, init_std, intermediate_size_mlp=128, num_hidden_layers=4, num_local_experts=2,
                 num_experts_per_tok=1, interleave_moe_layer_step=2, attention_chunk_size=LLAMA4_CHUNK,
                 floor_scale=8, attn_scale=0.5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    text = _sized(sizes, "text", text)
    vision = _sized(sizes, "vision", dict(hidden_size=32, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                                          image_size=56, patch_size=14, vision_output_dim=64, projector_input_dim=64,
                                          projector_output_dim=64, pixel_shuffle_ratio=0.5, initializer_range=init_std))
    config = Llama4Config(text_config=text, vision_config=vision, **_sized(sizes, "config", dict(
        image_token_index=ids["<|patch|>"], boi_token_index=ids["<|image_start|>"], eoi_token_index=ids["<|image_end|>"],
        tie_word_embeddings=False)))
    _save(Llama4ForConditionalGeneration, config, folder, seed, init_std, ids,
          randomize=("language_model", "lm_head", "multi_modal_projector", "experts", "router"))
    image = Llama4ImageProcessor(**_sized(sizes, "image", dict(size={"height": 56, "width": 56}, max_patches=4)))
    Llama4Processor(image_processor=image, tokenizer=tokenizer, chat_template=_chatml("<|image|>"),
                    **_sized(sizes, "processor", dict(patch_size=14, pixel_shuffle_ratio=0.5))).save_pretrained(folder)


# -- Gemma 4: shared K/V layers, per-layer K/V shapes, per-layer embeddings, bidirectional image tokens -----------

# google/gemma-4-*-it, reduced: <|turn>role ... <turn|>, the system prompt a turn of its own, media as placeholders.
GEMMA4_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] | trim }}{% else %}{% for item in m['content'] %}"
    "{% if item['type'] == 'image' %}<|image|>{% elif item['type'] == 'video' %}<|video|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}{% endfor %}{% endif %}<turn|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|turn>model\n{% endif %}"
)
# Shorter than every cached prefix, longer than a question: with a window a question overflows, the last
# non-shared sliding layer's prefix K/V could not reach an answer at all (the layers that read it are shared).
GEMMA4_SLIDING_WINDOW = 64


def _gemma4(folder: Path, seed: int, init_std: float, kind: str, sizes: dict) -> None:
    """Every kind of state Gemma 4 has at once: 6 layers (sliding, sliding, full) x 2 with a window of 64, the
    last two reading the K/V of layers 3 (sliding) and 2 (full); full layers with their own head size (32 vs
    16) and head count (2 vs 1) and keys as values (attention_k_eq_v); per-layer embeddings; MoE beside the MLP;
    image tokens that see each other; final logit soft-capping. Images of 4-pixel patches pooled 3x3: 70 or
    140 tokens (the smallest budgets Gemma 4 takes); videos of 8 frames (not 32: the test clips are short)."""
    from transformers import (Gemma4Config, Gemma4ForConditionalGeneration, Gemma4ImageProcessor, Gemma4Processor,
                              Gemma4VideoProcessor)
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor

    from . import gemma_tokenizer

    init_std = 0.02  # Gemma's scaled embeddings and (1 + w) norms saturate into one repeated token above this
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<|turn>", "<turn|>", "<|image>", "<image|>", "<|image|>",
                "<|audio>", "<audio|>", "<|audio|>", "<|video|>"]
    # The processor reads the audio tokens' names even for images (transformers 5.24).
    tokenizer, vocab = gemma_tokenizer(specials, {"boi_token": "<|image>", "eoi_token": "<image|>", "image_token": "<|image|>",
                                                  "boa_token": "<|audio>", "eoa_token": "<audio|>", "audio_token": "<|audio|>"},
                                       ["<|turn>", "<turn|>"])
    end_of_turn, size = vocab["<turn|>"], ((len(vocab) + 63) // 64) * 64
    text = _sized(sizes, "text", dict(vocab_size=size, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16, global_head_dim=32, num_global_key_value_heads=2,
                sliding_window=GEMMA4_SLIDING_WINDOW, layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
                num_kv_shared_layers=2, hidden_size_per_layer_input=8, vocab_size_per_layer_input=size,
                attention_k_eq_v=True, use_bidirectional_attention="vision", final_logit_softcapping=30.0,
                enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=32,
                pad_token_id=0, eos_token_id=[1, end_of_turn], bos_token_id=2, initializer_range=init_std,
                max_position_embeddings=4096))
    vision = _sized(sizes, "vision", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                          num_key_value_heads=2, head_dim=16, patch_size=4, pooling_kernel_size=3,
                                          position_embedding_size=256, initializer_range=init_std))
    config = Gemma4Config(text_config=text, vision_config=vision, **_sized(sizes, "config", dict(
        audio_config=None, boi_token_id=vocab["<|image>"], eoi_token_id=vocab["<image|>"], image_token_id=vocab["<|image|>"],
        video_token_id=vocab["<|video|>"], boa_token_id=vocab["<|audio>"], eoa_token_index=vocab["<audio|>"],
        audio_token_id=vocab["<|audio|>"])))
    builder.save_model(Gemma4ForConditionalGeneration, config, folder, seed + 2, init_std, [1, end_of_turn], 0,
                       randomize=("language_model", "lm_head", "embed_vision"))
    pixels = dict(patch_size=4, max_soft_tokens=70, pooling_kernel_size=3)
    Gemma4Processor(feature_extractor=Gemma4AudioFeatureExtractor(),
                    image_processor=Gemma4ImageProcessor(**_sized(sizes, "image", pixels)), tokenizer=tokenizer,
                    video_processor=Gemma4VideoProcessor(**_sized(sizes, "video", dict(pixels, num_frames=8))),
                    chat_template=GEMMA4_TEMPLATE).save_pretrained(folder)
