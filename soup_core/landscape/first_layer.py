"""The first layer of a slice is linear in its weights: run it once per direction, mix per point.

Its input does not depend on the point, so a Linear/Conv runs once for the origin and once per
direction, and each point only mixes those k + 1 outputs with its coefficients (exact:
Linear/Conv are linear in (weight, bias)).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call

from soup_core.landscape.folded import Folded, FoldedForward

AFFINE_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class AffineFirstLayer(nn.Module):
    """Runs a Linear/Conv once for the origin and each direction; mixes per point.

    ``coefficients`` ([1, c_1, …, c_k], batched under vmap) is set just before each call.
    """

    def __init__(self, layer: nn.Module, weights: Sequence[Mapping[str, torch.Tensor]]) -> None:
        super().__init__()
        self.layer = layer
        self.channel_dim = -1 if isinstance(layer, nn.Linear) else 1
        self.terms = len(weights)
        self.stacked = {name: torch.cat([w[name] for w in weights]) for name in weights[0]}
        self.coefficients: torch.Tensor | None = None
        self._input: torch.Tensor | None = None
        self._terms: torch.Tensor | None = None
        self._folded_terms: torch.Tensor | None = None

    def _same_input(self, x: torch.Tensor) -> bool:
        # Views (x.flatten(1) in a forward) are new objects over the same memory. Holding the
        # cached input keeps its storage alive, so an equal address means the same data.
        cached = self._input
        return cached is not None and (x is cached or (
            x.data_ptr() == cached.data_ptr() and x.shape == cached.shape and x.stride() == cached.stride()
            and x.dtype == cached.dtype and x._version == cached._version))

    def forget(self) -> None:
        self._input = self._terms = self._folded_terms = None

    def _terms_for(self, x: torch.Tensor) -> torch.Tensor:
        """[k+1, *out]: the layer's output for the origin and each direction."""
        if not self._same_input(x):  # a loop over points feeds the same batch every time
            y = functional_call(self.layer, self.stacked, (x,))  # (k+1)·C outputs, computed once
            dim = self.channel_dim % y.dim()
            self._input, self._terms = x, y.unflatten(dim, (self.terms, -1)).movedim(dim, 0).contiguous()
            self._folded_terms = None
        return self._terms

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        terms = self._terms_for(x)
        # A vector–matrix product per point; under vmap one GEMM [G, k+1] × [k+1, out] whose
        # result is already in the batch-first layout the next layer wants.
        return (self.coefficients @ terms.flatten(1)).view(terms.shape[1:])

    def folded(self, x: torch.Tensor) -> torch.Tensor:
        """All points' outputs in :mod:`soup_core.landscape.folded`'s layout, [N, G·C, *spatial]."""
        terms = self._terms_for(x)
        if self._folded_terms is None:  # [N, *spatial, k+1, C]: samples outermost, like the output
            self._folded_terms = terms.permute(1, *range(3, terms.dim()), 0, 2).contiguous()
        n, *spatial, _, c = self._folded_terms.shape
        # [G, k+1] × [k+1, C] for each sample and position: each point's C channels side by side.
        mixed = torch.matmul(self.coefficients, self._folded_terms).view(n, *spatial, -1)
        return mixed.permute(0, mixed.dim() - 1, *range(1, mixed.dim() - 1)) if spatial else mixed


def folded_first_layer(folded: FoldedForward, module: AffineFirstLayer, x: torch.Tensor):
    """The cached first layer under :class:`FoldedForward`: mixed outputs, or per-point weights."""
    if isinstance(module.layer, nn.Linear):
        return Folded(module.folded(x), len(module.coefficients))
    # A convolution has many positions per output channel: mixing k+1 outputs at each costs
    # more than convolving once with every point's own filters (k+1 tiny GEMMs for those).
    weights = {n: (module.coefficients @ t.unflatten(0, (module.terms, -1)).flatten(1)).view(
               len(module.coefficients), -1, *t.shape[1:]) for n, t in module.stacked.items()}
    return module.layer, weights["weight"], weights.get("bias")
