"""`vlcache check`: whether cached answers equal transformers' own for a model."""

from __future__ import annotations

import argparse


def run_check(args: argparse.Namespace) -> int:
    from ..check import run
    from ..model import quiet_transformers

    quiet_transformers(verbose=getattr(args, "verbose", False))  # as every command that loads a model
    from .common import apply_threads, overrides, quantization

    apply_threads(args)
    return run(args.model, device=args.device, dtype=args.dtype or "auto", debug=getattr(args, "debug", False),
               generation_config=overrides(args), quantize=quantization(args))
