"""Random checkpoints on disk, loadable with from_pretrained, for tests and benchmarks.

No weights can be downloaded in tests or CI, yet the real loading path (AutoProcessor,
AutoModelForImageTextToText) should be what runs. So these write a config, random weights, a byte-level BPE
tokenizer with Qwen's special tokens, a Qwen3-VL style chat template and the Qwen2-VL image processor into a
folder: a tiny model for tests, and the real 2B architecture (from its config.json) for benchmarks.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    Qwen2Tokenizer,
    Qwen2VLImageProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen3-VL's template, reduced to what vlcache uses: system turn only when given, images as
# <|vision_start|><|image_pad|><|vision_end|> (videos with <|video_pad|>), text parts appended, generation prompt "<|im_start|>assistant\n".
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or 'image' in part -%}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'video' or 'video' in part -%}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

CORPUS = [
    "What objects are visible in this image? What colors dominate the scene?",
    "Describe the lighting and mood. Describe this image in one sentence.",
    "You are a helpful AI assistant analyzing an image. You are analyzing this image.",
    "The quick brown fox jumps over the lazy dog. A cat, a cup of coffee, a rocket, an astronaut.",
    "How many people are there? Is it day or night? What is written on the sign? 0123456789",
    "What is artificial intelligence? Hello! Tell me more about the picture, please.",
]


# Qwen's special tokens from id 151643 on, in order, as the real tokenizer numbers them.
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
]
QWEN_FIRST_SPECIAL_ID = 151643


def _train_tokenizer(vocab_size: int, pad_vocab_to: int | None = None, extra_special: list[str] | None = None,
                     named: dict[str, str] | None = None) -> Qwen2Tokenizer:
    """A byte-level BPE trained on a few sentences. `pad_vocab_to` fills the vocabulary with unused entries so
    that the special tokens that follow get the ids the real Qwen tokenizer gives them. `named` special tokens
    become tokenizer attributes (`tokenizer.image_token`, `tokenizer.image_token_id`), as processors read them."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    bpe.train_from_iterator(CORPUS * 4, trainer=trainer)
    model_json = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model_json["merges"]]
    vocab = model_json["vocab"]
    if pad_vocab_to is not None:
        vocab = {t: i for t, i in vocab.items() if t != "<|endoftext|>"}
        vocab = {t: i for i, t in enumerate(sorted(vocab, key=vocab.get))}
        vocab.update({f"\u2060unused{i}": i for i in range(len(vocab), pad_vocab_to)})
        tok = Qwen2Tokenizer(vocab=vocab, merges=merges)
        tok.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL_TOKENS[1:]})
    elif extra_special is not None:  # another family's placeholders after Qwen's chat tokens
        tokens = ["<|im_start|>", "<|im_end|>", *extra_special]
        if named:
            tok = Qwen2Tokenizer(vocab=vocab, merges=merges, extra_special_tokens=named)
            tok.add_special_tokens({"extra_special_tokens": tokens}, replace_extra_special_tokens=False)
        else:
            tok = Qwen2Tokenizer(vocab=vocab, merges=merges)
            tok.add_special_tokens({"additional_special_tokens": tokens})
    else:
        tok = Qwen2Tokenizer(vocab=vocab, merges=merges)
        tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tok.eos_token = "<|im_end|>"
    tok.pad_token = "<|endoftext|>"
    return tok


def gemma_tokenizer(specials: list[str], named: dict[str, str], turns: list[str]):
    """A Gemma tokenizer over a small vocabulary: `specials` first (their ids in that order), then byte fallback
    and single characters, so that any text encodes; `named` are the processor's named tokens (boi_token, ...),
    `turns` the chat template's. Returns it with its vocabulary."""
    import string

    from transformers import GemmaTokenizer

    vocab = {token: i for i, token in enumerate(specials)}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for char in ["\u2581"] + [c for c in string.printable if c not in " \t\r\x0b\x0c"]:
        vocab.setdefault(char, len(vocab))
    tokenizer = GemmaTokenizer(vocab=vocab, merges=[], add_bos_token=True, extra_special_tokens=named)
    tokenizer.add_special_tokens({"extra_special_tokens": turns}, replace_extra_special_tokens=False)
    return tokenizer, vocab


def build_tiny_checkpoint(folder: Path, seed: int = 0, init_std: float = 0.2) -> Path:
    """Write a tiny random Qwen3-VL checkpoint to `folder` and return it.

    `init_std` is far above the usual 0.02 so that greedy decoding produces varied tokens: a model that
    repeats one token hides position bugs.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(vocab_size=400)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab_size = len(tokenizer)

    config = Qwen3VLConfig(
        text_config=dict(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
            rope_theta=10000.0, rope_scaling={"rope_type": "default", "mrope_section": [4, 2, 2], "mrope_interleaved": True},
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
            initializer_range=init_std, tie_word_embeddings=False,
        ),
        vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=16,
            spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=256, deepstack_visual_indexes=[0],
            initializer_range=init_std,
        ),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config).eval()
    with torch.no_grad():  # norms start at exactly 1; jitter them so every weight matters to the output
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.add_(torch.randn_like(param) * init_std)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.do_sample = False
    model.save_pretrained(folder)

    _save_processor(tokenizer, folder)
    return folder


def _save_processor(tokenizer, folder: Path, chat_template: str = CHAT_TEMPLATE) -> None:
    # Qwen3-VL-2B-Instruct's image processor settings: 16-pixel patches merged 2x2, 64 to 16,384 image tokens.
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(patch_size=16, merge_size=2, temporal_patch_size=2,
                                              image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                              size={"shortest_edge": 65536, "longest_edge": 16777216}),
        tokenizer=tokenizer,
        video_processor=Qwen3VLVideoProcessor(patch_size=16, merge_size=2, temporal_patch_size=2),
        chat_template=chat_template,
    )
    processor.save_pretrained(folder)


REAL_PROCESSOR_FILES = ("chat_template.jinja", "merges.txt", "vocab.json", "tokenizer.json", "tokenizer_config.json",
                        "preprocessor_config.json", "video_preprocessor_config.json", "generation_config.json")


def build_random_checkpoint(config_json: Path, folder: Path, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> Path:
    """A model of the architecture in `config_json` (e.g. the real Qwen3-VL-2B) with random weights.

    Every cost caching changes (vision encoder, prefill, KV bytes, load time) depends on the architecture, not
    on the weights' values, so benchmarks measure this. When the real processor files lie beside the config
    (../shared/models/qwen3-vl-2b-instruct has them) they are used, so token counts and the prefix/question
    split are the real ones; otherwise a small BPE whose special tokens have the real ids stands in.
    """
    import shutil

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    source = Path(config_json).parent if Path(config_json).is_file() else Path(config_json)
    config = Qwen3VLConfig.from_pretrained(source)
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config).to(dtype).eval()
    model.generation_config.eos_token_id = [151645, 151643]
    model.generation_config.pad_token_id = 151643
    model.save_pretrained(folder)
    if all((source / name).is_file() for name in REAL_PROCESSOR_FILES):
        for name in REAL_PROCESSOR_FILES:
            shutil.copy(source / name, folder / name)
        return folder
    tokenizer = _train_tokenizer(vocab_size=400, pad_vocab_to=QWEN_FIRST_SPECIAL_ID)
    for offset, token in enumerate(QWEN_SPECIAL_TOKENS):
        assert tokenizer.convert_tokens_to_ids(token) == QWEN_FIRST_SPECIAL_ID + offset, token
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<|endoftext|>"
    _save_processor(tokenizer, folder)
    return folder
