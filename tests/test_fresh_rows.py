"""Rows' own tokens begin on a fresh block (issue 28's memory bar): no row copies the state's partly filled last
block; the unused tail of that block is a hole the masks skip, and every reader of a row's positions steps over
it (its K/V, its state, its suffix, a truncation)."""

import torch

from vlcache import decode
from vlcache.decode.blocks import blocks_for
from vlcache.decode.kvpool import KVPool

N = 6
QUESTIONS = ["What is in the picture?", "Describe the colours in a few words.", "Is it day or night?",
             "What would you title this photograph?"]


def _count_copies(monkeypatch) -> list:
    copies = []
    real = KVPool.copy
    monkeypatch.setattr(KVPool, "copy", lambda self, *a: copies.append(a) or real(self, *a))
    return copies


def test_sixteen_rows_hold_the_state_once_and_their_own_blocks_without_a_copy(engine, astronaut_state, monkeypatch):
    copies = _count_copies(monkeypatch)
    made = []
    real = engine.batch
    monkeypatch.setattr(engine, "batch", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    prompts = [QUESTIONS[i % 4] + f" ({i})" for i in range(16)]
    answers = engine.ask_many(astronaut_state, prompts, max_new_tokens=N, temperature=0)
    (batch,) = made
    cache = batch.cache
    n = astronaut_state.num_tokens
    (tables,) = cache.kinds.values()
    size = tables.block_size
    assert n % size != 0 and cache.fresh_rows
    own = [length - n for length in cache.book.lengths]
    assert tables.pool.used == blocks_for(n, size) + sum(blocks_for(k, size) for k in own)  # counted exactly
    assert copies == []
    monkeypatch.undo()
    for i in (0, 9):
        assert answers[i].token_ids == engine.ask(astronaut_state, prompts[i], max_new_tokens=N, temperature=0).token_ids
    cache.close()
    assert tables.pool.used == 0 and not cache.pool.held


def test_control_contiguous_rows_copy_the_partly_filled_block_once_each(engine, astronaut_state, monkeypatch):
    """The server's rows (fresh_rows off): each copies the state's last block on its first write: what the
    count above would see without fresh blocks; the answers are the same."""
    copies = _count_copies(monkeypatch)
    prefix = engine.state_prefix(astronaut_state)
    ids = [engine.question_ids(astronaut_state.metadata.messages, q)[0] for q in QUESTIONS]
    got = {}
    for fresh in (True, False):
        batch = engine.batch(fresh_rows=fresh)
        for question in ids:
            batch.add(prefix, decode.SamplingParams(0.0), N, question)
        got[fresh] = [[] for _ in ids]
        for step in decode.generate(batch, ids):
            for i, token in enumerate(step):
                if token is not None:
                    got[fresh][i].append(token)
        assert len(copies) == (0 if fresh else len(ids))
        batch.cache.close()
    assert got[True] == got[False]


def _same(a, b):
    """The same K/V up to rounding: the fresh row's attention runs over more positions (the hole's, masked),
    so a later layer's sums may round otherwise; a position read from the wrong place differs by O(1)."""
    return a.shape == b.shape and torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_a_rows_state_suffix_and_truncation_step_over_the_hole(engine, astronaut_state):
    """row_state, suffix_kv and truncate read logical positions: a fresh-block row gives the same tensors as a
    contiguous one, and goes on after a truncation (into its own tokens, and back into the state) as it does."""
    prefix = engine.state_prefix(astronaut_state)
    n = astronaut_state.num_tokens
    question = engine.question_ids(astronaut_state.metadata.messages, QUESTIONS[0])[0]
    batches = {}
    for fresh in (True, False):
        batch = batches[fresh] = engine.batch(fresh_rows=fresh)
        batch.add(prefix, decode.SamplingParams(0.0), 40, question)
        batch.prefill([question])
    (at, hole), = batches[True].cache.book.holes
    assert at == n and hole > 0 and batches[True].cache.book.ends[0] == batches[True].cache.book.lengths[0] + hole
    fresh, contiguous = batches[True].cache, batches[False].cache
    for (a, b), (c, d) in zip(fresh.row_state(0), contiguous.row_state(0)):
        assert _same(a, c) and _same(b, d) and a.shape[2] == n + question.shape[0]
    for (a, b), (c, d) in zip(fresh.suffix_kv(0, question.shape[0]), contiguous.suffix_kv(0, question.shape[0])):
        assert _same(a, c) and _same(b, d)
    for cut in (n + 3, n - 5):  # into the row's own tokens, then back into the state
        for batch in batches.values():
            batch.cache.truncate(0, cut)
        tail = question[:8]  # from n - 5: past the state's end again
        logits = [batch.prefill([tail]) for batch in (batches[True], batches[False])]
        assert _same(logits[0], logits[1]) and torch.equal(logits[0].argmax(-1), logits[1].argmax(-1))
        for (a, b), (c, d) in zip(fresh.row_state(0), contiguous.row_state(0)):
            assert _same(a, c) and _same(b, d) and a.shape[2] == cut + 8
    for batch in batches.values():
        batch.cache.close()


def test_a_cut_back_to_the_states_end_stays_on_the_fresh_block(engine, astronaut_state, monkeypatch):
    """A conversation rolled back to the state's end (Qwen3.5's first turn boundary; Conversation._sync) keeps
    its row's own tokens on their fresh block: the next turn copies no block of the state, and answers as before."""
    copies = _count_copies(monkeypatch)
    n = astronaut_state.num_tokens
    question = engine.question_ids(astronaut_state.metadata.messages, QUESTIONS[2])[0]
    batch = engine.batch()
    batch.add(engine.state_prefix(astronaut_state), decode.SamplingParams(0.0), N, question)
    first = batch.prefill([question])
    hole = batch.cache.book.holes[0]
    batch.cache.truncate(0, n)
    assert batch.cache.book.holes[0] == hole and batch.cache.book.ends[0] == n + hole[1]
    again = batch.prefill([question])
    assert copies == [] and torch.equal(again, first)
    batch.cache.close()
