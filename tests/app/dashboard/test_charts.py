"""The lambda curve's geometry, without a server."""

from __future__ import annotations

from app.dashboard.charts import HEIGHT, WIDTH, lambda_curve_chart


def curve(*points: tuple[float, float, float]) -> list[dict]:
    return [{"lambda": lam, "forget_acc": f, "retain_acc": r} for lam, f, r in points]


def test_nothing_to_draw_gives_no_chart():
    assert lambda_curve_chart(None, None, 0.95) is None
    assert lambda_curve_chart([], 0.1, 0.95) is None
    assert lambda_curve_chart([{"forget_acc": 1.0}], 0.1, 0.95) is None


def test_points_stay_inside_the_plot_and_the_markers_sit_on_their_values():
    points = curve((0.0, 100.0, 90.0), (0.5, 40.0, 88.0), (1.0, 0.0, 60.0))
    chart = lambda_curve_chart(points, 0.5, 0.95)
    assert chart is not None
    assert [s.key for s in chart.series] == ["forget", "retain"]
    for series in chart.series:
        assert [p.lam for p in series.points] == [0.0, 0.5, 1.0]
        for p in series.points:
            assert chart.left <= p.x <= chart.right and chart.top <= p.y <= chart.bottom
    forget = chart.series[0].points
    assert forget[0].y < forget[1].y < forget[2].y  # higher accuracy is drawn higher
    assert chart.threshold is not None and chart.threshold.value == 0.95 * 90.0
    assert chart.chosen is not None and chart.chosen.at == forget[1].x
    assert {p.value for p in chart.chosen_points} == {40.0, 88.0}
    assert chart.y_ticks[-1].label == "100%"
    assert (chart.width, chart.height) == (WIDTH, HEIGHT)


def test_fractions_are_drawn_on_a_zero_to_one_axis_and_holdout_when_given():
    points = [
        {"lambda": 0.0, "forget_acc": 0.9, "retain_acc": 0.8, "holdout_acc": 0.5},
        {"lambda": 0.2, "forget_acc": 0.5, "retain_acc": 0.78, "holdout_acc": 0.5},
    ]
    chart = lambda_curve_chart(points, 0.2, None)
    assert chart is not None
    assert chart.y_ticks[-1].label == "1" and chart.y_label == "accuracy"
    assert [s.key for s in chart.series] == ["forget", "retain", "holdout"]
    assert chart.threshold is None  # no retain ratio known


def test_one_point_still_has_a_width():
    chart = lambda_curve_chart(curve((0.0, 50.0, 50.0)), 0.0, 0.95)
    assert chart is not None
    (point,) = chart.series[0].points
    assert chart.left < point.x < chart.right
