"""The rows' attention gathers K/V blocks a chunk of rows at a time (issue 28's memory bar): the largest gathered
K/V is bounded by a byte budget however many rows run, and every row answers as it does alone."""

import pytest

from conftest import SYSTEM, photo
from vlcache.decode import rows

N = 4
QUESTIONS = ["What is in the picture?", "Describe the colours in a few words.", "Is it day or night?",
             "What would you title this photograph?"]


@pytest.fixture
def gathered(monkeypatch):
    """The bytes of K and V every attention chunk gathers, while the test runs."""
    record: list[int] = []
    monkeypatch.setattr(rows, "gathered", record)
    return record


def test_chunks_cover_every_row_and_head_once_within_the_budget():
    assert rows.chunks(16, 8, unit=100, budget=10**9) == [(0, 16, 0, 8)]
    assert rows.chunks(16, 8, unit=100, budget=3200) == [(r, r + 4, 0, 8) for r in range(0, 16, 4)]
    assert rows.chunks(3, 8, unit=100, budget=1000) == [(0, 1, 0, 8), (1, 2, 0, 8), (2, 3, 0, 8)]
    assert rows.chunks(2, 8, unit=100, budget=300) == [(0, 1, 0, 3), (0, 1, 3, 6), (0, 1, 6, 8),
                                                       (1, 2, 0, 3), (1, 2, 3, 6), (1, 2, 6, 8)]
    assert rows.chunks(1, 4, unit=100, budget=1) == [(0, 1, h, h + 1) for h in range(4)]  # the smallest chunk
    assert rows.chunks(5, 2, unit=100, budget=400) == [(0, 2, 0, 2), (2, 4, 0, 2), (4, 5, 0, 2)]


def test_sixteen_rows_gather_no_more_than_the_budget_and_answer_as_alone(engine, astronaut_state, gathered,
                                                                        monkeypatch):
    prompts = [QUESTIONS[i % 4] + f" ({i})" for i in range(16)]
    whole = engine.ask_many(astronaut_state, prompts, max_new_tokens=N, temperature=0)
    largest, calls = max(gathered), len(gathered)  # one chunk a layer's forward: all 16 rows' K/V
    budget = largest // 4
    monkeypatch.setattr(rows, "GATHER_BUDGET", budget)
    gathered.clear()
    answers = engine.ask_many(astronaut_state, prompts, max_new_tokens=N, temperature=0)
    assert max(gathered) <= budget < largest
    assert len(gathered) > 2 * calls  # several chunks a layer's forward (fewer rows in the last steps)
    assert [a.token_ids for a in answers] == [a.token_ids for a in whole]
    monkeypatch.setattr(rows, "GATHER_BUDGET", 10**12)
    for i in (0, 7, 15):
        assert answers[i].token_ids == engine.ask(astronaut_state, prompts[i], max_new_tokens=N, temperature=0).token_ids


@pytest.mark.parametrize("kind", ["gemma4", "llama4", "gemma3"])
def test_one_head_at_a_time_answers_as_alone_in_every_layer_kind(kind, family_engine, gathered, monkeypatch):
    """Shared layers (Gemma 4: handed their source layer's blocks), chunked (Llama 4) and sliding (Gemma 3)
    layers with the smallest chunks (one row's one head): the same answers as unchunked."""
    engine = family_engine(kind)
    state = engine.cache_image(photo("rocket.jpg"), system_prompt=SYSTEM, max_pixels=160 * 160)
    whole = engine.ask_many(state, QUESTIONS[:3], max_new_tokens=N, temperature=0)
    whole_chunks = list(gathered)
    monkeypatch.setattr(rows, "GATHER_BUDGET", 1)
    gathered.clear()
    answers = engine.ask_many(state, QUESTIONS[:3], max_new_tokens=N, temperature=0)
    assert len(gathered) > len(whole_chunks) and max(gathered) < max(whole_chunks)  # one head of one row at a time
    assert [a.token_ids for a in answers] == [a.token_ids for a in whole]


def test_the_traced_fixed_shape_step_runs_in_chunks_and_answers_as_alone(engine, astronaut_state, monkeypatch):
    """The fixed-shape step (traced: the CPU stand-in for a CUDA graph) with its bucket's rows in several
    chunks a layer: the chunk loop has sizes fixed by the bucket and the span, and every row answers as alone."""
    from vlcache.decode.step import StepRunner

    prompts = [QUESTIONS[i % 4] + f" ({i})" for i in range(5)]
    alone = [engine.ask(astronaut_state, p, max_new_tokens=N, temperature=0).token_ids for p in prompts]
    monkeypatch.setattr(rows, "GATHER_BUDGET", 1)  # one row's one head a chunk, eager and traced
    monkeypatch.setattr(rows, "COMPILED_GATHER_BUDGET", 1)
    engine.runner = StepRunner(engine.model, "cpu", "eager")
    try:
        answers = engine.ask_many(astronaut_state, prompts, max_new_tokens=N, temperature=0)
        assert engine.runner.failed is None and engine.runner.steps > 0 and {b for b, _ in engine.runner.shapes} == {8}
    finally:
        engine.runner = None
    assert [a.token_ids for a in answers] == alone


def test_a_compiled_step_takes_the_compiled_budget(engine, astronaut_state, monkeypatch):
    """Traced steps chunk by COMPILED_GATHER_BUDGET (an unrolled loop: fewer, larger chunks), eager forwards by
    GATHER_BUDGET: with the eager budget at one (row, head) and the compiled one unbounded, the traced graph
    holds one chunk a layer."""
    from vlcache.decode.step import StepRunner

    seen = []
    real = rows.chunks
    monkeypatch.setattr(rows, "chunks", lambda *a: seen.append(real(*a)) or seen[-1])
    monkeypatch.setattr(rows, "GATHER_BUDGET", 1)
    monkeypatch.setattr(rows, "COMPILED_GATHER_BUDGET", 10**12)
    engine.runner = StepRunner(engine.model, "cpu", "eager")
    try:
        answers = engine.ask_many(astronaut_state, QUESTIONS[:3], max_new_tokens=N, temperature=0)
        assert engine.runner.steps > 0 and engine.runner.failed is None
    finally:
        engine.runner = None
    assert any(len(c) == 1 and c[0][:2] == (0, 4) for c in seen)  # traced: the bucket's 4 rows at once
    assert any(len(c) > 3 for c in seen)  # eager (the prefill): a row's head at a time
    for question, answer in zip(QUESTIONS, answers):
        assert answer.token_ids == engine.ask(astronaut_state, question, max_new_tokens=N, temperature=0).token_ids
