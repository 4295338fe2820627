"""bfloat16 linear layers packed once for oneDNN on a CPU (decode.linear): the same numbers as the plain layers,
really used, and left alone where they would round differently or were turned off."""

import pytest
import torch

from conftest import SYSTEM, photo
from reference import reference_first_logits, reference_tokens
from vlcache import Engine
from vlcache.decode import linear

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs torch's oneDNN (CPU)")
QUESTION = "What colors dominate the scene?"
PIXELS = 128 * 128


@pytest.fixture(scope="module")
def bf16_engine(tiny_model_dir):
    return Engine.load(str(tiny_model_dir), device="cpu", dtype="bfloat16")


def _packed(model):
    return [m for m in model.modules() if isinstance(m.__dict__.get("forward"), linear._Packed)]


def _plain(model):
    """Unpack every layer; returns how to pack them again."""
    forwards = {m: m.__dict__.pop("forward") for m in _packed(model)}

    def again():
        for module, forward in forwards.items():
            module.forward = forward
    return again


def test_cached_answers_with_packed_layers_equal_generate_on_the_plain_model(bf16_engine):
    layers = _packed(bf16_engine.model)
    assert "packed once for oneDNN" in bf16_engine.packing and len(layers) > 10
    assert bf16_engine.model.get_output_embeddings() in layers  # the output projection too
    state = bf16_engine.cache_image(photo("rocket.jpg"), system_prompt=SYSTEM, max_pixels=PIXELS)
    answer = bf16_engine.ask(state, QUESTION, max_new_tokens=8, temperature=0)
    packed_logits = reference_first_logits(bf16_engine, photo("rocket.jpg"), SYSTEM, QUESTION, max_pixels=PIXELS)
    again = _plain(bf16_engine.model)
    try:
        assert not _packed(bf16_engine.model)
        expected = reference_tokens(bf16_engine, photo("rocket.jpg"), SYSTEM, QUESTION, 8, max_pixels=PIXELS)
        plain_logits = reference_first_logits(bf16_engine, photo("rocket.jpg"), SYSTEM, QUESTION, max_pixels=PIXELS)
    finally:
        again()
    assert answer.token_ids == expected
    assert torch.equal(packed_logits, plain_logits)  # bit for bit, not merely the same argmax


def test_the_packed_weights_are_what_the_forward_reads(bf16_engine):
    """Control: a packed copy of another weight changes the logits, so the tests above compare the packed path."""
    head = bf16_engine.model.get_output_embeddings()
    before = reference_first_logits(bf16_engine, None, SYSTEM, QUESTION)
    kept = head.forward.packed
    head.forward.packed = torch.ops.mkldnn._reorder_linear_weight(torch.zeros_like(head.weight), 1)
    try:
        after = reference_first_logits(bf16_engine, None, SYSTEM, QUESTION)
    finally:
        head.forward.packed = kept
    assert not torch.equal(before, after) and torch.count_nonzero(after) == 0


def test_nothing_is_packed_where_a_shape_rounds_differently(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(linear, "_same", lambda weight, bias, packed: weight.shape[0] != 64)
    engine = Engine.load(str(tiny_model_dir), device="cpu", dtype="bfloat16")
    assert engine.packing.startswith("off (a packed (64,") and "rounds differently" in engine.packing
    assert not _packed(engine.model)  # all or none: no layer of another shape was packed either


def test_float32_and_the_switch_leave_the_layers_plain(tiny_model_dir, engine, monkeypatch):
    assert engine.packing == "off (no bfloat16 CPU linear layers)" and not _packed(engine.model)
    monkeypatch.setenv("VLCACHE_PACK", "0")
    off = Engine.load(str(tiny_model_dir), device="cpu", dtype="bfloat16")
    assert off.packing == "off (VLCACHE_PACK=0)" and not _packed(off.model)
