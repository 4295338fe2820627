"""Every per-row rule of the decode step (vlcache.decode.sampling) against transformers: each generation-config
setting answers as generate() does on the uncached conversation, alone and batched with rows of other settings;
settings no step honours are refused; OpenAI's extras (logit_bias, frequency/presence penalties, logprobs) and a
grammar's mask per row."""

import copy
import json
import shutil

import pytest
import torch
from transformers.generation.logits_process import (
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    LogitsProcessor,
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from conftest import SYSTEM, photo
from reference import _inputs
from vlcache import Engine, cli, decode
from vlcache.commands.common import overrides
from vlcache.decode import rules
from vlcache.decode.constraint import TokenSequences, allowed, set_allowed, words
from vlcache.decode.sampling import RowSampling, SamplingParams
from vlcache.errors import ModelLoadError, VlcacheError
from vlcache.prompt import conversation

N = 64
QUESTION = "Describe the image."
PIXELS = 160 * 160


class Case:
    """A model, a cached image and the uncached conversation's inputs for generate()."""

    def __init__(self, engine, image, max_pixels=None):
        self.engine, self.image = engine, image
        self.state = engine.cache_image(image, system_prompt=SYSTEM, max_pixels=max_pixels)
        self.inputs = _inputs(engine, conversation(SYSTEM, QUESTION, with_image=True), image, max_pixels)
        self.prompt = self.inputs["input_ids"].shape[1]
        self.new_ids = engine.question_ids(self.state.metadata.messages, QUESTION)
        self.tokenizer = engine.processor.tokenizer

    def generate(self, settings: dict, eos: list[int], n: int = N, **extra) -> list[int]:
        kwargs = {"tokenizer": self.tokenizer} if "stop_strings" in settings else {}
        with torch.inference_mode():
            out = self.engine.model.generate(**self.inputs, max_new_tokens=n, eos_token_id=eos,
                                             **{"do_sample": False, **settings}, **kwargs, **extra)
        return out[0, self.prompt:].tolist()

    def params(self, settings: dict, eos: list[int], **options) -> SamplingParams:
        config = copy.deepcopy(self.engine.model.generation_config)
        config.update(**{"do_sample": False, **settings})  # greedy, as generate() is asked here, unless told
        config.eos_token_id = eos
        return decode.sampling_params(config, **options)

    def rows(self, params: list[SamplingParams], eos: list[int], n: int = N, constraints=None) -> list[list[int]]:
        """The rows decoded together in one batch (vlcache's path: state prefix, question, decode steps)."""
        engine = self.engine
        batch = decode.Batch(engine.model, engine.family.positions, frozenset(eos), engine.device, engine.dtype,
                             tokenizer=self.tokenizer)
        prefix = engine.state_prefix(self.state)
        seen = torch.cat([self.state.input_ids[0], self.new_ids[0]])
        for i, p in enumerate(params):
            batch.add(prefix, p, n, seen, (constraints or {}).get(i))
        out: list[list[int]] = [[] for _ in params]
        for step in decode.generate(batch, [self.new_ids[0]] * len(params)):
            for i, token in enumerate(step):
                if token is not None:
                    out[i].append(token)
        return out


@pytest.fixture(scope="module")
def qwen(engine):
    return Case(engine, photo("astronaut.png"))


@pytest.fixture(scope="module")
def llava(family_engine):
    return Case(family_engine("llava_onevision"), photo("rocket.jpg"), PIXELS)


def straddling(tokenizer, ids: list[int], start: int, skip_special_tokens: bool = False) -> tuple[str, int, int]:
    """A string of decode(ids) across a token boundary after `start` (up to two characters before it, three or
    four in all, over two or more tokens), first found there: (the string, where it starts in the text, the
    index of the token it begins in)."""
    text = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    decoded = lambda n: tokenizer.decode(ids[:n], skip_special_tokens=skip_special_tokens)  # noqa: E731
    for i in range(start, len(ids) - 1):
        before, a, b = decoded(i), decoded(i + 1), decoded(i + 2)
        if not text.startswith(b) or len(a) == len(before) or len(b) == len(a):
            continue
        at = len(a) - min(2, len(a) - len(before))
        stop = text[at: at + 4]  # at least one character after the boundary
        if len(stop) >= 3 and stop.isprintable() and "\ufffd" not in stop and text.find(stop) == at:
            return stop, at, i
    raise AssertionError("no token boundary to put a stop string across")


def _settings(case: Case) -> tuple[list[int], list[dict], list[int], list[dict]]:
    """Settings that change this model's greedy answer, derived from it: (eos, settings with the model's eos;
    eos', settings that need an end-of-sequence token the answer reaches)."""
    eos = sorted(case.engine.eos_ids)
    plain = case.generate({}, eos)
    common = max(set(plain), key=plain.count)
    stop, _, _ = straddling(case.tokenizer, plain, 10)
    first = [settings for settings in (
        {"no_repeat_ngram_size": 2},
        {"repetition_penalty": 1.3},
        {"suppress_tokens": [common]},
        {"begin_suppress_tokens": [plain[0]]},
        {"bad_words_ids": [[common], [plain[1], plain[2]]]},
        {"sequence_bias": [[[common], -3.0], [[plain[5], plain[6]], 8.0]]},
        {"forced_eos_token_id": plain[0] + 1},
        {"stop_strings": [stop]},
        {"remove_invalid_values": True},  # no effect on finite logits
        {"forced_bos_token_id": 3},  # no effect after a prompt (it forces the first token of a sequence)
    )]
    # A second end-of-sequence token: one the answer reaches late (the length rules keep it from ending).
    late = next(t for i, t in enumerate(plain) if i >= 12 and t not in plain[:i])
    ends = eos + [late]
    reached = plain.index(late)
    second = [{"min_new_tokens": reached + 8}, {"min_length": case.prompt + reached + 12},
              {"exponential_decay_length_penalty": (2, 1.5)}]
    return eos, first, ends, second


@pytest.mark.parametrize("family", ["qwen", "llava"])
def test_every_generation_setting_answers_as_generate_alone_and_batched(family, request):
    case = request.getfixturevalue(family)
    eos, first, ends, second = _settings(case)
    for group, group_eos in ((first, eos), ([{}] + second, ends)):
        plain = case.generate({}, group_eos)
        params = [case.params(s, group_eos) for s in group]
        batched = case.rows(params, group_eos)
        for settings, p, row in zip(group, params, batched):
            expected = case.generate(settings, group_eos)
            assert row == expected, settings
            assert case.rows([p], group_eos)[0] == expected, settings  # alone
            if settings and not {"remove_invalid_values", "forced_bos_token_id"} & set(settings):
                assert expected != plain, f"{settings} does not change this answer: the test would not see it"
        if "stop_strings" in str(group):
            stopped = batched[[i for i, s in enumerate(group) if "stop_strings" in s][0]]
            assert len(stopped) < N


@pytest.mark.parametrize("family", ["qwen", "llava"])
def test_sampling_filters_that_keep_one_token_answer_as_generate_samples(family, request):
    """Sampling rows whose filters leave one token (so any draw takes it): generate(do_sample=True) with the same
    settings chooses the same 64 tokens, alone and batched with a greedy row. Typical-p keeps the token whose
    surprise is nearest the entropy (after the temperature and top-k): not the greedy one."""
    case = request.getfixturevalue(family)
    eos = sorted(case.engine.eos_ids)
    group = [{"do_sample": True, "typical_p": 1e-9},
             {"do_sample": True, "temperature": 0.6, "top_k": 3, "typical_p": 1e-9},
             {"do_sample": True, "temperature": 1.5, "min_p": 1.0},
             {"do_sample": True, "top_k": 0, "epsilon_cutoff": 0.9, "eta_cutoff": 0.9},
             {}]
    params = [case.params(s, eos) for s in group]
    assert [p.greedy for p in params] == [False] * 4 + [True]
    batched = case.rows(params, eos)
    plain = case.generate({}, eos)
    for settings, p, row in zip(group, params, batched):
        expected = case.generate(settings, eos)
        assert row == expected, settings
        assert case.rows([p], eos)[0] == expected, settings
    assert batched[0] != plain and batched[1] != plain and batched[0] != batched[1]


def _folder_with(tmp_path, source, name: str, settings: dict):
    folder = tmp_path / name
    shutil.copytree(source, folder)
    config = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**config, **settings}))
    return folder


def test_a_checkpoints_generation_config_is_honoured_and_beams_are_refused(tiny_model_dir, qwen, tmp_path, capsys):
    # The case: no_repeat_ngram_size in generation_config.json, honoured by ask (and by generate()).
    folder = _folder_with(tmp_path, tiny_model_dir, "ngram", {"no_repeat_ngram_size": 3})
    engine = Engine.load(str(folder), device="cpu")
    answer = engine.ask(qwen.state, QUESTION, max_new_tokens=N)
    assert answer.token_ids == qwen.generate({"no_repeat_ngram_size": 3}, sorted(qwen.engine.eos_ids))
    assert answer.token_ids != qwen.generate({}, sorted(qwen.engine.eos_ids))
    # An override at load replaces the file's setting.
    plain = Engine.load(str(folder), device="cpu", generation_config={"no_repeat_ngram_size": 0})
    assert plain.ask(qwen.state, QUESTION, max_new_tokens=N).token_ids == qwen.generate({}, sorted(qwen.engine.eos_ids))
    # num_beams: refused at load in one line naming the setting and the override.
    beams = _folder_with(tmp_path, tiny_model_dir, "beams", {"num_beams": 4})
    with pytest.raises(ModelLoadError) as refused:
        Engine.load(str(beams), device="cpu")
    message = str(refused.value)
    assert "\n" not in message and "num_beams=4" in message and "--generation-config num_beams=1" in message
    assert Engine.load(str(beams), device="cpu", generation_config={"num_beams": 1}).model.generation_config.num_beams == 1
    # The CLI: the refusal is one line and exit 1, nothing on stdout; the override it names works.
    ask = ["ask", "--model", str(beams), "--prompt", "Hello!", "--max-new-tokens", "2", "--device", "cpu"]
    assert cli.main(ask) == 1
    refused_cli = capsys.readouterr()
    assert refused_cli.out == "" and "Traceback" not in refused_cli.err
    assert refused_cli.err.strip().splitlines()[-1] == f"error: {message}"
    assert cli.main(ask + ["--generation-config", "num_beams=1"]) == 0
    assert capsys.readouterr().out.strip()
    # The CLI takes the override as KEY=VALUE or a JSON file; a malformed one is an argument error.
    file = tmp_path / "gen.json"
    file.write_text(json.dumps({"num_beams": 1, "top_k": 5}))
    args = cli.build_parser().parse_args(["check", "--generation-config", "num_beams=1", "--generation-config", str(file)])
    assert overrides(args) == {"num_beams": 1, "top_k": 5}
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["check", "--generation-config", "not a setting"])
    with pytest.raises(ModelLoadError, match="'no_such_setting' is not a generation setting"):
        Engine.load(str(folder), device="cpu", generation_config={"no_such_setting": 1})


def test_settings_that_need_another_decoding_loop_are_refused():
    from transformers import GenerationConfig

    assert rules.refusal(GenerationConfig()) is None
    assert rules.refusal(GenerationConfig(num_beams=1, guidance_scale=1.0)) is None
    for settings, name in (({"guidance_scale": 3.0}, "guidance_scale"), ({"penalty_alpha": 0.6, "top_k": 4}, "penalty_alpha"),
                           ({"num_return_sequences": 2}, "num_return_sequences"), ({"max_time": 5.0}, "max_time")):
        config = GenerationConfig()
        for key, value in settings.items():
            setattr(config, key, value)
        why = rules.refusal(config)
        assert why and f"{name}=" in why and "--generation-config" in why, settings


@pytest.mark.parametrize("settings, fragment", [
    ({"no_repeat_ngram_size": "three"}, 'no_repeat_ngram_size="three" is not a value it takes'),
    ({"suppress_tokens": 5}, "suppress_tokens=5 is not a value it takes"),
    ({"bad_words_ids": [[]]}, "bad_words_ids=[[]] is not a value it takes"),
    ({"sequence_bias": {"a": 1}}, 'sequence_bias={"a": 1} is not a value it takes'),
    ({"stop_strings": 7}, "stop_strings=7 is not a value it takes"),
    ({"exponential_decay_length_penalty": 3}, "exponential_decay_length_penalty=3 is not a value it takes"),
    ({"do_sample": True, "temperature": -1.0}, "temperature must be a number in 0.0..inf, got -1.0"),
    ({"top_p": 2}, "top_p must be a number in 0.0..1.0, got 2"),
])
def test_a_value_no_rule_takes_is_refused_at_load_naming_it(settings, fragment):
    from transformers import GenerationConfig

    config = GenerationConfig()
    for key, value in settings.items():
        setattr(config, key, value)
    with pytest.raises(ValueError) as refused:
        for temperature in (None, 1.0):  # what Engine.load checks
            decode.sampling_params(config, temperature).check()
    assert fragment in str(refused.value) and "\n" not in str(refused.value)


def test_a_value_no_rule_takes_fails_the_load_not_the_first_question(tiny_model_dir):
    with pytest.raises(ModelLoadError) as refused:
        Engine.load(str(tiny_model_dir), device="cpu", generation_config={"no_repeat_ngram_size": "three"})
    assert 'no_repeat_ngram_size="three" is not a value it takes' in str(refused.value)
    assert "--generation-config KEY=VALUE" in str(refused.value)
    with pytest.raises(ModelLoadError, match="generation setting bad_words_ids names token 99999, the model has"):
        Engine.load(str(tiny_model_dir), device="cpu", generation_config={"bad_words_ids": [[5], [7, 99999]]})


def test_every_setting_of_this_transformers_is_applied_ignored_for_a_reason_or_refused():
    """Each GenerationConfig setting is in exactly one class; one no class names (a newer transformers') is
    refused when a checkpoint sets it, never dropped."""
    from transformers import GenerationConfig

    names = set(vars(GenerationConfig()))
    classes = [set(rules.APPLIED), set(rules.NO_EFFECT), set(rules._REFUSED)]
    assert set().union(*classes) == names
    assert sum(len(c) for c in classes) == len(names)  # no setting in two classes

    class Newer(GenerationConfig):
        def __init__(self, **kwargs):
            self.novel_penalty = kwargs.pop("novel_penalty", None)
            super().__init__(**kwargs)

    assert rules.refusal(Newer()) is None
    why = rules.refusal(Newer(novel_penalty=1.5))
    assert why and "novel_penalty" in why and "--generation-config novel_penalty=null" in why and "\n" not in why
    assert rules.refusal(GenerationConfig(assistant_early_exit=4)).startswith("the model's generation config sets assistant_early_exit=4")


def test_a_stop_string_ends_ask_with_finish_reason_stop(tiny_model_dir, qwen, tmp_path):
    eos = sorted(qwen.engine.eos_ids)
    _, first, _, _ = _settings(qwen)
    stop = next(s for s in first if "stop_strings" in s)
    engine = Engine.load(str(tiny_model_dir), device="cpu", generation_config=stop)
    answer = engine.ask(qwen.state, QUESTION, max_new_tokens=N)
    assert answer.token_ids == qwen.generate(stop, eos)
    assert answer.finish_reason == "stop" and len(answer.token_ids) < N


# -- OpenAI's extras --------------------------------------------------------------------------------------

class OpenAIPenalties(LogitsProcessor):
    """OpenAI's frequency and presence penalties, as documented: over the generated tokens only."""

    def __init__(self, prompt: int, frequency: float, presence: float):
        self.prompt, self.frequency, self.presence = prompt, frequency, presence

    def __call__(self, input_ids, scores):
        counts = torch.zeros_like(scores)
        generated = input_ids[:, self.prompt:]
        counts.scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - counts * self.frequency - (counts > 0).to(scores.dtype) * self.presence


def test_frequency_and_presence_penalties_follow_openais_formula(qwen):
    eos = sorted(qwen.engine.eos_ids)
    plain = qwen.generate({}, eos)
    cases = [(0.8, 0.0), (0.0, 1.5), (0.6, 0.4)]
    params = [qwen.params({}, eos)] + [qwen.params({}, eos, frequency_penalty=f, presence_penalty=p) for f, p in cases]
    rows = qwen.rows(params, eos)
    assert rows[0] == plain
    for (f, p), row in zip(cases, rows[1:]):
        expected = qwen.generate({}, eos, logits_processor=LogitsProcessorList([OpenAIPenalties(qwen.prompt, f, p)]))
        assert row == expected and row != plain, (f, p)
    answer = qwen.engine.ask(qwen.state, QUESTION, max_new_tokens=N, frequency_penalty=0.8)
    assert answer.token_ids == rows[1]


def test_logit_bias_forces_a_token_in_its_row_only(qwen):
    eos = sorted(qwen.engine.eos_ids)
    plain = qwen.generate({}, eos, n=16)
    token = next(t for t in range(5, 400) if t not in plain)
    rows = qwen.rows([qwen.params({}, eos), qwen.params({}, eos, logit_bias={token: 100})], eos, n=16)
    assert rows[0] == plain and rows[1] == [token] * 16
    answer = qwen.engine.ask(qwen.state, QUESTION, max_new_tokens=4, logit_bias={token: 100})
    assert answer.token_ids == [token] * 4
    with pytest.raises(VlcacheError, match="logit_bias values must be in -100..100"):
        qwen.engine.ask(qwen.state, QUESTION, max_new_tokens=4, logit_bias={token: 101})
    with pytest.raises(VlcacheError, match="logit_bias names token 10000000, the model's vocabulary has"):
        qwen.engine.ask(qwen.state, QUESTION, max_new_tokens=4, logit_bias={10**7: 1})
    with pytest.raises(VlcacheError, match="unknown generation option 'logit_biases'"):
        qwen.engine.ask(qwen.state, QUESTION, max_new_tokens=4, logit_biases={token: 1})


def test_logprobs_equal_the_uncached_models_log_softmax(qwen):
    engine, eos = qwen.engine, sorted(qwen.engine.eos_ids)
    answer = engine.ask(qwen.state, QUESTION, max_new_tokens=12, logprobs=5)
    with torch.inference_mode():
        out = engine.model.generate(**qwen.inputs, max_new_tokens=12, do_sample=False, eos_token_id=eos,
                                    output_logits=True, return_dict_in_generate=True)
    assert answer.token_ids == out.sequences[0, qwen.prompt:].tolist()
    assert len(answer.logprobs) == len(answer.token_ids)
    for token, lp, logits in zip(answer.token_ids, answer.logprobs, out.logits):
        expected = torch.log_softmax(logits[0].float(), dim=-1)
        assert lp.token == token and lp.top[0][0] == token  # greedy: the chosen token is the most likely
        assert abs(lp.logprob - expected[token].item()) < 1e-4
        values, ids = torch.topk(expected, 5)
        assert [t for t, _ in lp.top] == ids.tolist()
        assert max(abs(v - e) for (_, v), e in zip(lp.top, values.tolist())) < 1e-4
    # A sampled row: after its temperature, against one uncached forward over the whole answer.
    sampled = engine.ask(qwen.state, QUESTION, max_new_tokens=8, temperature=0.7, seed=3, logprobs=2)
    assert engine.ask(qwen.state, QUESTION, max_new_tokens=8, temperature=0.7, seed=3).token_ids == sampled.token_ids
    ids = torch.cat([qwen.inputs["input_ids"], torch.tensor([sampled.token_ids])], dim=1)
    inputs = {**qwen.inputs, "input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if "mm_token_type_ids" in inputs:  # the answer's tokens are text
        types = inputs["mm_token_type_ids"]
        inputs["mm_token_type_ids"] = torch.cat([types, types.new_zeros(1, len(sampled.token_ids))], dim=1)
    with torch.inference_mode():
        logits = engine.model(**inputs).logits[0, qwen.prompt - 1: -1].float()
    expected = torch.log_softmax(logits / 0.7, dim=-1)
    for i, (token, lp) in enumerate(zip(sampled.token_ids, sampled.logprobs)):
        assert abs(lp.logprob - expected[i, token].item()) < 1e-4 and len(lp.top) == 2
    assert engine.ask(qwen.state, QUESTION, max_new_tokens=4).logprobs is None  # not asked: none


# -- a grammar's mask -------------------------------------------------------------------------------------

def test_a_constraint_masks_its_row_only_and_ends_it(qwen):
    eos = sorted(qwen.engine.eos_ids)
    plain = qwen.generate({}, eos, n=16)
    a, b, c, d = [t for t in range(10, 400) if t not in plain][:4]
    sequences = [[a, b, c], [a, d, b, c, d]]
    grammar = TokenSequences(sequences)
    rows = qwen.rows([qwen.params({}, eos), qwen.params({}, eos), qwen.params({}, eos)], eos, n=16,
                     constraints={1: grammar})
    assert rows[0] == rows[2] == plain  # unconstrained rows: as alone
    assert rows[1] in sequences and grammar.is_terminated()
    # generate() with the same constraint as its logits processor chooses the same tokens
    allowed_next = lambda _, ids: [s[len(ids) - qwen.prompt] for s in sequences  # noqa: E731
                                   if len(s) > len(ids) - qwen.prompt and list(s[: len(ids) - qwen.prompt]) == ids[qwen.prompt:].tolist()] or [eos[0]]
    assert qwen.generate({}, eos, n=len(rows[1]), prefix_allowed_tokens_fn=allowed_next) == rows[1]
    answer = qwen.engine.ask(qwen.state, QUESTION, max_new_tokens=16, constraint=lambda: TokenSequences(sequences))
    assert answer.token_ids == rows[1] and answer.finish_reason == "stop"


def test_the_bitmask_is_xgrammars_format():
    row = torch.zeros(words(70), dtype=torch.int32)
    assert row.shape == (3,)
    set_allowed(row, [0, 31, 33, 69])
    assert row.tolist() == [1 | -(1 << 31), 2, 32]  # bit 31 of word 0 is the int32 sign bit
    assert torch.nonzero(allowed(row.unsqueeze(0), 70)[0]).view(-1).tolist() == [0, 31, 33, 69]


# -- the sampling filters ---------------------------------------------------------------------------------

FILTERS = [SamplingParams(0.8, top_k=40, min_p=0.1), SamplingParams(1.2, top_k=None, typical_p=0.7),
           SamplingParams(1.0, top_k=50, top_p=0.9, epsilon_cutoff=0.01), SamplingParams(0.9, top_k=None, eta_cutoff=0.002),
           SamplingParams(1.0, top_k=30, top_p=0.8, min_p=0.05, typical_p=0.9, epsilon_cutoff=0.003, eta_cutoff=0.001),
           SamplingParams(0.7, top_k=10), SamplingParams(0.0)]


def _warpers(p: SamplingParams) -> LogitsProcessorList:
    """transformers' warpers for `p`, in GenerationMixin._get_logits_processor's order."""
    out = LogitsProcessorList([TemperatureLogitsWarper(p.temperature)])
    if p.top_k:
        out.append(TopKLogitsWarper(p.top_k))
    if p.top_p is not None:
        out.append(TopPLogitsWarper(p.top_p))
    if p.min_p is not None:
        out.append(MinPLogitsWarper(p.min_p))
    if p.typical_p is not None:
        out.append(TypicalLogitsWarper(p.typical_p))
    if p.epsilon_cutoff:
        out.append(EpsilonLogitsWarper(p.epsilon_cutoff))
    if p.eta_cutoff:
        out.append(EtaLogitsWarper(p.eta_cutoff))
    return out


def test_sampling_filters_equal_transformers_warpers_row_by_row():
    torch.manual_seed(2)
    vocab = 300
    sampling = RowSampling(vocab, frozenset({7}), "cpu")
    for p in FILTERS:
        sampling.add(p, 10, torch.tensor([0]))
    for _ in range(5):
        logits = torch.randn(len(FILTERS), vocab) * 3
        mine = sampling.filtered(logits)
        for i, p in enumerate(FILTERS[:-1]):
            theirs = _warpers(p)(torch.zeros(1, 1, dtype=torch.long), logits[i: i + 1])[0]
            assert torch.equal(torch.isfinite(mine[i]), torch.isfinite(theirs)), p
            kept = torch.isfinite(theirs)
            assert torch.allclose(mine[i][kept], theirs[kept]), p
            assert kept.sum() < vocab  # the filter removed something: the comparison can fail


def test_seeded_rows_with_filters_draw_the_same_alone_or_batched():
    torch.manual_seed(3)
    logits = torch.randn(len(FILTERS), 12, 200) * 2
    seeded = [SamplingParams(**{**p.__dict__, "seed": 40 + i}) for i, p in enumerate(FILTERS)]

    def draw(params, rows):
        sampling = RowSampling(200, frozenset({7}), "cpu")
        for p in params:
            sampling.add(p, 100, torch.tensor([0]))
        return [sampling.sample(logits[rows, t])[0].tolist() for t in range(12)]

    batched = draw(seeded, list(range(len(FILTERS))))
    for i, p in enumerate(seeded):
        assert [step[0] for step in draw([p], [i])] == [step[i] for step in batched], p


# -- the case end to end ----------------------------------------------------------------------------

def test_llava_no_repeat_ngram_through_the_server_and_a_fresh_cli_equal_generate(family_dir, family_engine, tmp_path):
    """A LLaVA checkpoint whose generation_config.json sets no_repeat_ngram_size 3: a fresh process's batch from
    a cache file, a two-turn conversation and the server's answers (asked at once, so they share decode steps)
    equal generate(), which reads the same file; the setting changes answers (else this test could not fail)."""
    import concurrent.futures

    from reference import reference_for_messages, reference_tokens
    from test_cli import run
    from test_server import LiveServer, image_messages
    from vlcache.conversation import Conversation
    from vlcache.media import MediaOptions

    folder = _folder_with(tmp_path, family_dir("llava_onevision"), "llava-ngram", {"no_repeat_ngram_size": 3})
    engine = Engine.load(str(folder), device="cpu")
    questions = [QUESTION, "What is in the picture?", "What colors dominate the scene?"]  # the last: no 3-gram repeats
    expected = [reference_tokens(engine, photo("rocket.jpg"), SYSTEM, q, N, max_pixels=PIXELS) for q in questions]
    plain = family_engine("llava_onevision")
    unbanned = [reference_tokens(plain, photo("rocket.jpg"), SYSTEM, q, N, max_pixels=PIXELS) for q in questions]
    assert [e != u for e, u in zip(expected, unbanned)] == [True, True, False]
    # A fresh process: the model from the cache file's metadata, its generation config from the folder.
    cache = engine.cache_image(photo("rocket.jpg"), system_prompt=SYSTEM, max_pixels=PIXELS).save(tmp_path / "rocket.pt")
    prompts = [arg for q in questions for arg in ("--prompt", q)]
    asked = run("ask", "--cache", cache, *prompts, "--max-new-tokens", N, "--temperature", 0, "--json")
    assert asked.returncode == 0, asked.stderr
    assert [json.loads(line)["token_ids"] for line in asked.stdout.splitlines()] == expected
    # A conversation: the second turn's rule reads the first turn and its answer, as generate() does.
    talk, messages = Conversation(engine, engine.load_state(cache)), [{"role": "system", "content": SYSTEM}]
    for i, question in enumerate(questions[:2]):
        answer = talk.ask(question, max_new_tokens=N, temperature=0)
        messages.append({"role": "user", "content": ([{"type": "image"}] if i == 0 else []) + [{"type": "text", "text": question}]})
        assert answer.token_ids == reference_for_messages(engine, messages, photo("rocket.jpg"), N, max_pixels=PIXELS), i
        messages.append({"role": "assistant", "content": answer.text})
    # The server, through the openai client.
    live = LiveServer(engine, tmp_path / "states", media=MediaOptions(max_pixels=PIXELS))
    try:
        def chat(question):
            return live.client.chat.completions.create(model="m", messages=image_messages("rocket.jpg", question),
                                                       max_tokens=N, temperature=0)

        first = chat(questions[0])  # makes the state; the others share it, asked at once
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            replies = [first, *pool.map(chat, questions[1:])]
    finally:
        live.close()
    for reply, tokens in zip(replies, expected):
        assert reply.choices[0].message.content == engine.processor.tokenizer.decode(tokens, skip_special_tokens=True)
        assert reply.usage.completion_tokens == len(tokens)


def test_a_requests_stop_strings_across_token_boundaries_cut_exactly(qwen, tmp_path):
    """OpenAI's `stop`, through the live server: a stop string made of the end of one token and the start of
    the next cuts the answer just before it, streamed and not; of two stop strings the earlier one wins."""
    from reference import reference_tokens
    from test_server import LiveServer, image_messages

    engine, question = qwen.engine, "Describe the image."
    ids = reference_tokens(engine, photo("chelsea.png"), SYSTEM, question, N)
    whole = qwen.tokenizer.decode(ids, skip_special_tokens=True)
    stop, at, token = straddling(qwen.tokenizer, ids, 1, skip_special_tokens=True)
    later, _, _ = straddling(qwen.tokenizer, ids, token + 2, skip_special_tokens=True)
    live = LiveServer(engine, tmp_path / "states")
    try:
        def chat(**kwargs):
            return live.client.chat.completions.create(model="m", messages=image_messages("chelsea.png", question),
                                                       max_tokens=N, temperature=0, **kwargs)

        assert chat().choices[0].message.content == whole
        for stops in ([stop], [later, stop]):
            cut = chat(stop=stops)
            assert cut.choices[0].message.content == whole[:at] and cut.choices[0].finish_reason == "stop", stops
            streamed = "".join(c.choices[0].delta.content or "" for c in chat(stop=stops, stream=True) if c.choices)
            assert streamed == whole[:at], stops
        assert chat(stop=[later]).choices[0].message.content == whole[: whole.index(later)] != whole[:at]
    finally:
        live.close()


# -- every family ---------------------------------------------------------------------------------------------

def _every_family():
    from vlcache.testing.families import KINDS

    # Qwen3-VL and LLaVA-OneVision run every setting above; LLaVA-NeXT has no family: the generic adapter.
    return [k for k in KINDS if k not in ("qwen3_vl", "llava_onevision", "llava_next")] + ["generic"]


@pytest.mark.parametrize("kind", _every_family())
def test_rules_that_read_the_prompt_answer_as_generate_in_every_family(kind, family_dir, family_engine):
    """The rules read the ids generate() is given (the state's and the question's) and the family's tokenizer:
    per family, rows with the n-gram rule, the repetition penalty with a sequence bias and the first-token
    suppression, a stop string across a token boundary, the length rules with a suppressed token, and a plain
    row, decoded together, each equal generate() over 64 tokens."""
    if kind == "generic":
        engine = Engine.load(str(family_dir("llava_next")), device="cpu", unchecked=True)
        assert engine.family.name == "generic"
    else:
        engine = family_engine(kind)
    case = Case(engine, photo("chelsea.png"), PIXELS)
    eos = sorted(engine.eos_ids)
    plain = case.generate({}, eos)
    vocab = engine.model.get_output_embeddings().weight.shape[0]
    for last in range(vocab - 1, vocab - 6, -1):  # an early end: another end token, on both sides, so 64 tokens come
        if len(plain) == N:
            break
        eos = [last]
        plain = case.generate({}, eos)
    assert len(plain) == N
    stop, _, _ = straddling(case.tokenizer, plain, 4)  # this family's tokenizer decides where tokens meet
    group = [{"no_repeat_ngram_size": 2},
             {"repetition_penalty": 1.3, "sequence_bias": [[[plain[3], plain[4]], 4.0]], "begin_suppress_tokens": [plain[0]]},
             {"stop_strings": [stop]},
             # the length rules count the prompt as generate() does; an early end token is held off
             {"min_length": case.prompt + 12, "exponential_decay_length_penalty": (20, 1.2), "suppress_tokens": [plain[2]]},
             {}]
    rows = case.rows([case.params(s, eos) for s in group], eos)
    expected = [case.generate(s, eos) for s in group]
    assert rows == expected
    assert expected[1] != plain  # the first token is banned: this row would see a rule left out
    assert len(expected[2]) < len(plain)  # the stop string ended the row
    assert expected[3][:2] == plain[:2] and expected[3][2] != plain[2]  # the suppressed token


def test_a_stop_criterion_is_made_once_per_tokenizer(qwen, monkeypatch):
    """Making transformers' StopStringCriteria reads the whole vocabulary: batches share one per tokenizer."""
    import transformers

    from vlcache.decode import sampling

    made = []
    real = transformers.StopStringCriteria
    monkeypatch.setattr(transformers, "StopStringCriteria", lambda *a, **k: made.append(a[1]) or real(*a, **k))
    eos = sorted(qwen.engine.eos_ids)
    params = qwen.params({"stop_strings": ["never-said-xyz"]}, eos)
    first = qwen.rows([params], eos, n=4)
    assert qwen.rows([params, params], eos, n=4) == [first[0]] * 2
    assert made == [["never-said-xyz"]]  # one for three rows in two batches (no other test uses this string)
    assert sampling._stop_criteria(qwen.tokenizer, ("never-said-xyz",)) is sampling._stop_criteria(qwen.tokenizer, ("never-said-xyz",))
