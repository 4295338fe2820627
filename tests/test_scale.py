"""Beyond one machine: states in object storage (a real local S3: moto's server on 127.0.0.1) and batch caching
on a real local Ray. Skipped where moto, s3fs or Ray are not installed (`pip install -e '.[test,s3,ray]'`)."""

import json
import os
import subprocess
import sys

import pytest

from conftest import SYSTEM, photo
from test_server import LiveServer

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

N = 10
QUESTION = "What objects are visible in this image?"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on a random loopback port; the environment points fsspec (and subprocesses) at it."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    fs.mkdir("vlcache-test")
    yield env
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    server.stop()


def run(*args, env=None):
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    environment.pop("VLCACHE_SERVER", None)
    return subprocess.run([sys.executable, "-m", "vlcache", *map(str, args)], capture_output=True, text=True,
                          env=environment, timeout=600)


def test_a_state_in_s3_answers_as_a_local_file(engine, s3, tmp_path, tiny_model_dir):
    from vlcache import storage
    from vlcache.header import read_metadata

    url = "s3://vlcache-test/single/rocket.pt"
    made = run("cache", photo("rocket.jpg"), "--output", url, "--model", tiny_model_dir, "--system-prompt", SYSTEM, env=s3)
    assert made.returncode == 0, made.stderr
    local = engine.cache_image(photo("rocket.jpg"), system_prompt=SYSTEM).save(tmp_path / "rocket.pt")
    remote, here = read_metadata(url), read_metadata(local)
    assert (remote.prefix_tokens, remote.parts, remote.fingerprint) == (here.prefix_tokens, here.parts, here.fingerprint)
    assert storage.size(url) == local.stat().st_size  # the same tensors and a header of the same length
    asked = run("ask", "--cache", url, "--prompt", QUESTION, "--max-new-tokens", N, "--temperature", "0", "--json", env=s3)
    assert asked.returncode == 0, asked.stderr
    expected = engine.ask(engine.load_state(local), QUESTION, max_new_tokens=N, temperature=0)
    assert json.loads(asked.stdout)["token_ids"] == expected.token_ids
    shown = run("inspect", url, env=s3)
    assert shown.returncode == 0 and "file:" in shown.stdout
    missing = run("ask", "--cache", "s3://vlcache-test/none.pt", "--prompt", "Hi", env=s3)
    assert missing.returncode == 1 and missing.stderr.strip().splitlines()[-1].startswith("error: cache file not found")


def test_a_server_on_the_bucket_finds_states_cached_elsewhere(engine, s3):
    from vlcache.header import metadata_key

    state = engine.cache_image(photo("coffee.png"), system_prompt=SYSTEM)
    state.save(f"s3://vlcache-test/fleet/{metadata_key(state.metadata)}.safetensors")
    live = LiveServer(engine, "s3://vlcache-test/fleet/")
    try:
        import base64

        url = "data:image/png;base64," + base64.b64encode(photo("coffee.png").read_bytes()).decode()
        reply = live.client.chat.completions.create(model="any", max_tokens=N, temperature=0, messages=[
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}]}])
        assert reply.usage.prompt_tokens_details.cached_tokens == state.num_tokens  # read from the bucket
        expected = engine.ask(state, QUESTION, max_new_tokens=N, temperature=0)
        assert reply.choices[0].message.content == expected.text
        # A state the server computes is written to the bucket too.
        rocket = "data:image/jpeg;base64," + base64.b64encode(photo("rocket.jpg").read_bytes()).decode()
        live.client.chat.completions.create(model="any", max_tokens=2, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": rocket}}, {"type": "text", "text": "Hi"}]}])
        import s3fs

        assert len(s3fs.S3FileSystem().ls("vlcache-test/fleet/")) == 2
    finally:
        live.close()


def test_batch_caching_on_ray_into_s3_then_asking_from_it(engine, s3, tmp_path, tiny_model_dir):
    pytest.importorskip("ray")
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("rocket.jpg", "coffee.png", "chelsea.png"):
        (folder / name).write_bytes(photo(name).read_bytes())
    (folder / "broken.png").write_bytes(b"not an image")
    prefix = "s3://vlcache-test/ray/"
    env = dict(s3)  # no RAY_ADDRESS: a local Ray is started for each call
    first = run("cache", folder, "--output-dir", prefix, "--ray", "--workers", 2, "--model", tiny_model_dir,
                "--system-prompt", SYSTEM, env=env)
    assert first.returncode == 1, first.stderr  # the broken file fails alone
    # Issue 32 item 4: stderr is vlcache's lines only (no Ray INFO/WARNING lines, no core_worker.cc error line).
    lines = first.stderr.splitlines()
    assert lines[0] == f"caching on Ray with 2 worker(s), each loading {tiny_model_dir}", lines
    assert lines[-1] == f"3 cached, 0 up to date (skipped), 1 failed -> {prefix}", lines
    assert len(lines) == 3 and lines[1].startswith("error: ") and "broken.png" in lines[1], lines
    from vlcache import storage

    manifest = json.loads(storage.read_bytes(prefix + "manifest.json"))
    assert manifest["counts"] == {"cached": 3, "skipped": 0, "failed": 1}
    outputs = {os.path.basename(r["source"]): r["output"] for r in manifest["results"]}
    again = run("cache", folder, "--output-dir", prefix, "--ray", "--workers", 2, "--model", tiny_model_dir,
                "--system-prompt", SYSTEM, env=env)
    assert "0 cached, 3 up to date (skipped), 1 failed" in again.stderr, again.stderr
    asked = run("ask", "--cache", outputs["chelsea.png"], "--prompt", QUESTION, "--max-new-tokens", N, "--temperature",
                "0", "--json", env=s3)
    assert asked.returncode == 0, asked.stderr
    expected = engine.ask(engine.cache_image(photo("chelsea.png"), system_prompt=SYSTEM), QUESTION, max_new_tokens=N,
                          temperature=0)
    assert json.loads(asked.stdout)["token_ids"] == expected.token_ids
    # The batch's names are the server's keys: a server on the prefix answers its first question from them.
    live = LiveServer(engine, prefix)
    try:
        import base64

        url = "data:image/jpeg;base64," + base64.b64encode(photo("rocket.jpg").read_bytes()).decode()
        reply = live.client.chat.completions.create(model="any", max_tokens=N, temperature=0, messages=[
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}]}])
        rocket = engine.cache_image(photo("rocket.jpg"), system_prompt=SYSTEM)
        assert reply.usage.prompt_tokens_details.cached_tokens == rocket.num_tokens
        assert reply.choices[0].message.content == engine.ask(rocket, QUESTION, max_new_tokens=N, temperature=0).text
    finally:
        live.close()


def test_two_replicas_under_ray_serve_answer_exactly_and_compute_each_state_once(engine, tiny_model_dir, tmp_path):
    ray = pytest.importorskip("ray")
    serve = pytest.importorskip("ray.serve")
    import base64
    import socket

    from openai import OpenAI

    from vlcache.scale import ray_serve
    from vlcache.serving.server import ServeOptions

    ray.init(log_to_driver=False, include_dashboard=False)  # first: Ray's own services take ports of their own
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    states = tmp_path / "states"
    ray_serve.run(str(tiny_model_dir), "cpu", "auto", ServeOptions(cache_dir=states, memory_budget=2**30), 2,
                  "127.0.0.1", port, blocking=False)
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=300)
        names = ["rocket.jpg", "coffee.png", "chelsea.png", "astronaut.png"]
        expected = {name: engine.cache_image(photo(name), system_prompt=SYSTEM) for name in names}

        def ask(name, question, stream=False):
            mime = "jpeg" if name.endswith(".jpg") else "png"
            url = f"data:image/{mime};base64," + base64.b64encode(photo(name).read_bytes()).decode()
            messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]}]
            if stream:
                chunks = client.chat.completions.create(model="any", messages=messages, max_tokens=N, temperature=0,
                                                        stream=True)
                return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), None
            reply = client.chat.completions.create(model="any", messages=messages, max_tokens=N, temperature=0)
            return reply.choices[0].message.content, reply.usage.prompt_tokens_details.cached_tokens

        questions = [QUESTION, "Describe the lighting and mood."]
        for round_, question in enumerate(questions):
            for name in names:
                text, cached = ask(name, question)
                assert text == engine.ask(expected[name], question, max_new_tokens=N, temperature=0).text
                # The first question about an image computes its state; every later one, on either replica, reuses it.
                assert cached == (0 if round_ == 0 else expected[name].num_tokens), (name, round_)
        streamed, _ = ask("coffee.png", "Is it day or night?", stream=True)
        assert streamed == engine.ask(expected["coffee.png"], "Is it day or night?", max_new_tokens=N, temperature=0).text
        assert len(list(states.glob("*.safetensors"))) == len(names)
    finally:
        serve.shutdown()
        ray.shutdown()
