"""Several images and videos in one state: the API, the file, the CLI and the server against transformers'
own generate on the same uncached conversation; video sampling; continuing a state; bad videos."""

import base64
import copy
import json

import pytest

from conftest import REPO, SYSTEM, photo
from reference import reference_for_parts
from test_cli import assert_one_line_error, run
from test_server import LiveServer
from vlcache import prompt, video
from vlcache.errors import CacheFileError, ImageError, VideoError
from vlcache.families.base import run_steps
from vlcache.media import MediaOptions
from vlcache.state import load_state
from vlcache.testing import clips

N = 10
CLIP = REPO.parent / "shared" / "videos" / "hubble_pan.mp4"
QUESTION = "What objects are visible in this image?"


def clip():
    if not CLIP.exists():
        pytest.fail(f"sample clip missing: {CLIP} (tests expect ../shared/videos beside the repo)")
    return CLIP


def expected(engine, state, sources, question=QUESTION, fps=None):
    return reference_for_parts(engine, prompt.with_question(state.metadata.messages, question), sources, N, fps=fps)


CASES = {
    "two images": (["astronaut.png", "rocket.jpg"], SYSTEM),
    "three images": (["rocket.jpg", "coffee.png", "chelsea.png"], None),
    "a video": (["clip"], SYSTEM),
    "a video, no system prompt": (["clip"], None),
    "an image and a video": (["chelsea.png", "clip"], None),
    "a video and two images": (["clip", "coffee.png", "camera.png"], SYSTEM),
}


def sources_of(names):
    return [clip() if name == "clip" else photo(name) for name in names]


@pytest.mark.parametrize("case", list(CASES))
def test_states_of_several_parts_answer_as_generate_does(engine, case):
    names, system = CASES[case]
    sources = sources_of(names)
    state = engine.cache(sources, system_prompt=system)
    assert [p["type"] for p in state.metadata.parts] == ["video" if n == "clip" else "image" for n in names]
    assert [p["path"] for p in state.metadata.parts] == [str(s.resolve()) for s in sources]
    assert engine.ask(state, QUESTION, max_new_tokens=N).token_ids == expected(engine, state, sources)


def test_the_exactness_check_catches_wrong_positions_and_frames(engine):
    """Controls: a state whose M-RoPE delta is off by one, or whose video was sampled at another rate, answers
    differently, so the equality above is not a coincidence of a model that ignores its inputs."""
    sources = [photo("chelsea.png"), clip()]
    state = engine.cache(sources, system_prompt=SYSTEM)
    right = engine.ask(state, QUESTION, max_new_tokens=N).token_ids
    shifted = copy.copy(state)
    shifted.rope_deltas = state.rope_deltas + 1
    assert engine.ask(shifted, QUESTION, max_new_tokens=N).token_ids != right
    other_rate = engine.cache(sources, system_prompt=SYSTEM, options=MediaOptions(fps=1))
    assert engine.ask(other_rate, QUESTION, max_new_tokens=N).token_ids != right


def test_video_parts_record_frames_and_timestamps_chosen_as_the_processor_does(engine):
    from transformers.video_utils import VideoMetadata

    state = engine.cache([clip()], system_prompt=SYSTEM)
    part = state.metadata.parts[0]
    vp = engine.processor.video_processor
    meta = VideoMetadata(total_num_frames=32, fps=8.0)
    assert part["frame_indices"] == [int(i) for i in vp.sample_frames(meta, fps=vp.fps)]  # 4 s at 2 fps: 8 frames
    assert part["frames"] == 8 and part["total_frames"] == 32 and part["fps"] == 8.0 and part["size"] == [320, 240]
    assert part["timestamps"] == [round(i / 8, 3) for i in part["frame_indices"]]
    assert part["grid"][0] == 4  # frames pair up in the encoder (temporal patch 2)
    assert state.metadata.processor_settings["video"]["fps"] == vp.fps
    fewer = engine.cache([clip()], system_prompt=SYSTEM, options=MediaOptions(max_frames=2))
    assert fewer.metadata.parts[0]["frames"] == 2 and fewer.num_tokens < state.num_tokens
    assert fewer.metadata.processor_settings != state.metadata.processor_settings  # part of the identity
    small = engine.cache([clip()], system_prompt=SYSTEM, options=MediaOptions(max_pixels=160 * 120))
    assert small.metadata.parts[0]["frame_size"] == [160, 120] and small.num_tokens < state.num_tokens


def test_a_saved_state_of_several_parts_answers_the_same(engine, tmp_path):
    sources = [photo("rocket.jpg"), clip()]
    state = engine.cache(sources, system_prompt=SYSTEM)
    path = state.save(tmp_path / "pair.pt")
    loaded = engine.load_state(path)
    assert loaded.metadata.parts == state.metadata.parts and loaded.image_grid_thw.tolist() == state.image_grid_thw.tolist()
    assert engine.ask(loaded, QUESTION, max_new_tokens=N).token_ids == expected(engine, state, sources)


def test_a_file_with_bad_parts_is_refused(engine, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = engine.cache([photo("rocket.jpg")], system_prompt=SYSTEM).save(tmp_path / "a.pt")
    with safe_open(str(path), "pt") as fh:
        header = fh.metadata()
        tensors = {name: fh.get_tensor(name) for name in fh.keys()}
    meta = json.loads(header["metadata"])
    meta["parts"] = [["not", "a", "part"]]
    save_file(tensors, str(tmp_path / "bad.pt"), metadata={**header, "metadata": json.dumps(meta)})
    with pytest.raises(CacheFileError, match="bad media parts"):
        load_state(tmp_path / "bad.pt")


@pytest.mark.parametrize("chunk", [None, 32])
def test_continuing_a_state_with_more_media_equals_computing_it_whole(engine, chunk):
    first = engine.cache([photo("astronaut.png")], system_prompt=SYSTEM)
    sources = [photo("astronaut.png"), clip()]
    messages = prompt.media_conversation(SYSTEM, ["image", "video"])
    state = run_steps(engine.cache_media_steps(sources, messages, chunk=chunk, base=first))
    assert state.metadata.reused_tokens == first.num_tokens
    whole = engine.cache(sources, system_prompt=SYSTEM)
    assert state.input_ids.tolist() == whole.input_ids.tolist() and int(state.rope_deltas) == int(whole.rope_deltas)
    assert engine.ask(state, QUESTION, max_new_tokens=N).token_ids == expected(engine, whole, sources)
    # A base that does not lead the conversation (another system prompt) is not used.
    other = engine.cache([photo("astronaut.png")], system_prompt="Another system prompt.")
    fresh = run_steps(engine.cache_media_steps(sources, messages, base=other))
    assert fresh.metadata.reused_tokens == 0 and fresh.input_ids.tolist() == whole.input_ids.tolist()


def test_the_memory_check_counts_video_tokens_before_any_frame_is_decoded(engine, monkeypatch):
    from vlcache import model as model_loading

    monkeypatch.setattr(model_loading, "available_memory", lambda device: 100_000)  # the clip needs ~0.5 MB
    monkeypatch.setattr(video, "decode", lambda *a, **k: pytest.fail("decoded before the memory check"))
    with pytest.raises(ImageError, match="too large for the memory at hand.*--max-frames"):
        engine.cache([clip()], system_prompt=SYSTEM)


@pytest.fixture(scope="module")
def bad_videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad-videos")
    good = clips.make_clip(folder / "good.mp4", seconds=5, fps=8, faststart=True)
    (folder / "text.mp4").write_text("just some text, not a video")
    with __import__("av").open(str(folder / "empty.mp4"), "w") as container:  # a video stream that holds no frame
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        container.start_encoding()
    return {
        "truncated": (clips.truncate(good, folder / "truncated.mp4", keep=0.5), "truncated or corrupt"),
        "no frames": (folder / "empty.mp4", "no video stream"),
        "not a video": (folder / "text.mp4", "not a video"),
        "audio only": (clips.make_audio_only(folder / "tone.mp4"), "no video stream in"),
        "enormous frames": (clips.make_huge_frames(folder / "huge.mov"), "video frames are too large"),
        "empty file": (_empty(folder / "zero.webm"), "video file is empty"),
    }


def _empty(path):
    path.write_bytes(b"")
    return path


@pytest.mark.parametrize("case", ["truncated", "no frames", "not a video", "audio only", "enormous frames", "empty file"])
def test_bad_videos_are_refused_with_a_reason(engine, bad_videos, case):
    path, reason = bad_videos[case]
    with pytest.raises(VideoError, match=reason) as info:
        engine.cache([path], system_prompt=SYSTEM)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_families_without_video_say_so(family_engine):
    engine = family_engine("gemma3")
    with pytest.raises(VideoError, match="takes no videos"):
        engine.cache([clip()])


@pytest.mark.parametrize("kind", ["qwen2_5_vl", "qwen3_5", "gemma3", "llava_onevision"])
def test_several_parts_in_other_families(family_engine, kind):
    """Qwen2.5-VL spaces video frames by second_per_grid_ts; Qwen3.5 keeps linear-attention state; Gemma 3 and
    LLaVA-OneVision take several images."""
    engine = family_engine(kind)
    sources = [photo("chelsea.png"), clip()] if engine.family.takes_video else [photo("rocket.jpg"), photo("coffee.png")]
    state = engine.cache(sources, system_prompt=SYSTEM)
    assert engine.ask(state, QUESTION, max_new_tokens=N).token_ids == expected(engine, state, sources)
    if engine.family.extends:  # continue a cached first image with the video
        first = engine.cache(sources[:1], system_prompt=SYSTEM)
        grown = run_steps(engine.cache_media_steps(sources, state.metadata.messages, chunk=16, base=first))
        assert grown.metadata.reused_tokens == first.num_tokens
        assert engine.ask(grown, QUESTION, max_new_tokens=N).token_ids == expected(engine, state, sources)


# -- the CLI, fresh processes --------------------------------------------------------------------------------

def test_cli_caches_several_inputs_into_one_state(engine, tiny_model_dir, tmp_path):
    sources = [photo("rocket.jpg"), photo("coffee.png"), clip()]
    out = tmp_path / "three.pt"
    made = run("cache", *sources, "--output", out, "--model", tiny_model_dir, "--fps", "1")
    assert made.returncode == 0 and made.stdout == "", made.stderr
    assert "4 video frames" in made.stderr
    asked = run("ask", "--cache", out, "--prompt", QUESTION, "--max-new-tokens", N, "--json")
    assert asked.returncode == 0, asked.stderr
    answer = json.loads(asked.stdout)
    state = load_state(out)
    assert answer["token_ids"] == expected(engine, state, sources, fps=1)
    assert answer["cached_tokens"] == state.num_tokens
    shown = run("inspect", out)
    assert shown.stdout.count("image:") == 2 and "video:" in shown.stdout and "4 frames sampled, at" in shown.stdout \
        and "from a source of 32 frames at 8 fps" in shown.stdout


def test_cli_output_dir_makes_one_state_per_input_videos_too(tiny_model_dir, tmp_path):
    folder = tmp_path / "media"
    folder.mkdir()
    (folder / "rocket.jpg").write_bytes(photo("rocket.jpg").read_bytes())
    clips.make_clip(folder / "pan.webm", seconds=1, fps=4, codec="libvpx-vp9")
    made = run("cache", folder, "--output-dir", tmp_path / "out", "--model", tiny_model_dir)
    assert made.returncode == 0, made.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["pan_cache.pt", "rocket_cache.pt"]
    assert load_state(tmp_path / "out" / "pan_cache.pt").metadata.parts[0]["type"] == "video"


@pytest.mark.parametrize("case", ["truncated", "not a video", "audio only", "enormous frames"])
def test_cli_bad_videos_are_one_line_errors(tiny_model_dir, tmp_path, bad_videos, case):
    path, reason = bad_videos[case]
    out = tmp_path / "out.pt"
    result = run("cache", photo("rocket.jpg"), path, "--output", out, "--model", tiny_model_dir)
    assert_one_line_error(result, reason)
    assert not out.exists()


def test_cli_video_flags_are_checked(tiny_model_dir, tmp_path):
    for flag, value in (("--fps", "0"), ("--fps", "fast"), ("--max-frames", "0")):
        result = run("cache", clip(), "--output", tmp_path / "x.pt", "--model", tiny_model_dir, flag, value)
        assert result.returncode == 2 and "Traceback" not in result.stderr
    folder = run("cache", photo("rocket.jpg"), REPO.parent / "shared" / "images", "--output", tmp_path / "x.pt")
    assert folder.returncode == 2 and "--output-dir" in folder.stderr


# -- the server ----------------------------------------------------------------------------------------------

def media_url(path):
    mime = {".mp4": "video/mp4", ".mov": "video/quicktime", ".jpg": "image/jpeg", ".png": "image/png"}[path.suffix]
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


def part(path):
    kind = "video_url" if video.is_video_path(path) else "image_url"
    return {"type": kind, kind: {"url": media_url(path)}}


def chat(server, content, system=SYSTEM):
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    return server.client.chat.completions.create(model="any", messages=messages, max_tokens=N, temperature=0)


@pytest.fixture
def server(engine, tmp_path):
    live = LiveServer(engine, tmp_path / "states")
    yield live
    live.close()


def test_server_takes_several_images_and_videos_and_reuses_the_longest_cached_prefix(engine, server):
    a, v = photo("astronaut.png"), clip()
    state_a = engine.cache([a], system_prompt=SYSTEM)
    state_av = engine.cache([a, v], system_prompt=SYSTEM)
    tokenizer = engine.processor.tokenizer

    first = chat(server, [part(a), {"type": "text", "text": QUESTION}])
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    # The same conversation with a video after the image: only the video and what follows are computed.
    grown = chat(server, [part(a), part(v), {"type": "text", "text": QUESTION}])
    assert grown.usage.prompt_tokens_details.cached_tokens == state_a.num_tokens
    assert grown.choices[0].message.content == tokenizer.decode(expected(engine, state_av, [a, v]), skip_special_tokens=True)
    # Asked again: the state for [image, video] was kept.
    again = chat(server, [part(a), part(v), {"type": "text", "text": "Describe the lighting and mood."}])
    assert again.usage.prompt_tokens_details.cached_tokens == state_av.num_tokens
    want = expected(engine, state_av, [a, v], "Describe the lighting and mood.")
    assert again.choices[0].message.content == tokenizer.decode(want, skip_special_tokens=True)


def test_server_two_images_and_a_video_alone(engine, server):
    tokenizer = engine.processor.tokenizer
    for sources, system in (([photo("rocket.jpg"), photo("coffee.png")], None), ([clip()], SYSTEM)):
        reply = chat(server, [*map(part, sources), {"type": "text", "text": QUESTION}], system=system)
        state = engine.cache(sources, system_prompt=system)
        assert reply.choices[0].message.content == tokenizer.decode(expected(engine, state, sources), skip_special_tokens=True)
        repeat = chat(server, [*map(part, sources), {"type": "text", "text": QUESTION}], system=system)
        assert repeat.usage.prompt_tokens_details.cached_tokens == state.num_tokens


@pytest.mark.parametrize("case", ["truncated", "not a video", "audio only", "enormous frames"])
def test_server_bad_videos_are_400s(server, bad_videos, case):
    path, reason = bad_videos[case]
    body = {"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": media_url(path)}},
                                                      {"type": "text", "text": "What happens?"}]}]}
    status, reply = server.post("/v1/chat/completions", json.dumps(body).encode())
    assert status == 400 and reason in reply["error"]["message"] and "\n" not in reply["error"]["message"]


def test_server_limits_on_videos(engine, tmp_path):
    live = LiveServer(engine, tmp_path / "states", max_image_pixels=96 * 64 - 1, max_body_bytes=60_000)
    try:
        small = clips.make_clip(tmp_path / "small.mp4", seconds=1, fps=4, size=(96, 64))
        body = {"messages": [{"role": "user", "content": [part(small), {"type": "text", "text": "Hi"}]}]}
        status, reply = live.post("/v1/chat/completions", json.dumps(body).encode())
        assert status == 400 and "video frames are too large" in reply["error"]["message"]
        body = {"messages": [{"role": "user", "content": [part(clip())]}]}  # 74 kB: over the body limit
        status, reply = live.post("/v1/chat/completions", json.dumps(body).encode())
        assert status == 413 and reply["error"]["type"] == "invalid_request_error"
        many = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}] * 33}]}
        status, reply = live.post("/v1/chat/completions", json.dumps(many).encode())
        assert status == 400 and "at most 32 images and videos" in reply["error"]["message"]
    finally:
        live.close()


@pytest.mark.parametrize("kind", ["gemma3", "llava_onevision"])
def test_the_memory_check_knows_image_tokens_in_every_family(family_engine, kind):
    """The estimate the memory check uses before the encoder runs is the count the state ends up with."""
    engine = family_engine(kind)
    state = engine.cache([photo("rocket.jpg")], system_prompt=None)
    assert engine.image_tokens(*state.metadata.image_size) == state.metadata.image_tokens


def test_a_video_of_one_frame_is_refused_in_one_line(engine, tmp_path):
    """Qwen's encoder pairs frames; its processor refuses a single one, and that is a user error, not a crash."""
    path = clips.make_clip(tmp_path / "one.mp4", seconds=0.1, fps=8)
    with pytest.raises(ImageError, match="processor refused the media") as info:
        engine.cache([path])
    assert "\n" not in str(info.value)
