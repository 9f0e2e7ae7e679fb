"""The pages' server-side plots (service/web/svg.py): axes, scaling, escaping, legends, empty charts."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

from service.web.svg import Point, Series, line_chart, nice_axis, nice_step, scatter
from service.web.views import pareto_front

NS = {"svg": "http://www.w3.org/2000/svg"}


def parse(svg: str) -> ET.Element:
    return ET.fromstring(svg)  # well-formed XML, or this raises


def test_nice_steps_and_axes_cover_the_data_on_round_ticks() -> None:
    assert [nice_step(span) for span in (1, 7, 0.3, 4500)] == [0.2, 2, 0.1, 1000]
    axis = nice_axis([0.13, 0.87], floor=0.0)
    assert axis.lo == 0.0 and axis.hi >= 0.87 and axis.ticks[0] == 0.0 and axis.ticks[-1] == axis.hi
    steps = {round(b - a, 9) for a, b in zip(axis.ticks, axis.ticks[1:])}
    assert len(steps) == 1
    flat = nice_axis([5.0, 5.0])
    assert flat.lo < 5.0 < flat.hi


def test_a_line_chart_places_points_by_value_and_escapes_labels() -> None:
    svg = line_chart(
        [Series("val <PGD> & co", [(1, 0.2), (2, 0.4), (3, 0.6)]), Series("clean", [(1, 0.5), (3, 0.9)])],
        title="Accuracy",
        percent=True,
    )
    root = parse(svg)
    assert root.get("viewBox") == "0 0 560 300"
    groups = root.findall("svg:g", NS)
    assert [g.get("data-label") for g in groups] == ["val <PGD> & co", "clean"]
    circles = groups[0].findall("svg:circle", NS)
    xs = [float(c.get("cx")) for c in circles]
    ys = [float(c.get("cy")) for c in circles]
    assert xs == sorted(xs) and ys == sorted(ys, reverse=True), "later epochs right, higher accuracy up"
    assert abs((xs[1] - xs[0]) - (xs[2] - xs[1])) < 0.2 and abs((ys[0] - ys[1]) - (ys[1] - ys[2])) < 0.2
    assert "<PGD>" not in svg and "&lt;PGD&gt;" in svg
    assert "style=" not in svg, "no inline styles: the pages' CSP forbids them"
    assert "100%" in svg or "80%" in svg


def test_empty_charts_say_so() -> None:
    svg = line_chart([Series("loss", [])], title="Training loss")
    assert "no data yet" in svg and "<polyline" not in svg
    assert "nothing to plot" in scatter([], title="t", x_label="x", y_label="y")


def test_scatter_links_points_and_draws_the_front() -> None:
    points = [
        Point(0.9, 0.3, "a", href="/experiments/a"),
        Point(0.8, 0.5, "b", href="/experiments/b", highlight=True),
        Point(0.7, 0.4, "c"),
    ]
    front = pareto_front(points)
    assert [p.label for p in front] == ["b", "a"]
    svg = scatter(points, title="clean vs robust", x_label="clean", y_label="robust", front=front)
    root = parse(svg)
    links = [a.get("href") for a in root.iter("{http://www.w3.org/2000/svg}a")]
    assert links == ["/experiments/a", "/experiments/b"]
    radii = [float(r) for r in re.findall(r'class="point"[^>]* r="([0-9.]+)"', svg)]
    assert radii == [4.5, 6.0, 4.5], "the highlighted point is larger"
    assert 'class="front"' in svg
