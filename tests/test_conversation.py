"""Conversations: turn N equals transformers' generate on the whole uncached conversation up to turn N."""

import torch

from conftest import SYSTEM, photo
from vlcache.conversation import Conversation
from vlcache.images import load_image

N = 16


def reference_conversation(engine, image, turns, question, max_new_tokens=N):
    """generate() on [system, user(image, q1), assistant(a1), ..., user(question)], uncached."""
    messages = [{"role": "system", "content": SYSTEM}]
    for i, (q, a) in enumerate(turns):
        content = ([{"type": "image", "image": load_image(image).image}] if i == 0 else []) + [{"type": "text", "text": q}]
        messages += [{"role": "user", "content": content}, {"role": "assistant", "content": a}]
    content = ([{"type": "image", "image": load_image(image).image}] if not turns else []) + [{"type": "text", "text": question}]
    messages.append({"role": "user", "content": content})
    inputs = engine.processor.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    with torch.inference_mode():
        out = engine.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist(), inputs["input_ids"].shape[1]


def test_three_turns_equal_uncached_full_conversation(engine, astronaut_state):
    chat = Conversation(engine, astronaut_state)
    questions = ["What objects are visible in this image?", "What colors dominate the scene?", "Describe the lighting and mood."]
    turns = []
    for question in questions:
        answer = chat.ask(question, max_new_tokens=N, temperature=0)
        expected, prompt_len = reference_conversation(engine, photo("astronaut.png"), turns, question)
        assert answer.token_ids == expected
        assert answer.prompt_tokens == prompt_len
        turns.append((question, answer.text))
    assert chat.turns == 3


def test_later_turns_reuse_earlier_ones(engine, astronaut_state):
    chat = Conversation(engine, astronaut_state)
    first = chat.ask("What objects are visible in this image?", max_new_tokens=N, temperature=0)
    second = chat.ask("What colors dominate the scene?", max_new_tokens=N, temperature=0)
    assert first.cached_tokens == astronaut_state.num_tokens
    # Turn 1's prompt (image included) came from the cache; only the answer and the new turn were computed.
    assert second.cached_tokens >= first.prompt_tokens
    assert second.prompt_tokens - second.cached_tokens < 80 < astronaut_state.metadata.image_tokens


def test_reset_returns_to_the_image_state(engine, astronaut_state):
    chat = Conversation(engine, astronaut_state)
    first = chat.ask("Describe the lighting and mood.", max_new_tokens=N, temperature=0)
    chat.ask("And the colors?", max_new_tokens=N, temperature=0)
    chat.reset()
    again = chat.ask("Describe the lighting and mood.", max_new_tokens=N, temperature=0)
    assert again.token_ids == first.token_ids and again.cached_tokens == astronaut_state.num_tokens
    assert chat.turns == 1


def test_saved_conversation_resumes_in_ask_and_chat(engine, astronaut_state, tmp_path):
    chat = Conversation(engine, astronaut_state)
    a1 = chat.ask("What objects are visible in this image?", max_new_tokens=N, temperature=0)
    path = chat.save(tmp_path / "conversation.pt")
    resumed = engine.load_state(path)
    assert resumed.metadata.messages[-1] == {"role": "assistant", "content": a1.text}
    question = "What colors dominate the scene?"
    expected, _ = reference_conversation(engine, photo("astronaut.png"), [("What objects are visible in this image?", a1.text)], question)
    assert engine.ask(resumed, question, max_new_tokens=N, temperature=0).token_ids == expected
    assert Conversation(engine, resumed).ask(question, max_new_tokens=N, temperature=0).token_ids == expected
    assert chat.ask(question, max_new_tokens=N, temperature=0).token_ids == expected
