"""What a new user reads: each message a mistake or an unusual run gets, as the exact line and exit code."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, SYSTEM, photo
from vlcache import cli
from vlcache.testing.clips import make_clip

N = 4
GREEDY = ["--max-new-tokens", str(N), "--temperature", "0"]


def err_lines(capsys) -> list[str]:
    captured = capsys.readouterr()
    assert captured.out == "", captured.out
    return captured.err.splitlines()


def test_a_folder_without_media_is_an_error_before_any_model_load(tmp_path, capsys):
    empty, out = tmp_path / "empty", tmp_path / "out"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a picture")
    # A model that does not exist: reaching the model load would be another error ("cannot load model").
    argv = ["cache", str(empty), "--output-dir", str(out), "--model", str(tmp_path / "no-model")]
    assert cli.main(argv) == 1
    assert err_lines(capsys) == [f"error: no images or videos in {empty} (a folder contributes files ending in .jpg, .png, "
                                 ".webp, .mp4, .webm, .mov, ...)"]
    assert not out.exists()
    missing = tmp_path / "missing.jpg"
    assert cli.main(["cache", str(missing), "-d", str(out), "--model", str(tmp_path / "no-model")]) == 1
    assert err_lines(capsys) == [f"error: image not found: {missing}"]
    assert not out.exists()


def test_a_text_file_given_as_a_cache_is_not_called_truncated(astronaut_state, tmp_path, capsys):
    short, longer = tmp_path / "notes.txt", tmp_path / "readme.txt"
    short.write_text("notes\n")  # 6 bytes: shorter than a safetensors length field (a cache cut to 6 is "truncated")
    longer.write_text("these are my notes about the photographs\n")
    assert cli.main(["ask", "--cache", str(short), "--prompt", "x"]) == 1
    assert err_lines(capsys) == [f"error: not a vlcache cache file: {short} (a text file)"]
    assert cli.main(["inspect", str(longer)]) == 1
    assert err_lines(capsys) == [f"error: not a vlcache cache file: {longer} (a text file)"]
    cut = tmp_path / "cut.pt"  # the control: a real cache cut to 6 bytes is truncated
    cut.write_bytes(astronaut_state.save(tmp_path / "whole.pt").read_bytes()[:6])
    assert cli.main(["inspect", str(cut)]) == 1
    assert err_lines(capsys) == [f"error: cache file is truncated: {cut}"]
    assert cli.main(["inspect", str(photo("rocket.jpg"))]) == 1  # a JPEG: binary, still foreign
    assert err_lines(capsys) == [f"error: not a vlcache cache file: {photo('rocket.jpg')} (unrecognised format)"]


def test_a_chat_template_without_a_video_placeholder_says_so(tiny_model_dir, tmp_path, capsys):
    model = tmp_path / "images-only"
    shutil.copytree(tiny_model_dir, model)
    template = (model / "chat_template.jinja").read_text()
    video_branch = "{%- elif part['type'] == 'video' or 'video' in part -%}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    assert video_branch in template
    (model / "chat_template.jinja").write_text(template.replace(video_branch, ""))
    clip = make_clip(tmp_path / "clip.mp4")
    out = tmp_path / "clip.pt"
    assert cli.main(["cache", str(clip), "--output", str(out), "--model", str(model)]) == 1
    lines = err_lines(capsys)
    assert lines[-1] == ("error: this model's chat template does not take videos (it writes no <|video_pad|> for a video "
                         "part); cache images with this model, or use one whose template takes videos")
    assert not out.exists()


def test_a_closed_pipe_ends_quietly(astronaut_state, tmp_path):
    path = astronaut_state.save(tmp_path / "a.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-m", "vlcache", "inspect", str(path), "--json"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env=env)
    process.stdout.close()  # the reader is gone before vlcache writes (as `| head -c 0` would be)
    _, err = process.communicate(timeout=120)
    assert (process.returncode, err.decode()) == (cli.EXIT_BROKEN_PIPE, "")
    assert cli.EXIT_BROKEN_PIPE == 141


REPORT = r"(\d+) tokens; prompt (\d+) \((.*)\); first token \d+\.\d{3}s, total \d+\.\d{3}s"


def test_ask_image_claims_no_cached_tokens_and_a_cache_does(tiny_model_dir, astronaut_state, tmp_path, capsys):
    question = "What colors dominate the scene?"
    assert cli.main(["ask", "--image", str(photo("astronaut.png")), "--prompt", question, "--model", str(tiny_model_dir),
                     *GREEDY, "--json"]) == 0
    captured = capsys.readouterr()
    answer = json.loads(captured.out)
    assert answer["cached_tokens"] == 0
    match = re.fullmatch(REPORT, captured.err.splitlines()[-1])
    assert match, captured.err
    assert match.group(2) == str(answer["prompt_tokens"]) and answer["prompt_tokens"] > astronaut_state.num_tokens
    assert re.fullmatch(r"none cached: the image was processed for this question in \d+\.\d{3}s", match.group(3))
    # The same question from a cache file: the state's tokens are cached (the control).
    path = astronaut_state.save(tmp_path / "a.pt")
    assert cli.main(["ask", "--cache", str(path), "--prompt", question, *GREEDY, "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["cached_tokens"] == astronaut_state.num_tokens
    match = re.fullmatch(REPORT, captured.err.splitlines()[-1])
    assert match and match.group(3) == f"{astronaut_state.num_tokens} cached", captured.err


LOADED = r"loaded in \d+\.\ds on cpu, \d+ threads?, as (\w+) \((.*)\)"


def test_the_load_line_says_where_the_dtype_came_from(tiny_model_dir, astronaut_state, tmp_path, capsys):
    path = astronaut_state.save(tmp_path / "a.pt")  # the tiny checkpoint computes in float32
    common = ["--prompt", "hi", *GREEDY, "--device", "cpu"]
    runs = [
        (["ask", "--cache", str(path), *common], "float32", "the cache's dtype"),
        (["ask", "--cache", str(path), "--dtype", "bfloat16", *common], "bfloat16", "--dtype bfloat16"),
        (["ask", "--model", str(tiny_model_dir), *common], "float32", "auto: the checkpoint's float32"),
    ]
    for argv, dtype, why in runs:
        assert cli.main(argv) == 0
        lines = capsys.readouterr().err.splitlines()
        loaded = [re.fullmatch(LOADED, line) for line in lines if line.startswith("loaded in")]
        assert len(loaded) == 1 and loaded[0] and loaded[0].groups() == (dtype, why), lines
    assert not any("requested" in line for line in lines)


def test_inspect_says_frames_sampled_from_the_source(engine, tmp_path, capsys):
    clip = make_clip(tmp_path / "clip.mp4", seconds=2.0, fps=8)
    state = engine.cache([str(clip)], system_prompt=SYSTEM)
    path = state.save(tmp_path / "clip.pt")
    assert cli.main(["inspect", str(path)]) == 0
    part = state.metadata.parts[0]
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("video:")]
    stamps = part["timestamps"]
    assert lines == [f"video:         {clip.resolve()} (96x64, sha256 {part['sha256'][:16]}...); {part['frames']} frames "
                     f"sampled, at {stamps[0]:g}-{stamps[-1]:g} s, from a source of 16 frames at 8 fps"]
    assert part["frames"] < 16


def test_the_progress_bar_counts_what_it_caches(tiny_model_dir, tmp_path, capsys):
    clips = tmp_path / "clips"
    clips.mkdir()
    make_clip(clips / "a.mp4", seconds=1.0)
    argv = ["cache", str(clips), "-d", str(tmp_path / "out"), "--model", str(tiny_model_dir), "--progress"]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert err.startswith(f"loading {tiny_model_dir} "), err  # issue 32 item 4: no empty bar before the model loads
    bar = [line for line in err.replace("\r", "\n").splitlines() if "|" in line]
    assert bar and all("video" in line and "image" not in line for line in bar if "1/1" in line), err
    from vlcache.commands.cache import inputs_unit

    assert inputs_unit([str(photo("rocket.jpg"))]) == "image"
    assert inputs_unit([str(photo("rocket.jpg")), str(clips)]) == "file"


def test_output_into_a_missing_folder_is_refused(tmp_path, capsys):
    target = tmp_path / "nonexistent_dir" / "x.pt"
    assert cli.main(["cache", str(photo("rocket.jpg")), "--output", str(target), "--model", str(tmp_path / "no-model")]) == 1
    assert err_lines(capsys) == [f"error: --output's folder does not exist: {target.parent} (create it first, or name "
                                 "another path)"]
    assert not target.parent.exists()


def test_through_a_server_cache_never_writes_over_its_input_and_ask_image_reports_honestly(engine, tmp_path, capsys):
    from test_server import LiveServer

    image = tmp_path / "rocket.jpg"
    image.write_bytes(photo("rocket.jpg").read_bytes())
    before = image.read_bytes()
    live = LiveServer(engine, tmp_path / "states")
    try:
        assert cli.main(["cache", str(image), "--output", str(image), "--server", live.url]) == 1
        assert err_lines(capsys) == [f"error: --output {image} is an input; refusing to write over it"]
        assert image.read_bytes() == before
        missing = tmp_path / "none" / "x.pt"
        assert cli.main(["cache", str(image), "--output", str(missing), "--server", live.url]) == 1
        assert err_lines(capsys) == [f"error: --output's folder does not exist: {missing.parent} (create it first, or "
                                     "name another path)"]
        made = tmp_path / "rocket.pt"  # the control: a fresh name in a folder that exists is written
        assert cli.main(["cache", str(image), "--output", str(made), "--server", live.url]) == 0
        assert made.stat().st_size > 0
        # ask --image through the server: computed there for this question (none cached), then found (cached).
        asks = ["ask", "--image", str(photo("chelsea.png")), "--prompt", "What is this?", "--server", live.url, *GREEDY,
                "--json"]
        for expect_cached in (False, True):
            assert cli.main(asks) == 0
            captured = capsys.readouterr()
            answer, report = json.loads(captured.out), re.fullmatch(REPORT, captured.err.splitlines()[-1])
            assert report, captured.err
            if expect_cached:
                assert answer["cached_tokens"] > 0 and report.group(3) == f"{answer['cached_tokens']} cached"
            else:
                assert answer["cached_tokens"] == 0 and report.group(3).startswith("none cached: the image was processed")
    finally:
        live.close()


def run(*args, env=None):
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    environment.pop("VLCACHE_SERVER", None)
    return subprocess.run([sys.executable, "-m", "vlcache", *map(str, args)], capture_output=True, text=True,
                          env=environment, timeout=300, cwd=REPO)


OWN_LINES = [
    r"loading \S+ \(\w+, \w+\)\.\.\.",
    r"loaded in \d+\.\ds on cpu, \d+ threads?, as \w+ \(.*\)",
    r"cached \S+: \d+ tokens \(\d+ image tokens\) in \d+\.\d\ds -> \S+ \(\d+\.\d MiB\)",
    REPORT,
]


def only_own_lines(stderr: str) -> list[str]:
    """The stderr lines that are not vlcache's own."""
    return [line for line in stderr.splitlines() if not any(re.fullmatch(p, line) for p in OWN_LINES)]


@pytest.mark.parametrize("kind", ["qwen3_vl", "qwen3_5"])
def test_a_default_run_prints_only_vlcaches_lines(kind, tiny_model_dir, tmp_path_factory, tmp_path):
    if kind == "qwen3_vl":
        model = tiny_model_dir
    else:  # Qwen3.5 warns about CUDA-only kernel packages at its first forward
        from vlcache.testing.families import build_family_checkpoint

        model = build_family_checkpoint(kind, tmp_path_factory.mktemp(kind))
    out = tmp_path / "r.pt"
    made = run("cache", photo("rocket.jpg"), "--output", out, "--model", model, "--max-pixels", 65536)
    asked = run("ask", "--cache", out, "--prompt", "What is this?", "--model", model, *GREEDY)
    assert made.returncode == 0 and asked.returncode == 0, made.stderr + asked.stderr
    assert only_own_lines(made.stderr) == [] and len(made.stderr.splitlines()) == 3, made.stderr
    assert only_own_lines(asked.stderr) == [] and len(asked.stderr.splitlines()) == 3, asked.stderr
    # The control: --verbose shows what transformers prints (so the default run did hide something).
    verbose = run("--verbose", "ask", "--cache", out, "--prompt", "What is this?", "--model", model, *GREEDY)
    assert verbose.returncode == 0, verbose.stderr
    hidden = only_own_lines(verbose.stderr)
    assert any("Loading weights" in line for line in hidden), verbose.stderr
    if kind == "qwen3_5":
        assert any("causal-conv1d" in line or "causal_conv1d" in line for line in hidden), verbose.stderr


def test_a_moved_model_folder_is_not_offered_for_download(astronaut_state, tmp_path, capsys, monkeypatch):
    """Issue 32 item 5: a local folder cannot be downloaded, so the hint asks where the model is now; a hub id
    (the control) is still offered for download."""
    import dataclasses

    monkeypatch.delenv("VLCACHE_MODEL", raising=False)
    moved, hub = tmp_path / "mv1", "vlcache-test/not-in-any-cache"
    for name, model in (("moved.pt", str(moved)), ("hub.pt", hub)):
        meta = dataclasses.replace(astronaut_state.metadata, model=model)
        dataclasses.replace(astronaut_state, metadata=meta).save(tmp_path / name)
    assert cli.main(["ask", "--cache", str(tmp_path / "moved.pt"), "--prompt", "x"]) == 1
    assert err_lines(capsys) == [f"error: the cache was made with the model folder {moved}, which is not on this "
                                 "machine; pass --model with where that model is now (or set VLCACHE_MODEL)"]
    # A file written since issue 31 names a folder by its name alone (and not a folder this machine loaded).
    meta = dataclasses.replace(astronaut_state.metadata, model="mv1", fingerprint="0" * 32)
    dataclasses.replace(astronaut_state, metadata=meta).save(tmp_path / "named.pt")
    assert cli.main(["ask", "--cache", str(tmp_path / "named.pt"), "--prompt", "x"]) == 1
    assert err_lines(capsys) == ["error: the cache was made with the model folder mv1, which is not on this machine; "
                                 "pass --model with where that model is now (or set VLCACHE_MODEL)"]
    assert cli.main(["chat", "--cache", str(tmp_path / "hub.pt")]) == 1
    assert err_lines(capsys) == [f"error: the cache was made with {hub}, which is not on this machine; pass --model "
                                 f"{hub} to download and use it (vlcache does not download what a cache file names on "
                                 "its own)"]


def test_check_and_the_python_api_print_nothing_of_transformers(tiny_model_dir):
    """Issue 32 item 4: stderr is vlcache's lines only. `vlcache check` prints its report on stdout and nothing on
    stderr (no loading bar, no video processor warning); Engine.load prints nothing at all; --verbose shows them."""
    checked = subprocess.run([sys.executable, "-m", "vlcache", "check", "--model", str(tiny_model_dir), "--device", "cpu"],
                             capture_output=True, text=True, timeout=300)
    assert checked.returncode == 0 and checked.stderr == "", checked.stderr
    assert checked.stdout.splitlines()[-1] == "exact: every probe held"
    load = "import sys; from vlcache import Engine; Engine.load(sys.argv[1], device='cpu'); print('loaded')"
    loaded = subprocess.run([sys.executable, "-c", load, str(tiny_model_dir)], capture_output=True, text=True, timeout=300)
    assert (loaded.returncode, loaded.stdout, loaded.stderr) == (0, "loaded\n", "")
    verbose = "import sys; from vlcache import Engine; from vlcache.model import quiet_transformers; " \
              "quiet_transformers(verbose=True); Engine.load(sys.argv[1], device='cpu')"
    shown = subprocess.run([sys.executable, "-c", verbose, str(tiny_model_dir)], capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0 and "Loading weights" in shown.stderr  # the control: the bar exists, and is shown on request


def test_offline_an_absent_hub_model_fails_at_once_and_a_demo_model_stands_in(tmp_path):
    """Issue 32 item 1: with no model folder, an empty Hugging Face cache and no hub (a loopback port nothing
    listens on), one line says so and what to do (no retries); `vlcache demo-model` writes a random-weight model
    that the commands then load without any network."""
    import time

    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "VLCACHE_MODEL") and "PROXY" not in k.upper()}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT="http://127.0.0.1:1")

    def vlcache(*args):
        return subprocess.run([sys.executable, "-m", "vlcache", *map(str, args)], capture_output=True, text=True,
                              env=env, timeout=300)

    started = time.monotonic()
    offline = vlcache("ask", "--prompt", "hi")
    assert time.monotonic() - started < 60
    assert offline.returncode == 1 and offline.stdout == ""
    assert offline.stderr.splitlines() == [
        "loading Qwen/Qwen3-VL-2B-Instruct (auto, auto)...",
        "error: cannot load model 'Qwen/Qwen3-VL-2B-Instruct': the Hugging Face hub (http://127.0.0.1:1) cannot be "
        "reached (Connection refused) and the model is not on this machine; pass --model /path/to/a/model/folder (or "
        "set VLCACHE_MODEL=/path), set HF_HUB_OFFLINE=1 to use models already downloaded, or try vlcache offline with "
        "a small random-weight model: vlcache demo-model DIR"]
    folder = tmp_path / "demo"
    made = vlcache("demo-model", folder)
    assert made.returncode == 0 and made.stdout == f"{folder}\n"
    assert re.fullmatch(rf"wrote a demo model with RANDOM weights \(\d+\.\d MiB; its answers are noise\) to {folder}; "
                        rf"try it: export VLCACHE_MODEL={folder}\n", made.stderr), made.stderr
    assert "RANDOM WEIGHTS" in (folder / "README.md").read_text()
    asked = vlcache("ask", "--model", folder, "--image", photo("rocket.jpg"), "--prompt", "hi", "--max-new-tokens", 2,
                    "--json")
    assert asked.returncode == 0, asked.stderr
    assert 1 <= len(json.loads(asked.stdout)["token_ids"]) <= 2
    again = vlcache("demo-model", folder)
    assert (again.returncode, again.stderr) == (1, f"error: {folder} exists and is not an empty folder; name a new "
                                                   "folder for the demo model\n")


def test_a_still_image_named_as_a_video_says_how_to_give_it(tmp_path, capsys):
    """Issue 32 item 6: the refusal says how to give the file as an image (before any model load)."""
    fake = tmp_path / "fake.mp4"
    fake.write_bytes(photo("rocket.jpg").read_bytes())
    assert cli.main(["cache", str(fake), "-o", str(tmp_path / "x.pt"), "--model", str(tmp_path / "no-model")]) == 1
    assert err_lines(capsys) == [f"error: not a video: {fake} is a still image (jpeg); a file is taken as a video by its "
                                 "suffix (.mp4, .webm, .mov, ...): give it an image's suffix (.jpg, .png, ...) on the "
                                 "command line, or send it as an image_url"]


def test_chat_at_a_terminal_says_what_it_takes(astronaut_state, tiny_model_dir, tmp_path, capsys, monkeypatch):
    """Issue 32 item 6: at a terminal, chat names /reset, /save and /quit once; piped, it prints no such line."""
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    path = astronaut_state.save(tmp_path / "a.pt")
    hint = ("type a question and press Enter; /reset goes back to the cached image, /save PATH writes the conversation "
            "as a cache file, /quit ends")
    for stdin, shown in ((Terminal("/quit\n"), True), (io.StringIO("/quit\n"), False)):
        monkeypatch.setattr(sys, "stdin", stdin)
        assert cli.main(["chat", "--cache", str(path), "--model", str(tiny_model_dir)]) == 0
        assert (hint in capsys.readouterr().err.splitlines()) is shown
