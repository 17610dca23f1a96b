"""The lambda curve as chart geometry: forget and retain accuracy against lambda, the retain
threshold and the chosen lambda, in SVG user units. The template draws it; computing the
coordinates here keeps the template free of arithmetic and the numbers testable."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

WIDTH, HEIGHT = 720, 370
# Margins around the plot area. Every label sits in them, never over the curves: above the
# plot, the legend (y 14), the retain threshold's label (y 34) and the chosen lambda's (just
# above the plot, at its line).
LEFT, RIGHT, TOP, BOTTOM = 64, 24, 66, 52
LEGEND_ROWS = (14, 34)


@dataclass(frozen=True)
class Point:
    lam: float
    value: float
    x: float
    y: float


@dataclass(frozen=True)
class Series:
    key: str  # forget, retain or holdout: the CSS class of its line
    label: str
    points: list[Point]

    @property
    def polyline(self) -> str:
        return " ".join(f"{p.x:.1f},{p.y:.1f}" for p in self.points)


@dataclass(frozen=True)
class Tick:
    label: str
    at: float  # x for the lambda axis, y for the accuracy axis


@dataclass(frozen=True)
class Marker:
    value: float
    at: float
    label: str


@dataclass(frozen=True)
class CurveChart:
    series: list[Series]
    x_ticks: list[Tick]
    y_ticks: list[Tick]
    y_label: str
    threshold: Marker | None  # a horizontal line at the least acceptable retain accuracy
    chosen: Marker | None  # a vertical line at the chosen lambda
    chosen_points: list[Point]  # where the chosen lambda meets each series
    description: str
    width: int = WIDTH
    height: int = HEIGHT
    legend_rows: tuple[int, int] = LEGEND_ROWS
    left: int = LEFT
    right: int = WIDTH - RIGHT
    top: int = TOP
    bottom: int = HEIGHT - BOTTOM


SERIES = (
    ("forget_acc", "forget", "Forget accuracy"),
    ("retain_acc", "retain", "Retain accuracy"),
    ("holdout_acc", "holdout", "Held-out accuracy"),
)


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def lambda_curve_chart(
    curve: list[dict[str, Any]] | None,
    chosen_lambda: float | None,
    retain_ratio: float | None,
) -> CurveChart | None:
    """The chart of `curve` (the search's evaluations: lambda, forget_acc, retain_acc and
    maybe holdout_acc), or None when there is nothing to draw."""
    rows = [r for r in curve or [] if isinstance(r, dict) and _finite(r.get("lambda")) is not None]
    rows.sort(key=lambda r: float(r["lambda"]))
    if not rows:
        return None
    lambdas = [float(r["lambda"]) for r in rows]
    values = [v for r in rows for key, _, _ in SERIES if (v := _finite(r.get(key))) is not None]
    # Accuracies come in percent or as fractions (negmerge.search.Evaluation allows both).
    y_max = 100.0 if any(v > 1.0 for v in values) else 1.0
    y_max = max([y_max, *values])
    x_min, x_max = min(lambdas), max(lambdas)
    if chosen_lambda is not None:
        x_min, x_max = min(x_min, chosen_lambda), max(x_max, chosen_lambda)
    if x_max == x_min:
        x_min, x_max = x_min - 0.5, x_max + 0.5

    def x_of(lam: float) -> float:
        return LEFT + (lam - x_min) / (x_max - x_min) * (WIDTH - RIGHT - LEFT)

    def y_of(value: float) -> float:
        return (HEIGHT - BOTTOM) - value / y_max * (HEIGHT - BOTTOM - TOP)

    series = []
    for key, css, label in SERIES:
        points = [
            Point(float(r["lambda"]), v, x_of(float(r["lambda"])), y_of(v))
            for r in rows
            if (v := _finite(r.get(key))) is not None
        ]
        if points:
            series.append(Series(css, label, points))

    unit = "%" if y_max > 1.0 else ""
    x_ticks = [
        Tick(_fmt(lam), x_of(lam)) for lam in (x_min + i * (x_max - x_min) / 5 for i in range(6))
    ]
    y_ticks = [Tick(f"{_fmt(y_max * i / 5)}{unit}", y_of(y_max * i / 5)) for i in range(6)]

    threshold = None
    reference = next((r for r in rows if float(r["lambda"]) == 0.0), None)
    reference_retain = _finite(reference.get("retain_acc")) if reference else None
    if retain_ratio is not None and reference_retain is not None:
        value = retain_ratio * reference_retain
        threshold = Marker(
            value,
            y_of(value),
            f"retain threshold {_fmt(value)}{unit} ({_fmt(retain_ratio)} × retain at λ = 0)",
        )

    chosen, chosen_points = None, []
    if chosen_lambda is not None:
        chosen = Marker(chosen_lambda, x_of(chosen_lambda), f"chosen λ = {_fmt(chosen_lambda)}")
        chosen_points = [p for s in series for p in s.points if p.lam == chosen_lambda]

    return CurveChart(
        series=series,
        x_ticks=x_ticks,
        y_ticks=y_ticks,
        y_label="accuracy" + (" (%)" if unit else ""),
        threshold=threshold,
        chosen=chosen,
        chosen_points=chosen_points,
        description=_describe(series, chosen, threshold, unit),
    )


def _describe(
    series: list[Series], chosen: Marker | None, threshold: Marker | None, unit: str
) -> str:
    """The chart in words, for screen readers."""
    parts = []
    for s in series:
        first, last = s.points[0], s.points[-1]
        parts.append(
            f"{s.label} goes from {_fmt(first.value)}{unit} at λ = {_fmt(first.lam)} "
            f"to {_fmt(last.value)}{unit} at λ = {_fmt(last.lam)}."
        )
    if threshold is not None:
        parts.append(f"The retain threshold is {_fmt(threshold.value)}{unit}.")
    if chosen is not None:
        parts.append(f"The chosen λ is {_fmt(chosen.value)}.")
    return " ".join(parts)
