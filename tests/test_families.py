"""Every supported family, each exact against transformers' generate: CLI in fresh processes, no system prompt,
batches, 3-turn chat, the server; controls that fail when positions are restored wrongly; identity.

Qwen3-VL itself is covered by the rest of the suite; here it runs once with the real Qwen3-VL-2B-Instruct
processor (tokenizer of 151,669 tokens, chat template, image settings) on tiny random weights.
"""

import json
import subprocess
import sys

import pytest
import torch

from conftest import SYSTEM, photo
from reference import reference_for_messages, reference_tokens
from test_cli import run
from test_server import LiveServer, image_messages
from vlcache import cli
from vlcache.media import MediaOptions
from vlcache.conversation import Conversation
from vlcache.errors import ModelMismatchError

KINDS = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl_moe", "qwen3_vl_real", "llava_onevision", "gemma3", "qwen3_5", "qwen3_5_moe"]
FAMILY = {"qwen2_vl": "qwen-vl", "qwen2_5_vl": "qwen-vl", "qwen3_vl_moe": "qwen-vl", "qwen3_vl_real": "qwen-vl",
          "llava_onevision": "llava-onevision", "gemma3": "gemma3", "qwen3_5": "qwen-vl", "qwen3_5_moe": "qwen-vl"}
LAYER_KINDS = {"gemma3": ["sliding_attention"] * 3 + ["full_attention"],
               "qwen3_5": ["linear_attention"] * 3 + ["full_attention"],
               "qwen3_5_moe": ["linear_attention"] * 3 + ["full_attention"]}
PIXELS = 160 * 160  # small images keep the suite fast; the split and positions are the same at any size
N = 12
QUESTIONS = ["What objects are visible in this image?", "What colors dominate the scene?", "Describe the lighting and mood."]

@pytest.mark.parametrize("kind", KINDS)
def test_cli_cache_then_ask_in_fresh_processes_equals_generate(kind, family_dir, family_engine, tmp_path, capsys):
    engine = family_engine(kind)
    cache = tmp_path / "c.pt"
    made = run("cache", photo("rocket.jpg"), "--output", cache, "--model", family_dir(kind), "--max-pixels", PIXELS,
               "--system-prompt", SYSTEM)
    assert made.returncode == 0, made.stderr
    asked = run("ask", "--cache", cache, "--prompt", QUESTIONS[0], "--max-new-tokens", N, "--temperature", 0, "--json")
    assert asked.returncode == 0, asked.stderr
    answer = json.loads(asked.stdout)
    expected = reference_tokens(engine, photo("rocket.jpg"), SYSTEM, QUESTIONS[0], N, max_pixels=PIXELS)
    assert answer["token_ids"] == expected
    assert len(set(expected)) >= 4  # varied output: a model repeating one token would hide position bugs
    assert cli.main(["inspect", str(cache), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == FAMILY[kind]
    layers = engine.model.config.get_text_config().num_hidden_layers
    assert info["layer_kinds"] == LAYER_KINDS.get(kind, ["full_attention"] * layers)


@pytest.mark.parametrize("kind", KINDS)
def test_no_system_prompt_and_a_batch_equal_generate(kind, family_engine):
    engine = family_engine(kind)
    state = engine.cache_image(photo("chelsea.png"), system_prompt=None, max_pixels=PIXELS)
    batch = engine.ask_many(state, QUESTIONS, max_new_tokens=N, temperature=0)
    for question, answer in zip(QUESTIONS, batch):
        alone = engine.ask(state, question, max_new_tokens=N, temperature=0)
        assert answer.token_ids == alone.token_ids
        assert alone.token_ids == reference_tokens(engine, photo("chelsea.png"), None, question, N, max_pixels=PIXELS)


@pytest.mark.parametrize("kind", KINDS)
def test_three_turn_chat_in_a_fresh_process_equals_generate(kind, family_dir, family_engine, tmp_path):
    engine = family_engine(kind)
    cache = tmp_path / "c.pt"
    engine.cache_image(photo("coffee.png"), system_prompt=SYSTEM, max_pixels=PIXELS).save(cache)
    chat = subprocess.run(
        [sys.executable, "-m", "vlcache", "chat", "--cache", str(cache), "--max-new-tokens", str(N), "--temperature", "0", "--json"],
        input="\n".join(QUESTIONS) + "\n", capture_output=True, text=True, timeout=300,
    )
    assert chat.returncode == 0, chat.stderr
    answers = [json.loads(line) for line in chat.stdout.splitlines()]
    assert len(answers) == 3
    messages = [{"role": "system", "content": SYSTEM}]
    for i, (question, answer) in enumerate(zip(QUESTIONS, answers)):
        content = ([{"type": "image"}] if i == 0 else []) + [{"type": "text", "text": question}]
        messages.append({"role": "user", "content": content})
        assert answer["token_ids"] == reference_for_messages(engine, messages, photo("coffee.png"), N, max_pixels=PIXELS), i
        messages.append({"role": "assistant", "content": answer["text"]})


@pytest.mark.parametrize("kind", KINDS)
def test_the_server_answers_exactly_and_reports_cached_tokens(kind, family_engine, tmp_path):
    engine = family_engine(kind)
    live = LiveServer(engine, tmp_path / "states")
    try:
        # The server keeps images at the processor's own size: use a small photograph.
        replies = [live.client.chat.completions.create(model="m", messages=image_messages("camera.png", q), max_tokens=N,
                                                       temperature=0) for q in (QUESTIONS[0], QUESTIONS[1])]
    finally:
        live.close()
    expected = reference_tokens(engine, photo("camera.png"), SYSTEM, QUESTIONS[1], N)
    text = engine.processor.tokenizer.decode(expected, skip_special_tokens=True)
    assert replies[1].choices[0].message.content == text
    assert replies[0].usage.prompt_tokens_details.cached_tokens == 0
    assert replies[1].usage.prompt_tokens_details.cached_tokens > 0


@pytest.mark.parametrize("kind", ["qwen2_5_vl", "llava_onevision", "gemma3", "qwen3_5", "glm4v", "mistral3"])
def test_wrong_positions_would_be_caught(kind, family_engine, monkeypatch):
    """Control per position scheme: shifting the positions of what follows the state changes the answers."""
    engine = family_engine(kind)
    state = engine.cache_image(photo("rocket.jpg"), system_prompt=SYSTEM, max_pixels=PIXELS)
    expected = [reference_tokens(engine, photo("rocket.jpg"), SYSTEM, q, N, max_pixels=PIXELS) for q in QUESTIONS]
    assert [engine.ask(state, q, max_new_tokens=N, temperature=0).token_ids for q in QUESTIONS] == expected
    right = engine.family.positions
    monkeypatch.setattr(engine.family, "positions", lambda slots, logical, delta: right(slots, logical + 3, delta))
    shifted = [engine.ask(state, q, max_new_tokens=N, temperature=0).token_ids for q in QUESTIONS]
    assert any(got != want for got, want in zip(shifted, expected))


def test_a_file_of_one_family_is_refused_by_another(family_engine, engine, tmp_path):
    path = family_engine("llava_onevision").cache_image(photo("rocket.jpg"), max_pixels=PIXELS).save(tmp_path / "l.pt")
    with pytest.raises(ModelMismatchError, match="model mismatch"):
        engine.load_state(path)
    qwen2 = family_engine("qwen2_vl")
    path = qwen2.cache_image(photo("rocket.jpg"), max_pixels=PIXELS).save(tmp_path / "q.pt")
    with pytest.raises(ModelMismatchError, match="model mismatch"):
        family_engine("qwen2_5_vl").load_state(path)


def test_the_real_qwen3_vl_processor_splits_prompts_as_the_real_model(family_engine):
    engine = family_engine("qwen3_vl_real")
    assert len(engine.processor.tokenizer) == 151669
    state = engine.cache_image(photo("astronaut.png"), system_prompt=SYSTEM)
    ids = state.input_ids[0].tolist()
    assert ids[:3] == [151644, 8948, 198]  # <|im_start|>system\n, real ids
    assert ids[-1] == 151653 and state.metadata.image_tokens == ids.count(151655)  # ends at <|vision_end|>
    answer = engine.ask(state, QUESTIONS[1], max_new_tokens=N, temperature=0)
    assert answer.token_ids == reference_tokens(engine, photo("astronaut.png"), SYSTEM, QUESTIONS[1], N)


def test_an_unsupported_family_is_refused_in_one_line(tmp_path):
    """A model transformers does not load as image-text-to-text (an unlisted one that it does: test_more_families)."""
    from transformers import Qwen2Config

    Qwen2Config().save_pretrained(tmp_path)
    result = run("ask", "--model", tmp_path, "--prompt", "hi")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert ("'qwen2', which vlcache does not support (transformers does not load it as image-text-to-text); "
            "supported: qwen2_vl") in result.stderr.strip().splitlines()[-1]


def test_layer_kinds_follow_the_config(family_engine):
    engine = family_engine("qwen2_vl")
    assert engine.family.layer_kinds() == ["full_attention", "full_attention"]
    assert torch.is_tensor(engine.cache_image(photo("rocket.jpg"), max_pixels=PIXELS).rope_deltas)


# -- Gemma 3: sliding windows and bidirectional image attention ----------------------------------------------

def test_gemma3_sliding_layers_store_only_the_window(family_engine, tmp_path):
    from vlcache.testing.families import GEMMA3_SLIDING_WINDOW as W

    engine = family_engine("gemma3")
    state = engine.cache_image(photo("rocket.jpg"), system_prompt=SYSTEM)
    n = state.num_tokens
    assert n > 3 * W  # the prefix is far longer than the window
    assert [k.shape[2] for k, _ in state.kv] == [W - 1, W - 1, W - 1, n]
    path = state.save(tmp_path / "g.pt")
    loaded = engine.load_state(path)
    assert [k.shape[2] for k, _ in loaded.kv] == [W - 1, W - 1, W - 1, n]
    for question in QUESTIONS:
        answer = engine.ask(loaded, question, max_new_tokens=N, temperature=0)
        assert answer.token_ids == reference_tokens(engine, photo("rocket.jpg"), SYSTEM, question, N)


def test_gemma3_controls_windows_and_image_attention(family_engine, monkeypatch):
    """Each kind of state, restored wrongly, changes the answers: so the equality tests above can fail."""
    from vlcache.decode import rows

    engine = family_engine("gemma3")
    expected = [reference_tokens(engine, photo("rocket.jpg"), SYSTEM, q, N) for q in QUESTIONS]
    state = engine.cache_image(photo("rocket.jpg"), system_prompt=SYSTEM)

    def answers(s):
        return [engine.ask(s, q, max_new_tokens=N, temperature=0).token_ids for q in QUESTIONS]

    assert answers(state) == expected
    # 1. Sliding layers whose stored window is misplaced (its tokens in reverse order).
    wrong = state.to("cpu")
    wrong.kv = [(k.flip(2), v.flip(2)) if k.shape[2] < state.num_tokens else (k, v) for k, v in state.kv]
    assert answers(wrong) != expected
    # 2. No window applied when a question attends to the restored prefix.
    real_bias = rows._bias
    with monkeypatch.context() as m:
        m.setattr(rows, "_bias", lambda keys, queries, window: real_bias(keys, queries, None))
        assert answers(state) != expected
    # 3. Image tokens prefilled causally (no token_type_ids): the bidirectional image block is lost.
    real_prefill = type(engine.family).prefill

    def causal_prefill(self, inputs, cache, dtype):
        inputs = dict(inputs)
        inputs["token_type_ids"] = None
        return real_prefill(self, inputs, cache, dtype)

    with monkeypatch.context() as m:
        m.setattr(type(engine.family), "prefill", causal_prefill)
        causal = engine.cache_image(photo("rocket.jpg"), system_prompt=SYSTEM)
    assert answers(causal) != expected


# -- Qwen3.5: linear-attention (Gated DeltaNet) layers ----------------------------------------------------------

def test_qwen3_5_linear_layers_store_a_fixed_size_state(family_engine, tmp_path):
    engine = family_engine("qwen3_5")
    small = engine.cache_image(photo("rocket.jpg"), system_prompt=SYSTEM, max_pixels=64 * 64)
    large = engine.cache_image(photo("rocket.jpg"), system_prompt=SYSTEM, max_pixels=PIXELS)
    assert large.num_tokens > small.num_tokens
    for (ks, vs), (kl, vl) in zip(small.kv[:3], large.kv[:3]):  # conv and recurrent state: the same size at any length
        assert ks.shape == kl.shape and vs.shape == vl.shape and vl.dtype == torch.float32
    assert large.kv[3][0].shape[2] == large.num_tokens  # the full-attention layer holds every token
    loaded = engine.load_state(large.save(tmp_path / "q.pt"))
    assert engine.ask(loaded, QUESTIONS[2], max_new_tokens=N, temperature=0).token_ids == reference_tokens(
        engine, photo("rocket.jpg"), SYSTEM, QUESTIONS[2], N, max_pixels=PIXELS)


def test_qwen3_5_control_linear_state_not_restored(family_engine):
    """Control: a state whose linear layers start fresh (their state dropped) answers differently."""
    engine = family_engine("qwen3_5")
    state = engine.cache_image(photo("rocket.jpg"), system_prompt=SYSTEM, max_pixels=PIXELS)
    expected = [reference_tokens(engine, photo("rocket.jpg"), SYSTEM, q, N, max_pixels=PIXELS) for q in QUESTIONS]
    assert [engine.ask(state, q, max_new_tokens=N, temperature=0).token_ids for q in QUESTIONS] == expected
    fresh = state.to("cpu")
    # Zeros: what a fresh layer starts from (a missing state is refused by the file checks before it is asked).
    fresh.kv = [(torch.zeros_like(kv[0]), torch.zeros_like(kv[1])) if kind == "linear_attention" else kv
                for kv, kind in zip(state.kv, engine.family.layer_kinds())]
    assert [engine.ask(fresh, q, max_new_tokens=N, temperature=0).token_ids for q in QUESTIONS] != expected


def test_qwen3_5_conversation_rolls_back_to_a_turn_boundary(family_engine):
    """The <think> the generation prompt opens is not re-rendered in history: the cache cannot be cut back
    there, so a turn restarts from the last snapshot, and every turn still equals generate()."""
    engine = family_engine("qwen3_5")
    state = engine.cache_image(photo("chelsea.png"), system_prompt=SYSTEM, max_pixels=PIXELS)
    chat = Conversation(engine, state)
    messages = [{"role": "system", "content": SYSTEM}]
    for i, question in enumerate(QUESTIONS):
        answer = chat.ask(question, max_new_tokens=N, temperature=0)
        messages.append({"role": "user", "content": ([{"type": "image"}] if i == 0 else []) + [{"type": "text", "text": question}]})
        assert answer.token_ids == reference_for_messages(engine, messages, photo("chelsea.png"), N, max_pixels=PIXELS)
        messages.append({"role": "assistant", "content": answer.text})
    # Each turn went back to the image state (the earlier answer's <think> never re-renders): the image state
    # and the last turn's boundary are kept.
    assert [n for n, _ in chat._snapshots] == [state.num_tokens, chat._ids.shape[1]]


@pytest.mark.parametrize("kind", ["gemma3", "llava_onevision", "qwen3_5"])
def test_server_multi_turn_is_exact(kind, family_engine, tmp_path):
    """Later turns continue from kept K/V (sliding windows included); Qwen3.5 recomputes from the image state."""
    engine = family_engine(kind)
    live = LiveServer(engine, tmp_path / "states")
    try:
        messages = image_messages("camera.png", QUESTIONS[0])
        reference = [{"role": "system", "content": SYSTEM},
                     {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTIONS[0]}]}]
        cached = []
        for question in QUESTIONS[1:]:
            reply = live.client.chat.completions.create(model="m", messages=messages, max_tokens=N, temperature=0)
            answer = reply.choices[0].message.content
            expected = reference_for_messages(engine, reference, photo("camera.png"), N)
            assert answer == engine.processor.tokenizer.decode(expected, skip_special_tokens=True)
            cached.append(reply.usage.prompt_tokens_details.cached_tokens)
            messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": question}]
            reference += [{"role": "assistant", "content": answer}, {"role": "user", "content": [{"type": "text", "text": question}]}]
        reply = live.client.chat.completions.create(model="m", messages=messages, max_tokens=N, temperature=0)
        expected = reference_for_messages(engine, reference, photo("camera.png"), N)
        assert reply.choices[0].message.content == engine.processor.tokenizer.decode(expected, skip_special_tokens=True)
        cached.append(reply.usage.prompt_tokens_details.cached_tokens)
    finally:
        live.close()
    state_tokens = cached[1]  # turn 2 starts from the image state at least
    assert cached[0] == 0 and state_tokens > 0
    if kind != "qwen3_5":  # K/V models continue from the kept turn: more cached tokens each turn
        assert cached[2] > cached[1]


@pytest.mark.parametrize("kind", ["gemma3", "llava_onevision", "qwen3_5"])
def test_text_only_equals_generate(kind, family_engine):
    engine = family_engine(kind)
    for question in ("What is artificial intelligence?", "Hello!"):
        answer = engine.ask(None, question, max_new_tokens=N, temperature=0)
        assert answer.cached_tokens == 0
        assert answer.token_ids == reference_tokens(engine, None, None, question, N)


@pytest.mark.parametrize("kind", KINDS)
def test_continuous_batching_is_exact(kind, family_engine):
    """Rows on two images and text-only rows join and leave a batch of two, questions prefilled 8 tokens a
    step (sliding windows and linear-attention states are per row): each answers as it does alone."""
    from churn import churn

    engine = family_engine(kind)
    rocket, coffee = (engine.cache_image(photo(name), system_prompt=SYSTEM, max_pixels=PIXELS) for name in ("rocket.jpg", "coffee.png"))
    requests = [(rocket, "rocket", QUESTIONS[0], 10), (None, "", QUESTIONS[1], 6), (coffee, "coffee", QUESTIONS[2], 12),
                (rocket, "rocket", QUESTIONS[1], 3), (None, "", "Hi", 8), (coffee, "coffee", QUESTIONS[0], 9)]
    out = churn(engine, requests, seed=3, max_batch=2, prefill_chunk=8)
    for i, (state, _, question, n) in enumerate(requests):
        assert out[i][-1][0] == "done", out[i][-1]
        assert out[i][-1][1].token_ids == engine.ask(state, question, max_new_tokens=n, temperature=0).token_ids, i


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl_moe", "qwen3_5"])
def test_an_image_state_in_pieces_is_exact(kind, family_engine):
    """The server computes new image states in pieces (vision encoder, then the prefix 8 tokens at a time)."""
    from vlcache.families.base import run_steps

    engine = family_engine(kind)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": [{"type": "image"}]}]
    state = run_steps(engine.cache_media_steps([photo("rocket.jpg")], messages, MediaOptions(max_pixels=PIXELS), chunk=8))
    for question in QUESTIONS[:2]:
        expected = reference_tokens(engine, photo("rocket.jpg"), SYSTEM, question, N, max_pixels=PIXELS)
        assert engine.ask(state, question, max_new_tokens=N, temperature=0).token_ids == expected
