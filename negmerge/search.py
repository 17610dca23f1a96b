"""Choosing the unlearning scale lambda in theta = theta_pre - lambda * tau_merged.

The caller evaluates a candidate lambda on validation data; a rule picks the best lambda among the
feasible ones, those that keep retain accuracy at or above ``retain_ratio`` times its value at
lambda = 0. Ties always go to the smaller lambda.

Rules:

- ``retain-threshold`` (the paper's): the lowest forget accuracy.
- ``holdout-match`` (deleting individual samples): forget accuracy closest to held-out accuracy,
  which is what a model that never saw the forget samples would show.

Strategies:

- ``grid`` evaluates every grid point.
- ``fast`` assumes that retain accuracy (counted at most as its value at lambda = 0) and the
  rule's signal (forget accuracy, or forget minus held-out accuracy for holdout-match) never rise
  with lambda, the typical shape. Then the lambdas
  still worth moving past (feasible, and for holdout-match forget still above held-out accuracy)
  form a prefix of the grid: one bisection finds its end, a second finds where the plateau of the
  best signal starts, trying the neighbour first because curves usually fall strictly. The choice
  is then the grid rule applied to the evaluated points, which include the grid's choice whenever
  the assumption holds. With L = ceil(log2(n)) on an n-point grid, that takes at most L + 2
  evaluations when the signal falls strictly and 2L + 1 with plateaus: 7 and 10 on the default 21
  points (with plateaus, no exact method can promise fewer than 9 there). The assumption is checked
  on every evaluated point; on a violation the rest of the grid is evaluated and the grid rule
  applies to all of it.

No lambda is evaluated twice.
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from itertools import pairwise
from typing import Any, ClassVar

STRATEGIES = ("fast", "grid")


@dataclass(frozen=True)
class Evaluation:
    """Accuracies of one candidate model, all in percent or all as fractions."""

    forget_acc: float
    retain_acc: float
    holdout_acc: float | None = None

    def __post_init__(self) -> None:
        for name in ("forget_acc", "retain_acc", "holdout_acc"):
            value = getattr(self, name)
            if value is None:
                continue
            value = float(value)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite, non-negative number, got {value!r}")
            # Plain floats keep the arithmetic predictable and the report JSON-serialisable.
            object.__setattr__(self, name, value)

    def to_dict(self) -> dict[str, float | None]:
        return asdict(self)


@dataclass(frozen=True)
class Rule:
    """Picks the best feasible lambda; subclasses say what "best" means."""

    name: ClassVar[str]
    needs_holdout: ClassVar[bool] = False

    retain_ratio: float = 0.95

    def __post_init__(self) -> None:
        if not 0 < self.retain_ratio <= 1:
            raise ValueError(f"retain_ratio must be in (0, 1], got {self.retain_ratio!r}")

    def is_feasible(self, evaluation: Evaluation, reference: Evaluation) -> bool:
        return evaluation.retain_acc >= self.retain_ratio * reference.retain_acc

    def signal(self, evaluation: Evaluation) -> float:
        """The quantity the fast strategy assumes never rises with lambda."""
        raise NotImplementedError

    def score(self, evaluation: Evaluation) -> float:
        """Lower is better."""
        raise NotImplementedError

    def may_improve_beyond(self, evaluation: Evaluation) -> bool:
        """Whether a larger lambda can score better, given a signal that never rises."""
        raise NotImplementedError

    def choose(
        self, evaluations: Sequence[tuple[float, Evaluation]], reference: Evaluation
    ) -> tuple[float, Evaluation]:
        """The best feasible (lambda, evaluation); ties go to the smaller lambda."""
        feasible = [pair for pair in evaluations if self.is_feasible(pair[1], reference)]
        return min(feasible, key=lambda pair: (self.score(pair[1]), pair[0]))


@dataclass(frozen=True)
class RetainThreshold(Rule):
    """The paper's rule: the lowest forget accuracy."""

    name: ClassVar[str] = "retain-threshold"

    def signal(self, evaluation: Evaluation) -> float:
        return evaluation.forget_acc

    def score(self, evaluation: Evaluation) -> float:
        return evaluation.forget_acc

    def may_improve_beyond(self, evaluation: Evaluation) -> bool:
        return True


@dataclass(frozen=True)
class HoldoutMatch(Rule):
    """Forget accuracy closest to held-out accuracy, as if the forget samples were never seen."""

    name: ClassVar[str] = "holdout-match"
    needs_holdout: ClassVar[bool] = True

    def signal(self, evaluation: Evaluation) -> float:
        holdout = evaluation.holdout_acc
        if holdout is None:
            raise ValueError(f"rule {self.name!r} needs holdout_acc, got None")
        return evaluation.forget_acc - holdout

    def score(self, evaluation: Evaluation) -> float:
        return abs(self.signal(evaluation))

    def may_improve_beyond(self, evaluation: Evaluation) -> bool:
        return self.signal(evaluation) > 0


RULES: dict[str, type[Rule]] = {rule.name: rule for rule in (RetainThreshold, HoldoutMatch)}


@dataclass(frozen=True)
class SearchResult:
    """The chosen lambda and every evaluation that led to it."""

    lam: float
    evaluation: Evaluation
    reference: Evaluation
    history: tuple[tuple[float, Evaluation], ...]
    strategy: str
    fell_back_to_grid: bool
    at_upper_end: bool
    rule: str
    retain_ratio: float

    @property
    def evaluations(self) -> list[tuple[float, Evaluation]]:
        """Every (lambda, evaluation), sorted by lambda; ``history`` keeps evaluation order."""
        return sorted(self.history, key=lambda pair: pair[0])

    @property
    def n_evaluated(self) -> int:
        return len(self.history)

    @property
    def retain_threshold(self) -> float:
        return self.retain_ratio * self.reference.retain_acc

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary for report.json."""
        return {
            "lambda": self.lam,
            "evaluation": self.evaluation.to_dict(),
            "reference": self.reference.to_dict(),
            "rule": self.rule,
            "retain_ratio": self.retain_ratio,
            "retain_threshold": self.retain_threshold,
            "strategy": self.strategy,
            "fell_back_to_grid": self.fell_back_to_grid,
            "at_upper_end": self.at_upper_end,
            "n_evaluated": self.n_evaluated,
            "evaluation_order": [lam for lam, _ in self.history],
            "evaluations": [{"lambda": lam, **ev.to_dict()} for lam, ev in self.evaluations],
        }


def lambda_grid(start: float = 0.0, stop: float = 1.0, points: int = 21) -> list[float]:
    """``points`` evenly spaced lambdas from start to stop, rounded so that 0.05 stays 0.05."""
    if points < 2:
        raise ValueError(f"points must be at least 2, got {points!r}")
    if not (math.isfinite(start) and math.isfinite(stop) and start < stop):
        raise ValueError(
            f"start and stop must be finite with start < stop, got {start!r}, {stop!r}"
        )
    return [round(start + i * (stop - start) / (points - 1), 10) for i in range(points)]


def search_lambda(
    evaluate: Callable[[float], Evaluation],
    rule: str = "retain-threshold",
    *,
    strategy: str = "fast",
    grid: Sequence[float] | None = None,
    retain_ratio: float = 0.95,
    on_evaluation: Callable[[float, Evaluation], None] | None = None,
) -> SearchResult:
    """Choose lambda on ``grid`` (default: 0 to 1 in 21 points) by ``rule`` (see the module doc)."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {sorted(RULES)}, got {rule!r}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {list(STRATEGIES)}, got {strategy!r}")
    chosen_rule = RULES[rule](retain_ratio=retain_ratio)
    lambdas = checked_grid(lambda_grid() if grid is None else grid)

    evaluated = _Evaluations(evaluate, lambdas, chosen_rule, on_evaluation)
    reference = evaluated(0)
    fell_back = False
    if strategy == "fast":
        _evaluate_deciding_points(evaluated, chosen_rule, reference)
        fell_back = not _assumption_holds(evaluated.history, chosen_rule, reference)
    if strategy == "grid" or fell_back:
        for index in range(len(lambdas)):
            evaluated(index)

    lam, evaluation = chosen_rule.choose(evaluated.history, reference)
    return SearchResult(
        lam=lam,
        evaluation=evaluation,
        reference=reference,
        history=tuple(evaluated.history),
        strategy=strategy,
        fell_back_to_grid=fell_back,
        at_upper_end=lam == lambdas[-1],
        rule=rule,
        retain_ratio=retain_ratio,
    )


def checked_grid(grid: Sequence[float]) -> list[float]:
    """`grid` as floats, if it is one the search can run on: non-empty, finite, increasing
    without repeats, starting at 0 (the reference lambda); else ValueError saying why."""
    lambdas = [float(lam) for lam in grid]
    # The messages name the offending values, not the whole grid (it may be long).
    if not lambdas:
        raise ValueError("grid must not be empty")
    if (bad := next((lam for lam in lambdas if not math.isfinite(lam)), None)) is not None:
        raise ValueError(f"grid must contain only finite values, not {bad}")
    for earlier, later in pairwise(lambdas):
        if later <= earlier:
            raise ValueError(
                f"grid must be sorted in increasing order without repeats: {later:g} follows "
                f"{earlier:g}"
            )
    if lambdas[0] != 0:
        raise ValueError(f"grid must start at 0, the reference lambda, not {lambdas[0]:g}")
    return lambdas


class _Evaluations:
    """Evaluates grid points by index, each at most once, in a recorded order."""

    def __init__(
        self,
        evaluate: Callable[[float], Evaluation],
        lambdas: list[float],
        rule: Rule,
        on_evaluation: Callable[[float, Evaluation], None] | None,
    ) -> None:
        self.lambdas = lambdas
        self.by_index: dict[int, Evaluation] = {}
        self.history: list[tuple[float, Evaluation]] = []
        self._evaluate = evaluate
        self._rule = rule
        self._on_evaluation = on_evaluation

    def __call__(self, index: int) -> Evaluation:
        if index in self.by_index:
            return self.by_index[index]
        lam = self.lambdas[index]
        evaluation = self._evaluate(lam)
        if not isinstance(evaluation, Evaluation):
            raise TypeError(f"evaluate must return an Evaluation, got {type(evaluation).__name__}")
        if self._rule.needs_holdout and evaluation.holdout_acc is None:
            raise ValueError(
                f"rule {self._rule.name!r} needs holdout_acc, but evaluate({lam}) returned None"
            )
        self.by_index[index] = evaluation
        self.history.append((lam, evaluation))
        if self._on_evaluation is not None:
            self._on_evaluation(lam, evaluation)
        return evaluation


def _evaluate_deciding_points(evaluated: _Evaluations, rule: Rule, reference: Evaluation) -> None:
    """Evaluate the grid points that decide the choice when the curves never rise."""
    size = len(evaluated.lambdas)

    def worth_passing(index: int) -> bool:
        evaluation = evaluated(index)
        return rule.is_feasible(evaluation, reference) and rule.may_improve_beyond(evaluation)

    def signal(index: int) -> float:
        return rule.signal(evaluated(index))

    if not worth_passing(0):
        return
    # Equal signals at both brackets mean a plateau between them, so the exact end is irrelevant.
    last_in, first_out = 0, size
    while first_out - last_in > 1 and not (
        first_out < size and signal(first_out) == signal(last_in)
    ):
        middle = (last_in + first_out) // 2
        if worth_passing(middle):
            last_in = middle
        else:
            first_out = middle

    # Ties go to the smaller lambda, so find where the run of the best signal starts. Curves
    # usually fall strictly, and then the neighbour below settles it at once.
    best = signal(last_in)
    while True:
        before, start = _plateau_bounds(evaluated, rule, last_in, best)
        if start - before <= 1:
            return
        evaluated(start - 1 if start == last_in else (before + start) // 2)


def _plateau_bounds(
    evaluated: _Evaluations, rule: Rule, last_in: int, best: float
) -> tuple[int, int]:
    """Evaluated indices around the start of the run of ``best`` that ends at last_in.

    Returns (the last evaluated index before the run, or -1; the first evaluated index on it).
    """
    start = last_in
    for index in sorted((i for i in evaluated.by_index if i < last_in), reverse=True):
        if rule.signal(evaluated.by_index[index]) != best:
            return index, start
        start = index
    return -1, start


def _assumption_holds(
    history: Sequence[tuple[float, Evaluation]], rule: Rule, reference: Evaluation
) -> bool:
    """Whether the evaluated points fit the shape the bisections rely on: neither retain
    accuracy nor the signal rises with lambda. Retain accuracy above its value at lambda = 0
    counts as that value: it often rises a little at small lambda, which moves no boundary."""
    ordered = [evaluation for _, evaluation in sorted(history, key=lambda pair: pair[0])]
    retain = [min(e.retain_acc, reference.retain_acc) for e in ordered]
    return all(b <= a for a, b in pairwise(retain)) and all(
        rule.signal(b) <= rule.signal(a) for a, b in pairwise(ordered)
    )
