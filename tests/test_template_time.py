"""Chat templates that stamp the time (transformers' strftime_now, as Llama 3.x's "Today Date"): a state pins the
instant it was made, every later question is rendered at it, files record it, the server finds states by the
text their template renders. The clock is patched (one clock for vlcache and transformers' templates), never slept."""

from datetime import datetime

import pytest
import torch

from conftest import SYSTEM, photo
from reference import reference_for_messages, reference_tokens
from vlcache import Engine, cli, prompt
from vlcache.header import metadata_key
from vlcache.media import MediaOptions
from vlcache.testing import CHAT_TEMPLATE

N = 12
QUESTION = "What objects are visible in this image?"
# The tiny Qwen3-VL template with the minute stamped into the system turn and into the generation prompt (so a
# question rendered at another minute than its state feeds other ids).
MINUTE_TEMPLATE = CHAT_TEMPLATE.replace(
    "{{ '<|im_start|>' + message['role'] + '\\n' }}",
    "{{ '<|im_start|>' + message['role'] + '\\n' }}{%- if message['role'] == 'system' -%}"
    "{{ strftime_now('%d %b %Y %H:%M') + '\\n' }}{%- endif -%}",
).replace("{{ '<|im_start|>assistant\\n' }}", "{{ '<|im_start|>assistant ' + strftime_now('%H:%M') + '\\n' }}")
BEFORE, AFTER = datetime(2026, 3, 4, 12, 34, 50), datetime(2026, 3, 4, 12, 35, 10)  # across a minute boundary


class Clock(datetime):
    """datetime whose now() is what the test sets (naive local time, as transformers' strftime_now reads it)."""

    current = BEFORE

    @classmethod
    def now(cls, tz=None):
        return cls.current if tz is None else cls.current.astimezone(tz)


@pytest.fixture()
def clock(monkeypatch):
    import transformers.utils.chat_template_utils as template_utils

    monkeypatch.setattr(prompt, "datetime", Clock)
    monkeypatch.setattr(template_utils, "datetime", Clock)
    Clock.current = BEFORE
    return Clock


@pytest.fixture(scope="module")
def minute_engine(tiny_model_dir):
    engine = Engine.load(str(tiny_model_dir), device="cpu")
    engine.processor.chat_template = MINUTE_TEMPLATE
    return engine


def _fed_and_expected(engine, state, question):
    """(ids vlcache feeds for `question` about `state`, the processor's ids generate() gets at the clock's now)."""
    from reference import _inputs

    fed = torch.cat([state.input_ids, engine.question_ids(state.metadata.messages, question, state.metadata.template_time)], 1)
    inputs = _inputs(engine, prompt.conversation(SYSTEM, question, with_image=True), photo("chelsea.png"), None)
    return fed[0].tolist(), inputs["input_ids"][0].tolist()


def test_a_minute_stamping_template_is_detected_by_rendering_at_two_instants():
    messages = prompt.conversation(SYSTEM, QUESTION, with_image=True)

    class Template:  # what render reads of a processor
        chat_template = MINUTE_TEMPLATE

        def apply_chat_template(self, messages, **kwargs):
            from transformers.utils.chat_template_utils import render_jinja_template

            kwargs.pop("tokenize")
            return render_jinja_template(conversations=[messages], chat_template=self.chat_template, **kwargs)[0][0]

    stamped = Template()
    one, two = (prompt.render(stamped, messages, True, at=t.isoformat()) for t in (BEFORE, AFTER))
    assert "04 Mar 2026 12:34\n" in one and "assistant 12:34\n" in one and "assistant 12:35\n" in two
    assert prompt.stamps_time(MINUTE_TEMPLATE)
    plain = Template()
    plain.chat_template = CHAT_TEMPLATE
    assert prompt.render(plain, messages, True, at=BEFORE.isoformat()) == prompt.render(plain, messages, True, at=AFTER.isoformat())
    assert not prompt.stamps_time(CHAT_TEMPLATE)
    # Llama 3.x's way: a date string from the clock only where none is given.
    assert prompt.stamps_time("{%- if not date_string is defined %}{%- set date_string = strftime_now('%d %b %Y') %}{% endif %}")


def test_a_state_made_at_one_minute_answers_at_the_next_as_generate_at_its_pinned_instant(minute_engine, clock, tmp_path, capsys):
    engine = minute_engine
    state = engine.cache_image(photo("chelsea.png"), system_prompt=SYSTEM)
    pinned = state.metadata.template_time
    assert datetime.fromisoformat(pinned).replace(tzinfo=None) == BEFORE
    expected = reference_tokens(engine, photo("chelsea.png"), SYSTEM, QUESTION, N)  # generate() rendered at 12:34
    fed, wanted = _fed_and_expected(engine, state, QUESTION)
    assert fed == wanted
    clock.current = AFTER
    _, at_next_minute = _fed_and_expected(engine, state, QUESTION)
    assert at_next_minute != wanted  # the boundary matters: generate() at 12:35 gets another prompt
    assert engine.ask(state, QUESTION, max_new_tokens=N, temperature=0).token_ids == expected
    assert len(set(expected)) >= 4
    # A batch, and a second turn, both rendered at the pinned instant.
    from vlcache.conversation import Conversation

    batch = engine.ask_many(state, [QUESTION, "Describe the lighting and mood."], max_new_tokens=N, temperature=0)
    assert batch[0].token_ids == expected
    chat = Conversation(engine, state)
    first = chat.ask(QUESTION, max_new_tokens=N, temperature=0)
    second = chat.ask("What colors dominate the scene?", max_new_tokens=N, temperature=0)
    messages = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
                {"role": "assistant", "content": first.text},
                {"role": "user", "content": [{"type": "text", "text": "What colors dominate the scene?"}]}]
    clock.current = BEFORE
    assert second.token_ids == reference_for_messages(engine, messages, photo("chelsea.png"), N)
    # The file keeps the instant (inspect shows it); loaded the next day, the state still answers as at 12:34.
    path = state.save(tmp_path / "stamped.safetensors")
    assert cli.main(["inspect", str(path)]) == 0
    assert f"template time: {pinned} (the chat template stamps the time" in capsys.readouterr().out
    clock.current = datetime(2026, 3, 5, 9, 0, 0)
    loaded = engine.load_state(path)
    assert loaded.metadata.template_time == pinned
    assert engine.ask(loaded, QUESTION, max_new_tokens=N, temperature=0).token_ids == expected


def test_control_a_state_without_a_pinned_instant_differs_at_the_next_minute(minute_engine, clock, monkeypatch):
    engine = minute_engine
    expected = reference_tokens(engine, photo("chelsea.png"), SYSTEM, QUESTION, N)
    monkeypatch.setattr(type(engine), "pin_time", lambda self: None)
    state = engine.cache_image(photo("chelsea.png"), system_prompt=SYSTEM)
    assert state.metadata.template_time is None
    _, wanted = _fed_and_expected(engine, state, QUESTION)
    clock.current = AFTER
    fed, _ = _fed_and_expected(engine, state, QUESTION)
    assert fed != wanted
    assert engine.ask(state, QUESTION, max_new_tokens=N, temperature=0).token_ids != expected


def test_states_are_keyed_by_the_text_their_template_renders(minute_engine, engine, clock, tmp_path):
    """The server's key of a stamped state is its key while the minute lasts, and another one after it; the file
    a store wrote is found again by its metadata under that key. A template without a clock keys as before."""
    from vlcache.header import media_identity, state_key
    from vlcache.serving.store import StateStore

    stamped = minute_engine
    state = stamped.cache_image(photo("chelsea.png"), system_prompt=SYSTEM)
    messages, parts = state.metadata.messages, [("image", state.metadata.image_sha256)]
    key = stamped.state_key(parts, messages, MediaOptions())
    assert key == metadata_key(state.metadata)
    store = StateStore(tmp_path / "store", 1 << 30, stamped.fingerprint, "cpu")
    store.put(key, state)
    assert StateStore(tmp_path / "store", 1 << 30, stamped.fingerprint, "cpu").get(key)[1] == "disk"
    clock.current = AFTER
    assert stamped.state_key(parts, messages, MediaOptions()) != key
    plain = engine.cache_image(photo("chelsea.png"), system_prompt=SYSTEM)
    assert plain.metadata.template_time is None and plain.metadata.template_sha256 is None
    assert engine.state_key(parts, messages, MediaOptions()) == state_key(
        engine.fingerprint, media_identity(parts), messages, engine.media_settings(MediaOptions(), ["image"]))


def test_the_server_keys_a_stamped_state_by_its_rendered_prefix(minute_engine, clock, tmp_path, monkeypatch):
    """Through the server and the openai client: within the minute the state is reused; at the next minute the
    same messages render another prefix, so a new state is made and the answer is generate()'s at 12:35.
    Control: keyed by the messages alone, the 12:34 state is reused at 12:35 and the answer is not generate()'s."""
    from test_server import LiveServer, ask

    import vlcache.header

    decode = minute_engine.processor.tokenizer.decode

    def expected():
        return decode(reference_tokens(minute_engine, photo("chelsea.png"), SYSTEM, QUESTION, N), skip_special_tokens=True)

    at_before = expected()
    clock.current = AFTER
    at_after = expected()
    assert at_before != at_after
    clock.current = BEFORE
    live = LiveServer(minute_engine, tmp_path / "keyed")
    try:
        first = ask(live.client, "chelsea.png", QUESTION)
        again = ask(live.client, "chelsea.png", QUESTION)
        clock.current = AFTER
        next_minute = ask(live.client, "chelsea.png", QUESTION)
    finally:
        live.close()
    assert [r.choices[0].message.content for r in (first, again, next_minute)] == [at_before, at_before, at_after]
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert again.usage.prompt_tokens_details.cached_tokens > 0
    assert next_minute.usage.prompt_tokens_details.cached_tokens == 0  # a new state: the prefix rendered at 12:35

    keyed_by_messages = vlcache.header.state_key
    monkeypatch.setattr(vlcache.header, "state_key", lambda fingerprint, media, messages, settings, salt=None, rendered=None:
                        keyed_by_messages(fingerprint, media, messages, settings, salt))
    clock.current = BEFORE
    live = LiveServer(minute_engine, tmp_path / "control")
    try:
        ask(live.client, "chelsea.png", QUESTION)
        clock.current = AFTER
        stale = ask(live.client, "chelsea.png", QUESTION)
    finally:
        live.close()
    assert stale.usage.prompt_tokens_details.cached_tokens > 0
    assert stale.choices[0].message.content == at_before != at_after


def test_the_check_across_a_minute_boundary_holds_with_the_pin_and_fails_on_prompt_ids_without(
        tiny_model_dir, clock, tmp_path, monkeypatch, capsys):
    """`vlcache check` on a minute-stamping template whose state is made at 12:34:50 and asked at 12:35:10: every
    probe holds (the questions and generate()'s prompt rendered at the pinned instant). Control: without the pin
    the state's prefix says 12:34, the questions and generate() 12:35, and the check fails on the prompt ids."""
    import shutil

    monkeypatch.setenv("VLCACHE_HOME", str(tmp_path / "home"))
    model = tmp_path / "stamped"
    shutil.copytree(tiny_model_dir, model)
    assert (model / "chat_template.jinja").exists()
    (model / "chat_template.jinja").write_text(MINUTE_TEMPLATE)
    cache_image = Engine.cache_image

    def then_the_next_minute(self, *args, **kwargs):
        state = cache_image(self, *args, **kwargs)
        clock.current = AFTER
        return state

    monkeypatch.setattr(Engine, "cache_image", then_the_next_minute)

    def check():
        clock.current = BEFORE
        code = cli.main(["check", "--model", str(model), "--device", "cpu"])
        assert clock.current == AFTER  # the probes ran at the next minute
        out, err = capsys.readouterr()
        return code, out.splitlines(), err.strip().splitlines()

    code, out, err = check()
    assert code == 0, err
    assert "  the chat template stamps the time: each state's instant is pinned, its questions rendered at it" in out
    for probe in ("cached image", "batch of two", "two-turn chat"):
        assert any(line.startswith(f"  held      {probe}: prompt ids equal (") for line in out), (probe, out)
    assert out[-1] == "exact: every probe held"

    monkeypatch.setattr(Engine, "pin_time", lambda self: None)
    code, out, err = check()
    assert code == 1
    assert any(line.startswith("  DIFFERED  cached image: prompt ids differ at ") for line in out), out
    assert err[-1].startswith(f"error: vlcache is not exact for {model}: cached image (prompt ids")


def test_a_minute_turning_while_the_server_computes_a_state_stores_it_under_the_key_of_its_own_instant(
        minute_engine, clock, tmp_path, monkeypatch):
    """The server keys a state by its text rendered at an instant; the state must be pinned at that same instant
    even when the minute turns between the key and the computation (before: the key at 12:34, the state at 12:35,
    stored under the 12:34 key, then refused from disk by the metadata key check)."""
    from test_server import LiveServer, ask

    from vlcache.header import metadata_key, read_metadata

    real = minute_engine.prepare_media

    def late(*args, **kwargs):
        clock.current = AFTER  # the minute turns after the key was made, before the state's text is rendered
        return real(*args, **kwargs)

    monkeypatch.setattr(minute_engine, "prepare_media", late)
    clock.current = BEFORE
    live = LiveServer(minute_engine, tmp_path / "race")
    try:
        ask(live.client, "chelsea.png", QUESTION)
        files = list(live.service.store.folder.location.glob("*.safetensors"))
    finally:
        live.close()
    assert len(files) == 1
    meta = read_metadata(files[0])
    assert meta.template_time.startswith(BEFORE.isoformat()[:16])  # 12:34, the key's instant
    assert metadata_key(meta) == files[0].stem  # what the store and a restarted server find it by
