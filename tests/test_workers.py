"""Heavy work in worker processes: the same numbers as on the server's thread, progress and Cancel
across the pipe, a dead worker costing its computation only, and zoos a worker cannot reopen
computed where they are."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

from appkit import workers
from soup_core.errors import SoupError
from soup_core.io.resident import files_identity
from soup_core.landscape import plane_landscape
from soup_core.zoo import make_soup, open_zoo, zoo_plane
from soup_core.zoo.manifest import read_manifest

PLANE = ("base", "ft-01", "ft-02")


def server_zoo(where: str = "digits-finetune"):
    """A zoo opened as the server opens it (appkit.cache.load_zoo): with its files' stamps."""
    manifest = read_manifest(where)
    zoo = open_zoo(where)
    zoo.identity = files_identity([e.path for e in manifest.entries] + [manifest.base_path])
    return zoo


@pytest.fixture(autouse=True)
def fresh_workers(monkeypatch):
    monkeypatch.setenv("SOUP_WORKERS", "1")
    # The same torch thread count there as here: float32 sums split over threads add up in their own order.
    monkeypatch.setenv("SOUP_WORKER_THREADS", str(torch.get_num_threads()))
    workers.stop_all()
    yield
    workers.stop_all()


def worker_pids() -> list[int]:
    return [w.process.pid for w in workers._IDLE]


def test_a_recipe_made_in_a_worker_process_equals_the_one_made_here_bit_for_bit():
    zoo = server_zoo()
    there = workers.heavy(zoo, "recipe", "greedy", None, ())
    here = make_soup(zoo, "greedy")
    assert there.ingredients == here.ingredients and there.metrics["test"].accuracy == here.metrics["test"].accuracy
    assert all(torch.equal(there.state_dict[k], here.state_dict[k]) for k in here.state_dict)
    (pid,) = worker_pids()
    assert pid != os.getpid()
    assert os.getpriority(os.PRIO_PROCESS, pid) >= os.getpriority(os.PRIO_PROCESS, os.getpid()) + 1  # ticks first


def test_a_landscape_reports_progress_stops_when_asked_and_resumes_to_the_same_grid():
    zoo = server_zoo()
    reference = plane_landscape(zoo.evaluator, zoo_plane(zoo, PLANE), grid=13, splits=["val"])
    seen, asked = [], []
    stopped = workers.heavy(zoo, "landscape", PLANE, 13, 0.2, ["val"], "recompute", None, (), None,
                            progress=lambda f, m: seen.append(f), should_stop=lambda: asked.append(1) or len(seen) >= 1)
    assert seen and not stopped.complete and 0 < stopped.done.sum() < 13 * 13
    finished = workers.heavy(zoo, "landscape", PLANE, 13, 0.2, ["val"], "recompute", None, (), stopped)
    # Each process measures its fastest slice strategy on the spot (soup_core.landscape.choice), and
    # another strategy or other chunk boundaries sum float32 in another order: equal to rounding.
    for there in (finished, workers.heavy(zoo, "landscape", PLANE, 13, 0.2, ["val"], "recompute", None, (), None)):
        assert there.complete
        np.testing.assert_allclose(there.loss["val"], reference.loss["val"], rtol=1e-6)
        np.testing.assert_array_equal(there.error["val"], reference.error["val"])


def test_a_worker_killed_mid_computation_costs_that_computation_only():
    zoo = server_zoo()
    workers.heavy(zoo, "recipe", "uniform", None, ())  # a worker, started and holding the zoo
    (victim,) = workers._IDLE

    def kill_on_first_chunk(fraction, message):
        if victim.alive():
            victim.process.kill()
    with pytest.raises(workers.WorkerDied, match=r"^the worker process computing this \(landscape\) ended .*try again"):
        workers.heavy(zoo, "landscape", PLANE, 41, 0.2, ["val"], "recompute", None, (), None,
                      progress=kill_on_first_chunk)
    assert not victim.alive() and victim not in workers._IDLE
    assert workers.heavy(zoo, "recipe", "uniform", None, ()).recipe == "uniform"  # a new worker
    assert worker_pids() and victim.process.pid not in worker_pids()


def test_a_caller_that_leaves_early_ends_its_worker_so_a_late_answer_is_never_taken_for_the_next_call():
    zoo = server_zoo()

    class Left(Exception):
        pass

    def leave(fraction, message):
        raise Left
    with pytest.raises(Left):
        workers.heavy(zoo, "landscape", PLANE, 41, 0.2, ["val"], "recompute", None, (), None, progress=leave)
    assert worker_pids() == []  # ended, not returned to the idle ones
    assert workers.heavy(zoo, "recipe", "greedy", None, ()).ingredients == make_soup(zoo, "greedy").ingredients


def test_the_tasks_errors_arrive_as_themselves():
    zoo = server_zoo()
    with pytest.raises(SoupError) as raised:
        workers.heavy(zoo, "recipe", "greedy", ("ft-01", "no-such-checkpoint"), ())
    here = pytest.raises(SoupError, make_soup, zoo, "greedy", ("ft-01", "no-such-checkpoint"))
    assert type(raised.value) is type(here.value) and str(raised.value) == str(here.value)


def test_zoos_a_worker_cannot_reopen_the_same_way_are_computed_on_this_thread(tmp_path, monkeypatch):
    zoo = server_zoo()
    assert workers.address(zoo.extended({"extra": zoo.path("ft-03")})) is None  # uploads live in this process
    assert workers.address(open_zoo("digits-finetune")) is None  # no file stamps: not opened as a server does
    copy = tmp_path / "zoo"
    shutil.copytree(zoo.root, copy)
    moved = server_zoo(str(copy))
    with open(moved.path("ft-00"), "r+b") as handle:  # changed after the caller opened it
        handle.seek(-4, os.SEEK_END)
        handle.write(b"\0\0\0\0")
    made_here = []
    monkeypatch.setitem(workers.TASKS, "recipe", lambda *a: made_here.append(a[1:]) or make_soup(*a[:3]))
    result = workers.heavy(moved, "recipe", "uniform", ("ft-01", "ft-02"), ())
    assert worker_pids() and made_here == [("uniform", ("ft-01", "ft-02"), ())]  # the worker said "other files"
    assert result.ingredients == ("ft-01", "ft-02")


def test_with_workers_off_nothing_is_started(monkeypatch):
    monkeypatch.setenv("SOUP_WORKERS", "0")
    assert workers.heavy(server_zoo(), "recipe", "uniform", None, ()).recipe == "uniform"
    assert worker_pids() == []


def test_a_zoo_given_by_a_relative_path_is_reopened_where_the_server_runs(tmp_path, monkeypatch):
    shutil.copytree(server_zoo().root, tmp_path / "mine")
    monkeypatch.chdir(tmp_path)  # the server started here; the participant typed "mine"
    zoo = server_zoo("mine")
    made_here = []
    monkeypatch.setitem(workers.TASKS, "recipe", lambda *a: made_here.append(a[1:]) or make_soup(*a[:3]))
    result = workers.heavy(zoo, "recipe", "uniform", ("ft-01", "ft-02"), ())
    assert made_here == [] and worker_pids()  # made in the worker, from the same relative path
    here = make_soup(zoo, "uniform", ("ft-01", "ft-02"))
    assert all(torch.equal(result.state_dict[k], here.state_dict[k]) for k in here.state_dict)

