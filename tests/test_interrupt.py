"""A click that interrupts a landscape keeps what was computed, and Compute finishes it."""

from __future__ import annotations

import numpy as np
import pytest
from streamlit.runtime.scriptrunner_utils.exceptions import RerunException, StopException

from appkit.interrupt import Interruptible
from soup_core.landscape import SliceEvaluator, plane_landscape
from soup_core.zoo import open_zoo, zoo_plane


@pytest.mark.parametrize("control", [StopException(), RerunException(None)])
def test_an_interrupted_landscape_keeps_its_chunks_and_resumes_to_the_full_grid(control):
    zoo = open_zoo("digits-finetune", device="cpu")
    plane = zoo_plane(zoo, ("base", "ft-00", "ft-01"))
    engine = SliceEvaluator(zoo.evaluator, plane.origin, plane.directions, working_set=1 << 20, strategy="vmap")
    drawn = []

    def draw(fraction, message):  # the second progress call is where Streamlit sees the click
        drawn.append(fraction)
        if len(drawn) == 2:
            raise control

    run = Interruptible(draw)
    partial = plane_landscape(zoo.evaluator, plane, grid=9, engine=engine, progress=run.progress,
                              should_stop=run.should_stop)
    assert run.should_stop() and 0 < partial.done.sum() < 81
    with pytest.raises(type(control)):
        run.raise_pending()  # Streamlit's stop or rerun goes on once the partial result is kept
    finished = plane_landscape(zoo.evaluator, plane, grid=9, engine=engine, resume=partial)
    whole = plane_landscape(zoo.evaluator, plane, grid=9, engine=engine)
    assert finished.complete
    np.testing.assert_allclose(finished.loss["val"], whole.loss["val"], atol=1e-6)


def test_an_uninterrupted_run_raises_nothing():
    run = Interruptible(lambda f, m: None)
    run.progress(0.5, "half")
    assert not run.should_stop()
    run.raise_pending()
