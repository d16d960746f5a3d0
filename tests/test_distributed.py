"""Ray on loopback: a 2-worker cluster gives exactly what one process gives, survives a killed
worker, resumes a stopped run, and a wrong address is one line."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest

from soup_core.landscape import SliceEvaluator, plane_landscape
from soup_core.zoo import open_zoo, zoo_plane
from tests.test_cli import soup

ray = pytest.importorskip("ray")
from soup_core import distributed  # noqa: E402

POINTS = ("base", "ft-00", "ft-01")


@pytest.fixture(scope="module")
def cluster():
    with distributed.cluster("auto", workers=2) as connected:
        yield connected


@pytest.fixture(scope="module")
def zoo():
    return open_zoo("digits-finetune", device="cpu")


def single_process(zoo, grid: int):
    plane = zoo_plane(zoo, POINTS)
    engine = SliceEvaluator(zoo.evaluator, plane.origin, plane.directions, strategy="fold")
    return plane_landscape(zoo.evaluator, plane, grid=grid, splits=["val", "test"], engine=engine)


def test_two_workers_give_the_same_grid_scores_and_pairs_as_one_process(cluster, zoo):
    grid = distributed.landscape(cluster, zoo, POINTS, grid=11, splits=["val", "test"], strategy="fold")
    assert grid.to_json() == single_process(zoo, 11).to_json()  # bit for bit, NaN-free
    names = list(zoo.names[:4])
    scored = distributed.scores(cluster, zoo, names)
    from soup_core.evaluate import metrics_to_json
    assert scored == {n: metrics_to_json(zoo.evaluator.evaluate(zoo.state_dict(n))) for n in names}
    from soup_core.pairs import pair_analyses
    report = distributed.pair_report(cluster, zoo, names[:3])
    assert report.to_json() == pair_analyses(zoo.ingredients(names[:3]), zoo.evaluator, base=zoo.base).to_json()


def _parent(pid: int) -> int:
    stat = (Path("/proc") / str(pid) / "stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])  # the field after the state; the name may hold spaces


def _descends_from_this_process(pid: int) -> bool:
    """Whether ``pid`` was started (through any chain) by this test process: this suite's local
    cluster's workers, never another suite's or a user's Ray on the same machine."""
    try:
        while pid > 1:
            pid = _parent(pid)
            if pid == os.getpid():
                return True
    except (OSError, ValueError, IndexError):
        return False
    return False


def _worker_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if b"ZooWorker" in (entry / "cmdline").read_bytes() and _descends_from_this_process(int(entry.name)):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def test_a_worker_killed_mid_grid_loses_only_its_chunk(cluster, zoo):
    killed = []

    def kill_one(fraction: float, message: str) -> None:
        if not killed and _worker_pids():
            killed.append(_worker_pids()[0])
            os.kill(killed[0], signal.SIGKILL)

    grid = distributed.landscape(cluster, zoo, POINTS, grid=15, splits=["val", "test"], strategy="fold",
                                 progress=kill_one)
    assert killed and grid.complete
    assert grid.to_json() == single_process(zoo, 15).to_json()


def test_a_stopped_run_resumes_from_its_null_cells(cluster, zoo, tmp_path):
    from soup_core.landscape import Landscape
    saved = tmp_path / "partial.json"

    def save(partial) -> None:
        saved.write_text(json.dumps(partial.to_json()))

    partial = distributed.landscape(cluster, zoo, POINTS, grid=15, splits=["val", "test"], strategy="fold",
                                    checkpoint=save, max_chunks=2)
    assert not partial.complete and np.isnan(partial.loss["val"]).any()
    resumed = distributed.landscape(cluster, zoo, POINTS, grid=15, splits=["val", "test"], strategy="fold",
                                    resume=Landscape.from_json(json.loads(saved.read_text())))
    assert resumed.complete and resumed.to_json() == single_process(zoo, 15).to_json()


def test_the_command_line_runs_on_a_local_cluster_and_refuses_a_wrong_address(tmp_path):
    result = soup("evaluate", "digits-scratch", "--ray", "auto", "--workers", "2", "--json", "-")
    assert result.returncode == 0, result.stderr
    single = soup("evaluate", "digits-scratch", "--json", "-")
    assert json.loads(result.stdout) == json.loads(single.stdout)
    wrong = soup("landscape", "digits-finetune", "--points", *POINTS, "--ray", "127.0.0.1:1")
    assert wrong.returncode == 2 and len(wrong.stderr.strip().splitlines()) == 1
    assert "cannot reach a Ray cluster at '127.0.0.1:1'" in wrong.stderr


def test_an_address_that_answers_but_is_not_ray_is_one_line_at_once_and_a_real_head_passes(cluster):
    """A web server on the port once made Ray retry for minutes; a real head's address passes the check."""
    import http.server
    import threading
    import time
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        start = time.monotonic()
        wrong = soup("evaluate", "digits-scratch", "--ray", f"127.0.0.1:{server.server_address[1]}")
        assert time.monotonic() - start < 60 and wrong.returncode == 2
        assert len(wrong.stderr.strip().splitlines()) == 1 and "not as a Ray cluster does" in wrong.stderr
    finally:
        server.shutdown()
    host, port = cluster.get_runtime_context().gcs_address.rsplit(":", 1)  # this suite's own head
    assert distributed.speaks_grpc(host, int(port))  # what a real Ray answers passes the check
