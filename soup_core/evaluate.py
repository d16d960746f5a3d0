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
import math
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
# A label that is not scored: a language model's padding, and each sequence's last token (nothing follows it).
IGNORE_INDEX = -100


@dataclass(frozen=True)
class Metrics:
    """Accuracy (fraction), mean cross-entropy, and expected calibration error (15 bins); for a
    language model also perplexity, exp(loss) (its accuracy is next-token accuracy)."""

    accuracy: float
    loss: float
    ece: float
    perplexity: float | None = None

    def to_dict(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class Split:
    """Inputs and integer labels of one named split, held in memory.

    Labels ``[N]`` are one class per sample; labels ``[N, L]`` are a language model's next tokens
    (``labels[i, t]`` is the token after position ``t``, :data:`IGNORE_INDEX` where none is scored),
    and every scored token is one prediction: metrics, significance tests and ensembles count tokens.
    """

    inputs: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def predictions(self) -> int:
        """How many predictions the split scores: samples, or scored tokens."""
        return predictions(self.labels)


def predictions(labels: torch.Tensor) -> int:
    """Scored predictions in a batch's labels: one per sample, or one per token not :data:`IGNORE_INDEX`."""
    return len(labels) if labels.dim() == 1 else int((labels != IGNORE_INDEX).sum())


def scored(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch's predictions as ``[predictions, classes]`` logits and ``[predictions]`` labels.

    Classification passes through; next-token logits ``[N, L, V]`` keep the positions whose label is
    not :data:`IGNORE_INDEX` (padding never counts), in order, sequence by sequence::

        >>> logits = torch.arange(12.).reshape(1, 3, 4)
        >>> kept, labels = scored(logits, torch.tensor([[2, 0, IGNORE_INDEX]]))
        >>> kept.tolist(), labels.tolist()
        ([[0.0, 1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0]], [2, 0])
    """
    if labels.dim() == 1:
        return logits, labels
    keep = labels != IGNORE_INDEX
    return logits[keep], labels[keep]


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


def as_logits(output: object, labels: torch.Tensor) -> torch.Tensor:
    """A model's output as logits shaped like ``labels`` plus classes (``[samples, classes]``, or a
    language model's ``[samples, length, vocabulary]``): a tensor, or an object with ``.logits`` (what
    Hugging Face models return); anything else is one clear error (the model contract)."""
    logits = getattr(output, "logits", output)
    if not isinstance(logits, torch.Tensor) or logits.shape[:-1] != labels.shape or logits.dim() < 2:
        shape = list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        wanted = "[samples, classes]" if labels.dim() == 1 else "[samples, length, vocabulary]"
        raise ModelError(f"the model returned {shape} for labels {list(labels.shape)}; a zoo's model must return "
                         f"logits {wanted} (a tensor, or an object with .logits)")
    return logits


def metrics_from_logits(logits: torch.Tensor, labels: torch.Tensor, *, perplexity: bool = False) -> Metrics:
    """Accuracy, mean cross-entropy and ECE of one split's logits (float64 reductions); with
    ``perplexity`` (next-token predictions) also exp(loss)."""
    logits = logits.to(torch.float64)
    loss = torch.nn.functional.cross_entropy(logits, labels, reduction="mean")
    accuracy = (logits.argmax(dim=1) == labels).to(torch.float64).mean()
    return Metrics(float(accuracy), float(loss), expected_calibration_error(logits.softmax(dim=1), labels),
                   math.exp(float(loss)) if perplexity else None)


def ensemble_logits(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """The logit ensemble of the paper (§3, after Gontijo-Lopes et al. 2022): mean of logits."""
    return torch.stack([t.to(torch.float64) for t in logits]).mean(dim=0)


class Evaluator:
    """A model factory plus named splits; scores state dicts without mutating them.

    ``device`` defaults to CUDA when available. Results for the same content are cached
    (LRU, keyed by :func:`~soup_core.state.state_dict_digest`, at most ``cache_size`` entries and
    ``cache_bytes`` of logits: a language model's are tokens × vocabulary each), so re-scoring an
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
        cache_bytes: int = 1 << 30,
        train: Split | None = None,
        info: Mapping[str, object] | None = None,
        precision: str = "fp32",
    ) -> None:
        if VAL not in splits:
            raise SoupError(f"an evaluator needs a held-out {VAL!r} split to drive recipe choices; "
                            f"got splits {list(splits)}")
        empty = next((name for name, split in splits.items() if len(split.labels) == 0), None)
        if empty is not None:
            raise SoupError(f"split {empty!r} holds no samples: an empty split has no accuracy; give it some")
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
        self._cache_size, self._cache_bytes, self._cached_bytes = cache_size, cache_bytes, 0

    def model_copy(self) -> torch.nn.Module:
        """A private deep copy of the model (never mid-call with someone else's weights)."""
        with self._lock:
            return copy.deepcopy(self.model)

    @property
    def unit(self) -> str:
        """What one prediction is, in words a user reads ("images", "rows", "tokens"…): the ``unit``
        its ``info`` gives, else tokens for next-token labels and samples for the rest."""
        if "unit" in self.info:
            return str(self.info["unit"])
        return "tokens" if any(s.labels.dim() == 2 for s in self.splits.values()) else "samples"

    @property
    def split_names(self) -> tuple[str, ...]:
        return tuple(self.splits)

    @property
    def shift_names(self) -> tuple[str, ...]:
        """Splits that are neither ``val`` nor ``test``: the distribution shifts."""
        return tuple(name for name in self.splits if name not in (VAL, TEST))

    def logits(self, state: Mapping[str, torch.Tensor], split: str = VAL, *, digest: str | None = None,
               cache: bool = True) -> torch.Tensor:
        """Logits of ``state`` on ``split`` (float32, on the CPU), cached by content: one row per
        prediction (sample, or scored token: see :func:`scored`), in the order of :meth:`labels`.

        ``cache=False`` skips hashing and caching: for one-off candidates (greedy/pruned steps)
        that will never be scored again.
        """
        if split not in self.splits:
            raise SoupError(f"unknown split {split!r}; this evaluator has {list(self.splits)}")
        key = (digest or state_dict_digest(state), split, self.precision) if cache else None
        with self._lock:  # app sessions share the cache (threads)
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        params = {k: v.to(self.device) for k, v in state.items()}  # no copy when already there
        # functional_call swaps the shared model's tensors for the duration of the call; the lock
        # keeps two app sessions (threads) from seeing each other's weights.
        with self._lock, torch.no_grad(), precision(self.precision, self.device):
            outputs = [scored(as_logits(self._forward(params, x, split), y), y)[0].float().cpu()
                       for x, y in self.batches(split)]
        result = torch.cat(outputs)
        if key is None:
            return result
        with self._lock:
            if key not in self._cache:  # another thread may have scored the same weights meanwhile
                self._cache[key] = result
                self._cached_bytes += result.nbytes
            while len(self._cache) > 1 and (len(self._cache) > self._cache_size
                                            or self._cached_bytes > self._cache_bytes):
                self._cached_bytes -= self._cache.popitem(last=False)[1].nbytes
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
        return {name: self.metrics(self.logits(state, name, digest=digest), name) for name in (splits or self.split_names)}

    def metrics(self, logits: torch.Tensor, split: str) -> Metrics:
        """The metrics of logits on ``split`` (:meth:`logits`' rows; perplexity for next tokens)."""
        return metrics_from_logits(logits, self.labels(split), perplexity=self.splits[split].labels.dim() == 2)

    def accuracy(self, state: Mapping[str, torch.Tensor], split: str = VAL, *, cache: bool = True) -> float:
        """Accuracy alone (what greedy and pruned soups compare), without loss or ECE."""
        predicted = self.logits(state, split, cache=cache).argmax(dim=1)
        return float((predicted == self.labels(split)).sum()) / len(predicted)

    def labels(self, split: str) -> torch.Tensor:
        """One label per prediction of :meth:`logits` (a language model's scored tokens, flattened)."""
        labels = self.splits[split].labels
        return (labels if labels.dim() == 1 else labels[labels != IGNORE_INDEX]).cpu()

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

