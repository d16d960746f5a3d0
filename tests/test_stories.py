"""The Tour's computed words, checked by hand on small numbers."""

from __future__ import annotations

from appkit.stories import batchnorm_story


def test_the_batchnorm_step_says_what_its_errors_show():
    errors = {"recompute": [4.1, 2.0, 0.6], "interpolate": [1.3, 1.1, 1.2], "keep": [1.3, 1.6, 8.4]}
    story = batchnorm_story(errors, "bn-00")  # α = 0, ½, 1
    assert ("at α = ½ the test error is 2.0% with statistics recomputed, 1.1% with them interpolated and 1.6% "
            "with θ0's kept") in story
    assert "θ0's statistics give 8.4% against 1.2% with its own: the model is worse with another model's " \
           "statistics (+7.2 points)" in story
    assert "at θ0 it gives 4.1% where θ0's own statistics give 1.3%" in story
    errors["keep"][-1] = 30.0
    assert "the model collapses with another model's statistics (+28.8 points)" in batchnorm_story(errors, "bn-00")
    errors["keep"][-1] = 1.5
    assert "the model is about as good with another model's statistics (+0.3 points)" in batchnorm_story(errors, "m")
    errors["keep"][-1] = 0.1
    assert "the model is better with another model's statistics (-1.1 points)" in batchnorm_story(errors, "m")
