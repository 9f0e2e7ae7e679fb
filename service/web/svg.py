"""Plots drawn by the server as inline SVG: line charts of training curves and clean-vs-robust scatters.

No plotting library: a few hundred bytes of SVG per chart, escaped text, a `viewBox` so that a chart
scales to the width of a phone or of a 1280 px window, `<title>` tooltips on every point, and colours
from a palette that stays distinguishable for colour-blind readers (Okabe-Ito). Presentation
attributes only (no `style=`), so the pages' Content-Security-Policy can forbid inline styles.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape

PALETTE = ("#0072b2", "#d55e00", "#009e73", "#cc79a7", "#e69f00", "#56b4e9", "#000000", "#f0e442")

WIDTH, HEIGHT = 560, 300
MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 58, 16, 30, 44


@dataclass
class Series:
    label: str
    points: list[tuple[float, float]]
    dashed: bool = False


@dataclass
class Point:
    x: float
    y: float
    label: str
    href: str | None = None
    highlight: bool = False


@dataclass
class Axis:
    lo: float
    hi: float
    ticks: list[float] = field(default_factory=list)


def _fmt(value: float, percent: bool) -> str:
    if percent:
        return (
            f"{value * 100:.0f}%" if abs(value * 100 - round(value * 100)) < 1e-9 else f"{value * 100:.1f}%"
        )
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 1:
        return f"{value:.4g}"
    return f"{value:.3g}"


def nice_step(span: float, count: int = 5) -> float:
    """A step of 1, 2 or 5 times a power of ten that cuts `span` into about `count` intervals."""
    if span <= 0 or not math.isfinite(span):
        return 1.0
    raw = span / max(count, 1)
    power = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 5, 10):
        if raw <= factor * power:
            return factor * power
    return 10 * power


def nice_axis(values: Sequence[float], *, count: int = 5, floor: float | None = None) -> Axis:
    """An axis covering `values`, its ends on multiples of a nice step, and its ticks."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return Axis(0.0, 1.0, [0.0, 0.5, 1.0])
    lo, hi = min(finite), max(finite)
    if floor is not None:
        lo = min(lo, floor)
    if hi == lo:
        pad = abs(hi) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
        if floor is not None:
            lo = max(lo, floor)
    step = nice_step(hi - lo, count)
    start = math.floor(lo / step + 1e-9) * step
    end = math.ceil(hi / step - 1e-9) * step
    ticks = []
    tick = start
    while tick <= end + step / 2:
        ticks.append(round(tick, 12))
        tick += step
    return Axis(start, end, ticks)


class _Frame:
    def __init__(self, x: Axis, y: Axis, width: int, height: int) -> None:
        self.x, self.y, self.width, self.height = x, y, width, height
        self.left, self.right = MARGIN_L, width - MARGIN_R
        self.top, self.bottom = MARGIN_T, height - MARGIN_B

    def px(self, value: float) -> float:
        span = self.x.hi - self.x.lo or 1.0
        return self.left + (value - self.x.lo) / span * (self.right - self.left)

    def py(self, value: float) -> float:
        span = self.y.hi - self.y.lo or 1.0
        return self.bottom - (value - self.y.lo) / span * (self.bottom - self.top)


def _open(title: str, width: int, height: int, desc: str) -> list[str]:
    return [
        f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
        f'role="img" aria-label="{escape(title)}" preserveAspectRatio="xMidYMid meet">',
        f"<title>{escape(title)}</title>",
        f"<desc>{escape(desc)}</desc>",
        f'<text x="{MARGIN_L}" y="18" class="chart-title" font-size="14" font-weight="600" '
        f'fill="currentColor">{escape(title)}</text>',
    ]


def _axes(frame: _Frame, x_label: str, y_label: str, x_percent: bool, y_percent: bool) -> list[str]:
    out = [
        f'<rect x="{frame.left}" y="{frame.top}" width="{frame.right - frame.left}" '
        f'height="{frame.bottom - frame.top}" fill="none" stroke="#999" stroke-width="1"/>'
    ]
    for tick in frame.y.ticks:
        y = frame.py(tick)
        out.append(
            f'<line x1="{frame.left}" x2="{frame.right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd" '
            'stroke-width="1"/>'
        )
        out.append(
            f'<text x="{frame.left - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11" '
            f'fill="currentColor">{escape(_fmt(tick, y_percent))}</text>'
        )
    for tick in frame.x.ticks:
        x = frame.px(tick)
        out.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{frame.bottom}" y2="{frame.bottom + 4}" stroke="#999"/>'
        )
        out.append(
            f'<text x="{x:.1f}" y="{frame.bottom + 16}" text-anchor="middle" font-size="11" '
            f'fill="currentColor">{escape(_fmt(tick, x_percent))}</text>'
        )
    out.append(
        f'<text x="{(frame.left + frame.right) / 2:.1f}" y="{frame.height - 8}" text-anchor="middle" '
        f'font-size="12" fill="currentColor">{escape(x_label)}</text>'
    )
    mid = (frame.top + frame.bottom) / 2
    out.append(
        f'<text x="14" y="{mid:.1f}" text-anchor="middle" font-size="12" fill="currentColor" '
        f'transform="rotate(-90 14 {mid:.1f})">{escape(y_label)}</text>'
    )
    return out


def _empty(title: str, width: int, height: int, message: str) -> str:
    parts = _open(title, width, height, message)
    parts.append(
        f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" font-size="13" fill="#777">'
        f"{escape(message)}</text>"
    )
    parts.append("</svg>")
    return "".join(parts)


def _legend_layout(labels: Sequence[str], width: int) -> list[tuple[float, int, float]]:
    """(x, row, width) of each legend entry: left to right, wrapping at the chart's right edge."""
    out = []
    x, row = float(MARGIN_L), 0
    for label in labels:
        entry = 22 + 6.5 * len(label)
        if x + entry > width - MARGIN_R and x > MARGIN_L:
            x, row = float(MARGIN_L), row + 1
        out.append((x, row, entry))
        x += entry
    return out


def line_chart(
    series: Sequence[Series],
    *,
    title: str,
    x_label: str = "epoch",
    y_label: str = "",
    percent: bool = False,
    width: int = WIDTH,
    height: int = HEIGHT,
    empty: str = "no data yet",
) -> str:
    """Lines with a marker per point; the legend lists the series in order (colour, then dashes)."""
    drawn = [s for s in series if s.points]
    if not drawn:
        return _empty(title, width, height, empty)
    xs = [x for s in drawn for x, _ in s.points]
    ys = [y for s in drawn for _, y in s.points]
    x_axis = nice_axis(xs, count=min(8, max(1, len(set(xs)))))
    if len(set(xs)) == 1:
        x_axis = Axis(xs[0] - 1, xs[0] + 1, [xs[0]])
    y_axis = nice_axis(ys, floor=0.0 if percent or min(ys) >= 0 else None)
    if percent:
        y_axis.hi = min(y_axis.hi, 1.0) if max(ys) <= 1.0 else y_axis.hi
        y_axis.ticks = [t for t in y_axis.ticks if t <= y_axis.hi + 1e-12]
    legend = _legend_layout([s.label for s in drawn], width)
    frame = _Frame(x_axis, y_axis, width, height)
    frame.top = MARGIN_T + 4 + 14 * (max(row for _, row, _ in legend) + 1)
    desc = "; ".join(f"{s.label}: {len(s.points)} points" for s in drawn)
    parts = _open(title, width, height, desc)
    parts += _axes(frame, x_label, y_label, False, percent)
    for index, (s, (x0, row, _)) in enumerate(zip(drawn, legend)):
        colour = PALETTE[index % len(PALETTE)]
        dash = ' stroke-dasharray="5 3"' if s.dashed or index >= len(PALETTE) else ""
        pts = sorted(s.points)
        path = " ".join(f"{frame.px(x):.1f},{frame.py(y):.1f}" for x, y in pts)
        parts.append(f'<g class="series" data-label="{escape(s.label)}">')
        parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>')
        for x, y in pts:
            parts.append(
                f'<circle cx="{frame.px(x):.1f}" cy="{frame.py(y):.1f}" r="3" fill="{colour}">'
                f"<title>{escape(s.label)}: {escape(_fmt(x, False))} → {escape(_fmt(y, percent))}</title>"
                "</circle>"
            )
        y = MARGIN_T + 2 + 14 * row
        parts.append(
            f'<line x1="{x0}" x2="{x0 + 12}" y1="{y}" y2="{y}" stroke="{colour}" stroke-width="3"{dash}/>'
        )
        parts.append(
            f'<text x="{x0 + 16}" y="{y + 4}" font-size="11" fill="currentColor">{escape(s.label)}</text>'
        )
        parts.append("</g>")
    parts.append("</svg>")
    return "".join(parts)


def scatter(
    points: Sequence[Point],
    *,
    title: str,
    x_label: str,
    y_label: str,
    percent: bool = True,
    front: Sequence[Point] = (),
    width: int = WIDTH,
    height: int = 340,
    empty: str = "nothing to plot",
) -> str:
    """Points (links where they have an `href`), highlighted ones larger, and a front drawn through."""
    if not points:
        return _empty(title, width, height, empty)
    x_axis = nice_axis([p.x for p in points], floor=0.0 if percent else None)
    y_axis = nice_axis([p.y for p in points], floor=0.0 if percent else None)
    frame = _Frame(x_axis, y_axis, width, height)
    parts = _open(title, width, height, f"{len(points)} points")
    parts += _axes(frame, x_label, y_label, percent, percent)
    if len(front) > 1:
        ordered = sorted(front, key=lambda p: p.x)
        path = " ".join(f"{frame.px(p.x):.1f},{frame.py(p.y):.1f}" for p in ordered)
        parts.append(
            f'<polyline class="front" points="{path}" fill="none" stroke="{PALETTE[1]}" stroke-width="1.5" '
            'stroke-dasharray="4 3"/>'
        )
    for p in points:
        colour = PALETTE[1] if p.highlight else PALETTE[0]
        radius = 6 if p.highlight else 4.5
        tip = f"{p.label}: {_fmt(p.x, percent)} {x_label}, {_fmt(p.y, percent)} {y_label}"
        dot = (
            f'<circle class="point" cx="{frame.px(p.x):.1f}" cy="{frame.py(p.y):.1f}" r="{radius}" '
            f'fill="{colour}" fill-opacity="0.8" stroke="#fff" stroke-width="1"><title>{escape(tip)}</title>'
            "</circle>"
        )
        if p.href:
            dot = f'<a href="{escape(p.href)}">{dot}</a>'
        parts.append(dot)
    if front:
        parts.append(
            f'<text x="{frame.right - 4}" y="{frame.top + 14}" text-anchor="end" font-size="11" '
            f'fill="{PALETTE[1]}">- - Pareto front</text>'
        )
    parts.append("</svg>")
    return "".join(parts)
