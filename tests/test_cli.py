"""The CLI and the guide's scripts: stdout holds only the answer, errors are one line, fresh processes agree."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, SYSTEM, photo
from reference import reference_tokens
from vlcache import cli

N = 16


def run(*args, script=None):
    command = [sys.executable, str(REPO / "scripts" / script)] if script else [sys.executable, "-m", "vlcache"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(command + [str(a) for a in args], capture_output=True, text=True, env=env, timeout=300)


def assert_one_line_error(result, fragment):
    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and fragment in last, result.stderr


def test_guide_scripts_in_fresh_processes_match_uncached(engine, tiny_model_dir, tmp_path):
    cache = tmp_path / "photo_cache.pt"
    made = run("--image", photo("rocket.jpg"), "--output", cache, "--system-prompt", "You are analyzing this image.",
               "--model", tiny_model_dir, "--device", "cpu", script="save_embeddings.py")
    assert made.returncode == 0, made.stderr
    assert made.stdout == "" and cache.exists()
    question = "What objects are visible in this image?"
    asked = run("--cache", cache, "--prompt", question, "--max_new_tokens", N, "--json", script="run_smart_prompt.py")
    assert asked.returncode == 0, asked.stderr
    result = json.loads(asked.stdout)
    assert result["token_ids"] == reference_tokens(engine, photo("rocket.jpg"), "You are analyzing this image.", question, N)
    assert set(result) >= {"text", "token_ids", "prompt_tokens", "cached_tokens", "timings"}
    assert result["cached_tokens"] > 256 and result["timings"]["ttft_s"] > 0


def test_vlcache_cache_then_ask_prints_only_the_answer(engine, tiny_model_dir, tmp_path):
    cache = tmp_path / "astro.safetensors"
    made = run("cache", photo("astronaut.png"), "--output", cache, "--model", tiny_model_dir, "--dtype", "float32")
    assert made.returncode == 0 and made.stdout == "", made.stderr
    asked = run("ask", "--cache", cache, "--prompt", "Describe the lighting and mood.", "--max-new-tokens", N, "--temperature", "0")
    assert asked.returncode == 0, asked.stderr
    state = engine.load_state(cache)
    expected = engine.ask(state, "Describe the lighting and mood.", max_new_tokens=N, temperature=0)
    assert expected.token_ids == reference_tokens(engine, photo("astronaut.png"), SYSTEM, "Describe the lighting and mood.", N)
    assert asked.stdout == expected.text + "\n"
    assert "loading" in asked.stderr


def test_text_only_without_cache(engine, tiny_model_dir, capsys):
    code = cli.main(["ask", "--prompt", "What is artificial intelligence?", "--model", str(tiny_model_dir), "--json",
                     "--max-new-tokens", str(N), "--temperature", "0"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["cached_tokens"] == 0
    assert result["token_ids"] == reference_tokens(engine, None, None, "What is artificial intelligence?", N)


def test_inspect(astronaut_state, tmp_path, capsys):
    path = astronaut_state.save(tmp_path / "a.pt")
    assert cli.main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["prefix_tokens"] == astronaut_state.num_tokens
    assert info["kv_bytes"] == astronaut_state.kv_bytes
    assert info["file_bytes"] == path.stat().st_size
    assert info["system_prompt"] == SYSTEM and info["image_size"] == [512, 512]
    assert cli.main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert "fingerprint:" in text and f"{astronaut_state.num_tokens} (256 image tokens)" in text
    assert "family:        qwen-vl; layers: 2 full_attention" in text


def test_mismatch_from_the_cli(astronaut_state, other_model_dir, tmp_path, capsys):
    path = astronaut_state.save(tmp_path / "a.pt")
    assert cli.main(["ask", "--cache", str(path), "--prompt", "hi", "--model", str(other_model_dir)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip().splitlines()[-1].startswith("error: model mismatch")


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["cache", "{missing}", "--output", "{out}"], "image not found"),
        (["cache", "{text}", "--output", "{out}"], "not an image"),
        (["ask", "--cache", "{missing}", "--prompt", "x"], "cache file not found"),
        (["ask", "--cache", "{text}", "--prompt", "x"], "not a vlcache cache file"),
        (["inspect", "{empty}"], "empty"),
    ],
)
def test_bad_input_is_one_line_and_leaves_no_output(tmp_path, capsys, argv, fragment):
    (tmp_path / "t.txt").write_text("not an image, not a cache")
    (tmp_path / "e.pt").write_bytes(b"")
    paths = {"missing": tmp_path / "missing.png", "text": tmp_path / "t.txt", "out": tmp_path / "out.pt", "empty": tmp_path / "e.pt"}
    assert cli.main([a.format(**paths) for a in argv]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], captured.err
    assert not (tmp_path / "out.pt").exists()


def test_bad_model_path_is_one_line(tmp_path, capsys):
    assert cli.main(["ask", "--prompt", "x", "--model", str(tmp_path / "no-such-model")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: cannot load model")


@pytest.mark.parametrize(
    "argv",
    [["ask", "--prompt", "x", "--max-new-tokens", "0"], ["ask", "--prompt", "x", "--top-p", "2"],
     ["ask", "--prompt", "x", "--temperature", "-1"], ["cache", "x.png"], ["ask"], ["cache", "x", "-o", "y", "--max-pixels", "-5"]],
)
def test_argument_errors_exit_2_at_parse_time(argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_subprocess_bad_cache_has_no_traceback(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x80\x04K\x01.")
    assert_one_line_error(run("ask", "--cache", bad, "--prompt", "x"), "never unpickles")


def test_readme_quickstart_runs_the_guide_flow(tiny_model_dir, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLCACHE_MODEL": str(tiny_model_dir),
           "VLCACHE_QUICKSTART_CACHE": str(tmp_path / "rocket_cache.pt")}
    result = subprocess.run(["bash", "examples/quickstart.sh"], cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    questions = [line for line in result.stdout.splitlines() if line.startswith("Q: ")]
    assert len(questions) == 3
    assert (tmp_path / "rocket_cache.pt").stat().st_size > 0
    assert result.stderr.count("tokens; prompt") == 3  # three answers, each from the cache
    assert result.stderr.count("cached)") == 3
