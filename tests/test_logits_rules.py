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
            out = self.engine.model.generate(**self.inputs, max_new_tokens=n, do_sample=False, eos_token_id=eos,
                                             **settings, **kwargs, **extra)
        return out[0, self.prompt:].tolist()

    def params(self, settings: dict, eos: list[int], **options) -> SamplingParams:
        config = copy.deepcopy(self.engine.model.generation_config)
        config.update(**settings)
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


def _settings(case: Case) -> tuple[list[int], list[dict], list[int], list[dict]]:
    """Settings that change this model's greedy answer, derived from it: (eos, settings with the model's eos;
    eos', settings that need an end-of-sequence token the answer reaches)."""
    eos = sorted(case.engine.eos_ids)
    plain = case.generate({}, eos)
    common = max(set(plain), key=plain.count)
    text = case.tokenizer.decode(plain)
    stop = next(s for i in range(10, N) if len(s := case.tokenizer.decode(plain[i:i + 2]).strip("\ufffd")) > 2)
    assert stop in text
    first = [settings for settings in (
        {"no_repeat_ngram_size": 2},
        {"repetition_penalty": 1.3},
        {"suppress_tokens": [common]},
        {"begin_suppress_tokens": [plain[0]]},
        {"bad_words_ids": [[common], [plain[1], plain[2]]]},
        {"sequence_bias": [[[common], -3.0], [[plain[5], plain[6]], 8.0]]},
        {"forced_eos_token_id": plain[0] + 1},
        {"stop_strings": [stop[-3:]]},
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


def _folder_with(tmp_path, source, name: str, settings: dict):
    folder = tmp_path / name
    shutil.copytree(source, folder)
    config = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**config, **settings}))
    return folder


def test_a_checkpoints_generation_config_is_honoured_and_beams_are_refused(tiny_model_dir, qwen, tmp_path):
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
    # The CLI takes the override as KEY=VALUE or a JSON file; a malformed one is an argument error.
    file = tmp_path / "gen.json"
    file.write_text(json.dumps({"num_beams": 1, "top_k": 5}))
    args = cli.build_parser().parse_args(["check", "--generation-config", "num_beams=1", "--generation-config", str(file)])
    assert cli._overrides(args) == {"num_beams": 1, "top_k": 5}
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
