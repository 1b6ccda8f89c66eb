"""Every chart resdiff and bench/ draw: named series of (x, y) points, and quantities from a run's log against step.

matplotlib draws them headless: each chart is its own ``Figure`` on an Agg canvas, with no pyplot, window or
display, and its style applied inside an ``rc_context``, so nothing global changes between calls. A chart is
built by one function, which returns the Figure (tests read its labels, ticks, legend and scales from it), and
written by ``save``: whole or not at all, at a fixed size and resolution, with no date in the PNG, so the same
data gives the same file. resdiff imports this module only where it draws, so training and ``import resdiff``
do not load matplotlib.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, LogLocator, MaxNLocator, NullFormatter, NullLocator

from .files import write_atomic

__all__ = ["Panel", "line_chart", "step_chart", "save", "WIDTH", "DPI"]

WIDTH, DPI = 6.4, 150  # inches and dots per inch: 960 pixels across, type about 9 points as printed
LINE_HEIGHT, PANEL_HEIGHT = 4.0, 2.1  # inches: a line chart; each panel of a step chart
# Okabe and Ito's colour-blind-safe palette, and a marker per series, so lines stay apart in grey print too.
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000")
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
STYLE = {
    "font.size": 9, "axes.titlesize": 9.5, "axes.labelsize": 9, "legend.fontsize": 8.5, "xtick.labelsize": 8.5,
    "ytick.labelsize": 8.5, "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True,
    "axes.grid.which": "major", "grid.color": "#d0d0d0", "grid.linewidth": 0.6, "lines.linewidth": 1.6,
    "lines.markersize": 5.5, "legend.frameon": False, "figure.facecolor": "white", "axes.facecolor": "white",
    "savefig.facecolor": "white", "path.simplify": False, "svg.hashsalt": "resdiff",
}
# PNG text chunks: matplotlib writes no date into a PNG, and naming the software alone keeps the bytes a
# function of the data and matplotlib's version.
METADATA = {"Software": f"resdiff charts (matplotlib {matplotlib.__version__})"}

Points = Sequence[tuple[float, float]]


def _figure(height: float) -> Figure:
    """A white figure of the fixed width on its own Agg canvas (never pyplot's: no window, no global registry)."""
    figure = Figure(figsize=(WIDTH, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _no_data(ax) -> None:
    """An axes with nothing to show says so, with no made-up scale (matplotlib's 0 to 1) on it."""
    ax.text(0.5, 0.5, "no value yet", transform=ax.transAxes, ha="center", va="center", color="#707070")
    ax.set_yticks([])


def _log_y(ax, lo: float, hi: float) -> None:
    """Log y ticked at 1, 2 and 5 x 10^k, written as plain numbers (0.05, 0.1, 0.2), where the values
    ``lo``..``hi`` span two such ticks or more; a narrower range stays linear, which reads better there."""
    ticks = [m * 10.0**e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1) for m in (1, 2, 5)]
    if sum(lo <= t <= hi for t in ticks) < 2:
        return
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(lambda y, _pos: f"{y:g}")
    ax.yaxis.set_minor_formatter(NullFormatter())


def line_chart(
    series: Mapping[str, Points], *, title: str, x_label: str, y_label: str, log_x: bool = False,
    x_ticks: Sequence[float] | None = None, colours: Mapping[str, str] | None = None,
) -> Figure:
    """One line per named series of (x, y) points (drawn in x order, each point marked), a legend in the
    order given, a grid. ``log_x`` puts x on a log scale (e.g. model evaluations, training minutes); with
    ``x_ticks`` the x axis is ticked exactly there, labelled with the numbers (10, 20, 50), and nowhere else.
    ``colours`` fixes a series' colour by name (e.g. the same contender in every chart); others take the
    palette in turn. An empty series has a legend entry and no line."""
    if log_x and any(x <= 0 for points in series.values() for x, _ in points):
        raise ValueError(f"{title}: a log x axis needs x > 0")
    with matplotlib.rc_context(STYLE):
        figure = _figure(LINE_HEIGHT)
        ax = figure.add_subplot()
        for k, (name, points) in enumerate(series.items()):
            xs, ys = zip(*sorted(points)) if points else ((), ())
            colour = (colours or {}).get(name, PALETTE[k % len(PALETTE)])
            # hollow markers: where two series meet (FID of two samplers alike) both shapes stay visible
            ax.plot(xs, ys, marker=MARKERS[k % len(MARKERS)], color=colour, label=name, markerfacecolor="white",
                    markeredgewidth=1.4, zorder=2 + 0.01 * k)
        if log_x:
            ax.set_xscale("log")
        if x_ticks is not None:
            ax.xaxis.set_major_locator(FixedLocator(list(x_ticks)))
            ax.xaxis.set_major_formatter(lambda x, _pos: f"{x:g}")
            ax.xaxis.set_minor_locator(NullLocator())  # a log axis would add unlabelled ticks at 2, 3, ... 9
            ax.xaxis.set_minor_formatter(NullFormatter())
            xs = [*x_ticks, *(x for points in series.values() for x, _ in points)]
            if xs:
                ax.set_xlim(*_margin(min(xs), max(xs), log_x))
        if not any(series.values()):
            _no_data(ax)
        ax.set(title=title, xlabel=x_label, ylabel=y_label)
        if series:
            ax.legend(loc="best")
    return figure


def _margin(lo: float, hi: float, log: bool) -> tuple[float, float]:
    """The x range with 6% of its span (of log x when ``log``) either side, so end points are not on the frame."""
    if log:
        return lo / (hi / lo) ** 0.06, hi * (hi / lo) ** 0.06
    pad = 0.06 * ((hi - lo) or 1.0)
    return lo - pad, hi + pad


@dataclass(frozen=True)
class Panel:
    """One panel of a step chart: the records' ``key`` against step, its axis ``label``, and log y or not."""

    key: str
    label: str
    log_y: bool = False


def step_chart(records: Sequence[Mapping], panels: Sequence[Panel], *, title: str) -> Figure:
    """Quantities of a run's log records (log.jsonl's dicts, each with its ``step``) against step: one panel
    each, one above the other on a shared step axis, every point marked and the last value written beside it
    (a panel without values says so). A panel whose values are all positive may be log y (e.g. the loss)."""
    with matplotlib.rc_context(STYLE):
        figure = _figure(PANEL_HEIGHT * len(panels) + 0.5)
        axes = figure.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
        plotted = False
        for k, (ax, panel) in enumerate(zip(axes, panels)):
            points = sorted((int(r["step"]), float(r[panel.key])) for r in records if panel.key in r and "step" in r)
            ax.set_ylabel(panel.label)
            if not points:
                _no_data(ax)
                continue
            steps, values = zip(*points)
            plotted = True
            colour = PALETTE[k % len(PALETTE)]
            ax.plot(steps, values, color=colour, marker="o" if len(points) <= 25 else None)
            if panel.log_y and min(values) > 0:
                _log_y(ax, min(values), max(values))
            ax.annotate(f"{values[-1]:.4g}", (steps[-1], values[-1]), xytext=(-4, 6), textcoords="offset points",
                        ha="right", va="bottom", color=colour, fontweight="bold")
        axes[-1].set_xlabel("step")
        axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True) if plotted else NullLocator())
        figure.suptitle(title, fontsize=STYLE["axes.titlesize"])
    return figure


def save(figure: Figure, path: str | Path) -> Path:
    """Write ``figure`` as a PNG at ``path`` (its folder made if need be), whole or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: figure.savefig(tmp, format="png", dpi=DPI, metadata=METADATA))
    return path
