import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from negmerge.search import Evaluation, lambda_grid, search_lambda

GRID = lambda_grid()
FEW_EXAMPLES = settings(max_examples=150, deadline=None)


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

    fast_result = search_lambda(fast)
    grid_result = search_lambda(grid, strategy="grid")

    expected = brute_force_lambda(evaluations)
    assert fast_result.lam == grid_result.lam == expected
    assert not fast_result.fell_back_to_grid
    assert_each_lambda_evaluated_once(fast)
    # No exact method can promise fewer than 9 once forget accuracy has plateaus.
    assert fast_result.n_evaluated == len(fast.calls) <= 10
    assert grid_result.n_evaluated == len(grid.calls) == len(GRID)


@FEW_EXAMPLES
@given(monotone_curves(strict_forget=True))
def test_fast_needs_a_third_of_the_grid_when_forget_falls_strictly(evaluations):
    curve = RecordedCurve(evaluations)

    result = search_lambda(curve)

    assert result.lam == brute_force_lambda(evaluations)
    assert len(curve.calls) <= math.ceil(len(GRID) / 3)


@FEW_EXAMPLES
@given(st.integers(2, 41).flatmap(lambda size: st.tuples(st.just(size), monotone_curves(size))))
def test_fast_matches_brute_force_on_other_grids(size_and_evaluations):
    size, evaluations = size_and_evaluations
    grid = lambda_grid(0.0, 2.0, size)
    curve = RecordedCurve(evaluations, grid)

    result = search_lambda(curve, grid=grid, retain_ratio=0.9)

    assert result.lam == brute_force_lambda(evaluations, grid, retain_ratio=0.9)
    assert_each_lambda_evaluated_once(curve)
    assert len(curve.calls) <= 2 * math.ceil(math.log2(size)) + 1


@FEW_EXAMPLES
@given(holdout_curves(), st.sampled_from(["fast", "grid"]))
def test_holdout_match_matches_brute_force(evaluations, strategy):
    curve = RecordedCurve(evaluations)

    result = search_lambda(curve, "holdout-match", strategy=strategy)

    assert result.lam == brute_force_lambda(evaluations, holdout=True)
    assert not result.fell_back_to_grid
    assert_each_lambda_evaluated_once(curve)
    if strategy == "fast":
        assert len(curve.calls) <= 10


def test_non_monotone_curve_falls_back_and_matches_grid():
    # Forget accuracy falls, except for a bump at 0.5 (the first bisection point) and a dip at
    # 0.15 that is the true optimum.
    forget = [90.0 - 2 * i for i in range(21)]
    forget[10] = 95.0
    forget[3] = 1.0
    retain = [100.0] * 12 + [50.0] * 9
    evaluations = [Evaluation(f, r) for f, r in zip(forget, retain, strict=True)]
    curve = RecordedCurve(evaluations)

    result = search_lambda(curve)

    assert result.fell_back_to_grid
    assert result.lam == brute_force_lambda(evaluations) == 0.15
    assert sorted(curve.calls) == GRID
    assert_each_lambda_evaluated_once(curve)


def test_rising_retain_accuracy_falls_back_to_the_grid():
    forget = [90.0 - 2 * i for i in range(21)]
    retain = [100.0] * 21
    retain[10], retain[12], retain[15] = 96.0, 99.0, 50.0
    evaluations = [Evaluation(f, r) for f, r in zip(forget, retain, strict=True)]
    curve = RecordedCurve(evaluations)

    result = search_lambda(curve)

    assert result.fell_back_to_grid
    assert result.lam == brute_force_lambda(evaluations) == 1.0
    assert_each_lambda_evaluated_once(curve)


def test_retain_rising_above_its_reference_at_small_lambda_needs_no_fallback():
    """The usual real curve: negating a little improves retain accuracy before it falls."""
    forget = [90.0 - 3 * i for i in range(21)]
    retain = [95.0, 96.0, 96.5, 96.5, 96.0] + [95.0 - 0.5 * i for i in range(16)]
    evaluations = [Evaluation(f, r) for f, r in zip(forget, retain, strict=True)]
    curve = RecordedCurve(evaluations)

    result = search_lambda(curve)

    assert not result.fell_back_to_grid
    assert result.lam == brute_force_lambda(evaluations)
    assert len(curve.calls) <= 7
    assert_each_lambda_evaluated_once(curve)


def test_retain_exactly_at_the_threshold_is_feasible():
    retain = [100.0] * 11 + [95.0] + [94.99] * 9
    forget = [100.0 - 4 * i for i in range(21)]
    evaluations = [Evaluation(f, r) for f, r in zip(forget, retain, strict=True)]

    for strategy in ("fast", "grid"):
        result = search_lambda(RecordedCurve(evaluations), strategy=strategy)
        assert result.lam == 0.55
        assert result.retain_threshold == 95.0


def test_threshold_equality_holds_for_fractions_too():
    evaluations = [Evaluation(0.5, 1.0), Evaluation(0.2, 0.95), Evaluation(0.1, 0.9)]
    grid = [0.0, 0.5, 1.0]

    result = search_lambda(RecordedCurve(evaluations, grid), grid=grid)

    assert result.lam == 0.5


def test_plateau_ties_go_to_the_smaller_lambda():
    forget = [max(0.0, 60.0 - 10 * i) for i in range(21)]
    evaluations = [Evaluation(f, 100.0) for f in forget]

    result = search_lambda(RecordedCurve(evaluations))

    assert result.lam == 0.3
    assert not result.at_upper_end


def test_a_plateau_across_the_retain_boundary_ends_the_first_bisection_early():
    forget = [max(0.0, 60.0 - 10 * i) for i in range(21)]
    retain = [100.0] * 16 + [50.0] * 5
    curve = RecordedCurve([Evaluation(f, r) for f, r in zip(forget, retain, strict=True)])

    result = search_lambda(curve)

    assert result.lam == 0.3
    # 0, 0.5, 0.75 feasible, 0.9 not but equally forgotten; then 0.25, 0.35, 0.3 find the start.
    assert curve.calls == [0.0, 0.5, 0.75, 0.9, 0.25, 0.35, 0.3]


def test_at_upper_end_is_flagged():
    evaluations = [Evaluation(100.0 - i, 100.0) for i in range(21)]

    result = search_lambda(RecordedCurve(evaluations))

    assert result.lam == 1.0
    assert result.at_upper_end


def test_reference_is_always_feasible_even_when_everything_else_is_not():
    evaluations = [Evaluation(50.0, 100.0)] + [Evaluation(0.0, 10.0)] * 20

    result = search_lambda(RecordedCurve(evaluations))

    assert result.lam == 0.0
    assert result.evaluation == result.reference == evaluations[0]


def test_history_keeps_evaluation_order_and_evaluations_are_sorted():
    evaluations = [Evaluation(100.0 - 3 * i, 100.0 - i) for i in range(21)]
    curve = RecordedCurve(evaluations)
    reported = []

    result = search_lambda(curve, on_evaluation=lambda lam, ev: reported.append((lam, ev)))

    assert [lam for lam, _ in result.history] == curve.calls
    assert reported == list(result.history)
    assert [lam for lam, _ in result.evaluations] == sorted(curve.calls)
    assert all(curve.by_lambda[lam] == ev for lam, ev in result.evaluations)
    assert result.history[0] == (0.0, evaluations[0])


def test_to_dict_is_json_serialisable():
    evaluations = [Evaluation(80.0 - i, 100.0 - i / 2, 70.0) for i in range(21)]

    result = search_lambda(RecordedCurve(evaluations), "holdout-match")
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
            search_lambda(RecordedCurve(evaluations), "holdout-match", strategy=strategy)


def test_evaluate_must_return_an_evaluation():
    with pytest.raises(TypeError, match="Evaluation"):
        search_lambda(lambda lam: {"forget_acc": 1.0, "retain_acc": 1.0})


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
        search_lambda(curve, **arguments)
    assert curve.calls == []


def test_unknown_names_list_the_valid_ones():
    def evaluate(lam):
        return Evaluation(1.0, 1.0)

    with pytest.raises(ValueError, match="holdout-match.*retain-threshold"):
        search_lambda(evaluate, rule="nope")
    with pytest.raises(ValueError, match="fast.*grid"):
        search_lambda(evaluate, strategy="nope")


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
