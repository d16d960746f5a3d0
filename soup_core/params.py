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

**Where the sum lives, and in what.** ``RunningSum(device=..., precision=...)`` keeps its sum on
that device (the evaluator's, in greedy and pruned soups), so a GPU scores candidates without
copying the soup there at every step: each step moves one candidate (in its own dtype) unless
it is already on the device, and the greedy step's candidate is moved once for both scoring and
adding. The sum is float64 (8 bytes a parameter) by default, float32 (4 bytes) where float64
does not fit; :mod:`soup_core.memory` chooses and explains the bound on float32's error. Every
other step works one tensor at a time: a candidate soup costs its own bytes, nothing more.

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

from collections.abc import Callable, Collection, Mapping, Sequence

import torch

from soup_core.errors import RecipeError
from soup_core.state import StateDict, is_float, tied_aliases

ACCUMULATE_DTYPE = torch.float64
SUM_DTYPES = {"float64": torch.float64, "float32": torch.float32}


class RunningSum:
    """Sum of ingredients' float tensors; add or remove one ingredient in O(P).

    Holds one copy of the parameters in ``precision`` (float64 or float32; on ``device``,
    default: the first ingredient's) plus references (not copies) to the ingredients, which it
    needs to subtract them again and to take integer buffers from. Means come back on
    ``device``, in the ingredients' dtypes, computed one tensor at a time.
    """

    def __init__(self, device: torch.device | str | None = None, precision: str = "float64") -> None:
        if precision not in SUM_DTYPES:
            raise RecipeError(f"precision must be one of {', '.join(SUM_DTYPES)}, not {precision!r}")
        self.device = torch.device(device) if device is not None else None
        self.precision, self.dtype = precision, SUM_DTYPES[precision]
        self._sum: dict[str, torch.Tensor] = {}
        self._members: dict[str, Mapping[str, torch.Tensor]] = {}
        self._aliases: dict[str, str] = {}
        self._staged: tuple[str, Mapping[str, torch.Tensor], dict[str, torch.Tensor]] | None = None

    def _on_device(self, name: str, state: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        """``state``'s summed tensors on the sum's device, in their own dtype (no copy when
        already there); a moved candidate is kept for the add that often follows its scoring."""
        if all(state[k].device == self.device for k in self._sum):
            return state
        if self._staged is not None and self._staged[0] == name and self._staged[1] is state:
            return self._staged[2]
        self._staged = None  # release the previous candidate before moving the next
        moved = {k: state[k].to(self.device) for k in self._sum}
        self._staged = (name, state, moved)
        return moved

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._members)

    @property
    def nbytes(self) -> int:
        """Bytes the sum holds (the ingredients it refers to are the caller's)."""
        return sum(t.numel() * t.element_size() for t in self._sum.values())

    def __len__(self) -> int:
        return len(self._members)

    def __contains__(self, name: object) -> bool:
        return name in self._members

    def add(self, name: str, state: Mapping[str, torch.Tensor]) -> None:
        if name in self._members:
            raise RecipeError(f"{name!r} is already in the soup; each ingredient counts once")
        if not self._members:
            self._aliases = tied_aliases(state)
            floats = {k: t for k, t in state.items() if is_float(t) and k not in self._aliases}
            if self.device is None:
                self.device = next((t.device for t in floats.values()), torch.device("cpu"))
            self._sum = {k: torch.zeros(t.shape, dtype=self.dtype, device=self.device) for k, t in floats.items()}
            self._staged = None
        moved = self._on_device(name, state)
        for key, total in self._sum.items():
            total.add_(moved[key])  # computed in the sum's precision: no widened copy of the candidate
        self._members[name] = state
        self._staged = None

    def remove(self, name: str) -> None:
        if name not in self._members:
            raise RecipeError(f"{name!r} is not in the soup (it holds {list(self._members)})")
        state = self._members[name]
        moved = self._on_device(name, state)
        del self._members[name]
        for key, total in self._sum.items():
            total.sub_(moved[key])
        self._staged = None

    def mean(self) -> StateDict:
        """The uniform soup of the current ingredients, in their own dtypes."""
        if not self._members:
            raise RecipeError("the soup is empty: add at least one ingredient before taking its mean")
        count = len(self._members)
        return _assemble(next(iter(self._members.values())), self._sum, lambda k: self._sum[k] / count,
                         self._aliases, self.device)

    def mean_with(self, name: str, state: Mapping[str, torch.Tensor]) -> StateDict:
        """The mean if ``state`` were added — without changing this sum (greedy candidates)."""
        if not self._members:
            aliases = tied_aliases(state)
            device = self.device or next((t.device for t in state.values()), torch.device("cpu"))
            floats = [k for k, t in state.items() if is_float(t) and k not in aliases]
            return _assemble(state, floats, lambda k: state[k].to(device), aliases, device)
        moved = self._on_device(name, state)
        count = len(self._members) + 1
        return _assemble(next(iter(self._members.values())), self._sum,
                         lambda k: torch.add(self._sum[k], moved[k]).div_(count), self._aliases, self.device)

    def mean_without(self, name: str) -> StateDict:
        """The mean if ``name`` were removed — without changing this sum (pruning candidates)."""
        if name not in self._members or len(self._members) < 2:
            raise RecipeError(f"cannot remove {name!r}: a soup needs at least one ingredient")
        moved = self._on_device(name, self._members[name])
        others = [s for n, s in self._members.items() if n != name]
        count = len(others)
        return _assemble(others[0], self._sum, lambda k: torch.sub(self._sum[k], moved[k]).div_(count),
                         self._aliases, self.device)


def _assemble(reference: Mapping[str, torch.Tensor], keys: Collection[str],
              average: Callable[[str], torch.Tensor], aliases: Mapping[str, str],
              device: torch.device | None = None) -> StateDict:
    """The float tensors ``keys`` as ``average(key)``, each cast to the reference's dtype as soon as
    it is computed (one tensor at a time in the sum's precision); integer buffers copied from
    the reference (onto ``device``, where the float results are); aliases re-tied."""
    out: StateDict = {}
    for key, tensor in reference.items():
        if key in aliases:
            continue
        if key in keys:
            out[key] = average(key).to(tensor.dtype)
        else:
            out[key] = tensor.clone() if device is None or tensor.device == device else tensor.to(device)
    for alias, target in aliases.items():
        out[alias] = out[target]
    return out


def uniform_average(states: Sequence[Mapping[str, torch.Tensor]],
                    device: torch.device | str | None = None) -> StateDict:
    """The uniform soup θ_S = (1/|S|) Σ θ_i (paper §2, Table 2), summed on ``device``."""
    total = RunningSum(device)
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
        raise RecipeError(f"need one weight per state dict: {len(states)} state dicts, "
                         f"{len(weights)} weights")
    reference = states[int(torch.argmax(weights))]
    aliases = tied_aliases(states[0])

    def combine(key: str) -> torch.Tensor:
        total = torch.zeros(states[0][key].shape, dtype=ACCUMULATE_DTYPE)
        for w, state in zip(weights, states):
            total.add_(state[key].to(ACCUMULATE_DTYPE), alpha=float(w))
        return total

    floats = {k for k, t in states[0].items() if k not in aliases and is_float(t)}
    return _assemble(reference, floats, combine, aliases)


def interpolate(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], alpha: float) -> StateDict:
    """(1 − α)·a + α·b; α outside [0, 1] extrapolates (error barriers, WiSE-FT curves)."""
    return weighted_average([a, b], [1.0 - alpha, alpha])


def num_parameters(state: Mapping[str, torch.Tensor]) -> int:
    """Number of float entries, counting tied tensors once."""
    aliases = tied_aliases(state)
    return sum(t.numel() for k, t in state.items() if is_float(t) and k not in aliases)
