"""Scoring state dicts: the Evaluator of the reproduction paper (§2.4), metrics, a metric cache.

An :class:`Evaluator` is a model factory plus named splits. ``val`` is held out and drives
every choice a recipe makes (greedy, pruned, learned); ``test`` is the in-distribution report;
every other split is a distribution shift (out-of-distribution report). Keeping the choice
split apart from the report splits is what keeps soups honest (reproduction §2.4).

Weights are applied with ``torch.func.functional_call``: one model is built once and every
state dict is evaluated through it, without ``load_state_dict`` copies.

Example::

    >>> import torch
    >>> from soup_core.evaluate import Evaluator, Split
    >>> X, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
    >>> ev = Evaluator(lambda: torch.nn.Linear(4, 3), {"val": Split(X, y)})
    >>> m = ev.evaluate(torch.nn.Linear(4, 3).state_dict())["val"]
    >>> 0.0 <= m.accuracy <= 1.0
    True
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from torch.func import functional_call

from soup_core.errors import ModelError, SoupError
from soup_core.precision import check_precision, precision
from soup_core.state import state_dict_digest

ECE_BINS = 15
VAL, TEST = "val", "test"


@dataclass(frozen=True)
class Metrics:
    """Accuracy (fraction), mean cross-entropy, and expected calibration error (15 bins)."""

    accuracy: float
    loss: float
    ece: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class Split:
    """Inputs and integer labels of one named split, held in memory."""

    inputs: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """ECE with equal-width confidence bins (Guo et al. 2017): Σ_b |B_b|/n · |acc_b − conf_b|."""
    confidence, predicted = probs.max(dim=1)
    correct = (predicted == labels).to(torch.float64)
    confidence = confidence.to(torch.float64)
    # Bin b holds confidences in (b/B, (b+1)/B]; confidence 0 cannot occur for a softmax.
    index = torch.clamp(torch.ceil(confidence * bins).long() - 1, 0, bins - 1)
    acc = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, correct)
    conf = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, confidence)
    return float((acc - conf).abs().sum() / len(labels))


def as_logits(output: object, samples: int) -> torch.Tensor:
    """A model's output as ``[samples, classes]`` logits: a tensor, or an object with ``.logits``
    (what Hugging Face models return); anything else is one clear error (the model contract)."""
    logits = getattr(output, "logits", output)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or len(logits) != samples:
        shape = list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ModelError(f"the model returned {shape} for {samples} inputs; a zoo's model must return logits "
                         "[samples, classes] (a tensor, or an object with .logits)")
    return logits


def metrics_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> Metrics:
    """Accuracy, mean cross-entropy and ECE of one split's logits (float64 reductions)."""
    logits = logits.to(torch.float64)
    loss = torch.nn.functional.cross_entropy(logits, labels, reduction="mean")
    accuracy = (logits.argmax(dim=1) == labels).to(torch.float64).mean()
    return Metrics(float(accuracy), float(loss), expected_calibration_error(logits.softmax(dim=1), labels))


def ensemble_logits(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """The logit ensemble of the paper (§3, after Gontijo-Lopes et al. 2022): mean of logits."""
    return torch.stack([t.to(torch.float64) for t in logits]).mean(dim=0)


class Evaluator:
    """A model factory plus named splits; scores state dicts without mutating them.

    ``device`` defaults to CUDA when available. Results for the same content are cached
    (LRU, keyed by :func:`~soup_core.state.state_dict_digest`), so re-scoring an
    ingredient after a toggle costs one hash, not one evaluation.
    """

    def __init__(
        self,
        model_factory: Callable[[], torch.nn.Module],
        splits: Mapping[str, Split],
        *,
        batch_size: int = 1024,
        device: str | torch.device | None = None,
        cache_size: int = 512,
        train: Split | None = None,
        info: Mapping[str, object] | None = None,
        precision: str = "fp32",
    ) -> None:
        if VAL not in splits:
            raise SoupError(f"an evaluator needs a held-out {VAL!r} split to drive recipe choices; "
                            f"got splits {list(splits)}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model_factory = model_factory
        model = model_factory()
        if not isinstance(model, torch.nn.Module):
            raise SoupError(f"the model factory returned {type(model).__name__}, not a torch.nn.Module")
        self.model = model.to(self.device).eval()
        self.splits = {name: Split(s.inputs.to(self.device), s.labels.to(self.device).long())
                       for name, s in splits.items()}
        # Training data is never scored; it is there for BatchNorm statistics (landscapes).
        self.train = None if train is None else Split(train.inputs.to(self.device), train.labels.to(self.device))
        self.batch_size = batch_size
        # fp32 (exact), tf32 or bf16 (soup_core.precision): every forward pass here, and the
        # default of the landscape engines built on this evaluator. Part of the cache key.
        self.precision = check_precision(precision)
        self.info = dict(info or {})  # e.g. split seeds, recorded in export provenance
        self._cache: OrderedDict[tuple[str, str, str], torch.Tensor] = OrderedDict()
        self._lock = threading.RLock()
        self._cache_size = cache_size

    def model_copy(self) -> torch.nn.Module:
        """A private deep copy of the model (never mid-call with someone else's weights)."""
        with self._lock:
            return copy.deepcopy(self.model)

    @property
    def split_names(self) -> tuple[str, ...]:
        return tuple(self.splits)

    @property
    def shift_names(self) -> tuple[str, ...]:
        """Splits that are neither ``val`` nor ``test``: the distribution shifts."""
        return tuple(name for name in self.splits if name not in (VAL, TEST))

    def logits(self, state: Mapping[str, torch.Tensor], split: str = VAL, *, digest: str | None = None,
               cache: bool = True) -> torch.Tensor:
        """Logits of ``state`` on ``split`` (float32, on the CPU), cached by content.

        ``cache=False`` skips hashing and caching: for one-off candidates (greedy/pruned steps)
        that will never be scored again.
        """
        if split not in self.splits:
            raise SoupError(f"unknown split {split!r}; this evaluator has {list(self.splits)}")
        key = (digest or state_dict_digest(state), split, self.precision) if cache else None
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        params = {k: v.to(self.device) for k, v in state.items()}  # no copy when already there
        # functional_call swaps the shared model's tensors for the duration of the call; the lock
        # keeps two app sessions (threads) from seeing each other's weights.
        with self._lock, torch.no_grad(), precision(self.precision, self.device):
            outputs = [as_logits(self._forward(params, x, split), len(x)) for x, _ in self.batches(split)]
        result = torch.cat(outputs).float().cpu()
        if key is None:
            return result
        self._cache[key] = result
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return result

    def _forward(self, params: Mapping[str, torch.Tensor], x: torch.Tensor, split: str):
        """The model on one batch; a model that cannot take the data's inputs is one clear error."""
        try:
            return functional_call(self.model, params, (x,))
        except (SoupError, torch.OutOfMemoryError):  # ours, or memory (the landscape engine sizes chunks by it)
            raise
        except (RuntimeError, ValueError, TypeError, IndexError) as exc:
            text = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            raise ModelError(f"the model cannot take {split!r}'s inputs of shape {list(x.shape)} ({text}); check "
                             "the data's size and channels against the model (and that the checkpoints fit it)") from None

    def evaluate(self, state: Mapping[str, torch.Tensor], splits: Sequence[str] | None = None) -> dict[str, Metrics]:
        """Metrics of ``state`` on each of ``splits`` (default: all)."""
        digest = state_dict_digest(state)
        return {name: metrics_from_logits(self.logits(state, name, digest=digest), self.labels(name))
                for name in (splits or self.split_names)}

    def accuracy(self, state: Mapping[str, torch.Tensor], split: str = VAL, *, cache: bool = True) -> float:
        """Accuracy alone (what greedy and pruned soups compare), without loss or ECE."""
        predicted = self.logits(state, split, cache=cache).argmax(dim=1)
        return float((predicted == self.labels(split)).sum()) / len(predicted)

    def labels(self, split: str) -> torch.Tensor:
        return self.splits[split].labels.cpu()

    def batches(self, split: str, batch_size: int | None = None, *, shuffle: bool = False,
                seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Mini-batches of a split (shuffled with a seeded generator for learned soups)."""
        data = self.splits[split]
        size = batch_size or self.batch_size
        order = (torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
                 if shuffle else torch.arange(len(data))).to(self.device)
        for start in range(0, len(data), size):
            idx = order[start:start + size]
            yield data.inputs[idx], data.labels[idx]


def metrics_to_json(metrics: Mapping[str, Metrics]) -> dict[str, dict[str, float]]:
    """The stable JSON shape: split name -> {"accuracy", "loss", "ece"}."""
    return {name: m.to_dict() for name, m in metrics.items()}


def shift_average(metrics: Mapping[str, Metrics], shifts: Sequence[str]) -> float | None:
    """Mean accuracy over the distribution-shift splits (the paper's "Avg shifts")."""
    values = [metrics[s].accuracy for s in shifts if s in metrics]
    return sum(values) / len(values) if values else None

