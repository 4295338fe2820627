"""The families added for issue 22 (GLM-4.1V/4.5V, PaddleOCR-VL, InternVL, SmolVLM, Idefics3, Mistral 3), each
exact against transformers' own generate: batches, a 3-turn chat, text-only, several images, video (GLM), the
CLI in fresh processes and the live server for one M-RoPE and one plain family; controls that fail when
positions are restored wrongly; and `vlcache check` on a listed model, on an unlisted one (LLaVA-NeXT: refused,
checked, then used) and on a model the generic adapter gets wrong.
"""

import functools
import json

import pytest
import torch

from conftest import SYSTEM, photo
from reference import reference_first_logits, reference_for_messages, reference_for_parts, reference_tokens
from test_cli import run
from test_server import LiveServer, image_messages
from vlcache import Engine, cli
from vlcache.conversation import Conversation
from vlcache.media import MediaOptions

KINDS = ["glm4v", "glm4v_moe", "paddleocr_vl", "internvl", "smolvlm", "idefics3", "mistral3", "lfm2_vl", "llama4", "gemma4"]
FAMILY = {"gemma4": "gemma4", "glm4v": "glm4v", "glm4v_moe": "glm4v", "paddleocr_vl": "paddleocr-vl", "internvl": "internvl",
          "smolvlm": "smolvlm", "idefics3": "smolvlm", "mistral3": "mistral3", "lfm2_vl": "lfm2-vl", "llama4": "llama4"}
PIXELS = 160 * 160
N = 12
QUESTIONS = ["What objects are visible in this image?", "What colors dominate the scene?", "Describe the lighting and mood."]


@pytest.mark.parametrize("kind", KINDS)
def test_a_batch_text_only_and_several_images_equal_generate(kind, family_engine):
    engine = family_engine(kind)
    assert engine.family.name == FAMILY[kind]
    state = engine.cache_image(photo("chelsea.png"), system_prompt=SYSTEM, max_pixels=PIXELS)
    expected = [reference_tokens(engine, photo("chelsea.png"), SYSTEM, q, N, max_pixels=PIXELS) for q in QUESTIONS[:2]]
    assert len(set(expected[0])) >= 4  # varied output: a model repeating one token would hide position bugs
    assert [a.token_ids for a in engine.ask_many(state, QUESTIONS[:2], max_new_tokens=N, temperature=0)] == expected
    # Text only.
    assert engine.ask(None, "Hello!", max_new_tokens=N, temperature=0).token_ids == reference_tokens(engine, None, None, "Hello!", N)
    # Two images in one state.
    sources = [photo("rocket.jpg"), photo("coffee.png")]
    two = engine.cache(sources, system_prompt=SYSTEM, options=MediaOptions(max_pixels=PIXELS))
    assert two.metadata.image_tokens > state.metadata.image_tokens
    messages = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": QUESTIONS[1]}]}]
    assert engine.ask(two, QUESTIONS[1], max_new_tokens=N, temperature=0).token_ids == reference_for_parts(
        engine, messages, sources, N, max_pixels=PIXELS)


@pytest.mark.parametrize("kind", KINDS)
def test_a_three_turn_chat_equals_generate(kind, family_engine):
    engine = family_engine(kind)
    state = engine.cache_image(photo("coffee.png"), system_prompt=SYSTEM, max_pixels=PIXELS)
    chat = Conversation(engine, state)
    messages = [{"role": "system", "content": SYSTEM}]
    for i, question in enumerate(QUESTIONS):
        answer = chat.ask(question, max_new_tokens=N, temperature=0)
        messages.append({"role": "user", "content": ([{"type": "image"}] if i == 0 else []) + [{"type": "text", "text": question}]})
        assert answer.token_ids == reference_for_messages(engine, messages, photo("coffee.png"), N, max_pixels=PIXELS), i
        messages.append({"role": "assistant", "content": answer.text})


@pytest.mark.parametrize("kind", ["glm4v"])
def test_cli_ask_in_a_fresh_process_equals_generate(kind, family_engine, tmp_path, capsys):
    engine = family_engine(kind)
    cache = engine.cache_image(photo("rocket.jpg"), system_prompt=SYSTEM, max_pixels=PIXELS).save(tmp_path / "c.pt")
    asked = run("ask", "--cache", cache, "--prompt", QUESTIONS[0], "--max-new-tokens", N, "--temperature", 0, "--json")
    assert asked.returncode == 0, asked.stderr
    expected = reference_tokens(engine, photo("rocket.jpg"), SYSTEM, QUESTIONS[0], N, max_pixels=PIXELS)
    assert json.loads(asked.stdout)["token_ids"] == expected
    assert cli.main(["inspect", str(cache), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == FAMILY[kind] and info["layer_kinds"] == ["full_attention"] * 2


@pytest.mark.parametrize("kind", ["glm4v", "mistral3", "llama4", "gemma4"])
def test_the_server_answers_exactly_and_continues_turns(kind, family_engine, tmp_path):
    engine = family_engine(kind)
    live = LiveServer(engine, tmp_path / "states")
    try:
        first = live.client.chat.completions.create(model="m", messages=image_messages("camera.png", QUESTIONS[0]),
                                                    max_tokens=N, temperature=0)
        second = live.client.chat.completions.create(model="m", messages=image_messages("camera.png", QUESTIONS[1]),
                                                     max_tokens=N, temperature=0)
        later = image_messages("camera.png", QUESTIONS[0]) + [
            {"role": "assistant", "content": first.choices[0].message.content}, {"role": "user", "content": QUESTIONS[2]}]
        third = live.client.chat.completions.create(model="m", messages=later, max_tokens=N, temperature=0)
    finally:
        live.close()
    decode = engine.processor.tokenizer.decode
    expected = reference_tokens(engine, photo("camera.png"), SYSTEM, QUESTIONS[1], N)
    assert second.choices[0].message.content == decode(expected, skip_special_tokens=True)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens > 0
    reference = [{"role": "system", "content": SYSTEM},
                 {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTIONS[0]}]},
                 {"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": [{"type": "text", "text": QUESTIONS[2]}]}]
    expected = reference_for_messages(engine, reference, photo("camera.png"), N)
    assert third.choices[0].message.content == decode(expected, skip_special_tokens=True)
    assert third.usage.prompt_tokens_details.cached_tokens > second.usage.prompt_tokens_details.cached_tokens


@pytest.mark.parametrize("kind", ["glm4v", "paddleocr_vl"])
def test_a_state_in_pieces_and_a_continued_state_are_exact(kind, family_engine):
    """The server's path for M-RoPE families: the prefix 8 tokens a step, and a state of [A, B] computed from
    the state of [A] (only B encoded)."""
    from vlcache.families.base import run_steps

    engine = family_engine(kind)
    options = MediaOptions(max_pixels=PIXELS)
    one = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": [{"type": "image"}]}]
    first = run_steps(engine.cache_media_steps([photo("rocket.jpg")], one, options, chunk=8))
    assert engine.ask(first, QUESTIONS[0], max_new_tokens=N, temperature=0).token_ids == reference_tokens(
        engine, photo("rocket.jpg"), SYSTEM, QUESTIONS[0], N, max_pixels=PIXELS)
    two = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": [{"type": "image"}, {"type": "image"}]}]
    sources = [photo("rocket.jpg"), photo("coffee.png")]
    both = run_steps(engine.cache_media_steps(sources, two, options, chunk=8, base=first))
    assert both.metadata.reused_tokens == first.num_tokens
    two[1]["content"].append({"type": "text", "text": QUESTIONS[1]})
    assert engine.ask(both, QUESTIONS[1], max_new_tokens=N, temperature=0).token_ids == reference_for_parts(
        engine, two, sources, N, max_pixels=PIXELS)


@pytest.mark.parametrize("kind", ["glm4v", "glm46v", "internvl", "smolvlm", "gemma4"])
def test_video_equals_generate(kind, family_engine, tmp_path):
    """Frames sampled by the model's own video processor, against transformers' own loader. GLM's samplers pick
    some frames twice here (GLM-4.1V repeats the last of 3, GLM-4.6V spreads 9 over fewer): vlcache decodes each
    once and repeats it as transformers' loader does; GLM-4.1V and 4.6V write the timestamps differently. Gemma 4
    samples a fixed count of frames evenly (8 in the tiny checkpoint), each a timestamped image."""
    from vlcache.testing.clips import make_clip

    engine = family_engine(kind)
    clip = make_clip(tmp_path / "c.mp4", seconds=1.5, fps=8, size=(96, 64), source=photo("rocket.jpg"))
    state = engine.cache([clip], system_prompt=SYSTEM)
    if kind.startswith("glm"):  # a frame sampled twice, decoded once
        indices = state.metadata.parts[0]["frame_indices"]
        assert len(set(indices)) < len(indices) and len(indices) % 2 == 0
    messages = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTIONS[0]}]}]
    for question in QUESTIONS[:2]:
        messages[1]["content"][1]["text"] = question
        assert engine.ask(state, question, max_new_tokens=N, temperature=0).token_ids == reference_for_parts(
            engine, messages, [clip], N)


def test_smolvlm_without_num2words_names_the_extra(family_dir, monkeypatch):
    from transformers.models.smolvlm import processing_smolvlm

    from vlcache.errors import ModelLoadError

    monkeypatch.setattr(processing_smolvlm, "num2words", None)  # as if the package were not installed
    with pytest.raises(ModelLoadError, match=r"num2words.*\(pip install 'vlcache\[smolvlm\]'\)$"):
        Engine.load(str(family_dir("smolvlm")), device="cpu")


def test_idefics3_refuses_a_video_in_one_line(family_engine, tmp_path):
    from vlcache.errors import VideoError
    from vlcache.testing.clips import make_clip

    engine = family_engine("idefics3")
    clip = make_clip(tmp_path / "c.mp4", seconds=1.0, fps=4, size=(64, 64))
    with pytest.raises(VideoError, match=r"this model family \(smolvlm\) takes no videos"):
        engine.cache([clip], system_prompt=SYSTEM)


def test_a_mistral_sliding_window_without_layer_types_is_exact(family_engine, tmp_path):
    """A Mistral text config with `sliding_window` and no layer types: transformers' cache makes every layer
    sliding, so vlcache does too (each layer stores the last window - 1 tokens), restored from a file exactly."""
    engine = family_engine("mistral3_sliding")
    assert engine.family.layer_kinds() == ["sliding_attention"] * 2
    state = engine.load_state(engine.cache_image(photo("rocket.jpg"), system_prompt=SYSTEM, max_pixels=PIXELS).save(tmp_path / "s.pt"))
    assert state.num_tokens > 8 and [k.shape[2] for k, _ in state.kv] == [7, 7]
    expected = [reference_tokens(engine, photo("rocket.jpg"), SYSTEM, q, N, max_pixels=PIXELS) for q in QUESTIONS[:2]]
    assert [a.token_ids for a in engine.ask_many(state, QUESTIONS[:2], max_new_tokens=N, temperature=0)] == expected


# -- LFM2-VL: short-convolution layers ---------------------------------------------------------------------------

def test_lfm2_conv_layers_store_a_fixed_window_and_dropping_it_is_caught(family_engine, tmp_path, capsys):
    """Each conv layer's state is its last 3 inputs whatever the prefix length; restored from a file it answers
    as generate() does. Control: the same state with its conv windows dropped (fresh) answers differently."""
    engine = family_engine("lfm2_vl")
    kinds = engine.family.layer_kinds()
    assert kinds == ["linear_attention", "linear_attention", "full_attention", "linear_attention"]
    small = engine.cache_image(photo("rocket.jpg"), system_prompt=SYSTEM, max_pixels=64 * 64)
    state = engine.cache_image(photo("rocket.jpg"), system_prompt=SYSTEM, max_pixels=PIXELS)
    assert state.num_tokens != small.num_tokens  # prefixes of two lengths
    for (conv, _), (small_conv, _), kind in zip(state.kv, small.kv, kinds):
        if kind == "linear_attention":
            assert conv.shape == small_conv.shape == (1, 64, 3)
    path = state.save(tmp_path / "l.pt")
    assert cli.main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "lfm2-vl" and info["layer_kinds"] == kinds
    loaded = engine.load_state(path)
    expected = [reference_tokens(engine, photo("rocket.jpg"), SYSTEM, q, N, max_pixels=PIXELS) for q in QUESTIONS]
    assert [engine.ask(loaded, q, max_new_tokens=N, temperature=0).token_ids for q in QUESTIONS] == expected
    dropped = state.to("cpu")
    # Windows zeroed (what a fresh layer starts from), shapes kept so the file checks pass: the answers change.
    dropped.kv = [(torch.zeros_like(kv[0]), kv[1]) if kind == "linear_attention" else kv for kv, kind in zip(state.kv, kinds)]
    assert [engine.ask(dropped, q, max_new_tokens=N, temperature=0).token_ids for q in QUESTIONS] != expected


def test_lfm2_continuous_batching_is_exact(family_engine):
    """Rows on two images and text-only rows join and leave a batch of two (the server's path): each answers as
    it does alone."""
    from churn import churn

    engine = family_engine("lfm2_vl")
    rocket, coffee = (engine.cache_image(photo(name), system_prompt=SYSTEM, max_pixels=PIXELS) for name in ("rocket.jpg", "coffee.png"))
    requests = [(rocket, "rocket", QUESTIONS[0], 10), (None, "", QUESTIONS[1], 6), (coffee, "coffee", QUESTIONS[2], 12),
                (rocket, "rocket", QUESTIONS[1], 3), (None, "", "Hi", 8)]
    out = churn(engine, requests, seed=3, max_batch=2, prefill_chunk=8)
    for i, (state, _, question, n) in enumerate(requests):
        assert out[i][-1][0] == "done", out[i][-1]
        assert out[i][-1][1].token_ids == engine.ask(state, question, max_new_tokens=n, temperature=0).token_ids, i


# -- vlcache check ----------------------------------------------------------------------------------------------

def test_check_on_a_listed_family_prints_what_held(family_dir, capsys):
    assert cli.main(["check", "--model", str(family_dir("glm4v")), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for probe in ("cached image", "batch of two", "two-turn chat", "video"):
        assert f"held      {probe}: prompt ids equal (" in out
        line = next(line for line in out.splitlines() if f" {probe}: " in line)
        assert "; tokens equal (16" in line and "; first-step logits within " in line
    assert "exact: every probe held" in out


def test_an_unlisted_model_is_checked_then_used(family_dir, tmp_path, monkeypatch, capsys):
    """LLaVA-NeXT (no family of its own): refused with one line naming `vlcache check`; the check passes; then
    it loads through the generic adapter, and a fresh process answers from its state exactly."""
    monkeypatch.setenv("VLCACHE_HOME", str(tmp_path / "home"))  # subprocesses inherit it
    model = family_dir("llava_next")
    assert cli.main(["ask", "--model", str(model), "--prompt", "Hello!"]) == 1
    refused = capsys.readouterr()
    assert refused.out == "" and "Traceback" not in refused.err
    assert refused.err.strip().splitlines()[-1] == (
        f"error: model '{model}' is a 'llava_next', which vlcache has no family for: run `vlcache check --model {model}` "
        "once to test whether the generic adapter (plain positions, full-attention K/V) is exact for these weights")
    assert cli.main(["check", "--model", str(model), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "held      two-turn chat: prompt ids equal (" in out and "remembered" in out
    engine = Engine.load(str(model), device="cpu")  # no longer refused
    assert engine.family.name == "generic"
    cache = engine.cache_image(photo("rocket.jpg"), system_prompt=SYSTEM).save(tmp_path / "n.pt")
    asked = run("ask", "--cache", cache, "--prompt", QUESTIONS[0], "--max-new-tokens", N, "--temperature", 0, "--json")
    assert asked.returncode == 0, asked.stderr
    expected = reference_tokens(engine, photo("rocket.jpg"), SYSTEM, QUESTIONS[0], N)
    assert json.loads(asked.stdout)["token_ids"] == expected and len(set(expected)) >= 4


def test_check_fails_and_names_what_differed_when_the_generic_adapter_is_wrong(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """Control: Qwen3-VL run through the generic adapter (plain positions instead of M-RoPE) is not exact, and
    the check says so, exits 1 and remembers nothing."""
    from vlcache import check, engine as engine_module, model as model_module

    monkeypatch.setenv("VLCACHE_HOME", str(tmp_path / "home"))
    for module in (check, engine_module, model_module):
        monkeypatch.setattr(module, "family_class", lambda model_type: None)
    assert check.run(str(tiny_model_dir), device="cpu") == 1
    captured = capsys.readouterr()
    assert "DIFFERED  cached image: prompt ids equal (" in captured.out  # the prompt is right, the positions are not
    assert "; tokens differ at " in captured.out
    assert captured.err.strip().splitlines()[-1].startswith(f"error: vlcache is not exact for {tiny_model_dir}: cached image")
    assert not (tmp_path / "home" / "checked.json").exists() or json.loads((tmp_path / "home" / "checked.json").read_text()) == {}


# -- Llama 4: chunked local attention, NoPE layers, and the upstream failure its family works around ------------

def _rocket_file_round_trip(engine, state, tmp_path, capsys, layers: str):
    """A state of rocket.jpg saved: `vlcache inspect` names its `layers`; its first question asked in a fresh
    process and all three from the loaded file (a batch of three, padded) answer as generate() does. Returns
    (path, expected answers, the loaded state, a function asking QUESTIONS of a state)."""
    path = state.save(tmp_path / "rocket.pt")
    assert cli.main(["inspect", str(path)]) == 0
    assert f"layers: {layers}" in capsys.readouterr().out
    expected = [reference_tokens(engine, photo("rocket.jpg"), SYSTEM, q, N, max_pixels=PIXELS) for q in QUESTIONS]
    asked = run("ask", "--cache", path, "--prompt", QUESTIONS[0], "--max-new-tokens", N, "--temperature", 0, "--json")
    assert asked.returncode == 0, asked.stderr
    assert json.loads(asked.stdout)["token_ids"] == expected[0] and len(set(expected[0])) >= 4
    loaded = engine.load_state(path)

    def answers(state):
        return [a.token_ids for a in engine.ask_many(state, QUESTIONS, max_new_tokens=N, temperature=0)]

    assert answers(loaded) == expected
    return path, expected, loaded, answers


def test_llama4_chunked_layers_store_their_last_chunk_and_wrong_chunks_are_caught(family_engine, tmp_path, capsys, monkeypatch):
    """Each chunked layer stores only the tokens of the prefix's last chunk (n % 16), the NoPE layer all; restored
    from a file in a fresh process and in a batch of three (padded) it answers as generate() does. Controls: the
    chunk boundary moved by one in the decode masks, the chunked layers' stored tokens zeroed, and the NoPE
    layer's query temperature taken from the batch's slot count (transformers' own) instead of each row's
    position: each changes the answers. A file holding less than the last chunk is refused."""
    from vlcache.decode import rows
    from vlcache.errors import ModelMismatchError
    from vlcache.testing.more_families import LLAMA4_CHUNK

    engine = family_engine("llama4")
    kinds = engine.family.layer_kinds()
    assert kinds == ["chunked_attention"] * 3 + ["full_attention"]
    state = engine.cache_image(photo("rocket.jpg"), system_prompt=SYSTEM, max_pixels=PIXELS)
    n = state.num_tokens
    assert n > 2 * LLAMA4_CHUNK and n % LLAMA4_CHUNK  # several chunks, the last one unfinished
    assert [k.shape[2] for k, _ in state.kv] == [n % LLAMA4_CHUNK] * 3 + [n]
    path, expected, loaded, answers = _rocket_file_round_trip(engine, state, tmp_path, capsys,
                                                              "3 chunked_attention, 1 full_attention")
    # Controls.
    right = rows._bias
    with monkeypatch.context() as patch:
        patch.setattr(rows, "_bias", lambda keys, queries, window, chunk=None: right(keys, queries, window, chunk and chunk + 1))
        assert answers(loaded) != expected
    zeroed = loaded.to("cpu")
    zeroed.kv = [(torch.zeros_like(k), torch.zeros_like(v)) if kind == "chunked_attention" else (k, v)
                 for (k, v), kind in zip(loaded.kv, kinds)]
    assert answers(zeroed) != expected
    nope = engine.model.language_model.model.layers[3].self_attn
    with monkeypatch.context() as patch:
        patch.setattr(nope, "forward", type(nope).forward.__get__(nope))
        assert answers(loaded) != expected
    assert answers(loaded) == expected  # the patches are gone
    short = loaded.to("cpu")
    short.kv = [(k[:, :, 1:], v[:, :, 1:]) if kind == "chunked_attention" else (k, v) for (k, v), kind in zip(loaded.kv, kinds)]
    with pytest.raises(ModelMismatchError, match=rf"layer 0's keys and values are \[1, 2, {n % LLAMA4_CHUNK - 1}, 16\] .*, "
                       rf"the model's \[1, 2, {n % LLAMA4_CHUNK}\.\.{n}, 16\]$"):
        engine.load_state(short.save(tmp_path / "short.pt"))


def test_llama4_a_state_that_ends_a_chunk_holds_nothing_in_its_chunked_layers(family_engine, tmp_path):
    """A prefix of exactly 4 chunks (64 tokens): no later query sees any of its keys in a chunked layer, so those
    layers store no tokens; the file round trip and a batch of two still answer as generate() does."""
    from vlcache.testing.more_families import LLAMA4_CHUNK

    engine = family_engine("llama4")
    system = SYSTEM + " Look."  # 64 prefix tokens with this tokenizer
    state = engine.load_state(engine.cache_image(photo("rocket.jpg"), system_prompt=system, max_pixels=PIXELS).save(tmp_path / "e.pt"))
    n = state.num_tokens
    assert n % LLAMA4_CHUNK == 0 and [k.shape[2] for k, _ in state.kv] == [0, 0, 0, n]
    expected = [reference_tokens(engine, photo("rocket.jpg"), system, q, N, max_pixels=PIXELS) for q in QUESTIONS[:2]]
    assert [a.token_ids for a in engine.ask_many(state, QUESTIONS[:2], max_new_tokens=N, temperature=0)] == expected


def test_llama4_a_saved_conversation_keeps_its_last_chunk(family_engine, tmp_path):
    """A conversation saved after a turn: its chunked layers hold the last n % 16 of its tokens (cut from the live
    row), and a question asked of the file answers as generate() does on the whole conversation."""
    from vlcache.testing.more_families import LLAMA4_CHUNK

    engine = family_engine("llama4")
    chat = Conversation(engine, engine.cache_image(photo("coffee.png"), system_prompt=SYSTEM, max_pixels=PIXELS))
    first = chat.ask(QUESTIONS[0], max_new_tokens=N, temperature=0)
    saved = engine.load_state(chat.save(tmp_path / "chat.pt"))
    n = saved.num_tokens
    assert [k.shape[2] for k, _ in saved.kv] == [n % LLAMA4_CHUNK] * 3 + [n]
    messages = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTIONS[0]}]},
                {"role": "assistant", "content": first.text},
                {"role": "user", "content": [{"type": "text", "text": QUESTIONS[1]}]}]
    assert engine.ask(saved, QUESTIONS[1], max_new_tokens=N, temperature=0).token_ids == reference_for_messages(
        engine, messages, photo("coffee.png"), N, max_pixels=PIXELS)


def _bare_reference(engine, model):
    """reference_tokens' inputs, but generate() on `model` (as transformers loads it) instead of the engine's."""
    from types import SimpleNamespace

    return SimpleNamespace(model=model, processor=engine.processor, family=engine.family, device=engine.device,
                           dtype=engine.dtype, images_kwargs=engine.images_kwargs)


def _plant_upstream_output_bug(monkeypatch):
    """transformers 5.24's bug, planted: the top forward reads `image_outputs` from its language model's output."""
    from transformers.models.llama4 import modeling_llama4

    cls = modeling_llama4.Llama4ForConditionalGeneration
    original = cls.forward

    @functools.wraps(original)  # generate() checks its kwargs against forward's signature
    def forward(self, *args, **kwargs):
        seen = []
        handle = self.language_model.register_forward_hook(lambda module, inputs, output: seen.append(output))
        try:
            result = original(self, *args, **kwargs)
        finally:
            handle.remove()
        seen[-1].image_outputs  # noqa: B018 (the read that fails upstream)
        return result

    monkeypatch.setattr(cls, "forward", forward)


def test_llama4_is_exact_with_and_without_the_upstream_output_bug(family_dir, monkeypatch):
    """transformers 5.24's Llama4ForConditionalGeneration.forward read `image_outputs` from its language model's
    output, which has no such field, so generate() itself failed; 5.25 fixed it. vlcache finds out by behaviour
    which one it runs on and installs its workaround only where the bug is. With the transformers installed and
    with the bug planted, the workaround is on exactly when generate() on the model as transformers loads it
    fails, and vlcache's answers equal generate() on the model as transformers ships it where that works, on
    the worked-around model otherwise."""
    from transformers import AutoModelForImageTextToText

    folder = family_dir("llama4")
    question = QUESTIONS[0]

    def bare_model():
        return AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()

    for planted in (False, True):
        with monkeypatch.context() as patch:
            if planted:
                _plant_upstream_output_bug(patch)
            engine = Engine.load(str(folder), device="cpu")
            workaround = engine.model.language_model._vlcache_output_workaround
            bare = _bare_reference(engine, bare_model())
            try:
                expected = reference_tokens(bare, photo("rocket.jpg"), SYSTEM, question, N, max_pixels=PIXELS)
                bare_fails = False
            except AttributeError as error:
                assert "'MoeCausalLMOutputWithPast' object has no attribute 'image_outputs'" in str(error)
                bare_fails = True
                expected = reference_tokens(engine, photo("rocket.jpg"), SYSTEM, question, N, max_pixels=PIXELS)
            assert workaround == bare_fails
            if planted:
                assert bare_fails  # the plant is real: without the workaround generate() fails
            state = engine.cache_image(photo("rocket.jpg"), system_prompt=SYSTEM, max_pixels=PIXELS)
            assert engine.ask(state, question, max_new_tokens=N, temperature=0).token_ids == expected


GEMMA4_KINDS = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention", "shared_attention:3",
                "shared_attention:2"]


def test_gemma4_shared_layers_store_nothing_and_wrong_sources_are_caught(family_engine, tmp_path, capsys, monkeypatch):
    """Layers 4 and 5 read the K/V of layers 3 (sliding) and 2 (full) and store nothing: the file holds K/V for
    four layers, the full one at its own shape [1, 2, n, 32], the sliding ones their last window - 1 tokens at
    [1, 1, 7, 16]; `inspect` names the sources. From the file, in a fresh process and in a batch of three
    (padded), answers equal generate(). Controls: the shared layers' queries matched to the wrong mask rows, a
    shared layer pointed at another source layer, the source's K/V restored from another layer, the image
    prefilled without its bidirectional attention: each changes the answers. A file whose header names another
    source, or holds K/V for a shared layer, is refused."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from vlcache.decode import rows
    from vlcache.decode.batch import Batch
    from vlcache.errors import ModelMismatchError
    from vlcache.families import plain
    from vlcache.testing.more_families import GEMMA4_SLIDING_WINDOW

    engine = family_engine("gemma4")
    assert engine.family.layer_kinds() == GEMMA4_KINDS
    assert engine.kv_bytes_per_token() == 2 * 4 * (3 * 16 + 2 * 32)  # float32; the shared layers cost nothing
    state = engine.cache_image(photo("rocket.jpg"), system_prompt=SYSTEM, max_pixels=PIXELS)
    n, held = state.num_tokens, GEMMA4_SLIDING_WINDOW - 1
    assert [None if k is None else list(k.shape) for k, _ in state.kv] == [
        [1, 1, held, 16], [1, 1, held, 16], [1, 2, n, 32], [1, 1, held, 16], None, None]
    path, expected, loaded, answers = _rocket_file_round_trip(
        engine, state, tmp_path, capsys, "3 sliding_attention, 1 full_attention, 2 shared_attention (layer 4 reads 3, 5 reads 2)")
    with safe_open(str(path), "pt") as f:
        assert {name for name in f.keys() if name.startswith("layers.")} == {
            f"layers.{i}.{t}" for i in range(4) for t in ("keys", "values")}
    # The first answer token's logits equal those of one uncached forward over the whole prompt (float32, 1e-4).
    # Control: the shared layers' queries (the question's last token, in the question's forward) given the first
    # token's mask row: the logits move by about 0.2 (too little to change these argmaxes: hence logits).
    first = reference_first_logits(engine, photo("rocket.jpg"), SYSTEM, QUESTIONS[0], max_pixels=PIXELS)

    def cached_first_logits():
        seen = []
        with monkeypatch.context() as patch:
            patch.setattr(Batch, "sample", lambda self, logits, right=Batch.sample: (seen.append(logits[0].float()), right(self, logits))[1])
            engine.ask(loaded, QUESTIONS[0], max_new_tokens=1, temperature=0)
        return seen[0]

    assert torch.allclose(cached_first_logits(), first, atol=1e-4)
    with monkeypatch.context() as patch:
        patch.setattr(rows, "shared_rows", lambda bias, length: bias[:, :, :length])
        assert not torch.allclose(cached_first_logits(), first, atol=1e-2)
    # Layer 4 reading layer 1's K/V, layer 3 still attending over its own (the model's part: what the source is
    # matters, so answers equal to generate's show each shared layer got its source's rows):
    layers = engine.model.model.language_model.layers
    with monkeypatch.context() as patch:
        patch.setattr(layers[3].self_attn, "store_full_length_kv", False)
        patch.setattr(layers[1].self_attn, "store_full_length_kv", True)
        assert answers(loaded) != expected
    wrong = loaded.to("cpu")
    wrong.kv = [loaded.kv[1] if i == 3 else kv for i, kv in enumerate(loaded.kv)]  # the source's K/V from layer 1
    assert answers(wrong) != expected
    with monkeypatch.context() as patch:  # image tokens that see only earlier ones
        patch.setattr(plain, "vision_inputs", lambda inputs, dtype, model=None, right=plain.vision_inputs: {
            k: v for k, v in right(inputs, dtype, model).items() if k != "mm_token_type_ids"})
        causal = engine.cache_image(photo("rocket.jpg"), system_prompt=SYSTEM, max_pixels=PIXELS)
    assert answers(causal) != expected
    assert answers(loaded) == expected  # the patches are gone
    # Refused: another source named in the header; K/V stored for a shared layer.
    other = loaded.to("cpu")
    other.metadata.layer_kinds = GEMMA4_KINDS[:4] + ["shared_attention:1", "shared_attention:2"]
    with pytest.raises(ModelMismatchError, match=r"its layer kinds .*shared_attention:1.* are not the model's"):
        engine.load_state(other.save(tmp_path / "other.pt"))
    tensors = load_file(str(path))
    tensors.update({"layers.4.keys": tensors["layers.3.keys"].clone(), "layers.4.values": tensors["layers.3.values"].clone()})
    with safe_open(str(path), "pt") as f:
        save_file(tensors, str(tmp_path / "stored.pt"), metadata=f.metadata())
    with pytest.raises(ModelMismatchError, match=r"it holds other layer tensors than the model's 6 layers \('layers.4.keys'\)"):
        engine.load_state(tmp_path / "stored.pt")


def test_gemma4_max_pixels_picks_the_image_budget(family_engine):
    """Gemma 4 takes an image budget of 70, 140, 280, 560 or 1120 tokens (each 3x3 patches of 4x4 pixels in the
    tiny checkpoint): --max-pixels picks the largest that fits, the smallest below them all, and the processor's
    own without it. The budget is part of the state's identity, and the estimate before the encoder is exact."""
    engine = family_engine("gemma4")
    per_token = 9 * 16
    assert engine.images_kwargs(None) == {}
    assert engine.images_kwargs(140 * per_token) == {"max_soft_tokens": 140}
    assert engine.images_kwargs(140 * per_token - 1) == {"max_soft_tokens": 70}
    assert engine.images_kwargs(1) == {"max_soft_tokens": 70}
    assert engine.processor_settings(PIXELS)["max_soft_tokens"] == 140
    small = engine.cache_image(photo("chelsea.png"), max_pixels=70 * per_token)
    large = engine.cache_image(photo("chelsea.png"), max_pixels=PIXELS)
    assert 0 < small.metadata.image_tokens <= 70 < large.metadata.image_tokens <= 140
    from PIL import Image

    width, height = Image.open(photo("chelsea.png")).size
    assert engine.image_tokens(width, height, engine.images_kwargs(PIXELS)) == large.metadata.image_tokens


def glm_generate_by_token_type(engine, messages, sources):
    """generate() on a GLM-4.1V conversation with images and a video. transformers' forward finds a video's
    tokens by the image token id too, so generate() itself refuses such a prompt; this reference marks the
    media tokens as the processor does (mm_token_type_ids: 1 image, 2 video), the positions vlcache fills."""
    from transformers.models.glm4v import modeling_glm4v

    seen = {}
    real_forward, real_mask = modeling_glm4v.Glm4vModel.forward, modeling_glm4v.Glm4vModel.get_placeholder_mask

    def forward(self, *args, mm_token_type_ids=None, **kwargs):
        seen["types"] = mm_token_type_ids
        return real_forward(self, *args, mm_token_type_ids=mm_token_type_ids, **kwargs)

    def mask(self, input_ids, inputs_embeds, image_features=None, video_features=None):
        types = seen.get("types")
        if types is None or types.shape != input_ids.shape or not ((types == 1).any() and (types == 2).any()):
            return real_mask(self, input_ids, inputs_embeds, image_features, video_features)
        return tuple((types == code).unsqueeze(-1).to(inputs_embeds.device) for code in (1, 2))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(modeling_glm4v.Glm4vModel, "forward", forward)
        patch.setattr(modeling_glm4v.Glm4vModel, "get_placeholder_mask", mask)
        expected = reference_for_parts(engine, messages, sources, N, max_pixels=PIXELS)
    assert "types" in seen  # the patch was on the path
    return expected


@pytest.mark.parametrize("chunk", [None, 8, 40])
def test_glm_images_and_a_video_in_one_state_whole_or_in_pieces_are_exact(chunk, family_engine, tmp_path):
    """Images and a video in one GLM-4.1V state: before, every such state failed in the model's forward ("Image
    features and image tokens do not match"): in pieces longer than --prefill-chunk and in one forward. Each
    forward now gets every media token's features in token order; the answer equals generate's."""
    from vlcache import prompt as prompt_module
    from vlcache.families.base import run_steps
    from vlcache.testing.clips import make_clip

    engine = family_engine("glm4v")
    clip = make_clip(tmp_path / "c.mp4", seconds=1.5, fps=8, size=(96, 64), source=photo("rocket.jpg"))
    sources = [photo("coffee.png"), clip, photo("rocket.jpg")]
    messages = prompt_module.media_conversation(SYSTEM, ["image", "video", "image"])
    state = run_steps(engine.cache_media_steps(sources, messages, MediaOptions(max_pixels=PIXELS), chunk=chunk))
    assert chunk is None or state.num_tokens > chunk
    assert [p["type"] for p in state.metadata.parts] == ["image", "video", "image"]
    asked = prompt_module.with_question(state.metadata.messages, QUESTIONS[0])
    expected = glm_generate_by_token_type(engine, asked, sources)
    assert engine.ask(state, QUESTIONS[0], max_new_tokens=N, temperature=0).token_ids == expected
