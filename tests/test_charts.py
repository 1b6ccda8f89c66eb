"""resdiff.charts: what is on each chart (read back from its Figure), and how it is written (whole, the same bytes
for the same data, no pyplot or display, matplotlib loaded only where a chart is drawn)."""

import os
import subprocess
import sys

import matplotlib
import pytest
from PIL import Image

from resdiff.charts import DPI, WIDTH, Panel, line_chart, save, step_chart

from tiny_runs import ROOT

SAMPLERS = {"ddpm": [(10, 106.02), (20, 68.24), (50, 62.67)], "ddim": [(50, 76.28), (10, 116.59), (20, 84.66)],
            "heun": [(9, 217.02), (19, 134.55), (49, 83.99)]}


def nfe_chart(series=SAMPLERS):
    return line_chart(series, title="FID against NFE", x_label="model evaluations (NFE)", y_label="FID", log_x=True,
                      x_ticks=[10, 20, 50])


def tick_labels(axis) -> list[str]:
    axis.get_figure().canvas.draw()  # tick labels are set when the chart is drawn
    return [t.get_text() for t in axis.get_ticklabels()]


def test_line_chart_has_log_x_ticked_exactly_at_the_given_values_and_a_legend():
    figure = nfe_chart()
    (ax,) = figure.axes
    assert ax.get_xscale() == "log" and ax.get_yscale() == "linear"
    assert list(ax.get_xticks()) == [10, 20, 50] and tick_labels(ax.xaxis) == ["10", "20", "50"]
    assert list(ax.xaxis.get_minorticklocs()) == []  # no unlabelled 30, 40 between them
    assert ax.get_xlim()[0] < 9 and ax.get_xlim()[1] > 50  # Heun's 9 NFE inside the frame
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["ddpm", "ddim", "heun"]
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("model evaluations (NFE)", "FID", "FID against NFE")
    ddim = ax.lines[1]  # each series drawn in x order, with its points
    assert list(ddim.get_xdata()) == [10, 20, 50] and list(ddim.get_ydata()) == [116.59, 84.66, 76.28]
    assert len({line.get_color() for line in ax.lines}) == 3 and len({line.get_marker() for line in ax.lines}) == 3
    fixed = line_chart({"a": [(5, 1.0)], "b": [(5, 2.0)]}, title="t", x_label="x", y_label="y",
                       colours={"b": "#000000"}).axes[0]
    assert fixed.lines[1].get_color() == "#000000" and fixed.lines[0].get_color() != "#000000"
    with pytest.raises(ValueError, match="log x"):
        line_chart({"a": [(0, 1.0)]}, title="t", x_label="x", y_label="y", log_x=True)


def test_empty_and_one_point_series_draw_without_error(tmp_path):
    one = nfe_chart({"ddpm": [(20, 68.24)], "ddim": []})
    ax = one.axes[0]
    assert list(ax.lines[0].get_xdata()) == [20] and len(ax.lines[1].get_xdata()) == 0
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["ddpm", "ddim"]
    empty = nfe_chart({"ddpm": []})
    assert "no value yet" in [t.get_text() for t in empty.axes[0].texts] and list(empty.axes[0].get_yticks()) == []
    nothing = line_chart({}, title="t", x_label="x", y_label="y")
    for name, figure in (("one", one), ("empty", empty), ("nothing", nothing)):
        assert Image.open(save(figure, tmp_path / f"{name}.png")).format == "PNG"


def records():
    """A run's log: the loss every 50 steps, FID and KID at 200, 400 and 600."""
    log = [{"step": s, "loss": 1.0 / s ** 0.5, "lr": 1e-3} for s in range(50, 650, 50)]
    return log + [{"step": s, "fid@64": 300.0 - s / 3, "kid@64": 0.2 - s / 6000} for s in (200, 400, 600)]


def test_step_chart_draws_each_quantity_against_the_shared_step_axis_with_its_last_value():
    figure = step_chart(records(), [Panel("fid@64", "FID@64"), Panel("loss", "training loss", log_y=True)],
                        title="quality and loss")
    fid, loss = figure.axes
    assert figure.get_suptitle() == "quality and loss"
    assert (fid.get_ylabel(), loss.get_ylabel(), loss.get_xlabel()) == ("FID@64", "training loss", "step")
    assert fid.get_shared_x_axes().joined(fid, loss)
    assert list(fid.lines[0].get_xdata()) == [200, 400, 600]
    assert list(fid.lines[0].get_ydata()) == [300.0 - s / 3 for s in (200, 400, 600)]
    assert list(loss.lines[0].get_xdata()) == list(range(50, 650, 50))
    assert [t.get_text() for t in fid.texts] == ["100"]  # the last values, written beside them
    assert [t.get_text() for t in loss.texts] == [f"{1 / 600 ** 0.5:.4g}"]
    # the loss falls from 0.14 to 0.041: log y, ticked at 0.05 and 0.1 in plain numbers
    assert loss.get_yscale() == "log" and {"0.05", "0.1"} <= set(tick_labels(loss.yaxis))
    assert all(float(t) == int(float(t)) for t in tick_labels(loss.xaxis) if t)  # steps are whole numbers
    narrow = step_chart([{"step": 1, "loss": 0.031}, {"step": 2, "loss": 0.034}], [Panel("loss", "loss", log_y=True)],
                        title="")
    assert narrow.axes[0].get_yscale() == "linear"  # no 1-2-5 tick inside 0.031..0.034: a log axis would be unreadable


def test_step_chart_of_an_empty_log_says_so_on_each_panel():
    figure = step_chart([], [Panel("fid@64", "FID@64"), Panel("loss", "training loss")], title="")
    for ax in figure.axes:
        assert [t.get_text() for t in ax.texts] == ["no value yet"] and list(ax.get_yticks()) == [] and not ax.lines
    assert list(figure.axes[-1].get_xticks()) == []  # no made-up steps


def test_save_writes_the_png_whole_and_the_same_bytes_for_the_same_data(tmp_path):
    path = save(nfe_chart(), tmp_path / "charts" / "nfe.png")  # the folder made
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] == round(WIDTH * DPI)
        assert image.info["Software"].startswith("resdiff charts (matplotlib ")
        assert "date" not in str(image.info).lower()
    first = path.read_bytes()
    assert save(nfe_chart(), path).read_bytes() == first
    # a chart that fails while it is drawn (a broken formula in its title) leaves the earlier file as it was
    broken = line_chart({"a": [(1, 1.0)]}, title=r"$\frac{$", x_label="x", y_label="y")
    with pytest.raises(ValueError):
        save(broken, path)
    assert path.read_bytes() == first and sorted(p.name for p in path.parent.iterdir()) == ["nfe.png"]


def test_charts_change_no_global_matplotlib_state(tmp_path):
    """The charts' style is applied while each is built, then matplotlib's settings are as they were."""
    before = dict(matplotlib.rcParams)
    save(nfe_chart(), tmp_path / "nfe.png")
    save(step_chart(records(), [Panel("loss", "loss")], title=""), tmp_path / "loss.png")
    assert dict(matplotlib.rcParams) == before


def test_only_charts_imports_matplotlib_and_others_import_charts_only_where_they_draw():
    """Training, sampling and evaluation start without matplotlib: no module of resdiff but charts.py imports it,
    or charts.py, at module level (an import inside a function, or under TYPE_CHECKING, is not run at import)."""
    import ast

    for path in sorted((ROOT / "resdiff").glob("*.py")):
        if path.stem == "charts":
            continue
        top = [node for node in ast.parse(path.read_text()).body if isinstance(node, (ast.Import, ast.ImportFrom))]
        names = [alias.name for node in top if isinstance(node, ast.Import) for alias in node.names]
        names += [f"{'.' * node.level}{node.module or ''}" for node in top if isinstance(node, ast.ImportFrom)]
        names += [f".{alias.name}" for node in top
                  if isinstance(node, ast.ImportFrom) and node.level and not node.module for alias in node.names]
        heavy = [n for n in names if n.split(".")[0] == "matplotlib" or n in (".charts", "resdiff.charts")]
        assert not heavy, f"{path.name} imports {heavy} when it is imported"


def test_a_chart_needs_no_pyplot_or_display(tmp_path):
    """``import resdiff`` leaves matplotlib unloaded; drawing a chart imports no pyplot and needs no display."""
    code = (
        "import sys, resdiff\n"
        "assert 'matplotlib' not in sys.modules, 'loaded by import resdiff'\n"
        "from resdiff.charts import line_chart, save\n"
        "chart = line_chart({'a': [(1, 2.0), (2, 1.0)]}, title='t', x_label='x', y_label='y')\n"
        f"save(chart, {str(tmp_path / 'a.png')!r})\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "MPLBACKEND")}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert Image.open(tmp_path / "a.png").format == "PNG"
