"""One call of a model part (a vision encoder) as units of work, cut at its layer boundaries, exactly.

A large image keeps the vision encoder busy for seconds in one call; a server that decodes for other clients
between units of work would stall every running answer that long. Splitting the image (frame groups, patch
chunks) changes what the encoder computes (its attention spans the whole image), so the call is not split:
it runs as it is in a worker thread that stops at the start of each of its blocks until given a turn. The
caller and the worker never run at the same time, so every operation, and its order, is what one call does.
"""

from __future__ import annotations

import threading
from typing import Callable

import torch


class _Stopped(Exception):
    """Raised inside the worker when the caller gave up (its generator closed): the call ends at a block start."""


def in_pieces(blocks, run: Callable[[], object]):
    """run() as a generator that yields each time the call reaches the start of one of `blocks` (modules it
    calls in turn, e.g. a vision tower's layers) and returns run()'s value; its exception is raised here.
    run() executes under inference mode (the mode is per thread). Closing the generator early stops the call
    at its next block start and waits for the worker to end; the hooks are removed either way."""
    turn, paused = threading.Semaphore(0), threading.Semaphore(0)
    outcome: dict = {"done": False, "stop": False}
    worker: list = [None]

    def pause(module, args):
        if threading.get_ident() != worker[0]:  # another call of these blocks (another worker, or none): not ours
            return None
        paused.release()
        turn.acquire()
        if outcome["stop"]:
            raise _Stopped()
        return None

    def work():
        worker[0] = threading.get_ident()
        try:
            with torch.inference_mode():
                outcome["value"] = run()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread below
            outcome["error"] = exc
        finally:
            outcome["done"] = True
            paused.release()

    handles = [block.register_forward_pre_hook(pause) for block in blocks]
    thread = threading.Thread(target=work, name="vlcache-encoder", daemon=True)
    try:
        thread.start()
        paused.acquire()
        while not outcome["done"]:
            yield
            turn.release()
            paused.acquire()
    finally:
        if not outcome["done"]:
            outcome["stop"] = True
            turn.release()
        thread.join()
        for handle in handles:
            handle.remove()
    error = outcome.get("error")
    if error is not None:
        raise error
    return outcome["value"]


def vision_blocks(model) -> list:
    """The layers of `model`'s vision tower, in order (the longest ModuleList under it); [] if none is found."""
    inner = getattr(model, "model", model)
    tower = next((getattr(inner, name) for name in ("visual", "vision_tower", "vision_model")
                  if isinstance(getattr(inner, name, None), torch.nn.Module)), None)
    if tower is None:
        return []
    lists = [m for m in tower.modules() if isinstance(m, torch.nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []
