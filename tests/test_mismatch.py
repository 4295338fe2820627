"""A cache belongs to the weights it was made with: another model, fine-tunes included, is refused."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import photo
from vlcache import Engine
from vlcache.errors import ModelMismatchError


def test_other_weights_same_architecture_are_refused(engine, other_model_dir, astronaut_state, tmp_path):
    other = Engine.load(str(other_model_dir), device="cpu")
    assert other.fingerprint != engine.fingerprint
    path = astronaut_state.save(tmp_path / "a.pt")
    with pytest.raises(ModelMismatchError) as info:
        other.load_state(path)
    message = str(info.value)
    assert "mismatch" in message
    assert engine.model_name in message and other.model_name in message
    with pytest.raises(ModelMismatchError, match="mismatch"):
        other.ask(astronaut_state, "What is this?")


def test_a_small_fine_tune_changes_the_fingerprint(tiny_model_dir, engine, tmp_path):
    tuned_dir = tmp_path / "tuned"
    tuned_dir.mkdir()
    for f in tiny_model_dir.iterdir():
        (tuned_dir / f.name).write_bytes(f.read_bytes())
    weights = load_file(tuned_dir / "model.safetensors")
    name = "model.language_model.layers.1.self_attn.v_proj.weight"
    weights[name] = weights[name] + 1e-3  # a light fine-tune of one matrix
    save_file(weights, tuned_dir / "model.safetensors", metadata={"format": "pt"})
    tuned = Engine.load(str(tuned_dir), device="cpu")
    assert tuned.fingerprint != engine.fingerprint


def test_fingerprint_ignores_the_load_dtype(tiny_model_dir, engine):
    assert Engine.load(str(tiny_model_dir), device="cpu", dtype="bfloat16").fingerprint == engine.fingerprint


def test_a_state_of_another_dtype_is_cast_on_load(tiny_model_dir, tmp_path):
    bf16 = Engine.load(str(tiny_model_dir), device="cpu", dtype="bfloat16")
    path = bf16.cache_image(photo("chelsea.png")).save(tmp_path / "bf16.pt")
    f32 = Engine.load(str(tiny_model_dir), device="cpu", dtype="float32")
    assert f32.load_state(path).kv[0][0].dtype == torch.float32
