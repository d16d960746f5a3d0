"""Heavy work in worker processes, so that a tick never waits for another session's computation.

A landscape, a greedy or pruned replay, an ablation, a pair analysis: seconds to minutes of torch
work. Run on the server's threads, it takes the cores and the interpreter's lock from every
session's tick. Here each slot of the server's heavy work (:data:`appkit.admission.HEAVY_WORK`,
so the line and its places stay as they were) has one worker process:

* **A fresh interpreter, not a fork** (forking a threaded server copies its locks mid-use):
  ``python -c``, started on first use and kept, talking over a socket pair. Its CPU priority is
  lowered (``nice``, default 10, ``SOUP_WORKER_NICE``) and the workers together take half the
  cores' torch threads, the server the rest (:func:`share_the_cores`): the ticks go first.
* **The same zoo, from the same files**: the worker opens the zoo from its manifest, memory-mapped
  (no weights copied), and runs the library's own function on it: a recipe comes back bit for bit
  as it would be made here at the same torch thread count; a landscape to float32 rounding (each
  process measures its fastest slice strategy on the spot, :mod:`soup_core.landscape.choice`).
  It first checks that the files are the ones the caller's zoo was opened from
  (:func:`soup_core.io.resident.files_identity`); a zoo it cannot reopen that way — uploads, an
  aligned zoo, changed files — runs on the caller's thread, as everything did before.
* **Progress and Cancel** cross the socket: the worker reports each chunk, the caller's
  ``should_stop`` is forwarded, and a stopped landscape comes back with what it computed.
* **A worker that dies** (killed, out of memory, a checkpoint truncated under its mapping) costs
  that computation only: the caller gets one line saying so and the next call starts a new one.

``SOUP_WORKERS=0`` runs everything on the caller's thread.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pickle
import socket
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from appkit.admission import HEAVY_WORK
from soup_core.errors import SoupError

STOP, POLL_SECONDS, ZOOS_PER_WORKER = "stop", 0.2, 2
ROOT = Path(__file__).resolve().parent.parent  # where ``appkit`` and ``soup_core`` import from


class WorkerDied(SoupError):
    """The worker process ended before it answered (killed, or out of memory)."""


def enabled() -> bool:
    return os.environ.get("SOUP_WORKERS", "1") != "0"


def address(zoo) -> tuple | None:
    """What a worker needs to reopen ``zoo`` from its files, or None when it cannot (uploads added
    in memory, an aligned zoo, a zoo opened without the server's file stamps)."""
    if zoo.identity is None or zoo.aligned_to is not None or zoo.manifest is None:
        return None
    if zoo.names != tuple(e.name for e in zoo.spec.entries):  # checkpoints added in memory (uploads)
        return None
    files = _files(zoo)
    roots = None if zoo.allowed_roots is None else tuple(str(r) for r in zoo.allowed_roots)
    return str(zoo.manifest), roots, zoo.device, files, zoo.identity


def _files(zoo) -> tuple[str, ...]:
    """The zoo's checkpoint files and then its base: what its identity stamps (``appkit.cache.load_zoo``)."""
    return tuple(str(zoo.entries[n].path) for n in zoo.names) + ((str(zoo.base_path),) if zoo.base_path else ())


# ---- the tasks (run in the worker, on the reopened zoo; module-level so they pickle by name) ----

def _landscape(zoo, points, grid, margin, splits, bn, precision, projections, resume, *, progress=None,
               should_stop=None):
    from soup_core.landscape import plane_landscape
    from soup_core.zoo import zoo_plane
    return plane_landscape(zoo.evaluator, zoo_plane(zoo, points), grid=grid, margin=margin, splits=splits, bn=bn,
                           projections=projections, resume=resume, precision=precision, progress=progress,
                           should_stop=should_stop)


def _recipe(zoo, recipe, ingredients, params):
    from soup_core.zoo import make_soup
    return make_soup(zoo, recipe, ingredients, **dict(params))


def _ablations(zoo):
    from soup_core.ablations import greedy_vs_models_considered, pruned_vs_passes
    ingredients = zoo.ingredients()
    return greedy_vs_models_considered(ingredients, zoo.evaluator), pruned_vs_passes(ingredients, zoo.evaluator)


def _angles(zoo):
    from soup_core.geometry import pairwise_angles
    return pairwise_angles([zoo.state_dict(n) for n in zoo.names], zoo.base).to_json(zoo.names)


def _pairs(zoo, names, split):
    from soup_core.pairs import pair_analyses
    return pair_analyses(zoo.ingredients(list(names)), zoo.evaluator, base=zoo.base, split=split).to_json()


def _path(zoo, a, b, bn, alphas, splits):
    from soup_core.landscape import interpolation_path
    from soup_core.zoo import zoo_point
    return interpolation_path(zoo.evaluator, zoo_point(zoo, a)[0], zoo_point(zoo, b)[0], alphas, names=(a, b),
                              splits=splits, bn=bn).to_json()


def _barrier_interval(zoo, a, b, split):
    from soup_core.landscape import barrier_interval
    from soup_core.zoo import zoo_point
    return barrier_interval(zoo.evaluator, zoo_point(zoo, a)[0], zoo_point(zoo, b)[0], split)


def _flattest_pair(zoo):
    from soup_core.pairs import flattest_pair
    return flattest_pair(zoo.ingredients(), zoo.evaluator)


TASKS: dict[str, Callable] = {"landscape": _landscape, "recipe": _recipe, "ablations": _ablations,
                              "angles": _angles, "pairs": _pairs, "path": _path,
                              "barrier_interval": _barrier_interval, "flattest_pair": _flattest_pair}


# ---- the worker process ---------------------------------------------------------------------

def _reopen(zoos: dict, where: tuple):
    """The zoo at ``where``, opened once per worker (the last few kept), or None when its files
    are no longer the ones the caller opened."""
    from soup_core.io.resident import files_identity
    from soup_core.zoo import Zoo
    from soup_core.zoo.manifest import read_manifest
    if where not in zoos:
        manifest, roots, device, files, identity = where  # opened as the caller's was: the same roots
        zoo = Zoo(read_manifest(manifest, None if roots is None else [Path(r) for r in roots]), device=device)
        if _files(zoo) != files or files_identity(list(files)) != identity:
            return None
        zoo.identity = identity
        zoos[where] = zoo
        while len(zoos) > ZOOS_PER_WORKER:
            zoos.pop(next(iter(zoos)))
    return zoos[where]


def send(connection: Connection, message: Any) -> None:
    """Pickled here and unpickled by the other end only: the two ends are this server and its own
    worker (plain pickle: tensors travel by value, not through shared-memory handles)."""
    connection.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def receive(connection: Connection) -> Any:
    return pickle.loads(connection.recv_bytes())


def serve(fd: int, nice: int, threads: int) -> None:
    """The worker's loop (``python -c``, the socket's end inherited as ``fd``): one call at a time."""
    import torch
    with contextlib.suppress(OSError):
        os.nice(nice)
    torch.set_num_threads(threads)
    connection = Connection(fd)
    zoos: dict[tuple, Any] = {}
    stop_asked = threading.Event()
    while True:
        try:
            message = receive(connection)
        except (EOFError, OSError):
            return
        if message == STOP:
            continue  # a stop that arrived after its call had finished
        task, where, args, follows = message
        stop_asked.clear()

        def progress(fraction: float, text: str) -> None:
            send(connection, ("progress", (fraction, text)))

        def should_stop() -> bool:
            while not stop_asked.is_set() and connection.poll():
                if receive(connection) == STOP:
                    stop_asked.set()
            return stop_asked.is_set()

        try:
            zoo = _reopen(zoos, where)
        except Exception:  # noqa: BLE001 — not openable here as the caller opened it: the caller computes it
            zoo = None
        try:
            if zoo is None:
                send(connection, ("elsewhere", None))
                continue
            kwargs = {"progress": progress, "should_stop": should_stop} if follows else {}
            send(connection, ("done", TASKS[task](zoo, *args, **kwargs)))
        except Exception as exc:  # noqa: BLE001 — the caller raises it; the worker lives on
            try:
                send(connection, ("error", exc))
            except Exception:  # noqa: BLE001 — an exception that does not pickle: its text does
                send(connection, ("error", SoupError("".join(traceback.format_exception_only(exc)).strip())))


def worker_threads() -> int:
    """Torch threads per worker: the workers together use half the cores, so that the sessions'
    ticks keep the other half (``SOUP_WORKER_THREADS`` to choose)."""
    if os.environ.get("SOUP_WORKER_THREADS", "").isdigit() and int(os.environ["SOUP_WORKER_THREADS"]) > 0:
        return int(os.environ["SOUP_WORKER_THREADS"])
    return max(1, (os.cpu_count() or 2) // (2 * HEAVY_WORK.slots))


def share_the_cores() -> None:
    """Once per server, with workers on: the server's own torch threads are the cores the workers
    leave (at least one). Two processes each running as many OpenMP threads as there are cores
    stall each other at every parallel region; the sessions' ticks would pay for the heavy work."""
    import torch
    if enabled():
        torch.set_num_threads(max(1, (os.cpu_count() or 2) - HEAVY_WORK.slots * worker_threads()))


class _Answered(Exception):
    """The task's own error, answered by the worker (which is then free for the next call)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


class Worker:
    """One worker process and the pipe to it."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair()
        threads = worker_threads()
        nice = int(os.environ.get("SOUP_WORKER_NICE", "10"))
        # A fresh interpreter (not multiprocessing's spawn, which would run the server's __main__ again);
        # its OpenMP threads sleep when idle rather than spin on cores the sessions' ticks need.
        # The server's own folder, so that a zoo's relative paths mean what they mean to the server;
        # appkit and soup_core import from ROOT.
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": path}
        self.process = subprocess.Popen(
            [sys.executable, "-c", f"from appkit.workers import serve; serve({theirs.fileno()}, {nice}, {threads})"],
            pass_fds=(theirs.fileno(),), cwd=os.getcwd(), stdin=subprocess.DEVNULL, env=env)
        theirs.close()
        self.connection = Connection(ours.detach())
        self.closed = False

    def alive(self) -> bool:
        return not self.closed and self.process.poll() is None

    def call(self, task: str, where: tuple, args: tuple, progress: Callable[[float, str], None] | None,
             should_stop: Callable[[], bool] | None) -> tuple[str, Any]:
        """``("done", result)``, or ``("elsewhere", None)`` when the worker cannot reopen the zoo.
        Left early (``progress`` raised), the worker is ended: its late answer must never be
        taken for the next call's."""
        try:
            return self._call(task, where, args, progress, should_stop)
        except WorkerDied:
            raise
        except _Answered as answered:
            raise answered.error from None
        except BaseException:
            self.close()
            raise

    def _call(self, task, where, args, progress, should_stop) -> tuple[str, Any]:
        follows = progress is not None or should_stop is not None
        stop_sent, sent = False, False
        while True:
            try:
                if not sent:
                    send(self.connection, (task, where, args, follows))
                    sent = True
                if should_stop is not None and not stop_sent and should_stop():
                    send(self.connection, STOP)
                    stop_sent = True
                if not self.connection.poll(POLL_SECONDS):
                    if not self.alive():
                        raise EOFError
                    continue
                kind, payload = receive(self.connection)
            except (EOFError, OSError):
                self.close()
                raise WorkerDied(f"the worker process computing this ({task}) ended (exit code "
                                 f"{self.process.poll()}: killed, or out of memory); nothing else was lost: "
                                 "try again, or with a smaller grid or fewer checkpoints") from None
            if kind == "progress":
                if progress is not None:
                    progress(*payload)
            elif kind == "error":
                raise _Answered(payload)
            else:
                return kind, payload

    def close(self) -> None:
        self.closed = True  # never handed out again, even if the process outlives the wait below
        with contextlib.suppress(OSError):
            self.connection.close()
        if self.alive():
            self.process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(5)


_IDLE: list[Worker] = []
_IDLE_LOCK = threading.Lock()
_MINE = threading.local()  # the worker this thread holds (nested heavy work reuses it)


@contextlib.contextmanager
def _this_threads_worker() -> Iterator[Worker]:
    held = getattr(_MINE, "worker", None)
    if held is not None and held.alive():
        yield held
        return
    with _IDLE_LOCK:
        worker = _IDLE.pop() if _IDLE else None
    if worker is None or not worker.alive():
        worker = Worker()
    _MINE.worker = worker
    try:
        yield worker
    finally:
        _MINE.worker = held
        if worker.alive():
            with _IDLE_LOCK:
                _IDLE.append(worker)


def heavy(zoo, task: str, *args: Any, progress: Callable[[float, str], None] | None = None,
          should_stop: Callable[[], bool] | None = None, on_wait: Callable[[int], None] | None = None) -> Any:
    """``TASKS[task](zoo, *args)`` in a slot of the server's heavy work: in that slot's worker
    process, or on this thread when workers are off or cannot reopen ``zoo``. ``progress`` and
    ``should_stop`` reach the task (a landscape's chunks); ``on_wait`` sees the place in line."""
    kwargs = {"progress": progress, "should_stop": should_stop} if progress or should_stop else {}
    with HEAVY_WORK.admitted(on_wait=on_wait):
        where = address(zoo) if enabled() else None
        if where is not None:
            with _this_threads_worker() as worker:
                kind, result = worker.call(task, where, args, progress, should_stop)
            if kind == "done":
                return result
        return TASKS[task](zoo, *args, **kwargs)


@atexit.register
def stop_all() -> None:
    """End every idle worker (a worker also ends by itself when its server's end of the socket closes)."""
    with _IDLE_LOCK:
        while _IDLE:
            _IDLE.pop().close()
