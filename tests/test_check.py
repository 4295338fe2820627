"""`vlcache check` (issue 29): the prompt ids vlcache feeds against the processor's, then greedy tokens, then the
first step's logits; what it cannot run and its own bugs said as such, each with its exit code; a pass
remembered for the weights, the generation config, the chat template, the processor settings and transformers'
version. Unlisted models built tiny here: Idefics2 (its processor writes a space after the image), PaliGemma
(its processor returns labels), mllama (cross-attention; a config only)."""

import json
import shutil

import pytest

from test_cli import run
from vlcache import Engine, cli, prompt
from vlcache.errors import ModelLoadError
from vlcache.families import plain
from vlcache.testing.unlisted import build_unlisted


@pytest.fixture(scope="module")
def unlisted(tmp_path_factory):
    built: dict = {}

    def build(kind):
        if kind not in built:
            built[kind] = build_unlisted(kind, tmp_path_factory.mktemp(kind))
        return built[kind]

    return build


@pytest.fixture()
def home(tmp_path, monkeypatch):
    """A fresh $VLCACHE_HOME (remembered passes), inherited by subprocesses."""
    monkeypatch.setenv("VLCACHE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def check(model, capsys, *flags) -> tuple[int, str, list[str]]:
    code = cli.main([*flags, "check", "--model", str(model), "--device", "cpu"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def line_of(out: str, probe: str) -> str:
    return next(line for line in out.splitlines() if f" {probe}: " in line)


def test_idefics2_passes_on_its_prompt_ids_and_a_split_without_context_fails_on_them(unlisted, home, capsys, monkeypatch):
    """Idefics2's processor writes `<fake_token_around_image> What`: the question's first token is `ĠWhat` in the
    conversation. The generic adapter tokenizes it through the processor after the covered text and passes;
    controls that tokenize the question alone, or after the covered text through the tokenizer only, get `What`
    and fail on the prompt ids (and so on the tokens and logits)."""
    model = unlisted("idefics2")
    processor = Engine.load(str(model), device="cpu", unchecked=True).processor
    alone = prompt.encode_text(processor, "What is in this picture?")[0].tolist()
    assert processor.tokenizer.convert_ids_to_tokens(alone[:1]) == ["What"]
    whole = processor(text=["User:<image>What is in this picture?"])["input_ids"][0]
    assert "ĠWhat" in processor.tokenizer.convert_ids_to_tokens(whole)

    code, out, err = check(model, capsys)
    assert code == 0, err
    for probe in ("cached image", "batch of two", "two-turn chat"):
        assert line_of(out, probe).startswith(f"  held      {probe}: prompt ids equal (")
    assert "exact: every probe held; remembered" in out
    assert json.loads((home / "checked.json").read_text())

    splits = {"alone": lambda self, before, text: prompt.encode_text(self.processor, text),
              "tokenizer in context": lambda self, before, text: prompt.encode_in_context(self.processor, before, text)}
    for name, split in splits.items():
        monkeypatch.setattr(plain.PlainImageText, "encode_after", split)
        code, out, err = check(model, capsys)
        assert code == 1, name
        assert line_of(out, "cached image").startswith("  DIFFERED  cached image: prompt ids differ at "), name
        assert err.strip().splitlines()[-1].startswith(
            f"error: vlcache is not exact for {model}: cached image (prompt ids and tokens and logits)"), (name, err)
        assert json.loads((home / "checked.json").read_text()) == {}  # a failed check forgets the pass


def test_a_pass_is_asked_for_again_after_the_generation_config_template_processor_or_transformers_change(
        unlisted, home, tmp_path, capsys, monkeypatch):
    model = tmp_path / "idefics2"
    shutil.copytree(unlisted("idefics2"), model)
    assert check(model, capsys)[0] == 0
    assert Engine.load(str(model), device="cpu").family.name == "generic"
    files = {name: (model / name).read_text() for name in ("generation_config.json", "chat_template.jinja",
                                                          "processor_config.json")}

    def edit(name, change):
        (model / name).write_text(change(files[name]))

    def refused_for(what):
        with pytest.raises(ModelLoadError) as refused:
            Engine.load(str(model), device="cpu")
        assert str(refused.value) == (f"model '{model}': its {what} changed since `vlcache check` passed for these "
                                      f"weights; run `vlcache check --model {model}` again")
        for name, text in files.items():
            (model / name).write_text(text)
        assert Engine.load(str(model), device="cpu").family.name == "generic"  # restored: the pass holds again

    edit("generation_config.json", lambda text: json.dumps({**json.loads(text), "no_repeat_ngram_size": 3}))
    asked = run("ask", "--model", model, "--prompt", "Hello!", "--max-new-tokens", 2)  # a fresh process, one line
    assert asked.returncode == 1 and asked.stdout == "" and "Traceback" not in asked.stderr
    assert asked.stderr.strip().splitlines()[-1] == (
        f"error: model '{model}': its generation config changed since `vlcache check` passed for these weights; run "
        f"`vlcache check --model {model}` again")
    refused_for("generation config")
    edit("chat_template.jinja", lambda text: text.replace("Assistant:", "Assistant: "))
    refused_for("chat template")
    edit("processor_config.json", lambda text: json.dumps({**json.loads(text), "image_seq_len": 8}))
    refused_for("processor settings")
    import transformers

    monkeypatch.setattr(transformers, "__version__", "0.0.1")
    with pytest.raises(ModelLoadError, match="its transformers version changed since `vlcache check` passed"):
        Engine.load(str(model), device="cpu")


def test_cross_attention_to_the_image_cannot_run(unlisted, home):
    result = run("check", "--model", unlisted("mllama"), "--device", "cpu")
    assert result.returncode == 1 and result.stdout == "" and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == ["error: cannot run: cross-attention to the image (mllama) is not a prefix state"]


def test_a_processor_without_a_chat_template_cannot_run(unlisted, home, tmp_path):
    model = tmp_path / "no-template"
    shutil.copytree(unlisted("idefics2"), model)
    (model / "chat_template.jinja").unlink()
    result = run("check", "--model", model, "--device", "cpu")
    assert result.returncode == 1 and result.stdout == "" and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: cannot run: the processor has no chat template (vlcache renders every prompt with it); give the model "
        "folder a chat_template.jinja")


def test_an_exception_in_the_adapter_is_a_bug_with_its_type_and_debug_shows_its_traceback(unlisted, home, capsys, monkeypatch):
    model = unlisted("idefics2")

    def broken(self, inputs, cache, dtype):
        raise TypeError("unexpected keyword argument 'pixel_mask'")

    monkeypatch.setattr(plain.PlainImageText, "prefill", broken)
    code, out, err = check(model, capsys)
    assert code == 1
    assert "DIFFERED" not in out and "Traceback" not in err
    assert line_of(out, "cached image") == "  BUG       cached image: TypeError: unexpected keyword argument 'pixel_mask'"
    assert err.strip().splitlines()[-1] == (
        f"error: a bug in vlcache's generic adapter on {model}, not a verdict on the model: the cached image probe "
        "raised TypeError: unexpected keyword argument 'pixel_mask' (rerun with --debug for the traceback)")
    code, out, err = check(model, capsys, "--debug")
    assert code == 1
    assert "Traceback (most recent call last)" in err and "in broken" in err
    assert err.strip().splitlines()[-1].endswith("raised TypeError: unexpected keyword argument 'pixel_mask'")


def test_processor_outputs_the_model_does_not_take_are_not_passed(unlisted, home, capsys, monkeypatch):
    """PaliGemma's processor returns `labels` with every prompt: not passed, the check runs and gives its verdict
    (its processor appends to the prompt and moves the image first: the prompt ids differ). Control: passed on,
    the forward computes a loss against the wrong length, a bug."""
    model = unlisted("paligemma")
    engine = Engine.load(str(model), device="cpu", unchecked=True)
    inputs = engine.family.prefix_inputs("<start_of_turn>user\n<image>", [prompt_image()], [], {})
    assert "labels" in inputs and "labels" not in plain.vision_inputs(inputs, engine.dtype, engine.model)
    code, out, err = check(model, capsys)
    assert code == 1 and "batch_size" not in out + err
    assert line_of(out, "cached image").startswith("  DIFFERED  cached image: prompt ids differ at ")
    monkeypatch.setattr(plain, "_TARGETS", ())
    code, out, err = check(model, capsys)
    assert code == 1
    assert line_of(out, "cached image").startswith("  BUG       cached image: ValueError: Expected input batch_size (1)")


def prompt_image():
    from PIL import Image

    from vlcache.uncached import probe_image

    return Image.open(probe_image()).convert("RGB")


def module_graph() -> dict[str, set[str]]:
    """vlcache's modules (packages included) -> the vlcache modules each imports, at the top or inside functions."""
    import ast

    from conftest import REPO

    root = REPO / "src"
    graph: dict[str, set[str]] = {}
    for path in (root / "vlcache").rglob("*.py"):
        parts = list(path.relative_to(root).with_suffix("").parts)
        package = parts[:-1]
        name = ".".join(parts if parts[-1] != "__init__" else parts[:-1])
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package[: len(package) - node.level + 1]
                stem = base + (node.module.split(".") if node.module else [])
                # `from .decode import probe` imports the submodule: names that are no module are never followed
                # (`from . import prompt` names the package only as the parent every module runs under)
                found |= ({".".join(stem)} if node.module else set()) | {".".join(stem + [a.name]) for a in node.names}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("vlcache")}
        graph[name] = found
    return graph


def reaches(graph: dict[str, set[str]], start: str, goal: str) -> bool:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt == goal:
                return True
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return False


def test_the_probe_and_the_check_import_no_circle_through_the_engine():
    """The circle engine -> decode/probe -> check -> engine is gone: the probe's questions and its uncached
    reference live in vlcache.uncached, which reaches neither the check nor the engine."""
    graph = module_graph()
    assert "vlcache.uncached" in graph["vlcache.decode.probe"] and "vlcache.uncached" in graph["vlcache.check"]
    assert "vlcache.check" not in graph["vlcache.decode.probe"]
    for module in ("vlcache.engine", "vlcache.check", "vlcache.decode.probe"):
        assert not reaches(graph, "vlcache.uncached", module), module
    assert not reaches(graph, "vlcache.decode.probe", "vlcache.check")
    assert not reaches(graph, "vlcache.check", "vlcache.check")
    assert not reaches(graph, "vlcache.uncached", "vlcache.uncached")
