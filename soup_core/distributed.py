"""Past one machine: landscape grids, zoo scoring and pair analyses on a Ray cluster.

Grid points, checkpoint scores and pairs are independent, so they spread over workers — one
Ray actor per GPU (or per ``cpus_per_worker`` cores) that opens the zoo **from its manifest
path** (workers read the same files; no weights travel), keeps its evaluator, data and slice
engine loaded, and computes whole chunks. The driver fills the same :class:`Landscape`,
metrics and :class:`PairReport` as the single-process code, so the JSON is the same.

* **Identical numbers.** A landscape chunk's values depend only on its points and the engine's
  settings (:meth:`SliceEvaluator.chunk_for`). The driver fixes the strategy and the chunk
  boundaries once and every worker uses them, so a grid equals a single-process run with the
  same strategy bit for bit (tested on the CPU).
* **Faults.** Actors restart when their process dies and their unfinished call is retried
  (Ray's ``max_restarts`` / ``max_task_retries``), so a killed worker costs at most its chunk.
  A landscape written with ``resume`` is saved after every chunk, so a driver that dies loses
  nothing: the next run computes only the ``null`` cells.
* **Nothing starts Ray unless asked.** ``address="auto"`` starts a private instance on
  127.0.0.1 (no dashboard, no usage statistics, a bounded object store) and stops it after;
  another address joins an existing cluster (``ray start --head`` on one node, ``ray start
  --address=HEAD:6379`` on the others, or KubeRay/Slurm).
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from soup_core.errors import UsageError
from soup_core.state import Progress

OBJECT_STORE_BYTES = 256 << 20
RESTARTS = 3
# Workers stay up between calls (their zoo, evaluator and engines loaded) until the cluster
# context ends: keyed by what they loaded.
_WORKERS: dict[tuple, list] = {}


@contextlib.contextmanager
def cluster(address: str = "auto", *, workers: int | None = None) -> Iterator[Any]:
    """Connect to Ray (``auto``: a private local instance on 127.0.0.1) for the ``with`` block."""
    ray = connect(address, workers=workers)
    try:
        yield ray
    finally:
        _WORKERS.clear()
        ray.shutdown()


def connect(address: str = "auto", *, workers: int | None = None):
    """Connect this process to Ray and return the ``ray`` module (the app stays connected)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
    except ImportError:
        raise UsageError("--ray needs Ray: pip install -e \".[ray]\"") from None
    if address == "auto":
        ray.init(address="local", num_cpus=workers or os.cpu_count(), include_dashboard=False,
                 object_store_memory=OBJECT_STORE_BYTES, _node_ip_address="127.0.0.1", log_to_driver=False,
                 configure_logging=False)
    else:
        host, _, port = address.removeprefix("ray://").rpartition(":")
        try:
            grpc = speaks_grpc(host or "127.0.0.1", int(port))
        except (OSError, ValueError):
            raise UsageError(f"cannot reach a Ray cluster at {address!r}: start one with `ray start --head` "
                             "(and give its HOST:PORT), or use --ray auto") from None
        if not grpc:  # Ray would retry for minutes against, say, a web server
            raise UsageError(f"{address!r} answers, but not as a Ray cluster does (no gRPC there): give the head "
                             "node's address (`ray start --head` prints it; port 6379 by default), or use --ray auto")
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    return ray


HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # + empty SETTINGS


def speaks_grpc(host: str, port: int, timeout: float = 3.0) -> bool:
    """Whether ``host:port`` answers an HTTP/2 connection preface with a SETTINGS frame, as every
    gRPC server does (Ray's GCS and Ray Client are gRPC); an ``OSError`` when nothing listens."""
    with socket.create_connection((host, port), timeout=timeout) as connection:
        connection.settimeout(timeout)
        connection.sendall(HTTP2_PREFACE)
        head = b""
        with contextlib.suppress(OSError):  # a timeout or a reset: not gRPC
            while len(head) < 9:
                chunk = connection.recv(9 - len(head))
                if not chunk:
                    break
                head += chunk
    return len(head) == 9 and head[3] == 0x04  # a frame header whose type is SETTINGS


class ZooWorker:
    """What each worker holds: the zoo opened from its manifest, its evaluator and slice engines."""

    def __init__(self, manifest: str, device: str | None, align: str | None, threads: int | None,
                 precision: str = "fp32") -> None:
        from soup_core.zoo import open_zoo
        if threads:
            torch.set_num_threads(threads)
        zoo = open_zoo(manifest, device=device)
        self.zoo = zoo.aligned(align) if align else zoo
        self.zoo.evaluator.precision = precision
        self.engines: dict[tuple, Any] = {}

    def pid(self) -> int:
        return os.getpid()

    def landscape_chunk(self, points: tuple[str, str, str], settings: dict[str, Any], splits: Sequence[str],
                        indices: list[int], coords: np.ndarray) -> tuple[list[int], Any, float | None]:
        """One chunk's values (and this worker's measured precision deviation so far)."""
        from soup_core.landscape import SliceEvaluator
        from soup_core.zoo import zoo_plane
        key = (points, *sorted(settings.items()))
        if key not in self.engines:
            plane = zoo_plane(self.zoo, points)
            self.engines[key] = SliceEvaluator(self.zoo.evaluator, plane.origin, plane.directions, **settings)
        engine = self.engines[key]
        return indices, engine.evaluate(torch.from_numpy(coords), splits), engine.precision_deviation

    def scores(self, names: Sequence[str]) -> list[tuple[str, dict]]:
        from soup_core.evaluate import metrics_to_json
        return [(n, metrics_to_json(self.zoo.evaluator.evaluate(self.zoo.state_dict(n)))) for n in names]

    def pairs(self, pairs: Sequence[tuple[str, str, float | None]], split: str, curvature: str) -> list[Any]:
        from soup_core.pairs import analyse_pair
        return [analyse_pair(self.zoo.evaluator, (a, b), self.zoo.state_dict(a), self.zoo.state_dict(b), split,
                             angle, curvature=curvature) for a, b, angle in pairs]


def _pool(ray, zoo, workers: int, cpus_per_worker: float):
    """``workers`` actors holding ``zoo``, started once per cluster and reused.

    Each uses as many torch threads as the driver: oneDNN's results can depend on the thread
    count, and the same count is what makes a grid equal one process's bit for bit.
    """
    from ray.util import ActorPool
    threads = torch.get_num_threads()
    gpus = 1 if zoo.evaluator.device.type == "cuda" else 0
    key = (str(zoo.manifest), str(zoo.evaluator.device), zoo.aligned_to, threads, cpus_per_worker,
           zoo.evaluator.precision)
    for other in [k for k in _WORKERS if k != key]:  # one zoo's workers at a time: free their cores and GPUs
        for handle in _WORKERS.pop(other):
            ray.kill(handle)
    handles = _WORKERS.setdefault(key, [])
    actor = ray.remote(ZooWorker).options(num_cpus=cpus_per_worker, num_gpus=gpus, max_restarts=RESTARTS,
                                          max_task_retries=RESTARTS)
    while len(handles) < workers:
        handles.append(actor.remote(str(zoo.manifest), str(zoo.evaluator.device), zoo.aligned_to, threads,
                                    zoo.evaluator.precision))
    return ActorPool(handles[:workers]), handles[:workers]


def _run(pool, submit: Callable, jobs: list, on_done: Callable[[Any], None], progress: Progress | None,
         what: str) -> None:
    for done, result in enumerate(pool.map_unordered(submit, jobs), 1):
        on_done(result)
        if progress is not None:
            progress(done / len(jobs), f"{done}/{len(jobs)} {what}")


def landscape(ray, zoo, points: Sequence[str], *, grid: int = 21, margin: float = 0.2,
              splits: Sequence[str] = ("val",), bn: str = "recompute", max_samples: int | None = None,
              projections=(), resume=None, workers: int = 2, cpus_per_worker: float = 1,
              progress: Progress | None = None, checkpoint: Callable[[Any], None] | None = None,
              max_chunks: int | None = None, strategy: str = "auto", precision: str | None = None):
    """:func:`soup_core.landscape.plane_landscape` over ``workers`` actors.

    ``checkpoint(result)`` is called after every finished chunk (the CLI saves ``--resume``
    there); ``max_chunks`` stops after that many (for tests of resuming). The workers' engines
    take the driver's strategy, precision and memory budget, so that chunks and their sums are
    the same as in one process.
    """
    from soup_core.landscape import SliceEvaluator
    from soup_core.landscape.grid import fill, grid_plan
    from soup_core.zoo import zoo_plane
    plane = zoo_plane(zoo, points)
    engine = SliceEvaluator(zoo.evaluator, plane.origin, plane.directions, bn=bn, max_samples=max_samples,
                            strategy=strategy, precision=precision)
    settings = {"bn": engine.bn if engine.bn != "none" else bn, "max_samples": max_samples,
                "strategy": engine.strategy, "precision": engine.precision, "memory_budget": engine.budget}
    result, todo, coords = grid_plan(plane, engine, grid=grid, margin=margin, splits=splits,
                                     projections=projections, resume=resume)
    chunk = engine.chunk_for(splits)
    jobs = [(todo[i:i + chunk], coords[i:i + chunk].numpy()) for i in range(0, len(todo), chunk)][:max_chunks]
    pool, _ = _pool(ray, zoo, workers, cpus_per_worker)

    def done(item) -> None:
        indices, values, deviation = item
        fill(result, indices, values)
        if deviation is not None:
            result.precision_deviation = max(result.precision_deviation or 0.0, deviation)
        if checkpoint is not None:
            checkpoint(result)

    _run(pool, lambda actor, job: actor.landscape_chunk.remote(tuple(points), settings, list(splits), *job),
         jobs, done, progress, "chunks")
    return result


def scores(ray, zoo, names: Sequence[str], *, workers: int = 2, cpus_per_worker: float = 1,
           progress: Progress | None = None) -> dict[str, dict]:
    """Every named checkpoint's metrics (JSON form), scored by ``workers`` actors."""
    pool, _ = _pool(ray, zoo, workers, cpus_per_worker)
    out: dict[str, dict] = {}
    _run(pool, lambda actor, job: actor.scores.remote(job), [[n] for n in names],
         lambda rows: out.update(dict(rows)), progress, "checkpoints")
    return {n: out[n] for n in names}


def pair_report(ray, zoo, names: Sequence[str], *, split: str = "test", curvature: str = "segment", workers: int = 2,
                cpus_per_worker: float = 1, progress: Progress | None = None):
    """:func:`soup_core.pairs.pair_analyses` over ``workers`` actors (angles on the driver)."""
    import itertools

    from soup_core.geometry import pairwise_angles
    from soup_core.pairs import PairReport, curvature_method
    curvature = curvature_method(zoo.evaluator.model) if curvature == "auto" else curvature
    angles = pairwise_angles([zoo.state_dict(n) for n in names], zoo.base).angle_deg if zoo.has_base else None
    index = {n: i for i, n in enumerate(names)}
    jobs = [[(a, b, float(angles[index[a], index[b]]) if angles is not None else None)]
            for a, b in itertools.combinations(names, 2)]
    pool, _ = _pool(ray, zoo, workers, cpus_per_worker)
    found: dict[tuple[str, str], Any] = {}
    _run(pool, lambda actor, job: actor.pairs.remote(job, split, curvature), jobs,
         lambda rows: found.update({(p.a, p.b): p for p in rows}), progress, "pairs")
    return PairReport(split, [found[(job[0][0], job[0][1])] for job in jobs])
