"""The benchmark script runs end to end on the tiny model and writes well-formed results (not timed)."""

import json
import os
import subprocess
import sys

from conftest import REPO


def test_small_benchmark_writes_results(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), "--config", "small", "--out-dir", str(out), "--work-dir", str(work),
         "--skip-transformers-serve"],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((out / "benchmarks-small.json").read_text())
    assert set(data) >= {"machine", "warm", "model_load", "fresh", "many", "cache_many", "summary", "command"}
    rows = data["warm"]["images"]
    assert [r["image"] for r in rows] == ["astronaut.png", "hubble_deep_field.jpg"]
    for row in rows:
        assert row["file_bytes"] <= 1.01 * row["kv_bytes"] + 64 * 1024
        assert all(t > 0 for t in row["uncached_ttft_s"] + row["cached_ttft_s"] + row["floor_s"])
    summary = data["summary"]
    assert all(s["speedup"] > 0 for s in summary["images"]) and summary["batch_speedup"] > 0
    assert data["many"]["batch"]["tokens"] == data["many"]["sequential"]["tokens"]
    report = (out / "benchmarks-small.md").read_text()
    assert set(data["serve"]["vlcache serve"]["rps"]) == {"1", "4", "16"}
    for heading in ("Time to first token", "Cache file size", "Model load", "fresh process", "one batch", "Caching 2 photographs",
                    "Servers"):
        assert heading in report, heading
    assert (out / "ttft-small.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
