"""The knobs recipes declare (after mergekit's ``ConfigParameterDef``): name, type, default, help.

A recipe lists the parameters it reads; :class:`~soup_core.recipes.base.Recipe` checks what it
is given against that list, and the ``soup make`` flags and the app's controls are derived
from the same declarations, so a knob has one name, one default and one help text.

>>> from soup_core.recipes.parameters import PASSES
>>> PASSES.check(2)
2
>>> PASSES.check(0)
Traceback (most recent call last):
...
soup_core.errors.RecipeError: passes must be at least 1, not 0
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from soup_core.errors import RecipeError
from soup_core.memory import SUM_PRECISIONS, ByteSize

ON_VAL = "val"  # a parameter's value that asks for it to be chosen on the val split (see :attr:`Parameter.val_grid`)


def grid(low: float, high: float, step: float) -> tuple[float, ...]:
    """``low, low + step, …, high`` as the decimals they are written as (0.1, not 0.30000000000000004)."""
    count = round((high - low) / step)
    return tuple(round(low + i * step, 10) for i in range(count + 1))


@dataclass(frozen=True)
class Parameter:
    """One declared knob. ``default=None`` with ``type`` int means "no limit"."""

    name: str
    type: type
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None  # every number is bounded where work grows with it (passes, epochs, seeds)
    reference: str = ""
    default_text: str = ""  # how the default reads in help, where its value says nothing ("")
    in_app: bool = True  # False: a resource of the machine running the recipe, set on the command line
    val_grid: tuple[float, ...] | None = None  # the value may be "val": chosen on the val split from this grid

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def check(self, value: Any) -> Any:
        """``value`` converted to the declared type, or a :class:`RecipeError` saying why not."""
        if value is None and self.default is None:
            return None
        if self.val_grid is not None and isinstance(value, str) and value.strip().lower() == ON_VAL:
            return ON_VAL
        try:
            converted = switch(value) if self.type is bool else self.type(value)
        except RecipeError:  # the type's own message says what is wrong
            raise
        except (TypeError, ValueError):
            raise RecipeError(f"{self.name} must be a {self.type.__name__}, not {value!r}") from None
        if isinstance(converted, float) and not math.isfinite(converted):
            raise RecipeError(f"{self.name} must be a finite number, not {value!r}")
        if self.choices is not None and converted not in self.choices:
            raise RecipeError(f"{self.name} must be one of {', '.join(self.choices)}, not {value!r}")
        if self.minimum is not None and converted < self.minimum:
            raise RecipeError(f"{self.name} must be at least {self.minimum:g}, not {value!r}")
        if self.maximum is not None and converted > self.maximum:
            most = f"{self.maximum:g}" if isinstance(self.maximum, float) else f"{self.maximum}"
            raise RecipeError(f"{self.name} must be at most {most}, not {value!r}")
        return converted


def switch(value: Any) -> bool:
    """A yes/no parameter from ``True``/``False`` or their spellings (``true``, ``false``, ``1``, ``0``)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise ValueError(value)


class Params(Mapping[str, Any]):
    """A recipe's resolved parameters: every declared one, given or default; read as attributes."""

    def __init__(self, values: Mapping[str, Any]) -> None:
        self._values = dict(values)

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"no parameter {name!r} (declared: {', '.join(self._values) or 'none'})") from None

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Params({self._values!r})"


ORDER = Parameter("order", str, "sorted",
                  "order in which candidates are tried: by decreasing val accuracy (sorted, so the soup is "
                  "never below the best model on val) or seeded random", choices=("sorted", "random"),
                  reference="Wortsman et al. 2022, Recipe 1")
SEED = Parameter("seed", int, 0, "seed of the random order, the learned soup's batches and DARE's drops",
                 minimum=0, maximum=2**63 - 1)
TIE = Parameter("tie", str, "ge",
                "a candidate that leaves val accuracy unchanged: ge keeps it (as Recipe 1 and Algorithm 2 are "
                "written), gt rejects it (as the official greedy-soup code compares)", choices=("ge", "gt"))
TIE_ORDER = Parameter("tie_order", str, "manifest",
                      "order among candidates with equal val accuracy (sorted order only): manifest order, or "
                      "the official greedy-soup code's (sorted ascending, then reversed: later entries first)",
                      choices=("manifest", "official"), reference="github.com/mlfoundations/model-soups")
PASSES = Parameter("passes", int, 1, "passes over the candidates; rejected ones are offered again (a pass that "
                   "changes nothing ends the recipe)", minimum=1, maximum=100,
                   reference="Dansereau et al., Algorithm 2")
MAX_INGREDIENTS = Parameter("max_ingredients", int, None, "stop the soup growing past this many ingredients",
                            minimum=1)


class HeldOutSplit(str):
    """The split a recipe chooses on: any but test (and the zoo's distribution shifts: ``Recipe.make``),
    which report a choice and would no longer measure it if they made it (Wortsman et al. 2022, §3:
    choices on held-out val).

    >>> HeldOutSplit("val")
    'val'
    >>> HeldOutSplit("test")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    soup_core.errors.RecipeError: val_split must be a held-out split such as val, not 'test': a choice made ...
    """

    def __new__(cls, value: str) -> HeldOutSplit:
        name = str(value).strip()
        if name == "test":  # a zoo's distribution shifts are refused where its evaluator is known
            raise not_held_out(name)
        return super().__new__(cls, name)


def not_held_out(split: str, why: str = "") -> RecipeError:
    """The error for choosing on ``split``, a split that reports choices (test, or a shift)."""
    return RecipeError(f"val_split must be a held-out split such as val, not {split!r}: a choice made on the "
                       f"splits that report it makes their scores meaningless{why}")


VAL_SPLIT = Parameter("val_split", HeldOutSplit, "val", "the held-out split every choice is made on (never test "
                      "or a shift)")
SUM_PRECISION = Parameter("sum_precision", str, "auto",
                          "the running sum's precision: float64 (8 bytes a parameter, exact), float32 (4 bytes), "
                          "or auto: float64 where it fits in the memory budget, float32 otherwise",
                          choices=SUM_PRECISIONS, in_app=False)
MEMORY_BUDGET = Parameter("memory_budget", ByteSize, None,
                          "bytes the running sum and the candidate soup may hold on the evaluator's device "
                          "(e.g. 16GB)", default_text="what the device has free", in_app=False)
EPOCHS = Parameter("epochs", int, 3, "epochs of AdamW over the val split", minimum=1, maximum=1000,
                   reference="Wortsman et al. 2022, App. I")
LEARNING_RATE = Parameter("learning_rate", float, 0.1, "AdamW learning rate of the mixing weights",
                          minimum=1e-12, maximum=1e3, reference="Wortsman et al. 2022, App. I")
BATCH_SIZE = Parameter("batch_size", int, 64, "val samples per AdamW step", minimum=1, maximum=2**20)


class MixingWeights(tuple):
    """Relative weights per ingredient, spelled ``ft-03=2,ft-17=0.5`` (or given as a mapping).

    >>> MixingWeights("ft-03=2, ft-17=0.5")
    MixingWeights('ft-03=2,ft-17=0.5')
    >>> MixingWeights("ft-03=-1")
    Traceback (most recent call last):
    ...
    soup_core.errors.RecipeError: weights: ft-03's weight must be a finite number ≥ 0, not '-1'
    """

    def __new__(cls, value: str | Mapping[str, float] | Iterator = ()) -> MixingWeights:
        if isinstance(value, str):
            pairs = []
            for part in filter(None, (p.strip() for p in value.split(","))):
                name, sep, weight = part.partition("=")
                if not sep or not name.strip():
                    raise RecipeError(f"weights: {part!r} is not NAME=WEIGHT (e.g. ft-03=2,ft-17=0.5)")
                pairs.append((name.strip(), weight.strip()))
        else:
            pairs = list(value.items() if isinstance(value, Mapping) else value)
        checked = {}
        for name, weight in pairs:
            try:
                number = float(weight)
            except (TypeError, ValueError):
                number = float("nan")
            if not math.isfinite(number) or number < 0:
                raise RecipeError(f"weights: {name}'s weight must be a finite number ≥ 0, not {weight!r}")
            if name in checked:
                raise RecipeError(f"weights: {name} is given twice")
            checked[str(name)] = number
        return super().__new__(cls, tuple(checked.items()))

    def for_names(self, names: tuple[str, ...]) -> dict[str, float]:
        """Each of ``names``' weight (1 where not given), leaving out weight 0; a name that is not
        an ingredient, or every weight 0, is a :class:`RecipeError`."""
        given = dict(self)
        unknown = [name for name in given if name not in names]
        if unknown:
            raise RecipeError(f"weights name {', '.join(unknown)}, which {'is' if len(unknown) == 1 else 'are'} not "
                              f"among this soup's ingredients ({', '.join(names)}); name ingredients only")
        kept = {name: given.get(name, 1.0) for name in names if given.get(name, 1.0) > 0}
        if not kept:
            raise RecipeError("every weight is 0: give at least one ingredient a positive weight")
        return kept

    def __str__(self) -> str:  # the shortest text that reads back as exactly each weight
        return ",".join(f"{name}={repr(weight).removesuffix('.0')}" for name, weight in self)

    def __repr__(self) -> str:
        return f"MixingWeights({str(self)!r})"


WEIGHTS = Parameter("weights", MixingWeights, MixingWeights(),
                    "weight of each ingredient, NAME=WEIGHT,… (weighted soup: relative, divided by their sum; "
                    "task-vector methods: each task vector's weight, mergekit's per-model weight); an ingredient "
                    "not named weighs 1, weight 0 leaves it out", default_text="every ingredient 1",
                    reference="mergekit's linear merge and per-model weight")
DENSITY = Parameter("density", float, 0.5, "share of each task vector's entries kept (TIES keeps the largest, "
                    "DARE a random draw, Breadcrumbs the largest after dropping gamma's outliers)", minimum=0.0,
                    maximum=1.0, reference="Yadav et al. 2023; Yu et al. 2024; mergekit's density",
                    val_grid=grid(0.1, 1.0, 0.1))
GAMMA = Parameter("gamma", float, 0.01, "share of each task vector's largest entries dropped as outliers",
                  minimum=0.0, maximum=1.0, reference="Davari & Belilovsky 2024; mergekit's gamma")
SCALE = Parameter("lambda", float, 1.0, "scale of the merged task vector added to θ0",
                  reference="Ilharco et al. 2023 (λ, chosen on val); mergekit's lambda", val_grid=grid(0.1, 2.0, 0.1))
NORMALIZE_HELP = ("divide the merged task vector by the sum of the weights that went into each entry (TIES' "
                  "disjoint mean); default true for ties, false for the others, as in mergekit")
NORMALIZE = Parameter("normalize", bool, False, NORMALIZE_HELP, default_text="per method")
NORMALIZE_ON = Parameter("normalize", bool, True, NORMALIZE_HELP, default_text="per method")
RESCALE_HELP = ("rescale each sparsified task vector: l1 restores its L1 norm (mergekit), density divides by the "
                "share kept (DARE's paper), none; default l1 for DARE, none for the others")
RESCALE = Parameter("rescale", str, "none", RESCALE_HELP, choices=("none", "l1", "density"),
                    default_text="per method")
RESCALE_L1 = Parameter("rescale", str, "l1", RESCALE_HELP, choices=("none", "l1", "density"),
                       default_text="per method", reference="Yu et al. 2024 (1/density); mergekit (l1)")
MAX_ITER = Parameter("max_iter", int, 10, "most steps of the Karcher mean's iteration on the sphere", minimum=1,
                     maximum=1000,
                     reference="mergekit's karcher max_iter")
TOLERANCE = Parameter("tol", float, 1e-5, "the Karcher iteration stops when its step is shorter than this",
                      minimum=0.0, reference="mergekit's karcher tol")
ALPHA_HELP = ("how far from θ0 (0) towards the soup of the ingredients (1); LiNeS: at the shallowest layers "
              "and outside the numbered blocks")
ALPHA = Parameter("alpha", float, 0.5, ALPHA_HELP, reference="Wortsman et al. 2022b (WiSE-FT)",
                  default_text="per method", val_grid=grid(0.0, 1.0, 0.1))
LINES_ALPHA = Parameter("alpha", float, 1.0, ALPHA_HELP, reference="Wang et al. 2024 (LiNeS), α",
                        default_text="per method", val_grid=grid(0.0, 1.0, 0.1))
LINES_BETA = Parameter("beta", float, 0.5, "LiNeS: the scale added at the deepest numbered block (linear in depth "
                       "from alpha at the shallowest to alpha + beta)", reference="Wang et al. 2024 (LiNeS), β",
                       val_grid=grid(0.0, 2.0, 0.1))
INTERPOLATION = Parameter("t", float, 0.5, "where on the arc from the first ingredient (0) to the second (1)",
                          reference="mergekit's slerp t")


def improves(score: float, baseline: float, tie: str) -> bool:
    """Whether a candidate's val score beats the baseline under the tie rule (``ge`` or ``gt``)."""
    return score >= baseline if tie == "ge" else score > baseline
