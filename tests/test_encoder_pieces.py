"""Issue 31 finding 8 (second half): one image's vision encoder call runs in pieces at its blocks, a running
answer decoding between two pieces, and the state is the one a single call makes (tensors equal)."""

import threading
import time

import pytest
import torch

from churn import job_for
from conftest import SYSTEM, photo
from test_scheduler import QUESTIONS
from vlcache import pieces
from vlcache.families.base import run_steps
from vlcache.serving.scheduler import Scheduler

MESSAGES = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": [{"type": "image"}]}]


def one_unit(blocks, run):
    """The encoder as it ran before: one call, one unit of work."""
    with torch.inference_mode():
        return run()
    yield  # noqa: unreachable - makes this a generator


def same_state(a, b) -> bool:
    return (torch.equal(a.input_ids, b.input_ids) and torch.equal(a.rope_deltas, b.rope_deltas)
            and torch.equal(a.image_grid_thw, b.image_grid_thw) and len(a.kv) == len(b.kv)
            and all(torch.equal(x, y) for (ak, av), (bk, bv) in zip(a.kv, b.kv) for x, y in ((ak, bk), (av, bv))))


def test_a_running_answer_decodes_between_the_blocks_of_one_images_encoder_and_the_state_is_unchanged(engine, monkeypatch):
    blocks = pieces.vision_blocks(engine.model)
    assert len(blocks) == engine.model.config.vision_config.depth == 2
    state_before = engine.cache_image(photo("rocket.jpg"), system_prompt=SYSTEM)
    scheduler = Scheduler(engine, max_batch=4, prefill_chunk=64)
    order = []
    hooks = [b.register_forward_hook(lambda *a: order.append("block")) for b in blocks]
    decode = scheduler._decode
    scheduler._decode = lambda: (order.append("decode"), decode())
    try:
        long, events, finished = job_for(engine, state_before, QUESTIONS[0], 400, "rocket.jpg")
        scheduler.submit(long)
        while not any(kind == "delta" for kind, _ in events):
            time.sleep(0.01)
        future = scheduler.compute(lambda: engine.cache_media_steps([photo("coffee.png")], MESSAGES, chunk=64))
        state = future.result(timeout=120)
        long.cancelled.set()
        assert finished.wait(60)
    finally:
        scheduler.stop()
        for hook in hooks:
            hook.remove()
    assert order.count("block") == len(blocks)  # one image: one encoder call
    first, last = order.index("block"), len(order) - 1 - order[::-1].index("block")
    # The running answer took a step between the encoder's two blocks (before: none in one call).
    assert "decode" in order[first:last], order
    assert not any(h for b in blocks for h in b._forward_pre_hooks.values())  # the pauses are gone after
    # Exact: the state equals the one made with the encoder as one call (same chunk), tensor for tensor.
    monkeypatch.setattr("vlcache.families.qwen.in_pieces", one_unit)
    whole = run_steps(engine.cache_media_steps([photo("coffee.png")], MESSAGES, chunk=64))
    assert same_state(state, whole)
    assert state.metadata.image_tokens == whole.metadata.image_tokens > 0


def test_pieces_return_the_calls_value_raise_its_error_and_stop_when_closed():
    blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(3)])
    x = torch.randn(2, 4)

    def run():
        y = x
        for block in blocks:
            y = block(y)
        return y

    steps, units = pieces.in_pieces(blocks, run), 0
    while True:
        try:
            next(steps)
            units += 1
        except StopIteration as done:
            result = done.value
            break
    assert units == 3 and torch.equal(result, run())

    def fails():
        blocks[0](x)
        raise ValueError("encoder broke")

    with pytest.raises(ValueError, match="encoder broke"):
        run_steps(pieces.in_pieces(blocks, fails))
    # A computation no one waits for any more: closed at a pause, its worker ends, the hooks go.
    ran = []
    hooks = [b.register_forward_hook(lambda *a: ran.append(1)) for b in blocks]
    steps = pieces.in_pieces(blocks, run)
    next(steps)
    steps.close()
    assert ran == [] and not any(b._forward_pre_hooks for b in blocks)  # stopped before its first block ran
    for hook in hooks:
        hook.remove()
    assert not any(t.name == "vlcache-encoder" for t in threading.enumerate())


@pytest.mark.parametrize("kind", ["llava_onevision", "gemma3", "mistral3"])
def test_a_family_prefilled_in_one_forward_pauses_at_its_vision_blocks_and_makes_the_same_state(kind, family_engine):
    """Families without a prefill in pieces (one forward over the prefix): the same forward, paused at each
    vision block when the server asks for units of work, gives the state of the unpaused forward."""
    from vlcache.media import MediaOptions

    engine = family_engine(kind)
    blocks = pieces.vision_blocks(engine.model)
    assert len(blocks) >= 1
    options = MediaOptions(max_pixels=160 * 160)
    steps, units = engine.cache_media_steps([photo("rocket.jpg")], MESSAGES, options, chunk=8), 0
    while True:
        try:
            next(steps)
            units += 1
        except StopIteration as done:
            state = done.value
            break
    assert units >= len(blocks), units  # before: one unit
    whole = run_steps(engine.cache_media_steps([photo("rocket.jpg")], MESSAGES, options))  # chunk None: one unit
    assert same_state(state, whole)
