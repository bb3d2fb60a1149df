"""The data of the learning-curve figures, as pure functions from the records of metrics.jsonl to
lists of numbers, so that what a figure draws can be checked without reading pixels
(``scripts/plot.py`` draws them; ``scripts/summarize.py`` shares ``merge_identical``).

    panels = curve_panels({"run": records})           # one run: the line and its 95% CI band
    panels = curve_panels({"lr=0.1": [r0, r1], ...})  # a sweep: mean over seeds, band min..max
    for panel in panels: panel.title, panel.scale, panel.curves

A panel is one DISTINCT metric: ``train/loss`` and each ``val/<m>``; metrics whose values are equal
at every point (a regression's loss and mse) share one panel titled with both names. The y-axis is
logarithmic only where every line is positive and spans more than a decade; a band's lower edge that
such an axis cannot draw (<= 0) is raised to the lowest value drawn on it, never to an arbitrary floor.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple, TypeVar

from metalab.training.records import numeric_points

__all__ = [
    "TRAIN_LOSS",
    "Curve",
    "Panel",
    "axis_scale",
    "curve_panels",
    "make_panel",
    "marker_style",
    "merge_identical",
    "metric_keys",
    "run_curve",
    "seeds_curve",
]

#: The training metric drawn beside the validation metrics.
TRAIN_LOSS = "train/loss"
#: A line spanning more than this ratio (max / min) gets a log axis when it is positive.
DECADE = 10.0
#: Curves with at most this many points are drawn with a marker at each point.
MARKED_POINTS = 25

T = TypeVar("T")


class Curve(NamedTuple):
    """One line of a panel: ``y`` against ``x``, and its band from ``lo`` to ``hi`` (None: no band)."""

    label: str
    x: list[float]
    y: list[float]
    lo: list[float] | None = None
    hi: list[float] | None = None


class Panel(NamedTuple):
    """One axis of the figure: the metric keys it shows (several when their values are identical),
    its title, its curves (one per run or per swept setting) and "log" or "linear"."""

    keys: tuple[str, ...]
    curves: list[Curve]
    scale: str

    @property
    def title(self) -> str:
        return " = ".join(self.keys)


def metric_keys(records: Iterable[dict[str, Any]]) -> list[str]:
    """``train/loss`` (when logged), then every ``val/<m>`` but the ``_ci95`` half-widths: ``val/loss``
    first (beside the training loss), the others sorted."""
    keys = {key for record in records for key in record}
    val = sorted(
        (k for k in keys if k.startswith("val/") and not k.endswith("_ci95")), key=lambda k: (k != "val/loss", k)
    )
    return [TRAIN_LOSS] * (TRAIN_LOSS in keys) + val


def _half_width(record: dict[str, Any], key: str) -> float:
    """The logged 95% CI half-width of ``key``, 0 where it is missing or null (NaN)."""
    value = record.get(f"{key}_ci95")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def run_curve(records: Sequence[dict[str, Any]], key: str, label: str) -> Curve | None:
    """``key`` against the iteration in one run, with the band mean ± the logged 95% CI where the
    records hold ``<key>_ci95`` (the validation metrics); None when no record holds a number for it."""
    points = numeric_points(records, key)
    if not points:
        return None
    x = [float(i) for i, _, _ in points]
    y = [value for _, value, _ in points]
    if not any(f"{key}_ci95" in record for _, _, record in points):
        return Curve(label, x, y)
    cis = [_half_width(record, key) for _, _, record in points]
    return Curve(label, x, y, [m - c for m, c in zip(y, cis)], [m + c for m, c in zip(y, cis)])


def seeds_curve(runs: Sequence[Sequence[dict[str, Any]]], key: str, label: str) -> Curve | None:
    """``key`` against the iteration over the runs of one setting (its seeds): the mean over the runs
    that logged that iteration, the band from the lowest to the highest (None with one run)."""
    by_iteration: dict[float, list[float]] = {}
    for records in runs:
        for iteration, value, _ in numeric_points(records, key):
            by_iteration.setdefault(float(iteration), []).append(value)
    if not by_iteration:
        return None
    x = sorted(by_iteration)
    values = [by_iteration[i] for i in x]
    y = [sum(v) / len(v) for v in values]
    if len(runs) < 2:
        return Curve(label, x, y)
    return Curve(label, x, y, [min(v) for v in values], [max(v) for v in values])


def merge_identical(items: Mapping[str, T], same: Callable[[T], Hashable] = lambda item: item) -> list[tuple[str, ...]]:
    """The names of ``items`` grouped where ``same(item)`` is equal (an exact comparison), in order of
    first appearance: ``{"loss": a, "mse": a, "acc": b}`` -> ``[("loss", "mse"), ("acc",)]``."""
    groups: dict[Hashable, list[str]] = {}
    for name, item in items.items():
        groups.setdefault(same(item), []).append(name)
    return [tuple(names) for names in groups.values()]


def axis_scale(curves: Sequence[Curve]) -> str:
    """ "log" when every value of every line is positive and they span more than a decade, else "linear"."""
    values = [v for curve in curves for v in curve.y]
    if not values or min(values) <= 0:
        return "linear"
    return "log" if max(values) / min(values) > DECADE else "linear"


def _clip_bands(curves: list[Curve]) -> list[Curve]:
    """On a log axis: band lower edges <= 0 raised to the lowest positive value drawn on the axis."""
    drawn = [v for c in curves for v in [*c.y, *(c.lo or []), *(c.hi or [])] if v > 0]
    floor = min(drawn)
    return [c._replace(lo=[max(v, floor) if v <= 0 else v for v in c.lo]) if c.lo else c for c in curves]


def curve_panels(groups: Mapping[str, Sequence[Sequence[dict[str, Any]]]]) -> list[Panel]:
    """The panels of the learning-curve figure of ``groups`` ({label: [records of each run]}): one
    run in all draws its line with its 95% CI band; otherwise each group is drawn by ``seeds_curve``."""
    single = sum(len(runs) for runs in groups.values()) == 1
    keys = metric_keys(record for runs in groups.values() for records in runs for record in records)
    per_key: dict[str, list[Curve]] = {}
    for key in keys:
        curves = [
            run_curve(runs[0], key, label) if single else seeds_curve(runs, key, label)
            for label, runs in groups.items()
        ]
        if drawn := [curve for curve in curves if curve is not None]:
            per_key[key] = drawn
    same = merge_identical(per_key, lambda curves: tuple((c.label, tuple(c.x), tuple(c.y)) for c in curves))
    return [make_panel(names, per_key[names[0]]) for names in same]


def make_panel(keys: tuple[str, ...], curves: list[Curve]) -> Panel:
    """The panel of ``curves``: its scale from ``axis_scale``, and on a log axis the band edges it cannot
    draw (<= 0) raised to the lowest positive value drawn there."""
    scale = axis_scale(curves)
    return Panel(keys, _clip_bands(curves) if scale == "log" else curves, scale)


def marker_style(points: int) -> dict[str, Any]:
    """matplotlib line options: a marker at each point of a short curve (one point draws no line)."""
    return {"marker": "o", "markersize": 4 if points == 1 else 3} if points <= MARKED_POINTS else {}
