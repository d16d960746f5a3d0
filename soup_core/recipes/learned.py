"""Learned soup — paper Appendix I (and Table 3's "learned soup" / "by layer" rows).

Mixing weights α = softmax(z) (positive, summing to one) and an output temperature β are
learned by minimising Σ_j ℓ(β · f(x_j; Σ_i α_i θ_i), y_j) on the held-out val split with AdamW
at a constant learning rate of 0.1 for a few epochs (default 3), as the paper does. The
by-layer variant learns a separate α for every layer (the tensors sharing a module prefix,
e.g. a weight and its bias). z starts at 0, i.e. at the uniform soup.

All ingredients are held in memory at once (k × P floats): the paper notes this is what
limits learned soups on large networks. β rescales logits only; it changes no weight and is
reported in ``extras["temperature"]``, not applied to the exported soup.
"""

from __future__ import annotations

import torch
from torch.func import functional_call

from soup_core.evaluate import Evaluator, as_logits, scored
from soup_core.params import ACCUMULATE_DTYPE
from soup_core.recipes.base import Brew, Ingredients, TraceStep
from soup_core.recipes.parameters import Params
from soup_core.state import StateDict, is_float, tied_aliases


def layer_of(key: str) -> str:
    """The layer a tensor belongs to: its module path (``body.0.weight`` -> ``body.0``)."""
    return key.rsplit(".", 1)[0] if "." in key else key


def learned_soup(ingredients: Ingredients, evaluator: Evaluator, base, params: Params, *,
                 by_layer: bool = False) -> Brew:
    names = tuple(ingredients)
    states = [ingredients[n] for n in names]
    reference = states[0]
    aliases = tied_aliases(reference)
    keys = [k for k, t in reference.items() if is_float(t) and k not in aliases]
    layers = sorted({layer_of(k) for k in keys}) if by_layer else ["all"]
    row = {k: layers.index(layer_of(k)) if by_layer else 0 for k in keys}
    device = evaluator.device
    stacked = {k: torch.stack([s[k] for s in states]).to(device, torch.float32) for k in keys}
    model = evaluator.model_copy()  # private: the evaluator's model may serve other app sessions
    buffers = {name for name, _ in model.named_buffers()}
    fixed = {k: t.to(device) for k, t in reference.items() if k not in stacked and k not in aliases}

    logits = torch.zeros(len(layers), len(names), device=device, requires_grad=True)
    temperature = torch.ones((), device=device, requires_grad=True)
    optimiser = torch.optim.AdamW([logits, temperature], lr=params.learning_rate)
    trace = []
    for epoch in range(params.epochs):
        for x, y in evaluator.batches(params.val_split, params.batch_size, shuffle=True,
                                      seed=params.seed + epoch):
            alpha = logits.softmax(dim=1)
            # Buffers (BatchNorm running statistics) follow the mix but carry no gradient.
            mixed = {k: torch.tensordot((alpha.detach() if k in buffers else alpha)[row[k]], w, dims=1)
                     for k, w in stacked.items()}
            mixed.update({a: mixed[t] for a, t in aliases.items()})
            output = functional_call(model, {**fixed, **mixed}, (x,))
            loss = torch.nn.functional.cross_entropy(*scored(temperature * as_logits(output, y), y))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        state = _mix(states, logits.detach().cpu().to(ACCUMULATE_DTYPE).softmax(dim=1), row, reference, aliases)
        trace.append(TraceStep(f"epoch {epoch + 1}", "train",
                               evaluator.accuracy(state, params.val_split), True, names))
    alpha = logits.detach().cpu().to(ACCUMULATE_DTYPE).softmax(dim=1)
    state = _mix(states, alpha, row, reference, aliases)
    extras = {"temperature": float(temperature.detach())}
    if by_layer:
        extras["layer_weights"] = {layer: alpha[i].tolist() for i, layer in enumerate(layers)}
    return Brew(names, state, trace, weights=tuple(alpha.mean(dim=0).tolist()), extras=extras)


def learned_soup_by_layer(ingredients: Ingredients, evaluator: Evaluator, base, params: Params) -> Brew:
    return learned_soup(ingredients, evaluator, base, params, by_layer=True)


def _mix(states, alpha: torch.Tensor, row: dict[str, int], reference, aliases) -> StateDict:
    """Σ_i α_{layer(k), i} θ_i[k] in float64; integer buffers from the largest global weight."""
    alpha = alpha.to(ACCUMULATE_DTYPE)
    top = states[int(alpha.mean(dim=0).argmax())]
    out: StateDict = {}
    for key, tensor in reference.items():
        if key in aliases:
            continue
        if key in row:
            total = torch.zeros(tensor.shape, dtype=ACCUMULATE_DTYPE)
            for w, state in zip(alpha[row[key]].tolist(), states):
                total.add_(state[key].to(ACCUMULATE_DTYPE), alpha=w)
            out[key] = total.to(tensor.dtype)
        else:
            out[key] = top[key].clone()
    out.update({a: out[t] for a, t in aliases.items()})
    return out
