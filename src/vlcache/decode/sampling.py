"""Sampling for every row of a batch in one set of tensor operations on the device.

Greedy, temperature, top-k, top-p and the repetition penalty are per-row tensors, so rows with different
settings share one step with no Python per row. Random draws come from a counter-based generator (splitmix64
of the row's seed and its draw index, in int64 tensor arithmetic): a seeded row draws the same tokens alone
or batched with any others, on any device, and no generator object is kept per row.

The processing order and the arithmetic follow transformers' logits processors (RepetitionPenalty, then
Temperature, TopK, TopP on the warped logits): greedy rows take the argmax after the penalty, as generate()
does. Top-k is applied before sorting: one topk over the batch with the largest k any row asks for (the whole
vocabulary only when a sampling row has no top-k), so top-p sorts k values, not 151,936.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

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


DEFAULT_TOP_K = 50  # what generate() samples with when neither the model nor the caller names a top-k


def sampling_params(generation_config, temperature=None, top_p=None, seed=None) -> SamplingParams:
    """The model's own generation config, overridden by what the caller gave; temperature 0 is greedy. A caller's
    temperature on a greedy model samples as generate(do_sample=True, temperature=T) would: with the config's
    top-k and top-p, or transformers' defaults (top-k 50, no top-p) where it names none."""
    do_sample = bool(getattr(generation_config, "do_sample", False))
    if temperature is None:
        temperature = float(generation_config.temperature or 1.0) if do_sample else 0.0
    sampling = float(temperature) >= GREEDY_BELOW
    if top_p is None:
        top_p = generation_config.top_p if sampling else None
    top_k = (generation_config.top_k if generation_config.top_k is not None else DEFAULT_TOP_K) if sampling else None
    return SamplingParams(
        temperature=float(temperature),
        top_p=top_p,
        top_k=top_k or None,
        repetition_penalty=getattr(generation_config, "repetition_penalty", None),
        seed=seed,
    )


class RowSampling:
    """Per-slot sampling settings and stop rules of a batch, as device tensors grown with the batch."""

    def __init__(self, vocab: int, eos_ids: frozenset[int], device):
        self.vocab, self.device = vocab, device
        self.eos = torch.tensor(sorted(eos_ids) or [-1], dtype=torch.long, device=device)
        self.temperature = torch.zeros(0, device=device)
        self.top_p = torch.ones(0, device=device)
        self.top_k = torch.zeros(0, dtype=torch.long, device=device)
        self.penalty = torch.ones(0, device=device)
        self.seed = torch.zeros(0, dtype=torch.long, device=device)
        self.draws = torch.zeros(0, dtype=torch.long, device=device)  # tokens drawn so far (the counter)
        self.limit = torch.zeros(0, dtype=torch.long, device=device)  # max_new_tokens
        self.seen: torch.Tensor | None = None  # [R, V] bool: ids in the prompt and answer (repetition penalty)
        self.rows = 0
        # What the host knows without asking the device: whether any row needs the slower parts.
        self._greedy: list[bool] = []
        self._top_k: list[int] = []
        self._penalised: list[bool] = []

    # -- rows in and out -------------------------------------------------------------------------------------

    @torch.inference_mode()
    def add(self, params: SamplingParams, max_new_tokens: int, ids: torch.Tensor) -> int:
        """A row with `params`, ending after `max_new_tokens`; `ids` [n]: its prompt (for the penalty)."""
        slot = self.rows
        self._reserve(slot + 1)
        greedy = params.greedy
        self.temperature[slot] = 0.0 if greedy else params.temperature
        self.top_p[slot] = params.top_p if params.top_p is not None and not greedy else 1.0
        self.top_k[slot] = 0 if greedy else (params.top_k or 0)
        penalty = params.repetition_penalty if params.repetition_penalty not in (None, 1.0) else 1.0
        self.penalty[slot] = penalty
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little", signed=True)
        self.seed[slot] = _signed64(seed)
        self.draws[slot] = 0
        self.limit[slot] = max_new_tokens
        self._greedy.append(greedy)
        self._top_k.append(0 if greedy else int(params.top_k or 0))
        self._penalised.append(penalty != 1.0)
        if penalty != 1.0:
            if self.seen is None:
                self.seen = torch.zeros(self.temperature.shape[0], self.vocab, dtype=torch.bool, device=self.device)
            self.seen[slot] = False
            self.seen[slot, ids.to(self.device).clamp(0, self.vocab - 1)] = True
        self.rows += 1
        return slot

    @torch.inference_mode()
    def adopt(self, other: "RowSampling", slot: int) -> int:
        mine = self.rows
        self._reserve(mine + 1)
        for name in ("temperature", "top_p", "top_k", "penalty", "seed", "draws", "limit"):
            getattr(self, name)[mine] = getattr(other, name)[slot]
        for name in ("_greedy", "_top_k", "_penalised"):
            getattr(self, name).append(getattr(other, name)[slot])
        if other._penalised[slot]:
            if self.seen is None:
                self.seen = torch.zeros(self.temperature.shape[0], self.vocab, dtype=torch.bool, device=self.device)
            self.seen[mine] = other.seen[slot]
        self.rows += 1
        return mine

    @torch.inference_mode()
    def remove(self, slot: int) -> None:
        """Drop a row; the last moves into its slot."""
        last = self.rows - 1
        if slot != last:
            for name in ("temperature", "top_p", "top_k", "penalty", "seed", "draws", "limit"):
                tensor = getattr(self, name)
                tensor[slot] = tensor[last]
            for name in ("_greedy", "_top_k", "_penalised"):
                getattr(self, name)[slot] = getattr(self, name)[last]
            if self.seen is not None:
                self.seen[slot] = self.seen[last]
        for name in ("_greedy", "_top_k", "_penalised"):
            getattr(self, name).pop()
        self.rows -= 1

    def _reserve(self, rows: int) -> None:
        have = self.temperature.shape[0]
        if rows <= have:
            return
        size = max(rows, 2 * have, 8)
        for name, fill in (("temperature", 0.0), ("top_p", 1.0), ("top_k", 0), ("penalty", 1.0), ("seed", 0),
                           ("draws", 0), ("limit", 1)):
            old = getattr(self, name)
            new = torch.full((size,), fill, dtype=old.dtype, device=self.device)
            new[:have] = old
            setattr(self, name, new)
        if self.seen is not None:
            seen = torch.zeros(size, self.vocab, dtype=torch.bool, device=self.device)
            seen[:have] = self.seen
            self.seen = seen

    # -- one token for every row -----------------------------------------------------------------------------

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """logits [B, V] of the first B rows -> (tokens [B] (-1 where a row's distribution is broken, e.g. NaN),
        done [B]: end of sequence, the row's length limit, or a broken distribution). All on the device."""
        rows = logits.shape[0]
        logits = logits.float()
        # 1. Repetition penalty (transformers' RepetitionPenaltyLogitsProcessor), on the rows that ask for it.
        if any(self._penalised[:rows]):
            penalty = self.penalty[:rows].unsqueeze(1)
            penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
            logits = torch.where(self.seen[:rows], penalised, logits)
        tokens = logits.argmax(dim=-1)
        broken = torch.isnan(logits).any(dim=-1)  # greedy or not, alone or batched: NaN logits are no answer
        # 2. Sampling rows: temperature, top-k, top-p, then one draw each from the counter-based generator.
        if not all(self._greedy[:rows]):
            drawn, no_distribution = self._draw(logits, rows)
            sampled = self.temperature[:rows] > 0
            tokens = torch.where(sampled, drawn, tokens)
            broken = broken | (sampled & no_distribution)
        tokens = torch.where(broken, torch.full_like(tokens, -1), tokens)
        # 3. Bookkeeping on the device: the counter, the penalty's seen ids, the stop rules.
        self.draws[:rows] += 1
        if self.seen is not None:
            self.seen[torch.arange(rows, device=logits.device), tokens.clamp(min=0)] = True
        done = torch.isin(tokens, self.eos) | (self.draws[:rows] >= self.limit[:rows]) | broken
        return tokens, done

    def _draw(self, logits: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        sampling = [not g for g in self._greedy[:rows]]
        ks = [k for k, s in zip(self._top_k[:rows], sampling) if s]
        vocab = logits.shape[-1]
        temperature = torch.where(self.temperature[:rows] > 0, self.temperature[:rows], torch.ones_like(self.temperature[:rows]))
        warped = logits / temperature.unsqueeze(1)
        row_k = self.top_k[:rows].unsqueeze(1)
        # 1. Top-k before sorting: the largest k any row asks for, with room for ties (transformers keeps every
        # token equal to the k-th value); where ties might reach past what was taken, the whole vocabulary.
        k = vocab if any(v <= 0 or v >= vocab for v in ks) else min(vocab, 2 * max(ks) + 64)
        values, order = torch.topk(warped, k, dim=-1)  # sorted, largest first
        rank = torch.arange(k, device=logits.device).unsqueeze(0)
        kth = values.gather(1, (row_k - 1).clamp(min=0, max=k - 1))
        limited = row_k > 0
        if k < vocab and bool((limited & (values[:, -1:] >= kth)).any()):
            values, order = torch.sort(warped, dim=-1, descending=True)
            k, rank = vocab, torch.arange(vocab, device=logits.device).unsqueeze(0)
        values = values.masked_fill(limited & (values < kth), float("-inf"))
        probs = torch.softmax(values, dim=-1)
        # 2. Top-p as transformers keeps it: a token stays while the probability before it is below p (the first
        # always stays); the kept ones are renormalised.
        before = torch.cumsum(probs, dim=-1) - probs
        keep = (before < self.top_p[:rows].unsqueeze(1)) | (rank == 0)
        probs = torch.where(keep & (values > float("-inf")), probs, torch.zeros_like(probs))
        cdf = torch.cumsum(probs, dim=-1)
        total = cdf[:, -1:]
        broken = ~torch.isfinite(cdf).all(dim=-1) | ~(total[:, 0] > 0)
        # 3. One uniform draw per row from its own counter, through the inverse of the kept distribution.
        u = _uniform(self.seed[:rows], self.draws[:rows]).to(cdf.dtype).unsqueeze(1) * total
        index = torch.searchsorted(cdf, u, right=True).clamp(max=k - 1)
        # A draw that lands past the last kept token (rounding) takes the last kept one.
        last_kept = (probs > 0).long().cumsum(-1).argmax(dim=-1, keepdim=True)
        index = torch.minimum(index, last_kept)
        return order.gather(1, index).squeeze(1), broken


_GOLDEN, _MIX1, _MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _signed64(value: int) -> int:
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 tensors (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _uniform(seed: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """splitmix64(seed + (counter + 1) * golden) as a float64 in [0, 1): one draw per row, in int64 arithmetic
    (multiplication wraps modulo 2^64 on every torch device)."""
    z = seed + (counter + 1) * _signed64(_GOLDEN)
    z = (z ^ _shr(z, 30)) * _signed64(_MIX1)
    z = (z ^ _shr(z, 27)) * _signed64(_MIX2)
    z = z ^ _shr(z, 31)
    return _shr(z, 11).double() * (1.0 / (1 << 53))
