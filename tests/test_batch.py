"""Many questions about one state, answered in one batched generation, equal asking each alone."""

import torch

from conftest import photo

QUESTIONS = [
    "What objects are visible in this image?",
    "What colors dominate the scene?",
    "Describe the lighting and mood.",
    "Is it day or night?",
    "How many people are there? Tell me more about the picture, please.",
]
N = 20


def test_batch_equals_one_by_one(engine, astronaut_state):
    batch = engine.ask_many(astronaut_state, QUESTIONS, max_new_tokens=N, temperature=0)
    assert len(batch) == len(QUESTIONS)
    lengths = {engine.question_ids(astronaut_state.metadata.messages, q).shape[1] for q in QUESTIONS}
    assert len(lengths) > 1  # the rows really are of unequal length, so padding is exercised
    for question, answer in zip(QUESTIONS, batch):
        alone = engine.ask(astronaut_state, question, max_new_tokens=N, temperature=0)
        assert answer.token_ids == alone.token_ids
        assert answer.text == alone.text
        assert answer.prompt_tokens == alone.prompt_tokens and answer.cached_tokens == alone.cached_tokens


def test_batch_rows_stop_independently(engine, astronaut_state, monkeypatch):
    # Make one row's first token an end-of-turn token: that row stops, the others go on.
    alone = [engine.ask(astronaut_state, q, max_new_tokens=N, temperature=0) for q in QUESTIONS[:3]]
    stop_token = alone[1].token_ids[2]
    monkeypatch.setattr(engine, "eos_ids", frozenset({stop_token}))
    batch = engine.ask_many(astronaut_state, QUESTIONS[:3], max_new_tokens=N, temperature=0)
    for answer, single in zip(batch, alone):
        cut = single.token_ids.index(stop_token) + 1 if stop_token in single.token_ids else N
        assert answer.token_ids == single.token_ids[:cut]
        assert answer.finish_reason == ("stop" if stop_token in single.token_ids else "length")
    assert batch[1].token_ids == alone[1].token_ids[:3]


def test_seeded_sampling_batch_is_repeatable(engine, astronaut_state):
    first = engine.ask_many(astronaut_state, QUESTIONS[:3], max_new_tokens=N, temperature=1.0, seed=3)
    second = engine.ask_many(astronaut_state, QUESTIONS[:3], max_new_tokens=N, temperature=1.0, seed=3)
    assert [a.token_ids for a in first] == [a.token_ids for a in second]


def test_batch_on_another_image(engine):
    state = engine.cache_image(photo("hubble_deep_field.jpg"))
    batch = engine.ask_many(state, QUESTIONS[:4], max_new_tokens=N, temperature=0)
    assert [a.token_ids for a in batch] == [engine.ask(state, q, max_new_tokens=N, temperature=0).token_ids for q in QUESTIONS[:4]]


def test_rows_hold_the_prefix_and_all_go_through_the_rows_attention(engine, astronaut_state, monkeypatch):
    """One decode path: each row reads the state's K/V through its block table, both rows through the same
    blocks (one physical copy), and every layer of the prefill and of each decode step attends through
    RowsCache.attend."""
    from vlcache import decode

    batch = engine.batch()
    prefix = engine.state_prefix(astronaut_state)
    params = decode.SamplingParams(temperature=0.0)
    for _ in range(2):
        batch.add(prefix, params, 3, astronaut_state.input_ids[0])
    n = astronaut_state.num_tokens
    for (_, layer), (k, v) in zip(batch.cache.attention_layers(), astronaut_state.kv):
        for slot in range(2):
            keys, values = layer.tokens(slot, 0, n)
            assert torch.equal(keys, k) and torch.equal(values, v)
    for tables in batch.cache.kinds.values():
        assert tables.rows[0] == tables.rows[1] and tables.pool.used == -(-n // tables.block_size)
    calls = []
    real = decode.RowsCache.attend
    monkeypatch.setattr(decode.RowsCache, "attend", lambda self, *a: calls.append(a[0].shape[2]) or real(self, *a))
    engine.ask_many(astronaut_state, QUESTIONS[:2], max_new_tokens=3, temperature=0)
    layers = engine.model.config.get_text_config().num_hidden_layers
    assert len(calls) == 3 * layers  # prefill + 2 decode steps, every layer on the rows path
    assert calls[-1] == 1 and calls[0] > 1  # query lengths: the questions, then one token a step
