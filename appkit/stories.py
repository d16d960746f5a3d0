"""The Tour's words that are worked out from numbers, each in a function a test can hand-check
(the pages only draw; a sentence shown to a participant is computed from the data it describes)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def batchnorm_story(errors: Mapping[str, Sequence[float]], model: str) -> str:
    """Step 6's words, from the test errors (%) along θ0 → ``model`` under each BatchNorm policy
    (α = 0, 0.1, …, 1; interpolating gives each end its own statistics)."""
    middle = {policy: e[len(e) // 2] for policy, e in errors.items()}
    keep_end, own_end = errors["keep"][-1], errors["interpolate"][-1]
    cost = keep_end - own_end
    verdict = ("collapses" if cost > 10 else "is worse" if cost > 1 else "is better" if cost < -1
               else "is about as good")
    return ("**BatchNorm.** Running statistics belong to the weights they were measured with; the reproduction "
            "saw ResNet and EfficientNet soups collapse when their statistics were not measured again. On this "
            f"zoo, along the line θ0 → {model}: at α = ½ the test error is {middle['recompute']:.1f}% with "
            f"statistics recomputed, {middle['interpolate']:.1f}% with them interpolated and {middle['keep']:.1f}% "
            f"with θ0's kept. At {model} itself, θ0's statistics give {keep_end:.1f}% against {own_end:.1f}% with "
            f"its own: the model {verdict} with another model's statistics ({cost:+.1f} points). Recomputing "
            f"measures them on the training split, not on the data each model saw: at θ0 it gives "
            f"{errors['recompute'][0]:.1f}% where θ0's own statistics give {errors['interpolate'][0]:.1f}%.")
