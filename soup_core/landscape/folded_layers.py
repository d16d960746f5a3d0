"""The layers of the folded forward: G weight points' activations as one channels-last tensor.

:class:`Folded` is ``[N, G·C]`` or ``[N, G·C, H, W]`` in channels-last memory (sample, position,
point, channel); the functions here run one layer on it with the G points' weights stacked
(:func:`layer_filters`). :mod:`soup_core.landscape.folded` traces a model and calls them in
order; why the layout pays is in its docstring.

>>> import torch
>>> x = torch.randn(5, 3)
>>> weights = torch.randn(2, 4, 3)  # two points of a Linear(3 → 4)
>>> filters, _ = layer_filters(torch.nn.Linear(3, 4), weights, None)
>>> out = folded_linear(repeat_points(x, 2), filters, None, 2).tensor.view(5, 2, 4)
>>> bool(torch.allclose(out[:, 1], x @ weights[1].T, atol=1e-6))
True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from soup_core.errors import SoupError


class Unsupported(SoupError):
    """The model uses an operation the folded forward does not implement."""


@dataclass
class Folded:
    """Activations of G points: ``[N, G·C]`` or ``[N, G·C, H, W]`` in channels-last memory."""

    tensor: torch.Tensor
    points: int


def channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t.contiguous()


def repeat_points(value: torch.Tensor | Folded, points: int) -> Folded:
    """A point-independent activation as the same activation at every point."""
    if isinstance(value, Folded):
        return value
    repeated = value.unsqueeze(1).expand(value.shape[0], points, *value.shape[1:])
    return Folded(channels_last(repeated.flatten(1, 2)), points)


def layer_filters(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None):
    """G points' ``weight`` [G, out, …] and ``bias`` [G, out] as one layer's, points outermost."""
    flat_bias = None if bias is None else bias.reshape(-1)
    if isinstance(layer, nn.Linear):
        return weight.reshape(-1, weight.shape[-1]), flat_bias
    # Channels-last filters make the output channels-last even when C_in = 1.
    return weight.flatten(0, 1).contiguous(memory_format=torch.channels_last), flat_bias


def folded_linear(value: torch.Tensor | Folded, filters: torch.Tensor, bias: torch.Tensor | None, points: int,
                  out_features: int | None = None) -> Folded:
    """A Linear with G points' weights stacked as ``filters`` [G·rows, in], ``bias`` [G·rows].

    Rows beyond ``out_features`` (zero padding) are dropped from the output.
    """
    g = points
    if not isinstance(value, Folded):  # one GEMM with every point's rows stacked
        if value.dim() != 2:
            raise Unsupported("Linear on inputs with more than 2 dimensions")
        return Folded(nn.functional.linear(value, filters, bias), g)
    t = value.tensor
    n = t.shape[0]
    if t.dim() == 4:  # a deferred Flatten; ``filters`` are in (h, w, c) order
        inputs = t.permute(0, 2, 3, 1).reshape(n, -1, g, t.shape[1] // g)  # [N, H·W, G, C], a view
        inputs = inputs.permute(2, 0, 1, 3).reshape(g, n, -1)  # a copy in runs of C floats
        weights = filters.view(g, -1, filters.shape[1]).transpose(1, 2)
        y = torch.bmm(inputs, weights) if bias is None else torch.baddbmm(bias.view(g, 1, -1), inputs, weights)
        return Folded(y.transpose(0, 1).reshape(n, -1), g)
    if t.dim() != 2:
        raise Unsupported("Linear on inputs with more than 2 dimensions")
    rows = filters.shape[0] // g
    # [N, G·in] is channels-last [1, G·in, N, 1]: a grouped 1×1 convolution, no copy.
    image = t.view(1, n, 1, -1).permute(0, 3, 1, 2)
    y = nn.functional.conv2d(image, filters[:, :, None, None], bias, groups=g).permute(0, 2, 3, 1)
    if out_features is None or out_features == rows:
        return Folded(y.reshape(n, -1), g)
    return Folded(y.reshape(n, g, rows)[:, :, :out_features].reshape(n, -1), g)


def folded_conv2d(module: nn.Conv2d, value: torch.Tensor | Folded, filters: torch.Tensor,
                  bias: torch.Tensor | None, points: int) -> Folded:
    """``module``'s convolution with G points' filters stacked: ``[G·C_out, C_in/groups, kh, kw]``."""
    groups = module.groups
    if not isinstance(value, Folded) and module.in_channels == 1:
        return _single_channel_conv2d(module, value, filters, bias, points)
    if isinstance(value, Folded) or groups != 1:
        value, groups = repeat_points(value, points), points * groups
    # An input shared by all points needs no copies: the points' filters are output channels.
    t = channels_last(value.tensor if isinstance(value, Folded) else value)
    if t.dim() != 4:
        raise Unsupported(f"{type(module).__name__} needs [N, C, H, W] inputs")
    y = nn.functional.conv2d(t, filters, bias, module.stride, module.padding, module.dilation, groups)
    return Folded(channels_last(y), points)


def _single_channel_conv2d(module: nn.Conv2d, x: torch.Tensor, filters: torch.Tensor,
                           bias: torch.Tensor | None, points: int) -> Folded:
    """A one-channel input (grey images): im2col and one GEMM, whose [N·H·W, G·C] result is
    already channels-last. (oneDNN cannot tell the layouts of a one-channel input apart and
    returns channels-first, which would then cost a copy.)"""
    if x.dim() != 4:
        raise Unsupported(f"{type(module).__name__} needs [N, C, H, W] inputs")
    n = x.shape[0]
    columns = nn.functional.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
    height = (x.shape[2] + 2 * module.padding[0] - module.dilation[0] * (module.kernel_size[0] - 1) - 1) \
        // module.stride[0] + 1
    columns = columns.transpose(1, 2).reshape(-1, columns.shape[1])  # [N·L, kh·kw]
    kernels = filters.reshape(filters.shape[0], -1).T  # one input channel: both layouts agree
    y = columns @ kernels if bias is None else torch.addmm(bias, columns, kernels)
    return Folded(y.view(n, height, -1, filters.shape[0]).permute(0, 3, 1, 2), points)


def folded_flatten(value: torch.Tensor | Folded) -> torch.Tensor | Folded:
    """``Flatten`` to each point's (c, *spatial) order."""
    if not isinstance(value, Folded):
        return value.flatten(1)
    t = value.tensor
    if t.dim() == 2:
        return value
    n, gc = t.shape[:2]
    # Channels-last memory is [N, *spatial, G, C]: bring each point's (c, *spatial) together.
    per_point = t.permute(0, *range(2, t.dim()), 1).reshape(n, -1, value.points, gc // value.points)
    return Folded(per_point.permute(0, 2, 3, 1).reshape(n, -1), value.points)
