"""Figures of a benchmark and the table every script of ``bench/`` prints.

A :class:`Metric` is one row: berth's figure and the reference's (containerd,
measured in the same run), each a median and a p99 when it is a
distribution, and their ratio. p99 is nearest-rank: with fewer than 100
samples it is the largest but ``n // 100`` (the maximum under 100 samples).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any


@dataclass
class Figure:
    value: float  # the median for distributions, the figure itself otherwise
    p99: float | None = None
    n: int = 0
    cut_by_budget: bool = False


@dataclass
class Metric:
    name: str
    unit: str
    berth: Figure
    containerd: Figure

    @property
    def cut_by_budget(self) -> bool:
        return self.berth.cut_by_budget or self.containerd.cut_by_budget

    @property
    def ratio(self) -> float | None:
        if not self.containerd.value or math.isnan(self.containerd.value):
            return None
        return self.berth.value / self.containerd.value


def p99(values: list[float]) -> float:
    """Nearest-rank 99th percentile (the maximum for fewer than 100 values)."""
    ordered = sorted(values)
    return ordered[max(0, -(-99 * len(ordered) // 100) - 1)]


def distribution(values: list[float], cut_by_budget: bool = False) -> Figure:
    """Median and p99 of ``values``; NaN when there are none."""
    if not values:
        return Figure(float("nan"), float("nan"), 0, cut_by_budget)
    return Figure(statistics.median(values), p99(values), len(values), cut_by_budget)


def _cell(x: float | None) -> str:
    if x is None:
        return "-"
    if math.isnan(x):
        return "n/a"
    if abs(x) < 10:
        return f"{x:,.2f}"
    return f"{x:,.1f}" if abs(x) < 100 else f"{x:,.0f}"


def format_table(metrics: list[Metric], reference: str = "containerd") -> str:
    """The rows as a fixed-width table; ``*`` marks a figure whose loop was cut by its time budget."""
    header = [
        "metric",
        "berth median",
        "berth p99",
        f"{reference} median",
        f"{reference} p99",
        f"berth/{reference}",
    ]
    rows = [header]
    for m in metrics:
        flag = " *" if m.cut_by_budget else ""
        ratio = "-" if m.ratio is None else f"{m.ratio:.2f}x"
        rows.append(
            [
                f"{m.name} ({m.unit}){flag}",
                _cell(m.berth.value),
                _cell(m.berth.p99),
                _cell(m.containerd.value),
                _cell(m.containerd.p99),
                ratio,
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for i, r in enumerate(rows):
        lines.append(
            "  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)])
        )
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def print_budget_note(metrics: list[Metric], budget: float) -> None:
    """Explain the table's ``*`` marks, if any row has one."""
    if any(m.cut_by_budget for m in metrics):
        print(f"* cut short by the time budget (--budget {budget}s per daemon per phase); see n in --json.")


def rounded(obj: Any) -> Any:
    """``obj`` with every float rounded to 4 decimal places, for JSON output."""
    if isinstance(obj, float):
        return round(obj, 4)
    if isinstance(obj, dict):
        return {k: rounded(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [rounded(v) for v in obj]
    return obj
