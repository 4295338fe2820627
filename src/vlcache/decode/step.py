"""Fixed-shape decode steps, compiled with torch.compile (and captured as CUDA graphs on CUDA).

A decode step of B rows runs with the rows padded to a bucket (1, 2, 4, 8, ...: decode.bucket) and over a span
of positions fixed when the runner is made (`span`: the server's --max-context, a multiple of the block size), so
its shapes depend only on the bucket: every shape is compiled at start (decode.probe) and none while requests
wait, however long an answer grows. Rows beyond B are idle: they attend to one zero slot and their outputs are
dropped. On the CPU the K/V pool's tensors still grow (by doubling, decode.kvpool): their block count is a
dynamic dimension of the one graph, never a new variant; the server's pool on CUDA is reserved whole at start.
A row longer than the span (the Engine API has no --max-context) steps eagerly: slower, never a compile.

Backends: "inductor" (fused kernels: faster, but they round differently, so it is used only where the
exactness probe holds for the loaded model) and, on CUDA, "cudagraphs" (the step's own kernels captured and
replayed: the eager step's numbers at the graph's pace). Compiled artifacts go under $VLCACHE_HOME/compile,
reused by later processes. A step that fails to compile falls back to eager with one note, never an error.
"""

from __future__ import annotations

import logging
import os
import time
import torch
import torch.fx.experimental._config as fx_config
from torch import _dynamo

from ..paths import private_compile_dir
from .rows import RowsLinearLayer, bucket

log = logging.getLogger("vlcache")

def _forward(model, ids, positions, cache):
    out = model(input_ids=ids, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1, vlcache_rows=cache)
    return out.logits[:, -1, :]


class StepRunner:
    """Runs Batch.step with fixed shapes through a compiled forward; None from step() means: use eager."""

    def __init__(self, model, device, backend: str = "inductor", span: int | None = None):
        self.model, self.device, self.backend = model, torch.device(device), backend
        self.span = span or default_span(model)  # positions every compiled step attends over
        self.failed: str | None = None  # why compiled steps stopped (then every step is eager)
        self.shapes: set[tuple[int, int]] = set()  # (bucket, span) compiled so far
        self._variants: set[tuple] = set()  # (bucket, K/V tensor sizes) run so far: the first runs with every guard
        self.steps = 0  # compiled steps run
        self.beyond_span = 0  # steps left to the eager path because a row was longer than the span
        # Inductor's caches (FX graphs, kernels) under $VLCACHE_HOME, owner-only: a later process reuses them. Set,
        # not defaulted: importing transformers already set it to torch's default in the shared temporary folder.
        try:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(private_compile_dir())
        except OSError as exc:  # another user's folder, a read-only home: eager steps, never someone else's kernels
            self.failed = f"no private compile cache: {exc}"
        _dynamo.config.cache_size_limit = max(_dynamo.config.cache_size_limit, 64)
        options = {"dynamic": False}
        if backend == "inductor" and self.device.type == "cuda":
            options["mode"] = "reduce-overhead"  # inductor's kernels, replayed as CUDA graphs
        self._compiled = torch.compile(_forward, backend=backend, **options)

    @torch.inference_mode()  # the batch's buffers are inference tensors: grown and written only in inference mode
    def step(self, batch) -> torch.Tensor | None:
        if self.failed:
            return None
        rows = batch.rows
        size = bucket(rows)
        cache = batch.cache
        if any(isinstance(layer, RowsLinearLayer) and i not in cache._linear for i, layer in enumerate(cache.layers)):
            return None  # fresh linear states live in the model's own layers, sized for these rows only: eager
        book = cache.book
        span = self.span
        if max(book.ends) + 1 > span:
            self.beyond_span += 1
            return None  # beyond the fixed block tables: an eager step (any length), never a new shape
        logical = torch.tensor(book.next_logical(), device=batch.device).unsqueeze(1)
        # 1. Room for the bucket's rows and the whole span, then the layout of a fixed-shape step.
        cache._reserve(size, span)
        batch._reserve(size)
        padded = torch.cat([logical, logical.new_zeros(size - rows, 1)])
        positions = batch.positions(padded, padded, batch.deltas[:size])
        cache.begin(logical, [1] * rows, batch=size, span=span)
        cache._bind(size)
        if self.device.type == "cuda":
            _mark_static(cache)
        else:
            for tables in cache.kinds.values():
                # Its own tensor: a view's strides follow the whole table's width, which an eager forward may grow.
                tables.view = tables.view.contiguous()
            for tensors in (cache.pool.keys, cache.pool.values):
                for buffer in tensors.values():
                    _dynamo.mark_dynamic(buffer, 0)  # the pool's block count: one graph for every size it grows to
        # 2. The step. A shape seen before runs with only the guards that tell compiled variants apart (the full
        # check costs about as much as a thin model's whole step, bench/decode.py); should that miss a variant,
        # torch refuses before running anything and the step runs again with every guard.
        # The K/V tensors' sizes: after the pool grew, the first step checks every guard (on the CPU the size is a
        # dynamic dimension, so that recompiles nothing; on CUDA a graph keeps the old addresses: a new capture).
        variant = (size, tuple(keys.shape[0] for keys in cache.pool.keys.values()))
        first = variant not in self._variants
        linear = None if not first else [tuple(b.clone() for b in buffers) for buffers in cache._linear.values()]
        try:
            logits = None
            if not first and self.backend == "inductor":
                try:
                    with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                        logits = self._compiled(self.model, batch.last[:size], positions, cache)
                except RuntimeError as exc:
                    if "skip_guard_eval_unsafe" not in str(exc):
                        raise
            if logits is None:
                # No duck sizing: two pools (layer kinds) of equal block counts must not become one symbol, which
                # would recompile the day they differ.
                with fx_config.patch(use_duck_shape=False):
                    logits = self._compiled(self.model, batch.last[:size], positions, cache)
        except Exception as exc:  # noqa: BLE001 - a step that cannot compile falls back to eager, with one note
            self.failed = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            log.warning(f"note: compiled decode step failed ({self.failed}); decoding eagerly")
            _undo(book, rows)
            if linear is not None:  # a graph that ran partly may have advanced linear states: back to before
                for (conv, recurrent), (old_conv, old_recurrent) in zip(cache._linear.values(), linear):
                    conv.copy_(old_conv)
                    recurrent.copy_(old_recurrent)
            return None
        finally:
            cache._bind(rows)
        self.shapes.add((size, span))
        self._variants.add(variant)
        self.steps += 1
        return logits[:rows]


DEFAULT_SPAN = 4096  # positions a step attends over unless --max-context says: the step's cost grows with it (the
# attention gathers every position of the span, in chunks of rows within decode.rows.COMPILED_GATHER_BUDGET: 2B,
# bfloat16, 16 rows at 4,096 positions is 134 MiB of K and as much of V per layer; at the 2B's 262,144 a single
# row's would pass the budget), so longer rows step eagerly


def default_span(model) -> int:
    """The span of a runner made without one: the model's context, at most DEFAULT_SPAN, in whole K/V blocks."""
    config = getattr(model, "config", None)
    context = int(getattr(config.get_text_config(), "max_position_embeddings", None) or DEFAULT_SPAN) if config else DEFAULT_SPAN
    return span_for(min(context, DEFAULT_SPAN))


def span_for(context: int) -> int:
    """The positions a step attends over to hold `context` tokens: whole K/V blocks."""
    from .blocks import BLOCK_SIZE

    return -(-context // BLOCK_SIZE) * BLOCK_SIZE


def graphs_compiled() -> int:
    """Graphs dynamo has compiled in this process (every backend): the counter /health shows, which must not
    move once the server listens."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _mark_static(cache) -> None:
    """The K/V blocks and the block tables are written in place by every step: a CUDA graph may keep their
    addresses (they change only when a pool or a table grows, which is a new shape and so a new graph)."""
    for _, layer in cache.attention_layers():
        for buffer in (layer._keys, layer._values):
            _dynamo.mark_static_address(buffer)
    for tables in cache.kinds.values():
        _dynamo.mark_static_address(tables.table)
    for buffers in cache._linear.values():
        for buffer in buffers:
            _dynamo.mark_static_address(buffer)
    for layer in cache.layers:  # the views the model's linear layers are bound to (the first bucket's rows)
        if isinstance(layer, RowsLinearLayer):
            for view in (layer.conv_states[0], layer.recurrent_states[0]):
                _dynamo.mark_static_address(view)


def _undo(book, rows: int) -> None:
    """Take back what begin() recorded for a step that did not run (its token goes in again, eagerly)."""
    for i in range(rows):
        book.lengths[i] -= 1
        book.keys[i, book.physical(i, book.lengths[i])] = -1


def time_steps(batch, steps: int) -> float:
    """Median seconds of `steps` decode steps of a batch (its rows' tokens are dropped)."""
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        logits = batch.step()
        batch.sample(logits)
        if batch.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]
