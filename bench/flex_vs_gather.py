"""One decode step's attention of one layer over a fixed span, on the CPU: vlcache's eager gather through the block
table plus its attention (decode.rows: matmuls, float32 softmax), against FlexAttention (torch.nn.attention.
flex_attention, compiled, with a block mask that skips the span's unused blocks) over the same gathered K/V.

The question it answers (issue 28 item 3): with step shapes fixed to a span, does FlexAttention's block sparsity
pay for its compile and its different rounding on a CPU? Geometry of the Qwen3-VL-2B's layers (16 query heads, 8
K/V heads of 128), 16-token blocks, rows of `--length` real tokens in a span of `--span` positions.

Usage: python bench/flex_vs_gather.py [--dtype bfloat16] [--span 4096] [--length 800] [--rows 1 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--span", type=int, default=4096)
    parser.add_argument("--length", type=int, default=800)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    dtype = getattr(torch, args.dtype)
    q_heads, kv_heads, dim, size = 16, 8, 128, 16
    flex = torch.compile(flex_attention, dynamic=False)
    out = {"dtype": args.dtype, "span": args.span, "length": args.length, "threads": torch.get_num_threads(), "rows": {}}
    for rows in args.rows:
        blocks = args.span // size
        pool_keys = torch.randn(rows * blocks + 2, kv_heads, size, dim, dtype=dtype)
        pool_values = torch.randn_like(pool_keys)
        table = torch.arange(2, rows * blocks + 2).view(rows, blocks)
        query = torch.randn(rows, q_heads, 1, dim, dtype=dtype)
        lengths = torch.full((rows,), args.length)
        position = torch.arange(args.span)
        bias = torch.where(position < args.length, 0.0, float("-inf")).expand(rows, 1, 1, args.span)

        def gather():
            keys = pool_keys[table].transpose(1, 2).reshape(rows, kv_heads, args.span, dim)
            values = pool_values[table].transpose(1, 2).reshape(rows, kv_heads, args.span, dim)
            return keys, values

        def eager():
            keys, values = gather()
            q = query.reshape(rows, kv_heads, 2, dim)
            scores = torch.matmul(q, keys.transpose(-1, -2)).float() * dim**-0.5 + bias
            probs = torch.softmax(scores, dim=-1).to(values.dtype)
            return torch.matmul(probs, values)

        def flexed():
            keys, values = gather()
            mask = create_block_mask(lambda b, h, q, kv: kv < lengths[b], rows, None, 1, args.span, device="cpu")
            return flex_attention_call(query, keys, values, mask)

        def flex_attention_call(q, k, v, mask):
            return flex(q, k, v, block_mask=mask, enable_gqa=True)

        started = time.perf_counter()
        with torch.inference_mode():
            flexed()
            compile_s = time.perf_counter() - started
            times = {"eager_gather_ms": [], "flex_ms": [], "gather_only_ms": []}
            for _ in range(args.repeats):  # alternating
                for name, fn in (("eager_gather_ms", eager), ("flex_ms", flexed), ("gather_only_ms", gather)):
                    start = time.perf_counter()
                    fn()
                    times[name].append((time.perf_counter() - start) * 1e3)
        out["rows"][rows] = {name: round(statistics.median(values), 3) for name, values in times.items()}
        out["rows"][rows]["flex_first_call_s"] = round(compile_s, 1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
