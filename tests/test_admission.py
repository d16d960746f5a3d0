"""Admission control: expensive work in bounded slots, first come first served, places given up on interrupt."""

from __future__ import annotations

import threading
import time

import pytest

from appkit.admission import Admission


def _wait_until(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_at_most_slots_run_at_once_and_the_rest_wait_in_arrival_order():
    pool = Admission(slots=1)
    release = threading.Event()
    order, seen_ahead = [], {}

    def job(name):
        with pool.admitted(on_wait=lambda ahead: seen_ahead.setdefault(name, ahead)):
            order.append(name)
            release.wait(5)

    first = threading.Thread(target=job, args=("first",))
    first.start()
    _wait_until(lambda: pool.running == 1)
    second = threading.Thread(target=job, args=("second",))
    second.start()
    _wait_until(lambda: pool.waiting() == 1)
    third = threading.Thread(target=job, args=("third",))
    third.start()
    _wait_until(lambda: pool.waiting() == 2)
    assert order == ["first"] and pool.running == 1
    release.set()
    for thread in (first, second, third):
        thread.join(5)
    assert order == ["first", "second", "third"]
    assert seen_ahead == {"second": 1, "third": 2}  # the running one, then the one waiting too
    assert pool.running == 0 and pool.waiting() == 0


def test_an_interrupted_wait_gives_its_place_up():
    pool = Admission(slots=1)

    class Rerun(Exception):  # what Streamlit raises in a script whose user clicked elsewhere
        pass

    def interrupted(ahead):
        raise Rerun

    raised = []

    def waiter():
        try:
            with pool.admitted(on_wait=interrupted):
                raised.append("admitted")  # never: the first holder keeps the slot
        except Rerun:
            raised.append("gave up")

    with pool.admitted():
        thread = threading.Thread(target=waiter)
        thread.start()
        thread.join(5)
        assert raised == ["gave up"] and pool.waiting() == 0
    with pool.admitted():  # the slot is free again
        assert pool.running == 1


def test_nested_heavy_work_in_a_holding_thread_does_not_wait_for_itself():
    pool = Admission(slots=1)
    with pool.admitted():
        with pool.admitted():
            assert pool.running == 1
    assert pool.running == 0


def test_an_error_inside_releases_the_slot():
    pool = Admission(slots=1)
    with pytest.raises(ZeroDivisionError):
        with pool.admitted():
            1 / 0
    assert pool.running == 0
