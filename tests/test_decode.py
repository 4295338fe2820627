"""The one decode path (vlcache.decode): batched sampling on the device, invariance of a row's tokens to what
it is batched with, where its state came from and which step ran it, and controls for stale buffers."""

import time

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from conftest import SYSTEM, photo
from test_families import KINDS, PIXELS
from vlcache import Engine, decode
from vlcache.decode import kvpool as kvpool_module
from vlcache.decode import rows as rows_module
from vlcache.decode.sampling import RowSampling, SamplingParams
from vlcache.decode.step import StepRunner

N = 12
QUESTIONS = ["What objects are visible in this image?", "What colors dominate the scene?", "Describe the lighting and mood."]
EOS = frozenset({7})


# -- sampling ----------------------------------------------------------------------------------------------

def _sampling(params: list[SamplingParams], vocab: int, limit: int = 100, seen=None) -> RowSampling:
    sampling = RowSampling(vocab, EOS, "cpu")
    for i, p in enumerate(params):
        sampling.add(p, limit, seen[i] if seen is not None else torch.tensor([0]))
    return sampling


def test_a_seeded_row_draws_the_same_tokens_alone_or_batched_with_any_others():
    torch.manual_seed(0)
    logits = torch.randn(6, 20, 300)  # 6 rows, 20 steps
    mine = SamplingParams(temperature=0.8, top_p=0.9, top_k=40, seed=1234)
    others = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.3, seed=5),
              SamplingParams(temperature=0.5, top_k=3, seed=9), SamplingParams(temperature=1.0, top_p=0.5),
              SamplingParams(temperature=0.7)]  # the last: no top-k, so the batch sorts the whole vocabulary
    alone, batched = _sampling([mine], 300), _sampling([mine] + others, 300)
    a = [alone.sample(logits[0:1, t])[0].item() for t in range(20)]
    b = [batched.sample(logits[:, t])[0][0].item() for t in range(20)]
    assert a == b
    assert len(set(a)) > 5  # it really samples
    again = _sampling([mine], 300)
    assert [again.sample(logits[0:1, t])[0].item() for t in range(20)] == a  # repeatable
    other_seed = _sampling([SamplingParams(temperature=0.8, top_p=0.9, top_k=40, seed=1235)], 300)
    assert [other_seed.sample(logits[0:1, t])[0].item() for t in range(20)] != a  # control: the seed matters


def _transformers_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    processors = LogitsProcessorList([TemperatureLogitsWarper(params.temperature)])
    if params.top_k:
        processors.append(TopKLogitsWarper(params.top_k))
    if params.top_p is not None:
        processors.append(TopPLogitsWarper(params.top_p))
    return torch.softmax(processors(torch.zeros(1, 1, dtype=torch.long), logits.unsqueeze(0)), dim=-1)[0]


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.7, top_k=10, top_p=0.8),
                                    SamplingParams(temperature=1.5, top_p=0.6),
                                    SamplingParams(temperature=1.0, top_k=5)])
def test_draws_follow_transformers_distribution(params):
    """Thousands of rows (one seed each) in one step: every token drawn is one transformers' warpers keep, and
    the frequencies match their probabilities."""
    torch.manual_seed(1)
    logits = torch.randn(50) * 2
    expected = _transformers_probs(logits, params)
    rows = 6000
    sampling = _sampling([SamplingParams(params.temperature, params.top_p, params.top_k, seed=s) for s in range(rows)], 50)
    tokens, done = sampling.sample(logits.expand(rows, 50))
    assert not done.any()
    counts = torch.bincount(tokens, minlength=50).float() / rows
    assert set(tokens.tolist()) <= set(torch.nonzero(expected).view(-1).tolist())
    assert (counts - expected).abs().max() < 0.03


def test_greedy_rows_take_the_argmax_after_the_repetition_penalty():
    torch.manual_seed(2)
    logits = torch.randn(2, 40)
    seen = [torch.tensor([int(logits[0].argmax()), 3]), torch.tensor([0])]
    params = [SamplingParams(temperature=0.0, repetition_penalty=3.0), SamplingParams(temperature=0.0)]
    tokens, _ = _sampling(params, 40, seen=seen).sample(logits)
    expected = RepetitionPenaltyLogitsProcessor(3.0)(seen[0].unsqueeze(0), logits[0:1].clone()).argmax(-1)
    assert tokens[0] == expected[0] and tokens[0] != logits[0].argmax()  # the penalty changed the choice
    assert tokens[1] == logits[1].argmax()


def test_stop_rules_and_broken_rows_are_decided_on_the_device():
    logits = torch.full((3, 10), -5.0)
    logits[0, 7] = 5.0  # row 0 picks the end-of-sequence id
    logits[1, 2] = 5.0
    logits[2] = float("nan")  # row 2: a broken distribution
    sampling = _sampling([SamplingParams(0.0), SamplingParams(0.0), SamplingParams(1.0, seed=1)], 10, limit=2)
    tokens, done = sampling.sample(logits)
    assert tokens.tolist() == [7, 2, -1] and done.tolist() == [True, False, True]
    tokens, done = sampling.sample(logits)
    assert done.tolist() == [True, True, True]  # row 1 reached its limit of 2


# -- invariance of a row's tokens ------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def bf16_engines(family_dir):
    engines = {}

    def load(kind):
        if kind not in engines:
            engines[kind] = Engine.load(str(family_dir(kind)), device="cpu", dtype="bfloat16")
        return engines[kind]

    return load


def _rows(engine, rows, max_new_tokens=N):
    """Greedy tokens of rows [(state or None, question)] decoded together in one batch."""
    batch = engine.batch()
    new_ids = []
    for state, question in rows:
        if state is None:
            from vlcache import prompt

            ids = prompt.text_only_ids(engine.processor, None, question).to(engine.device)
            prefix, history = decode.Prefix(engine.empty_kv(), 0), ids[:, :0]
        else:
            ids, prefix, history = engine.question_ids(state.metadata.messages, question), engine.state_prefix(state), state.input_ids
        batch.add(prefix, SamplingParams(temperature=0.0), max_new_tokens, torch.cat([history[0], ids[0]]))
        new_ids.append(ids[0])
    out = [[] for _ in rows]
    for step in decode.generate(batch, new_ids):
        for i, token in enumerate(step):
            if token is not None:
                out[i].append(token)
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind", KINDS + ["gemma4"])  # Gemma 4: shared layers, layers of other K/V shapes
def test_a_rows_tokens_do_not_depend_on_its_batch_its_states_origin_or_the_step(kind, dtype, family_engine, bf16_engines,
                                                                                 tmp_path):
    engine = family_engine(kind) if dtype == "float32" else bf16_engines(kind)
    mine = engine.cache_image(photo("rocket.jpg"), system_prompt=SYSTEM, max_pixels=PIXELS)
    other = engine.cache_image(photo("chelsea.png"), system_prompt=None, max_pixels=PIXELS // 2)
    assert other.num_tokens != mine.num_tokens
    question = QUESTIONS[0]
    alone = engine.ask(mine, question, max_new_tokens=N, temperature=0).token_ids
    # 1. Batched with rows of another image and length (and, where layers can be padded, a text-only row).
    if engine.family.has_linear_layers:  # linear states cannot be padded into: the batch's questions are alike
        company = [(other, question), (mine, question)]
    else:
        company = [(other, QUESTIONS[2]), (None, "Tell me a long story about the sea, please."), (mine, QUESTIONS[1])]
    batched = _rows(engine, [(mine, question)] + company)
    assert batched[0] == alone
    assert batched[-1] == engine.ask(company[-1][0], company[-1][1], max_new_tokens=N, temperature=0).token_ids
    # 2. The state from a file.
    loaded = engine.load_state(mine.save(tmp_path / "s.pt"))
    assert engine.ask(loaded, question, max_new_tokens=N, temperature=0).token_ids == alone
    # 3. The fixed-shape step, traced (float32: the CPU stand-in for a CUDA graph of the eager step).
    if dtype == "float32":
        engine.runner = StepRunner(engine.model, "cpu", "eager")
        try:
            assert _rows(engine, [(mine, question)] + company)[0] == alone
            assert engine.ask(mine, question, max_new_tokens=N, temperature=0).token_ids == alone
            assert engine.runner.failed is None and {b for b, _ in engine.runner.shapes} == {1, decode.bucket(1 + len(company))}
        finally:
            engine.runner = None


# -- controls: the step must not read stale buffers ------------------------------------------------------------

def test_control_a_length_not_advanced_is_caught(engine, astronaut_state, monkeypatch):
    expected = engine.ask(astronaut_state, QUESTIONS[0], max_new_tokens=N, temperature=0).token_ids
    real = rows_module.RowsBook.begin

    def stale(self, logical, counts, batch=None, span=None):
        if logical.shape[1] == 1:  # decode steps: the token is written, the row's length stays
            real(self, logical, counts, batch, span)
            for i, n in enumerate(counts):
                self.lengths[i] -= n
            return
        real(self, logical, counts, batch, span)

    monkeypatch.setattr(rows_module.RowsBook, "begin", stale)
    assert engine.ask(astronaut_state, QUESTIONS[0], max_new_tokens=N, temperature=0).token_ids != expected


def test_a_slot_that_changes_hands_is_cleared_and_control(engine, astronaut_state, states_for_slots, monkeypatch):
    """Rows whose state is NaN leave; the row that takes their slot (and their freed blocks) answers as it would
    alone, next to a longer row (so the step spans the stale positions). Without zeroing reused blocks (control),
    the stale NaN poisons it: 0 probability times NaN is NaN."""
    good, poisoned = states_for_slots

    def run():
        batch = engine.batch()
        question = engine.question_ids(good.metadata.messages, QUESTIONS[0])
        long_q = engine.question_ids(poisoned.metadata.messages, "Describe everything in this picture in great detail.")
        # Two poisoned rows (two prefixes: two copies in the blocks) leave; their freed blocks keep NaN, more
        # of them than the next two prefixes take again.
        batch.add(engine.state_prefix(poisoned), SamplingParams(0.0), 4, long_q[0])
        batch.add(engine.state_prefix(poisoned), SamplingParams(0.0), 4, long_q[0])
        batch.sample(batch.prefill([long_q[0], long_q[0]]))
        batch.remove(1)
        batch.remove(0)
        batch.add(engine.state_prefix(good), SamplingParams(0.0), N, question[0])
        batch.add(engine.state_prefix(astronaut_state), SamplingParams(0.0), N, long_q[0])
        tokens = []
        for token, _ in decode.generate(batch, [question[0], long_q[0]]):
            if token is None:
                break
            tokens.append(token)
        return tokens

    expected = engine.ask(good, QUESTIONS[0], max_new_tokens=N, temperature=0).token_ids
    assert run() == expected
    monkeypatch.setattr(kvpool_module.KVPool, "zero", lambda self, kind, block: None)  # reused blocks keep NaN
    assert run() != expected


@pytest.fixture
def states_for_slots(engine, astronaut_state):
    small = engine.cache_image(photo("camera.png"), system_prompt=SYSTEM, max_pixels=64 * 64)
    poisoned = astronaut_state.to("cpu")
    poisoned.kv = [(torch.full_like(k, float("nan")), torch.full_like(v, float("nan"))) for k, v in astronaut_state.kv]
    assert small.num_tokens < poisoned.num_tokens  # the good row's slot has stale slots past its length
    return small, poisoned


# -- choosing the step ---------------------------------------------------------------------------------------

def test_auto_keeps_a_traced_step_only_where_the_probe_holds(engine, astronaut_state, monkeypatch):
    expected = engine.ask(astronaut_state, QUESTIONS[1], max_new_tokens=N, temperature=0).token_ids
    try:
        status = engine.compile_steps("on", buckets=[1, 2], backend="eager")
        assert status["step"] == "traced (eager backend)" and status["buckets"] == [1, 2]
        assert engine.ask(astronaut_state, QUESTIONS[1], max_new_tokens=N, temperature=0).token_ids == expected
        # A step whose numbers differ (as fused kernels' can) fails the probe: auto keeps the eager step.
        real = StepRunner.step

        def off_by_a_little(self, batch):
            logits = real(self, batch)
            return None if logits is None else logits + torch.linspace(0, 50, logits.shape[-1])

        monkeypatch.setattr(StepRunner, "step", off_by_a_little)
        status = engine.compile_steps("auto", buckets=[1], backend="eager")
        assert status["step"] == "eager" and "differs from generate() at token" in status["reason"]
        assert engine.runner is None
    finally:
        engine.compile_steps("off")
    assert engine.ask(astronaut_state, QUESTIONS[1], max_new_tokens=N, temperature=0).token_ids == expected


def test_a_step_that_fails_to_compile_falls_back_to_eager_with_one_note(engine, astronaut_state, caplog):
    expected = engine.ask(astronaut_state, QUESTIONS[2], max_new_tokens=N, temperature=0).token_ids
    engine.runner = StepRunner(engine.model, "cpu", "eager")

    def broken(*args):
        raise RuntimeError("no compiler here")

    engine.runner._compiled = broken
    try:
        with caplog.at_level("WARNING", logger="vlcache"):
            assert engine.ask(astronaut_state, QUESTIONS[2], max_new_tokens=N, temperature=0).token_ids == expected
            assert engine.ask(astronaut_state, QUESTIONS[2], max_new_tokens=N, temperature=0).token_ids == expected
        notes = [r.message for r in caplog.records if "compiled decode step failed" in r.message]
        assert notes == ["note: compiled decode step failed (RuntimeError: no compiler here); decoding eagerly"]
    finally:
        engine.runner = None


def test_the_server_decodes_through_the_compiled_step_and_reports_it(engine, tmp_path):
    """Several clients at once (batch buckets 1-4) through traced steps: the same answers as eager, /health says
    which step runs."""
    import concurrent.futures

    from test_server import LiveServer, image_messages

    questions = [QUESTIONS[0], QUESTIONS[1], "Is it day or night?"]

    def answers(live):
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            replies = list(pool.map(lambda q: live.client.chat.completions.create(
                model="m", messages=image_messages("camera.png", q), max_tokens=N, temperature=0), questions))
        return [r.choices[0].message.content for r in replies]

    live = LiveServer(engine, tmp_path / "eager")
    try:
        expected = answers(live)
        assert live.get("/health")[1]["decode"]["step"] == "eager"
    finally:
        live.close()
    engine.compile_steps("on", buckets=[1, 2, 4], backend="eager")
    live = LiveServer(engine, tmp_path / "traced", kv_memory=64 * 2**20)  # --kv-memory: admission by blocks
    try:
        assert answers(live) == expected
        deadline = time.monotonic() + 10  # a client has its last token before the model thread keeps the row's blocks
        while (health := live.get("/health")[1])["kv"]["blocks"]["full"]["used"] != \
                health["kv"]["blocks"]["full"].get("kept") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert health["decode"]["step"] == "traced (eager backend)" and health["decode"]["buckets"] == [1, 2, 4]
        kv = health["kv"]  # all answered: nothing reserved; the blocks still used are the kept conversations'
        assert kv["kv_memory"] == 64 * 2**20 and kv["reserved_bytes"] == 0
        full = kv["blocks"]["full"]
        assert full["used"] == full["kept"] > 0 and full["used"] * 16 >= 3 * N and full["peak"] >= full["used"]
    finally:
        live.close()
        engine.compile_steps("off")


def test_the_compiled_step_equals_generate_and_auto_says_what_it_chose(engine, astronaut_state):
    """torch.compile (inductor) of the fixed-shape step, on the CPU: the answer equals transformers' generate on
    the uncached conversation; --compile auto keeps it only if the probe held and it measured faster, and says why."""
    from reference import reference_tokens

    expected = reference_tokens(engine, photo("astronaut.png"), SYSTEM, QUESTIONS[0], N)
    engine.runner = StepRunner(engine.model, "cpu", "inductor")
    try:
        assert engine.ask(astronaut_state, QUESTIONS[0], max_new_tokens=N, temperature=0).token_ids == expected
        assert engine.runner.failed is None and {rows for rows, _ in engine.runner.shapes} == {1}
        status = engine.compile_steps("auto", buckets=[1])
        if status["step"] == "compiled":
            assert status["reason"].startswith("exact on the probe; ") and "vs eager" in status["reason"]
        else:
            assert status["step"] == "eager" and "not faster on this CPU" in status["reason"]
        assert engine.ask(astronaut_state, QUESTIONS[0], max_new_tokens=N, temperature=0).token_ids == expected
    finally:
        engine.compile_steps("off")


def test_turns_and_compiled_steps_that_grow_the_slots_between_them(engine, astronaut_state, monkeypatch):
    """Slots grown inside a forward are inference tensors: a conversation's next turn, and a compiled step after an
    eager prefill that grew them, must still write them (slots grow every 16 here, so every turn grows them). The
    compiled step's shape stays (bucket, span) whatever the slots grew to."""
    from reference import reference_for_messages
    from vlcache.conversation import Conversation

    monkeypatch.setattr(rows_module, "CAPACITY_STEP", 16)
    chat = Conversation(engine, astronaut_state)
    messages = [{"role": "system", "content": SYSTEM}]
    for i, question in enumerate(QUESTIONS):
        answer = chat.ask(question, max_new_tokens=N, temperature=0)
        messages.append({"role": "user", "content": ([{"type": "image"}] if i == 0 else []) + [{"type": "text", "text": question}]})
        assert answer.token_ids == reference_for_messages(engine, messages, photo("astronaut.png"), N), i
        messages.append({"role": "assistant", "content": answer.text})
    expected = engine.ask(astronaut_state, QUESTIONS[0], max_new_tokens=N, temperature=0).token_ids
    engine.runner = StepRunner(engine.model, "cpu", "eager")
    try:
        assert engine.ask(astronaut_state, QUESTIONS[0], max_new_tokens=N, temperature=0).token_ids == expected
        assert engine.runner.failed is None and engine.runner.shapes == {(1, engine.runner.span)}
        assert engine.runner.span == 4096  # the tiny model's context, in whole blocks
    finally:
        engine.runner = None


def test_a_turn_left_midway_does_not_leak_into_the_next_with_linear_layers(family_engine):
    """Qwen3.5: a caller stops reading a turn after two pieces; the next question answers as generate() does on
    the conversation without that turn (its linear states go back to the last whole turn)."""
    from reference import reference_for_messages
    from vlcache.conversation import Conversation

    engine = family_engine("qwen3_5")
    state = engine.cache_image(photo("rocket.jpg"), system_prompt=SYSTEM, max_pixels=PIXELS)
    chat = Conversation(engine, state)
    pieces = chat.stream(QUESTIONS[0], max_new_tokens=N, temperature=0)
    next(pieces), next(pieces)
    pieces.close()  # left midway
    answer = chat.ask(QUESTIONS[1], max_new_tokens=N, temperature=0)
    messages = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTIONS[1]}]}]
    assert answer.token_ids == reference_for_messages(engine, messages, photo("rocket.jpg"), N, max_pixels=PIXELS)


def test_sampling_follows_generate_on_ties_nan_and_defaults():
    from types import SimpleNamespace

    from vlcache.decode.sampling import DEFAULT_TOP_K, sampling_params

    # Top-k keeps every token tied with the k-th value, as TopKLogitsWarper does.
    logits = torch.tensor([3.0, 2.0, 2.0, 2.0, 0.0])
    rows = 400
    sampling = _sampling([SamplingParams(temperature=1.0, top_k=2, seed=s) for s in range(rows)], 5)
    drawn = set(sampling.sample(logits.expand(rows, 5))[0].tolist())
    assert drawn == {0, 1, 2, 3}
    # NaN logits are no answer for a greedy row, alone as in company.
    nan = torch.full((1, 5), float("nan"))
    assert _sampling([SamplingParams(0.0)], 5).sample(nan)[0].tolist() == [-1]
    # A temperature on a greedy model samples as generate(do_sample=True, temperature=T): top-k 50 by default.
    greedy_config = SimpleNamespace(do_sample=False, temperature=None, top_p=None, top_k=None, repetition_penalty=None)
    assert sampling_params(greedy_config, temperature=0.7).top_k == DEFAULT_TOP_K == 50
    assert sampling_params(greedy_config).greedy and sampling_params(greedy_config).top_k is None
