"""Issue 20: the findings of a second hostile review (uploads, video decoding, the thin client, storage), each
reproduced; the server keeps answering exactly after.

Finding 1's other half (a failing forward fails only the rows that caused it) is the scheduler's, tested
with it; finding 9 (`cache X --output X --server`) is the command line's.
"""

import argparse
import base64
import concurrent.futures
import dataclasses
import http.server
import io
import json
import logging
import os
import socket
import stat
import sys
import threading
import time
import urllib.request

import pytest
import torch

from conftest import SYSTEM, photo
from test_hardening import N, still_exact
from test_media import media_url, part
from test_server import LiveServer, image_messages
from vlcache import client as client_module
from vlcache import storage, video
from vlcache.errors import CacheFileError, ModelMismatchError, VlcacheError
from vlcache.serving import body as body_module
from vlcache.serving.store import StateStore
from vlcache.state import ImageState, load_state
from vlcache.testing import clips

STATES = "/v1/vlcache/states"


@pytest.fixture(scope="module")
def rocket_state(engine):
    return engine.cache_image(photo("rocket.jpg"), system_prompt=SYSTEM)


def forged(state: ImageState, layer=None, kinds=None, messages=None, created=None) -> ImageState:
    """The state with one layer's K/V replaced (`layer(k) -> k`), or other layer kinds, messages or creation time:
    the same fingerprint and layer count, so only the new checks can tell."""
    kv = list(state.kv)
    if layer is not None:
        k, v = kv[1]
        kv[1] = (layer(k), layer(v))
    meta = dataclasses.replace(state.metadata)
    if kinds is not None:
        meta.layer_kinds = kinds
    if messages is not None:
        meta.messages = messages
    if created is not None:
        meta.created = created
    return ImageState(kv=kv, input_ids=state.input_ids, attention_mask=state.attention_mask,
                      mm_token_type_ids=state.mm_token_type_ids, image_grid_thw=state.image_grid_thw,
                      rope_deltas=state.rope_deltas, metadata=meta)


def upload(live, data: bytes):
    request = urllib.request.Request(live.url + STATES, data=data, method="POST",
                                     headers={"Content-Type": "application/octet-stream"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


FORGERIES = {
    "head_dim": (lambda k: k[..., :8].contiguous(), None, "keys and values are [1, 2,"),
    "kv_heads": (lambda k: k[:, :1].contiguous(), None, "keys and values are [1, 1,"),
    "dtype": (lambda k: k.to(torch.float16), None, "mix dtypes"),
    "layer kind": (None, ["sliding_attention", "full_attention"], "layer kinds"),
}


# 1 and 3 --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", list(FORGERIES))
def test_1_a_forged_layer_is_refused_at_upload_and_load(engine, live, rocket_state, tmp_path, case):
    layer, kinds, reason = FORGERIES[case]
    if kinds is not None:
        kinds = kinds + ["full_attention"] * (len(rocket_state.kv) - len(kinds))
    path = forged(rocket_state, layer=layer, kinds=kinds).save(tmp_path / "forged.safetensors")
    status, reply = upload(live, path.read_bytes())
    assert status == 400 and reason in reply["error"]["message"], reply
    assert "model mismatch" in reply["error"]["message"] and str(tmp_path) not in reply["error"]["message"]
    with pytest.raises(ModelMismatchError, match="does not fit this model"):  # the CLI's load
        engine.load_state(path)
    # A forged file dropped into the server's folder is read no further than its header: a miss, not a crash.
    store = StateStore(tmp_path / "store", 2**30, engine.fingerprint, engine.device, layout=engine.layout())
    (tmp_path / "store" / "x.safetensors").write_bytes(path.read_bytes())
    with pytest.raises(CacheFileError, match="does not fit this model"):
        load_state(tmp_path / "store" / "x.safetensors", layout=engine.layout())
    assert store.get(store._key_of(tmp_path / "store" / "x.safetensors")) == (None, "miss")
    still_exact(engine, live)


def test_1_the_real_state_still_uploads_and_answers(engine, live, rocket_state, tmp_path):
    path = rocket_state.save(tmp_path / "real.safetensors")
    status, reply = upload(live, path.read_bytes())
    assert status == 200 and reply["tokens"] == rocket_state.num_tokens
    answer = client_module.Client(live.url).ask(reply["id"], [{"role": "user", "content": "What is this?"}], N, 0.0)
    assert answer.token_ids == engine.ask(rocket_state, "What is this?", max_new_tokens=N, temperature=0).token_ids


def _raw_upload(live, head: bytes, declared: int) -> socket.socket:
    """An upload that sends `head` of a body declared `declared` bytes long, and then nothing."""
    sock = socket.create_connection(("127.0.0.1", live.port), timeout=10)
    sock.sendall(f"POST {STATES} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\n"
                 f"Content-Length: {declared}\r\n\r\n".encode() + head)
    return sock


def _status(sock: socket.socket) -> int:
    reply = sock.recv(65536).decode(errors="replace")
    sock.close()
    return int(reply.split()[1])


def test_3_an_upload_is_judged_by_its_header_before_its_tensors_arrive(engine, live, other_model_dir, tmp_path):
    from vlcache.engine import Engine

    other = Engine.load(str(other_model_dir), device="cpu", dtype="float32")
    data = other.cache_image(photo("rocket.jpg"), system_prompt=SYSTEM).save(tmp_path / "other.pt").read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    # Only the header is sent of a body declared as large as allowed: the 400 comes back while the rest never arrives.
    limit = live.service.options.max_state_bytes
    sock = _raw_upload(live, data[:header_end], limit)
    assert _status(sock) == 400
    # A declared length over the limit is refused before any of the body is read.
    sock = _raw_upload(live, b"", limit + 1)
    assert _status(sock) == 413
    # The default limit is the model's K/V (float32) at its context length, and a little more: not 16 GiB.
    cfg = engine.model.config.get_text_config()
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4 * cfg.max_position_embeddings
    assert kv < limit < kv + 32 * 2**20
    assert live.service.store.upload_quota == 4 * limit


def _long_state(state: ImageState, n: int) -> ImageState:
    """A valid state of n tokens for the same model (random K/V): an upload as large as the model allows."""
    big = forged(state)
    big.kv = [(torch.randn(1, k.shape[1], n, k.shape[3]), torch.randn(1, v.shape[1], n, v.shape[3])) for k, v in big.kv]
    big.input_ids, big.attention_mask = torch.zeros(1, n, dtype=torch.long), torch.ones(1, n, dtype=torch.long)
    big.mm_token_type_ids = torch.zeros(1, n, dtype=torch.long)
    big.metadata.prefix_tokens = n
    return big


def _upload_peak(live, data: bytes) -> int:
    import tracemalloc

    tracemalloc.start()
    try:
        status, reply = upload(live, data)
        return tracemalloc.get_traced_memory()[1] if status == 200 else -1
    finally:
        tracemalloc.stop()


def test_3_an_upload_is_streamed_to_disk_not_held_in_memory(engine, live, rocket_state, tmp_path):
    # 4000: near the 4096-token context. Each size twice (other bytes each time), the lower peak kept: tracemalloc
    # counts every thread of the process, and a full test run leaves other tests' threads allocating.
    uploads = {n: [_long_state(rocket_state, n).to_bytes() for _ in range(2)] for n in (500, 4000)}
    small, big = uploads[500][0], uploads[4000][0]
    peaks = [min(_upload_peak(live, data) for data in uploads[n]) for n in (500, 4000)]
    # What the server holds grows slower than the file: no whole copy of it (reading it whole, as loading did, adds
    # at least the file's size; the old upload path added twice). Alone this stays under 0.5x; in a full run,
    # with the module's earlier uploads behind it, about 0.53x: the bound sits between that and a copy.
    assert 0 < peaks[0] and peaks[1] - peaks[0] < 0.75 * (len(big) - len(small)), (peaks, len(small), len(big))
    status, reply = upload(live, _long_state(rocket_state, 4096).to_bytes())  # no room left for an answer
    assert status == 400 and "context" in reply["error"]["message"], reply


# 2 and 4: video decoding -----------------------------------------------------------------------------------------

def _video_chat(live, path_or_url):
    url = path_or_url if isinstance(path_or_url, str) else media_url(path_or_url)
    body = {"max_tokens": 2, "messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                                                         {"type": "text", "text": "What happens?"}]}]}
    return live.post("/v1/chat/completions", json.dumps(body).encode())


def test_2_video_decoding_is_bounded_and_failures_are_remembered(engine, tmp_path, monkeypatch):
    clip = clips.make_clip(tmp_path / "long.mp4", seconds=6, fps=8, size=(96, 64))  # 48 frames
    decodes = []
    real = video.decode
    monkeypatch.setattr(video, "decode", lambda *a, **k: (decodes.append(1), real(*a, **k))[1])
    live = LiveServer(engine, tmp_path / "states", video_decode_pixels=10 * 96 * 64)  # ten frames' worth
    try:
        started = time.perf_counter()
        status, reply = _video_chat(live, clip)
        assert status == 400 and "too much decoding" in reply["error"]["message"], reply
        status, again = _video_chat(live, clip)  # remembered: refused without decoding again
        assert status == 400 and again["error"]["message"] == reply["error"]["message"]
        assert len(decodes) == 1 and time.perf_counter() - started < 30
        short = clips.make_clip(tmp_path / "short.mp4", seconds=1, fps=8, size=(96, 64))  # 8 frames: within it
        status, reply = _video_chat(live, short)
        assert status == 200, reply
        still_exact(engine, live)
    finally:
        live.close()


def test_2_a_client_that_hangs_up_stops_the_decoding(engine, tmp_path, monkeypatch):
    clip = clips.make_clip(tmp_path / "slow.mp4", seconds=5, fps=8, size=(96, 64))  # 40 frames
    spent = []
    real = video.DecodeBudget.spend

    def slow(self, pixels, name):
        spent.append(1)
        time.sleep(0.1)  # 4 s for the whole clip
        return real(self, pixels, name)

    monkeypatch.setattr(video.DecodeBudget, "spend", slow)
    live = LiveServer(engine, tmp_path / "states")
    try:
        body = json.dumps({"max_tokens": 2, "messages": [{"role": "user", "content": [part(clip)]}]}).encode()
        request = urllib.request.Request(live.url + "/v1/chat/completions", data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(OSError):  # the client gives up after 0.6 s
            urllib.request.urlopen(request, timeout=0.6)
        time.sleep(1.0)
        stopped_at = len(spent)
        time.sleep(1.0)
        assert 0 < stopped_at < 40 and len(spent) == stopped_at  # stopped, and early
        # Stopping is not a failure of the bytes: the next client gets its answer.
        status, reply = _video_chat(live, clip)
        assert status == 200, reply
    finally:
        live.close()


def _keyframed_clip(frames: int, gop: int, width: int = 96, height: int = 64) -> bytes:
    import av
    import numpy as np

    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=8, options={"x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            rgb = np.zeros((height, width, 3), np.uint8)
            rgb[:, (i * 3) % width], rgb[..., 1] = 255, i % 255  # every frame differs
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def test_2_a_long_clip_over_the_budget_is_decoded_by_seeking_to_the_same_frames():
    data = _keyframed_clip(400, gop=8)  # 50 s at 8 fps, a keyframe every second
    info = video.probe(data, "long", 10**8)
    indices = list(range(0, 400, 37))
    everything = video.decode(data, "long", info, indices, None)  # no budget: every frame up to the last
    with video.limited(video.DecodeBudget(60 * 96 * 64)) as budget:  # 60 frames' worth, of the 397 needed
        sought = video.decode(data, "long", info, indices, None)
    assert budget.used <= 60 * 96 * 64 and numpy_equal(sought, everything)
    with video.limited(video.DecodeBudget(60 * 96 * 64)), pytest.raises(VlcacheError, match="too much decoding"):
        one_keyframe = _keyframed_clip(400, gop=1000)  # the attack's shape: nothing to seek to
        video.decode(one_keyframe, "flat", video.probe(one_keyframe, "flat", 10**8), indices, None)


def numpy_equal(a, b) -> bool:
    import numpy as np

    return a.shape == b.shape and bool(np.array_equal(a, b))


def test_2_busy_media_threads_do_not_hold_up_text_only_chats(engine, tmp_path, monkeypatch):
    clip = clips.make_clip(tmp_path / "busy.mp4", seconds=5, fps=8, size=(96, 64))
    real = video.DecodeBudget.spend
    monkeypatch.setattr(video.DecodeBudget, "spend", lambda self, *a: (time.sleep(0.1), real(self, *a))[1])
    live = LiveServer(engine, tmp_path / "states", media_workers=1)
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            busy = pool.submit(_video_chat, live, clip)  # about 4 s of decoding on the only media thread
            time.sleep(0.5)
            started = time.perf_counter()
            reply = live.client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}],
                                                        max_tokens=2, temperature=0)
            waited = time.perf_counter() - started
            assert not busy.done() and reply.choices[0].finish_reason and waited < 2.0, waited
            assert busy.result()[0] == 200
    finally:
        live.close()


def _h264(width: int, height: int, frames: int) -> bytes:
    import av
    import numpy as np

    buffer = io.BytesIO()
    with av.open(buffer, "w", format="h264") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            rgb = np.full((height, width, 3), (i * 40) % 255, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def test_4_a_stream_that_grows_its_frames_midway_is_refused(engine, tmp_path):
    data = _h264(64, 64, 8) + _h264(1024, 1024, 4)  # the probe sees 64x64; then the SPS says 1024x1024
    live = LiveServer(engine, tmp_path / "states", max_image_pixels=500_000)
    try:
        status, reply = _video_chat(live, "data:video/h264;base64," + base64.b64encode(data).decode())
        assert status == 400 and "500,000-pixel" in reply["error"]["message"], reply
        still_exact(engine, live)
    finally:
        live.close()
    with pytest.raises(VlcacheError, match="500,000"):  # the same check without a server
        info = video.probe(data, "grows", 500_000)
        video.decode(data, "grows", info, list(range(info.total_frames)), None, 500_000)


# 5, 12, 17: storage ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("folder", ["/proc/self/vlcache-states", "http://127.0.0.1:9/states", "nosuchscheme://x/y"])
def test_17_a_cache_dir_that_cannot_be_written_is_refused_at_start(engine, folder):
    with pytest.raises(CacheFileError, match="cache folder"):
        StateStore(folder, 2**30, engine.fingerprint, engine.device)


def test_17_serve_says_so_in_one_line(tiny_model_dir):
    from test_cli import run

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = run("serve", "--model", tiny_model_dir, "--port", port, "--cache-dir", "/proc/self/vlcache-states")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and "cache folder" in result.stderr


def test_5_a_full_disk_is_logged_counted_and_served_from_memory(engine, live, monkeypatch, tmp_path, rocket_state):
    from safetensors import SafetensorError

    def full(self, path):
        raise SafetensorError("Error while serializing: IoError(No space left on device)")

    upload_bytes = rocket_state.save(tmp_path / "r.pt").read_bytes()
    monkeypatch.setattr(ImageState, "save", full)
    reply = live.client.chat.completions.create(model="m", messages=image_messages("coffee.png", "What is this?"),
                                                max_tokens=N, temperature=0)
    assert reply.choices[0].message.content
    assert live.service.store.write_errors == 1
    metrics = urllib.request.urlopen(live.url + "/metrics").read().decode()
    assert "vlcache_state_write_errors 1.0" in metrics
    # The state has no file, yet `cache --server` can fetch it: sent from memory, a whole cache file.
    made = client_module.Client(live.url).cache([str(photo("coffee.png"))], SYSTEM)
    saved = client_module.Client(live.url).download(made["id"], tmp_path / "coffee.pt")
    assert load_state(saved).num_tokens == made["tokens"]
    # An upload that cannot be stored is a 507 that names no path.
    monkeypatch.setattr(StateStore, "add_upload", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    status, body = upload(live, upload_bytes)
    assert status == 507 and str(live.service.store.folder) not in body["error"]["message"]


# 6 and 10: uploads kept within bounds ----------------------------------------------------------------------------

def test_6_uploads_are_capped_in_number_rate_and_bytes(engine, rocket_state, tmp_path, monkeypatch, caplog):
    files = [forged(rocket_state, created=f"2026-01-0{i + 1}").save(tmp_path / f"u{i}.pt").read_bytes() for i in range(3)]
    monkeypatch.setattr(body_module, "UPLOAD_GRACE_SECONDS", 0.5)
    live = LiveServer(engine, tmp_path / "states", max_uploads=1, upload_quota=int(len(files[0]) * 2.5))
    try:
        slow = _raw_upload(live, files[0][:100], len(files[0]))  # holds the one upload slot, and sends nothing more
        time.sleep(0.2)
        assert upload(live, files[1])[0] == 429  # the slot is taken
        assert _status(slow) == 408  # under the minimum rate after the grace period
        ids = [upload(live, data)[1]["id"] for data in files]  # one at a time: all accepted
        kept = sorted(p.stem for p in (tmp_path / "states" / "uploads").glob("*.safetensors"))
        assert kept == sorted(ids[1:])  # the quota holds two: the least recently used went
        # A client that disconnects mid-upload is one log line, not a traceback; its temporary file is gone.
        caplog.set_level(logging.INFO, logger="vlcache")
        cut = _raw_upload(live, files[0][:len(files[0]) // 2], len(files[0]))
        cut.close()
        deadline = time.time() + 10
        while not any("cut off" in r.getMessage() for r in caplog.records) and time.time() < deadline:
            time.sleep(0.05)
        assert [r.getMessage() for r in caplog.records if "cut off" in r.getMessage()] == \
            ["an upload was cut off: the client disconnected"]
        assert not any(r.exc_info for r in caplog.records)
        assert not list((tmp_path / "states").glob(".upload-*.tmp"))
        status, _ = live.get("/health")
        assert status == 200
    finally:
        live.close()


def test_10_stale_upload_files_are_removed_at_start(engine, tmp_path):
    folder = tmp_path / "states"
    folder.mkdir()
    stale, fresh = folder / ".upload-old.tmp", folder / ".upload-new.tmp"
    stale.write_bytes(b"x" * 1000)
    fresh.write_bytes(b"y")
    os.utime(stale, (time.time() - 3 * 3600, time.time() - 3 * 3600))
    StateStore(folder, 2**30, engine.fingerprint, engine.device)
    assert not stale.exists() and fresh.exists()  # a fresh one may be another server's upload under way


# 7: admission for the state endpoints ------------------------------------------------------------------------------

def test_7_cache_and_image_endpoints_are_admitted_like_chats(engine, tmp_path, monkeypatch):
    live = LiveServer(engine, tmp_path / "states", max_batch=1, max_queue=0)
    real = live.service.engine.prepare_media
    monkeypatch.setattr(live.service.engine, "prepare_media", lambda *a: (time.sleep(0.5), real(*a))[1])
    names = ["rocket.jpg", "coffee.png", "chelsea.png", "camera.png"]
    try:
        def cache(i):
            data = base64.b64encode(photo(names[i % 4]).read_bytes()).decode()
            if i % 2:
                return live.post("/v1/images", json.dumps({"image": data, "system_prompt": f"s{i}"}).encode())[0]
            return live.post("/v1/vlcache/cache", json.dumps({"parts": [{"type": "image", "data": data}],
                                                              "system_prompt": f"s{i}"}).encode())[0]

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(cache, range(8)))
        assert codes.count(429) >= 1 and set(codes) <= {200, 429}, codes
        assert live.service.in_flight == 0  # every slot given back
    finally:
        live.close()


# 8, 13, 18: the thin client against a hostile server ------------------------------------------------------------

class Hostile(http.server.BaseHTTPRequestHandler):
    """Answers by the path: what each test wants the client to meet."""
    replies: dict = {}

    def do_GET(self):
        self._reply()

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._reply()

    def _reply(self):
        length, body = self.replies[self.path.split("?")[0]]
        self.send_response(200)
        if length is not None:  # None: the body ends when the connection does
            self.send_header("Content-Length", str(length))
        self.end_headers()
        try:
            if callable(body):
                body(self.wfile)
            else:
                self.wfile.write(body)
        except OSError:
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def hostile():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hostile)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", Hostile.replies
    server.shutdown()


def _health(fingerprint="f" * 64):
    body = json.dumps({"status": "ok", "model": "m", "fingerprint": fingerprint}).encode()
    return len(body), body


def _endless(out):
    while True:
        out.write(b"x" * 65536)


def test_8_a_download_is_saved_only_whole_and_of_the_servers_model(engine, hostile, rocket_state, tmp_path, monkeypatch):
    url, replies = hostile
    good = rocket_state.save(tmp_path / "good.pt")
    output = tmp_path / "out.pt"
    output.write_bytes(good.read_bytes())
    replies["/health"] = _health(engine.fingerprint)
    key = "a" * 64
    path = f"/v1/vlcache/states/{key}"
    cases = {
        "cut short": ((100_000, good.read_bytes()[:5000]), "sent 5,000 of the 100,000 bytes"),
        "junk": ((310, b"j" * 310), "broken state file"),
        "endless": ((None, _endless), "over 1,000,000 bytes"),
        "other model": (None, "other model weights"),
    }
    monkeypatch.setattr(client_module, "MAX_STATE_BYTES", 1_000_000)
    for case, (reply, reason) in cases.items():
        if case == "other model":
            replies["/health"] = _health("0" * 64)
            reply = (len(good.read_bytes()), good.read_bytes())
        replies[path] = reply
        with pytest.raises(client_module.ServerError, match=reason):
            client_module.Client(url, timeout=20).download(key, output)
        assert output.read_bytes() == good.read_bytes(), case  # the good file is untouched
        assert not list(tmp_path.glob(".out.pt.*.tmp")), case  # and no temporary file is left


def test_8_and_18_replies_too_large_endless_or_malformed_are_one_line_errors(hostile, monkeypatch):
    url, replies = hostile
    monkeypatch.setattr(client_module, "MAX_JSON_BYTES", 100_000)
    replies["/health"] = (None, _endless)
    with pytest.raises(client_module.ServerError, match="over 100,000 bytes"):
        client_module.Client(url).health()
    replies["/health"] = _health()
    replies["/v1/vlcache/ask"] = (None, lambda out: [out.write(b'data: {"text": "x"}\n\n') for _ in iter(int, 1)])
    with pytest.raises(client_module.ServerError, match="over 100,000 bytes"):
        list(client_module.Client(url).stream(None, [{"role": "user", "content": "Hi"}], 4))
    for body, reason in ((b'{"answer": {"text": 5}}', "malformed reply"), (b'{"nothing": 1}', "no 'answer'"),
                         (b"[1, 2]", "not an object"), (b"{not json", "not JSON")):
        replies["/v1/vlcache/ask"] = (len(body), body)
        with pytest.raises(client_module.ServerError, match=reason):
            client_module.Client(url).ask(None, [{"role": "user", "content": "Hi"}], 4)
    body = b'data: {"text": ["a"]}\n\n'
    replies["/v1/vlcache/ask"] = (len(body), body)
    with pytest.raises(client_module.ServerError, match="malformed reply"):
        list(client_module.Client(url).stream(None, [{"role": "user", "content": "Hi"}], 4))
    replies["/v1/vlcache/cache"] = (2, b"{}")
    with pytest.raises(client_module.ServerError, match="'id' is not a str"):
        client_module.Client(url).cache([str(photo("rocket.jpg"))], None)


def test_13_downloads_and_url_writes_follow_the_umask(engine, live, tmp_path):
    old = os.umask(0o022)
    try:
        made = client_module.Client(live.url).cache([str(photo("rocket.jpg"))], SYSTEM)
        saved = client_module.Client(live.url).download(made["id"], tmp_path / "d.pt")
        storage.write_atomic(f"file://{tmp_path}/w.bin", b"data")
    finally:
        os.umask(old)
    assert stat.S_IMODE(saved.stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "w.bin").stat().st_mode) == 0o644


# 11: uploaded conversations --------------------------------------------------------------------------------------

@pytest.mark.parametrize("messages", [[], [1, 2, 3], [{"role": "user", "content": "no image"}],
                                      [{"role": "tool", "content": [{"type": "image"}]}],
                                      [{"role": "user", "content": [{"type": "image"}, {"type": "text"}]}]])
def test_11_uploads_with_odd_messages_are_400s(live, rocket_state, tmp_path, messages):
    path = forged(rocket_state, messages=messages).save(tmp_path / "odd.pt")
    status, reply = upload(live, path.read_bytes())
    assert status == 400 and "bad messages" in reply["error"]["message"], reply


# 14: reruns of videos ----------------------------------------------------------------------------------------------

def test_14_a_video_is_up_to_date_on_a_rerun(engine, tmp_path):
    (tmp_path / "in").mkdir()
    clip = clips.make_clip(tmp_path / "in" / "clip.mp4", seconds=1, fps=4, size=(96, 64))
    first = engine.cache_images([str(clip)], tmp_path / "out", system_prompt=SYSTEM)
    second = engine.cache_images([str(clip)], tmp_path / "out", system_prompt=SYSTEM)
    assert [r.status for r in first] == ["cached"] and [r.status for r in second] == ["skipped"]


# 15: identical conversations kept once -------------------------------------------------------------------------------

def test_15_identical_multi_turn_chats_are_kept_once(engine, live):
    messages = image_messages("rocket.jpg", "What is this?") + [
        {"role": "assistant", "content": "A rocket."}, {"role": "user", "content": "And its colour?"}]
    sizes = []
    for _ in range(6):
        live.client.chat.completions.create(model="m", messages=messages, max_tokens=4, temperature=0)
        time.sleep(0.3)  # the finished row is kept on the model thread, just after its last event
        sizes.append(live.service.store.hot_bytes)
    assert sizes[1:] == [sizes[1]] * 5, sizes  # flat after the first
    assert max(len(keys) for keys in live.service.store._continuations.values()) == 1


# 16: `vlcache stop` tells the truth ----------------------------------------------------------------------------------

def test_16_stop_does_not_claim_a_server_that_is_still_running_stopped(tmp_path, monkeypatch):
    import subprocess

    from vlcache import paths, remote

    monkeypatch.setenv("VLCACHE_HOME", str(tmp_path))
    stubborn = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, "
                                 "signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"], stdout=subprocess.PIPE)
    try:
        stubborn.stdout.readline()
        paths.run_file().parent.mkdir(parents=True, exist_ok=True)
        paths.run_file().write_text(json.dumps({"pid": stubborn.pid, "url": "http://127.0.0.1:1"}))
        monkeypatch.setattr(remote, "STOP_WAIT_SECONDS", 0.5)
        with pytest.raises(VlcacheError, match="still finishing"):
            remote.stop(argparse.Namespace(server=None, json=False))
        assert paths.run_file().exists()  # still recorded: `vlcache stop` again finds it
    finally:
        stubborn.kill()
        stubborn.wait()


# Also: a missing optional dependency names its extra -----------------------------------------------------------

def test_cache_on_ray_without_pandas_names_the_extra(monkeypatch, tmp_path):
    from vlcache.scale import ray_cache

    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(VlcacheError, match=r"pandas is missing\): pip install 'vlcache\[ray\]'"):
        ray_cache.cache_on_ray([str(photo("rocket.jpg"))], str(tmp_path / "out"), "m")
