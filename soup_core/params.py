"""State-dict algebra: running sums, means and weighted combinations in O(P) memory.

Two choices users meet here:

* **Integer tensors are never averaged as floats.** ``num_batches_tracked`` (BatchNorm) and
  index buffers such as ``position_ids`` are counters and tables, not parameters: their mean
  is meaningless and rounding it can make it inconsistent. A soup takes them from its
  *reference* ingredient — the first one added (or the one with the largest weight in a
  weighted combination), as ``torch.optim.swa_utils.AveragedModel`` keeps its own buffers.
  BatchNorm's *float* buffers (``running_mean``/``running_var``) are averaged like weights;
  whether that is right is a landscape question (see ``landscape.py``'s BatchNorm policies).
* **Tied weights are averaged once and stay tied.** When several keys share one storage
  (e.g. input embeddings and output head), the soup averages the first key of the group and
  points the others at the result, so export writes one tensor and the tie survives.

Floating-point sums are accumulated in float64 so that adding and then removing an
ingredient returns (to float64 rounding) to where it started, independent of order; the
result is cast back to each tensor's own dtype.

Example::

    >>> import torch
    >>> from soup_core.params import RunningSum
    >>> soup = RunningSum()
    >>> soup.add("a", {"w": torch.tensor([0.0, 2.0])})
    >>> soup.add("b", {"w": torch.tensor([2.0, 4.0])})
    >>> soup.mean()["w"].tolist()
    [1.0, 3.0]
    >>> soup.remove("b"); soup.mean()["w"].tolist()
    [0.0, 2.0]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from soup_core.state import StateDict, is_float, tied_aliases

ACCUMULATE_DTYPE = torch.float64


class RunningSum:
    """Sum of ingredients' float tensors; add or remove one ingredient in O(P).

    Holds one float64 copy of the parameters plus references (not copies) to the
    ingredients, which it needs to subtract them again and to take integer buffers from.
    """

    def __init__(self) -> None:
        self._sum: dict[str, torch.Tensor] = {}
        self._members: dict[str, Mapping[str, torch.Tensor]] = {}
        self._aliases: dict[str, str] = {}

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._members)

    def __len__(self) -> int:
        return len(self._members)

    def __contains__(self, name: object) -> bool:
        return name in self._members

    def add(self, name: str, state: Mapping[str, torch.Tensor]) -> None:
        if name in self._members:
            raise ValueError(f"{name!r} is already in the soup; each ingredient counts once")
        if not self._members:
            self._aliases = tied_aliases(state)
            self._sum = {k: torch.zeros(t.shape, dtype=ACCUMULATE_DTYPE)
                         for k, t in state.items() if is_float(t) and k not in self._aliases}
        for key, total in self._sum.items():
            total.add_(state[key].to(ACCUMULATE_DTYPE))
        self._members[name] = state

    def remove(self, name: str) -> None:
        if name not in self._members:
            raise ValueError(f"{name!r} is not in the soup (it holds {list(self._members)})")
        state = self._members.pop(name)
        for key, total in self._sum.items():
            total.sub_(state[key].to(ACCUMULATE_DTYPE))

    def mean(self) -> StateDict:
        """The uniform soup of the current ingredients, in their own dtypes."""
        if not self._members:
            raise ValueError("the soup is empty: add at least one ingredient before taking its mean")
        count = len(self._members)
        reference = next(iter(self._members.values()))
        return _assemble(reference, {k: v / count for k, v in self._sum.items()}, self._aliases)

    def mean_with(self, name: str, state: Mapping[str, torch.Tensor]) -> StateDict:
        """The mean if ``state`` were added — without changing this sum (greedy candidates)."""
        if not self._members:
            aliases = tied_aliases(state)
            return _assemble(state, {k: t.to(ACCUMULATE_DTYPE) for k, t in state.items()
                                     if is_float(t) and k not in aliases}, aliases)
        count = len(self._members) + 1
        averaged = {k: (v + state[k].to(ACCUMULATE_DTYPE)) / count for k, v in self._sum.items()}
        return _assemble(next(iter(self._members.values())), averaged, self._aliases)

    def mean_without(self, name: str) -> StateDict:
        """The mean if ``name`` were removed — without changing this sum (pruning candidates)."""
        if name not in self._members or len(self._members) < 2:
            raise ValueError(f"cannot remove {name!r}: a soup needs at least one ingredient")
        state = self._members[name]
        others = [s for n, s in self._members.items() if n != name]
        count = len(others)
        averaged = {k: (v - state[k].to(ACCUMULATE_DTYPE)) / count for k, v in self._sum.items()}
        return _assemble(others[0], averaged, self._aliases)


def _assemble(reference: Mapping[str, torch.Tensor], averaged: Mapping[str, torch.Tensor],
              aliases: Mapping[str, str]) -> StateDict:
    """Cast float results back to the reference dtypes, copy integer buffers, re-tie aliases."""
    out: StateDict = {}
    for key, tensor in reference.items():
        if key in aliases:
            continue
        out[key] = averaged[key].to(tensor.dtype) if key in averaged else tensor.clone()
    for alias, target in aliases.items():
        out[alias] = out[target]
    return out


def uniform_average(states: Sequence[Mapping[str, torch.Tensor]]) -> StateDict:
    """The uniform soup θ_S = (1/|S|) Σ θ_i (paper §2, Table 2)."""
    total = RunningSum()
    for i, state in enumerate(states):
        total.add(str(i), state)
    return total.mean()


def weighted_average(states: Sequence[Mapping[str, torch.Tensor]],
                     weights: Sequence[float] | torch.Tensor) -> StateDict:
    """Σ w_i θ_i with float64 accumulation; integer tensors come from the largest weight.

    The weights are used as given (a learned soup's softmax already sums to one); pass
    normalised weights for an average.
    """
    weights = torch.as_tensor(weights, dtype=ACCUMULATE_DTYPE)
    if len(states) == 0 or len(states) != len(weights):
        raise ValueError(f"need one weight per state dict: {len(states)} state dicts, "
                         f"{len(weights)} weights")
    reference = states[int(torch.argmax(weights))]
    aliases = tied_aliases(states[0])
    averaged: dict[str, torch.Tensor] = {}
    for key, tensor in states[0].items():
        if key in aliases or not is_float(tensor):
            continue
        total = torch.zeros(tensor.shape, dtype=ACCUMULATE_DTYPE)
        for w, state in zip(weights, states):
            total.add_(state[key].to(ACCUMULATE_DTYPE), alpha=float(w))
        averaged[key] = total
    return _assemble(reference, averaged, aliases)


def interpolate(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], alpha: float) -> StateDict:
    """(1 − α)·a + α·b; α outside [0, 1] extrapolates (error barriers, WiSE-FT curves)."""
    return weighted_average([a, b], [1.0 - alpha, alpha])


def num_parameters(state: Mapping[str, torch.Tensor]) -> int:
    """Number of float entries, counting tied tensors once."""
    aliases = tied_aliases(state)
    return sum(t.numel() for k, t in state.items() if is_float(t) and k not in aliases)
