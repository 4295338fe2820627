"""Issue 30: structured outputs, logprobs, n, logit_bias and penalties, tool calls, refusals, through a live server
on 127.0.0.1 and the real openai client; each against transformers' generate on the uncached conversation."""

import json
import shutil
from pathlib import Path

import jsonschema
import pytest
import torch

from conftest import SYSTEM, photo
from reference import _inputs
from test_server import LiveServer, image_messages
from test_web import browser  # noqa: F401 - the chat page test's fixture

xgr = pytest.importorskip("xgrammar", reason="structured outputs need xgrammar (pip install 'vlcache[structured]')")
import xgrammar.contrib.hf  # noqa: E402

from vlcache import Engine  # noqa: E402
from vlcache.prompt import conversation  # noqa: E402

REAL_TEMPLATE = photo("astronaut.png").parent.parent / "models" / "qwen3-vl-2b-instruct" / "chat_template.jinja"
SCHEMA = {
    "type": "object",
    "properties": {
        "colour": {"type": "string", "enum": ["red", "green", "blue", "other"]},
        "has_text": {"type": "boolean"},
        "outdoor": {"type": "boolean"},
    },
    "required": ["colour", "has_text", "outdoor"],
    "additionalProperties": False,
}
QUESTION = "Describe the image as JSON."
LONG = 96  # room for the tiny tokenizer's JSON (its tokens are short)


@pytest.fixture(scope="module")
def live(engine, tmp_path_factory):
    server = LiveServer(engine, tmp_path_factory.mktemp("states"))
    yield server
    server.close()


def library_grammar(engine, schema, strict=True):
    """The schema compiled by xgrammar itself (not through vlcache.structured): compact, the model's stop token."""
    vocab = engine.model.get_output_embeddings().weight.shape[0]
    info = xgr.TokenizerInfo.from_huggingface(engine.processor.tokenizer, vocab_size=vocab, stop_token_ids=sorted(engine.eos_ids))
    return xgr.GrammarCompiler(info).compile_json_schema(json.dumps(schema), any_whitespace=False, strict_mode=strict)


def generate_reference(engine, inputs, max_new_tokens, processors=(), **kwargs):
    with torch.inference_mode():
        out = engine.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                    logits_processor=list(processors), **kwargs)
    return out


def reference_ids(engine, name, question, max_new_tokens, processors=()):
    inputs = _inputs(engine, conversation(SYSTEM, question, with_image=name is not None), photo(name) if name else None, None)
    out = generate_reference(engine, inputs, max_new_tokens, processors)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def ids_of(engine, text):
    return engine.processor.tokenizer(text, add_special_tokens=False)["input_ids"]


# -- structured outputs ----------------------------------------------------------------------------------------

def test_schema_answers_parse_conform_and_equal_generate_with_the_librarys_processor(engine, live):
    for name in ("astronaut.png", "rocket.jpg"):
        reply = live.client.chat.completions.create(
            model="any", messages=image_messages(name, QUESTION), max_tokens=LONG, temperature=0,
            response_format={"type": "json_schema", "json_schema": {"name": "photo", "schema": SCHEMA, "strict": True}})
        text = reply.choices[0].message.content
        value = json.loads(text)
        jsonschema.validate(value, SCHEMA)  # a validator apart from the grammar library
        assert set(value) == {"colour", "has_text", "outdoor"} and list(value) == ["colour", "has_text", "outdoor"]
        assert value["colour"] in SCHEMA["properties"]["colour"]["enum"]
        assert isinstance(value["has_text"], bool) and isinstance(value["outdoor"], bool)
        assert "  " not in text  # compact: no runs of whitespace
        expected = reference_ids(engine, name, QUESTION, LONG, [xgrammar.contrib.hf.LogitsProcessor(library_grammar(engine, SCHEMA))])
        assert reply.usage.completion_tokens == len(expected)
        assert text == engine.processor.tokenizer.decode(expected, skip_special_tokens=True)
        assert reply.choices[0].finish_reason == "stop"
    # The control: without the schema the same question is not this JSON.
    free = live.client.chat.completions.create(model="any", messages=image_messages("rocket.jpg", QUESTION), max_tokens=LONG,
                                               temperature=0)
    assert free.choices[0].message.content != text


def test_json_object_and_a_non_strict_schema(engine, live):
    """A random model may write an endless key where the grammar allows any: the text is then a valid JSON prefix by
    xgrammar's own matcher (and a whole object when it stopped)."""
    for response_format, schema, strict, starts in (
            ({"type": "json_object"}, {"type": "object"}, False, "{"),
            ({"type": "json_schema", "json_schema": {"name": "loose", "schema": LOOSE}}, LOOSE, False, '{"ok": ')):
        reply = live.client.chat.completions.create(model="any", messages=image_messages("coffee.png", QUESTION), max_tokens=LONG,
                                                    temperature=0, response_format=response_format)
        text = reply.choices[0].message.content
        assert text.startswith(starts)
        assert xgr.GrammarMatcher(library_grammar(engine, schema, strict)).accept_string(text)
        if reply.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(text), dict)
    assert text[len(starts):].startswith(("true", "false"))


LOOSE = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}


def test_a_batch_mixing_schema_rows_and_free_rows_equals_asking_each_alone(engine, astronaut_state):
    questions = ["What colors dominate the scene?", QUESTION, "Describe the lighting and mood.", "Is it day or night?"]
    schemas = [None, SCHEMA, None, SCHEMA]
    alone = [engine.ask(astronaut_state, q, max_new_tokens=LONG, temperature=0, json_schema=s).token_ids
             for q, s in zip(questions, schemas)]
    batch = engine.batch()
    prefix = engine.state_prefix(astronaut_state)
    new_ids = [engine.question_ids(astronaut_state.metadata.messages, q) for q in questions]
    for ids, schema in zip(new_ids, schemas):
        options = Engine_options(max_new_tokens=LONG, temperature=0, json_schema=schema)
        batch.add(prefix, engine.sampling(options), LONG, torch.cat([astronaut_state.input_ids[0], ids[0]]), engine.constraint(options))
    from vlcache import decode

    together = [[] for _ in questions]
    for step in decode.generate(batch, [ids[0] for ids in new_ids]):
        for i, token in enumerate(step):
            if token is not None:
                together[i].append(token)
    assert together == alone
    assert json.loads(engine.processor.tokenizer.decode(alone[1], skip_special_tokens=True))
    assert alone[0] != alone[1]


def test_a_masked_row_under_top_k_is_exact_without_sorting_the_vocabulary(monkeypatch):
    """A grammar leaves fewer finite scores than the model's top-k (Qwen3-VL's 20): the k-th value is -inf, which
    ties only with tokens that cannot be drawn. The draw equals transformers' warpers, and no sort of the whole
    vocabulary is paid for it (it cost 267 ms of a 16-row step of the thin stand-in: bench/grammar.py)."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    from vlcache.decode.sampling import RowSampling, SamplingParams

    vocab = 4000
    sorts = []
    real_sort = torch.sort
    monkeypatch.setattr(torch, "sort", lambda x, *a, **k: sorts.append(x.shape[-1]) or real_sort(x, *a, **k))
    sampling = RowSampling(vocab, frozenset({7}), "cpu")
    params = [SamplingParams(1.0, top_k=20, top_p=0.8, seed=1), SamplingParams(0.7, top_k=20, seed=2)]
    for p in params:
        sampling.add(p, 10, torch.tensor([0]))
    torch.manual_seed(5)
    logits = torch.randn(2, vocab) * 3
    allowed = torch.zeros(2, vocab, dtype=torch.bool)
    allowed[0, [3, 99, 1500, 2000, 3999]] = True  # five tokens: a boolean's or an enum's choices
    allowed[1, 10:17] = True
    logits = logits.masked_fill(~allowed, float("-inf"))
    mine = sampling.filtered(logits)
    assert vocab not in sorts  # the control: before the fix, a row with fewer finite scores than k sorted them all
    for i, p in enumerate(params):
        warpers = [TemperatureLogitsWarper(p.temperature), TopKLogitsWarper(p.top_k)] + (
            [TopPLogitsWarper(p.top_p)] if p.top_p is not None else [])
        theirs = logits[i: i + 1]
        for warper in warpers:
            theirs = warper(torch.zeros(1, 1, dtype=torch.long), theirs)
        assert torch.equal(torch.isfinite(mine[i]), torch.isfinite(theirs[0]))
        kept = torch.isfinite(theirs[0])
        assert torch.allclose(mine[i][kept], theirs[0][kept]) and 1 <= kept.sum() <= int(allowed[i].sum())
    tokens, _ = sampling.sample(logits)
    assert all(bool(allowed[i, t]) for i, t in enumerate(tokens.tolist()))


def Engine_options(**kwargs):
    from vlcache.engine import GenerationOptions

    return GenerationOptions(**kwargs)


def test_cli_annotates_a_collection_one_json_object_per_image_and_question(engine, tmp_path, capsys):
    """`vlcache ask --cache DIR --prompts-file Q --json-schema S`: a line per image and question, each the object
    Engine.ask gives under the schema; a bad schema file is a one-line error before any model loads."""
    from vlcache import cli

    caches = tmp_path / "caches"
    for name in ("astronaut.png", "rocket.jpg"):
        engine.cache_image(photo(name), system_prompt=SYSTEM).save(caches / f"{name.split('.')[0]}_cache.pt")
    questions = tmp_path / "questions.txt"
    questions.write_text(QUESTION + "\nIs there text in it?\n")
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    argv = ["ask", "--cache", str(caches), "--prompts-file", str(questions), "--json-schema", str(schema),
            "--max-new-tokens", str(LONG), "--temperature", "0"]
    assert cli.main(argv) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 4 and {(Path(x["cache"]).name, x["prompt"]) for x in lines} == {
        (c, q) for c in ("astronaut_cache.pt", "rocket_cache.pt") for q in (QUESTION, "Is there text in it?")}
    for line in lines:
        expected = engine.ask(engine.load_state(line["cache"]), line["prompt"], max_new_tokens=LONG, temperature=0,
                              json_schema=SCHEMA)
        assert line["answer"] == json.loads(expected.text)
        jsonschema.validate(line["answer"], SCHEMA)
        assert set(line["answer"]) == {"colour", "has_text", "outdoor"} and line["answer"]["colour"] in SCHEMA["properties"]["colour"]["enum"]
    # Cut short by --max-new-tokens: an error line for each, exit 1, no half object on stdout.
    assert cli.main(argv[:-4] + ["--max-new-tokens", "3", "--temperature", "0"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("before its JSON was complete") == 4
    schema.write_text("[1, 2]")
    assert cli.main(argv) != 0
    out, err = capsys.readouterr()
    assert out == "" and err.strip().startswith("error:") and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_schema_the_library_refuses_is_a_400(live):
    status, body = live.post("/v1/chat/completions", json.dumps({
        "model": "any", "messages": [{"role": "user", "content": "hi"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}}).encode())
    assert status == 400 and body["error"]["param"] == "response_format" and "objekt" in body["error"]["message"]


# -- logprobs --------------------------------------------------------------------------------------------------

def test_logprobs_equal_the_uncached_models_log_softmax_streamed_and_not(engine, live):
    question = "What is in the picture?"
    reply = live.client.chat.completions.create(model="any", messages=image_messages("chelsea.png", question), max_tokens=8,
                                                temperature=0, logprobs=True, top_logprobs=5)
    content = reply.choices[0].logprobs.content
    inputs = _inputs(engine, conversation(SYSTEM, question, with_image=True), photo("chelsea.png"), None)
    out = generate_reference(engine, inputs, 8, output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    assert len(content) == len(tokens) == reply.usage.completion_tokens
    tokenizer = engine.processor.tokenizer
    for entry, token, logits in zip(content, tokens, out.logits):
        reference = torch.log_softmax(logits[0].float(), dim=-1)
        assert abs(entry.logprob - reference[token].item()) < 1e-4
        assert len(entry.top_logprobs) == 5
        assert entry.top_logprobs[0].token == entry.token and entry.top_logprobs[0].logprob == entry.logprob  # greedy: the top one
        values, ids = reference.topk(5)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(values.tolist(), abs=1e-4)
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
        assert tokenizer.convert_tokens_to_ids(tokenizer.convert_ids_to_tokens(token)) == token
    streamed = list(live.client.chat.completions.create(model="any", messages=image_messages("chelsea.png", question),
                                                        max_tokens=8, temperature=0, logprobs=True, top_logprobs=5, stream=True))
    entries = [e for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in entries] == [(e.token, e.logprob) for e in content]
    without = live.client.chat.completions.create(model="any", messages=image_messages("chelsea.png", question), max_tokens=8,
                                                  temperature=0)
    assert without.choices[0].logprobs is None


# -- n, logit_bias, penalties ------------------------------------------------------------------------------------

def test_n_choices_with_a_seed_repeat_differ_and_count_every_token(live, monkeypatch):
    from vlcache import decode

    prefilled = []  # rows of each prefill forward of the server's model thread
    real_prefill = decode.Batch.prefill
    monkeypatch.setattr(decode.Batch, "prefill", lambda self, new_ids: prefilled.append(len(new_ids)) or real_prefill(self, new_ids))

    def ask(n, seed):
        return live.client.chat.completions.create(model="any", messages=image_messages("rocket.jpg", "Tell me more."),
                                                   max_tokens=10, temperature=1.0, seed=seed, n=n, logprobs=True)

    first = ask(3, 7)
    assert prefilled == [1]  # one prefill of the prompt for the three choices; the others copy its row
    again = ask(3, 7)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in again.choices]
    assert len(set(texts)) > 1
    assert first.usage.completion_tokens == sum(len(c.logprobs.content) for c in first.choices)
    assert first.usage.prompt_tokens == ask(1, 7).usage.prompt_tokens
    for i in range(3):  # choice i samples as a request of its own with seed + i (as Engine.ask_many does)
        assert ask(1, 7 + i).choices[0].message.content == texts[i]
    streamed = list(live.client.chat.completions.create(
        model="any", messages=image_messages("rocket.jpg", "Tell me more."), max_tokens=10, temperature=1.0, seed=7, n=3,
        stream=True, stream_options={"include_usage": True}))
    joined = ["".join(c.choices[0].delta.content or "" for c in streamed if c.choices and c.choices[0].index == i) for i in range(3)]
    assert joined == texts
    assert streamed[-1].usage.completion_tokens == first.usage.completion_tokens


@pytest.mark.parametrize("kind", ["gemma3", "qwen3_5", "llama4"])
def test_choices_copied_from_one_prefill_equal_generate_with_sliding_linear_and_chunked_layers(kind, family_engine, tmp_path,
                                                                                               monkeypatch):
    """The followers start from a copy of the leader's row after the prompt: sliding-window layers (kept only as far
    back as the window), linear-attention states and chunked attention must come across whole. Greedy choices
    each equal generate() on the uncached conversation."""
    from reference import reference_tokens

    from vlcache import decode

    engine = family_engine(kind)
    prefilled = []
    real_prefill = decode.Batch.prefill
    monkeypatch.setattr(decode.Batch, "prefill", lambda self, new_ids: prefilled.append(len(new_ids)) or real_prefill(self, new_ids))
    server = LiveServer(engine, tmp_path / "states")
    try:
        reply = server.client.chat.completions.create(model="m", messages=image_messages("camera.png", "What is this?"),
                                                      max_tokens=8, temperature=0, n=3)
    finally:
        server.close()
    expected = engine.processor.tokenizer.decode(reference_tokens(engine, photo("camera.png"), SYSTEM, "What is this?", 8),
                                                 skip_special_tokens=True)
    assert [c.message.content for c in reply.choices] == [expected] * 3
    assert prefilled[-1] == 1  # the question's prefill ran one row (the image's own prefill came before it)


def test_logit_bias_forces_a_token(engine, live):
    token = ids_of(engine, "A")[0]
    free = live.client.chat.completions.create(model="any", messages=image_messages("camera.png", "What is this?"),
                                               max_tokens=6, temperature=0)
    forced = live.client.chat.completions.create(model="any", messages=image_messages("camera.png", "What is this?"),
                                                 max_tokens=6, temperature=0, logit_bias={str(token): 100})
    assert forced.choices[0].message.content == engine.processor.tokenizer.decode([token] * 6)
    assert free.choices[0].message.content != forced.choices[0].message.content


class OpenAIPenalties:
    """OpenAI's definition, as a transformers logits processor: mu[j] -= c[j] * frequency + (c[j] > 0) * presence,
    c[j] the count of token j among the tokens generated so far."""

    def __init__(self, prompt_length, frequency, presence):
        self.start, self.frequency, self.presence = prompt_length, frequency, presence

    def __call__(self, input_ids, scores):
        counts = torch.zeros_like(scores)
        generated = input_ids[:, self.start:]
        counts.scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - counts * self.frequency - (counts > 0).to(scores.dtype) * self.presence


@pytest.mark.parametrize("frequency, presence", [(1.5, 0.0), (0.0, 1.5)])
def test_frequency_and_presence_penalties_equal_openais_formula(engine, live, frequency, presence):
    question = "Describe this image in one sentence."
    plain = reference_ids(engine, "hubble_deep_field.jpg", question, 24)
    assert len(set(plain)) < len(plain)  # the control: the plain answer repeats tokens
    reply = live.client.chat.completions.create(model="any", messages=image_messages("hubble_deep_field.jpg", question),
                                                max_tokens=24, temperature=0, frequency_penalty=frequency, presence_penalty=presence,
                                                logprobs=True)
    inputs = _inputs(engine, conversation(SYSTEM, question, with_image=True), photo("hubble_deep_field.jpg"), None)
    out = generate_reference(engine, inputs, 24, [OpenAIPenalties(inputs["input_ids"].shape[1], frequency, presence)])
    expected = out[0, inputs["input_ids"].shape[1]:].tolist()
    assert expected != plain
    assert reply.choices[0].message.content == engine.processor.tokenizer.decode(expected, skip_special_tokens=True)


def test_vllms_extras_top_k_min_p_and_repetition_penalty_are_applied(engine, live):
    """top_k=1 or min_p=1 leave one token: sampling then answers as greedy does; repetition_penalty equals
    generate()'s."""
    question = "Describe this image in one sentence."

    def ask(**extra):
        return live.client.chat.completions.create(model="any", messages=image_messages("hubble_deep_field.jpg", question),
                                                   max_tokens=24, extra_body=extra.pop("body", None), **extra).choices[0].message.content

    greedy = ask(temperature=0)
    assert ask(temperature=1.0, seed=3) != greedy  # the control: sampling alone answers otherwise
    assert ask(temperature=1.0, seed=3, body={"top_k": 1}) == greedy
    assert ask(temperature=1.0, seed=3, body={"min_p": 1.0}) == greedy
    inputs = _inputs(engine, conversation(SYSTEM, question, with_image=True), photo("hubble_deep_field.jpg"), None)
    out = generate_reference(engine, inputs, 24, repetition_penalty=1.5)
    expected = engine.processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert expected != greedy and ask(temperature=0, body={"repetition_penalty": 1.5}) == expected


# -- tool calls ------------------------------------------------------------------------------------------------

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                                                     "required": ["city"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "count_people", "description": "How many people are in the photo",
                                      "parameters": {"type": "object", "properties": {"adults": {"type": "boolean"}},
                                                     "required": ["adults"], "additionalProperties": False}}},
]


@pytest.fixture(scope="module")
def tool_live(tiny_model_dir, tmp_path_factory):
    """The tiny checkpoint with Qwen3-VL-2B's own chat template (which takes tools), served."""
    folder = tmp_path_factory.mktemp("tiny-qwen3-vl-tools")
    shutil.copytree(tiny_model_dir, folder, dirs_exist_ok=True)
    (folder / "chat_template.jinja").write_text(REAL_TEMPLATE.read_text())
    engine = Engine.load(str(folder), device="cpu")
    server = LiveServer(engine, tmp_path_factory.mktemp("tool-states"))
    yield engine, server
    server.close()


def test_a_forced_tool_call_parses_streamed_and_not_and_equals_generate(tool_live):
    engine, live = tool_live
    messages = image_messages("astronaut.png", "What is the weather where this was taken?")
    choice = {"type": "function", "function": {"name": "get_weather"}}
    reply = live.client.chat.completions.create(model="any", messages=messages, tools=TOOLS, tool_choice=choice,
                                                max_tokens=LONG, temperature=0)
    message = reply.choices[0].message
    assert reply.choices[0].finish_reason == "tool_calls", message
    assert message.content is None and len(message.tool_calls) == 1
    call = message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    assert list(arguments) == ["city"] and isinstance(arguments["city"], str)
    # generate() on the conversation the template renders with the tools, under the same call's grammar.
    template_messages = [{"role": "system", "content": SYSTEM},
                         {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is the weather where this was taken?"}]}]
    from vlcache.images import load_image

    template_messages[1]["content"][0]["image"] = engine.family.prepare_image(load_image(photo("astronaut.png")).image, None)
    inputs = engine.processor.apply_chat_template(template_messages, tools=TOOLS, tokenize=True, add_generation_prompt=True,
                                                  return_dict=True, return_tensors="pt")
    assert b"get_weather" in engine.processor.tokenizer.decode(inputs["input_ids"][0]).encode()
    from vlcache import toolcalls

    grammar = engine.grammars.compile(toolcalls.call_schema(TOOLS, "get_weather"), True, ("<tool_call>\n", "\n</tool_call>"))
    out = generate_reference(engine, inputs, LONG, [xgrammar.contrib.hf.LogitsProcessor(grammar)])
    expected = engine.processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert expected == '<tool_call>\n{"name": "get_weather", "arguments": ' + call.function.arguments + "}\n</tool_call>"
    chunks = list(live.client.chat.completions.create(model="any", messages=messages, tools=TOOLS, tool_choice="required",
                                                      max_tokens=LONG, temperature=0, stream=True))
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].index == 0 and calls[0].function.name in ("get_weather", "count_people")
    json.loads(calls[0].function.arguments)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ""


def test_tools_are_part_of_the_state_and_earlier_calls_render(tool_live):
    engine, live = tool_live
    question = "Describe this image in one sentence."
    plain = live.client.chat.completions.create(model="any", messages=image_messages("coffee.png", question), max_tokens=4, temperature=0)
    with_tools = live.client.chat.completions.create(model="any", messages=image_messages("coffee.png", question), tools=TOOLS,
                                                     max_tokens=4, temperature=0)
    assert with_tools.usage.prompt_tokens > plain.usage.prompt_tokens  # the template wrote the tools into the prompt
    hidden = live.client.chat.completions.create(model="any", messages=image_messages("coffee.png", question), tools=TOOLS,
                                                 tool_choice="none", max_tokens=4, temperature=0)
    # "none", as OpenAI and vLLM: the tools are still in the prompt (the same state), the answer is text.
    assert hidden.usage.prompt_tokens == with_tools.usage.prompt_tokens and hidden.choices[0].message.tool_calls is None
    assert hidden.usage.prompt_tokens_details.cached_tokens > 0
    assert hidden.choices[0].message.content == with_tools.choices[0].message.content
    from vlcache.serving.requests import parse_chat

    parsed = {c: parse_chat({"model": "m", "messages": [{"role": "user", "content": "Hi"}], "tools": TOOLS, "tool_choice": c}, 8)
              for c in ("none", "auto")}
    assert parsed["none"].messages == parsed["auto"].messages and len(parsed["none"].messages) == 2  # the tools' entry
    assert parsed["none"].tools is False and parsed["auto"].tools is True  # "none": calls in the text are not parsed
    assert with_tools.usage.prompt_tokens_details.cached_tokens == 0  # another state: the system turn differs
    follow = image_messages("coffee.png", question) + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
                                                              "function": {"name": "count_people", "arguments": "{\"adults\": true}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "3"}]
    reply = live.client.chat.completions.create(model="any", messages=follow, tools=TOOLS, max_tokens=4, temperature=0)
    assert reply.usage.prompt_tokens_details.cached_tokens >= with_tools.usage.prompt_tokens - 30
    assert reply.usage.prompt_tokens > with_tools.usage.prompt_tokens


def test_tool_calls_parse_out_of_text():
    from vlcache import toolcalls

    content, calls = toolcalls.parse('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')
    assert content == "Let me check." and calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert toolcalls.parse("<tool_call>\nnot json\n</tool_call>") == ("<tool_call>\nnot json\n</tool_call>", [])
    stream = toolcalls.CallStream()
    out = [e for piece in ["Hi <tool", "_call>\n{\"name\": \"f\", ", "\"arguments\": {}}\n</tool_call>", " bye"] for e in stream.feed(piece)]
    out += stream.flush()
    assert [e[0] for e in out] == ["text", "call", "text"] and out[0][1] == "Hi " and out[2][1] == " bye"


# -- refusals --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, param", [
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ({"reasoning_effort": "high"}, "reasoning_effort"),
    ({"web_search_options": {}}, "web_search_options"),
    ({"store": True}, "store"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"guided_json": {"type": "object"}}, "guided_json"),
    ({"stream_options": {"include_obfuscation": True}}, "include_obfuscation"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "extra": 1}}}, "extra"),
    ({"tools": TOOLS}, "tools"),  # the tiny test template takes no tools
])
def test_an_unsupported_parameter_is_a_400_naming_it(live, extra, param):
    status, body = live.post("/v1/chat/completions", json.dumps(
        {"model": "any", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **extra}).encode())
    assert status == 400, body
    assert body["error"]["param"] == param and param in body["error"]["message"]


def test_parameters_sent_as_null_or_default_pass(live):
    status, body = live.post("/v1/chat/completions", json.dumps(
        {"model": "any", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "audio": None, "store": False,
         "n": 1, "logprobs": False, "service_tier": "auto", "top_k": -1, "tool_choice": None}).encode())
    assert status == 200, body


# -- the chat page ---------------------------------------------------------------------------------------------

def test_the_pages_json_schema_setting_shapes_the_answer(browser, live):
    from test_web import Page, data_url as page_data_url

    page = Page(browser, live.url)
    try:
        page.page.click("#open-settings")
        page.page.fill("#set-json-schema", "[1, 2]")  # not a schema: the dialog stays open, nothing is saved
        page.page.click("#save-settings")
        assert page.page.locator("#settings").evaluate("d => d.open")
        page.page.fill("#set-json-schema", json.dumps(SCHEMA))
        page.page.fill("#set-temperature", "0")
        page.page.fill("#set-max-tokens", str(LONG))
        page.page.click("#save-settings")
        page.attach(photo("rocket.jpg"))
        answer = page.ask(QUESTION)
        assert "error" not in answer
        reply = live.client.chat.completions.create(
            model="any", max_tokens=LONG, temperature=0,
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": page_data_url(photo("rocket.jpg"), "image/jpeg")}},
                                                   {"type": "text", "text": QUESTION}]}],
            response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}})
        assert answer["text"] == reply.choices[0].message.content and json.loads(answer["text"])["colour"]
        assert page.errors == []
    finally:
        page.close()


def test_a_failure_after_the_prefill_answers_every_choice_and_gives_back_their_reservations(live, monkeypatch):
    """n=3: the first sampling after the prompt's prefill fails. The request gets the error (no choice left
    waiting), the reservations of all three choices (two of them private copies) are given back, and the next
    request is answered. Without that, the choices' bytes stayed counted and admission shrank for everyone."""
    from vlcache import decode

    scheduler = live.service.scheduler
    monkeypatch.setattr(scheduler, "kv_memory", 2**40)  # admission on: every started row is counted
    real_sample, failed = decode.Batch.sample, []

    def sample(self, logits):
        if self.rows == 3 and not failed:
            failed.append(True)
            raise RuntimeError("planted failure in the first sampling")
        return real_sample(self, logits)

    monkeypatch.setattr(decode.Batch, "sample", sample)
    client = live.client.with_options(timeout=120, max_retries=0)
    with pytest.raises(Exception, match="planted failure"):
        client.chat.completions.create(model="any", messages=image_messages("rocket.jpg", "Tell me more."),
                                       max_tokens=6, temperature=1.0, seed=3, n=3)
    assert failed and scheduler._reserved == 0 and scheduler._groups == {}
    after = client.chat.completions.create(model="any", messages=image_messages("rocket.jpg", "Tell me more."),
                                           max_tokens=6, temperature=1.0, seed=3, n=3)
    assert [c.index for c in after.choices] == [0, 1, 2]
    assert scheduler._reserved == 0
