"""Tiny checkpoints of image-text models vlcache has no family for, built for `vlcache check`'s tests:

- idefics2: its processor writes a space after the image's closing token (`<fake_token_around_image> What`):
  with a byte-level BPE the question's first word is `ĠWhat` in the conversation, `What` tokenized alone;
- paligemma: its processor returns `labels` with every prompt (a training target, no input);
- mllama: cross-attention to the image (only its config: vlcache refuses it before reading any weight).

    build_unlisted("idefics2", folder)
"""

from __future__ import annotations

from pathlib import Path

from .more_families import _text, _tokenizer

UNLISTED_KINDS = ("idefics2", "paligemma", "mllama")

# HuggingFaceM4/idefics2-8b's template: "User:<image>question<end_of_utterance>\nAssistant:".
IDEFICS2_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}: {{ message['content'] }}{% else %}"
    "{% if message['content'][0]['type'] == 'image' %}:{% else %}: {% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}<image>{% endif %}{% endfor %}{% endif %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)

# PaliGemma checkpoints ship none; a Gemma-style one, so that the check can run it.
PALIGEMMA_TEMPLATE = (
    "{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}<image>{% elif p['type'] == 'text' %}{{ p['text'] }}{% endif %}{% endfor %}"
    "{% endif %}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def build_unlisted(kind: str, folder: Path, seed: int = 0, init_std: float = 0.2) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    {"idefics2": _idefics2, "paligemma": _paligemma, "mllama": _mllama}[kind](folder, seed, init_std)
    return folder


def _save(model_class, config, folder: Path, seed: int, init_std: float, eos: int, pad: int) -> None:
    from .builder import save_model

    save_model(model_class, config, folder, seed, init_std, eos, pad, randomize=("text_model", "language_model", "lm_head",
                                                                                  "connector", "multi_modal_projector"))


def _idefics2(folder: Path, seed: int, init_std: float) -> None:
    from transformers import Idefics2Config, Idefics2ForConditionalGeneration, Idefics2ImageProcessor, Idefics2Processor

    tokenizer, ids = _tokenizer(["<fake_token_around_image>", "<image>", "<end_of_utterance>"])
    text = dict(model_type="mistral", **_text(tokenizer, ids, init_std, eos="<end_of_utterance>", rope_theta=10000.0,
                                              sliding_window=None))
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8, initializer_range=init_std)
    perceiver = dict(hidden_size=64, resampler_n_latents=4, resampler_depth=1, resampler_n_heads=2, resampler_head_dim=16,
                     num_key_value_heads=1)
    config = Idefics2Config(text_config=text, vision_config=vision, perceiver_config=perceiver,
                            image_token_id=ids["<image>"], tie_word_embeddings=False)
    _save(Idefics2ForConditionalGeneration, config, folder, seed, init_std, ids["<end_of_utterance>"], ids["<|endoftext|>"])
    image = Idefics2ImageProcessor(size={"shortest_edge": 32, "longest_edge": 32}, do_image_splitting=False,
                                   image_mean=[0.5] * 3, image_std=[0.5] * 3)
    Idefics2Processor(image_processor=image, tokenizer=tokenizer, image_seq_len=4,
                      chat_template=IDEFICS2_TEMPLATE).save_pretrained(folder)


def _paligemma(folder: Path, seed: int, init_std: float) -> None:
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor, SiglipImageProcessor

    tokenizer, ids = _tokenizer(["<image>", "<start_of_turn>", "<end_of_turn>", "<bos>"])
    tokenizer.bos_token = "<bos>"
    text = dict(model_type="gemma", **_text(tokenizer, ids, init_std, eos="<end_of_turn>", num_key_value_heads=1))
    text["bos_token_id"] = ids["<bos>"]
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8, projection_dim=64)
    config = PaliGemmaConfig(text_config=text, vision_config=vision, image_token_index=ids["<image>"], projection_dim=64,
                             tie_word_embeddings=False)
    _save(PaliGemmaForConditionalGeneration, config, folder, seed, init_std, ids["<end_of_turn>"], ids["<|endoftext|>"])
    image = SiglipImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                 image_seq_length=16)
    PaliGemmaProcessor(image_processor=image, tokenizer=tokenizer, chat_template=PALIGEMMA_TEMPLATE).save_pretrained(folder)


def _mllama(folder: Path, seed: int, init_std: float) -> None:
    """Only the config: the refusal comes from it, before a processor or weight is read."""
    from transformers import MllamaConfig

    MllamaConfig(text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=1, cross_attention_layers=[1],
                                  bos_token_id=1, eos_token_id=2, pad_token_id=3),
                 vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1,
                                    attention_heads=2, image_size=32, patch_size=8,
                                    intermediate_layers_indices=[0])).save_pretrained(folder)
