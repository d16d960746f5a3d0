"""Many weight points in one forward pass, with the points folded into the channels.

``torch.vmap`` over G weight points turns each Linear into a batched matmul and each Conv into
a grouped convolution in channels-first memory. On a CPU, PyTorch runs float32 matmuls through
MKL while channels-last convolutions run through oneDNN, which can use wider vector units, and
channels-first max-pooling is much slower than channels-last (bench/RESULTS.md, "Landscape",
has the figures for the machines measured). So :class:`FoldedForward` keeps
every activation as one tensor ``[N, G·C, *spatial]`` in channels-last memory — sample n, then
position, then point g, then channel c — and runs the model's layers on it directly:

* Linear(in → out) is a 1×1 convolution with G groups over a ``[1, G·in, N, 1]`` view of the
  same memory (no copy): each point multiplies by its own weights.
* Conv2d is the same convolution with G times the groups. A layer whose input does not depend
  on the point (the first one) runs once with all points' filters stacked as output channels.
* BatchNorm is a BatchNorm over G·C channels, so per-point weights and statistics need no
  special case. In eval mode it is folded into the Linear/Conv before it (scaled weights, as
  inference engines do); with a ``collect`` list (see :class:`FoldedForward`) it records each
  point's batch statistics — what ``torch.optim.swa_utils.update_bn`` averages.
* Pooling and activations are per channel and run unchanged; a ReLU just before a max-pool
  runs after it instead (the same values: ReLU is monotone), on a quarter of the data.
* ``Flatten`` reorders to each point's (c, h, w) order — or, when a Linear reads it, is left
  undone and the Linear's weights are permuted to the (h, w, c) order of memory.

The model is traced with ``torch.fx`` and run node by node here; the layers' kernels on the
folded layout are in :mod:`soup_core.landscape.folded_layers`. Any operation outside that list makes it
:class:`Unsupported`, and :class:`soup_core.landscape.SliceEvaluator` falls back to vmap or a
loop. Results equal the model's own forward up to float32 summation order.

>>> import torch
>>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)).eval()
>>> folded = FoldedForward(model)
>>> params = {k: torch.stack([v, 2 * v]) for k, v in model.state_dict().items()}  # 2 points
>>> x = torch.randn(5, 3)
>>> out = folded(params, {}, x)  # [points, samples, classes]
>>> doubled = {k: 2 * v for k, v in model.state_dict().items()}
>>> bool(torch.allclose(out[1], torch.func.functional_call(model, doubled, (x,)), atol=1e-6))
True
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
import torch
import torch.fx
from torch import nn

from soup_core.landscape.folded_layers import (Folded, Unsupported, folded_conv2d, folded_flatten, folded_linear,
                                               layer_filters, repeat_points)

# Per-channel modules that run unchanged on the folded layout.
ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Softplus,
               nn.Hardswish, nn.Hardtanh, nn.ReLU6, nn.Mish, nn.Identity, nn.Dropout)
POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
ELEMENTWISE_FUNCTIONS = {torch.relu, nn.functional.relu, nn.functional.gelu, nn.functional.silu, torch.tanh,
                         torch.sigmoid, nn.functional.leaky_relu}
ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
# oneDNN's grouped 1×1 convolution is slow for few outputs per group: a Linear with fewer
# outputs per point than this (a classifier head) gets zero rows up to it, despite the extra
# FLOPs (bench/RESULTS.md, "Landscape", "Variants").
SMALL_LINEAR = 32


class FoldedForward:
    """The traced model evaluated at G weight points at once (see the module docstring).

    ``handlers`` maps extra module types to functions ``(folded, module, input)`` that run them
    (the slice evaluator's cached first layer): they return the ``Folded`` output, or a
    ``(Linear or Conv2d, weight [G, …], bias [G, …])`` to run as that layer. ``batchnorms`` names module types
    that behave like BatchNorm with a ``collect`` attribute: ``None`` normalises with running
    statistics, a list records ``(mean [G, C], unbiased var [G, C])`` and normalises with them.
    """

    def __init__(self, model: nn.Module, handlers: Mapping[type, Callable] | None = None,
                 batchnorms: tuple[type, ...] = ()) -> None:
        self.model = model
        self.handlers = dict(handlers or {})
        self.batchnorms = BATCHNORMS + tuple(batchnorms)
        leaf_types = tuple(self.handlers) + tuple(batchnorms)

        class Tracer(torch.fx.Tracer):
            def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
                return isinstance(m, leaf_types) or super().is_leaf_module(m, qualified_name)

        try:
            self.graph = Tracer().trace(model)
        except Exception as exc:  # data-dependent control flow, custom tracers (transformers)
            raise Unsupported(f"torch.fx cannot trace this model: {exc}") from exc
        for node in self.graph.nodes:
            self._check(node)
        # ReLU then max-pooling equals max-pooling then ReLU (ReLU is monotone), on a quarter
        # of the values for a 2×2 pool: such ReLUs are deferred to after their pool.
        self._deferred_relus = {n for n in self.graph.nodes if self._is_relu(n) and len(n.users) == 1
                                and isinstance(self._module(next(iter(n.users))), (nn.MaxPool2d, nn.AdaptiveMaxPool2d))}
        self._relu_after_pool = {next(iter(n.users)) for n in self._deferred_relus}
        # A Flatten read only by a Linear is left undone: the Linear takes the channels-last
        # activation and permutes its own (small) weights to (h, w, c) order instead.
        self._flatten_into_linear = {n for n in self.graph.nodes if self._is_flatten(n) and len(n.users) == 1
                                     and isinstance(self._module(next(iter(n.users))), nn.Linear)}
        self._params: Mapping[str, torch.Tensor] = {}
        self._fixed: Mapping[str, torch.Tensor] = {}
        self._points = 0
        # Per chunk of points, each layer's weights with any BatchNorm folded in: computed at the
        # first batch of samples, reused for the others.
        self._layers: dict[torch.fx.Node, tuple] = {}

    # ---- what is supported ---------------------------------------------------------------

    def _module(self, node: torch.fx.Node) -> nn.Module | None:
        return self.model.get_submodule(node.target) if node.op == "call_module" else None

    def _check(self, node: torch.fx.Node) -> None:
        if node.op in ("placeholder", "output"):
            return
        module = self._module(node)
        if module is not None:
            if isinstance(module, tuple(self.handlers) + self.batchnorms + ELEMENTWISE + (nn.Linear,)):
                return
            if isinstance(module, nn.Flatten) and (module.start_dim, module.end_dim) == (1, -1):
                return
            if isinstance(module, nn.Conv2d) and module.padding_mode == "zeros" and isinstance(module.padding, tuple):
                return
            if isinstance(module, POOLS) and not getattr(module, "return_indices", False):
                return
            raise Unsupported(f"{node.target}: {type(module).__name__} is not supported")
        if node.op == "call_function" and (node.target in ELEMENTWISE_FUNCTIONS or node.target in ADD_FUNCTIONS
                                           or node.target is torch.flatten):
            return
        if node.op == "call_method" and node.target in ("flatten", "relu"):
            return
        raise Unsupported(f"{node.op} {node.target} is not supported")

    def _is_flatten(self, node: torch.fx.Node) -> bool:
        return (isinstance(self._module(node), nn.Flatten) or (node.op == "call_function" and node.target is torch.flatten)
                or (node.op == "call_method" and node.target == "flatten"))

    def _is_relu(self, node: torch.fx.Node) -> bool:
        module = self._module(node)
        return (type(module) is nn.ReLU or (node.op == "call_function" and node.target in (torch.relu, nn.functional.relu)
                                            and not node.kwargs) or (node.op == "call_method" and node.target == "relu"))

    def _eval_batchnorm_after(self, node: torch.fx.Node) -> torch.fx.Node | None:
        """The BatchNorm that is this node's only reader, if it normalises with running statistics."""
        if len(node.users) != 1:
            return None
        (user,) = node.users
        module = self._module(user)
        if isinstance(module, self.batchnorms) and getattr(module, "collect", None) is None:
            return user
        return None

    # ---- evaluation ------------------------------------------------------------------------

    def __call__(self, params: Mapping[str, torch.Tensor], fixed: Mapping[str, torch.Tensor],
                 x: torch.Tensor, points: int | None = None) -> torch.Tensor:
        """Logits ``[G, N, classes]`` at G points: ``params`` hold ``[G, *shape]`` tensors.

        Tensors not in ``params`` come from ``fixed`` (one value for every point), then from
        the model itself.
        """
        points = points or len(next(iter(params.values())))
        if params is not self._params or fixed is not self._fixed or points != self._points:
            # New points: forget the prepared layer weights (holding ``params`` keeps its id unique).
            self._params, self._fixed, self._points, self._layers = params, fixed, points, {}
        values: dict[torch.fx.Node, object] = {}
        waiting = {node: len(node.users) for node in self.graph.nodes}
        folded_in: set[torch.fx.Node] = set()  # BatchNorms already applied by the layer before
        for node in self.graph.nodes:
            if node.op == "placeholder":
                values[node] = x
                continue
            if node.op == "output":
                out = values[node.args[0]]
                break
            args = [values[a] if isinstance(a, torch.fx.Node) else a for a in node.args]
            deferred_flatten = node in self._flatten_into_linear and isinstance(args[0], Folded)
            if node in folded_in or node in self._deferred_relus or deferred_flatten:
                # a BatchNorm folded into its layer, a ReLU moved after its pool, a Flatten left to its Linear
                values[node] = args[0]
            else:
                values[node] = self._run(node, args, folded_in)
                if node in self._relu_after_pool and isinstance(values[node], Folded):
                    values[node].tensor.relu_()  # the pool's fresh output
                elif node in self._relu_after_pool:
                    values[node] = values[node].relu()
            for a in node.all_input_nodes:  # free activations as soon as nothing needs them
                waiting[a] -= 1
                if waiting[a] == 0:
                    del values[a]
        if not isinstance(out, Folded) or out.tensor.dim() != 2:
            raise Unsupported("the model's output must be [batch, classes] and depend on the weights")
        return out.tensor.view(out.tensor.shape[0], points, -1).transpose(0, 1).contiguous()

    def release(self) -> None:
        """Drop the last chunk's weights (kept between calls for its other sample batches)."""
        self._params, self._fixed, self._points, self._layers = {}, {}, 0, {}

    def weight(self, name: str) -> torch.Tensor | None:
        """The tensor ``name`` at each point, ``[G, *shape]`` (one value repeated if it is fixed)."""
        if name in self._params:
            return self._params[name]
        value = self._fixed.get(name)
        if value is None:
            module, _, attr = name.rpartition(".")
            value = getattr(self.model.get_submodule(module), attr, None)
        if value is None:
            return None
        return value.unsqueeze(0).expand(self._points, *value.shape)

    def fold(self, value: torch.Tensor | Folded) -> Folded:
        """A point-independent activation as the same activation at every point."""
        return repeat_points(value, self._points)

    def _run(self, node: torch.fx.Node, args: list, folded_in: set[torch.fx.Node]):
        module = self._module(node)
        if module is not None:
            if node in self._layers:  # weights already prepared for this chunk of points
                return self._apply(*self._layers[node], args[0], folded_in)
            layer = None
            for kind, handler in self.handlers.items():
                if isinstance(module, kind):
                    result = handler(self, module, args[0])
                    if isinstance(result, Folded):
                        return result
                    layer, weight, bias = result
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                layer = module
                weight, bias = self.weight(f"{node.target}.weight"), self.weight(f"{node.target}.bias")
            if layer is not None:
                batchnorm = self._eval_batchnorm_after(node)
                if batchnorm is not None:
                    weight, bias = self._fold_batchnorm(batchnorm.target, weight, bias)
                value = args[0]
                if isinstance(layer, nn.Linear) and isinstance(value, Folded) and value.tensor.dim() == 4:
                    # After a deferred Flatten: each point's weights in the (h, w, c) order of memory.
                    c, h, w = value.tensor.shape[1] // value.points, *value.tensor.shape[2:]
                    weight = weight.unflatten(-1, (c, h, w)).permute(0, 1, 3, 4, 2).flatten(2)
                elif isinstance(layer, nn.Linear) and isinstance(value, Folded) and weight.shape[1] < SMALL_LINEAR:
                    # A classifier head: zero rows up to SMALL_LINEAR per point (sliced off after).
                    pad = SMALL_LINEAR - weight.shape[1]
                    weight = nn.functional.pad(weight, (0, 0, 0, pad))
                    bias = None if bias is None else nn.functional.pad(bias, (0, pad))
                self._layers[node] = (layer, *layer_filters(layer, weight, bias), batchnorm)
                return self._apply(*self._layers[node], value, folded_in)
            if isinstance(module, self.batchnorms):
                return self._batchnorm(node.target, module, args[0])
            if isinstance(module, nn.Flatten):
                return folded_flatten(args[0])
            return self._elementwise(node, module, args)
        if node.target is torch.flatten or node.target == "flatten":
            if tuple(args[1:]) not in ((1,), (1, -1)) or node.kwargs:
                raise Unsupported("flatten must flatten all but the batch dimension")
            return folded_flatten(args[0])
        if node.target in ADD_FUNCTIONS:
            a, b = args
            if isinstance(a, Folded) or isinstance(b, Folded):
                a, b = self.fold(a), self.fold(b)
                return Folded(a.tensor + b.tensor, a.points)
            return a + b
        function = torch.relu if node.target == "relu" else node.target
        return self._elementwise(node, function, args)

    # ---- layers (the kernels are in soup_core.landscape.folded_layers) ----------------------

    def _apply(self, layer: nn.Module, filters: torch.Tensor, bias: torch.Tensor | None,
               batchnorm: torch.fx.Node | None, value, folded_in: set[torch.fx.Node]) -> Folded:
        if batchnorm is not None:
            folded_in.add(batchnorm)
        if isinstance(layer, nn.Linear):
            return folded_linear(value, filters, bias, self._points, layer.out_features)
        return folded_conv2d(layer, value, filters, bias, self._points)

    def _batchnorm_affine(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval-mode BatchNorm as y = x·scale + shift, each [G, C]."""
        module = self.model.get_submodule(name)
        mean, var = self.weight(f"{name}.running_mean"), self.weight(f"{name}.running_var")
        scale = torch.rsqrt(var + module.eps)
        weight, bias = self.weight(f"{name}.weight"), self.weight(f"{name}.bias")
        if weight is not None:
            scale = scale * weight
        shift = -mean * scale
        return scale, shift if bias is None else shift + bias

    def _fold_batchnorm(self, name: str, weight: torch.Tensor, bias: torch.Tensor | None):
        """A layer's weights with the eval-mode BatchNorm after it folded in (per output channel)."""
        scale, shift = self._batchnorm_affine(name)
        weight = weight * scale.view(*scale.shape, *[1] * (weight.dim() - 2))
        return weight, shift if bias is None else bias * scale + shift

    def _batchnorm(self, name: str, module: nn.Module, value) -> Folded:
        value = self.fold(value)
        t = value.tensor
        collect = getattr(module, "collect", None)
        if collect is None:
            scale, shift = self._batchnorm_affine(name)
            shape = (1, -1) + (1,) * (t.dim() - 2)
            return Folded(torch.addcmul(shift.reshape(shape), t, scale.reshape(shape)), value.points)
        # update_bn's step with momentum 1: the fused kernel normalises with the batch
        # statistics and leaves the batch mean and unbiased variance in the buffers.
        weight, bias = self.weight(f"{name}.weight"), self.weight(f"{name}.bias")
        mean = torch.zeros(t.shape[1], device=t.device)
        var = torch.ones(t.shape[1], device=t.device)
        y = nn.functional.batch_norm(t, mean, var, None if weight is None else weight.reshape(-1),
                                     None if bias is None else bias.reshape(-1), True, 1.0, module.eps)
        collect.append((mean.view(value.points, -1), var.view(value.points, -1)))
        return Folded(y, value.points)

    def _elementwise(self, node: torch.fx.Node, function: Callable, args: list):
        first = args[0]
        if not isinstance(first, Folded):
            return function(*args, **node.kwargs)
        # A ReLU may overwrite a layer's fresh output when nothing else reads it (saves a pass).
        if function in (torch.relu, nn.functional.relu) or type(function) is nn.ReLU:
            source = node.all_input_nodes[0]
            fresh = isinstance(self._module(source), (nn.Linear, nn.Conv2d, *self.handlers, *self.batchnorms))
            if fresh and len(source.users) == 1:
                return Folded(first.tensor.relu_(), first.points)
        return Folded(function(first.tensor, *args[1:], **node.kwargs), first.points)


__all__ = ["Folded", "FoldedForward", "Unsupported"]
