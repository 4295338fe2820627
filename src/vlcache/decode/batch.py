"""A batch of rows that decode together: the one decode path of the engine, conversations and the server.

Layered like mlx-lm: RowsCache keeps the rows' state, RowSampling their sampling and stop rules, Batch runs
forwards over them (a prefill of new tokens, then decode steps) and hands back each step's tokens with ONE
transfer to the host. Between steps the next input ids, positions and masks are built on the device from
what the last step left there. `Engine.ask`, `stream`, `ask_many`, conversations and the server's scheduler
all go through a Batch.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from . import attention
from ..answer import TokenLogprobs
from .constraint import TokenConstraint
from .rows import Prefix, RowsCache
from .sampling import RowSampling, SamplingParams

PREFILL_PIECE = 1024  # tokens of new ids a forward takes at most (a long text-only prompt goes in pieces)


class Batch:
    def __init__(self, model, positions, eos_ids: frozenset[int], device, dtype, runner=None, tokenizer=None,
                 pool=None, fresh_rows: bool = False):
        self.model = model
        self.positions = positions  # the family's: (slots, logical, rope deltas [B, 1]) -> position ids
        self.device = device
        # pool: a KVPool shared with other batches; fresh_rows: rows' own tokens on fresh blocks (RowsCache)
        self.cache = RowsCache(model.config, device, dtype, pool=pool, fresh_rows=fresh_rows)
        vocab = model.get_output_embeddings().weight.shape[0]
        self.sampling = RowSampling(vocab, eos_ids, device, tokenizer)  # the tokenizer: for stop strings
        self.deltas = torch.zeros(0, 1, dtype=torch.long, device=device)
        self.last = torch.zeros(0, 1, dtype=torch.long, device=device)  # each row's last sampled token
        self.runner = runner  # a decode.step.StepRunner for fixed-shape (compiled, graphed) steps, or None
        self.ended: list[bool] = []  # per row: done after the last sample()

    @property
    def rows(self) -> int:
        return self.cache.rows

    # -- rows in and out ---------------------------------------------------------------------------------------

    @torch.inference_mode()
    def add(self, prefix: Prefix, params: SamplingParams, max_new_tokens: int, seen: torch.Tensor,
            constraint: TokenConstraint | None = None) -> int:
        """A row continuing from `prefix`; `seen` [n] its ids so far (the prompt the rules read); `constraint`
        its grammar (decode.constraint), or None."""
        self.sampling.add(params, max_new_tokens, seen, constraint)  # first: settings no rule takes fail here
        try:
            slot = self.cache.add(prefix)
        except Exception:
            self.sampling.remove(self.sampling.rows - 1)
            raise
        self._reserve(slot + 1)
        self.deltas[slot] = prefix.rope_delta
        return slot

    @torch.inference_mode()
    def restart(self, slot: int, params: SamplingParams, max_new_tokens: int, seen: torch.Tensor,
                constraint: TokenConstraint | None = None) -> None:
        """New sampling for the last row (a conversation's next turn continues in the same slot)."""
        if slot != self.rows - 1:
            raise ValueError("only the last row can restart")
        self.sampling.remove(slot)
        self.sampling.add(params, max_new_tokens, seen, constraint)

    @torch.inference_mode()
    def adopt(self, other: "Batch", slot: int) -> int:
        """Move a row (prefilled elsewhere, its first token sampled) into this batch; returns its slot."""
        mine = self.cache.adopt(other.cache, slot)
        self.sampling.adopt(other.sampling, slot)
        self._reserve(mine + 1)
        self.deltas[mine] = other.deltas[slot]
        self.last[mine] = other.last[slot]
        return mine

    @torch.inference_mode()
    def remove(self, slot: int) -> None:
        last = self.rows - 1
        self.cache.remove(slot)
        self.sampling.remove(slot)
        self.deltas[slot] = self.deltas[last]
        self.last[slot] = self.last[last]

    def _reserve(self, rows: int) -> None:
        if rows <= self.deltas.shape[0]:
            return
        size = max(rows, 2 * self.deltas.shape[0], 8)
        for name in ("deltas", "last"):
            old = getattr(self, name)
            new = old.new_zeros(size, 1)
            new[: old.shape[0]] = old
            setattr(self, name, new)

    # -- forwards --------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, new_ids: list[torch.Tensor]) -> torch.Tensor:
        """Run each row's new ids [m_i] (left-padded to the longest); the logits after the last of each [B, V].
        Long ones go in pieces of PREFILL_PIECE tokens: the attention's scores grow with the square of a piece."""
        width = max(ids.shape[0] for ids in new_ids)
        logits = None
        for end in range(width % PREFILL_PIECE or PREFILL_PIECE, width + 1, PREFILL_PIECE):
            # The columns up to `end` of the left-padded rows: each row's part of them is its first tokens.
            start = end - min(PREFILL_PIECE, end)
            pieces = [ids[max(0, start - (width - ids.shape[0])): max(0, end - (width - ids.shape[0]))] for ids in new_ids]
            logits = self._prefill_piece(pieces)
        return logits

    def _prefill_piece(self, new_ids: list[torch.Tensor]) -> torch.Tensor:
        rows = len(new_ids)
        width = max(ids.shape[0] for ids in new_ids)
        ids = torch.zeros(rows, width, dtype=torch.long, device=self.device)
        logical = torch.empty(rows, width, dtype=torch.long, device=self.device)
        counts = []
        for i, row_ids in enumerate(new_ids):
            n, start = row_ids.shape[0], self.cache.book.lengths[i]
            ids[i, width - n:] = row_ids
            logical[i] = start  # left padding looks at the first real token: never at nothing
            logical[i, width - n:] = torch.arange(start, start + n, device=self.device)
            counts.append(n)
        where = self.positions(logical, logical, self.deltas[:rows])
        return attention.forward(self.model, ids, where, self.cache, logical, counts)

    @torch.inference_mode()
    def step(self) -> torch.Tensor:
        """One decode step of every row from its last sampled token; logits [B, V]."""
        rows = self.rows
        if self.runner is not None:
            logits = self.runner.step(self)
            if logits is not None:
                return logits
        logical = torch.tensor(self.cache.book.next_logical(), device=self.device).unsqueeze(1)
        where = self.positions(logical, logical, self.deltas[:rows])
        return attention.forward(self.model, self.last[:rows], where, self.cache, logical, [1] * rows)

    @property
    def logprobs(self) -> list[TokenLogprobs | None]:
        """Per row, the logprobs of the token the last sample() chose (None for rows that did not ask)."""
        return self.sampling.logprobs

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor) -> tuple[list[int], list[bool]]:
        """Every row's next token and whether it is done, with one transfer to the host. A token of -1: the
        row's distribution was broken (NaN logits); it is done. A row whose grammar completes (or refuses the
        token) is done. Logprobs of the rows that asked: self.logprobs."""
        tokens, done = self.sampling.sample(logits)
        self.last[: tokens.shape[0], 0] = tokens.clamp(min=0)
        host = torch.stack([tokens, done.long()]).tolist()
        ended = self.sampling.accept(host[0])
        self.ended = [bool(d) or e for d, e in zip(host[1], ended)]
        return host[0], self.ended


def generate(batch: Batch, new_ids: list[torch.Tensor], stopped=None) -> Iterator[list[int | None]]:
    """Prefill each row's new ids, then decode all rows together. Yields one list per step with each row's
    token, or None for a row already finished (after its end-of-sequence token, which is yielded, or its
    length limit). `stopped(row)` lets a caller end a row early. Rows that finish keep their slot until all
    are done (their output dropped): a batch of one request's rows, whose lengths are alike."""
    logits = batch.prefill(new_ids)
    rows = len(new_ids)
    finished = [False] * rows
    while True:
        tokens, done = batch.sample(logits)
        out: list[int | None] = []
        for i in range(rows):
            if finished[i] or tokens[i] < 0:
                out.append(None)
                finished[i] = True
                continue
            out.append(tokens[i])
            finished[i] = done[i]
        yield out
        if stopped is not None:
            finished = [f or stopped(i) for i, f in enumerate(finished)]
        if all(finished):
            return
        logits = batch.step()
