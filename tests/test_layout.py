"""The module map's rules, read from the source (tools/import_graph.py): no import circles in resdiff/, lazy
imports included, and a U-Net that depends on its layers and nothing else of resdiff."""

import sys

import pytest

from tiny_runs import ROOT

sys.path.insert(0, str(ROOT))
from tools.import_graph import cycles, import_graph, imports_of  # noqa: E402


def test_resdiff_has_no_import_circles():
    graph = import_graph()
    assert {"unet", "nn", "config", "trainer", "model_folder"} <= set(graph)  # it read the package
    assert cycles(graph) == []


def test_unet_imports_only_its_layers():
    """Other pipelines import the U-Net: it must not bring conversion, loading, config or training code along."""
    assert import_graph()["unet"] == {"nn", "shapes"}  # shapes: the image-size facts, importing nothing


def test_the_graph_sees_lazy_imports_and_finds_circles(tmp_path):
    tmp_path = tmp_path / "pkg"  # the package's name, as absolute imports spell it
    tmp_path.mkdir()
    (tmp_path / "a.py").write_text("from . import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from .c import x\n    import pkg.a\n")  # lazy, absolute
    (tmp_path / "c.py").write_text("import os\n")
    assert imports_of(tmp_path / "b.py", "pkg") == {"a", "c"}
    graph = import_graph(tmp_path)
    assert graph == {"a": {"b"}, "b": {"a", "c"}, "c": set()}
    assert cycles(graph) == [["a", "b"]]
    assert cycles({"x": {"y"}, "y": {"z"}, "z": {"x"}, "w": {"x"}}) == [["x", "y", "z"]]


@pytest.mark.parametrize("script, shown", [
    ("train.py", "--mixed-precision {no,fp16,bf16}"),
    ("sample.py", "--sampler {ddpm,ddim,dpm++,euler,heun}"),
    ("evaluate.py", "--kid-subsets KID_SUBSETS"),
    ("export.py", "--diffusers"),
])
def test_cli_help_imports_no_torch(script, shown):
    """The CLIs' parsers take their choices and defaults from light modules (resdiff.choices, resdiff.settings), not
    from the modules that build the things (which import torch), so `--help` answers at once."""
    import os
    import subprocess

    code = (
        "import runpy, sys\n"
        f"sys.argv = [{script!r}, '--help']\n"
        "try:\n"
        f"    runpy.run_path({script!r}, run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = sorted(m for m in ('torch', 'diffusers', 'accelerate') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert shown in done.stdout
