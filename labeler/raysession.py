"""Joining or starting Ray for a labeling run, and what the cluster offers."""

from __future__ import annotations

import os
import signal
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from softlabels.schemas.errors import UserError


def _probe_ray_address(address: str, timeout: float = 5.0) -> None:
    """Fail fast on a ``host:port`` nobody listens on (``ray.init`` retries a dead GCS for minutes)."""
    if address == "auto" or "://" in address:
        return  # "auto" finds a local cluster itself; ray:// goes through the Ray client
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise UserError(f"--ray-address {address!r}: expected host:port, 'auto' or ray://host:port")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise UserError(f"cannot join the Ray cluster at {address!r}: nothing answers there ({e})") from e


def _crash_env() -> dict[str, str]:
    """The crash-point variables (:mod:`softlabels.common.crash`) to hand to a joined cluster's workers.

    A local Ray's workers inherit the driver's environment; the workers of a cluster we join get
    their node's, so fault-injection tests that point the labeler at a running cluster (one Ray
    shared by many runs) pass the variables on as the job's ``env_vars``. Empty unless crash
    points are on: a user's job is never changed.
    """
    from softlabels.common import crash

    if not crash.enabled():
        return {}
    names = (crash.ENV, crash.DRIVER_ENV, crash.SCOPE_ENV, crash.ONCE_ENV)
    return {k: os.environ[k] for k in names if k in os.environ}


def _ray_sigterm(e: SystemExit) -> bool:
    """Whether ``e`` is Ray's start-up SIGTERM handler's ``sys.exit(15)`` (as raised, or as Ray's wait
    loops re-raise a SystemExit from a signal handler: ``SystemExit(1)`` whose message names the code)."""
    return e.code == signal.SIGTERM or f"Exit code: {int(signal.SIGTERM)}." in str(getattr(e, "ray_terminate_msg", ""))


@contextmanager
def ray_session(address: str | None) -> Iterator[Any]:
    """Join ``address`` (or ``$RAY_ADDRESS``) or start a fresh local Ray; shut down what we started.

    Without an address we start a new local Ray (``address="local"``), never the
    cluster named in Ray's ``/tmp/ray/ray_current_cluster``: that file outlives the
    cluster it names (a killed ``ray start`` or test), and joining it hangs.
    ``--ray-address auto`` joins a cluster started on this machine with ``ray start``.
    """
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    started = False
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS") or None
        main = threading.current_thread() is threading.main_thread()
        sigterm = signal.getsignal(signal.SIGTERM) if main else None
        try:
            if address:
                _probe_ray_address(address)
                crash_env = _crash_env()
                ray.init(address=address, log_to_driver=True, configure_logging=False,
                         **({"runtime_env": {"env_vars": crash_env}} if crash_env else {}))
            else:
                ray.init(address="local", include_dashboard=False, log_to_driver=True, configure_logging=False)
        except ConnectionError as e:
            raise UserError(f"cannot join the Ray cluster at {address!r}: {e}") from e
        except SystemExit as e:
            if not (main and _ray_sigterm(e)):
                raise
            # A SIGTERM while Ray started went to the handler ray.init installs for its start-up
            # (sys.exit(15)): deliver it again, to ours (below), so the command ends as for any SIGTERM.
            signal.signal(signal.SIGTERM, sigterm)
            signal.raise_signal(signal.SIGTERM)
            raise
        finally:
            if main:
                # ray.init installs its own SIGTERM handlers (sys.exit(15) while it starts, then a C++
                # stack dump, exit 134): put ours back, so a preempted job unwinds, releases its
                # output and shuts Ray down.
                signal.signal(signal.SIGTERM, sigterm)
        started = True
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def cluster_gpus(ray: Any) -> int:
    return int(ray.cluster_resources().get("GPU", 0))


def max_gpus_per_node(nodes: list[dict[str, Any]]) -> int:
    return int(max((n.get("Resources", {}).get("GPU", 0) for n in nodes), default=0))
