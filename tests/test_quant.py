"""--quantize int8 and --threads: the quantized model's cached answers equal its own uncached generate() in every
family; its states are its own (refused by the float model and the reverse); threads are set before the load
and shown in the load line, and never change the tokens."""

import json
import sys

import pytest
import torch

from conftest import SYSTEM, photo
from reference import reference_first_logits, reference_tokens
from vlcache import cli
from vlcache.errors import ModelLoadError, ModelMismatchError
from vlcache.testing.families import KINDS as ALL_KINDS

# Every listed family (llava_next is the generic adapter's unlisted model: it needs `vlcache check` first).
KINDS = [kind for kind in ALL_KINDS if kind != "llava_next"]
PIXELS = 160 * 160
N = 6
QUESTION = "What objects are visible in this image?"


@pytest.mark.parametrize("kind", KINDS)
def test_int8_cached_answers_equal_the_int8_models_own_generate(kind, int8_engine):
    from vlcache.quantize import Int8Linear, language_linears

    engine = int8_engine(kind)
    # Quantization happened: the language model's linear layers hold int8 weights, the vision encoder's do not.
    layers = [m for m in engine.model.modules() if isinstance(m, Int8Linear)]
    assert layers and all(m.weight.dtype == torch.int8 for m in layers)
    assert not language_linears(engine.model)  # no float nn.Linear left in the decoder or the output projection
    assert isinstance(engine.model.get_output_embeddings(), Int8Linear) or kind == "gemma4"
    assert any(type(m) is torch.nn.Linear and m.weight.is_floating_point() for m in engine.model.modules())
    state = engine.cache_image(photo("rocket.jpg"), system_prompt=SYSTEM, max_pixels=PIXELS)
    answer = engine.ask(state, QUESTION, max_new_tokens=N, temperature=0)
    assert answer.token_ids == reference_tokens(engine, photo("rocket.jpg"), SYSTEM, QUESTION, N, max_pixels=PIXELS)


def test_int8_answers_differ_from_the_float_models_and_a_batch_equals_each_alone(int8_engine, family_engine):
    """The control: int8 weights change this family's answer (quantization is real), and rows through the packed
    kernel together answer as each alone."""
    quantized, plain = int8_engine("internvl"), family_engine("internvl")
    state = quantized.cache_image(photo("rocket.jpg"), system_prompt="sys", max_pixels=PIXELS)
    answer = quantized.ask(state, "What is it?", max_new_tokens=8, temperature=0)
    float_answer = plain.ask(plain.cache_image(photo("rocket.jpg"), system_prompt="sys", max_pixels=PIXELS),
                             "What is it?", max_new_tokens=8, temperature=0)
    assert answer.token_ids != float_answer.token_ids
    logits = [reference_first_logits(e, photo("rocket.jpg"), "sys", "What is it?", max_pixels=PIXELS) for e in (quantized, plain)]
    assert (logits[0] - logits[1]).abs().max() > 1e-3 * logits[1].abs().max()
    questions = [QUESTION, "What colors dominate the scene?", "Describe the lighting."]
    batch = quantized.ask_many(state, questions, max_new_tokens=N, temperature=0)
    for question, row in zip(questions, batch):
        assert row.token_ids == quantized.ask(state, question, max_new_tokens=N, temperature=0).token_ids


def test_a_state_is_refused_by_a_model_quantized_otherwise(int8_engine, engine, astronaut_state, tmp_path, capsys):
    quantized = int8_engine("qwen3_vl")
    assert quantized.fingerprint != engine.fingerprint  # the same weights, another model
    with pytest.raises(ModelMismatchError, match=r"^quantization mismatch: .* made by a float \(not quantized\) model"):
        quantized.check_state(astronaut_state)
    made = quantized.cache_image(photo("astronaut.png"), system_prompt=SYSTEM)
    assert made.metadata.quantization == "int8" and astronaut_state.metadata.quantization == "none"
    # K/V stay exact in the compute dtype.
    assert all(k.dtype == engine.dtype for k, _ in made.kv if k is not None)
    path = tmp_path / "int8.pt"
    made.save(path)
    with pytest.raises(ModelMismatchError, match=r"^quantization mismatch: .* made by an int8-quantized model.*--quantize int8"):
        engine.load_state(path)
    assert quantized.load_state(path).metadata.quantization == "int8"
    assert cli.main(["inspect", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["quantization"] == "int8"
    assert cli.main(["inspect", str(path)]) == 0
    assert "dtype:         float32 (K/V; the model's language-model weights were int8)" in capsys.readouterr().out


def test_check_runs_on_the_int8_model(tiny_model_dir, capsys):
    from vlcache.check import run as check

    assert check(str(tiny_model_dir), device="cpu", quantize="int8") == 0
    out = capsys.readouterr().out
    assert "float32, int8 weights): cached against uncached generate()" in out


def test_the_cli_loads_the_caches_quantization_and_refuses_another(int8_engine, tiny_model_dir, tmp_path, capsys):
    quantized = int8_engine("qwen3_vl")
    path = tmp_path / "int8.pt"
    assert cli.main(["cache", str(photo("rocket.jpg")), "--output", str(path), "--model", str(tiny_model_dir),
                     "--quantize", "int8", "--system-prompt", SYSTEM]) == 0
    assert "int8 weights" in capsys.readouterr().err
    assert cli.main(["ask", "--cache", str(path), "--prompt", QUESTION, "--max-new-tokens", str(N), "--temperature", "0",
                     "--json"]) == 0
    out, err = capsys.readouterr()
    assert ", int8 weights (" in err  # the cache's quantization, without --quantize
    assert json.loads(out)["token_ids"] == reference_tokens(quantized, photo("rocket.jpg"), SYSTEM, QUESTION, N)
    assert cli.main(["ask", "--cache", str(path), "--prompt", QUESTION, "--quantize", "none"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: quantization mismatch: ")


def test_a_missing_torchao_names_the_extra(tiny_model_dir, monkeypatch):
    from vlcache import Engine

    monkeypatch.setitem(sys.modules, "torchao.quantization", None)  # import fails as when it is not installed
    with pytest.raises(ModelLoadError, match=r"pip install 'vlcache\[quant\]'"):
        Engine.load(str(tiny_model_dir), device="cpu", quantize="int8")
    with pytest.raises(ModelLoadError, match="unknown quantization 'int4'"):
        Engine.load(str(tiny_model_dir), device="cpu", quantize="int4")


@pytest.fixture
def torch_threads():
    """The process's torch thread count, as it was before the test (--threads in-process changes it)."""
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


def test_threads_are_shown_in_the_load_line_and_do_not_change_the_tokens(tiny_model_dir, astronaut_state, tmp_path,
                                                                         capsys, torch_threads):
    path = tmp_path / "c.pt"
    astronaut_state.save(path)
    answers = {}
    for threads in (None, 1, 2):  # None: the default, what torch uses (here the test process's count)
        flags = [] if threads is None else ["--threads", str(threads)]
        assert cli.main(["ask", "--cache", str(path), "--model", str(tiny_model_dir), "--prompt", QUESTION,
                         "--max-new-tokens", "12", "--temperature", "0", "--json", *flags]) == 0
        out, err = capsys.readouterr()
        load_line = next(line for line in err.splitlines() if line.startswith("loaded in"))
        expected = threads or torch_threads
        assert f" on cpu, {expected} thread{'s' * (expected != 1)}, as float32" in load_line
        assert torch.get_num_threads() == expected  # set before the model loaded, and kept
        answers[threads] = json.loads(out)["token_ids"]
    assert answers[1] == answers[None] == answers[2]


@pytest.mark.parametrize("value", ["0", "-2", "1.5", "two"])
def test_a_bad_thread_count_is_refused(value, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["ask", "--prompt", "hi", "--threads", value])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "error: argument --threads:" in err and "Traceback" not in err


def test_the_server_runs_the_int8_model_exactly_and_refuses_flags_it_cannot_honour(int8_engine, tmp_path, capsys):
    from test_server import LiveServer, image_messages

    engine = int8_engine("qwen3_vl")
    live = LiveServer(engine, tmp_path / "states")
    try:
        status, health = live.get("/health")
        assert status == 200 and health["quantization"] == "int8" and health["fingerprint"] == engine.fingerprint
        reply = live.client.chat.completions.create(model="any", messages=image_messages("rocket.jpg", QUESTION),
                                                    max_tokens=N, temperature=0)
        expected = reference_tokens(engine, photo("rocket.jpg"), SYSTEM, QUESTION, N)
        assert reply.choices[0].message.content == engine.processor.tokenizer.decode(expected, skip_special_tokens=True)
        for flags, fragment in ((["--threads", "2"], "--threads sets this process's threads"),
                                (["--quantize", "none"], "--quantize none: the server at")):
            assert cli.main(["ask", "--server", live.url, "--prompt", "hi", *flags]) == 1
            out, err = capsys.readouterr()
            assert out == "" and err.strip().splitlines()[-1].startswith("error: " + fragment), err
    finally:
        live.close()


def test_in_bfloat16_a_rows_logits_do_not_depend_on_what_it_is_batched_with(tiny_model_dir):
    """The packed kernel and the converted matmul round differently in bfloat16 (float32 hides it): which one runs
    depends on one position per row or not, never on how many rows came together. A question's first-token
    logits alone equal the same question's in a prefill of two, and in a decode step of 1, 2 and 5 rows."""
    from vlcache import Engine, decode

    engine = Engine.load(str(tiny_model_dir), device="cpu", dtype="bfloat16", quantize="int8")
    state = engine.cache_image(photo("astronaut.png"), system_prompt="sys", max_pixels=PIXELS)
    questions = ["What is it?", "Describe the colours of the picture.", "Is it day?", "Where?", "Who is there?"]
    ids = [engine.question_ids(state.metadata.messages, q)[0] for q in questions]
    prefix = decode.Prefix(kv=state.kv, tokens=state.num_tokens, rope_delta=int(state.rope_deltas.view(-1)[0]))

    def steps(rows: int):
        batch = engine.batch()
        for question in ids[:rows]:
            batch.add(prefix, decode.SamplingParams(temperature=0.0), 4, torch.cat([state.input_ids[0], question]))
        first = batch.prefill(ids[:rows])
        batch.sample(first)
        second = batch.step()
        batch.cache.close()
        return first, second

    alone, alone_step = steps(1)
    for rows in (2, 5):
        together, together_step = steps(rows)
        assert torch.equal(alone[0], together[0])
        assert torch.equal(alone_step[0], together_step[0])
