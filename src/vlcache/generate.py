"""Token generation from a cached state, with explicit positions from the model's family.

Layered like mlx-lm: `generate_steps` yields token ids; the Engine builds streaming and plain calls on it.
Positions are always passed explicitly, computed by the family (`Positions`): transformers otherwise derives
them from state kept on the model object (M-RoPE's `rope_deltas`), stale in a fresh process or after another
image was served. A token after the image at sequence index i gets the family's position for i and the
state's rope_delta (0 for 1D RoPE families).
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

from transformers.cache_utils import LinearAttentionLayer

from .attention import SharedPrefixLayer, attention_layer, linear_state, shared_prefix_cache

Sampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (ids so far [1, n], logits [1, V]) -> [1]
# (cache slots [B, L], unpadded sequence index [B, L], rope_delta) -> the model's position_ids
Positions = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


GREEDY_BELOW = 1e-5  # temperatures this small are greedy: dividing logits by them overflows to NaN


@dataclass(frozen=True)
class SamplingParams:
    temperature: float  # 0 (or below GREEDY_BELOW) means greedy
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


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


def batch_groups(lengths: list[int], can_pad: bool = True) -> list[list[int]]:
    """Row indices that decode together: all of them, or, where rows cannot be padded (linear-attention state
    runs through every input token, padding included), those whose new tokens are equally long."""
    if can_pad:
        return [list(range(len(lengths)))]
    groups: dict[int, list[int]] = {}
    for row, length in enumerate(lengths):
        groups.setdefault(length, []).append(row)
    return list(groups.values())


def text_positions(positions: Positions, start: int, length: int, rope_delta: int, device) -> torch.Tensor:
    """Positions of `length` unpadded tokens from cache slot `start` on (one row)."""
    index = torch.arange(start, start + length, device=device).unsqueeze(0)
    return positions(index, index, rope_delta)


def cache_from_kv(config, kv: list[tuple[torch.Tensor, torch.Tensor]], batch: int = 1, capacity: int = 0,
                  prefix_tokens: int | None = None) -> DynamicCache:
    """A cache continuing from `kv` (batch 1, `prefix_tokens` long) for `batch` rows, room for `capacity` tokens."""
    return shared_prefix_cache(config, kv, batch=batch, capacity=capacity, prefix_tokens=prefix_tokens)


def kv_from_cache(cache: DynamicCache, row: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer state of one row: [1, kv_heads, n, D] K/V (a plain layer, or a shared prefix and its suffix),
    or a linear-attention layer's (conv, recurrent) state."""
    out = []
    for layer in cache.layers:
        if isinstance(layer, SharedPrefixLayer):
            out.append(layer.full(row))
        elif isinstance(layer, LinearAttentionLayer):
            out.append(linear_state(layer, row))
        else:
            out.append((layer.keys[row : row + 1], layer.values[row : row + 1]))
    return out


@torch.inference_mode()
def forward(model, input_ids, position_ids, cache, attention_mask=None, logical=None, **vision) -> torch.Tensor:
    """Run new tokens through the model, appending to `cache`; return the last position's logits [B, V].

    `logical` [B, L]: each new token's unpadded sequence index (default: its cache slot). A shared-prefix
    cache records it, and the attention decides from it what each query may see.
    """
    start = cache.get_seq_length()
    if attention_mask is None:
        attention_mask = torch.ones(input_ids.shape[0], start + input_ids.shape[1], dtype=torch.long, device=input_ids.device)
    # With no prefix (text-only) the suffix K/V are all the K/V: the plain SDPA path needs no scores buffer.
    layer = attention_layer(cache)
    shared = cache if layer is not None and layer.prefix_length > 0 else None
    if shared is not None:
        if logical is None:
            logical = torch.arange(start, start + input_ids.shape[1], device=input_ids.device).expand(input_ids.shape[0], -1)
        shared.book.append(logical, attention_mask[:, -input_ids.shape[1]:].bool())
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
        shared_prefix_cache=shared,
        **vision,
    )
    return out.logits[:, -1, :]


def prefill(model, cache: DynamicCache, new_ids: torch.Tensor, rope_delta: int, positions: Positions) -> None:
    """Append `new_ids` (one row) to the cache without generating."""
    where = text_positions(positions, cache.get_seq_length(), new_ids.shape[1], rope_delta, new_ids.device)
    forward(model, new_ids, where, cache)


@torch.inference_mode()
def generate_steps(
    model,
    cache: DynamicCache,
    history: torch.Tensor,
    new_ids: list[torch.Tensor],
    rope_delta: int,
    samplers: list[Sampler],
    max_new_tokens: int | list[int],
    eos_ids: frozenset[int],
    positions: Positions,
    stopped: Callable[[int], bool] | None = None,
) -> Iterator[list[int | None]]:
    """Prefill each row's new ids after the shared `history` in `cache`, then decode all rows together.

    Yields one list per step with each row's token, or None for a row that already finished (after its
    end-of-sequence token, which is yielded, or max_new_tokens). Rows of unequal length are padded on the left
    of their new ids, between history and question; padding is masked out and skipped in the positions, so
    each row computes what it would alone. `max_new_tokens` may differ by row; `stopped(row)`
    lets a caller end a row early (a client that went away, a stop string).
    """
    # 1. Lay the rows out: [history | padding | new ids], and their masks and positions.
    device = history.device
    rows, start = len(new_ids), cache.get_seq_length()
    width = max(ids.shape[1] for ids in new_ids)
    pads = [width - ids.shape[1] for ids in new_ids]
    input_ids = torch.zeros(rows, width, dtype=torch.long, device=device)
    mask = torch.ones(rows, start + width, dtype=torch.long, device=device)
    # Padding queries look at the last prefix token (every layer stores it): never at nothing, which gives NaN.
    logical = torch.full((rows, width), max(start - 1, 0), dtype=torch.long, device=device)
    for i, (ids, pad) in enumerate(zip(new_ids, pads)):
        input_ids[i, pad:] = ids[0]
        mask[i, start : start + pad] = 0
        logical[i, pad:] = torch.arange(start, start + ids.shape[1], device=device)
    slots = torch.arange(start, start + width, device=device).expand(rows, -1)
    # 2. Prefill all rows at once.
    logits = forward(model, input_ids, positions(slots, logical, rope_delta), cache, attention_mask=mask, logical=logical)
    seen = [torch.cat([history[0], ids[0]]).unsqueeze(0) for ids in new_ids]  # for samplers that look back
    next_logical = torch.tensor([start + ids.shape[1] for ids in new_ids], device=device)
    limits = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * rows
    done = [False] * rows
    # 3. Decode: every row advances one token a step; finished rows keep a slot but their output is dropped.
    for step in range(max(limits)):
        tokens = torch.stack([samplers[i](seen[i], logits[i : i + 1])[0] for i in range(rows)])
        out: list[int | None] = []
        for i in range(rows):
            if done[i]:
                out.append(None)
                continue
            token_id = int(tokens[i])
            out.append(token_id)
            seen[i] = torch.cat([seen[i], tokens[i].view(1, 1)], dim=1)
            done[i] = token_id in eos_ids or step + 1 >= limits[i]
        yield out
        if stopped is not None:
            done = [d or stopped(i) for i, d in enumerate(done)]
        if all(done):
            return
        slot = torch.full((rows, 1), cache.get_seq_length(), device=device)
        mask = torch.cat([mask, torch.ones(rows, 1, dtype=torch.long, device=device)], dim=1)
        where = positions(slot, next_logical.view(rows, 1), rope_delta)
        logits = forward(model, tokens.view(rows, 1), where, cache, attention_mask=mask, logical=next_logical.view(rows, 1))
        next_logical = next_logical + 1
