"""The cost of the attention's row chunks in a compiled step (issue 28): first step (trace and compile) and the
median of the next five, 16 rows on the photograph's state, thin 2B-geometry model (bench/paged.py's), float32.

`--budget MiB` sets the compiled steps' chunk budget (decode.rows.COMPILED_GATHER_BUDGET; 16 gives the eager
budget's chunks, a large one one chunk a layer). Compile caches are not cleared: give each run a fresh
VLCACHE_HOME (vlcache's inductor cache lives under it) for a cold compile.

Usage: VLCACHE_HOME=$(mktemp -d) python bench/chunk_compile.py --work-dir /tmp/bpaged --budget 16 [--backend inductor]
       [--span 1024] [--rows 16]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from paged import PHOTO, build  # noqa: E402 - the sibling benchmark's thin checkpoint


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--budget", type=int, required=True, help="MiB")
    parser.add_argument("--backend", default="inductor", choices=["inductor", "eager"])
    parser.add_argument("--span", type=int, default=1024)
    parser.add_argument("--rows", type=int, default=16)
    args = parser.parse_args(argv)
    from vlcache import Engine, decode
    from vlcache.decode import rows
    from vlcache.decode.step import StepRunner

    torch.set_num_threads(1)
    rows.COMPILED_GATHER_BUDGET = args.budget * 2**20
    engine = Engine.load(str(build(args.work_dir / "kv2b-thin")), device="cpu", dtype="float32", compile="off")
    state = engine.cache_image(str(PHOTO))
    engine.runner = StepRunner(engine.model, "cpu", args.backend, span=args.span)
    prefix = engine.state_prefix(state)
    ids = [engine.question_ids(state.metadata.messages, f"What is in the picture? ({i})")[0] for i in range(args.rows)]
    batch = engine.batch()
    for question in ids:
        batch.add(prefix, decode.SamplingParams(0.0), 12, torch.cat([state.input_ids[0], question]))
    batch.sample(batch.prefill(ids))
    times = []
    for _ in range(6):
        start = time.perf_counter()
        batch.sample(batch.step())
        times.append(time.perf_counter() - start)
    print(f"compiled budget {args.budget} MiB, {args.backend}, span {args.span}, {args.rows} rows: first step "
          f"{times[0]:.1f} s, then median {statistics.median(times[1:]) * 1e3:.0f} ms (compiled steps "
          f"{engine.runner.steps}, failed: {engine.runner.failed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
