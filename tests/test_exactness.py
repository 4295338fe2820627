"""Cached answers equal transformers' uncached generate on the full conversation (greedy)."""

import pytest
import torch

from conftest import SYSTEM, photo
from reference import reference_tokens

QUESTIONS = ["What objects are visible in this image?", "What colors dominate the scene?", "Describe the lighting and mood."]
N = 24


@pytest.mark.parametrize("name", ["astronaut.png", "chelsea.png", "hubble_deep_field.jpg"])
def test_cached_answer_equals_uncached_generate(engine, name):
    state = engine.cache_image(photo(name), system_prompt=SYSTEM)
    for question in QUESTIONS[:2]:
        answer = engine.ask(state, question, max_new_tokens=N, temperature=0)
        assert answer.token_ids == reference_tokens(engine, photo(name), SYSTEM, question, N)
        assert len(answer.token_ids) == N
        assert answer.cached_tokens == state.num_tokens
        assert answer.prompt_tokens > answer.cached_tokens


def test_generated_tokens_vary(engine, astronaut_state):
    # A model that repeats one token would hide position bugs; the tiny checkpoint must not.
    answer = engine.ask(astronaut_state, QUESTIONS[0], max_new_tokens=N, temperature=0)
    assert len(set(answer.token_ids)) >= 5


def test_alternating_states_in_one_process(engine):
    states = {name: engine.cache_image(photo(name), system_prompt=SYSTEM) for name in ("rocket.jpg", "coffee.png")}
    for name in ["rocket.jpg", "coffee.png", "rocket.jpg", "coffee.png"]:
        question = QUESTIONS[2]
        expected = reference_tokens(engine, photo(name), SYSTEM, question, N)  # also leaves other rope_deltas on the model
        assert engine.ask(states[name], question, max_new_tokens=N, temperature=0).token_ids == expected


def test_wrong_positions_would_be_caught(engine, astronaut_state):
    """Control: a state whose rope_delta is dropped answers differently, so the equality tests can fail."""
    broken = astronaut_state.to("cpu")
    broken.rope_deltas = torch.zeros_like(broken.rope_deltas)
    expected = reference_tokens(engine, photo("astronaut.png"), SYSTEM, QUESTIONS[0], N)
    assert engine.ask(broken, QUESTIONS[0], max_new_tokens=N, temperature=0).token_ids != expected


def test_asking_never_changes_the_state(engine, astronaut_state):
    before = [(k.clone(), v.clone()) for k, v in astronaut_state.kv]
    first = engine.ask(astronaut_state, QUESTIONS[0], max_new_tokens=N, temperature=0)
    engine.ask(astronaut_state, QUESTIONS[1], max_new_tokens=N, temperature=0)
    second = engine.ask(astronaut_state, QUESTIONS[0], max_new_tokens=N, temperature=0)
    assert first.token_ids == second.token_ids
    assert first.text == second.text
    for (k0, v0), (k1, v1) in zip(before, astronaut_state.kv):
        assert torch.equal(k0, k1) and torch.equal(v0, v1)


def test_no_system_prompt(engine):
    state = engine.cache_image(photo("chelsea.png"), system_prompt=None)
    answer = engine.ask(state, QUESTIONS[0], max_new_tokens=N, temperature=0)
    assert answer.token_ids == reference_tokens(engine, photo("chelsea.png"), None, QUESTIONS[0], N)


def test_max_pixels_state_equals_uncached(engine):
    state = engine.cache_image(photo("hubble_deep_field.jpg"), system_prompt=SYSTEM, max_pixels=128 * 128)
    assert state.metadata.image_tokens <= 16
    answer = engine.ask(state, QUESTIONS[1], max_new_tokens=N, temperature=0)
    assert answer.token_ids == reference_tokens(engine, photo("hubble_deep_field.jpg"), SYSTEM, QUESTIONS[1], N, max_pixels=128 * 128)


def test_text_only_equals_generate(engine):
    answer = engine.ask(None, "What is artificial intelligence?", max_new_tokens=N, temperature=0)
    assert answer.cached_tokens == 0
    assert answer.token_ids == reference_tokens(engine, None, None, "What is artificial intelligence?", N)


def test_greedy_is_deterministic_and_seeded_sampling_repeats(engine, astronaut_state):
    greedy = [engine.ask(astronaut_state, QUESTIONS[1], max_new_tokens=N, temperature=0).token_ids for _ in range(2)]
    assert greedy[0] == greedy[1]
    sampled = [engine.ask(astronaut_state, QUESTIONS[1], max_new_tokens=N, temperature=1.0, seed=7).token_ids for _ in range(2)]
    assert sampled[0] == sampled[1]
    others = {tuple(engine.ask(astronaut_state, QUESTIONS[1], max_new_tokens=N, temperature=1.0, seed=s).token_ids) for s in range(4)}
    assert len(others) > 1  # the seed does reach the sampler


def test_stream_concatenates_to_the_answer(engine, astronaut_state):
    deltas = list(engine.stream(astronaut_state, QUESTIONS[2], max_new_tokens=N, temperature=0))
    answer = deltas[-1].answer
    assert answer is not None and all(d.answer is None for d in deltas[:-1])
    assert "".join(d.text for d in deltas) == answer.text
    assert [d.token_id for d in deltas] == answer.token_ids
