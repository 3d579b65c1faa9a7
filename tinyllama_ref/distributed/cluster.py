"""Joining a Ray cluster: the one started with `ray start` (docs/distributed.md), or a local one.

Ray is an optional extra (`pip install -e '.[distributed]'` in the tinyllama-ref source directory); nothing
else in the package imports it.
"""

import logging

from ..errors import TinyLlamaError

QUIET = logging.WARNING          # Ray's own INFO lines ("Started a local Ray instance") would clutter stderr


class DistributedError(TinyLlamaError):
    """Ray is missing or unreachable, or a worker or stage failed in a way a retry cannot fix."""


def import_ray():
    try:
        import ray
    except ImportError:
        raise DistributedError("Ray is not installed: pip install -e '.[distributed]' in the tinyllama-ref "
                               "source directory (on every "
                               "node of the cluster)") from None
    return ray


def connect(address="auto"):
    """Join the cluster at `address` ("HOST:6379", "ray://HOST:10001"); with "auto" the cluster this machine
    belongs to (`ray start`), else a private one; with "local" always a private one: on 127.0.0.1, this
    process's only, gone when it ends. Idempotent: an initialised Ray is used as it is."""
    ray = import_ray()
    if ray.is_initialized():
        return ray
    if address == "local":
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False, logging_level=QUIET)
        return ray
    if address in (None, "", "auto"):
        try:
            ray.init(address="auto", log_to_driver=False, logging_level=QUIET)
        except ConnectionError:
            # No cluster here: a local one bound to the loopback interface, gone when this process ends.
            ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False, logging_level=QUIET)
        return ray
    try:
        ray.init(address=address, log_to_driver=False, logging_level=QUIET)
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise DistributedError(f"cannot join the Ray cluster at {address!r} ({e}); start it with "
                               "`ray start --head` (see docs/distributed.md) or use --ray auto") from None
    return ray


def check_fits(ray, n_actors, cpus, what):
    """Refuse up front what the cluster can never place (Ray would wait for the cores forever)."""
    total = ray.cluster_resources().get("CPU", 0)
    if n_actors * cpus > total:
        raise DistributedError(f"{n_actors} {what} x {cpus} CPUs do not fit the Ray cluster's {total:g} CPUs: "
                               f"use fewer, fewer CPUs each, or add nodes (`ray start --address HEAD:6379`)")


def stop_actors(ray, actors):
    """Kill every actor (workers or stages: their memory goes back to their nodes); ones already gone are fine."""
    for a in actors:
        try:
            ray.kill(a, no_restart=True)
        except Exception:                     # already gone
            pass


def remote_error(error):
    """The TinyLlamaError inside a Ray task error (so the CLI prints its one line), else the error itself."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, TinyLlamaError) else error
