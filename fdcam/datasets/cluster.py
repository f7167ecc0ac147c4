"""The Ray cluster of a dataset run: the Ray session it runs in and the actor pool it fits on the cluster."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

__all__ = ["PoolPlan", "plan_pool", "ray_session"]


@dataclass(frozen=True)
class PoolPlan:
    """How many actors, what each reserves from the cluster, and how many decode (and write) tasks may run at
    once (None: as many as fit)."""

    actors: int
    cpus_per_actor: float
    gpus_per_actor: float
    decode_tasks: int | None = None


def plan_pool(resources: dict[str, float], actors: int | None = None, gpus_per_actor: float = 0) -> PoolPlan:
    """The actor pool for a cluster with `resources` (ray.cluster_resources()).

    CPU actors reserve half a CPU on machines of up to 4 CPUs, one CPU above, and a quarter of the CPUs (at
    least half of one) is left for reading and decoding: an actor pool that takes every CPU starves the decode
    tasks and the pipeline stalls. By default, one actor per free whole CPU (at least one). GPU actors:
    one per `gpus_per_actor` GPUs. Asking for more actors than fit is a ValueError (Ray would wait forever).
    """
    cpus = float(resources.get("CPU", 0))
    gpus = float(resources.get("GPU", 0))
    if actors is not None and actors < 1:
        raise ValueError(f"actors must be at least 1, got {actors}")
    if gpus_per_actor < 0:
        raise ValueError(f"gpus_per_actor must be 0 or more, got {gpus_per_actor}")
    if gpus_per_actor > 0:
        fit = int(gpus // gpus_per_actor)
        if fit < 1:
            raise ValueError(f"gpus_per_actor={gpus_per_actor} but the Ray cluster has {gpus:g} GPU(s)")
        chosen = actors or fit
        if chosen > fit:
            raise ValueError(
                f"{chosen} actors at {gpus_per_actor:g} GPU each need {chosen * gpus_per_actor:g} GPUs;"
                f" the Ray cluster has {gpus:g}"
            )
        # A GPU actor can explain hundreds of images a second: decoding gets every CPU left.
        return PoolPlan(chosen, min(1.0, max(0.25, (cpus - 0.5) / chosen)), gpus_per_actor)
    per_actor = 0.5 if cpus <= 4 else 1.0
    reserve = max(0.5, cpus / 4)
    fit = int((cpus - reserve) // per_actor)
    if fit < 1:
        raise ValueError(f"the Ray cluster has {cpus:g} CPU(s): too few for an actor and the decode tasks")
    chosen = actors or max(1, int(cpus - reserve))
    if chosen > fit:
        raise ValueError(
            f"{chosen} actors at {per_actor:g} CPU each leave no CPU for decoding on a Ray cluster of"
            f" {cpus:g} CPUs; use at most {fit}"
        )
    # One decode task in flight per CPU actor keeps it fed (decoding an image costs a fraction of explaining it on
    # a CPU). Without a cap Ray starts a worker process for every decode task that fits in the CPUs left (six on
    # two CPUs), each importing torch with fdcam while the actors load: on 2 CPUs the first explanation came ~10 s
    # after the run's start, ~5 s with the cap (8 Lite0 photos, `fdcam explain-dataset --actors 1`: 20 → 14–16 s).
    return PoolPlan(chosen, per_actor, 0, decode_tasks=chosen)


@contextlib.contextmanager
def ray_session(address: str | None, quiet: bool = False) -> Iterator[Any]:
    """Ray for the run: the one this process already runs, an existing cluster at `address` ("auto",
    "ray://host:10001") or at $RAY_ADDRESS, or else a new local instance started here (shut down afterwards) that
    uses this machine's CPUs and GPUs."""
    try:
        import ray
    except ImportError:
        raise ImportError('Ray is not installed: pip install "fdcam[ray]"') from None
    import logging

    started = False
    if address is None and not os.environ.get("RAY_ADDRESS"):
        # ray.init() without an address joins any Ray already running on the machine (another user's run, a test
        # session's): a run without an address gets a Ray of its own. RAY_ADDRESS (set by `ray job submit`) is
        # an address given, and Ray reads it.
        address = "local"
    if not ray.is_initialized():
        options: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": not quiet}
        if address is not None and address.startswith("ray://"):
            options = {}  # Ray Client takes the cluster's settings
        if address == "local":
            options["include_dashboard"] = False
            # Workers import what the driver imports (a model factory in the caller's package).
            options["runtime_env"] = {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}}
        try:
            ray.init(address=address, **options)
        except ConnectionError as error:
            raise ValueError(f"cannot connect to the Ray cluster at {address}: {error}") from None
        started = True
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()
