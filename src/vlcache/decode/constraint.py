"""Per-row token constraints (grammars): which tokens a row may take next, as a packed bitmask.

The format is xgrammar's (llguidance uses the same): int32 words [ceil(V / 32)], bit b of word w set means token
32 * w + b is allowed. Each step the host asks every row that has a constraint to fill its row of the batch's
bitmask; the device unpacks it and sets the disallowed tokens' logits to -inf after the logits processors and
before the greedy argmax or the sampling filters (where transformers runs a grammar's logits processor passed
to generate()). The chosen token then goes to `accept`; a constraint that `is_terminated` ends its row as an
end-of-sequence token does. Rows without a constraint pay nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class TokenConstraint(Protocol):
    """One row's grammar state (an xgrammar GrammarMatcher fits it with thin adapters)."""

    def fill_mask(self, bitmask_row: torch.Tensor) -> None:
        """Write the allowed next tokens into `bitmask_row` (int32 [ceil(V / 32)], on the CPU, all bits set on
        entry: clear the bits of disallowed tokens, or overwrite the row)."""

    def accept(self, token: int) -> bool:
        """Advance by the chosen token; False if the grammar does not allow it (the row then ends)."""

    def is_terminated(self) -> bool:
        """The grammar is complete and allows nothing more: the row ends."""


def words(vocab: int) -> int:
    """Bitmask words per row for a vocabulary of `vocab` tokens."""
    return (vocab + 31) // 32


def allowed(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """int32 [R, W] packed bitmask -> bool [R, vocab]: True where a token is allowed (bit set)."""
    bits = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    unpacked = (bitmask.unsqueeze(-1) >> bits) & 1  # [R, W, 32]; >> on int32 sign-extends, & 1 keeps one bit
    return unpacked.reshape(bitmask.shape[0], -1)[:, :vocab].bool()


def set_allowed(bitmask_row: torch.Tensor, tokens: Sequence[int]) -> None:
    """Clear `bitmask_row` and allow exactly `tokens` (a helper for constraints that know their token set)."""
    bitmask_row.zero_()
    for token in tokens:
        word, bit = divmod(int(token), 32)
        value = int(bitmask_row[word]) | (1 << bit)
        bitmask_row[word] = value - (1 << 32) if value >= 1 << 31 else value  # as a signed int32


class TokenSequences:
    """A constraint that allows exactly one of the given token sequences (a tiny grammar: a choice among
    fixed answers). Used by tests and as a reference for the protocol: it can reject and it terminates."""

    def __init__(self, sequences: Sequence[Sequence[int]]):
        if not sequences or any(not s for s in sequences):
            raise ValueError("TokenSequences needs non-empty token sequences")
        self.sequences = [tuple(int(t) for t in s) for s in sequences]
        self.taken: list[int] = []

    def _live(self) -> list[tuple[int, ...]]:
        n = len(self.taken)
        return [s for s in self.sequences if len(s) > n and list(s[:n]) == self.taken]

    def fill_mask(self, bitmask_row: torch.Tensor) -> None:
        set_allowed(bitmask_row, {s[len(self.taken)] for s in self._live()})

    def accept(self, token: int) -> bool:
        if token not in {s[len(self.taken)] for s in self._live()}:
            return False
        self.taken.append(int(token))
        return True

    def is_terminated(self) -> bool:
        return tuple(self.taken) in self.sequences and not self._live()
