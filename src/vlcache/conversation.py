"""Multi-turn conversations about a cached image, continuing in place from the KV of earlier turns."""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from dataclasses import replace

import torch

from . import prompt
from .engine import Answer, Delta, Engine, GenerationOptions, _now
from .families import LINEAR
from .state import ImageState


class Conversation:
    """A chat about one state. Each turn prefills only what is new since the tokens already in the cache.

    What is new comes from the chat template: the whole conversation is rendered and tokenized, and the
    longest run of tokens that the live cache already holds is kept. Usually that is everything up to the new
    user turn; when an answer's text re-tokenizes differently from the ids the model generated, the cache is
    cut back to where they part, so every turn equals generate() on the whole uncached conversation.
    """

    def __init__(self, engine: Engine, state: ImageState):
        engine.check_state(state)
        self.engine = engine
        self.state = engine.adopt(state)
        self.reset()

    def reset(self) -> None:
        """Back to the cached state: earlier turns are forgotten."""
        self.messages: list[dict] = copy.deepcopy(self.state.metadata.messages)
        self._ids = self.state.input_ids  # what the live cache holds, [1, n]
        self._batch = None
        # Linear-attention states cannot be cut back: (tokens held, their states) at each turn boundary.
        linear = [kv for kv, kind in zip(self.state.kv, self.engine.family.layer_kinds()) if kind == LINEAR]
        self._snapshots: list[tuple[int, list]] = [(self.state.num_tokens, linear)]

    @property
    def turns(self) -> int:
        return sum(1 for m in self.messages if m["role"] == "assistant") - sum(
            1 for m in self.state.metadata.messages if m["role"] == "assistant"
        )

    def ask(self, text: str, max_new_tokens: int = 128, temperature: float | None = None,
            top_p: float | None = None, seed: int | None = None) -> Answer:
        delta = None
        for delta in self.stream(text, max_new_tokens, temperature, top_p, seed):
            pass
        return delta.answer

    def stream(self, text: str, max_new_tokens: int = 128, temperature: float | None = None,
               top_p: float | None = None, seed: int | None = None) -> Iterator[Delta]:
        options = GenerationOptions(max_new_tokens, temperature, top_p, seed)
        options.check()
        messages = prompt.with_question(self.messages, text)
        return self._stream(messages, options)

    def _stream(self, messages: list[dict], options: GenerationOptions) -> Iterator[Delta]:
        # 1. The whole conversation's tokens, and how many of them the live cache already holds.
        target = self._target_ids(messages, add_generation_prompt=True)
        keep = self._sync(target, options.max_new_tokens)
        # 2. Generate in the live cache: it grows by the new tokens and the answer.
        delta = None
        for delta in self.engine.stream_ids(None, target[:, :keep], target[:, keep:], options, batch=self._batch):
            yield delta
        # 3. Remember the turn. The last generated token was never run through the model.
        answer = delta.answer
        self._ids = torch.cat([target, torch.tensor([answer.token_ids[:-1]], dtype=torch.long, device=target.device)], dim=1)
        self.messages = messages + [{"role": "assistant", "content": answer.text}]
        if self.engine.family.has_linear_layers:
            self._snapshots.append((self._ids.shape[1], self._linear_states()))

    def to_state(self) -> ImageState:
        """The conversation so far as a state that `ask` and `chat` can resume (new questions follow it)."""
        target = self._target_ids(self.messages, add_generation_prompt=False)
        keep = self._sync(target, 0, at_least_one_new=False)
        if keep < target.shape[1]:
            self._batch.prefill([target[0, keep:]])
            self._ids = target
        n = target.shape[1]
        kv = self._batch.cache.row_state(0)  # fresh tensors: later turns may overwrite the live buffer
        base = self.state
        extra = n - base.num_tokens
        zeros = torch.zeros(1, extra, dtype=torch.long, device=target.device)
        return ImageState(
            kv=kv,
            input_ids=target,
            attention_mask=torch.ones_like(target),
            mm_token_type_ids=torch.cat([base.mm_token_type_ids, zeros], dim=1),
            image_grid_thw=base.image_grid_thw,
            rope_deltas=base.rope_deltas,
            metadata=replace(base.metadata, messages=copy.deepcopy(self.messages), prefix_tokens=n, created=_now()),
        )

    def save(self, path: str | os.PathLike):
        return self.to_state().save(path)

    # -- helpers ---------------------------------------------------------------------------------------------

    def _target_ids(self, messages: list[dict], add_generation_prompt: bool) -> torch.Tensor:
        meta = self.state.metadata
        rest = self.engine.ids_after(meta.messages, messages, add_generation_prompt, meta.template_time)
        return torch.cat([self.state.input_ids, rest.to(self.state.input_ids.device)], dim=1)

    def prompt_ids(self, text: str) -> torch.Tensor:
        """The whole conversation's ids that asking `text` next feeds the model: [1, n] (the state's, then the rest)."""
        return self._target_ids(prompt.with_question(self.messages, text), add_generation_prompt=True)

    def _linear_states(self) -> list:
        """The live row's (conv, recurrent) states of the linear layers, as fresh tensors (a snapshot)."""
        kinds = self.engine.family.layer_kinds()
        return [kv for kv, kind in zip(self._batch.cache.row_state(0), kinds) if kind == LINEAR]

    def _sync(self, target: torch.Tensor, max_new_tokens: int, at_least_one_new: bool = True) -> int:
        """Cut the live cache back to the longest prefix it shares with `target`; return that length."""
        if self._batch is None:
            self._batch = self.engine.batch()
            self._batch.add(self.engine.state_prefix(self.state), self.engine.sampling(GenerationOptions()), 1,
                            self.state.input_ids[0])
        held = self._ids[0, : self._batch.cache.book.lengths[0]]
        limit = min(held.shape[0], target.shape[1] - (1 if at_least_one_new else 0))
        same = (held[:limit] == target[0, :limit]).long()
        keep = int(same.cumprod(0).sum()) if limit else 0
        # Against what the live row really holds: a turn that ended early (a caller that stopped reading, an error)
        # advanced the linear states past the ids recorded for the last whole turn.
        if self.engine.family.has_linear_layers and keep < self._batch.cache.book.lengths[0]:
            # Back to the latest turn boundary at or before `keep`; what follows it is computed again.
            self._snapshots = [snap for snap in self._snapshots if snap[0] <= keep]  # later ones held other tokens
            keep, states = self._snapshots[-1]
            self._batch.cache.set_linear_states(0, states)
        self._batch.cache.truncate(0, keep)
        self._ids = self._ids[:, :keep]
        return keep
