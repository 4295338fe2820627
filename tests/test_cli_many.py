"""One model load for many images, many questions and conversations, from the command line."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SYSTEM, photo
from test_conversation import reference_conversation
from vlcache import cli
from vlcache.batch import output_names

N = 12


@pytest.fixture
def photos_dir(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("chelsea.png", "coffee.png", "rocket.jpg"):
        (folder / name).write_bytes(photo(name).read_bytes())
    (folder / "notes.txt").write_text("not an image: folders only contribute image files")
    return folder


def test_cache_many_skips_up_to_date_and_reports_bad_images(tiny_model_dir, photos_dir, tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_text("this is not a picture")
    out = tmp_path / "caches"
    argv = ["cache", str(photos_dir), str(bad), str(tmp_path / "missing.jpg"), "--output-dir", str(out), "--model", str(tiny_model_dir)]
    assert cli.main(argv) == 1  # something failed ...
    err = capsys.readouterr().err
    assert "error: not an image" in err and "error: image not found" in err
    assert sorted(p.name for p in out.iterdir()) == ["chelsea_cache.pt", "coffee_cache.pt", "rocket_cache.pt"]  # ... the rest cached
    assert "3 cached, 0 up to date (skipped), 2 failed" in err
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    assert cli.main(["cache", str(photos_dir / "*.png"), str(photos_dir / "rocket.jpg"), "-d", str(out), "--model", str(tiny_model_dir)]) == 0
    assert "0 cached, 3 up to date (skipped), 0 failed" in capsys.readouterr().err
    assert stamps == {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    assert cli.main(["cache", str(photos_dir / "rocket.jpg"), "-d", str(out), "--model", str(tiny_model_dir), "--force"]) == 0
    assert "1 cached, 0 up to date" in capsys.readouterr().err
    assert cli.main(["cache", str(photos_dir), "-d", str(out), "--model", str(tiny_model_dir), "--system-prompt", "Other."]) == 0
    assert "3 cached, 0 up to date" in capsys.readouterr().err  # another system prompt is another cache


def test_api_cache_images_matches_single_caching(engine, photos_dir, tmp_path):
    results = engine.cache_images([str(photos_dir)], tmp_path / "out", system_prompt=SYSTEM)
    assert [r.status for r in results] == ["cached"] * 3
    loaded = engine.load_state(tmp_path / "out" / "coffee_cache.pt")
    single = engine.cache_image(photos_dir / "coffee.png", system_prompt=SYSTEM)
    assert loaded.input_ids.tolist() == single.input_ids.tolist()
    question = "What colors dominate the scene?"
    assert engine.ask(loaded, question, max_new_tokens=N, temperature=0).token_ids == \
        engine.ask(single, question, max_new_tokens=N, temperature=0).token_ids


def test_output_names_resolve_collisions(tmp_path):
    a, b, c = tmp_path / "a" / "photo.jpg", tmp_path / "b" / "photo.jpg", tmp_path / "b" / "cat.png"
    names = output_names([a, b, c])
    assert names[c] == "cat_cache.pt"
    assert names[a] != names[b]
    assert names[a].startswith("photo-") and names[a].endswith("_cache.pt")
    assert output_names([a, b, c]) == names  # the same inputs always get the same names


def test_ask_many_questions_and_caches_json(engine, tiny_model_dir, tmp_path, capsys):
    caches = tmp_path / "caches"
    engine.cache_image(photo("chelsea.png"), system_prompt=SYSTEM).save(caches / "chelsea_cache.pt")
    engine.cache_image(photo("rocket.jpg"), system_prompt=SYSTEM).save(caches / "rocket_cache.pt")
    questions = tmp_path / "questions.txt"
    questions.write_text("What colors dominate the scene?\n\nDescribe the lighting and mood.\n")
    argv = ["ask", "--cache", str(caches), "--prompt", "What objects are visible in this image?", "--prompts-file",
            str(questions), "--json", "--max-new-tokens", str(N), "--temperature", "0"]
    assert cli.main(argv) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 6
    for line in lines:
        state = engine.load_state(line["cache"])
        assert line["token_ids"] == engine.ask(state, line["prompt"], max_new_tokens=N, temperature=0).token_ids
    assert {Path(line["cache"]).name for line in lines} == {"chelsea_cache.pt", "rocket_cache.pt"}


def test_ask_many_plain_output_has_headers(astronaut_state, tmp_path, capsys):
    path = astronaut_state.save(tmp_path / "a.pt")
    assert cli.main(["ask", "--cache", str(path), "--prompt", "One?", "--prompt", "Two?", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert out.count("==> ") == 2 and f"==> {path} | One? <==" in out


def test_stream_flag_prints_the_same_answer(astronaut_state, tmp_path, capsys):
    path = astronaut_state.save(tmp_path / "a.pt")
    base = ["ask", "--cache", str(path), "--prompt", "Describe the lighting and mood.", "--max-new-tokens", str(N), "--temperature", "0"]
    assert cli.main(base) == 0
    plain = capsys.readouterr().out
    assert cli.main(base + ["--stream"]) == 0
    assert capsys.readouterr().out == plain


def test_piped_chat_session(engine, astronaut_state, tmp_path):
    cache = astronaut_state.save(tmp_path / "astro.pt")
    saved = tmp_path / "after_two_turns.pt"
    q1, q2 = "What objects are visible in this image?", "What colors dominate the scene?"
    script = f"{q1}\n{q2}\n/save {saved}\n/reset\n{q1}\n/bogus\n"
    result = subprocess.run(
        [sys.executable, "-m", "vlcache", "chat", "--cache", str(cache), "--json", "--max-new-tokens", str(N), "--temperature", "0"],
        input=script, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300,
    )
    assert result.returncode == 1, result.stderr  # the unknown /bogus command is an error, after the rest ran
    assert "error: unknown command /bogus" in result.stderr and "Traceback" not in result.stderr
    turns = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(turns) == 3
    first, _ = reference_conversation(engine, photo("astronaut.png"), [], q1, N)
    second, _ = reference_conversation(engine, photo("astronaut.png"), [(q1, turns[0]["text"])], q2, N)
    assert turns[0]["token_ids"] == first and turns[1]["token_ids"] == second
    assert turns[2]["token_ids"] == first  # after /reset
    assert turns[1]["cached_tokens"] >= turns[0]["prompt_tokens"]
    resumed = engine.load_state(saved)
    assert [m["role"] for m in resumed.metadata.messages] == ["system", "user", "assistant", "user", "assistant"]


def test_chat_in_process_reads_stdin(astronaut_state, tmp_path, capsys, monkeypatch):
    cache = astronaut_state.save(tmp_path / "astro.pt")
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello?\n/save\n"))
    assert cli.main(["chat", "--cache", str(cache), "--max-new-tokens", "4"]) == 1
    captured = capsys.readouterr()
    assert captured.out.strip() and "error: /save needs a path" in captured.err


def test_ask_image_uncached_equals_cached_and_sequential_equals_batch(engine, tiny_model_dir, astronaut_state, tmp_path, capsys):
    question = "What colors dominate the scene?"
    argv = ["ask", "--image", str(photo("astronaut.png")), "--prompt", question, "--model", str(tiny_model_dir),
            "--json", "--max-new-tokens", str(N), "--temperature", "0"]
    assert cli.main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["token_ids"] == engine.ask(astronaut_state, question, max_new_tokens=N, temperature=0).token_ids
    assert result["timings"]["image_prefill_s"] > 0 and result["timings"]["model_load_s"] > 0
    path = astronaut_state.save(tmp_path / "a.pt")
    many = ["ask", "--cache", str(path), "--prompt", question, "--prompt", "Is it day or night?", "--json",
            "--max-new-tokens", str(N), "--temperature", "0"]
    assert cli.main(many) == 0
    batched = [json.loads(line)["token_ids"] for line in capsys.readouterr().out.splitlines()]
    assert cli.main(many + ["--sequential"]) == 0
    assert [json.loads(line)["token_ids"] for line in capsys.readouterr().out.splitlines()] == batched
    with pytest.raises(SystemExit) as info:
        cli.main(["ask", "--cache", str(path), "--image", "x.png", "--prompt", "q"])
    assert info.value.code == 2
