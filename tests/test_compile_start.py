"""Issue 28 item 3 and issue 33 item 4: compiled decode steps whose shapes depend only on the batch size, all compiled
before `serve` listens and none at request time; `--compile auto`'s decision remembered on disk and reused."""

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from openai import OpenAI

from conftest import SYSTEM as _SYSTEM
from conftest import photo as _photo
from test_server import image_messages
from vlcache.decode import decision, probe

LONG = 700  # tokens of the long answer: its rows cross block-table sizes 256 and 512 (the old compiled shapes)
JOIN_AFTER = 300


def _health(url: str) -> dict:
    with urllib.request.urlopen(url + "/health", timeout=10) as response:
        return json.loads(response.read())


def test_a_long_answer_and_a_question_joining_it_compile_nothing_after_the_server_listens(tiny_model_dir, engine, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    environment.pop("VLCACHE_SERVER", None)
    log = open(tmp_path / "serve.log", "w+")
    server = subprocess.Popen([sys.executable, "-m", "vlcache", "serve", "--model", str(tiny_model_dir), "--compile", "on",
                               "--max-batch", "2", "--max-context", "1024", "--port", str(port), "--cache-dir",
                               str(tmp_path / "states"), "--no-web"], stderr=log, stdout=subprocess.DEVNULL, env=environment)
    try:
        deadline = time.time() + 600
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.time() < deadline, "the server did not start"
            try:
                started = _health(url)["decode"]
                break
            except OSError:
                time.sleep(0.5)
        lines = (tmp_path / "serve.log").read_text().splitlines()
        # Every batch size compiled before the server listened, with a progress line each.
        assert "decode steps: compiling the step for batch size 1 (1 of 2)..." in lines, lines
        assert any(line.startswith("decode steps: compiling the step for batch size 2 (2 of 2;") for line in lines), lines
        assert started["step"] == "compiled" and started["shapes"] == [[1, 1024], [2, 1024]], started
        assert started["graphs_compiled"] > 0

        client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
        never_end = {str(token): -100 for token in engine.eos_ids}  # the long answer runs to its max_tokens
        pieces, halfway = [], threading.Event()

        def long_answer():
            stream = client.chat.completions.create(model="m", messages=image_messages("astronaut.png", "Tell me everything."),
                                                    max_tokens=LONG, temperature=0, logit_bias=never_end, stream=True,
                                                    stream_options={"include_usage": True})
            for chunk in stream:
                if chunk.usage is not None:
                    pieces.append(chunk.usage.completion_tokens)
                elif len(pieces) < JOIN_AFTER:
                    pieces.append(0)
                    if len(pieces) >= JOIN_AFTER:
                        halfway.set()
            halfway.set()

        worker = threading.Thread(target=long_answer)
        worker.start()
        assert halfway.wait(300)
        question = image_messages("camera.png", "What is in this picture?")
        joined = client.chat.completions.create(model="m", messages=question, max_tokens=24, temperature=0)
        during = _health(url)["decode"]
        worker.join(300)
        assert pieces[-1] == LONG  # the long answer ran to its end, through block tables of 256, 512, 768 positions
        after = _health(url)["decode"]
        assert after["graphs_compiled"] == during["graphs_compiled"] == started["graphs_compiled"]
        assert after["shapes"] == started["shapes"]
        # ...and every step of them was a compiled one (none left to the eager path beyond the span).
        assert after["compiled_steps"] >= started["compiled_steps"] + LONG - 1 and after["eager_steps_beyond_span"] == 0
        # The joined question (bucket 2 beside the long answer) answers as it does alone (bucket 1).
        alone = client.chat.completions.create(model="m", messages=question, max_tokens=24, temperature=0)
        assert joined.choices[0].message.content == alone.choices[0].message.content
        assert _health(url)["decode"]["graphs_compiled"] == started["graphs_compiled"]
    finally:
        server.terminate()
        server.wait(60)
        log.close()


def test_auto_is_decided_once_then_remembered_and_a_corrupted_decision_is_decided_again(engine, tmp_path, monkeypatch,
                                                                                          caplog):
    monkeypatch.setenv("VLCACHE_HOME", str(tmp_path / "home"))
    try:
        with caplog.at_level("INFO", logger="vlcache"):
            measured = probe.MEASUREMENTS[0]
            first = engine.compile_steps("auto", buckets=[1, 2], backend="eager", max_context=512)
            assert probe.MEASUREMENTS[0] == measured + 1 and first["remembered"] is False
            path = decision.path_for(decision.key(engine, 512, ["eager"]))
            assert path.parent == tmp_path / "home" / "compile" / "decisions" and "decision_file" not in first
            saved = json.loads(path.read_text())
            assert saved["step"] == first["step"] and saved["reason"] == first["reason"]
            assert saved["key"]["model"] == engine.fingerprint and saved["key"]["span"] == 512
            assert set(saved["key"]) >= {"dtype", "machine", "torch", "threads", "decode_code"}
            assert "eager" in saved["measured"] and saved["measured"]["eager"]["eager_ms"] > 0

            # A second start: the same decision, nothing timed, one line that says so.
            second = engine.compile_steps("auto", buckets=[1, 2], backend="eager", max_context=512)
            assert probe.MEASUREMENTS[0] == measured + 1 and second["remembered"] is True
            assert second["step"] == first["step"] and second["reason"] == f"remembered: {first['reason']}"
            if first["step"] != "eager":
                assert engine.runner is not None and engine.runner.shapes == {(1, 512), (2, 512)}
            assert any("as decided on" in r.message for r in caplog.records)

            # Another span is another decision (its step costs differ); so is another transformers (new model code
            # the probe has not seen) or a changed family adapter.
            other = decision.key(engine, 1024, ["eager"])
            assert decision.read(other) is None and decision.path_for(other) != path
            import transformers

            with monkeypatch.context() as patched:
                patched.setattr(transformers, "__version__", "0.0.1")
                assert decision.path_for(decision.key(engine, 512, ["eager"])) != path
            with monkeypatch.context() as patched:
                patched.setattr(decision, "_decode_code", lambda: "another adapter")
                assert decision.path_for(decision.key(engine, 512, ["eager"])) != path

            # A corrupted file: one note, measured again, rewritten whole.
            for garbage in ("{not json", json.dumps({**saved, "step": "rm -rf"}), json.dumps([1, 2])):
                path.write_text(garbage)
                caplog.clear()
                again = engine.compile_steps("auto", buckets=[1], backend="eager", max_context=512)
                assert again["remembered"] is False and again["step"] in ("eager", "traced (eager backend)")
                assert any("ignoring the remembered compile decision" in r.message for r in caplog.records)
                assert json.loads(path.read_text())["key"] == saved["key"]
            assert probe.MEASUREMENTS[0] == measured + 4
    finally:
        engine.compile_steps("off")


def test_the_server_refuses_a_conversation_beyond_max_context(engine, tmp_path):
    from test_server import LiveServer

    engine.max_context = 300
    live = LiveServer(engine, tmp_path / "states")
    try:
        status, body = live.post("/v1/chat/completions", json.dumps({
            "model": "m", "messages": image_messages("camera.png", "What is this?"), "max_tokens": 500}).encode())
        assert status == 400 and "maximum context length is 300 tokens" in body["error"]["message"], body
        assert live.get("/health")[1]["context_length"] == 300
    finally:
        live.close()
        engine.max_context = None


@pytest.mark.parametrize("flags, message", [
    (["--max-context", "5000"], "error: --max-context 5,000 is beyond the model's context of 4,096 tokens\n"),
    (["--max-context", "4000", "--kv-memory", "64KiB"], None),
    (["--max-context", "1000", "--ray"], "error: --max-context is not supported with --ray (each replica takes the model's "
                                         "context)\n"),
])
def test_max_context_is_checked_at_start(tiny_model_dir, tmp_path, flags, message):
    from test_client import run

    done = run("serve", "--model", tiny_model_dir, "--compile", "off", "--port", "9", "--cache-dir", tmp_path, *flags)
    assert done.returncode == 1 and done.stdout == ""
    if message:
        assert done.stderr.splitlines()[-1] + "\n" == message
    else:
        assert done.stderr.splitlines()[-1].startswith("error: --max-context 4,000 needs more K/V than --kv-memory holds (")


@contextlib.contextmanager
def _deciding_server(engine, tmp_path):
    """A real server on 127.0.0.1 whose first `auto` start decides in the background (the traced eager step:
    cheap); yields its URL and service. Its decision is remembered under tmp_path/home."""
    import uvicorn

    from vlcache.serving.server import ServeOptions, compile_in_background, create_app, server_config

    services = []

    def on_start(service):
        services.append(service)
        return compile_in_background(service, [1, 2], backend="eager", max_context=1024)

    app = create_app(engine, ServeOptions(cache_dir=tmp_path / "states", memory_budget=2**30), on_start=on_start)
    server = uvicorn.Server(server_config(app, "127.0.0.1", 0, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    try:
        thread.start()
        while not server.started:
            time.sleep(0.02)
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}", services[0]
    finally:
        server.should_exit = True
        thread.join(30)
        engine.compile_steps("off")


def _decided(url: str, waiting: str = "deciding in the background") -> dict:
    deadline = time.time() + 300
    while (decode := _health(url)["decode"])["reason"].startswith(waiting):
        assert time.time() < deadline
        time.sleep(0.2)
    return decode


def test_a_first_start_serves_eager_steps_while_it_decides_then_switches(engine, tmp_path, monkeypatch, caplog):
    """Issue 33 item 4: the server answers while the step is decided and compiled aside (traced here: cheap); the
    compiled steps take over when ready, with one line, and answer as the eager ones did. Timed on an idle server
    (issue 28 review): no round discarded, and the decision is remembered."""
    from vlcache.decode.step import span_for

    monkeypatch.setenv("VLCACHE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(probe, "MARGIN", -10.0)  # keep the traced step whatever the timing says
    question = image_messages("camera.png", "What is in this picture?")
    expected = engine.ask(engine.cache_image(_photo("camera.png"), system_prompt=_SYSTEM), "What is in this picture?",
                          max_new_tokens=12, temperature=0).text
    gate = threading.Event()
    real = probe._compile

    def held(*args):  # the background compile waits until a question was answered eagerly
        assert gate.wait(120)
        return real(*args)

    monkeypatch.setattr(probe, "_compile", held)
    discarded = probe.DISCARDED[0]
    with caplog.at_level("INFO", logger="vlcache"), _deciding_server(engine, tmp_path) as (url, _):
        client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        decode = _health(url)["decode"]
        assert decode["step"] == "eager" and decode["reason"].startswith("deciding in the background")
        eager = client.chat.completions.create(model="m", messages=question, max_tokens=12, temperature=0)
        assert eager.choices[0].message.content == expected and engine.runner is None
        gate.set()
        deadline = time.time() + 300
        while _health(url)["decode"]["step"] == "eager":
            assert time.time() < deadline
            time.sleep(0.2)
        decode = _health(url)["decode"]
        assert decode["step"] == "traced (eager backend)" and decode["shapes"] == [[1, 1024], [2, 1024]]
        assert decode["reason"].startswith("exact on the probe; ") and " ms a step vs eager " in decode["reason"]
        assert decode["discarded_rounds"] == 0 and probe.DISCARDED[0] == discarded
        steps = engine.runner.steps
        compiled = client.chat.completions.create(model="m", messages=question, max_tokens=12, temperature=0)
        assert compiled.choices[0].message.content == expected and engine.runner.steps >= steps + 11
        assert sum("decode steps: switched to traced (eager backend) steps" in r.message for r in caplog.records) == 1
        saved = probe.remembered(engine, "eager", span_for(1024))
        assert saved["step"] == "traced (eager backend)" and saved["measured"]["eager"]["discarded_rounds"] == 0


@pytest.mark.parametrize("busy_rounds", [2, 3])
def test_timing_rounds_that_overlap_serving_work_are_discarded_and_never_remembered(engine, tmp_path, monkeypatch,
                                                                                     caplog, busy_rounds):
    """Issue 28 review: a real request answered during a background timing round discards that round. With 3
    rounds needed and at most 3 discarded: 2 busy rounds -> decided from 3 quiet ones and remembered (2 counted);
    3 busy rounds -> eager, no decision file, the reason in /health and one note on stderr."""
    from vlcache.decode.step import span_for

    monkeypatch.setenv("VLCACHE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(probe, "MARGIN", -10.0)
    monkeypatch.setattr(probe, "ROUNDS", 3)
    monkeypatch.setattr(probe, "MAX_DISCARDED", 3)
    question = image_messages("camera.png", "What is in this picture?")
    answers, calls, real = [], [0], probe.time_steps
    urls = []

    def busy(batch, steps):  # the first timing of each of the first rounds: a request the model thread answers
        if calls[0] % 2 == 0 and calls[0] < 2 * busy_rounds:
            client = OpenAI(base_url=urls[0] + "/v1", api_key="unused", max_retries=0, timeout=120)
            answer = client.chat.completions.create(model="m", messages=question, max_tokens=6, temperature=0)
            answers.append(answer.choices[0].message.content)
        calls[0] += 1
        return real(batch, steps)

    gate = threading.Event()
    real_compile = probe._compile
    monkeypatch.setattr(probe, "_compile", lambda *args: gate.wait(120) and real_compile(*args))
    monkeypatch.setattr(probe, "time_steps", busy)
    discarded = probe.DISCARDED[0]
    with caplog.at_level("INFO", logger="vlcache"), _deciding_server(engine, tmp_path) as (url, service):
        urls.append(url)
        gate.set()
        decode = _decided(url)
        path = decision.path_for(decision.key(engine, span_for(1024), ["eager"]))
        assert len(answers) == busy_rounds and len(set(answers)) == 1 and answers[0]  # served meanwhile, alike
        assert probe.DISCARDED[0] == discarded + busy_rounds
        notes = [r.message for r in caplog.records if r.levelname == "WARNING" and "stay eager" in r.message]
        if busy_rounds == 3:
            assert decode["step"] == "eager" and decode["decided"] is False and decode["discarded_rounds"] == 3
            assert "3 timing rounds overlapped serving work and were discarded (0 of 3 undisturbed)" in decode["reason"]
            assert decode["reason"].endswith("nothing remembered (the next start decides again)")
            assert not path.exists() and probe.remembered(engine, "eager", span_for(1024)) is None
            assert engine.runner is None and len(notes) == 1 and notes[0].startswith("note: decode steps stay eager:")
        else:
            assert decode["step"] == "traced (eager backend)" and decode["discarded_rounds"] == 2 and not notes
            assert json.loads(path.read_text())["measured"]["eager"]["discarded_rounds"] == 2
        assert service.scheduler.idle


def test_the_scheduler_is_not_idle_while_its_model_thread_starts_a_request(engine):
    """A background timing round counts when the scheduler was idle before and after it with its activity count
    unchanged. While the model thread starts a request (its state made on demand here, then its prefill), the
    request has left the queue and is not yet prefilling: the scheduler said idle then, and a one-token answer
    finished in that same unit of work left the count unchanged, so a round overlapping all of it counted as quiet."""
    from churn import job_for
    from vlcache.serving.scheduler import Scheduler

    scheduler = Scheduler(engine, max_batch=2, prefill_chunk=512)
    try:
        assert scheduler.idle
        job, events, finished = job_for(engine, None, "What is this?", 1, "")
        kv, making, made = job.kv, threading.Event(), threading.Event()

        def slow_kv():  # the model thread, between taking the request and prefilling it
            making.set()
            assert made.wait(30)
            return kv

        job.kv = slow_kv
        scheduler.submit(job)
        assert making.wait(30)
        before, idle = scheduler.activity, scheduler.idle  # what a timing round reads as it starts
        made.set()
        assert finished.wait(60) and events[-1][0] == "done" and len(events[-1][1].token_ids) == 1
        deadline = time.time() + 30
        while not scheduler.idle:
            assert time.time() < deadline
            time.sleep(0.01)
        assert not idle, "the scheduler said idle while its model thread made a request's state"
        assert not (idle and scheduler.activity == before)  # such a round would have counted as quiet
    finally:
        scheduler.stop()
