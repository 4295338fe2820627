"""Token generation on a Qwen-VL model from a KV cache, with explicit M-RoPE positions.

Layered like mlx-lm: `generate_step` yields token ids; the Engine builds streaming and plain calls on it.
Positions are always passed explicitly. transformers otherwise derives them from `rope_deltas` kept on the
model object, which is stale in a fresh process or after another image was served; a token after the image
at sequence index i sits at M-RoPE position i + rope_delta, and that delta travels with every ImageState.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from transformers import DynamicCache, LogitsProcessorList
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

Sampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (ids so far [1, n], logits [1, V]) -> [1]


@dataclass(frozen=True)
class SamplingParams:
    temperature: float  # 0 means greedy
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sampling_params(generation_config, temperature=None, top_p=None, seed=None) -> SamplingParams:
    """The model's own generation config, overridden by what the caller gave; temperature 0 is greedy."""
    do_sample = bool(getattr(generation_config, "do_sample", False))
    if temperature is None:
        temperature = float(generation_config.temperature or 1.0) if do_sample else 0.0
    if top_p is None:
        top_p = generation_config.top_p if do_sample else None
    top_k = generation_config.top_k if do_sample else None
    return SamplingParams(
        temperature=float(temperature),
        top_p=top_p,
        top_k=top_k or None,
        repetition_penalty=getattr(generation_config, "repetition_penalty", None),
        seed=seed,
    )


def make_sampler(params: SamplingParams, device: torch.device) -> Sampler:
    processors = LogitsProcessorList()
    if params.repetition_penalty and params.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    if params.greedy:
        return lambda ids, logits: processors(ids, logits).argmax(dim=-1)
    processors.append(TemperatureLogitsWarper(params.temperature))
    if params.top_k:
        processors.append(TopKLogitsWarper(params.top_k))
    if params.top_p is not None and params.top_p < 1.0:
        processors.append(TopPLogitsWarper(params.top_p))
    generator = torch.Generator(device=device)
    if params.seed is not None:
        generator.manual_seed(params.seed)
    else:
        generator.seed()

    def sample(ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(processors(ids, logits.float()), dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)

    return sample


def text_positions(start: int, length: int, rope_delta: int, device) -> torch.Tensor:
    """[4, 1, length]: row 0 the sequence index (for the mask), rows 1-3 the M-RoPE (t, h, w) positions."""
    index = torch.arange(start, start + length, device=device)
    return torch.stack([index, index + rope_delta, index + rope_delta, index + rope_delta]).unsqueeze(1)


def mrope_positions(model, input_ids, attention_mask, mm_token_type_ids, image_grid_thw) -> tuple[torch.Tensor, int]:
    """Positions for a prompt that holds an image, computed by the model's own get_rope_index."""
    vision, deltas = model.model.get_rope_index(
        input_ids,
        image_grid_thw=image_grid_thw,
        video_grid_thw=None,
        attention_mask=attention_mask,
        mm_token_type_ids=mm_token_type_ids,
    )
    index = torch.arange(input_ids.shape[1], device=input_ids.device).view(1, 1, -1)
    return torch.cat([index, vision.to(input_ids.device)], dim=0), int(deltas.view(-1)[0])


def cache_from_kv(config, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A DynamicCache over existing K/V tensors without copying them.

    DynamicLayer.update appends with torch.cat, which makes new tensors: the given ones are never written, so
    a state can be shared by any number of asks.
    """
    cache = DynamicCache(config=config)
    for layer, (k, v) in zip(cache.layers, kv, strict=True):
        layer.lazy_initialization(k, v)
        layer.keys, layer.values = k, v
    return cache


def kv_from_cache(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


@torch.inference_mode()
def forward(model, input_ids, position_ids, cache, **vision) -> torch.Tensor:
    """Run new tokens through the model, appending to `cache`; return the last position's logits [1, V]."""
    total = cache.get_seq_length() + input_ids.shape[1]
    mask = torch.ones(input_ids.shape[0], total, dtype=torch.long, device=input_ids.device)
    out = model(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=position_ids,
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
        **vision,
    )
    return out.logits[:, -1, :]


@torch.inference_mode()
def generate_step(
    model,
    cache: DynamicCache,
    history: torch.Tensor,
    new_ids: torch.Tensor,
    rope_delta: int,
    sampler: Sampler,
    max_new_tokens: int,
    eos_ids: frozenset[int],
) -> Iterator[int]:
    """Prefill `new_ids` after the `history` already in `cache`, then yield up to max_new_tokens token ids.

    Stops after an end-of-sequence token (which is yielded). `history` is only read by samplers that look
    back (repetition penalty).
    """
    device = new_ids.device
    start = cache.get_seq_length()
    logits = forward(model, new_ids, text_positions(start, new_ids.shape[1], rope_delta, device), cache)
    ids = torch.cat([history.to(device), new_ids], dim=1)
    for step in range(max_new_tokens):
        token = sampler(ids, logits)
        token_id = int(token)
        yield token_id
        if token_id in eos_ids or step == max_new_tokens - 1:
            return
        ids = torch.cat([ids, token.view(1, 1)], dim=1)
        position = text_positions(ids.shape[1] - 1, 1, rope_delta, device)
        logits = forward(model, token.view(1, 1), position, cache)
