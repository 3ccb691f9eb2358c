"""A per-sample bar chart drawn with Pillow (no plotting library needed): the evaluation's area-ratio plot."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw

from kontext.evaluation.grid import font

# Colour-blind-safe series colours (Okabe-Ito).
SERIES_COLORS = [(0, 114, 178), (230, 159, 0), (0, 158, 115), (204, 121, 167), (86, 180, 233), (213, 94, 0)]
REFERENCE_COLOR = (200, 0, 0)
AXIS_COLOR = (0, 0, 0)
GRID_COLOR = (225, 225, 225)
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 56, 16, 40, 56


@dataclass(frozen=True)
class BarLayout:
    """Where :func:`bar_chart` put things, in image pixels.

    Attributes:
        y_min, y_max: the value range of the y axis.
        top, bottom: pixel rows of ``y_max`` and ``y_min``.
        bars: ``bars[series][sample]`` = (x0, x1) column span of that bar.
    """

    y_min: float
    y_max: float
    top: int
    bottom: int
    bars: list[list[tuple[int, int]]]

    def y_of(self, value: float) -> int:
        """Pixel row of ``value`` on the y axis."""
        frac = (value - self.y_min) / (self.y_max - self.y_min)
        return int(round(self.bottom - frac * (self.bottom - self.top)))


def nice_step(span: float, ticks: int = 5) -> float:
    """A 1/2/5 x 10^k tick step giving about ``ticks`` intervals over ``span``."""
    raw = max(span, 1e-12) / ticks
    k = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 5, 10):
        if raw <= m * k:
            return m * k
    return 10 * k


def bar_chart(
    labels: Sequence[str],
    series: Mapping[str, Sequence[float]],
    *,
    title: str,
    y_label: str,
    reference: float | None = None,
    reference_label: str = "",
    min_y_max: float = 1.0,
) -> tuple[Image.Image, BarLayout]:
    """Grouped bars: one group per label (x axis), one bar per series, NaN values drawn as "n/a".

    Args:
        labels: the x-axis categories (sample names).
        series: name -> one value per label.
        title, y_label: texts.
        reference: draw a dashed horizontal line at this value (e.g. 1.0 for a ratio).
        min_y_max: the y axis reaches at least this value (and always ``reference``).

    Returns:
        The RGB chart and its :class:`BarLayout`.
    """
    n = len(labels)
    if n == 0 or not series:
        raise ValueError("bar_chart needs at least one label and one series")
    for name, vals in series.items():
        if len(vals) != n:
            raise ValueError(f"series {name!r} has {len(vals)} values for {n} labels")
    finite = [v for vals in series.values() for v in vals if math.isfinite(v)]
    top_value = max([min_y_max] + ([reference] if reference is not None else []) + finite)
    step = nice_step(top_value * 1.05)
    y_max = math.ceil(top_value * 1.05 / step) * step
    k = len(series)
    bar_w = max(4, min(24, 240 // max(1, k * n) + 4))
    group_w = k * bar_w + 8
    width = MARGIN_LEFT + MARGIN_RIGHT + max(n * group_w, 320)
    height = 320
    img = Image.new("RGB", (width, height), (255, 255, 255))
    d = ImageDraw.Draw(img)
    f, fs = font(12), font(10)
    layout = BarLayout(0.0, y_max, MARGIN_TOP, height - MARGIN_BOTTOM, [])
    x_left, x_right = MARGIN_LEFT, width - MARGIN_RIGHT

    # y grid, ticks and tick labels
    t = 0.0
    while t <= y_max + 1e-9:
        y = layout.y_of(t)
        d.line([(x_left, y), (x_right, y)], fill=GRID_COLOR)
        d.line([(x_left - 4, y), (x_left, y)], fill=AXIS_COLOR)
        text = f"{t:g}"
        d.text((x_left - 6 - d.textlength(text, font=fs), y - 6), text, fill=AXIS_COLOR, font=fs)
        t += step

    # reference line (dashed), behind the bars
    if reference is not None:
        y = layout.y_of(reference)
        for x in range(x_left, x_right, 8):
            d.line([(x, y), (min(x + 4, x_right), y)], fill=REFERENCE_COLOR, width=1)
        if reference_label:
            lx = x_right - d.textlength(reference_label, font=fs) - 2
            d.text((lx, y - 13), reference_label, fill=REFERENCE_COLOR, font=fs)

    # bars
    plot_w = x_right - x_left
    bars: list[list[tuple[int, int]]] = [[] for _ in range(k)]
    for i, _ in enumerate(labels):
        gx = x_left + int((i + 0.5) * plot_w / n) - (k * bar_w) // 2
        for s, (name, vals) in enumerate(series.items()):
            x0, x1 = gx + s * bar_w, gx + (s + 1) * bar_w - 2
            bars[s].append((x0, x1))
            v = vals[i]
            color = SERIES_COLORS[s % len(SERIES_COLORS)]
            if math.isfinite(v):
                d.rectangle([x0, layout.y_of(max(v, 0.0)), x1, layout.bottom], fill=color)
            else:
                d.text((x0, layout.bottom - 12), "n/a", fill=color, font=fs)

    # axes
    d.line([(x_left, layout.top), (x_left, layout.bottom)], fill=AXIS_COLOR)
    d.line([(x_left, layout.bottom), (x_right, layout.bottom)], fill=AXIS_COLOR)

    # x labels: names when they fit, else indices
    slot = plot_w / n
    fit = all(d.textlength(str(lab), font=fs) <= slot - 2 for lab in labels)
    for i, lab in enumerate(labels):
        text = str(lab) if fit else str(i)
        cx = x_left + (i + 0.5) * slot
        d.text((cx - d.textlength(text, font=fs) / 2, layout.bottom + 4), text, fill=AXIS_COLOR, font=fs)
    x_title = "sample" if fit else "sample (index in metrics.csv)"
    d.text(((x_left + x_right) / 2 - d.textlength(x_title, font=f) / 2, height - 22), x_title, fill=AXIS_COLOR, font=f)

    # titles and legend
    d.text((x_left, 6), title, fill=AXIS_COLOR, font=f)
    d.text((4, 22), y_label, fill=AXIS_COLOR, font=fs)
    lx = x_right
    for s, name in reversed(list(enumerate(series))):
        w = d.textlength(name, font=fs)
        lx -= int(w) + 18
        d.rectangle([lx, 24, lx + 10, 34], fill=SERIES_COLORS[s % len(SERIES_COLORS)])
        d.text((lx + 13, 23), name, fill=AXIS_COLOR, font=fs)
    return img, BarLayout(layout.y_min, layout.y_max, layout.top, layout.bottom, bars)
