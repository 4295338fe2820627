"""--dtype auto: what the device computes fast; notes when a state's dtype differs; remembered fingerprints."""

import json
import logging
import shutil

import pytest
import torch

from conftest import SYSTEM, photo
from reference import reference_tokens
from vlcache import Engine, cli, model as model_loading
from vlcache.errors import ModelLoadError
from vlcache.serving.store import StateStore, metadata_key

N = 12
CPU = torch.device("cpu")


@pytest.fixture
def no_native_bf16(monkeypatch):
    monkeypatch.setattr(model_loading, "cpu_bf16_support", lambda: None)


@pytest.fixture
def native_bf16(monkeypatch):
    monkeypatch.setattr(model_loading, "cpu_bf16_support", lambda: "avx512_bf16")


@pytest.fixture(scope="module")
def bf16_checkpoint(tiny_model_dir, tmp_path_factory):
    """The tiny checkpoint, declared bfloat16 as Qwen3-VL-2B-Instruct's config is."""
    folder = tmp_path_factory.mktemp("tiny-bf16")
    for path in tiny_model_dir.iterdir():
        shutil.copy(path, folder / path.name)
    config = json.loads((folder / "config.json").read_text())
    config["dtype"] = "bfloat16"
    config["text_config"]["dtype"] = "bfloat16"
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_cpu_without_native_bf16_computes_a_bf16_checkpoint_in_float32(no_native_bf16):
    dtype, reason = model_loading.choose_dtype(CPU, torch.bfloat16)
    assert dtype == torch.float32
    assert "no native bfloat16" in reason


def test_cpu_with_native_bf16_keeps_the_checkpoints_bf16(native_bf16):
    dtype, reason = model_loading.choose_dtype(CPU, torch.bfloat16)
    assert dtype == torch.bfloat16 and "avx512_bf16" in reason
    assert model_loading.choose_dtype(CPU, torch.float32)[0] == torch.float32  # never narrower than stored
    assert model_loading.choose_dtype(CPU, torch.float16)[0] == torch.float32  # no native float16 matmuls


def test_cuda_prefers_bf16_then_fp16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert model_loading.choose_dtype(torch.device("cuda"), torch.float32)[0] == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert model_loading.choose_dtype(torch.device("cuda"), torch.bfloat16)[0] == torch.float16
    assert model_loading.choose_dtype(torch.device("mps"), torch.bfloat16)[0] == torch.float16


def test_cpu_feature_detection_reads_proc_cpuinfo(monkeypatch, tmp_path):
    def with_flags(flags):
        monkeypatch.setattr(model_loading.Path, "read_text", lambda self, *a, **k: f"processor\t: 0\nflags\t\t: {flags}\n")
        return model_loading.cpu_bf16_support()

    assert with_flags("fpu sse2 avx avx2 fma") is None
    assert with_flags("fpu avx2 avx512f avx512_bf16") == "avx512_bf16"
    assert with_flags("fpu avx2 amx_tile amx_bf16") == "amx_bf16"


def test_auto_loads_a_bf16_checkpoint_in_float32_on_such_a_cpu(bf16_checkpoint, no_native_bf16):
    engine = Engine.load(str(bf16_checkpoint), device="cpu")
    assert engine.dtype == torch.float32
    assert "no native bfloat16" in engine.dtype_reason


def test_auto_keeps_bf16_where_the_cpu_computes_it(bf16_checkpoint, native_bf16):
    engine = Engine.load(str(bf16_checkpoint), device="cpu")
    assert engine.dtype == torch.bfloat16


def test_an_explicit_dtype_overrides_auto(bf16_checkpoint, no_native_bf16):
    engine = Engine.load(str(bf16_checkpoint), device="cpu", dtype="bfloat16")
    assert engine.dtype == torch.bfloat16 and engine.dtype_reason == "requested"


def test_the_load_line_says_which_dtype_and_why(bf16_checkpoint, no_native_bf16, capsys, tmp_path):
    code = cli.main(["cache", str(photo("chelsea.png")), "--output", str(tmp_path / "c.pt"), "--model",
                     str(bf16_checkpoint), "--device", "cpu", "--max-pixels", "65536"])
    assert code == 0
    err = capsys.readouterr().err
    assert "as float32 (auto: float32, not the checkpoint's bfloat16" in err


def test_a_model_that_does_not_fit_is_refused_before_loading(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(model_loading, "available_memory", lambda device: 1000)
    monkeypatch.setattr(model_loading, "fingerprint", lambda m: pytest.fail("weights were loaded"))
    with pytest.raises(ModelLoadError, match=r"not enough memory .* in float32 need .*try --dtype bfloat16"):
        Engine.load(str(tiny_model_dir), device="cpu")


def test_exact_in_bfloat16(tiny_model_dir):
    engine = Engine.load(str(tiny_model_dir), device="cpu", dtype="bfloat16")
    state = engine.cache_image(photo("rocket.jpg"), system_prompt=SYSTEM, max_pixels=256 * 256)
    assert state.kv[0][0].dtype == torch.bfloat16
    question = "What colors dominate the scene?"
    answer = engine.ask(state, question, max_new_tokens=N, temperature=0)
    assert answer.token_ids == reference_tokens(engine, photo("rocket.jpg"), SYSTEM, question, N, max_pixels=256 * 256)


def test_a_state_of_another_dtype_is_cast_with_one_note(tiny_model_dir, engine, tmp_path, caplog):
    bf16 = Engine.load(str(tiny_model_dir), device="cpu", dtype="bfloat16")
    state = bf16.cache_image(photo("chelsea.png"), max_pixels=128 * 128)
    path = state.save(tmp_path / "bf16.pt")
    fresh = Engine.load(str(tiny_model_dir), device="cpu")  # float32, a note of its own
    with caplog.at_level(logging.WARNING, logger="vlcache"):
        fresh.ask(fresh.load_state(path), "What is this?", max_new_tokens=2, temperature=0)
        fresh.ask(state, "What is this?", max_new_tokens=2, temperature=0)  # in memory, same dtype pair
    notes = [r.getMessage() for r in caplog.records if "exact only" in r.getMessage() or "only within" in r.getMessage()]
    assert len(notes) == 1 and "bfloat16" in notes[0] and "float32" in notes[0]


def test_the_server_store_casts_states_of_another_dtype(tiny_model_dir, engine, tmp_path):
    bf16 = Engine.load(str(tiny_model_dir), device="cpu", dtype="bfloat16")
    state = bf16.cache_image(photo("coffee.png"), max_pixels=128 * 128)
    state.save(tmp_path / "dropped_in.pt")
    store = StateStore(tmp_path, 2**30, engine.fingerprint, engine.device, adopt=engine.adopt)
    got, source = store.get(metadata_key(state.metadata))
    assert source == "disk" and got.kv[0][0].dtype == torch.float32
    assert engine.ask(got, "What is this?", max_new_tokens=2, temperature=0).token_ids


def test_the_fingerprint_is_computed_once_per_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_model_dir, folder)
    monkeypatch.setenv("VLCACHE_HOME", str(tmp_path / "home"))
    first = Engine.load(str(folder), device="cpu").fingerprint
    assert first in json.loads((tmp_path / "home" / "fingerprints.json").read_text()).values()
    calls = []
    real = model_loading.fingerprint
    monkeypatch.setattr(model_loading, "fingerprint", lambda m: calls.append(1) or real(m))
    assert Engine.load(str(folder), device="cpu").fingerprint == first
    assert calls == []  # remembered, not recomputed
    # A changed checkpoint is never mistaken for the old one: rewriting the weights recomputes.
    from safetensors.torch import load_file, save_file

    weights = load_file(folder / "model.safetensors")
    name = "model.language_model.layers.0.mlp.up_proj.weight"
    weights[name] = weights[name] * 1.01
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    changed = Engine.load(str(folder), device="cpu").fingerprint
    assert calls == [1] and changed != first
