"""Choosing the unlearning scale lambda in theta = theta_pre - lambda * tau_merged.

The caller evaluates a candidate lambda on validation data; a rule picks the best lambda among the
feasible ones, those that keep retain accuracy at or above ``retain_ratio`` times its value at
lambda = 0. Ties always go to the smaller lambda.

Rules:

- ``retain-threshold`` (the paper's): the lowest forget accuracy.
- ``holdout-match`` (deleting individual samples): forget accuracy closest to held-out accuracy,
  which is what a model that never saw the forget samples would show.
- ``confidence-match`` (deleting samples from a model that generalises, where accuracy cannot
  tell them apart from held-out data): the forget set's mean true-label confidence closest to
  held-out data's, which is what membership inference reads.

Strategies:

- ``grid`` evaluates every grid point.
- ``fast`` bisects for the end of the lambdas still worth moving past (feasible, and for
  holdout-match forget still above held-out accuracy), assuming that retain accuracy (counted
  at most as its value at lambda = 0) and the rule's signal (forget accuracy, or forget minus
  held-out accuracy) never rise with lambda. Real retain curves wobble around the threshold
  (a point just infeasible, the next feasible and more forgotten), so past the boundary it
  probes at 1, 2, 4, ... grid steps and bisects again from any probe worth passing; probing
  stops at the grid's end, once retain accuracy has fallen twice as far below the reference
  as the threshold allows (a collapse, not a wobble), or when a third of the grid has been
  evaluated. Then it finds where the plateau of the
  best signal starts (ties go to the smaller lambda), trying the neighbour first because
  curves usually fall strictly, and climbs to any better grid neighbour of the choice (a
  rising signal, as on sample deletion, can hide the best point between evaluated ones). A
  feasible stretch short enough to fit in a third of the grid is evaluated whole. The
  choice is the grid rule applied to the evaluated points: the grid's choice whenever the
  assumption holds. On the default 41 points that is about a
  third of the grid or less; on an extended grid a smaller share.

Extension: a choice at the grid's upper end, where a larger lambda may still be better, means
the grid stopped short. The grid is then extended (up to ``max_extensions`` times, never past
``max_lambda``) to twice its range at twice its last spacing, and the search goes on there.
The default grid, 0 to 2 in steps of 0.05, extends to 4 and then 8 (81 points at most).

Refinement: forget accuracy can fall off a cliff between two grid points just before retain
accuracy crosses the threshold, so the grid's choice sits a step short of the cliff. After the
grid's choice (and its extensions), with either strategy, the search bisects ``refine`` times
(default 4, 0 disables it) between the largest feasible evaluated lambda and the next
evaluated one above it, which is infeasible: a feasible midpoint becomes the lower end, an
infeasible one the upper end. Then the rule chooses again over every evaluated point, so a
refined point is chosen only if the rule prefers it (ties still go to the smaller lambda). On
the default grid 4 steps narrow the crossing from 0.05 to 0.003. It runs only when the choice
and the lower end both ``may_improve_beyond`` (as for an extension): while that holds a
larger lambda can still score better, so a point past the lower end can win. For
retain-threshold that is whenever forget accuracy is above 0: the rule prefers the most
forgotten, and on curves that fall the largest feasible lambda. For holdout-match and
confidence-match it is while the forget signal is still above held-out data's; once it is at
or below, a larger lambda only moves further from the match, and bisecting would spend
evaluations for nothing. For the same reason it stops at a feasible midpoint past which no
lambda can do better (forget accuracy 0; for the matching rules, the signal at or below
held-out data's). The search evaluates at most the extended grid's points plus
``refine`` (`most_evaluations`).

No lambda is evaluated twice.
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from itertools import pairwise
from typing import Any, ClassVar

STRATEGIES = ("fast", "grid")
MAX_LAMBDA = 8.0
MAX_EXTENSIONS = 2
DEFAULT_REFINE = 4
MAX_REFINE = 8


@dataclass(frozen=True)
class Evaluation:
    """Accuracies of one candidate model, all in percent or all as fractions."""

    forget_acc: float
    retain_acc: float
    holdout_acc: float | None = None
    # Mean probability of the true label (percent): what membership inference reads.
    forget_conf: float | None = None
    holdout_conf: float | None = None

    def __post_init__(self) -> None:
        for name in ("forget_acc", "retain_acc", "holdout_acc", "forget_conf", "holdout_conf"):
            value = getattr(self, name)
            if value is None:
                continue
            value = float(value)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite, non-negative number, got {value!r}")
            # Plain floats keep the arithmetic predictable and the report JSON-serialisable.
            object.__setattr__(self, name, value)

    def to_dict(self) -> dict[str, float | None]:
        """Every accuracy; the confidences only where measured (confidence-match)."""
        data = asdict(self)
        for name in ("forget_conf", "holdout_conf"):
            if data[name] is None:
                del data[name]
        return data


@dataclass(frozen=True)
class Rule:
    """Picks the best feasible lambda; subclasses say what "best" means."""

    name: ClassVar[str]
    needs_holdout: ClassVar[bool] = False
    needs_confidence: ClassVar[bool] = False

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
        return evaluation.forget_acc > 0  # nothing beats forgetting all of it


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


@dataclass(frozen=True)
class ConfidenceMatch(HoldoutMatch):
    """The forget set's mean true-label confidence closest to held-out data's: a model that
    never saw the samples is as sure of them as of any unseen data."""

    name: ClassVar[str] = "confidence-match"
    needs_confidence: ClassVar[bool] = True

    def signal(self, evaluation: Evaluation) -> float:
        if evaluation.forget_conf is None or evaluation.holdout_conf is None:
            raise ValueError(f"rule {self.name!r} needs forget_conf and holdout_conf, got None")
        return evaluation.forget_conf - evaluation.holdout_conf


RULES: dict[str, type[Rule]] = {
    rule.name: rule for rule in (RetainThreshold, HoldoutMatch, ConfidenceMatch)
}


@dataclass(frozen=True)
class SearchResult:
    """The chosen lambda and every evaluation that led to it."""

    lam: float
    evaluation: Evaluation
    reference: Evaluation
    history: tuple[tuple[float, Evaluation], ...]
    strategy: str
    at_upper_end: bool
    rule: str
    retain_ratio: float
    grid_size: int = 0
    extensions: int = 0
    # The lambdas refinement evaluated, in order (in `history` too).
    refined: tuple[float, ...] = ()

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
            "at_upper_end": self.at_upper_end,
            "grid_size": self.grid_size,
            "extensions": self.extensions,
            "refined": list(self.refined),
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


def default_grid() -> list[float]:
    """The default lambdas: 0 to 2 in steps of 0.05 (extended past 2 when needed). The
    recipes' task vectors need lambda near or above 1 (sparse merged vectors more), so a grid
    that stops at 1 stops short."""
    return lambda_grid(0.0, 2.0, 41)


def extend_grid(lambdas: Sequence[float], max_lambda: float = MAX_LAMBDA) -> list[float]:
    """The points that extend ``lambdas`` to twice its range at twice its last spacing, capped
    at ``max_lambda`` (none when the grid already reaches it). One extension adds at most half
    as many points as the grid has (spaced wider if need be), so a grid whose last two points
    are close cannot grow without bound."""
    if len(lambdas) < 2:
        return []
    stop, step = lambdas[-1], 2 * (lambdas[-1] - lambdas[-2])
    new_stop = min(2 * stop, max_lambda)
    count = math.floor((new_stop - stop) / step + 1e-9)
    most = max(1, len(lambdas) // 2)
    if count > most:
        count, step = most, (new_stop - stop) / most
    return [round(stop + k * step, 10) for k in range(1, count + 1)]


def extended_grid(
    lambdas: Sequence[float], max_extensions: int = MAX_EXTENSIONS, max_lambda: float = MAX_LAMBDA
) -> list[float]:
    """Every lambda a search may evaluate: ``lambdas`` with all the extensions it may make."""
    grid = list(lambdas)
    for _ in range(max_extensions):
        more = extend_grid(grid, max_lambda)
        if not more:
            break
        grid += more
    return grid


def most_evaluations(
    lambdas: Sequence[float],
    max_extensions: int = MAX_EXTENSIONS,
    max_lambda: float = MAX_LAMBDA,
    refine: int = DEFAULT_REFINE,
) -> int:
    """The most lambdas a search on ``lambdas`` may evaluate: the grid with all the extensions
    it may make, and the refinement's points."""
    return len(extended_grid(lambdas, max_extensions, max_lambda)) + refine


def search_lambda(
    evaluate: Callable[[float], Evaluation],
    rule: str = "retain-threshold",
    *,
    strategy: str = "fast",
    grid: Sequence[float] | None = None,
    retain_ratio: float = 0.95,
    on_evaluation: Callable[[float, Evaluation], None] | None = None,
    max_extensions: int = MAX_EXTENSIONS,
    max_lambda: float = MAX_LAMBDA,
    refine: int = DEFAULT_REFINE,
) -> SearchResult:
    """Choose lambda on ``grid`` (default: `default_grid`) by ``rule``, extending the grid when
    the choice is at its upper end and then refining the retain boundary ``refine`` times (see
    the module doc)."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {sorted(RULES)}, got {rule!r}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {list(STRATEGIES)}, got {strategy!r}")
    if not (isinstance(max_extensions, int) and max_extensions >= 0):
        raise ValueError(f"max_extensions must be a non-negative integer, got {max_extensions!r}")
    if not (math.isfinite(max_lambda) and max_lambda > 0):
        raise ValueError(f"max_lambda must be a finite positive number, got {max_lambda!r}")
    if not (isinstance(refine, int) and 0 <= refine <= MAX_REFINE):
        raise ValueError(f"refine must be an integer from 0 to {MAX_REFINE}, got {refine!r}")
    chosen_rule = RULES[rule](retain_ratio=retain_ratio)
    lambdas = checked_grid(default_grid() if grid is None else grid)

    evaluated = _Evaluations(evaluate, lambdas, chosen_rule, on_evaluation)
    reference = evaluated(0)
    start, extensions = 0, 0
    while True:
        if strategy == "fast":
            _evaluate_deciding_points(evaluated, chosen_rule, reference, start)
        else:
            for index in range(len(evaluated.lambdas)):
                evaluated(index)
        lam, evaluation = chosen_rule.choose(evaluated.history, reference)
        more = extend_grid(evaluated.lambdas, max_lambda)
        stopped_short = lam == evaluated.lambdas[-1] and chosen_rule.may_improve_beyond(evaluation)
        if not (stopped_short and more and extensions < max_extensions):
            break
        start = len(evaluated.lambdas) - 1
        evaluated.lambdas = evaluated.lambdas + more
        extensions += 1
    refined = _refine_boundary(evaluated, chosen_rule, reference, evaluation, refine)
    if refined:
        lam, evaluation = chosen_rule.choose(evaluated.history, reference)

    return SearchResult(
        lam=lam,
        evaluation=evaluation,
        reference=reference,
        history=tuple(evaluated.history),
        strategy=strategy,
        at_upper_end=lam == evaluated.lambdas[-1],
        rule=rule,
        retain_ratio=retain_ratio,
        grid_size=len(evaluated.lambdas),
        extensions=extensions,
        refined=tuple(refined),
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
    """Evaluates grid points by index, and lambdas between them, each at most once, in a
    recorded order."""

    def __init__(
        self,
        evaluate: Callable[[float], Evaluation],
        lambdas: list[float],
        rule: Rule,
        on_evaluation: Callable[[float, Evaluation], None] | None,
    ) -> None:
        self.lambdas = lambdas
        self.by_index: dict[int, Evaluation] = {}
        self.between: dict[float, Evaluation] = {}  # lambdas off the grid (refinement)
        self.history: list[tuple[float, Evaluation]] = []
        self._evaluate = evaluate
        self._rule = rule
        self._on_evaluation = on_evaluation

    def __call__(self, index: int) -> Evaluation:
        if index not in self.by_index:
            self.by_index[index] = self._record(self.lambdas[index])
        return self.by_index[index]

    def at(self, lam: float) -> Evaluation:
        """The evaluation at ``lam``: a grid point's by its index, any other by its value."""
        if lam in self.lambdas:
            return self(self.lambdas.index(lam))
        if lam not in self.between:
            self.between[lam] = self._record(lam)
        return self.between[lam]

    def _record(self, lam: float) -> Evaluation:
        evaluation = self._evaluate(lam)
        if not isinstance(evaluation, Evaluation):
            raise TypeError(f"evaluate must return an Evaluation, got {type(evaluation).__name__}")
        if self._rule.needs_holdout and evaluation.holdout_acc is None:
            raise ValueError(
                f"rule {self._rule.name!r} needs holdout_acc, but evaluate({lam}) returned None"
            )
        if self._rule.needs_confidence and None in (
            evaluation.forget_conf,
            evaluation.holdout_conf,
        ):
            raise ValueError(
                f"rule {self._rule.name!r} needs forget_conf and holdout_conf, but "
                f"evaluate({lam}) returned None"
            )
        self.history.append((lam, evaluation))
        if self._on_evaluation is not None:
            self._on_evaluation(lam, evaluation)
        return evaluation


def _refine_boundary(
    evaluated: _Evaluations, rule: Rule, reference: Evaluation, chosen: Evaluation, steps: int
) -> list[float]:
    """Bisect ``steps`` times between the largest feasible evaluated lambda and the next
    evaluated one above it (see the module doc); the lambdas evaluated, in order."""
    feasible = [(lam, e) for lam, e in evaluated.history if rule.is_feasible(e, reference)]
    low, at_low = max(feasible, key=lambda pair: pair[0])  # the choice is feasible: never empty
    above = [lam for lam, _ in evaluated.history if lam > low]
    if not (above and rule.may_improve_beyond(chosen) and rule.may_improve_beyond(at_low)):
        return []
    high = min(above)  # infeasible, as ``low`` is the largest feasible
    added = []
    for _ in range(steps):
        middle = round((low + high) / 2, 10)  # rounded like the grid, so 0.025 stays 0.025
        if not low < middle < high:
            break  # the bracket is as narrow as the rounding allows
        evaluation = evaluated.at(middle)
        added.append(middle)
        if not rule.is_feasible(evaluation, reference):
            high = middle
        elif rule.may_improve_beyond(evaluation):
            low = middle
        else:
            break  # no larger lambda can beat it (see Rule.may_improve_beyond)
    return added


def _evaluate_deciding_points(
    evaluated: _Evaluations, rule: Rule, reference: Evaluation, start: int = 0
) -> None:
    """Evaluate the grid points that decide the choice (see the module doc), from index
    ``start`` on (a point already known to be worth passing, or 0)."""
    size = len(evaluated.lambdas)
    threshold = rule.retain_ratio * reference.retain_acc
    collapsed = threshold - (reference.retain_acc - threshold)

    def worth_passing(index: int) -> bool:
        evaluation = evaluated(index)
        return rule.is_feasible(evaluation, reference) and rule.may_improve_beyond(evaluation)

    def signal(index: int) -> float:
        return rule.signal(evaluated(index))

    if not worth_passing(start):
        return
    last_in = start
    first_pass = True
    while True:
        last_in, first_out = _bisect(last_in, size, worth_passing, signal)
        if first_pass:
            # A short stretch before the boundary is looked at whole: the signal can zigzag
            # there (holdout-match on a few hundred val images), and it costs no more than
            # the third of the grid that `fast` may spend.
            missing = [i for i in range(start, last_in) if i not in evaluated.by_index]
            if len(evaluated.by_index) + len(missing) <= size // 3:
                for i in missing:
                    evaluated(i)
            first_pass = False
        if first_out >= size or _perfect(evaluated, rule, reference):
            break
        # Probe past the boundary: the curves wobble around the threshold.
        restart = None
        offset = 1
        while first_out + offset < size and len(evaluated.by_index) < size // 3:
            index = first_out + offset
            if worth_passing(index):
                restart = index
                break
            if evaluated(index).retain_acc < collapsed:
                break
            offset *= 2
        if restart is None:
            break
        last_in = restart

    # Ties go to the smaller lambda, so find where the run of the best signal starts. Curves
    # usually fall strictly, and then the neighbour below settles it at once.
    lam, _ = rule.choose(evaluated.history, reference)
    anchor = evaluated.lambdas.index(lam)
    best = signal(anchor)
    while True:
        before, first = _plateau_bounds(evaluated, rule, anchor, best)
        if first - before <= 1:
            break
        evaluated(first - 1 if first == anchor else (before + first) // 2)

    # The choice must beat its grid neighbours: where the signal rises (held-out accuracy
    # falling faster than forget accuracy, as on sample deletion) the best point can sit
    # between evaluated ones. Climb while a neighbour is better; curves that fall need none.
    # Equal neighbours are walked across, too: a run of ties can hide a better point just
    # past it. Climbing stops when a third of the grid has been evaluated.
    while True:
        lam, chosen = rule.choose(evaluated.history, reference)
        index = evaluated.lambdas.index(lam)
        end = index
        while end + 1 in evaluated.by_index and rule.score(evaluated.by_index[end + 1]) == (
            rule.score(chosen)
        ):
            end += 1
        around = [
            i for i in (index - 1, index + 1) if 0 <= i < size and i not in evaluated.by_index
        ]
        if len(evaluated.by_index) + len(around) > max(size // 3, 3):
            return  # the budget is spent; on curves that fall nothing is left to climb
        if not around:
            walk = end + 1
            if not (
                end > index
                and rule.score(chosen) > 0
                and walk < size
                and walk not in evaluated.by_index
                and len(evaluated.by_index) < size // 3
            ):
                return
            around = [walk]
        for i in around:
            evaluated(i)


def _perfect(evaluated: _Evaluations, rule: Rule, reference: Evaluation) -> bool:
    """Whether an evaluated feasible point scores 0 (all forgotten, or an exact match), which
    no probe could beat."""
    return any(
        rule.is_feasible(e, reference) and rule.score(e) == 0 for e in evaluated.by_index.values()
    )


def _bisect(
    last_in: int,
    size: int,
    worth_passing: Callable[[int], bool],
    signal: Callable[[int], float],
) -> tuple[int, int]:
    """(last index worth passing, first index not) from a bracket [last_in, size): equal
    signals at both ends mean a plateau between them, so the exact end is irrelevant."""
    first_out = size
    while first_out - last_in > 1 and not (
        first_out < size and signal(first_out) == signal(last_in)
    ):
        middle = (last_in + first_out) // 2
        if worth_passing(middle):
            last_in = middle
        else:
            first_out = middle
    return last_in, first_out


def _plateau_bounds(
    evaluated: _Evaluations, rule: Rule, last_in: int, best: float
) -> tuple[int, int]:
    """Evaluated indices around the start of the run of ``best`` that ends at ``last_in``.

    Returns (the last evaluated index before the run, or -1; the first evaluated index on it).
    """
    start = last_in
    for index in sorted((i for i in evaluated.by_index if i < last_in), reverse=True):
        if rule.signal(evaluated.by_index[index]) != best:
            return index, start
        start = index
    return -1, start
