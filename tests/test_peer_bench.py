"""bench/peer_llamacpp.py's arguments and report, without building llama.cpp (the bench itself never runs here)."""

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def peer():
    spec = importlib.util.spec_from_file_location("bench_peer", REPO / "bench" / "peer_llamacpp.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_arguments(peer, tmp_path):
    args = peer.parse_args(["--cache", str(tmp_path), "--rounds", "2", "--vlcache-arg=--compile=off"])
    assert (args.cache, args.rounds, args.threads, args.vlcache_arg, args.skip_int8) == (tmp_path, 2, 2, ["--compile=off"], False)
    for bad in (["--rounds", "0"], ["--threads", "-1"]):
        with pytest.raises(SystemExit) as exc:
            peer.parse_args(bad)
        assert exc.value.code == 2


def test_the_report_judges_each_target(peer):
    def rounds(decode, cached):
        return [{"decode_ms": decode, "cached_ttft_s": cached, "new_image_ttft_s": 3.0, "decode_tokens": 64}]

    results = {"warm": {"vlcache bf16 vs llama.cpp BF16": {
        "start_s": {"vlcache bf16": 40.0, "llama.cpp BF16": 2.0},
        "rounds": {"vlcache bf16": rounds(60.0, 0.2), "llama.cpp BF16": rounds(50.0, 0.25)}}}}
    rows = {row["measure"]: row for row in peer.summarize(results)}
    assert rows["decode ms a token, batch 1, 64 tokens"]["ratio"] == pytest.approx(1.2)
    results.update(machine={"cpu": "x", "cores": 2, "torch": "t"}, llamacpp="v", threads=2, command="c", summary=list(rows.values()))
    text = peer.markdown(results)
    assert "| 1.20 | <= 1.0x: missed |" in text and "| 0.80 | <= 1.0x: met |" in text and "vlcache <= 30 s: missed" in text
