"""vlcache serve: a live server on 127.0.0.1 (random port) with the tiny model, through the official openai client."""

import base64
import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import uvicorn
from openai import OpenAI

from conftest import SYSTEM, photo
from reference import reference_tokens
from vlcache.serving.server import ServeOptions, create_app, server_config

N = 12


class LiveServer:
    def __init__(self, engine, cache_dir, memory_budget=2**30, **options):
        app = create_app(engine, ServeOptions(cache_dir=cache_dir, memory_budget=memory_budget, **options))
        self.service = app.state.service
        self.server = uvicorn.Server(server_config(app, "127.0.0.1", 0, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=120)

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def post(self, path, body: bytes, content_type="application/json"):
        request = urllib.request.Request(self.url + path, data=body, method="POST", headers={"Content-Type": content_type})
        return _call(request)

    def get(self, path, method="GET"):
        return _call(urllib.request.Request(self.url + path, method=method))


def _call(request):
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


@pytest.fixture
def server(engine, tmp_path):
    live = LiveServer(engine, tmp_path / "states")
    yield live
    live.close()


def data_url(name):
    path = photo(name)
    kind = "jpeg" if path.suffix == ".jpg" else "png"
    return f"data:image/{kind};base64," + base64.b64encode(path.read_bytes()).decode()


def image_messages(name, question, system=SYSTEM):
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(name)}}, {"type": "text", "text": question}]},
    ]


def ask(client, name, question, **kwargs):
    return client.chat.completions.create(model="any", messages=image_messages(name, question), max_tokens=N, temperature=0, **kwargs)


def test_answers_equal_uncached_generate_and_repeat_questions_are_cached(engine, server):
    first = ask(server.client, "astronaut.png", "What colors dominate the scene?")
    second = ask(server.client, "astronaut.png", "Describe the lighting and mood.")
    for response, question in ((first, "What colors dominate the scene?"), (second, "Describe the lighting and mood.")):
        expected = reference_tokens(engine, photo("astronaut.png"), SYSTEM, question, N)
        assert response.choices[0].message.content == engine.processor.tokenizer.decode(expected, skip_special_tokens=True)
        assert response.usage.completion_tokens == len(expected)
    state_tokens = engine.cache_image(photo("astronaut.png"), system_prompt=SYSTEM).num_tokens
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens >= state_tokens
    assert second.usage.prompt_tokens > state_tokens


def test_alternating_images_and_text_only(engine, server):
    expected = {}
    for name in ("rocket.jpg", "coffee.png"):
        tokens = reference_tokens(engine, photo(name), SYSTEM, "What is in the picture?", N)
        expected[name] = engine.processor.tokenizer.decode(tokens, skip_special_tokens=True)
    for name in ("rocket.jpg", "coffee.png", "rocket.jpg", "coffee.png"):
        assert ask(server.client, name, "What is in the picture?").choices[0].message.content == expected[name]
    text_only = server.client.chat.completions.create(
        model="any", messages=[{"role": "user", "content": "What is artificial intelligence?"}], max_tokens=N, temperature=0)
    tokens = reference_tokens(engine, None, None, "What is artificial intelligence?", N)
    assert text_only.choices[0].message.content == engine.processor.tokenizer.decode(tokens, skip_special_tokens=True)


def test_streaming_concatenates_to_the_answer(server):
    whole = ask(server.client, "chelsea.png", "Describe this image in one sentence.")
    chunks = list(ask(server.client, "chelsea.png", "Describe this image in one sentence.", stream=True,
                      stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    usage = chunks[-1].usage
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert usage.prompt_tokens_details.cached_tokens > 0


def test_sixteen_concurrent_clients_get_their_own_answers(server):
    jobs = [(name, q) for name in ("astronaut.png", "rocket.jpg") for q in
            ("What objects are visible?", "What colors dominate the scene?", "Is it day or night?", "Describe the mood.",
             "How many people are there?", "What is written on the sign?", "Tell me more, please.", "Is it a photo?")]
    alone = {job: ask(server.client, *job).choices[0].message.content for job in jobs}
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        together = dict(zip(jobs, pool.map(lambda job: ask(server.client, *job).choices[0].message.content, jobs)))
    assert together == alone
    assert len(set(alone.values())) > 4  # the questions really get different answers


def test_states_survive_a_restart_and_cli_caches_are_found(engine, tmp_path):
    states = tmp_path / "states"
    states.mkdir()
    engine.cache_image(photo("coffee.png"), system_prompt=SYSTEM).save(states / "made_by_vlcache_cache.pt")
    live = LiveServer(engine, states)
    try:
        from_cli_file = ask(live.client, "coffee.png", "What is this?")
        assert from_cli_file.usage.prompt_tokens_details.cached_tokens > 0
        ask(live.client, "rocket.jpg", "What is this?")
    finally:
        live.close()
    again = LiveServer(engine, states)
    try:
        response = ask(again.client, "rocket.jpg", "Describe the lighting and mood.")
        assert response.usage.prompt_tokens_details.cached_tokens > 0
        status, _ = again.get("/health")
        metrics = urllib.request.urlopen(again.url + "/metrics").read().decode()
        assert status == 200 and 'vlcache_state_lookups_total{result="disk"} 1.0' in metrics
    finally:
        again.close()


def test_eviction_under_a_small_budget(engine, tmp_path):
    one_state = engine.cache_image(photo("astronaut.png"), system_prompt=SYSTEM).kv_bytes
    live = LiveServer(engine, tmp_path / "states", memory_budget=int(one_state * 1.5))
    try:
        ask(live.client, "astronaut.png", "One?")
        ask(live.client, "rocket.jpg", "Two?")
        assert live.service.store.hot_count == 1 and live.service.store.hot_bytes <= one_state * 1.5
        back = ask(live.client, "astronaut.png", "Three?")  # evicted from memory, found on disk
        assert back.usage.prompt_tokens_details.cached_tokens > 0
        metrics = urllib.request.urlopen(live.url + "/metrics").read().decode()
        assert 'vlcache_state_lookups_total{result="disk"} 1.0' in metrics
        assert 'vlcache_state_lookups_total{result="miss"} 2.0' in metrics
    finally:
        live.close()


def test_stop_strings_cut_the_answer(server):
    whole = ask(server.client, "astronaut.png", "What colors dominate the scene?").choices[0].message.content
    stop = next(whole[i:i + 2] for i in range(3, len(whole) - 2) if whole[i:i + 2].strip() and whole[i:i + 2] not in whole[:i + 1])
    cut = ask(server.client, "astronaut.png", "What colors dominate the scene?", stop=[stop])
    assert cut.choices[0].message.content == whole[: whole.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in
                       ask(server.client, "astronaut.png", "What colors dominate the scene?", stop=stop, stream=True) if c.choices)
    assert streamed == whole[: whole.index(stop)]


def test_image_endpoints(server):
    status, made = server.post("/v1/images", json.dumps({"image": data_url("chelsea.png"), "system_prompt": SYSTEM}).encode())
    assert status == 200 and len(made["id"]) == 64 and made["tokens"] > made["image_tokens"] > 0 and not made["cached"]
    status, shown = server.get(f"/v1/images/{made['id']}")
    assert status == 200 and shown["tokens"] == made["tokens"] and shown["system_prompt"] == SYSTEM
    response = ask(server.client, "chelsea.png", "What is this?")
    assert response.usage.prompt_tokens_details.cached_tokens == made["tokens"]
    assert server.get(f"/v1/images/{made['id']}", method="DELETE") == (200, {"id": made["id"], "object": "image_state", "deleted": True})
    assert server.get(f"/v1/images/{made['id']}")[0] == 404
    assert server.get(f"/v1/images/{made['id']}", method="DELETE")[0] == 404


def test_models_health_metrics(server):
    status, models = server.get("/v1/models")
    assert status == 200 and models["data"][0]["id"] == Path(server.service.engine.model_name).name
    assert [m.id for m in server.client.models.list()] == [Path(server.service.engine.model_name).name]
    ask(server.client, "astronaut.png", "Hi?")
    metrics = urllib.request.urlopen(server.url + "/metrics").read().decode()
    assert "vlcache_time_to_first_token_seconds_count 1.0" in metrics
    assert 'vlcache_requests_total{endpoint="/v1/chat/completions",status="200"} 1.0' in metrics
    assert "vlcache_hot_bytes" in metrics


def _error(status_and_body, status):
    got, body = status_and_body
    assert got == status, body
    assert set(body["error"]) >= {"message", "type", "param", "code"} and body["error"]["message"]
    return body["error"]["message"]


def test_malformed_and_hostile_requests_get_4xx_and_the_server_keeps_serving(server):
    chat = "/v1/chat/completions"
    assert "not valid JSON" in _error(server.post(chat, b"{not json"), 400)
    assert "messages" in _error(server.post(chat, b"{}"), 400)
    assert "JSON object" in _error(server.post(chat, b"[1, 2]"), 400)
    bad_base64 = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}]}
    assert "base64" in _error(server.post(chat, json.dumps(bad_base64).encode()), 400)
    not_image = {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"just text").decode()}}]}]}
    assert "not an image" in _error(server.post(chat, json.dumps(not_image).encode()), 400)
    remote = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://127.0.0.1:1/x.png"}}]}]}
    assert "remote image URLs are disabled" in _error(server.post(chat, json.dumps(remote).encode()), 400)
    local = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]}
    assert "data: URLs" in _error(server.post(chat, json.dumps(local).encode()), 400)
    for field, value in (("max_tokens", 0), ("temperature", -1), ("top_p", 5), ("n", 9), ("n", 0), ("stop", [1]), ("max_tokens", "many")):
        body = {"messages": [{"role": "user", "content": "hi"}], field: value}
        _error(server.post(chat, json.dumps(body).encode()), 400)
    _error(server.post(chat, json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}).encode()), 400)
    a_video_for_an_image = image_messages("astronaut.png", "q")
    a_video_for_an_image[1]["content"][0] = {"type": "video_url", "video_url": {"url": data_url("rocket.jpg")}}
    assert "not a video" in _error(server.post(chat, json.dumps({"messages": a_video_for_an_image}).encode()), 400)
    huge = b'{"messages": "' + b"A" * (33 * 1024 * 1024) + b'"}'
    assert "limit" in _error(server.post(chat, huge), 413)
    for bad_id in ("abc", "G" * 64, "..", "%2E%2E"):
        _error(server.get(f"/v1/images/{bad_id}"), 400)
    for traversal in ("..%2F..%2Fetc%2Fpasswd", "../../etc/passwd"):  # never reaches the store: no such route
        _error(server.get(f"/v1/images/{traversal}"), 404)
    _error(server.get("/v1/images/" + "0" * 64), 404)
    _error(server.get("/nowhere"), 404)
    assert ask(server.client, "astronaut.png", "Still there?").choices[0].message.content  # still serving


def test_serve_command_starts_and_answers(tiny_model_dir, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "vlcache", "serve", "--model", str(tiny_model_dir), "--port", str(port),
         "--cache-dir", str(tmp_path / "states"), "--memory-budget", "64MiB"],
        env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    assert json.loads(response.read())["status"] == "ok"
                    break
            except OSError:
                assert process.poll() is None, process.stderr.read()
                assert time.time() < deadline, "server did not come up"
                time.sleep(0.3)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        assert ask(client, "rocket.jpg", "What is this?").choices[0].message.content
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_remote_and_local_images_only_when_allowed(engine, tmp_path):
    import http.server
    import shutil

    served = tmp_path / "www"
    served.mkdir()
    shutil.copy(photo("rocket.jpg"), served / "rocket.jpg")
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(served), **k)  # noqa: E731
    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    remote_url = f"http://127.0.0.1:{web.server_address[1]}/rocket.jpg"
    live = LiveServer(engine, tmp_path / "states", allow_remote_images=True, allow_private_urls=True, allow_local_files=served)
    try:
        def with_url(url):
            return live.client.chat.completions.create(model="any", max_tokens=N, temperature=0, messages=[
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is this?"}]}])

        expected = ask(live.client, "rocket.jpg", "What is this?").choices[0].message.content
        assert with_url(remote_url).choices[0].message.content == expected
        local = with_url(str(served / "rocket.jpg"))
        assert local.choices[0].message.content == expected
        assert local.usage.prompt_tokens_details.cached_tokens > 0  # same bytes, same state, whatever the URL
        outside = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(photo("coffee.png"))}}]}]}
        assert "not a file under the allowed folder" in _error(live.post("/v1/chat/completions", json.dumps(outside).encode()), 400)
        escape = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "../../../../etc/passwd"}}]}]}
        assert "not a file under the allowed folder" in _error(live.post("/v1/chat/completions", json.dumps(escape).encode()), 400)
    finally:
        live.close()
        web.shutdown()


def test_multi_turn_requests_continue_from_the_earlier_turn(engine, server):
    from test_conversation import reference_conversation

    q1, q2, q3 = "What objects are visible in this image?", "What colors dominate the scene?", "Describe the mood."
    messages = image_messages("astronaut.png", q1)
    first = server.client.chat.completions.create(model="any", messages=messages, max_tokens=N, temperature=0)
    a1 = first.choices[0].message.content
    messages += [{"role": "assistant", "content": a1}, {"role": "user", "content": q2}]
    second = server.client.chat.completions.create(model="any", messages=messages, max_tokens=N, temperature=0)
    expected, prompt_len = reference_conversation(engine, photo("astronaut.png"), [(q1, a1)], q2, N)
    assert second.choices[0].message.content == engine.processor.tokenizer.decode(expected, skip_special_tokens=True)
    assert second.usage.prompt_tokens == prompt_len
    # Turn 1's prompt, image included, came from memory, and as much of its answer as re-tokenizes the same.
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens
    a2 = second.choices[0].message.content
    messages += [{"role": "assistant", "content": a2}, {"role": "user", "content": q3}]
    third = server.client.chat.completions.create(model="any", messages=messages, max_tokens=N, temperature=0)
    expected, _ = reference_conversation(engine, photo("astronaut.png"), [(q1, a1), (q2, a2)], q3, N)
    assert third.choices[0].message.content == engine.processor.tokenizer.decode(expected, skip_special_tokens=True)
    assert third.usage.prompt_tokens_details.cached_tokens >= second.usage.prompt_tokens
    # Another question on turn 1 still gets turn 1's reuse and its own, correct answer.
    other = image_messages("astronaut.png", "Is it day or night?")
    again = server.client.chat.completions.create(model="any", messages=other, max_tokens=N, temperature=0)
    expected = reference_tokens(engine, photo("astronaut.png"), SYSTEM, "Is it day or night?", N)
    assert again.choices[0].message.content == engine.processor.tokenizer.decode(expected, skip_special_tokens=True)


def test_single_questions_on_one_image_batch_together(server):
    for warm_up in ("Question number 3 or 4?", "Question?"):  # kept answers sharing more or fewer tokens
        ask(server.client, "rocket.jpg", warm_up)
    sizes = []
    scheduler = server.service.scheduler
    original = scheduler.stats.batch_size
    scheduler.stats.batch_size = lambda rows: (sizes.append(rows), original(rows))
    blocker = threading.Event()
    scheduler.call(blocker.wait)  # hold the model thread so that all eight requests queue up
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(ask, server.client, "rocket.jpg", f"Question number {i}?") for i in range(8)]
        deadline = time.time() + 30
        while scheduler._inbox.qsize() < 8 and time.time() < deadline:
            time.sleep(0.05)
        blocker.set()
        answers = [f.result() for f in futures]
    assert sizes[0] == 8  # one batch over the shared image state, although earlier answers were kept
    assert all(a.usage.prompt_tokens_details.cached_tokens > 0 for a in answers)
