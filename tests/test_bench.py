"""The benchmark script runs end to end on the tiny model and writes well-formed results (not timed)."""

import json
import math
import os
import subprocess
import sys

from conftest import REPO, photo


def test_small_benchmark_writes_results(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), "--config", "small", "--out-dir", str(out), "--work-dir", str(work),
         "--skip-transformers-serve"],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((out / "benchmarks-small.json").read_text())
    assert set(data) >= {"machine", "warm", "model_load", "fresh", "many", "cache_many", "summary", "command"}
    rows = data["warm"]["images"]
    assert [r["image"] for r in rows] == ["astronaut.png", "hubble_deep_field.jpg"]
    for row in rows:
        assert row["file_bytes"] <= 1.01 * row["kv_bytes"] + 64 * 1024
        assert all(t > 0 for t in row["uncached_ttft_s"] + row["cached_ttft_s"] + row["floor_s"])
    summary = data["summary"]
    assert all(s["speedup"] > 0 for s in summary["images"]) and summary["batch_speedup"] > 0
    assert data["many"]["batch"]["tokens"] == data["many"]["sequential"]["tokens"]
    report = (out / "benchmarks-small.md").read_text()
    assert set(data["serve"]["vlcache serve"]["rps"]) == {"1", "4", "16"}
    for heading in ("Time to first token", "Cache file size", "Model load", "fresh process", "one batch", "Caching 2 photographs",
                    "Servers"):
        assert heading in report, heading
    assert (out / "ttft-small.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_benchmark_model_uses_the_real_processor_beside_its_config(tmp_path):
    """build_random_checkpoint takes the real tokenizer, template and processor settings from the config's folder."""
    import json
    import shutil

    from transformers import AutoProcessor

    from vlcache.testing import REAL_PROCESSOR_FILES, build_random_checkpoint
    from vlcache.testing.families import REAL_QWEN3_VL

    source = tmp_path / "real"
    source.mkdir()
    for name in REAL_PROCESSOR_FILES:
        shutil.copy(REAL_QWEN3_VL / name, source / name)
    config = json.loads((REAL_QWEN3_VL / "config.json").read_text())
    config["text_config"].update(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=16,
                                 rope_scaling={"rope_type": "default", "mrope_section": [4, 2, 2], "mrope_interleaved": True})
    config["vision_config"].update(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                                   deepstack_visual_indexes=[0])
    (source / "config.json").write_text(json.dumps(config))
    folder = build_random_checkpoint(source / "config.json", tmp_path / "model")
    processor = AutoProcessor.from_pretrained(folder)
    assert len(processor.tokenizer) == 151669
    assert processor.chat_template == (REAL_QWEN3_VL / "chat_template.jinja").read_text()


def test_dtype_benchmark_runs_on_the_tiny_model(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "dtype.py"), "--config", "small", "--runs", "1", "--tokens", "2",
         "--work-dir", str(tmp_path / "work"), "--out-dir", str(out)],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((out / "benchmarks-dtype.json").read_text())
    assert [row["dtype"] for row in data["dtypes"]] == ["bfloat16", "float32"]
    assert all(row["vlcache_b8_s_per_step"] > 0 and row["vlcache_b1_s_per_token"] > 0 for row in data["dtypes"])
    # transformers' figure is a difference of two generate() timings ((k+1 tokens - 1 token) / k): at this test's
    # one run of 2 tokens on a sub-millisecond model it is noise and can come out negative (seen on a fresh clone),
    # so only its presence is checked here; the benchmark's own runs default to --runs 3 with more tokens.
    assert all(isinstance(row["transformers_b1_s_per_token"], float) for row in data["dtypes"])
    assert data["machine"]["capability"] and "| decode batch 8, vlcache, s/step |" in (out / "benchmarks-dtype.md").read_text()


def test_the_load_test_runs_and_reports_every_label(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    for label in ("before", "after"):  # two labels, as the before/after comparison uses them
        result = subprocess.run(
            [sys.executable, str(REPO / "bench" / "load.py"), "--config", "small", "--label", label, "--out-dir", str(out),
             "--work-dir", str(work)],
            capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600,
        )
        assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((out / "benchmarks-load.json").read_text())
    assert list(data["labels"]) == ["before", "after"]
    for label in data["labels"].values():
        (row,) = label["rates"]
        assert row["requests"] > 0 and row["completed"] == row["requests"] and row["failed"] == 0
        assert row["output_tokens"] == sum(r["tokens"] for r in row["records"]) > 0
        assert 0 < row["ttft_s"]["p50"] <= row["ttft_s"]["p95"]
    report = (out / "benchmarks-load.md").read_text()
    assert report.count("| before |") == 1 and report.count("| after |") == 1


def test_the_decode_benchmark_measures_every_method(engine):
    """bench/decode.py's measurements run on the tiny model: vlcache's step (eager and through a step runner),
    generate() eager and with a static cache; and its report names the targets (figures not checked)."""
    sys.path.insert(0, str(REPO / "bench"))
    import decode as bench_decode
    import torch

    from vlcache.decode.step import StepRunner

    ids = bench_decode._prompt_ids(engine, 2).cpu()
    assert bench_decode.vlcache_steps(engine, 2, 2) > 0
    assert bench_decode.vlcache_steps(engine, 2, 2, StepRunner(engine.model, "cpu", "eager")) > 0
    # generate()'s per-step figure is a difference of two timings (n + 1 tokens minus 1): on a busy machine it can
    # come out below zero, so only that it ran and gave a number is checked here (no timed assertions in tests).
    assert math.isfinite(bench_decode.generate_steps(engine.model, ids, 2, static=False))
    result = {"machine": {"cpu": "x", "cores": 2, "capability": "AVX2", "native_bf16": None, "torch": torch.__version__},
              "command": "c", "thin": {"model": "m", "threads": 1, "prompt_tokens": 5, "steps": 2, "rounds": 1,
                                       "per_step_s": {1: {"vlcache eager": 0.02, "vlcache compiled": 0.01, "generate eager": 0.04,
                                                          "generate static cache, compiled": "Error: no", "compile_s": 3.0,
                                                          "output_projection_s": 0.005}}}}
    report = bench_decode.markdown(result)
    assert "| 1 | 20.0 | 10.0 | 40.0 | n/a (Error: no) | 0.25 | 3 | 5.0 |" in report


def _families_bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_families", REPO / "bench" / "families.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_families_bench_real_sizes_reach_the_checkpoint(tmp_path, monkeypatch):
    """Every real size bench/families.py gives a newer family's tiny builder lands in the config it builds and the
    processor it saves (a misspelt key would leave the tiny size in place). Built on the meta device: no weights."""
    import torch
    from transformers import AutoProcessor

    import vlcache.testing.builder as testing_builder
    from vlcache.testing.more_families import build

    bench = _families_bench()
    built = {}

    def config_only(model_class, config, folder, *args, **kwargs):
        with torch.device("meta"):
            model_class(config)  # the sizes must make a model transformers can build
        built[folder] = config

    monkeypatch.setattr(testing_builder, "save_model", config_only)
    for kind, (tiny_kind, sizes) in bench.REAL_SIZES.items():
        folder = tmp_path / kind
        build(tiny_kind, folder, 0, 0.02, sizes=sizes)
        config = built[folder]
        for part, sub in (("text", config.text_config), ("vision", config.vision_config), ("config", config)):
            for key, value in sizes.get(part, {}).items():
                if key in ("global_head_dim", "num_global_key_value_heads"):
                    continue  # Gemma 4 turns these into per-layer settings (the Gemma 4 test checks them)
                # a declared field, not a misspelling kept as an extra attribute
                assert key in type(sub).__dataclass_fields__ or key == "rope_theta", (kind, part, key)
                if key == "rope_theta":  # transformers 5 keeps it in rope_parameters
                    assert sub.rope_parameters["rope_theta"] == value, (kind, part)
                elif isinstance(value, (int, float, str, bool)):
                    # Gemma 4's head sizes are per layer: the given ones are layer 0's (a sliding layer)
                    per_layer = sub.per_layer_config if "_heterogeneity_spec" in vars(sub) else None
                    holder = per_layer[0] if per_layer and key in ("head_dim", "num_key_value_heads") else sub
                    assert getattr(holder, key) == value, (kind, part, key)
        image = AutoProcessor.from_pretrained(folder).image_processor
        for key, value in sizes.get("image", {}).items():
            assert hasattr(type(image), key) and getattr(image, key) == value, (kind, key)
    # A size the tiny builder fixes and the real ones leave out would survive: Pixtral's head size is derived.
    assert built[tmp_path / "ministral3_3b"].vision_config.head_dim == 1024 // 16
    assert built[tmp_path / "lfm2_vl_1_6b"].text_config.layer_types.count("full_attention") == 6
    assert built[tmp_path / "llama4_scout"].text_config.layer_types == ["chunked_attention"] * 3 + ["full_attention"]


def test_families_report_merges_only_the_measured_rows_and_scales_reduced_depth():
    bench = _families_bench()
    machine = {"cpu": "x", "cores": 2, "capability": "AVX512", "native_bf16": "avx512_bf16", "torch": "2", "transformers": "5"}

    def row(kinds, by_kind, tokens=100):
        return {"dtype": "bfloat16", "layer_kinds": kinds, "bytes_by_kind": by_kind, "prefix_tokens": tokens,
                "prompt_tokens": tokens + 10, "image_tokens": 64, "state_bytes": sum(by_kind.values()),
                "file_bytes": sum(by_kind.values()) + 100, "bytes_per_token_full_layers": by_kind.get("full_attention", 0) / tokens,
                "fixed_bytes": sum(v for k, v in by_kind.items() if k != "full_attention"), "uncached_ttft_s": 10.0,
                "cached_ttft_s": 0.5}

    old = {"machine": machine, "command": "python bench/families.py", "families": {
        "gemma3_4b": row(["sliding_attention", "full_attention"], {"sliding_attention": 1000, "full_attention": 4000}),
        "llama4_scout": {"error": "killed"}}}
    llama = row(["chunked_attention"] * 3 + ["full_attention"], {"chunked_attention": 3 * 409600, "full_attention": 409600})
    new = {"machine": machine, "command": "python bench/families.py --only llama4_scout --merge",
           "families": {"llama4_scout": llama, "glm4v_9b": {"error": "out of memory"}}}
    merged = bench._merged(old, new)
    assert list(merged["families"]) == ["gemma3_4b", "glm4v_9b", "llama4_scout"]  # FAMILIES' order
    assert merged["families"]["gemma3_4b"] == old["families"]["gemma3_4b"]
    assert merged["families"]["llama4_scout"] == llama
    assert merged["commands"] == ["python bench/families.py", "python bench/families.py --only llama4_scout --merge"]
    report = bench.markdown(merged)
    # 12 global layers of 4,096 bytes a token; 36 chunked layers of 409,600 bytes each.
    assert "| 4,096 | 1,228,800 | 49,152 / 14,745,600 (48 layers) |" in report
    assert "| 40 | 1,000 | as measured |" in report
    assert "not measured: out of memory" in report and "`python bench/families.py --only llama4_scout --merge`" in report


def test_families_bench_gemma4_e2b_is_the_published_size(tmp_path, monkeypatch):
    """Gemma 4 E2B as bench/families.py builds it (the tiny builder at real sizes, on the meta device): 5.1B
    parameters with per-layer embeddings and the audio tower, the last 20 of 35 layers reading earlier layers'
    K/V, full layers with 512-wide heads, and the photograph as 256 soft tokens between <|image> and <image|> in a
    Gemma 4 turn."""
    import torch
    from PIL import Image
    from transformers import AutoProcessor

    import vlcache.testing.builder as testing_builder
    from vlcache.testing.more_families import build

    models = []

    def config_only(model_class, config, *args, **kwargs):
        with torch.device("meta"):
            models.append(model_class(config))

    monkeypatch.setattr(testing_builder, "save_model", config_only)
    tiny_kind, sizes = _families_bench().REAL_SIZES["gemma4_e2b"]
    build(tiny_kind, tmp_path, 0, 0.02, sizes=sizes)
    model = models[0]
    config, text = model.config, model.config.text_config
    assert 5.05e9 < sum(p.numel() for p in model.parameters()) < 5.15e9
    assert text.kv_sharing_modes.count("reuse") == 20 and text.layer_types.count("full_attention") == 7
    assert not text.enable_moe_block and not text.attention_k_eq_v and text.use_bidirectional_attention is None
    layers = model.model.language_model.layers
    assert layers[4].self_attn.head_dim == 512 and layers[0].self_attn.head_dim == 256
    assert layers[4].self_attn.k_proj.out_features == 512  # one K/V head: no separate global K/V head count
    processor = AutoProcessor.from_pretrained(tmp_path)
    messages = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                {"role": "user", "content": [{"type": "image", "image": Image.open(photo("astronaut.png"))},
                                             {"type": "text", "text": "What colors?"}]}]
    inputs = processor.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True,
                                           return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    assert ids.count(config.image_token_id) == 256  # a 512-pixel square within the 280-token budget
    assert ids[ids.index(config.boi_token_id) + 257] == config.eoi_token_id
    rendered = processor.decode(ids)
    assert rendered.startswith("<bos><|turn>system\nBe brief.<turn|>\n<|turn>user\n")
    assert rendered.endswith("What colors?<turn|>\n<|turn>model\n")
