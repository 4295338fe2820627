"""What a hostile review of Gemma 4's support found, kept as tests: a model vlcache cannot be exact for is refused
before its weights load, a video state's identity names what decides its frames and tokens, and odd files
(layer kinds that are not strings, a sliding source layer holding too little) are refused in one line without
stopping the other files of a command.
"""

import json
import shutil

import pytest

from conftest import SYSTEM, photo
from reference import reference_tokens
from vlcache import Engine, cli
from vlcache.errors import CacheFileError, ModelMismatchError

PIXELS = 160 * 160
N = 12
QUESTION = "What objects are visible in this image?"


def _variant(family_dir, tmp_path, **text):
    """The tiny Gemma 4 checkpoint with some text-config fields changed (same weights)."""
    folder = tmp_path / "variant"
    shutil.copytree(family_dir("gemma4"), folder)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"].update(text)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_gemma4_with_bidirectional_attention_over_all_tokens_is_refused_before_its_weights(family_dir, tmp_path, capsys):
    """Gemma4TextConfig takes use_bidirectional_attention="all" (every token sees every other): an image state
    made without the question could never equal generate() on the whole prompt, whose image tokens see the
    question. Such a model is refused in one line, from its config (before the weights), by the API and the CLI."""
    from vlcache.errors import ModelLoadError

    folder = _variant(family_dir, tmp_path, use_bidirectional_attention="all")
    (folder / "model.safetensors").write_bytes(b"not weights")  # never read
    with pytest.raises(ModelLoadError, match=r"attends both ways over all tokens .* vlcache cannot cache it$"):
        Engine.load(str(folder), device="cpu")
    capsys.readouterr()
    assert cli.main(["ask", "--model", str(folder), "--image", str(photo("rocket.jpg")), "--prompt", "hi"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("error: model ") and "use_bidirectional_attention='all'" in err[-1]
    assert len(err) <= 2 and "Traceback" not in "".join(err)  # a progress line ("loading ...") at most before it


def test_gemma4_without_bidirectional_attention_is_exact(family_dir, tmp_path):
    """use_bidirectional_attention=None (image tokens causal, as transformers' comment says of the smaller
    Gemma 4 models): the image prefill still passes mm_token_type_ids, which transformers then ignores; such a
    model is not refused and is exact."""
    folder = _variant(family_dir, tmp_path, use_bidirectional_attention=None)
    engine = Engine.load(str(folder), device="cpu")
    state = engine.cache_image(photo("rocket.jpg"), system_prompt=SYSTEM, max_pixels=PIXELS)
    expected = reference_tokens(engine, photo("rocket.jpg"), SYSTEM, QUESTION, N, max_pixels=PIXELS)
    assert engine.ask(state, QUESTION, max_new_tokens=N, temperature=0).token_ids == expected


@pytest.mark.parametrize("kinds", [[0] * 6, [None] * 6, [["x"]] * 6], ids=["ints", "nulls", "lists"])
def test_a_file_whose_layer_kinds_are_not_strings_is_refused_in_one_line(family_engine, tmp_path, capsys, kinds):
    """A file whose layer kinds are not strings is corrupt: Engine.load_state, `vlcache inspect` and `vlcache ask
    --cache` refuse it in one line (not the CLI's catch-all for bugs)."""
    import copy

    engine = family_engine("gemma4")
    state = engine.cache_image(photo("rocket.jpg"), system_prompt=SYSTEM, max_pixels=PIXELS)
    forged = state.to("cpu")
    forged.metadata = copy.deepcopy(state.metadata)
    forged.metadata.layer_kinds = kinds
    path = forged.save(tmp_path / "forged.pt")
    with pytest.raises(CacheFileError, match=r"cache file is corrupt \(bad layer kinds\)"):
        engine.load_state(path)
    for argv in (["inspect", str(path)], ["ask", "--model", str(engine.model_name), "--cache", str(path), "--prompt", "hi",
                                           "--max-new-tokens", "2"]):
        capsys.readouterr()
        code = cli.main(argv)
        err = capsys.readouterr().err
        assert "unexpected" not in err, (argv[0], err)
        if argv[0] == "ask":
            assert code == 1 and err.startswith("error: ")


def test_gemma4_video_identity_names_what_decides_its_frames_and_tokens(family_dir, tmp_path):
    """Gemma4.video_indices samples vp.num_frames frames, each of the video processor's max_soft_tokens tokens:
    both are in the state's identity. Two processors that differ in num_frames (same weights) give states of
    other frames; were their settings equal, a server's --cache-dir or `vlcache cache --output-dir` (which skips
    a file whose settings match) would hand out the state sampled the other way."""
    from vlcache.media import MediaOptions
    from vlcache.testing.clips import make_clip

    other = tmp_path / "other"
    shutil.copytree(family_dir("gemma4"), other)
    config = json.loads((other / "processor_config.json").read_text())
    config["video_processor"]["num_frames"] = 4  # the tiny checkpoint's is 8
    (other / "processor_config.json").write_text(json.dumps(config))
    one, two = Engine.load(str(family_dir("gemma4")), device="cpu"), Engine.load(str(other), device="cpu")
    clip = make_clip(tmp_path / "c.mp4", seconds=1.5, fps=8, size=(96, 64), source=photo("rocket.jpg"))
    first, second = one.cache([clip], system_prompt=SYSTEM), two.cache([clip], system_prompt=SYSTEM)
    assert first.metadata.parts[0]["frame_indices"] != second.metadata.parts[0]["frame_indices"]  # other states
    assert one.media_settings(MediaOptions(), ["video"]) != two.media_settings(MediaOptions(), ["video"])


def test_an_odd_file_among_several_caches_does_not_stop_the_others(family_engine, tmp_path, capsys):
    """`vlcache ask --cache a --cache odd --cache b` answers a and b and names odd in one line."""
    import copy

    engine = family_engine("gemma4")
    state = engine.cache_image(photo("rocket.jpg"), system_prompt=SYSTEM, max_pixels=PIXELS)
    good = state.save(tmp_path / "good.pt")
    forged = state.to("cpu")
    forged.metadata = copy.deepcopy(state.metadata)
    forged.metadata.layer_kinds = [0] * len(state.kv)
    odd = forged.save(tmp_path / "odd.pt")
    capsys.readouterr()
    code = cli.main(["ask", "--model", str(engine.model_name), "--cache", str(good), "--cache", str(odd),
                     "--cache", str(good), "--prompt", "hi", "--max-new-tokens", "2", "--temperature", "0"])
    out, err = capsys.readouterr()
    assert code == 1
    assert out.count(f"==> {good} | hi <==") == 2, (out, err)


def test_a_file_whose_sliding_source_layer_holds_too_few_tokens_is_refused(family_engine, tmp_path):
    """A sliding layer must hold at least the prefix's last min(n, window - 1) tokens (all a later query sees):
    a file whose layer 3 (the source Gemma 4's shared layer 4 reads) holds 10 of its 63 would have its queries
    attend to zero keys where the 53 others belong. Refused in one line, naming the least it must hold."""
    from vlcache.testing.more_families import GEMMA4_SLIDING_WINDOW

    engine = family_engine("gemma4")
    state = engine.cache_image(photo("rocket.jpg"), system_prompt=SYSTEM, max_pixels=PIXELS)
    assert state.kv[3][0].shape[2] == GEMMA4_SLIDING_WINDOW - 1 < state.num_tokens
    short = state.to("cpu")
    short.kv = [tuple(t[:, :, -10:].clone() for t in kv) if i == 3 else kv for i, kv in enumerate(state.kv)]
    path = short.save(tmp_path / "short.pt")
    with pytest.raises(ModelMismatchError, match=rf"layer 3's keys and values are \[1, 1, 10, 16\] .*the model's "
                       rf"\[1, 1, 63\.\.{state.num_tokens}, 16\]$"):
        engine.load_state(path)
