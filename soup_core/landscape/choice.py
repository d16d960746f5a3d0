"""Which strategy runs a slice fastest here: measured on the spot, never guessed.

Batched convolutions become grouped convolutions under vmap, which CPUs run slowly in
channels-first memory, while the folded layout runs them in channels-last memory; small matmul
networks gain from batching; a GPU is busy only with large calls. So the
:class:`~soup_core.landscape.engine.SliceEvaluator` times its candidate strategies
(:mod:`soup_core.landscape.strategies`) on a probe and keeps the fastest. A strategy whose fp32
logits disagree with the plain loop's, or that cannot run this model (vmap and data-dependent
control flow, an op without a bf16 kernel), is never chosen.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import torch

from soup_core.landscape.strategies import Strategy
from soup_core.precision import precision

# A probe of PROBE_SAMPLES samples checks that the strategies agree; then each runs its own
# chunk (up to PROBE_POINTS points, PROBE_SAMPLES samples), best of PROBE_ROUNDS (the first warms up).
PROBE_SAMPLES = 128
PROBE_POINTS = 32
PROBE_ROUNDS = 4

# logits(strategy, coords [G, k], x) -> [G, N, C]: the engine's forward run with ``strategy``.
Logits = Callable[[Strategy, torch.Tensor, torch.Tensor], torch.Tensor]


def fastest_strategy(loop: Strategy, candidates: Sequence[Strategy], logits: Logits, inputs: torch.Tensor,
                     k: int, device: torch.device) -> Strategy:
    """The fastest of ``loop`` and the ``candidates`` that agree with it, per point and sample."""
    probe = torch.linspace(-1, 1, 4 * k, device=device).view(4, k)
    with precision("fp32", device):  # agreement is checked in exact arithmetic
        reference = logits(loop, probe, inputs[:PROBE_SAMPLES])
    runs = [loop]
    for candidate in candidates:
        try:
            with precision("fp32", device):
                if torch.allclose(logits(candidate, probe, inputs[:PROBE_SAMPLES]), reference, rtol=1e-4, atol=1e-4):
                    runs.append(candidate)
        except Exception:  # noqa: BLE001 - a strategy that cannot run this model is not a candidate
            pass
    # Each timed at its own chunk size (up to PROBE_POINTS points), per point and sample.
    timings = {}
    for candidate in runs:
        points = min(candidate.chunk_points(len(inputs)), PROBE_POINTS)
        coords = torch.linspace(-1, 1, points * k, device=device).view(points, k)
        timings[candidate] = (coords, inputs[:min(candidate.batch_size(points, len(inputs)), PROBE_SAMPLES)],
                              math.inf)
    for round_ in range(PROBE_ROUNDS):  # interleaved: a shared machine's noise hits all alike
        for candidate in list(timings):
            coords, x, best = timings[candidate]
            try:
                seconds = _timed(logits, candidate, coords, x, device)
            except Exception:  # noqa: BLE001 - e.g. an op without a bf16 kernel here
                if candidate is not loop:
                    del timings[candidate]
                    continue
                raise
            timings[candidate] = (coords, x, min(best, seconds / (len(coords) * len(x))))
        if round_ and max(t for *_, t in timings.values()) * PROBE_POINTS * PROBE_SAMPLES > 0.5:
            break  # a large model: one timed round (after the warm-up) tells them apart
    return min(timings, key=lambda c: timings[c][2])


def _timed(logits: Logits, strategy: Strategy, coords: torch.Tensor, x: torch.Tensor, device: torch.device) -> float:
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda device=None: None)
    synchronize(device)
    start = time.perf_counter()
    logits(strategy, coords, x)
    synchronize(device)
    return time.perf_counter() - start
