"""Teacher replicas on Ray: started as soon as Ray is up, placed one per GPU (or node, on CPU), and, with
``SOFTLABELS_KEEP_TEACHERS=N``, kept loaded between runs of one process (tests, notebooks, rounds)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from softlabels.labeler.config import LabelConfig
from softlabels.labeler.raysession import cluster_gpus, max_gpus_per_node
from softlabels.labeler.seams import LabelSettings
from softlabels.labeler.teacher import TeacherSource
from softlabels.schemas.errors import StorageError, UserError

log = logging.getLogger(__name__)

CPU_ACTOR_CPUS = 0.5  # a whole CPU per actor deadlocks 2-core machines (no room left for tasks)


class JobFailed(RuntimeError):
    """The job cannot go on (e.g. a teacher replica died past its restarts); rerun to resume."""


@dataclass
class Replicas:
    """Teacher replicas asked to load (``loading``: their load calls), not yet waited for."""

    actors: list[Any]
    loading: list[Any]
    device: str
    dtype: str
    threads: int | None  # torch threads per replica on CPU (None on GPU)
    node_ids: list[str] | None = None  # known already (kept replicas), else asked in nodes()

    def nodes(self) -> list[str]:
        """The Ray node of each replica (waits for their processes to be up)."""
        if self.node_ids is None:
            import ray

            try:
                self.node_ids = ray.get([a.node.remote() for a in self.actors])
            except ray.exceptions.RayActorError as e:
                raise JobFailed(f"a teacher replica failed to start: {_first_line(e)}") from e
        return self.node_ids


def start_replicas(ray: Any, cfg: LabelConfig, source: TeacherSource, device: str, dtype: str) -> Replicas:
    """Start the teacher replicas and ask them to load, without waiting: the job calls this as soon as Ray is up,
    so the replicas' process start, imports and model load run while the driver checks the teacher's tokenizer
    and the output (seconds each). Kept replicas (SOFTLABELS_KEEP_TEACHERS) are reused."""
    from softlabels.labeler.actor import TeacherActor

    gpu = device.startswith("cuda")
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    per = cfg.gpus_per_replica
    if per > 1 and not gpu:
        raise UserError(f"--gpus-per-replica {per} needs --device cuda and GPUs in the Ray cluster")
    if gpu and per > max_gpus_per_node(nodes):
        raise UserError(f"--gpus-per-replica {per}: no node of the Ray cluster has {per} GPUs "
                         f"(most on one node: {max_gpus_per_node(nodes)}); a replica's GPUs must share a node")
    replicas = cfg.num_replicas or (cluster_gpus(ray) // per if gpu else len(nodes)) or 1
    if gpu and replicas * per > cluster_gpus(ray):
        raise UserError(f"--num-replicas {replicas} x --gpus-per-replica {per} needs {replicas * per} GPUs; "
                         f"the Ray cluster has {cluster_gpus(ray)}")
    cpus = int(ray.cluster_resources().get("CPU", 1))
    threads = None if gpu else (cfg.threads or max(1, cpus // replicas))
    options: dict[str, Any] = (
        {"num_gpus": per, "num_cpus": 1} if gpu else {"num_cpus": CPU_ACTOR_CPUS}
    )
    # Kept replicas serve any run of the same model, placement and threads; the label settings are the run's.
    settings = LabelSettings(cfg.top_k, cfg.temperature, cfg.batch_tokens, cfg.head_chunk, cfg.tail_samples)
    key = repr((source, dtype, device, cfg.trust_remote_code, threads, per, replicas, sorted(options.items()),
                ray.get_runtime_context().gcs_address))
    actors, node_ids, loading = _kept_replicas(ray, key, settings)
    if not actors:
        actor_cls = ray.remote(max_restarts=3, max_task_retries=3)(TeacherActor)
        actors = [actor_cls.options(scheduling_strategy="SPREAD", **options).remote(
            source, dtype, device, settings, cfg.trust_remote_code, threads, per) for _ in range(replicas)]
        node_ids = None
        if _keep_count():
            _KEPT[key] = actors
        loading = [a.load.remote() for a in actors]
    return Replicas(actors, loading, device, dtype, threads, node_ids)


# SOFTLABELS_KEEP_TEACHERS=N: teacher replicas stay loaded after a run, and the next run in this process of the same
# teacher, dtype, device and placement uses them (the tests, notebooks, a program that labels in rounds), with its own
# label settings: a run then starts in a fraction of a second instead of a replica's process start and model load.
# The replicas of the N most recently used teachers are kept (1 for any value that is not a number). Off by default:
# a kept teacher holds its memory (a GPU's, on a cluster) until the process ends or it is the N+1-th.
KEEP_TEACHERS_ENV = "SOFTLABELS_KEEP_TEACHERS"
_KEPT: dict[str, list[Any]] = {}  # key -> replicas, least recently used first


def _keep_count() -> int:
    value = os.environ.get(KEEP_TEACHERS_ENV, "").strip()
    if not value or value in ("0", "false", "no", "off"):
        return 0
    return int(value) if value.isdigit() else 1


def _kept_replicas(ray: Any, key: str, settings: LabelSettings) -> tuple[list[Any], list[str], list[Any]]:
    """The kept replicas for ``key``, their nodes, and their calls taking this run's label ``settings`` (waited
    for where a load would be: a refusal of the settings, as a fresh replica's, comes after the driver's own
    checks), if they are alive; the least recently used others past the kept number are released."""
    actors = _KEPT.pop(key, None)
    if actors is not None:
        try:
            node_ids = ray.get([a.node.remote() for a in actors], timeout=60)
        except Exception as e:  # a replica died since: start afresh
            log.info("kept teacher replicas are gone (%s): starting new ones", _first_line(e))
            _release(ray, actors)
        else:
            _KEPT[key] = actors  # the most recently used now
            return actors, node_ids, [a.new_run.remote(settings) for a in actors]
    while _KEPT and len(_KEPT) >= max(1, _keep_count()):  # room for the replicas about to start
        _release(ray, _KEPT.pop(next(iter(_KEPT))))
    return [], [], []


def release_kept(ray: Any) -> None:
    """Kill every kept replica now (not drained: their runs are over), e.g. before ``ray.shutdown()``."""
    while _KEPT:
        _release(ray, _KEPT.popitem()[1])
    from softlabels.labeler.generation import release_generators

    release_generators(ray)  # and the kept generators (labeler.generation)


def _release(ray: Any, actors: list[Any]) -> None:
    for a in actors:
        try:
            ray.kill(a)
        except Exception as e:  # already gone (its cluster too, perhaps): nothing to release
            log.debug("releasing a kept replica: %s", e)


def _first_batch(ray: Any, actors: list[Any]) -> tuple[float | None, float | None]:
    """``(teacher loaded, first batch done)`` of the replica that labeled first (None if none labeled, or a
    replica cannot say)."""
    try:
        times = [t for t in ray.get([a.first_batch_at.remote() for a in actors], timeout=30) if t[1] is not None]
    except Exception as e:  # a figure for the summary is not worth failing a finished run
        log.debug("no first-batch time: %s", e)
        return None, None
    return min(times, key=lambda t: t[1], default=(None, None))


def _unwrapped(e: Any) -> BaseException:
    """A worker's error as the driver should raise it: a user error or a storage fault as itself (one
    line: a file removed mid-run, a bucket gone), a bug as the RayTaskError with the worker's traceback."""
    cause = e.cause
    if isinstance(cause, UserError):
        return cause
    if isinstance(cause, OSError):
        return StorageError(f"{_first_line(cause)} (in a Ray worker)")
    return e


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
