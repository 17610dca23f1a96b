import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from negmerge.search import (
    Evaluation,
    SearchResult,
    default_grid,
    extend_grid,
    extended_grid,
    lambda_grid,
    most_evaluations,
    search_lambda,
)

GRID = lambda_grid()  # 21 points, 0 to 1: the curves below are drawn on it
FEW_EXAMPLES = settings(max_examples=150, deadline=None)


def search(evaluate, rule: str = "retain-threshold", **kwargs) -> SearchResult:
    """search_lambda on GRID, not extended nor refined, unless a test says otherwise: the
    curves here are drawn on grid points only."""
    kwargs.setdefault("grid", GRID)
    kwargs.setdefault("max_extensions", 0)
    kwargs.setdefault("refine", 0)
    return search_lambda(evaluate, rule, **kwargs)


class RecordedCurve:
    """An evaluate() that looks up a fixed curve on a grid and records every call."""

    def __init__(self, evaluations: list[Evaluation], grid: list[float] = GRID) -> None:
        self.by_lambda = dict(zip(grid, evaluations, strict=True))
        self.calls: list[float] = []

    def __call__(self, lam: float) -> Evaluation:
        self.calls.append(lam)
        return self.by_lambda[lam]


def brute_force_lambda(
    curve: list[Evaluation],
    grid: list[float] = GRID,
    retain_ratio: float = 0.95,
    holdout: bool = False,
) -> float:
    """Evaluate every point, keep retain >= r * retain0, take the best; the first wins ties."""
    best_lam, best_score = None, math.inf
    for lam, evaluation in zip(grid, curve, strict=True):
        if evaluation.retain_acc >= retain_ratio * curve[0].retain_acc:
            if holdout:
                score = abs(evaluation.forget_acc - evaluation.holdout_acc)
            else:
                score = evaluation.forget_acc
            if score < best_score:
                best_lam, best_score = lam, score
    return best_lam


def falling(draw, start: float, drops: list[float], size: int, floor: float = 0.0) -> list[float]:
    values = [start]
    steps = max(size - 1, 0)
    for drop in draw(st.lists(st.sampled_from(drops), min_size=steps, max_size=steps)):
        values.append(max(floor, values[-1] - drop))
    return values[:size]


# Steps are multiples of 0.25, so sums are exact; zero steps and floors make plateaus and ties, and
# the floor at 95 puts retain accuracy exactly on the threshold.
@st.composite
def retain_curves(draw, size: int) -> list[float]:
    last_feasible = draw(st.integers(0, size - 1))
    feasible = falling(draw, 100.0, [0.0, 0.0, 0.25, 0.5, 1.0], last_feasible + 1, floor=95.0)
    start = draw(st.sampled_from([94.75, 80.0]))
    return feasible + falling(draw, start, [0.0, 0.25, 5.0], size - last_feasible - 1)


@st.composite
def monotone_curves(draw, size: int = 21, strict_forget: bool = False) -> list[Evaluation]:
    retain = draw(retain_curves(size))
    if strict_forget:
        forget = falling(draw, 100.0, [0.5, 1.0, 2.0, 4.0], size)
    else:
        start = draw(st.sampled_from([0.0, 10.0, 50.0, 100.0]))
        forget = falling(draw, start, [0.0, 0.0, 1.0, 5.0, 20.0], size)
    return [Evaluation(f, r) for f, r in zip(forget, retain, strict=True)]


@st.composite
def holdout_curves(draw, size: int = 21) -> list[Evaluation]:
    retain = draw(retain_curves(size))
    holdout = falling(draw, 90.0, [0.0, 0.5, 1.0], size)
    start = draw(st.sampled_from([-2.0, 0.0, 2.0, 5.0, 10.0, 20.0]))
    gap = falling(draw, start, [0.0, 0.0, 0.5, 1.0, 2.0], size, floor=-math.inf)
    return [Evaluation(h + g, r, h) for r, h, g in zip(retain, holdout, gap, strict=True)]


def assert_each_lambda_evaluated_once(curve: RecordedCurve) -> None:
    assert len(curve.calls) == len(set(curve.calls))


@FEW_EXAMPLES
@given(monotone_curves())
def test_fast_matches_brute_force_on_monotone_curves(evaluations):
    fast, grid = RecordedCurve(evaluations), RecordedCurve(evaluations)

    fast_result = search(fast)
    grid_result = search(grid, strategy="grid")

    expected = brute_force_lambda(evaluations)
    assert fast_result.lam == grid_result.lam == expected
    assert_each_lambda_evaluated_once(fast)
    # Bisection, probes past the boundary (the retain curves here fall slowly after it, so
    # probing goes on), and the plateau's start: about 3 log2(n) at worst.
    assert fast_result.n_evaluated == len(fast.calls) <= 3 * math.ceil(math.log2(len(GRID))) + 1
    assert grid_result.n_evaluated == len(grid.calls) == len(GRID)


@FEW_EXAMPLES
@given(monotone_curves(strict_forget=True))
def test_fast_needs_a_third_of_the_grid_when_forget_falls_strictly(evaluations):
    curve = RecordedCurve(evaluations)

    result = search(curve)

    assert result.lam == brute_force_lambda(evaluations)
    assert len(curve.calls) <= 2 * math.ceil(math.log2(len(GRID))) + 2


@FEW_EXAMPLES
@given(st.integers(2, 41).flatmap(lambda size: st.tuples(st.just(size), monotone_curves(size))))
def test_fast_matches_brute_force_on_other_grids(size_and_evaluations):
    size, evaluations = size_and_evaluations
    grid = lambda_grid(0.0, 2.0, size)
    curve = RecordedCurve(evaluations, grid)

    result = search(curve, grid=grid, retain_ratio=0.9)

    assert result.lam == brute_force_lambda(evaluations, grid, retain_ratio=0.9)
    assert_each_lambda_evaluated_once(curve)
    assert len(curve.calls) <= 3 * math.ceil(math.log2(size)) + 1


@FEW_EXAMPLES
@given(holdout_curves(), st.sampled_from(["fast", "grid"]))
def test_holdout_match_matches_brute_force(evaluations, strategy):
    curve = RecordedCurve(evaluations)

    result = search(curve, "holdout-match", strategy=strategy)

    assert result.lam == brute_force_lambda(evaluations, holdout=True)
    assert_each_lambda_evaluated_once(curve)
    if strategy == "fast":
        assert len(curve.calls) <= 3 * math.ceil(math.log2(len(GRID))) + 1


def test_a_feasible_point_past_a_dip_in_retain_accuracy_is_found():
    # Retain accuracy dips just under the threshold at 0.55 and recovers at 0.6..0.7, where more
    # is forgotten: the probes past the boundary find it, as the grid does.
    forget = [90.0 - 4 * i for i in range(21)]
    retain = [100.0] * 11 + [94.9, 95.5, 95.2, 95.0] + [60.0] * 6
    evaluations = [Evaluation(f, r) for f, r in zip(forget, retain, strict=True)]
    curve = RecordedCurve(evaluations)

    result = search(curve)

    assert result.lam == brute_force_lambda(evaluations) == 0.7
    assert len(curve.calls) <= 7
    assert_each_lambda_evaluated_once(curve)


def test_probing_stops_where_retain_accuracy_collapses():
    forget = [90.0 - 4 * i for i in range(21)]
    retain = [100.0] * 11 + [80.0] * 9 + [100.0]  # a last feasible point no one could expect
    curve = RecordedCurve([Evaluation(f, r) for f, r in zip(forget, retain, strict=True)])

    result = search(curve)

    # Known limit: past a collapse nothing is probed, so the grid's 1.0 is not found.
    assert result.lam == 0.5
    assert 1.0 not in curve.calls and len(curve.calls) <= 6


def test_rising_retain_accuracy_past_the_boundary_is_probed():
    forget = [90.0 - 2 * i for i in range(21)]
    retain = [100.0] * 21
    retain[10], retain[12], retain[15] = 96.0, 99.0, 50.0
    evaluations = [Evaluation(f, r) for f, r in zip(forget, retain, strict=True)]
    curve = RecordedCurve(evaluations)

    result = search(curve)

    assert result.lam == brute_force_lambda(evaluations) == 1.0
    assert_each_lambda_evaluated_once(curve)


def test_retain_rising_above_its_reference_at_small_lambda_needs_no_fallback():
    """The usual real curve: negating a little improves retain accuracy before it falls."""
    forget = [90.0 - 3 * i for i in range(21)]
    retain = [95.0, 96.0, 96.5, 96.5, 96.0] + [95.0 - 0.5 * i for i in range(16)]
    evaluations = [Evaluation(f, r) for f, r in zip(forget, retain, strict=True)]
    curve = RecordedCurve(evaluations)

    result = search(curve)
    assert result.lam == brute_force_lambda(evaluations)
    assert len(curve.calls) <= 10  # three probes: retain falls slowly past the boundary
    assert_each_lambda_evaluated_once(curve)


def test_retain_exactly_at_the_threshold_is_feasible():
    retain = [100.0] * 11 + [95.0] + [94.99] * 9
    forget = [100.0 - 4 * i for i in range(21)]
    evaluations = [Evaluation(f, r) for f, r in zip(forget, retain, strict=True)]

    for strategy in ("fast", "grid"):
        result = search(RecordedCurve(evaluations), strategy=strategy)
        assert result.lam == 0.55
        assert result.retain_threshold == 95.0


def test_threshold_equality_holds_for_fractions_too():
    evaluations = [Evaluation(0.5, 1.0), Evaluation(0.2, 0.95), Evaluation(0.1, 0.9)]
    grid = [0.0, 0.5, 1.0]

    result = search(RecordedCurve(evaluations, grid), grid=grid)

    assert result.lam == 0.5


def test_plateau_ties_go_to_the_smaller_lambda():
    forget = [max(0.0, 60.0 - 10 * i) for i in range(21)]
    evaluations = [Evaluation(f, 100.0) for f in forget]

    result = search(RecordedCurve(evaluations))

    assert result.lam == 0.3
    assert not result.at_upper_end


def test_a_plateau_across_the_retain_boundary_ends_the_first_bisection_early():
    forget = [max(0.0, 60.0 - 10 * i) for i in range(21)]
    retain = [100.0] * 16 + [50.0] * 5
    curve = RecordedCurve([Evaluation(f, r) for f, r in zip(forget, retain, strict=True)])

    result = search(curve)

    assert result.lam == 0.3
    # Forgetting everything cannot be beaten, so 0.5 (forget 0) ends the bracket like an
    # infeasible point; 0.25, 0.35, 0.3 find where forget reaches 0, and nothing is probed.
    assert curve.calls == [0.0, 0.5, 0.25, 0.35, 0.3]


def test_at_upper_end_is_flagged():
    evaluations = [Evaluation(100.0 - i, 100.0) for i in range(21)]

    result = search(RecordedCurve(evaluations))

    assert result.lam == 1.0
    assert result.at_upper_end


def test_reference_is_always_feasible_even_when_everything_else_is_not():
    evaluations = [Evaluation(50.0, 100.0)] + [Evaluation(0.0, 10.0)] * 20

    result = search(RecordedCurve(evaluations))

    assert result.lam == 0.0
    assert result.evaluation == result.reference == evaluations[0]


def test_history_keeps_evaluation_order_and_evaluations_are_sorted():
    evaluations = [Evaluation(100.0 - 3 * i, 100.0 - i) for i in range(21)]
    curve = RecordedCurve(evaluations)
    reported = []

    result = search(curve, on_evaluation=lambda lam, ev: reported.append((lam, ev)))

    assert [lam for lam, _ in result.history] == curve.calls
    assert reported == list(result.history)
    assert [lam for lam, _ in result.evaluations] == sorted(curve.calls)
    assert all(curve.by_lambda[lam] == ev for lam, ev in result.evaluations)
    assert result.history[0] == (0.0, evaluations[0])


def test_to_dict_is_json_serialisable():
    evaluations = [Evaluation(80.0 - i, 100.0 - i / 2, 70.0) for i in range(21)]

    result = search(RecordedCurve(evaluations), "holdout-match")
    report = json.loads(json.dumps(result.to_dict()))

    assert report["lambda"] == result.lam == 0.5
    assert report["rule"] == "holdout-match"
    assert report["retain_ratio"] == 0.95
    assert report["strategy"] == "fast"
    assert report["n_evaluated"] == len(report["evaluations"]) == result.n_evaluated
    assert report["evaluation"] == {"forget_acc": 70.0, "retain_acc": 95.0, "holdout_acc": 70.0}
    assert [row["lambda"] for row in report["evaluations"]] == sorted(report["evaluation_order"])


def test_holdout_match_requires_holdout_accuracy():
    evaluations = [Evaluation(50.0 - i, 100.0) for i in range(21)]

    for strategy in ("fast", "grid"):
        with pytest.raises(ValueError, match="holdout_acc"):
            search(RecordedCurve(evaluations), "holdout-match", strategy=strategy)


def test_evaluate_must_return_an_evaluation():
    with pytest.raises(TypeError, match="Evaluation"):
        search(lambda lam: {"forget_acc": 1.0, "retain_acc": 1.0})


@pytest.mark.parametrize(
    ("arguments", "parameter"),
    [
        ({"retain_ratio": 1.5}, "retain_ratio"),
        ({"retain_ratio": 0.0}, "retain_ratio"),
        ({"retain_ratio": math.nan}, "retain_ratio"),
        ({"rule": "lowest-forget"}, "rule"),
        ({"strategy": "random"}, "strategy"),
        ({"grid": []}, "grid"),
        ({"grid": [0.0, 0.5, 0.25]}, "grid"),
        ({"grid": [0.0, 0.5, 0.5]}, "grid"),
        ({"grid": [0.1, 0.5]}, "grid"),
        ({"grid": [0.0, math.inf]}, "grid"),
    ],
)
def test_bad_arguments_name_the_parameter(arguments, parameter):
    curve = RecordedCurve([Evaluation(1.0, 1.0, 1.0)] * len(GRID))

    with pytest.raises(ValueError, match=parameter):
        search(curve, **arguments)
    assert curve.calls == []


def test_unknown_names_list_the_valid_ones():
    def evaluate(lam):
        return Evaluation(1.0, 1.0)

    with pytest.raises(ValueError, match="holdout-match.*retain-threshold"):
        search(evaluate, rule="nope")
    with pytest.raises(ValueError, match="fast.*grid"):
        search(evaluate, strategy="nope")


@pytest.mark.parametrize(
    ("arguments", "parameter"),
    [
        ({"points": 1}, "points"),
        ({"start": 1.0, "stop": 0.0}, "start"),
        ({"stop": math.nan}, "stop"),
    ],
)
def test_bad_grid_arguments_name_the_parameter(arguments, parameter):
    with pytest.raises(ValueError, match=parameter):
        lambda_grid(**arguments)


@pytest.mark.parametrize("value", [-1.0, math.nan, math.inf])
def test_evaluation_rejects_impossible_accuracies(value):
    with pytest.raises(ValueError, match="forget_acc"):
        Evaluation(value, 1.0)


def test_lambda_grid_uses_exact_decimals():
    assert lambda_grid() == [i / 20 for i in range(21)]
    assert lambda_grid()[3] == 0.15
    assert lambda_grid(0.0, 2.0, 5) == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert lambda_grid(0.0, 0.3, 4) == [0.0, 0.1, 0.2, 0.3]


def test_the_default_grid_reaches_2_and_extends_to_4_then_8():
    grid = default_grid()
    assert len(grid) == 41 and grid[1] == 0.05 and grid[-1] == 2.0
    first = extend_grid(grid)
    assert first == [round(2.0 + 0.1 * k, 10) for k in range(1, 21)]
    second = extend_grid(grid + first)
    assert second[0] == 4.2 and second[-1] == 8.0 and len(second) == 20
    assert extend_grid(grid + first + second) == []  # MAX_LAMBDA reached
    assert extend_grid([0.0, 1.0], max_lambda=1.5) == []  # 2.0 would pass the cap


def forgets_until_retain_breaks(at: float):
    """Forget falls with lambda (never to 0); retain holds up to `at`, then collapses."""

    def evaluate(lam: float) -> Evaluation:
        return Evaluation(max(1.0, 100.0 - 10 * lam), 100.0 if lam <= at else 50.0)

    return evaluate


@pytest.mark.parametrize("strategy", ["fast", "grid"])
def test_a_choice_at_the_upper_end_extends_the_grid(strategy):
    result = search_lambda(forgets_until_retain_breaks(3.0), strategy=strategy)
    assert result.lam == 3.0 and not result.at_upper_end
    assert result.extensions == 1 and result.grid_size == 61
    if strategy == "fast":  # a third of the grid, and refinement's points on top
        assert result.n_evaluated - len(result.refined) <= 61 / 3

    stopped = search_lambda(forgets_until_retain_breaks(3.0), strategy=strategy, max_extensions=0)
    assert stopped.lam == 2.0 and stopped.at_upper_end and stopped.extensions == 0


def test_extension_is_bounded_by_max_lambda():
    result = search_lambda(forgets_until_retain_breaks(100.0))
    assert result.lam == 8.0 and result.at_upper_end and result.extensions == 2
    assert all(lam <= 8.0 for lam, _ in result.history)
    capped = search_lambda(forgets_until_retain_breaks(100.0), max_lambda=3.0)
    assert capped.lam == 3.0 and capped.extensions == 1


def test_a_fully_forgotten_upper_end_needs_no_extension():
    result = search_lambda(lambda lam: Evaluation(0.0 if lam >= 2.0 else 50.0, 100.0))
    assert result.lam == 2.0 and result.extensions == 0


def test_a_better_grid_neighbour_of_the_choice_is_found_where_the_signal_rises():
    # Recorded on sample deletion (bench/experiments.py, a single task vector): held-out
    # accuracy falls faster than forget accuracy, so forget - held-out rises after 0.05, the
    # exact match the bisection steps over.
    grid = default_grid()
    forget = [95.0, 94.0, 93.0, 93.0, 93.0, 93.0, 93.0] + [92.0] * 34
    holdout = [94.0, 94.0, 92.5, 92.0, 91.5, 90.5, 90.0] + [89.0] * 34
    evaluations = [Evaluation(f, h, h) for f, h in zip(forget, holdout, strict=True)]
    for strategy in ("fast", "grid"):
        curve = RecordedCurve(evaluations, grid)
        result = search(curve, "holdout-match", strategy=strategy, grid=grid)
        assert result.lam == brute_force_lambda(evaluations, grid, holdout=True) == 0.05
        assert_each_lambda_evaluated_once(curve)


def test_ties_before_a_better_point_are_walked_across():
    # Recorded on sample deletion (NegMerge, seed 0): forget - held-out is 1, 1, 1, then 0.5.
    grid = default_grid()
    # fmt: off
    forget = [95.0, 95.0, 95.0, 94.0, 94.0, 94.0, 94.0, 94.0, 94.0, 94.0, 94.0, 93.0, 93.0, 93.0,
              92.0, 91.0, 90.0, 90.0, 90.0, 90.0, 90.0, 89.0, 89.0, 88.0, 88.0, 87.0, 86.0, 85.0,
              82.0, 80.0, 79.0, 80.0, 78.0, 77.0, 78.0, 77.0, 75.0, 74.0, 72.0, 69.0, 67.0]
    holdout = [94.0, 94.0, 94.0, 93.5, 93.0, 92.5, 92.5, 92.0, 91.5, 90.5, 90.5, 90.5, 89.5, 89.5,
               89.0, 88.0, 87.5, 86.0, 85.5, 84.5, 83.5, 83.5, 83.5, 82.0, 81.0, 80.0, 80.0, 79.0,
               77.0, 76.0, 74.5, 73.0, 71.0, 70.0, 68.0, 66.5, 65.0, 63.5, 63.0, 60.5, 60.0]
    # fmt: on
    evaluations = [Evaluation(f, h, h) for f, h in zip(forget, holdout, strict=True)]
    curve = RecordedCurve(evaluations, grid)

    result = search(curve, "holdout-match", grid=grid)

    assert result.lam == brute_force_lambda(evaluations, grid, holdout=True) == 0.15
    assert len(curve.calls) <= len(grid) / 3
    assert_each_lambda_evaluated_once(curve)


def test_an_extension_adds_at_most_half_the_grid():
    """Twice the last spacing of a grid whose last points are close would add millions of
    lambdas (each one an evaluation); an extension adds at most half the grid's points."""
    assert extend_grid([0.0, 1.0, 1.0000001]) == [2.0000002]
    grid = lambda_grid(0.0, 1.0, 11)
    assert len(extend_grid(grid)) == 5  # 0.2 apart to 2.0 would be 5 points anyway
    assert extended_grid(grid, max_extensions=2)[-6:] == [2.0, 2.4, 2.8, 3.2, 3.6, 4.0]


@pytest.mark.parametrize("strategy", ["fast", "grid"])
def test_confidence_match_sees_what_accuracy_cannot(strategy):
    # Sample deletion on a model that generalises: forget accuracy sits at held-out accuracy
    # for every lambda, so holdout-match keeps lambda 0; the forget set's confidence starts
    # above held-out's and falls to it at lambda 0.3 (GRID[6]), which confidence-match finds.
    evaluations = [
        Evaluation(90.0, 92.0, 90.0, forget_conf=96.0 - i, holdout_conf=90.0) for i in range(21)
    ]
    assert search(RecordedCurve(evaluations), "holdout-match", strategy=strategy).lam == 0
    found = search(RecordedCurve(evaluations), "confidence-match", strategy=strategy)
    assert found.lam == GRID[6] and found.evaluation.forget_conf == pytest.approx(90.0)


def test_confidence_match_requires_confidences():
    evaluations = [Evaluation(50.0, 100.0, 50.0) for _ in range(21)]
    with pytest.raises(ValueError, match="forget_conf and holdout_conf"):
        search(RecordedCurve(evaluations), "confidence-match")


class RecordedFunction:
    """An evaluate() defined for every lambda, not only grid points; records every call."""

    def __init__(self, evaluate) -> None:
        self._evaluate = evaluate
        self.calls: list[float] = []

    def __call__(self, lam: float) -> Evaluation:
        self.calls.append(lam)
        return self._evaluate(lam)


def cliff(lam: float) -> Evaluation:
    """Forget accuracy falls slowly, then off a cliff at 1.01, between the grid points 1.0 and
    1.05; retain accuracy crosses its threshold (95 of 100) just past it, at 1.02."""
    return Evaluation(50.0 - 10 * lam if lam < 1.01 else 5.0, 100.0 if lam <= 1.02 else 90.0)


@pytest.mark.parametrize("strategy", ["fast", "grid"])
def test_refinement_finds_the_cliff_between_grid_points(strategy):
    curve = RecordedFunction(cliff)

    result = search_lambda(curve, strategy=strategy)

    # 1.025 infeasible, 1.0125 feasible (past the cliff), 1.01875 feasible, 1.021875 not.
    assert result.refined == (1.025, 1.0125, 1.01875, 1.021875)
    assert result.lam == 1.0125 and result.evaluation.forget_acc == 5.0  # the smallest of ties
    assert curve.calls[-4:] == list(result.refined)
    assert_each_lambda_evaluated_once(curve)
    assert result.to_dict()["refined"] == list(result.refined)
    assert json.loads(json.dumps(result.to_dict()))["lambda"] == 1.0125


@pytest.mark.parametrize("strategy", ["fast", "grid"])
def test_refine_0_is_the_search_on_grid_points_alone(strategy):
    without = search_lambda(RecordedFunction(cliff), strategy=strategy, refine=0)
    assert without.lam == 1.0 and without.evaluation.forget_acc == 40.0
    assert without.refined == () and without.to_dict()["refined"] == []
    assert {lam for lam, _ in without.history} <= set(default_grid())


@FEW_EXAMPLES
@given(monotone_curves(), st.sampled_from(["fast", "grid"]))
def test_refinement_only_adds_evaluations_after_the_grid_search(evaluations, strategy):
    """On a curve that is a step function between grid points, refinement comes after the
    search of refine=0, evaluation for evaluation, and its choice is never worse by the rule."""

    def step(lam: float) -> Evaluation:
        return evaluations[max(i for i, point in enumerate(GRID) if point <= lam)]

    without = search(step, strategy=strategy)
    curve = RecordedFunction(step)
    refined = search(curve, strategy=strategy, refine=4)

    assert refined.history[: without.n_evaluated] == without.history
    assert refined.history[without.n_evaluated :] == tuple(
        (lam, step(lam)) for lam in refined.refined
    )
    assert refined.evaluation.forget_acc <= without.evaluation.forget_acc
    assert refined.evaluation.retain_acc >= 0.95 * refined.reference.retain_acc
    assert_each_lambda_evaluated_once(curve)


def test_nothing_infeasible_above_the_choice_needs_no_refinement():
    # Retain never falls: the choice is the grid's end, with nothing above it to bracket.
    curve = RecordedFunction(lambda lam: Evaluation(100.0 - 10 * lam, 100.0))
    result = search(curve, refine=4)
    assert result.lam == 1.0 and result.refined == ()
    assert len(curve.calls) == result.n_evaluated


@pytest.mark.parametrize("strategy", ["fast", "grid"])
def test_a_choice_nothing_can_beat_needs_no_refinement(strategy):
    # Forgotten entirely at 0.5, infeasible from 0.75 on: no refined point could do better.
    def evaluate(lam: float) -> Evaluation:
        return Evaluation(0.0 if lam >= 0.5 else 50.0, 100.0 if lam < 0.75 else 50.0)

    with_refine = search(RecordedFunction(evaluate), strategy=strategy, refine=4)
    without = search(RecordedFunction(evaluate), strategy=strategy)
    assert with_refine.lam == without.lam == 0.5
    assert with_refine.refined == () and with_refine.history == without.history


@pytest.mark.parametrize("strategy", ["fast", "grid"])
def test_holdout_match_refines_only_while_forget_is_above_held_out(strategy):
    def still_above(lam: float) -> Evaluation:  # forget falls to held-out's 80 only at 1.01
        return Evaluation(90.0 if lam < 1.01 else 80.0, 100.0 if lam <= 1.02 else 90.0, 80.0)

    found = search(still_above, "holdout-match", strategy=strategy, grid=default_grid(), refine=4)
    assert found.lam == 1.0125 and found.evaluation.forget_acc == 80.0

    def overshot(lam: float) -> Evaluation:  # forget at held-out's by 0.5, then below it
        forget = 90.0 if lam < 0.5 else (80.0 if lam < 0.6 else 70.0)
        return Evaluation(forget, 100.0 if lam <= 1.02 else 90.0, 80.0)

    kept = search(overshot, "holdout-match", strategy=strategy, grid=default_grid(), refine=4)
    assert kept.lam == 0.5 and kept.refined == ()


@FEW_EXAMPLES
@given(
    st.lists(st.floats(0.0, 9.0), min_size=1, max_size=6),
    st.lists(st.floats(0.0, 9.0), min_size=1, max_size=6),
    st.sampled_from(["fast", "grid"]),
    st.integers(0, 8),
)
def test_refinement_evaluates_each_lambda_once_within_the_bound(
    retain_drops, forget_drops, strategy, refine
):
    """Step curves with their steps anywhere (on grid points, between them, past the grid's
    extensions): no lambda twice, and no more evaluations than the request bound counts."""

    def evaluate(lam: float) -> Evaluation:
        forget = 100.0 - 15 * sum(lam >= at for at in forget_drops)
        return Evaluation(max(forget, 0.0), 100.0 - 3 * sum(lam >= at for at in retain_drops))

    curve = RecordedFunction(evaluate)
    result = search_lambda(curve, strategy=strategy, refine=refine)

    assert_each_lambda_evaluated_once(curve)
    assert len(curve.calls) == result.n_evaluated <= most_evaluations(default_grid(), 2, 8, refine)
    assert len(result.refined) <= refine


@pytest.mark.parametrize("refine", [-1, 9, 1.5])
def test_refine_is_an_integer_from_0_to_8(refine):
    with pytest.raises(ValueError, match="refine must be an integer from 0 to 8"):
        search_lambda(cliff, refine=refine)
