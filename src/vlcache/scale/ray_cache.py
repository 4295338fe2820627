"""`vlcache cache ... --output-dir URL --ray [--workers N]`: cache a collection on a Ray cluster.

Inputs (local files, folders, globs, or an `s3://` prefix) become a Ray Data dataset; a pool of N actors each
loads the model once (one GPU each when the cluster has GPUs) and turns one input at a time into a state. A
state is written under its content-addressed name, the key a server computes for the same conversation
(`<key>.safetensors`), so a `vlcache serve --cache-dir URL` on the same folder finds it without a rescan; a
state that is already there is skipped (a rerun after a crash resumes where it stopped), a bad input fails
alone, and `manifest.json` records what was cached, skipped and failed.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from .. import storage
from ..batch import MEDIA_SUFFIXES, CacheResult, expand_images
from ..errors import VlcacheError
from ..media import MediaOptions, kind_of

MANIFEST = "manifest.json"


class CacheWorker:
    """One Ray actor: loads the engine once, caches inputs one by one into the output folder."""

    def __init__(self, model: str, device: str, dtype: str, output_dir: str, system_prompt: str | None,
                 options: dict, force: bool, quantize: str = "none", threads: int | None = None):
        import torch

        from ..engine import Engine

        if threads is not None:
            torch.set_num_threads(threads)
        self.engine = Engine.load(model, device=device, dtype=dtype, quantize=quantize)
        self.output_dir, self.system_prompt, self.force = output_dir, system_prompt, force
        self.options = MediaOptions(**options)

    def __call__(self, batch: dict) -> dict:
        rows = [self.cache_one(str(source)) for source in batch["source"]]
        return {name: [row[name] for row in rows] for name in ("source", "output", "status", "error", "tokens", "seconds")}

    def cache_one(self, source: str) -> dict:
        from .. import prompt

        start = time.perf_counter()
        try:
            # The bytes name the state; a local file is cached by its path (read again) so the state records it.
            data = storage.read_bytes(source) if storage.is_url(source) else Path(source).read_bytes()
            kind = kind_of(source)
            messages = prompt.media_conversation(self.system_prompt, [kind])
            at = self.engine.pin_time()  # one instant for the key and the state (a clock-reading template)
            key = self.engine.state_key([(kind, hashlib.sha256(data).hexdigest())], messages, self.options, at=at)
            target = storage.join(self.output_dir, f"{key}.safetensors")
            exists = storage.exists(str(target)) if storage.is_url(target) else os.path.exists(target)
            if exists and not self.force:
                return _row(source, target, "skipped", None, 0, start)
            from ..families.base import run_steps

            state = run_steps(self.engine.cache_media_steps([source if not storage.is_url(source) else data], messages,
                                                            self.options, at=at))
            state.save(target)
            return _row(source, target, "cached", None, state.num_tokens, start)
        except (VlcacheError, OSError) as exc:
            return _row(source, None, "failed", str(exc), 0, start)


def _row(source, output, status: str, error: str | None, tokens: int, start: float) -> dict:
    return {"source": source, "output": str(output) if output is not None else "", "status": status,
            "error": error or "", "tokens": tokens, "seconds": time.perf_counter() - start}


def list_inputs(arguments: Sequence[str]) -> tuple[list[str], list[CacheResult]]:
    """Local files, folders and globs (as the local batch takes them), and URL prefixes ending in "/"."""
    sources, failures, local = [], [], []
    for arg in arguments:
        if storage.is_url(arg):
            found = sorted(storage.listing(arg, tuple(MEDIA_SUFFIXES))) if arg.endswith("/") else [arg]
            if not found:
                failures.append(CacheResult(arg, None, "failed", f"no images or videos under {arg}"))
            sources += found
        else:
            local.append(arg)
    paths, missing = expand_images(local)
    return sources + [str(p.resolve()) for p in paths], failures + missing


def cache_on_ray(arguments: Sequence[str], output_dir: str, model: str, device: str = "auto", dtype: str = "auto",
                 system_prompt: str | None = None, options: MediaOptions | None = None, workers: int = 1,
                 force: bool = False, on_start: Callable[[int], None] | None = None,
                 on_result: Callable[[CacheResult], None] | None = None, verbose: bool = False,
                 quantize: str = "none", threads: int | None = None) -> list[CacheResult]:
    """Cache every input on Ray (RAY_ADDRESS, or a local cluster started for the call) into `output_dir`. Ray's
    own log lines reach stderr only when `verbose`. Each worker loads the model quantized by `quantize` and
    computes with `threads` CPU threads (None: torch's choice)."""
    try:
        import pandas  # noqa: F401 - Ray Data needs it when the batch runs, long after `import ray` succeeded
        import ray
    except ImportError as exc:
        raise VlcacheError(f"--ray needs Ray Data ({exc.name or exc} is missing): pip install 'vlcache[ray]'") from None
    sources, results = list_inputs(arguments)
    if on_start:
        on_start(len(sources))
    for failure in results:
        if on_result:
            on_result(failure)
    if not storage.is_url(output_dir):
        os.makedirs(output_dir, exist_ok=True)
        output_dir = os.path.abspath(output_dir)
    if sources:
        from .cluster import init

        init(verbose)
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        dataset = ray.data.from_items([{"source": s} for s in sources], override_num_blocks=len(sources))
        with warnings.catch_warnings():
            # max_restarts=0 (Ray Data's documented switch; a keyword its newer versions call deprecated without a
            # named replacement yet): a worker is not restarted from constructor arguments the object store may
            # have dropped, and Ray's core no longer logs an error line on stderr for every batch about that.
            warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
            computed = dataset.map_batches(
                CacheWorker, batch_size=1, concurrency=max(1, min(workers, len(sources))), num_gpus=gpus,
                num_cpus=0 if gpus else 1, max_restarts=0, fn_constructor_kwargs={
                    "model": model, "device": device, "dtype": dtype, "output_dir": str(output_dir),
                    "system_prompt": system_prompt, "options": asdict(options or MediaOptions()), "force": force,
                    "quantize": quantize, "threads": threads},
            )
        for row in computed.iter_rows():
            result = CacheResult(row["source"], row["output"] or None, row["status"], row["error"] or None,
                                 int(row["tokens"]), float(row["seconds"]))
            results.append(result)
            if on_result:
                on_result(result)
    write_manifest(output_dir, model, system_prompt, results)
    return results


def write_manifest(output_dir: str, model: str, system_prompt: str | None, results: list[CacheResult]) -> None:
    manifest = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "model": model,
        "system_prompt": system_prompt,
        "counts": {status: sum(r.status == status for r in results) for status in ("cached", "skipped", "failed")},
        "results": [{"source": r.image, "output": str(r.output) if r.output else None, "status": r.status,
                     "error": r.error, "tokens": r.tokens, "seconds": round(r.seconds, 3)} for r in results],
    }
    data = (json.dumps(manifest, indent=1) + "\n").encode()
    storage.write_atomic(str(storage.join(output_dir, MANIFEST)), data)  # a local path or a URL alike
