"""Permutation alignment — weight matching (Ainsworth, Hayase & Srinivasa 2023, "Git Re-Basin", §3.2).

Two networks trained from scratch can compute nearly the same function with their hidden units
in a different order; their average then mixes unrelated units, and the soup fails (paper §3.2).
Permuting the units of one network so that they match the other's changes no output — it is
the same function — but can bring the two into one basin.

* **Permutation groups come from the model's graph** (``torch.fx``), not from a list per
  architecture: every Linear/Conv output starts a group of units; BatchNorm, elementwise
  activations, dropout and pooling carry it through; a Flatten turns C channels into C blocks
  of H·W features; a residual ``+`` joins the groups of its two inputs; the model's output is
  never permuted. Anything else (attention, concatenation, normalisation over features) is
  refused with the operation's name, rather than aligned wrongly.
* **Weight matching**: for each group in turn, the permutation maximising Σ ⟨W_ref, P W⟩ over
  every tensor the group touches is a linear assignment problem
  (``scipy.optimize.linear_sum_assignment``); groups are revisited until none changes.
* **BatchNorm statistics** permute with their channels, so an aligned checkpoint is exactly the
  same function. A *soup* of aligned models should have its statistics recomputed (REPAIR,
  Jordan et al. 2023, shows interpolated statistics are what breaks aligned soups): the
  landscape commands' default ``--bn recompute`` does that.

>>> import torch
>>> from soup_core.align import align, permutation_groups
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
>>> [sorted(g.axes) for g in permutation_groups(model, torch.zeros(1, 4))]
[[('0.bias', 0, 1), ('0.weight', 0, 1), ('2.weight', 1, 1)]]
>>> state = model.state_dict()
>>> aligned = align(state, state, model, torch.zeros(1, 4))
>>> all(torch.equal(aligned[k], state[k]) for k in state)
True
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx
from scipy.optimize import linear_sum_assignment
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from soup_core.errors import SoupError
from soup_core.state import StateDict

CARRIERS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.ELU, nn.Softplus, nn.Identity,
            nn.Dropout, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
            nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
CARRIER_FUNCTIONS = {torch.relu, nn.functional.relu, nn.functional.gelu, nn.functional.silu, torch.tanh,
                     torch.sigmoid, nn.functional.dropout, nn.functional.max_pool2d, nn.functional.avg_pool2d,
                     nn.functional.adaptive_avg_pool2d}
CARRIER_METHODS = {"relu", "tanh", "sigmoid", "contiguous"}
AFFINE = (nn.Linear, nn.Conv1d, nn.Conv2d)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
MAX_ROUNDS = 100


class AlignmentError(SoupError):
    """The model uses an operation whose units cannot be matched safely; the message names it."""


@dataclass
class Group:
    """One set of hidden units permuted together: ``axes`` are (state-dict key, axis, block)."""

    size: int
    axes: set[tuple[str, int, int]] = field(default_factory=set)

    @property
    def label(self) -> str:
        """The layer whose output units these are (its first weight permuted along axis 0)."""
        outputs = sorted(key for key, axis, _ in self.axes if axis == 0)
        return (outputs or sorted(key for key, _, _ in self.axes))[0].rsplit(".", 1)[0]


def units_moved(groups: list[Group], perms: list[torch.Tensor]) -> dict[str, tuple[int, int]]:
    """Per layer, how many of its units a permutation moves, and how many it has.

    >>> units_moved([Group(4, {("fc.weight", 0, 1)})], [torch.tensor([0, 2, 1, 3])])
    {'fc': (2, 4)}
    """
    return {g.label: (int((p != torch.arange(g.size)).sum()), g.size) for g, p in zip(groups, perms)}


class _Groups:
    """Union-find over groups (a residual ``+`` makes two groups one)."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.groups: list[Group] = []
        self.frozen: set[int] = set()

    def new(self, size: int) -> int:
        self.parent.append(len(self.parent))
        self.groups.append(Group(size))
        return len(self.parent) - 1

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        if a != b:
            if self.groups[a].size != self.groups[b].size:
                raise AlignmentError("a residual connection adds activations of different widths")
            self.parent[b] = a
        return a


def permutation_groups(model: nn.Module, example: torch.Tensor) -> list[Group]:
    """The permutable unit groups of ``model`` (see the module docstring), found by tracing it
    on ``example`` (a small batch of inputs, used for the shapes a Flatten needs)."""
    try:
        traced = torch.fx.symbolic_trace(model)
    except Exception as exc:
        raise AlignmentError(f"torch.fx cannot trace this model ({type(exc).__name__}); it cannot be aligned") from None
    ShapeProp(traced).propagate(example)
    groups, carried = _Groups(), {}  # node -> (group, block) of its channel axis, or None
    for node in traced.graph.nodes:
        inputs = [a for a in node.args if isinstance(a, torch.fx.Node)]
        first = carried.get(inputs[0]) if inputs else None
        module = traced.get_submodule(node.target) if node.op == "call_module" else None
        if node.op in ("placeholder", "get_attr"):
            carried[node] = None
        elif isinstance(module, AFFINE):
            g = groups.new(module.weight.shape[0])
            groups.groups[g].axes |= {(f"{node.target}.weight", 0, 1)}
            if module.bias is not None:
                groups.groups[g].axes.add((f"{node.target}.bias", 0, 1))
            if first is not None:
                groups.groups[groups.find(first[0])].axes.add((f"{node.target}.weight", 1, first[1]))
            carried[node] = (g, 1)
        elif isinstance(module, NORMS):
            if first is None:
                raise AlignmentError(f"{node.target}: a BatchNorm right after the input cannot be aligned")
            group = groups.groups[groups.find(first[0])]
            group.axes |= {(f"{node.target}.{n}", 0, 1) for n in ("weight", "bias", "running_mean", "running_var")
                           if getattr(module, n, None) is not None}
            carried[node] = first
        elif isinstance(module, CARRIERS) or (node.op == "call_function" and node.target in CARRIER_FUNCTIONS) \
                or (node.op == "call_method" and node.target in CARRIER_METHODS):
            carried[node] = first
        elif isinstance(module, nn.Flatten) or (node.op == "call_method" and node.target == "flatten") \
                or (node.op == "call_function" and node.target is torch.flatten):
            shape = inputs[0].meta["tensor_meta"].shape
            carried[node] = None if first is None else (first[0], first[1] * int(np.prod(shape[2:])))
        elif node.op == "call_function" and node.target in (operator.add, torch.add) and len(inputs) == 2:
            a, b = carried.get(inputs[0]), carried.get(inputs[1])
            if a is None or b is None or a[1] != b[1]:
                raise AlignmentError(f"{node.name}: a residual add of unmatched activations cannot be aligned")
            carried[node] = (groups.union(a[0], b[0]), a[1])
        elif node.op == "output":
            for arg in inputs:
                if carried.get(arg) is not None:
                    groups.frozen.add(groups.find(carried[arg][0]))
        else:
            raise AlignmentError(f"{node.op} {getattr(node.target, '__name__', node.target)!s} is not supported by "
                                 "permutation alignment (supported: Linear, Conv, BatchNorm, elementwise activations, "
                                 "pooling, Flatten, residual adds)")
    roots = {groups.find(g) for g in range(len(groups.groups))} - {groups.find(g) for g in groups.frozen}
    merged = []
    for root in sorted(roots):
        members = [groups.groups[g] for g in range(len(groups.groups)) if groups.find(g) == root]
        merged.append(Group(members[0].size, set().union(*(m.axes for m in members))))
    return merged


def _along(tensor: torch.Tensor, axis: int, block: int) -> torch.Tensor:
    """``tensor`` with the permuted units first: [units, everything else] (float64)."""
    moved = tensor.double().movedim(axis, 0)
    return moved.reshape(moved.shape[0] // block, -1)


def permute(state: Mapping[str, torch.Tensor], groups: list[Group], perms: list[torch.Tensor],
            skip: int | None = None) -> StateDict:
    """``state`` with each group's units reordered by its permutation (``skip``: leave one group as is)."""
    out = dict(state)
    for i, (group, perm) in enumerate(zip(groups, perms)):
        if i == skip:
            continue
        for key, axis, block in group.axes:
            tensor = out[key]
            index = (perm[:, None] * block + torch.arange(block)).reshape(-1) if block > 1 else perm
            out[key] = tensor.index_select(axis, index.to(tensor.device))
    return out


def weight_matching(reference: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor],
                    groups: list[Group], *, seed: int = 0) -> list[torch.Tensor]:
    """Permutations of ``state``'s groups that best match ``reference`` (coordinate ascent)."""
    perms = [torch.arange(g.size) for g in groups]
    generator = np.random.default_rng(seed)
    for _ in range(MAX_ROUNDS):
        changed = False
        for i in generator.permutation(len(groups)):
            others = permute(state, groups, perms, skip=int(i))
            score = np.zeros((groups[i].size, groups[i].size))
            for key, axis, block in groups[i].axes:
                score += (_along(reference[key], axis, block) @ _along(others[key], axis, block).T).numpy()
            _, columns = linear_sum_assignment(score, maximize=True)
            rows = np.arange(groups[i].size)
            # Accept only a strict gain (ties would cycle).
            if score[rows, columns].sum() > score[rows, perms[i].numpy()].sum() + 1e-9:
                perms[i], changed = torch.as_tensor(columns), True
        if not changed:
            break
    return perms


def align(reference: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], model: nn.Module,
          example: torch.Tensor, *, seed: int = 0) -> StateDict:
    """``state`` with its hidden units permuted to match ``reference``: the same function, and
    the weights closest to ``reference`` that weight matching finds."""
    groups = permutation_groups(model, example)
    return permute(state, groups, weight_matching(reference, state, groups, seed=seed))


def barrier_table(before, after, evaluator, split: str, points: int = 11) -> list[dict]:
    """Error barrier of every pair of a zoo's checkpoints before and after alignment (fractions).

    ``before`` and ``after`` are zoos with the same names (:meth:`soup_core.zoo.Zoo.aligned`).
    """
    import itertools

    from soup_core.landscape.path import error_barrier

    def line(zoo, x: str, y: str) -> float:
        return error_barrier(evaluator, zoo.state_dict(x), zoo.state_dict(y), split, points)

    return [{"a": x, "b": y, "before": line(before, x, y), "after": line(after, x, y)}
            for x, y in itertools.combinations(before.names, 2)]
