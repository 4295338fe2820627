"""--server: the CLI and the guide's scripts as thin clients of a live server on 127.0.0.1 (random port). Answers
equal the local ones token for token; the client imports neither torch nor transformers; a cache file is
uploaded once, checked like any cache file, and refused for another model."""

import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest

from conftest import REPO, SYSTEM, photo
from test_cli import assert_one_line_error
from test_server import LiveServer
from vlcache.conversation import Conversation
from vlcache.client import Client, file_digest
from vlcache.header import metadata_key

N = 12
QUESTION = "What objects are visible in this image?"


def run(*args, script=None, env=None, stdin=None):
    command = [sys.executable, str(REPO / "scripts" / script)] if script else [sys.executable, "-m", "vlcache"]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    environment.pop("VLCACHE_SERVER", None)
    environment.update(env or {})
    return subprocess.run(command + [str(a) for a in args], capture_output=True, text=True, env=environment, timeout=300,
                          input=stdin)


@pytest.fixture(scope="module")
def server(engine, tmp_path_factory):
    live = LiveServer(engine, tmp_path_factory.mktemp("client-states"))
    yield live
    live.close()


@pytest.fixture(scope="module")
def cache_file(engine, tmp_path_factory):
    return engine.cache_image(photo("rocket.jpg"), system_prompt=SYSTEM).save(tmp_path_factory.mktemp("c") / "rocket.pt")


def local(engine, cache_file, question=QUESTION):
    return engine.ask(engine.load_state(cache_file), question, max_new_tokens=N, temperature=0)


def uploads(server) -> float:
    return server.service.metrics.uploads._value.get()


def test_ask_through_the_server_equals_asking_locally_and_uploads_once(engine, server, cache_file):
    before = uploads(server)
    first = run("ask", "--server", server.url, "--cache", cache_file, "--prompt", QUESTION, "--max-new-tokens", N,
                "--temperature", "0", "--json")
    assert first.returncode == 0, first.stderr
    answer, expected = json.loads(first.stdout), local(engine, cache_file)
    assert answer["token_ids"] == expected.token_ids and answer["text"] == expected.text
    assert answer["cached_tokens"] == expected.cached_tokens and answer["prompt_tokens"] == expected.prompt_tokens
    assert "loading" not in first.stderr  # no model load in the client
    plain = run("ask", "--server", server.url, "--cache", cache_file, "--prompt", QUESTION, "--max-new-tokens", N,
                "--temperature", "0")
    assert plain.returncode == 0 and plain.stdout == expected.text + "\n", plain.stderr
    streamed = run("ask", "--server", server.url, "--cache", cache_file, "--prompt", QUESTION, "--max-new-tokens", N,
                   "--temperature", "0", "--stream")
    assert streamed.stdout == expected.text + "\n"
    assert uploads(server) == before + 1  # the file went over once; later calls sent only the question
    store = server.service.store
    assert store.get_upload(file_digest(cache_file))[0] is not None
    # Kept apart: the upload does not answer requests that look a state up by its image.
    assert store.get(metadata_key(engine.load_state(cache_file).metadata))[0] is None


def test_the_guide_script_through_VLCACHE_SERVER(engine, server, cache_file):
    result = run("--cache", cache_file, "--prompt", "Describe the lighting and mood.", "--max_new_tokens", N,
                 "--temperature", "0", "--json", script="run_smart_prompt.py", env={"VLCACHE_SERVER": server.url})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["token_ids"] == local(engine, cache_file, "Describe the lighting and mood.").token_ids


def test_several_questions_text_only_and_uncached_image(engine, server, cache_file):
    questions = [QUESTION, "How many people are there?", "Is it day or night?"]
    many = run("ask", "--server", server.url, "--cache", cache_file, *[a for q in questions for a in ("--prompt", q)],
               "--max-new-tokens", N, "--temperature", "0", "--json")
    assert many.returncode == 0, many.stderr
    got = [json.loads(line) for line in many.stdout.splitlines()]
    assert [g["prompt"] for g in got] == questions
    assert [g["token_ids"] for g in got] == [local(engine, cache_file, q).token_ids for q in questions]
    # Several caches, one missing: its one error line, the other's answer, and the run fails (as it does locally).
    mixed = run("ask", "--server", server.url, "--cache", cache_file, "--cache", cache_file.parent / "gone.pt",
                "--prompt", QUESTION, "--max-new-tokens", N, "--temperature", "0", "--json")
    assert mixed.returncode == 1 and mixed.stderr.count("error:") == 1 and "gone.pt" in mixed.stderr, mixed.stderr
    assert [json.loads(line)["token_ids"] for line in mixed.stdout.splitlines()] == [local(engine, cache_file).token_ids]
    text = run("ask", "--server", server.url, "--prompt", "What is artificial intelligence?", "--max-new-tokens", N,
               "--temperature", "0", "--json")
    assert json.loads(text.stdout)["token_ids"] == engine.ask(None, "What is artificial intelligence?", max_new_tokens=N,
                                                              temperature=0).token_ids
    image = run("ask", "--server", server.url, "--image", photo("coffee.png"), "--prompt", QUESTION, "--max-new-tokens", N,
                "--temperature", "0", "--json")
    state = engine.cache_image(photo("coffee.png"), system_prompt=SYSTEM)
    assert json.loads(image.stdout)["token_ids"] == engine.ask(state, QUESTION, max_new_tokens=N, temperature=0).token_ids


def test_chat_through_the_server_equals_a_local_conversation(engine, server, cache_file):
    turns = ["What is this?", "And its colors?", "Describe the lighting and mood."]
    result = run("chat", "--server", server.url, "--cache", cache_file, "--max-new-tokens", N, "--temperature", "0",
                 "--json", stdin="\n".join(turns) + "\n")
    assert result.returncode == 0, result.stderr
    chat = Conversation(engine, engine.load_state(cache_file))
    expected = [chat.ask(t, max_new_tokens=N, temperature=0).token_ids for t in turns]
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert [a["token_ids"] for a in answers] == expected
    # Each turn continues the server's kept conversation: the cached part grows by the turns before it.
    cached = [a["cached_tokens"] for a in answers]
    assert cached[0] == engine.load_state(cache_file).num_tokens and cached[0] < cached[1] < cached[2], cached
    assert all(a["cached_tokens"] < a["prompt_tokens"] for a in answers), answers
    saving = run("chat", "--server", server.url, "--cache", cache_file, stdin="/save x.pt\n")
    assert saving.returncode == 1 and "not available through a server" in saving.stderr


def test_cache_through_the_server_saves_the_state_here(engine, server, tmp_path):
    out = tmp_path / "astro.pt"  # into a folder that exists, as locally (a missing one is refused)
    made = run("cache", photo("astronaut.png"), "--output", out, "--server", server.url, "--system-prompt", SYSTEM)
    assert made.returncode == 0 and made.stdout == "", made.stderr
    got, want = engine.load_state(out), engine.cache_image(photo("astronaut.png"), system_prompt=SYSTEM)
    assert got.input_ids.tolist() == want.input_ids.tolist()
    # The server saw bytes; the client records the files' paths as a local cache does (issue 32 item 6).
    assert got.metadata.parts == want.metadata.parts and got.metadata.image_path == want.metadata.image_path
    clip = REPO.parent / "shared" / "videos" / "hubble_pan.mp4"
    video = run("cache", clip, "--output", tmp_path / "clip.pt", "--server", server.url)
    assert video.returncode == 0, video.stderr
    assert engine.load_state(tmp_path / "clip.pt").metadata.parts[0]["path"] == str(clip.resolve())
    shown = run("inspect", tmp_path / "clip.pt")
    assert shown.returncode == 0 and f"video:         {clip.resolve()} (" in shown.stdout, shown.stdout
    assert engine.ask(got, QUESTION, max_new_tokens=N, temperature=0).token_ids == \
        engine.ask(want, QUESTION, max_new_tokens=N, temperature=0).token_ids
    flags = run("cache", photo("astronaut.png"), "--output", out, "--server", server.url, "--fps", "1")
    assert flags.returncode == 2 and "server's settings" in flags.stderr


def test_the_client_imports_neither_torch_nor_transformers(server, cache_file):
    code = (
        "import json, sys\n"
        "from vlcache import cli\n"
        f"code = cli.main(['ask', '--server', {server.url!r}, '--cache', {str(cache_file)!r}, '--prompt', 'Hi',"
        " '--max-new-tokens', '3', '--json'])\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'safetensors'))\n"
        "print(json.dumps({'code': code, 'heavy': heavy}), file=sys.stderr)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    report = json.loads(result.stderr.strip().splitlines()[-1])
    assert report == {"code": 0, "heavy": []}, result.stderr
    assert len(json.loads(result.stdout)["token_ids"]) <= 3


def test_a_cache_of_another_model_and_bad_uploads_are_refused(server, other_model_dir, tmp_path):
    from vlcache import Engine

    other = Engine.load(str(other_model_dir), device="cpu")
    foreign = other.cache_image(photo("rocket.jpg")).save(tmp_path / "foreign.pt")
    result = run("ask", "--server", server.url, "--cache", foreign, "--prompt", "Hi")
    assert_one_line_error(result, "model mismatch")
    # The server checks what it is sent on its own, too.
    for body, status, reason in ((foreign.read_bytes(), 400, "model mismatch"), (b"\x80\x04pickle", 400, "never unpickles"),
                                 (b"", 400, "empty")):
        code, reply = server.post("/v1/vlcache/states", body, content_type="application/octet-stream")
        assert code == status and reason in reply["error"]["message"], reply
    assert not list(server.service.store.folder.location.glob(".upload-*"))  # nothing left behind


def test_an_upload_over_the_limit_is_413(engine, cache_file, tmp_path):
    live = LiveServer(engine, tmp_path / "states", max_state_bytes=1000)
    try:
        code, reply = live.post("/v1/vlcache/states", cache_file.read_bytes(), content_type="application/octet-stream")
        assert code == 413 and "--max-state-bytes" in reply["error"]["message"]
    finally:
        live.close()


def test_no_server_at_the_url_is_a_one_line_error_and_no_model_load(cache_file):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    result = run("ask", "--server", f"http://127.0.0.1:{port}", "--cache", cache_file, "--prompt", "Hi")
    assert_one_line_error(result, "cannot reach a vlcache server")
    assert "without --server" in result.stderr or "drop --server" in result.stderr
    assert "loading" not in result.stderr
    status = run("status", "--server", f"http://127.0.0.1:{port}")
    assert_one_line_error(status, "cannot reach")


def test_serve_detach_status_and_stop(tiny_model_dir, tmp_path, cache_file, engine):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"VLCACHE_HOME": str(tmp_path / "home")}
    started = run("serve", "--detach", "--model", tiny_model_dir, "--port", port, "--cache-dir", tmp_path / "states", env=env)
    try:
        assert started.returncode == 0, started.stderr
        url = started.stdout.strip()
        assert url == f"http://127.0.0.1:{port}"
        # Issue 32 items 3 and 4: the start shows the server's progress as it comes (the load, the decode step's
        # decision), each line once, and nothing but vlcache's lines (no torch notes). Issue 33 item 4: a first start
        # listens at once with eager steps and decides (compiles each batch size, k of n) in the background.
        lines = started.stderr.splitlines()
        assert lines[0] == f"loading {tiny_model_dir} (auto, auto)..." and lines[-1].startswith(f"vlcache serve is up at {url}")
        assert any(line.startswith("deciding the decode step in the background for 5 batch size(s)") for line in lines)
        ours = ("loading ", "loaded in ", "deciding the decode step ", "decode steps: ", "serving ", "vlcache serve is up ")
        assert all(line.startswith(ours) for line in lines) and len(set(lines)) == len(lines), lines
        deadline = time.time() + 600
        while Client(url).health()["decode"]["reason"].startswith("deciding"):
            assert time.time() < deadline, "the background decision did not end"
            time.sleep(0.5)
        log = (tmp_path / "home" / "serve.log").read_text().splitlines()
        assert any(re.fullmatch(r"decode steps: compiling the step for batch size 16 \(5 of 5; about \d+(s| min) left\)\.\.\.",
                                line) for line in log), log
        assert len([line for line in log if re.match(r"decode steps: (switched to compiled steps|eager) \(", line)]) == 1, log
        # Issues 28 and 33: inductor's caches really live under $VLCACHE_HOME/compile (files written by this start),
        # beside auto's remembered decision for this model and machine.
        compiled = [path for path in (tmp_path / "home" / "compile" / "inductor").rglob("*") if path.is_file()]
        assert compiled, "no compiled artifact under $VLCACHE_HOME/compile/inductor"
        decisions = list((tmp_path / "home" / "compile" / "decisions").glob("*.json"))
        assert len(decisions) == 1 and json.loads(decisions[0].read_text())["step"] in ("compiled", "eager")
        status = run("status", "--json", env=env)  # finds the detached server from its record
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["model"] == tiny_model_dir.name  # never the server's path
        asked = run("ask", "--cache", cache_file, "--prompt", QUESTION, "--max-new-tokens", N, "--temperature", "0",
                    "--json", env={**env, "VLCACHE_SERVER": url})
        assert json.loads(asked.stdout)["token_ids"] == local(engine, cache_file).token_ids
        again = run("serve", "--detach", "--model", tiny_model_dir, "--port", port, env=env)
        assert_one_line_error(again, "already running")
    finally:
        stopped = run("stop", env=env)
    assert stopped.returncode == 0, stopped.stderr
    deadline = time.time() + 10
    while run("status", env=env).returncode == 0 and time.time() < deadline:
        time.sleep(0.2)
    assert_one_line_error(run("status", env=env), "no server given")
    # A second start on this machine: the remembered decision, applied before listening; nothing probed or timed.
    second = run("serve", "--detach", "--model", tiny_model_dir, "--port", port, "--cache-dir", tmp_path / "states", env=env)
    try:
        assert second.returncode == 0, second.stderr
        lines = second.stderr.splitlines()
        assert any(re.match(r"decode steps: (compiled|eager), as decided on ", line) for line in lines), lines
        assert not any("timing the step" in line or "checking the step's tokens" in line or "deciding" in line
                       for line in lines), lines
        decode = Client(url).health()["decode"]
        assert decode["remembered"] is True and decode["reason"].startswith("remembered: ")
    finally:
        assert run("stop", env=env).returncode == 0


def test_a_forged_upload_cannot_answer_another_clients_question(engine, server, tmp_path):
    """A file whose metadata claims another image (camera) but holds the K/V of this one (rocket): uploaded, it
    must not be what a chat about camera.png is answered from."""
    import base64

    from safetensors import safe_open
    from safetensors.torch import save_file

    honest = engine.cache_image(photo("rocket.jpg"), system_prompt=SYSTEM).save(tmp_path / "rocket.pt")
    camera = engine.cache_image(photo("camera.png"), system_prompt=SYSTEM)
    with safe_open(str(honest), "pt") as fh:
        header, tensors = fh.metadata(), {name: fh.get_tensor(name) for name in fh.keys()}
    meta = json.loads(header["metadata"])
    meta.update(image_sha256=camera.metadata.image_sha256, parts=camera.metadata.parts)
    forged = tmp_path / "forged.pt"
    save_file(tensors, str(forged), metadata={**header, "metadata": json.dumps(meta)})
    code, reply = server.post("/v1/vlcache/states", forged.read_bytes(), content_type="application/octet-stream")
    assert code == 200 and reply["id"] == file_digest(forged)
    url = "data:image/png;base64," + base64.b64encode(photo("camera.png").read_bytes()).decode()
    answer = server.client.chat.completions.create(model="any", max_tokens=N, temperature=0, messages=[
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}]}])
    assert answer.choices[0].message.content == engine.ask(camera, QUESTION, max_new_tokens=N, temperature=0).text
    assert answer.usage.prompt_tokens_details.cached_tokens == 0  # computed from the image, not taken from the upload


def test_which_server_and_model_is_never_silent(engine, server, cache_file, tiny_model_dir):
    """Issue 32 item 6: with VLCACHE_SERVER exported, a VLCACHE_MODEL that is not the server's model is refused (not
    ignored); `--server ""` runs here whatever VLCACHE_SERVER says (it names a port nothing listens on)."""
    from vlcache.client import Client

    model = Client(server.url).health()["model"]
    refused = run("ask", "--cache", cache_file, "--prompt", QUESTION, env={"VLCACHE_SERVER": server.url,
                                                                          "VLCACHE_MODEL": "/models/other"})
    assert (refused.returncode, refused.stdout) == (1, "")
    assert refused.stderr == (f"error: VLCACHE_MODEL=/models/other is not the server's model ({model} at {server.url}); "
                              "unset VLCACHE_MODEL, or pass --server '' to load it here\n")
    here = run("ask", "--server", "", "--cache", cache_file, "--prompt", QUESTION, "--max-new-tokens", N, "--temperature",
               "0", "--json", "--model", tiny_model_dir, env={"VLCACHE_SERVER": "http://127.0.0.1:9"})
    assert here.returncode == 0, here.stderr
    assert json.loads(here.stdout)["token_ids"] == local(engine, cache_file).token_ids
    assert here.stderr.startswith(f"loading {tiny_model_dir} ")  # the model was loaded here


def test_health_lists_the_decode_shapes_compiled_after_the_start(engine, tmp_path, cache_file):
    """Issue 32 item 6: /health's decode shapes are the ones compiled so far (a traced step, eager backend: cheap).
    Since issue 28 a step's shape depends only on its batch size: a photograph's state, longer than the start's
    text-only warm-up, compiles nothing new (dynamo's graph counter, shown by /health, does not move)."""
    from test_server import LiveServer
    from vlcache.client import Client

    try:
        engine.compile_steps("on", buckets=[1], backend="eager")
        started = [tuple(s) for s in engine.compile_status["shapes"]]
        live = LiveServer(engine, tmp_path / "states")
        try:
            before = Client(live.url).health()["decode"]
            assert [tuple(s) for s in before["shapes"]] == started == [(1, engine.runner.span)]
            asked = run("ask", "--server", live.url, "--cache", cache_file, "--prompt", QUESTION, "--max-new-tokens", 3,
                        "--temperature", "0", "--json")
            assert asked.returncode == 0, asked.stderr
            after = Client(live.url).health()["decode"]
            assert {tuple(s) for s in after["shapes"]} == set(engine.runner.shapes) == set(started)
            assert after["graphs_compiled"] == before["graphs_compiled"] > 0
        finally:
            live.close()
    finally:
        engine.compile_steps("off")
