"""Joining a Ray cluster (RAY_ADDRESS) or starting a local one, for ray_cache and ray_serve, with Ray's own
notes kept off the command's stderr: the CLI promises vlcache's lines only there. Ray's INFO and WARNING lines
(the cluster started, its token authentication, Ray Data's execution plan and logged progress) go to Ray's
session logs (/tmp/ray/session_*/logs) as always; `verbose` shows them as Ray would."""

from __future__ import annotations

import logging
import os


def init(verbose: bool = False) -> None:
    import ray

    if ray.is_initialized():
        return
    level = logging.INFO if verbose else logging.ERROR
    logging.getLogger("ray").setLevel(level)
    ray.init(address=os.environ.get("RAY_ADDRESS") or None, log_to_driver=False, include_dashboard=False,
             logging_level=level)
    if not verbose:
        quiet_ray_data()


def quiet_ray_data() -> None:
    """Ray Data logs each execution's plan and progress at INFO on its own logger (set up when it is imported)."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    for name in ("ray.data", "ray"):
        logging.getLogger(name).setLevel(logging.ERROR)
