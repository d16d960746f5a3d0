"""BatchNorm in a landscape — the pitfall users meet here — and the policies that handle it.

A BatchNorm network's running statistics belong to the weights they were measured with; at an
interpolated or extrapolated point neither end's statistics fit, and the reproduction saw
ResNet/EfficientNet soups collapse for that suspected reason. Three policies (``bn=``):

* ``"recompute"`` (default): at every point, re-estimate running mean and variance on the
  evaluator's training data exactly as ``torch.optim.swa_utils.update_bn`` does (train-mode
  forward, cumulative average over the same batches; only BatchNorm switches to train mode,
  so dropout stays off). This is what the point's weights would really be deployed with.
* ``"interpolate"``: treat the statistics like weights (their affine combination; variances
  clamped at 0 when extrapolating). Cheap, and what a plain soup does.
* ``"keep"``: use the origin's statistics everywhere (θ0's when θ0 is the first point).

A model without BatchNorm reports the policy ``"none"``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from soup_core.errors import SoupError
from soup_core.evaluate import Evaluator
from soup_core.geometry import Plane
from soup_core.policies import BN_POLICIES


class BatchNormSlice(nn.Module):
    """A BatchNorm that can record batch statistics (``collect``) or use given running ones.

    Same parameter and buffer names as the module it replaces, so state-dict keys still apply.
    """

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        self.eps = bn.eps
        self.weight = bn.weight
        self.bias = bn.bias
        self.register_buffer("running_mean", bn.running_mean.clone())
        self.register_buffer("running_var", bn.running_var.clone())
        self.register_buffer("num_batches_tracked", bn.num_batches_tracked.clone())
        self.collect: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.batched = True  # set by SliceEvaluator: True while running under vmap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1, -1] + [1] * (x.dim() - 2)
        if self.collect is not None and not self.batched:
            # update_bn's own step with momentum 1: the fused kernel normalises with the batch
            # statistics and leaves the batch mean and unbiased variance in the buffers.
            mean, var = torch.zeros_like(self.running_mean), torch.ones_like(self.running_var)
            y = nn.functional.batch_norm(x, mean, var, self.weight, self.bias, True, 1.0, self.eps)
            self.collect.append((mean, var))
            return y
        if self.collect is not None:  # the same under vmap, where buffers cannot be updated in place
            dims = [0] + list(range(2, x.dim()))
            mean, var = x.mean(dims), x.var(dims, correction=0)
            n = x.numel() // x.shape[1]
            self.collect.append((mean, var * (n / max(n - 1, 1))))  # running_var is unbiased
        else:  # eval mode: the fused kernel
            return nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                            False, 0.0, self.eps)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.weight is not None:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def batchnorm_keys(model: nn.Module) -> list[str]:
    """State-dict keys of the running statistics of a model's BatchNorm layers."""
    return [f"{name}.{buffer}" for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            for buffer in ("running_mean", "running_var")]


def recompute_batchnorm(evaluator: Evaluator, state: Mapping[str, torch.Tensor],
                        batch_size: int | None = None) -> dict[str, torch.Tensor]:
    """``state`` with BatchNorm statistics re-estimated on the evaluator's training data, exactly
    as ``torch.optim.swa_utils.update_bn`` does with batches of ``batch_size`` (default: the
    evaluator's). The input is not modified."""
    model = evaluator.model_copy()
    model.load_state_dict(state)
    if not batchnorm_keys(model):
        return dict(state)
    if evaluator.train is None:
        raise SoupError("recomputing BatchNorm statistics needs training data: pass train=Split(...) "
                        "to the Evaluator, or export with bn='interpolate' or bn='keep'")
    loader = torch.utils.data.DataLoader(evaluator.train.inputs, batch_size=batch_size or evaluator.batch_size)
    torch.optim.swa_utils.update_bn(loader, model, device=evaluator.device)
    fresh = model.state_dict()
    return {k: (fresh[k].detach().cpu().to(t.dtype) if k in fresh else t) for k, t in state.items()}


def point_weights(evaluator: Evaluator, plane: Plane, x: float, y: float, bn: str = "recompute") -> dict[str, torch.Tensor]:
    """The weights at (x, y) of ``plane`` as the landscape scored them under ``bn``."""
    if bn not in BN_POLICIES:
        raise SoupError(f"unknown BatchNorm policy {bn!r}; use one of {', '.join(BN_POLICIES)}")
    state = plane.point(x, y)
    overflow = next((k for k, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)
    if overflow is not None:
        raise SoupError(f"the point ({x:g}, {y:g}) lies so far from the plane's three points that its weights overflow "
                        f"{str(state[overflow].dtype).removeprefix('torch.')} ({overflow!r}); choose coordinates "
                        "within the landscape's range")
    keys = batchnorm_keys(evaluator.model)
    if bn == "keep":
        state.update({k: plane.origin[k] for k in keys})
    elif bn == "interpolate":
        state.update({k: state[k].clamp_min(0) for k in keys if k.endswith("running_var")})
    else:
        state = recompute_batchnorm(evaluator, state)
    return state
