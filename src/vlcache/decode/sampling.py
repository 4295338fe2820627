"""Every per-row rule of a decode step, applied in one place on the device: the model's generation-config rules
(transformers' logits processors), OpenAI's per-request extras, a grammar's token mask, the sampling filters,
the draw, and the logprobs.

Each setting is a per-row tensor (or a lazily made [rows, vocab] one), so rows with different settings share one
step. The order is GenerationMixin._get_logits_processor's:

  sequence_bias, repetition_penalty, no_repeat_ngram_size, bad_words_ids, min_length, min_new_tokens,
  forced_bos_token_id, forced_eos_token_id, remove_invalid_values, exponential_decay_length_penalty,
  suppress_tokens, begin_suppress_tokens,
  then what a caller would pass to generate() as its own logits processors: frequency/presence penalties,
  logit_bias, a grammar's mask (decode.constraint),
  then, for sampling rows only: temperature, top-k, top-p, min-p, typical-p, epsilon, eta.

Greedy rows take the argmax of the processed logits (before the sampling filters, as generate() does). The
rules that read the row's own tokens (sequence bias, bad words, the n-gram rule, stop strings) use a token
history kept on the device, made only when a row has one of them; transformers' own SequenceBias/NoBadWords
processors and StopStringCriteria run on a right-aligned window of it, one call per distinct setting.

Random draws come from a counter-based generator (splitmix64 of the row's seed and its draw index, in int64
tensor arithmetic): a seeded row draws the same tokens alone or batched with any others, on any device. Top-k
is applied before sorting: one topk over the batch with the largest k any row asks for (the whole vocabulary
only when a sampling row has no top-k), so the later filters sort k values, not 151,936; they are exact there,
as every token outside the top k is -inf for them.

Logprobs (SamplingParams.logprobs = N): log_softmax of the processed logits (every rule and mask above) divided
by the row's temperature (1 for greedy rows), before the sampling filters; the chosen token's value and the top
N, as answer.TokenLogprobs. Rows that do not ask cost nothing.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass, field

import torch

from ..answer import TokenLogprobs
from . import constraint as constraints
from . import rules

GREEDY_BELOW = 1e-5  # temperatures this small are greedy: dividing logits by them overflows to NaN
MAX_LOGPROBS = 20  # OpenAI's limit on top_logprobs
_PAD = 1 << 40  # history padding: no token id (transformers' stop-string table clamps it to its "no token" entry)


@dataclass(frozen=True)
class SamplingParams:
    """How one row decodes. Immutable: tuples, not lists or dicts. Built by sampling_params() from a model's
    generation config and a caller's options."""

    temperature: float  # 0 (or below GREEDY_BELOW) means greedy
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    # Sampling filters after top-p (sampling rows only, as generate() applies them only with do_sample)
    min_p: float | None = None
    typical_p: float | None = None
    epsilon_cutoff: float | None = None
    eta_cutoff: float | None = None
    # OpenAI's per-request extras
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias in -100..100) added to the logits
    frequency_penalty: float = 0.0  # logits[j] -= count_j * frequency + (count_j > 0) * presence, counts of
    presence_penalty: float = 0.0  # j among the row's generated tokens (not the prompt)
    logprobs: int | None = None  # None: none; N in 0..20: the chosen token's logprob and the top N
    # The model's generation-config rules (transformers' logits processors and stop strings)
    no_repeat_ngram_size: int = 0
    min_length: int = 0  # prompt and answer together
    min_new_tokens: int = 0
    suppress_tokens: tuple[int, ...] = ()
    begin_suppress_tokens: tuple[int, ...] = ()
    bad_words_ids: tuple[tuple[int, ...], ...] = ()
    sequence_bias: tuple[tuple[tuple[int, ...], float], ...] = ()
    forced_bos_token_id: int | None = None
    forced_eos_token_id: tuple[int, ...] = ()
    exponential_decay_length_penalty: tuple[int, float] | None = None  # (start index, factor)
    remove_invalid_values: bool = False
    stop_strings: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    def check(self) -> None:
        """Refuse values no rule takes (ValueError, one line)."""
        for name, low, high in (("temperature", 0.0, math.inf), ("top_p", 0.0, 1.0), ("typical_p", 0.0, 1.0),
                                ("epsilon_cutoff", 0.0, 1.0), ("eta_cutoff", 0.0, 1.0), ("no_repeat_ngram_size", 0, math.inf),
                                ("min_length", 0, math.inf), ("min_new_tokens", 0, math.inf)):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high):
                raise ValueError(f"{name} must be a number in {low}..{high}, got {value!r}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in 0..{MAX_LOGPROBS}, got {self.logprobs}")
        for token, bias in self.logit_bias:
            if not -100 <= bias <= 100 or math.isnan(bias):
                raise ValueError(f"logit_bias values must be in -100..100, got {bias} for token {token}")
            if token < 0:
                raise ValueError(f"logit_bias token ids must be >= 0, got {token}")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be in -2..2, got {value}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: no top-k), got {self.top_k}")
        if self.min_p is not None and not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in 0..1, got {self.min_p}")
        if self.repetition_penalty is not None and not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


DEFAULT_TOP_K = 50  # what generate() samples with when neither the model nor the caller names a top-k


def sampling_params(generation_config, temperature=None, top_p=None, seed=None, *, top_k=None, min_p=None,
                    repetition_penalty=None, logit_bias=None, frequency_penalty=None, presence_penalty=None,
                    logprobs=None) -> SamplingParams:
    """The model's own generation config, overridden by what the caller gave; temperature 0 is greedy. A caller's
    temperature on a greedy model samples as generate(do_sample=True, temperature=T) would: with the config's
    top-k, top-p and other filters, or transformers' defaults (top-k 50) where it names none. The caller's top_k,
    min_p (sampling rows only) and repetition_penalty replace the config's; logit_bias is a {token id: bias}
    mapping (or pairs)."""
    do_sample = bool(getattr(generation_config, "do_sample", False))
    if temperature is None:
        temperature = float(generation_config.temperature or 1.0) if do_sample else 0.0
    sampling = float(temperature) >= GREEDY_BELOW
    if top_p is None:
        top_p = generation_config.top_p if sampling else None
    if top_k is None:
        top_k = generation_config.top_k if generation_config.top_k is not None else DEFAULT_TOP_K
    warpers = rules.warper_settings(generation_config)
    if min_p is not None:
        warpers["min_p"] = min_p
    if not sampling:
        warpers = dict.fromkeys(warpers)
    if repetition_penalty is None:
        repetition_penalty = getattr(generation_config, "repetition_penalty", None)
    bias = logit_bias.items() if isinstance(logit_bias, dict) else (logit_bias or ())
    return SamplingParams(
        temperature=float(temperature),
        top_p=top_p if sampling else None,
        top_k=(top_k or None) if sampling else None,
        repetition_penalty=repetition_penalty,
        seed=seed,
        **warpers,
        logit_bias=tuple(sorted((int(t), float(b)) for t, b in bias)),
        frequency_penalty=float(frequency_penalty or 0.0),
        presence_penalty=float(presence_penalty or 0.0),
        logprobs=logprobs,
        **rules.config_rules(generation_config),
    )


@dataclass(eq=False)
class _Row:
    """What the host keeps of a row: its settings and its Python-side objects."""

    params: SamplingParams
    constraint: constraints.TokenConstraint | None = None
    prompt: int = 0  # tokens before the answer (the prompt generate() would see)
    flags: frozenset = field(default_factory=frozenset)


# Per-slot device tensors: name -> (dtype, fill of an empty slot)
_SLOTS = {
    "temperature": (torch.float32, 0.0), "top_p": (torch.float32, 1.0), "top_k": (torch.long, 0),
    "penalty": (torch.float32, 1.0), "seed": (torch.long, 0), "draws": (torch.long, 0), "limit": (torch.long, 1),
    "prompt": (torch.long, 0), "min_p": (torch.float32, 0.0), "typical": (torch.float32, 1.0),
    "epsilon": (torch.float32, 0.0), "eta": (torch.float32, 0.0), "frequency": (torch.float32, 0.0),
    "presence": (torch.float32, 0.0), "min_new": (torch.long, 0), "min_length": (torch.long, 0),
    "forced_bos": (torch.long, -1), "decay_start": (torch.long, 1 << 62), "decay_factor": (torch.float64, 1.0),
    "forced_eos": (torch.bool, False), "begin_suppress": (torch.bool, False),
}
# Per-slot [rows, width] tensors made when a row first needs them: name -> (dtype, fill)
_WIDE = {"seen": (torch.bool, False), "counts": (torch.float32, 0.0), "bias": (torch.float32, 0.0),
         "suppress": (torch.bool, False), "begin": (torch.bool, False), "eos_forced": (torch.bool, False),
         "history": (torch.long, _PAD)}


def _flags(p: SamplingParams) -> frozenset:
    """Which parts of the step a row needs (the host skips a part no running row needs)."""
    f = set()
    if p.repetition_penalty not in (None, 1.0):
        f.add("penalty")
    if p.sequence_bias:
        f.add("sequence_bias")
    if p.no_repeat_ngram_size > 0:
        f.add("ngram")
    if p.bad_words_ids:
        f.add("bad_words")
    if p.min_length > 0 or p.min_new_tokens > 0:
        f.add("min_length")
    if p.forced_bos_token_id is not None:
        f.add("forced_bos")
    if p.forced_eos_token_id:
        f.add("forced_eos")
    if p.remove_invalid_values:
        f.add("invalid")
    if p.exponential_decay_length_penalty is not None:
        f.add("decay")
    if p.suppress_tokens:
        f.add("suppress")
    if p.begin_suppress_tokens:
        f.add("begin")
    if p.frequency_penalty or p.presence_penalty:
        f.add("counts")
    if p.logit_bias:
        f.add("bias")
    if p.stop_strings:
        f.add("stop")
    if f & {"sequence_bias", "ngram", "bad_words", "stop"}:
        f.add("history")
    if not p.greedy:
        f.add("sample")
        if p.min_p or p.typical_p is not None or p.epsilon_cutoff or p.eta_cutoff:
            f.add("filters")
    if p.logprobs is not None:
        f.add("logprobs")
    return frozenset(f)


class RowSampling:
    """Per-slot settings, rule state and stop rules of a batch, as device tensors grown with the batch."""

    def __init__(self, vocab: int, eos_ids: frozenset[int], device, tokenizer=None):
        self.vocab, self.device, self.tokenizer = vocab, device, tokenizer
        self.eos_list = sorted(eos_ids)
        self.eos = torch.tensor(self.eos_list or [-1], dtype=torch.long, device=device)
        for name, (dtype, fill) in _SLOTS.items():
            setattr(self, name, torch.full((0,), fill, dtype=dtype, device=device))
        for name in _WIDE:
            setattr(self, name, None)
        self.rows = 0
        self._rows: list[_Row] = []
        self._processors: dict = {}  # (kind, setting) -> a transformers processor or criterion, made once
        self.bitmask: torch.Tensor | None = None  # [rows, words] int32 on the CPU, for rows with a constraint
        self.logprobs: list[TokenLogprobs | None] = []  # per row, of the last sample()
        self._eos: torch.Tensor | None = None  # [V] bool: the end-of-sequence tokens
        self._union: frozenset | None = None  # every running row's flags (None: rows changed since)

    # -- rows in and out -------------------------------------------------------------------------------------

    @torch.inference_mode()
    def add(self, params: SamplingParams, max_new_tokens: int, ids: torch.Tensor,
            constraint: constraints.TokenConstraint | None = None) -> int:
        """A row with `params`, ending after `max_new_tokens`; `ids` [n]: its prompt (what generate() would be
        given: the rules that read earlier tokens see it). `constraint`: the row's grammar, or None."""
        params.check()
        slot = self.rows
        flags = _flags(params) | ({"constraint"} if constraint is not None else set())
        row = _Row(params, constraint, int(ids.shape[0]), frozenset(flags))
        self._reserve(slot + 1)
        greedy = params.greedy
        values = {
            "temperature": 0.0 if greedy else params.temperature,
            "top_p": params.top_p if params.top_p is not None and not greedy else 1.0,
            "top_k": 0 if greedy else (params.top_k or 0),
            "penalty": params.repetition_penalty if "penalty" in flags else 1.0,
            "seed": _signed64(params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little", signed=True)),
            "draws": 0, "limit": max_new_tokens, "prompt": row.prompt,
            "min_p": params.min_p or 0.0, "typical": params.typical_p if params.typical_p is not None else 1.0,
            "epsilon": params.epsilon_cutoff or 0.0, "eta": params.eta_cutoff or 0.0,
            "frequency": params.frequency_penalty, "presence": params.presence_penalty,
            "min_new": params.min_new_tokens, "min_length": params.min_length,
            "forced_bos": params.forced_bos_token_id if params.forced_bos_token_id is not None else -1,
            # generate(): penalties from `start` tokens after the prompt on (cur_len > start + prompt)
            "decay_start": (params.exponential_decay_length_penalty[0] + row.prompt) if "decay" in flags else 1 << 62,
            "decay_factor": params.exponential_decay_length_penalty[1] if "decay" in flags else 1.0,
            "forced_eos": "forced_eos" in flags, "begin_suppress": "begin" in flags,
        }
        for name, value in values.items():
            getattr(self, name)[slot] = value
        for name in _WIDE:
            if getattr(self, name) is not None:
                getattr(self, name)[slot] = _WIDE[name][1]
        ids = ids.to(self.device)
        if "penalty" in flags:
            self._wide("seen")[slot, ids.clamp(0, self.vocab - 1)] = True
        if "counts" in flags:
            self._wide("counts")
        if "bias" in flags:
            tokens = torch.tensor([t for t, _ in params.logit_bias], device=self.device)
            if int(tokens.max()) >= self.vocab:
                raise ValueError(f"logit_bias names token {int(tokens.max())}, the vocabulary has {self.vocab}")
            self._wide("bias")[slot, tokens] = torch.tensor([b for _, b in params.logit_bias], device=self.device)
        for flag, name, tokens in (("suppress", "suppress", params.suppress_tokens),
                                   ("begin", "begin", params.begin_suppress_tokens),
                                   ("forced_eos", "eos_forced", params.forced_eos_token_id)):
            inside = [t for t in tokens if 0 <= t < self.vocab]  # ids past the logits cannot be generated anyway
            if flag in flags and inside:
                self._wide(name)[slot, torch.tensor(inside, device=self.device)] = True
        if "history" in flags:
            history = self._wide("history", row.prompt + max_new_tokens + 1)
            history[slot, : row.prompt] = ids
        if "stop" in flags and self.tokenizer is None:
            raise ValueError("stop strings need the tokenizer")
        self._rows.append(row)
        self.rows += 1
        self._union = None
        return slot

    @torch.inference_mode()
    def adopt(self, other: "RowSampling", slot: int) -> int:
        mine = self.rows
        self._reserve(mine + 1)
        for name in _SLOTS:
            getattr(self, name)[mine] = getattr(other, name)[slot]
        for name in _WIDE:
            theirs = getattr(other, name)
            if theirs is not None:
                mine_t = self._wide(name, theirs.shape[1])
                mine_t[mine] = _WIDE[name][1]
                mine_t[mine, : theirs.shape[1]] = theirs[slot]
            elif getattr(self, name) is not None:
                getattr(self, name)[mine] = _WIDE[name][1]
        self._rows.append(other._rows[slot])
        self.rows += 1
        self._union = None
        return mine

    @torch.inference_mode()
    def remove(self, slot: int) -> None:
        """Drop a row; the last moves into its slot."""
        last = self.rows - 1
        if slot != last:
            for name in list(_SLOTS) + list(_WIDE):
                tensor = getattr(self, name)
                if tensor is not None:
                    tensor[slot] = tensor[last]
            self._rows[slot] = self._rows[last]
        self._rows.pop()
        self.rows -= 1
        self._union = None

    def _reserve(self, rows: int) -> None:
        have = self.temperature.shape[0]
        if rows <= have:
            return
        size = max(rows, 2 * have, 8)
        for name, (dtype, fill) in _SLOTS.items():
            old = getattr(self, name)
            new = torch.full((size,), fill, dtype=dtype, device=self.device)
            new[:have] = old
            setattr(self, name, new)
        for name in _WIDE:
            old = getattr(self, name)
            if old is not None:
                new = torch.full((size, old.shape[1]), _WIDE[name][1], dtype=old.dtype, device=self.device)
                new[:have] = old
                setattr(self, name, new)

    def _wide(self, name: str, width: int | None = None) -> torch.Tensor:
        """The [slots, width] tensor `name` (vocabulary wide unless `width`), made or widened on first need."""
        dtype, fill = _WIDE[name]
        width = width or self.vocab
        old = getattr(self, name)
        if old is not None and old.shape[1] >= width:
            return old
        new = torch.full((self.temperature.shape[0], max(width, 2 * old.shape[1] if old is not None else 0)),
                         fill, dtype=dtype, device=self.device)
        if old is not None:
            new[:, : old.shape[1]] = old
        setattr(self, name, new)
        return new

    # -- one token for every row -----------------------------------------------------------------------------

    def _eos_mask(self, vocab: int) -> torch.Tensor:
        if self._eos is None or self._eos.shape[0] != vocab:
            self._eos = torch.zeros(vocab, dtype=torch.bool, device=self.device)
            self._eos[[t for t in self.eos_list if t < vocab]] = True
        return self._eos

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """logits [B, V] of the first B rows -> (tokens [B] (-1 where a row's distribution is broken, e.g. NaN),
        done [B]: end of sequence, the row's length limit, a stop string, or a broken distribution). All on the
        device; rows with a constraint are finished by accept() (Batch.sample calls it). Logprobs of the rows
        that ask land in self.logprobs."""
        rows = logits.shape[0]
        logits = logits.float()
        if rows != self.rows:
            flags = frozenset().union(*(r.flags for r in self._rows[:rows]))
        else:
            if self._union is None:
                self._union = frozenset().union(*(r.flags for r in self._rows[:rows]))
            flags = self._union
        if flags - {"sample", "filters", "logprobs", "constraint"}:
            logits = self._process(logits, rows, flags)
        if "constraint" in flags:
            logits = self._mask(logits, rows)
        tokens = logits.argmax(dim=-1)
        broken = torch.isnan(logits).any(dim=-1)  # greedy or not, alone or batched: NaN logits are no answer
        # Sampling rows: temperature, the filters, then one draw each from the counter-based generator.
        if "sample" in flags:
            drawn, no_distribution = self._draw(logits, rows, "filters" in flags)
            sampled = self.temperature[:rows] > 0
            tokens = torch.where(sampled, drawn, tokens)
            broken = broken | (sampled & no_distribution)
        tokens = torch.where(broken, torch.full_like(tokens, -1), tokens)
        self.logprobs = self._logprobs(logits, tokens, rows) if "logprobs" in flags else [None] * rows
        # Bookkeeping on the device: the counter, what the rules remember, the stop rules.
        self.draws[:rows] += 1
        if self.seen is not None or self.counts is not None or self.history is not None:
            index = torch.arange(rows, device=logits.device)
            chosen = tokens.clamp(min=0)
        if self.seen is not None:
            self.seen[index, chosen] = True
        if self.counts is not None:
            self.counts[index, chosen] += (tokens >= 0).float()
        done = torch.isin(tokens, self.eos) | (self.draws[:rows] >= self.limit[:rows]) | broken
        if self.history is not None:
            at = (self.prompt[:rows] + self.draws[:rows] - 1).clamp(max=self.history.shape[1] - 1)
            self.history[index, at] = tokens
            if "stop" in flags:
                done = done | self._stopped(rows)
        return tokens, done

    def _process(self, logits: torch.Tensor, rows: int, flags: set) -> torch.Tensor:
        """The logits processors, in generate()'s order, for the rows that have them."""
        length = self.prompt[:rows] + self.draws[:rows]  # cur_len: the sequence generate() would hold
        if "sequence_bias" in flags:
            logits = self._by_setting(logits, rows, "sequence_bias", _sequence_bias_processor)
        if "penalty" in flags:  # RepetitionPenaltyLogitsProcessor
            penalty = self.penalty[:rows].unsqueeze(1)
            penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
            logits = torch.where(self.seen[:rows], penalised, logits)
        if "ngram" in flags:
            logits = self._no_repeat_ngram(logits, rows)
        if "bad_words" in flags:
            eos = tuple(self.eos_list)
            logits = self._by_setting(logits, rows, "bad_words_ids", lambda value: _bad_words_processor(value, eos))
        eos_mask = self._eos_mask(logits.shape[-1])
        if "min_length" in flags:  # MinLengthLogitsProcessor, MinNewTokensLengthLogitsProcessor
            short = (length < self.min_length[:rows]) | (self.draws[:rows] < self.min_new[:rows])
            logits = logits.masked_fill(short.unsqueeze(1) & eos_mask, -math.inf)
        if "forced_bos" in flags:  # ForcedBOSTokenLogitsProcessor: a sequence of one token
            force = (length == 1) & (self.forced_bos[:rows] >= 0)
            forced = torch.full_like(logits, -math.inf)
            forced[torch.arange(rows, device=logits.device), self.forced_bos[:rows].clamp(min=0)] = 0.0
            logits = torch.where(force.unsqueeze(1), forced, logits)
        if "forced_eos" in flags:  # ForcedEOSTokenLogitsProcessor: the last token the length limit allows
            force = self.forced_eos[:rows] & (self.draws[:rows] == self.limit[:rows] - 1)
            forced = torch.zeros_like(logits).masked_fill(~self.eos_forced[:rows, : logits.shape[-1]], -math.inf)
            logits = torch.where(force.unsqueeze(1), forced, logits)
        if "invalid" in flags:  # InfNanRemoveLogitsProcessor
            fixed = torch.nan_to_num(logits, nan=0.0, posinf=torch.finfo(logits.dtype).max, neginf=torch.finfo(logits.dtype).min)
            wants = torch.tensor(["invalid" in r.flags for r in self._rows[:rows]], device=logits.device)
            logits = torch.where(wants.unsqueeze(1), fixed, logits)
        if "decay" in flags:  # ExponentialDecayLengthPenalty, on the end-of-sequence tokens
            over = length > self.decay_start[:rows]
            steps = (length - self.decay_start[:rows]).clamp(min=0).double()
            scale = (torch.pow(self.decay_factor[:rows], steps) - 1).float().unsqueeze(1)
            penalty = (logits.abs() * scale).masked_fill(~torch.isfinite(logits), 0.0)
            logits = torch.where(over.unsqueeze(1) & eos_mask, logits + penalty, logits)
        if "suppress" in flags:  # SuppressTokensLogitsProcessor
            logits = logits.masked_fill(self.suppress[:rows, : logits.shape[-1]], -math.inf)
        if "begin" in flags:  # SuppressTokensAtBeginLogitsProcessor: the answer's first token
            first = self.begin_suppress[:rows] & (self.draws[:rows] == 0)
            logits = logits.masked_fill(first.unsqueeze(1) & self.begin[:rows, : logits.shape[-1]], -math.inf)
        # What a caller would pass to generate() as its own processors (after the model's).
        if "counts" in flags:  # OpenAI's frequency and presence penalties, on generated tokens only
            counts = self.counts[:rows, : logits.shape[-1]]
            logits = logits - counts * self.frequency[:rows].unsqueeze(1) - (counts > 0).float() * self.presence[:rows].unsqueeze(1)
        if "bias" in flags:  # OpenAI's logit_bias
            logits = logits + self.bias[:rows, : logits.shape[-1]]
        return logits

    def _by_setting(self, logits: torch.Tensor, rows: int, name: str, make) -> torch.Tensor:
        """Run transformers' processor for setting `name` on the rows that share each of its values: one call
        per distinct value, over a right-aligned window of those rows' tokens."""
        groups: dict = {}
        for i, row in enumerate(self._rows[:rows]):
            value = getattr(row.params, name)
            if value:
                groups.setdefault(value, []).append(i)
        for value, members in groups.items():
            key = (name, value)
            if key not in self._processors:
                self._processors[key] = make(value)
            sequences = [ids for ids, _ in value] if name == "sequence_bias" else value
            index = torch.tensor(members, device=logits.device)
            window = self._window(index, max(len(ids) for ids in sequences))
            logits = logits.clone()
            logits[index] = self._processors[key](window, logits[index])
        return logits

    def _window(self, index: torch.Tensor, width: int) -> torch.Tensor:
        """The last `width` tokens of rows `index`, right-aligned, padded with an id that matches nothing."""
        length = (self.prompt + self.draws)[index]
        at = length.unsqueeze(1) - width + torch.arange(width, device=index.device)
        window = self.history[index.unsqueeze(1), at.clamp(min=0)]
        return window.masked_fill(at < 0, _PAD)

    def _no_repeat_ngram(self, logits: torch.Tensor, rows: int) -> torch.Tensor:
        """NoRepeatNGramLogitsProcessor per row: a token that would complete an n-gram already in the row's
        sequence (prompt included) is banned. One pass per distinct n."""
        sizes = sorted({r.params.no_repeat_ngram_size for r in self._rows[:rows] if "ngram" in r.flags})
        length = self.prompt[:rows] + self.draws[:rows]
        longest = int(length.max())
        history = self.history[:rows, :longest]
        vocab = logits.shape[-1]
        for n in sizes:
            members = torch.tensor([r.params.no_repeat_ngram_size == n for r in self._rows[:rows]], device=logits.device)
            if longest < n:
                continue
            at = length.unsqueeze(1) - (n - 1) + torch.arange(n - 1, device=logits.device)
            prefix = history.gather(1, at.clamp(min=0))  # [R, n-1]: the row's last n-1 tokens
            windows = history.unfold(1, n, 1)  # [R, W, n]
            ends = torch.arange(windows.shape[1], device=logits.device) + n  # a window's end (exclusive)
            matches = (windows[..., :-1] == prefix.unsqueeze(1)).all(dim=-1) & (ends.unsqueeze(0) <= length.unsqueeze(1))
            matches = matches & members.unsqueeze(1) & (length >= n).unsqueeze(1)
            banned = logits.new_zeros((rows, vocab + 1), dtype=torch.bool)
            banned.scatter_(1, torch.where(matches, windows[..., -1].clamp(min=0, max=vocab), vocab), True)
            logits = logits.masked_fill(banned[:, :vocab], -math.inf)
        return logits

    def _mask(self, logits: torch.Tensor, rows: int) -> torch.Tensor:
        """The grammars' masks: each constrained row's constraint fills its row of the bitmask on the host; one
        copy to the device; disallowed tokens become -inf."""
        words = constraints.words(logits.shape[-1])
        if self.bitmask is None or self.bitmask.shape[0] < rows or self.bitmask.shape[1] != words:
            self.bitmask = torch.full((max(rows, 8), words), -1, dtype=torch.int32)
        constrained = [i for i, r in enumerate(self._rows[:rows]) if r.constraint is not None]
        for i in constrained:
            self.bitmask[i] = -1
            self._rows[i].constraint.fill_mask(self.bitmask[i])
        index = torch.tensor(constrained, device=logits.device)
        allowed = constraints.allowed(self.bitmask[constrained].to(logits.device), logits.shape[-1])
        logits = logits.clone()
        logits[index] = logits[index].masked_fill(~allowed, -math.inf)
        return logits

    def _stopped(self, rows: int) -> torch.Tensor:
        """transformers' StopStringCriteria on the rows with stop strings (their answer's end, across tokens)."""
        done = torch.zeros(rows, dtype=torch.bool, device=self.device)
        groups: dict = {}
        for i, row in enumerate(self._rows[:rows]):
            if row.params.stop_strings:
                groups.setdefault(row.params.stop_strings, []).append(i)
        for value, members in groups.items():
            key = ("stop_strings", value)
            if key not in self._processors:
                self._processors[key] = _stop_criteria(self.tokenizer, value)
            criteria = self._processors[key]
            index = torch.tensor(members, device=self.device)
            # generate() checks the criteria after each new token: the window ends at it (draws already counted)
            done[index] = criteria(self._window(index, criteria.maximum_token_len), None).to(self.device)
        return done

    def _logprobs(self, logits: torch.Tensor, tokens: torch.Tensor, rows: int) -> list[TokenLogprobs | None]:
        asking = [i for i, r in enumerate(self._rows[:rows]) if r.params.logprobs is not None]
        index = torch.tensor(asking, device=logits.device)
        temperature = self.temperature[index]
        scaled = logits[index] / torch.where(temperature > 0, temperature, torch.ones_like(temperature)).unsqueeze(1)
        logprobs = torch.log_softmax(scaled, dim=-1)
        chosen = logprobs.gather(1, tokens[index].clamp(min=0).unsqueeze(1)).squeeze(1)
        n = max(self._rows[i].params.logprobs for i in asking)
        top_values, top_ids = torch.topk(logprobs, n, dim=-1) if n else (logprobs[:, :0], logprobs[:, :0].long())
        host = (tokens[index].tolist(), chosen.tolist(), top_ids.tolist(), top_values.tolist())
        out: list[TokenLogprobs | None] = [None] * rows
        for j, i in enumerate(asking):
            k = self._rows[i].params.logprobs
            top = tuple(zip(host[2][j][:k], host[3][j][:k]))
            out[i] = TokenLogprobs(token=host[0][j], logprob=host[1][j], top=top)
        return out

    def accept(self, tokens: list[int]) -> list[bool]:
        """Hand each constrained row its chosen token; True where the row must end (its grammar is complete,
        or refused the token)."""
        ended = [False] * len(tokens)
        if self._union is not None and len(tokens) == self.rows and "constraint" not in self._union:
            return ended
        for i, row in enumerate(self._rows[: len(tokens)]):
            if row.constraint is not None and tokens[i] >= 0:
                ended[i] = not row.constraint.accept(tokens[i]) or row.constraint.is_terminated()
        return ended

    def _draw(self, logits: torch.Tensor, rows: int, filters: bool) -> tuple[torch.Tensor, torch.Tensor]:
        values, order = self._candidates(logits, rows, filters)
        k = values.shape[-1]
        probs = torch.softmax(values, dim=-1)
        probs = torch.where(values > float("-inf"), probs, torch.zeros_like(probs))
        cdf = torch.cumsum(probs, dim=-1)
        total = cdf[:, -1:]
        broken = ~torch.isfinite(cdf).all(dim=-1) | ~(total[:, 0] > 0)
        # One uniform draw per row from its own counter, through the inverse of the kept distribution.
        u = _uniform(self.seed[:rows], self.draws[:rows]).to(cdf.dtype).unsqueeze(1) * total
        index = torch.searchsorted(cdf, u, right=True).clamp(max=k - 1)
        # A draw that lands past the last kept token (rounding) takes the last kept one.
        last_kept = (probs > 0).long().cumsum(-1).argmax(dim=-1, keepdim=True)
        index = torch.minimum(index, last_kept)
        return order.gather(1, index).squeeze(1), broken

    @torch.inference_mode()
    def filtered(self, logits: torch.Tensor) -> torch.Tensor:
        """The sampling rows' scores [B, V] after temperature and the filters, -inf where a filter removed a
        token (transformers' warpers' output; what a draw is taken from). For tests and inspection."""
        rows = logits.shape[0]
        values, order = self._candidates(logits.float(), rows, True)
        out = torch.full(logits.shape, float("-inf"), device=logits.device)
        return out.scatter(1, order, values)

    def _candidates(self, logits: torch.Tensor, rows: int, filters: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Each sampling row's candidates, largest first: (scores after temperature and the filters, -inf where
        removed [B, k]; their token ids [B, k])."""
        ks = [int(r.params.top_k or 0) for r in self._rows[:rows] if "sample" in r.flags]
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
        # A k-th value of -inf (fewer finite scores than k: a grammar's mask) ties only with tokens that cannot be
        # drawn: what was taken holds every finite one, and the whole-vocabulary sort would be wasted.
        if k < vocab and bool((limited & (values[:, -1:] >= kth) & (kth > float("-inf"))).any()):
            values, order = torch.sort(warped, dim=-1, descending=True)
            k, rank = vocab, torch.arange(vocab, device=logits.device).unsqueeze(0)
        values = values.masked_fill(limited & (values < kth), float("-inf"))
        # 2. Top-p as transformers keeps it: a token stays while the probability before it is below p (the first
        # always stays).
        probs = torch.softmax(values, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs
        keep = (before < self.top_p[:rows].unsqueeze(1)) | (rank == 0)
        values = values.masked_fill(~keep, float("-inf"))
        # 3. min-p, typical-p, epsilon, eta (transformers' warpers, in its order), on the sorted candidates.
        if filters:
            values = _filters(values, self.min_p[:rows], self.typical[:rows], self.epsilon[:rows], self.eta[:rows])
        return values, order


def _filters(values: torch.Tensor, min_p: torch.Tensor, typical: torch.Tensor, epsilon: torch.Tensor,
             eta: torch.Tensor) -> torch.Tensor:
    """MinP, Typical, Epsilon and Eta warpers of transformers on sorted (largest first) candidate scores with
    -inf for removed ones; a row's neutral value (0, 1, 0, 0) leaves it as it is. Each keeps the top token."""
    first = torch.zeros_like(values, dtype=torch.bool)
    first[:, 0] = True
    inf = float("-inf")
    # MinPLogitsWarper
    probs = torch.softmax(values, dim=-1)
    remove = probs < min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
    values = values.masked_fill(remove & ~first, inf)
    # TypicalLogitsWarper
    if bool((typical < 1.0).any()):
        normalized = torch.log_softmax(values, dim=-1)
        p = normalized.exp()
        entropy = -(normalized * p).nansum(-1, keepdim=True)
        shifted = (-normalized - entropy).abs()
        sorted_shifted, by_shift = torch.sort(shifted, descending=False)
        cumulative = values.gather(-1, by_shift).softmax(dim=-1).cumsum(dim=-1)
        last = (cumulative < typical.unsqueeze(1)).sum(dim=1).clamp(max=values.shape[-1] - 1)
        remove_sorted = sorted_shifted > sorted_shifted.gather(1, last.view(-1, 1))
        remove_sorted[:, :1] = False
        remove = remove_sorted.scatter(1, by_shift, remove_sorted)
        values = torch.where((typical < 1.0).unsqueeze(1) & remove, torch.full_like(values, inf), values)
    # EpsilonLogitsWarper
    probs = torch.softmax(values, dim=-1)
    values = values.masked_fill((probs < epsilon.unsqueeze(1)) & ~first, inf)
    # EtaLogitsWarper: eta = min(epsilon, sqrt(epsilon) * exp(-entropy))
    if bool((eta > 0).any()):
        log_p = torch.log_softmax(values, dim=-1)
        p = log_p.exp()
        entropy = -(log_p.clamp(min=torch.finfo(log_p.dtype).min) * p).sum(-1)
        cutoff = torch.minimum(eta, eta.sqrt() * torch.exp(-entropy)).unsqueeze(1)
        values = values.masked_fill((p < cutoff) & ~first, inf)
    return values


_STOP_CRITERIA: dict = {}  # (id(tokenizer), stop strings) -> (tokenizer, StopStringCriteria), the last few used
_STOP_LOCK = threading.Lock()


def _stop_criteria(tokenizer, value: tuple[str, ...]):
    """transformers' StopStringCriteria for `value`, made once per tokenizer: making one reads the whole
    vocabulary (half a second for Qwen's 151,646 tokens), and every request's batch needs one."""
    key = (id(tokenizer), value)
    with _STOP_LOCK:  # batches of several threads (the server's, a caller's) share it
        hit = _STOP_CRITERIA.pop(key, None)
        if hit is None or hit[0] is not tokenizer:
            from transformers import StopStringCriteria

            hit = (tokenizer, StopStringCriteria(tokenizer, list(value)))
        _STOP_CRITERIA[key] = hit  # last used last
        while len(_STOP_CRITERIA) > 16:
            _STOP_CRITERIA.pop(next(iter(_STOP_CRITERIA)))
        return hit[1]


def _sequence_bias_processor(value):
    from transformers.generation.logits_process import SequenceBiasLogitsProcessor

    return SequenceBiasLogitsProcessor(sequence_bias=[[list(ids), bias] for ids, bias in value])


def _bad_words_processor(value, eos: tuple[int, ...]):
    from transformers.generation.logits_process import NoBadWordsLogitsProcessor

    return NoBadWordsLogitsProcessor([list(ids) for ids in value], list(eos) or None)


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
